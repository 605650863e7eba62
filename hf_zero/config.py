"""ZeroConfig: the DeepSpeed-format JSON configuration read by hf_zero.

Invariants of this module:

* Every config class is a frozen dataclass.  An instance never changes; use
  ``ZeroConfig.resolve`` (or ``dataclasses.replace``) to obtain a new one.
* Every instance is validated when it is constructed (``__post_init__``), by
  ``ZeroConfig.load`` as well as by direct construction.  Values are
  normalised on the way in (integral floats such as ``5e8`` become ``int``,
  ``betas`` lists become tuples, optimizer names get their canonical case).
* Every problem is reported as ``ConfigError`` whose message names the dotted
  key path (``zero_optimization.offload_optimizer.device``), the offending
  value and what was expected.  Parsing is strict: unknown keys are errors,
  and DeepSpeed features that are not implemented here are rejected unless
  they hold their disabled/default value; nothing is silently ignored except
  the keys listed in ``COMPAT_KEYS``.
* The string ``"auto"`` is accepted only at the keys listed in ``AUTO_KEYS``
  and only survives until ``resolve()``; a resolved config contains no
  ``"auto"`` and has consistent batch sizes for its world size.

Only the standard library and torch are imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import torch

__all__ = [
    "AUTO",
    "AUTO_KEYS",
    "COMPAT_KEYS",
    "AioConfig",
    "BF16Config",
    "CompatKey",
    "ConfigError",
    "FP16Config",
    "OffloadConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "ZeroConfig",
    "ZeroOptimizationConfig",
]

AUTO = "auto"


# --------------------------------------------------------------------------
# Constant tables
# --------------------------------------------------------------------------

#: Dotted keys at which the value "auto" is accepted (the same keys the
#: Hugging Face DeepSpeed integration fills in).  Everywhere else "auto" is
#: an error.
AUTO_KEYS: tuple[str, ...] = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "fp16.enabled",
    "bf16.enabled",
    "optimizer.params.lr",
    "optimizer.params.betas",
    "optimizer.params.eps",
    "optimizer.params.weight_decay",
    "scheduler.params.warmup_min_lr",
    "scheduler.params.warmup_max_lr",
    "scheduler.params.warmup_num_steps",
    "scheduler.params.total_num_steps",
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
)


class CompatKey(NamedTuple):
    """How a compatibility-only key is checked.

    kind: "bool", "int", "dtype" (one of fp32/fp16/bf16) or "object" (a JSON
    object; its content is not inspected).  only: when not None, the single
    value accepted (for "object" keys: the only accepted value of its
    "enabled" entry); anything else names a feature not supported here.
    """

    kind: str
    only: Any = None


#: Keys accepted so that existing DeepSpeed configs load, but which have no
#: effect here.  docs/config.md mirrors this table.
COMPAT_KEYS: Mapping[str, CompatKey] = MappingProxyType(
    {
        # top level
        "dump_state": CompatKey("bool"),
        "memory_breakdown": CompatKey("bool"),
        "flops_profiler": CompatKey("object"),
        "tensorboard": CompatKey("object"),
        "wandb": CompatKey("object"),
        "csv_monitor": CompatKey("object"),
        "comet": CompatKey("object"),
        "comms_logger": CompatKey("object"),
        "activation_checkpointing": CompatKey("object"),
        "checkpoint": CompatKey("object"),
        "elasticity": CompatKey("object", only=False),
        "amp": CompatKey("object", only=False),
        "zero_force_ds_cpu_optimizer": CompatKey("bool"),
        "seq_parallel_communication_data_type": CompatKey("dtype"),
        "sparse_gradients": CompatKey("bool", only=False),
        # fp16 / bf16
        "fp16.fp16_master_weights_and_grads": CompatKey("bool", only=False),
        "bf16.immediate_grad_update": CompatKey("bool"),
        "bf16.check_grad_overflow": CompatKey("bool"),
        # zero_optimization
        "zero_optimization.elastic_checkpoint": CompatKey("bool"),
        "zero_optimization.load_from_fp32_weights": CompatKey("bool"),
        "zero_optimization.memory_efficient_linear": CompatKey("bool"),
        "zero_optimization.use_multi_rank_bucket_allreduce": CompatKey("bool"),
        "zero_optimization.zero_quantized_nontrainable_weights": CompatKey("bool", only=False),
        "zero_optimization.offload_optimizer.pipeline_read": CompatKey("bool"),
        "zero_optimization.offload_optimizer.pipeline_write": CompatKey("bool"),
    }
)

_DTYPES = ("fp32", "fp16", "bf16")
_OFFLOAD_DEVICES = ("none", "cpu", "nvme")
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")

# Kinds of optimizer / scheduler parameters; see _check_param.
_OPTIMIZER_PARAMS: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {
        "Adam": MappingProxyType(
            {
                "lr": "rate",
                "betas": "betas",
                "eps": "rate",
                "weight_decay": "rate",
                "torch_adam": "bool",
                "adam_w_mode": "bool",
            }
        ),
        "AdamW": MappingProxyType(
            {"lr": "rate", "betas": "betas", "eps": "rate", "weight_decay": "rate", "torch_adam": "bool"}
        ),
        "SGD": MappingProxyType(
            {"lr": "rate", "momentum": "rate", "dampening": "rate", "weight_decay": "rate", "nesterov": "bool"}
        ),
    }
)
_SCHEDULER_PARAMS: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {
        "WarmupLR": MappingProxyType(
            {
                "warmup_min_lr": "rate",
                "warmup_max_lr": "rate",
                "warmup_num_steps": "steps",
                "warmup_type": "warmup_type",
                "last_batch_iteration": "iteration",
            }
        ),
        "WarmupDecayLR": MappingProxyType(
            {
                "warmup_min_lr": "rate",
                "warmup_max_lr": "rate",
                "warmup_num_steps": "steps",
                "warmup_type": "warmup_type",
                "last_batch_iteration": "iteration",
                "total_num_steps": "total_steps",
            }
        ),
        "WarmupCosineLR": MappingProxyType(
            {
                "total_num_steps": "total_steps",
                "warmup_min_ratio": "rate",
                "warmup_num_steps": "steps",
                "cos_min_ratio": "rate",
                "warmup_type": "warmup_type",
                "last_batch_iteration": "iteration",
            }
        ),
    }
)
_SCHEDULER_REQUIRED: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"WarmupLR": (), "WarmupDecayLR": ("total_num_steps",), "WarmupCosineLR": ("total_num_steps",)}
)
_AUTO_OPTIMIZER_PARAMS = frozenset(k.rsplit(".", 1)[1] for k in AUTO_KEYS if k.startswith("optimizer.params."))
_AUTO_SCHEDULER_PARAMS = frozenset(k.rsplit(".", 1)[1] for k in AUTO_KEYS if k.startswith("scheduler.params."))

# Keys of the two offload sections (DeepSpeed splits them the same way).
_OFFLOAD_OPTIMIZER_KEYS = (
    "device", "nvme_path", "pin_memory", "buffer_count", "fast_init", "ratio", "delayed_update", "threads",
)
_OFFLOAD_PARAM_KEYS = ("device", "nvme_path", "pin_memory", "buffer_count", "buffer_size", "max_in_cpu")


# --------------------------------------------------------------------------
# Errors and value checks
# --------------------------------------------------------------------------


class ConfigError(ValueError):
    """A problem with a zero config.  The message names the dotted key path.

    Attributes: ``key`` (dotted path or None), ``detail`` (the message without
    key and source) and ``source`` (file path, "<dict>" or None).
    """

    def __init__(self, detail: str, *, key: str | None = None, source: str | None = None, inline: bool = False):
        self.detail = detail
        self.key = key
        self.source = source
        self._inline = inline  # detail contains the placeholder "{key}"
        super().__init__(self._render())

    def _render(self) -> str:
        if self.key is None:
            text = self.detail.replace("{key}", "?") if self._inline else self.detail
        elif self._inline:
            text = self.detail.replace("{key}", self.key)
        else:
            text = f"{self.key}: {self.detail}"
        return f"zero config {self.source}: {text}" if self.source else text

    def _under(self, prefix: str) -> ConfigError:
        key = _join(prefix, self.key) if self.key else prefix
        return ConfigError(self.detail, key=key, source=self.source, inline=self._inline)

    def _from(self, source: str) -> ConfigError:
        if self.source is not None:
            return self
        return ConfigError(self.detail, key=self.key, source=source, inline=self._inline)


class _within:
    """Context manager prefixing the key of ConfigErrors raised inside."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if isinstance(exc, ConfigError) and self.prefix:
            raise exc._under(self.prefix) from None
        return False


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _hint(value: Any, auto_allowed: bool) -> str:
    if isinstance(value, str):
        if value == AUTO and not auto_allowed:
            return ' ("auto" is not accepted for this key)'
        if value.strip().lower() in ("true", "false"):
            return " (a string; write true/false without quotes)"
        try:
            float(value)
        except ValueError:
            return ""
        return " (a string; write the number without quotes)"
    if isinstance(value, bool):
        return " (a boolean)"
    return ""


def _fail(key: str, expected: str, value: Any, auto: bool = False) -> ConfigError:
    if auto:
        expected += ' or "auto"'
    return ConfigError(f"expected {expected}, got {_show(value)}{_hint(value, auto)}", key=key)


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == AUTO


_FLOAT_EXACT = 2 ** 53          # largest float range in which every integer is exact
_BATCH_MAX = 2 ** 31 - 1        # a batch-size key beyond this is a typo, not a batch


def _int(key: str, value: Any, *, minimum: int | None = 0, maximum: int | None = None,
         auto: bool = False, optional: bool = False) -> Any:
    if auto and _is_auto(value):
        return AUTO
    if optional and value is None:
        return None
    # A float is taken only when it is integral *and* exact (|x| <= 2**53):
    # 1e30 is "integral" but not a count anyone meant, and int() of it
    # would silently invent digits.
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) <= _FLOAT_EXACT:
        value = int(value)
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and (minimum is None or value >= minimum)
        and (maximum is None or value <= maximum)
    ):
        return value
    if minimum is not None and maximum is not None:
        expected = f"an integer from {minimum} to {maximum}"
    elif minimum is not None:
        expected = f"an integer >= {minimum}"
    else:
        expected = "an integer"
    if optional:
        expected += " or null"
    raise _fail(key, expected, value, auto)


def _float(key: str, value: Any, *, minimum: float | None = None, above: float | None = None,
           maximum: float | None = None, auto: bool = False) -> Any:
    if auto and _is_auto(value):
        return AUTO
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        value = float(value)
        ok = (
            (minimum is None or value >= minimum)
            and (above is None or value > above)
            and (maximum is None or value <= maximum)
        )
    if ok:
        return value
    bounds = []
    if minimum is not None:
        bounds.append(f">= {minimum:g}")
    if above is not None:
        bounds.append(f"> {above:g}")
    if maximum is not None:
        bounds.append(f"<= {maximum:g}")
    raise _fail(key, "a number" + (" " + " and ".join(bounds) if bounds else ""), value, auto)


def _bool(key: str, value: Any, *, auto: bool = False) -> Any:
    if auto and _is_auto(value):
        return AUTO
    if isinstance(value, bool):
        return value
    # DeepSpeed reads these keys as Python truthiness / pydantic lax bools,
    # so configs written for it use 0 and 1; accept exactly those two ints.
    if type(value) is int and value in (0, 1):
        return bool(value)
    raise _fail(key, "true or false (or 0/1)", value, auto)


def _choice(key: str, value: Any, choices: Collection[str], *, optional: bool = False) -> Any:
    if optional and value is None:
        return None
    if isinstance(value, str) and value in choices:
        return value
    expected = "one of " + ", ".join(_show(c) for c in choices) + (" or null" if optional else "")
    raise _fail(key, expected, value)


def _unknown_key(key: str, section: str, valid: Collection[str], extra: str = "") -> ConfigError:
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    if close:
        hint = f"; did you mean '{close[0]}'?"
    else:
        hint = "; valid keys here: " + ", ".join(sorted(valid))
    return ConfigError("unknown key '{key}'" + extra + hint, key=_join(section, key), inline=True)


def _compat_keys_of(section: str) -> dict[str, CompatKey]:
    """COMPAT_KEYS entries directly under ``section`` ("" = top level)."""
    out = {}
    for path, spec in COMPAT_KEYS.items():
        parent, _, name = path.rpartition(".")
        if parent == section:
            out[name] = spec
    return out


def _check_compat(path: str, spec: CompatKey, value: Any) -> None:
    if spec.kind == "object":
        if not isinstance(value, Mapping):
            raise _fail(path, "a JSON object", value)
        if spec.only is not None and value.get("enabled", spec.only) != spec.only:
            raise ConfigError(
                f"{_show(value.get('enabled'))} is not supported here; remove the '{path}' section "
                f"or set enabled to {_show(spec.only)}",
                key=_join(path, "enabled"),
            )
        return
    if spec.kind == "bool":
        value = _bool(path, value)
    elif spec.kind == "int":
        value = _int(path, value, minimum=None)
    elif spec.kind == "dtype":
        value = _choice(path, value, _DTYPES)
    else:  # pragma: no cover - table error
        raise AssertionError(spec.kind)
    if spec.only is not None and value != spec.only:
        raise ConfigError(
            f"{_show(value)} is not supported here (this feature is not implemented); "
            f"remove the key or set it to {_show(spec.only)}",
            key=path,
        )


def _section(raw: Any, section: str, valid: Collection[str]) -> dict[str, Any]:
    """Check that ``raw`` is an object with only ``valid`` or compat keys.

    Returns the non-compat entries.  Compat entries are checked and dropped.
    """
    if not isinstance(raw, Mapping):
        raise _fail(section, "a JSON object", raw)
    compat = _compat_keys_of(section)
    out = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"keys must be strings, got {key!r}", key=section or None)
        if key in compat:
            _check_compat(_join(section, key), compat[key], value)
        elif key in valid:
            out[key] = value
        else:
            raise _unknown_key(key, section, set(valid) | set(compat))
    return out


class _ParamMap(Mapping):
    """Immutable, hashable, picklable str -> value mapping (optimizer params)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any] | None = None):
        object.__setattr__(self, "_data", dict(data or {}))

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("params are immutable")

    def __reduce__(self):
        return (_ParamMap, (self._data,))

    def __repr__(self) -> str:
        return repr(self._data)


def _check_param(key: str, kind: str, value: Any, auto: bool) -> Any:
    if kind == "rate":
        return _float(key, value, minimum=0.0, auto=auto)
    if kind == "bool":
        return _bool(key, value)
    if kind == "steps":
        return _int(key, value, minimum=0, auto=auto)
    if kind == "total_steps":
        return _int(key, value, minimum=1, auto=auto)
    if kind == "iteration":
        return _int(key, value, minimum=-1)
    if kind == "warmup_type":
        return _choice(key, value, ("log", "linear"))
    if kind == "betas":
        if auto and _is_auto(value):
            return AUTO
        if isinstance(value, (list, tuple)) and len(value) == 2:
            try:
                return tuple(_float(key, b, minimum=0.0, maximum=1.0) for b in value)
            except ConfigError:
                pass
        raise _fail(key, "a list of two numbers in [0, 1]", value, auto)
    raise AssertionError(kind)  # pragma: no cover - table error


def _check_params(owner: str, type_name: str, table: Mapping[str, str], params: Any,
                  auto_params: Collection[str]) -> _ParamMap:
    if not isinstance(params, Mapping):
        raise _fail("params", "a JSON object", params)
    out = {}
    for name, value in params.items():
        if name not in table:
            raise _unknown_key(str(name), "params", table, extra=f" for {owner} type {type_name}")
        out[name] = _check_param(_join("params", name), table[name], value, name in auto_params)
    return _ParamMap(out)


def _canonical_type(kind: str, value: Any, table: Mapping[str, Any]) -> str:
    if isinstance(value, str):
        for name in table:
            if name.lower() == value.lower():
                return name
    raise ConfigError(
        f"unsupported {kind} type {_show(value)}; supported: " + ", ".join(table), key="type"
    )


# --------------------------------------------------------------------------
# Config classes
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class OffloadConfig:
    """zero_optimization.offload_optimizer / zero_optimization.offload_param."""

    device: str = "none"
    nvme_path: str | None = None
    pin_memory: bool = False
    buffer_count: int = 4
    buffer_size: int = 100_000_000
    max_in_cpu: int = 1_000_000_000
    fast_init: bool = False
    ratio: float = 1.0
    delayed_update: bool = False  # offload_optimizer only: one-step delayed parameter update
    threads: int | None = None  # offload_optimizer only: CPU optimizer threads per rank

    def __post_init__(self) -> None:
        s = object.__setattr__
        s(self, "device", _choice("device", self.device, _OFFLOAD_DEVICES))
        if self.nvme_path is not None:
            if isinstance(self.nvme_path, os.PathLike):
                s(self, "nvme_path", os.fspath(self.nvme_path))
            if not isinstance(self.nvme_path, str) or not self.nvme_path:
                raise _fail("nvme_path", "a non-empty path string or null", self.nvme_path)
        if self.device == "nvme" and self.nvme_path is None:
            raise ConfigError('device "nvme" needs nvme_path (a directory on the NVMe drive)', key="nvme_path")
        s(self, "pin_memory", _bool("pin_memory", self.pin_memory))
        s(self, "buffer_count", _int("buffer_count", self.buffer_count, minimum=1))
        s(self, "buffer_size", _int("buffer_size", self.buffer_size, minimum=1))
        s(self, "max_in_cpu", _int("max_in_cpu", self.max_in_cpu, minimum=0))
        s(self, "fast_init", _bool("fast_init", self.fast_init))
        s(self, "ratio", _float("ratio", self.ratio, minimum=0.0, maximum=1.0))
        s(self, "delayed_update", _bool("delayed_update", self.delayed_update))
        s(self, "threads", _int("threads", self.threads, minimum=1, optional=True))

    @property
    def enabled(self) -> bool:
        return self.device != "none"


_AIO_ALIGN = 4096               # hf_zero.offload.nvme.ALIGN: direct-I/O span granularity


@dataclass(frozen=True)
class AioConfig:
    """The "aio" block (asynchronous I/O for NVMe offload)."""

    block_size: int = 1048576
    queue_depth: int = 8
    thread_count: int = 1
    single_submit: bool = False
    overlap_events: bool = True
    use_gds: bool = False

    def __post_init__(self) -> None:
        s = object.__setattr__
        for name in ("block_size", "queue_depth", "thread_count"):
            s(self, name, _int(name, getattr(self, name), minimum=1))
        if self.block_size % _AIO_ALIGN:
            raise ConfigError(
                f"must be a multiple of {_AIO_ALIGN} bytes (the O_DIRECT alignment of NVMe transfers), got "
                f"{self.block_size}; nearest valid: {max(_AIO_ALIGN, round(self.block_size / _AIO_ALIGN) * _AIO_ALIGN)}",
                key="block_size",
            )
        for name in ("single_submit", "overlap_events", "use_gds"):
            s(self, name, _bool(name, getattr(self, name)))


@dataclass(frozen=True)
class ZeroOptimizationConfig:
    """The "zero_optimization" block."""

    stage: int = 0
    offload_optimizer: OffloadConfig = field(default_factory=OffloadConfig)
    offload_param: OffloadConfig = field(default_factory=OffloadConfig)
    overlap_comm: bool | None = None  # None: True at stage 3, False otherwise (as DeepSpeed)
    contiguous_gradients: bool = True
    reduce_scatter: bool = True
    reduce_bucket_size: int | str = 500_000_000
    allgather_partitions: bool = True
    allgather_bucket_size: int = 500_000_000
    stage3_prefetch_bucket_size: int | str = 50_000_000
    stage3_param_persistence_threshold: int | str = 100_000
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000
    stage3_gather_16bit_weights_on_model_save: bool = False
    sub_group_size: int = 1_000_000_000
    round_robin_gradients: bool = False
    ignore_unused_parameters: bool = True
    # beyond one node (hf_zero/engine/hierarchy.py, docs/scale.md)
    mics_shard_size: int = -1
    mics_hierarchical_params_gather: bool = False
    zero_hpz_partition_size: int = 1
    zero_quantized_weights: bool = False
    zero_quantized_gradients: bool = False

    def __post_init__(self) -> None:
        s = object.__setattr__
        s(self, "stage", _int("stage", self.stage, minimum=0, maximum=3))
        for name in ("offload_optimizer", "offload_param"):
            if not isinstance(getattr(self, name), OffloadConfig):
                raise _fail(name, "an OffloadConfig", getattr(self, name))
        if self.overlap_comm is not None:
            s(self, "overlap_comm", _bool("overlap_comm", self.overlap_comm))
        for name in (
            "contiguous_gradients", "reduce_scatter", "allgather_partitions",
            "stage3_gather_16bit_weights_on_model_save", "round_robin_gradients", "ignore_unused_parameters",
        ):
            s(self, name, _bool(name, getattr(self, name)))
        s(self, "reduce_bucket_size", _int("reduce_bucket_size", self.reduce_bucket_size, minimum=1, auto=True))
        s(self, "allgather_bucket_size", _int("allgather_bucket_size", self.allgather_bucket_size, minimum=1))
        for name in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
            s(self, name, _int(name, getattr(self, name), minimum=0, auto=True))
        for name in ("stage3_max_live_parameters", "stage3_max_reuse_distance"):
            s(self, name, _int(name, getattr(self, name), minimum=0))
        s(self, "sub_group_size", _int("sub_group_size", self.sub_group_size, minimum=1))
        self._check_scale()

        # Keys of the other offload section must hold their defaults, so that
        # to_dict() can leave them out and still round-trip.
        default = OffloadConfig()
        for section, allowed, other in (
            ("offload_optimizer", _OFFLOAD_OPTIMIZER_KEYS, "offload_param"),
            ("offload_param", _OFFLOAD_PARAM_KEYS, "offload_optimizer"),
        ):
            cfg = getattr(self, section)
            for f in dataclasses.fields(OffloadConfig):
                if f.name not in allowed and getattr(cfg, f.name) != getattr(default, f.name):
                    raise ConfigError(f"only valid in {other}", key=f"{section}.{f.name}")
        if self.offload_param.buffer_count < 2:
            raise ConfigError(
                f"must be >= 2 for offload_param, got {self.offload_param.buffer_count}: one buffer holds the "
                "unit being gathered and the others read ahead; hf_zero refuses rather than raise it silently",
                key="offload_param.buffer_count",
            )
        if self.offload_param.enabled and self.stage != 3:
            raise ConfigError(
                f"offloading parameters (device {_show(self.offload_param.device)}) needs stage 3, "
                f"but stage is {self.stage}",
                key="offload_param.device",
            )
        if self.offload_optimizer.enabled and self.stage == 0:
            raise ConfigError(
                f"offloading the optimizer (device {_show(self.offload_optimizer.device)}) needs stage 1, 2 or 3, "
                "but stage is 0",
                key="offload_optimizer.device",
            )

    def _check_scale(self) -> None:
        """MiCS / ZeRO++ keys: values, and the combinations that are built (see docs/scale.md);
        sizes against the world are checked by the engine (hf_zero.engine.hierarchy)."""
        s = object.__setattr__
        s(self, "mics_shard_size", _int("mics_shard_size", self.mics_shard_size, minimum=-1))
        s(self, "zero_hpz_partition_size", _int("zero_hpz_partition_size", self.zero_hpz_partition_size, minimum=0))
        for name in ("mics_hierarchical_params_gather", "zero_quantized_weights", "zero_quantized_gradients"):
            s(self, name, _bool(name, getattr(self, name)))
        if self.zero_hpz_partition_size == 0:  # DeepSpeed's ge=0: 0 and 1 both mean off
            s(self, "zero_hpz_partition_size", 1)
        if self.mics_shard_size == 0:
            s(self, "mics_shard_size", -1)
        mics = self.mics_shard_size > 0
        zpp = [k for k, on in (("zero_hpz_partition_size", self.zero_hpz_partition_size > 1),
                               ("zero_quantized_weights", self.zero_quantized_weights),
                               ("zero_quantized_gradients", self.zero_quantized_gradients)) if on]
        if mics and self.stage == 0:
            raise ConfigError(f"{self.mics_shard_size} needs stage 1, 2 or 3 (stage 0 shards nothing); "
                              "set a stage or remove the key", key="mics_shard_size")
        if self.mics_hierarchical_params_gather:
            raise ConfigError("true is not supported here: MiCS's hierarchical all-gather is not built (hf_zero's "
                              "MiCS gathers inside the shard group in one ring; keep the shard group inside a node "
                              "so it never crosses nodes); set it to false", key="mics_hierarchical_params_gather")
        if zpp and self.stage != 3:
            raise ConfigError(f"ZeRO++ ({', '.join(zpp)}) needs stage 3, but stage is {self.stage}", key=zpp[0])
        if zpp and mics:
            raise ConfigError(f"MiCS (mics_shard_size={self.mics_shard_size}) cannot be combined with ZeRO++ "
                              f"({', '.join(zpp)}) here (DeepSpeed does not combine them either); use one",
                              key="mics_shard_size")

    @property
    def effective_overlap_comm(self) -> bool:
        """overlap_comm with DeepSpeed's default applied (True only at stage 3)."""
        return self.stage == 3 if self.overlap_comm is None else self.overlap_comm


@dataclass(frozen=True)
class FP16Config:
    """The "fp16" block (float16 compute with loss scaling)."""

    enabled: bool | str = False
    loss_scale: float = 0.0  # 0 = dynamic
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 1  # DeepSpeed's default is 2; see docs/config.md
    consecutive_hysteresis: bool = False
    min_loss_scale: float = 1.0
    auto_cast: bool = False  # accepted, no effect

    def __post_init__(self) -> None:
        s = object.__setattr__
        s(self, "enabled", _bool("enabled", self.enabled, auto=True))
        s(self, "loss_scale", _float("loss_scale", self.loss_scale, minimum=0.0))
        s(self, "initial_scale_power", _int("initial_scale_power", self.initial_scale_power, minimum=0, maximum=127))
        s(self, "loss_scale_window", _int("loss_scale_window", self.loss_scale_window, minimum=1))
        s(self, "hysteresis", _int("hysteresis", self.hysteresis, minimum=1))
        s(self, "consecutive_hysteresis", _bool("consecutive_hysteresis", self.consecutive_hysteresis))
        s(self, "min_loss_scale", _float("min_loss_scale", self.min_loss_scale, above=0.0))
        s(self, "auto_cast", _bool("auto_cast", self.auto_cast))

    @property
    def dynamic(self) -> bool:
        return self.loss_scale == 0.0

    @property
    def initial_scale(self) -> float:
        return self.loss_scale if self.loss_scale > 0 else float(2**self.initial_scale_power)


@dataclass(frozen=True)
class BF16Config:
    """The "bf16" block (alias "bfloat16")."""

    enabled: bool | str = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "enabled", _bool("enabled", self.enabled, auto=True))


@dataclass(frozen=True)
class HFZeroConfig:
    """The "hf_zero" block: hf_zero's own keys (no DeepSpeed equivalent); see docs/reliability.md.

    skip_non_finite_steps: skip an optimizer step whose gradients hold inf/NaN, in every
    precision (fp16 always does). max_consecutive_skipped_steps: stop with an error after this
    many skipped steps in a row (0 = never) in fp32, bf16 and static-scale fp16; dynamic fp16
    stops as DeepSpeed does, at an overflow with the scale already at min_loss_scale.
    check_unit_order: at stage 3, all ranks agree on the unit before every all-gather (a clear
    error for rank-dependent control flow instead of mismatched collectives; see docs/engine.md).
    save_on_signal: a checkpoint directory; when set, SIGTERM makes every rank finish the current
    optimizer step, save a checkpoint there (tag save_on_signal_tag, default global_step<N>) and
    exit 0 (see hf_zero.engine.preempt). Null (default): SIGTERM keeps its usual meaning.
    swap_checksums: NVMe offload keeps a checksum per swap write and verifies it on read (a swap
    file overwritten or truncated on disk fails naming the file, instead of NaN weights).
    ranks_per_node: the ranks of each node (consecutive ranks; null: the launcher's
    LOCAL_WORLD_SIZE); it decides which bytes count as cross-node and where ZeRO++ groups end.
    async_save: the default of ``save_checkpoint(async_save=...)``, and so of the Trainer's and
    Accelerate's checkpoint saves: return once the shards are in host memory, write the files in
    a background thread (see docs/checkpoints.md). async_save_keep_staging: keep the host memory
    of an asynchronous save's snapshot for the next one (one rank file of host RAM held between
    saves; the next snapshot then copies into memory already touched, hf_zero.checkpoint.staging);
    null (default): keep it when training on an accelerator, not when the model state itself
    lives in host RAM (CPU training, where it would double that state's footprint).
    """

    skip_non_finite_steps: bool = True
    max_consecutive_skipped_steps: int = 10
    check_unit_order: bool = True
    save_on_signal: str | None = None
    save_on_signal_tag: str | None = None
    swap_checksums: bool = True
    ranks_per_node: int | None = None
    async_save: bool = False
    async_save_keep_staging: bool | None = None

    def __post_init__(self) -> None:
        s = object.__setattr__
        s(self, "skip_non_finite_steps", _bool("skip_non_finite_steps", self.skip_non_finite_steps))
        s(self, "max_consecutive_skipped_steps",
          _int("max_consecutive_skipped_steps", self.max_consecutive_skipped_steps, minimum=0))
        s(self, "check_unit_order", _bool("check_unit_order", self.check_unit_order))
        s(self, "swap_checksums", _bool("swap_checksums", self.swap_checksums))
        s(self, "ranks_per_node", _int("ranks_per_node", self.ranks_per_node, minimum=1, optional=True))
        s(self, "async_save", _bool("async_save", self.async_save))
        if self.async_save_keep_staging is not None:
            s(self, "async_save_keep_staging", _bool("async_save_keep_staging", self.async_save_keep_staging))
        for key in ("save_on_signal", "save_on_signal_tag"):
            value = getattr(self, key)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
                s(self, key, value)
            if value is not None and (not isinstance(value, str) or not value):
                raise _fail(key, "a non-empty path string or null" if key == "save_on_signal"
                            else "a non-empty tag string or null", value)
        tag = self.save_on_signal_tag
        if tag is not None and (tag in (".", "..") or "/" in tag or os.sep in tag):
            raise _fail("save_on_signal_tag", "a tag name (no path separator)", tag)


@dataclass(frozen=True)
class OptimizerConfig:
    """The "optimizer" block: type is "Adam", "AdamW" or "SGD"."""

    type: str
    params: Mapping[str, Any] = field(default_factory=_ParamMap)

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", _canonical_type("optimizer", self.type, _OPTIMIZER_PARAMS))
        params = _check_params("optimizer", self.type, _OPTIMIZER_PARAMS[self.type], self.params,
                               _AUTO_OPTIMIZER_PARAMS)
        object.__setattr__(self, "params", params)


@dataclass(frozen=True)
class SchedulerConfig:
    """The "scheduler" block: type is "WarmupLR", "WarmupDecayLR" or "WarmupCosineLR"."""

    type: str
    params: Mapping[str, Any] = field(default_factory=_ParamMap)

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", _canonical_type("scheduler", self.type, _SCHEDULER_PARAMS))
        params = _check_params("scheduler", self.type, _SCHEDULER_PARAMS[self.type], self.params,
                               _AUTO_SCHEDULER_PARAMS)
        for name in _SCHEDULER_REQUIRED[self.type]:
            if name not in params:
                raise ConfigError(f"{self.type} needs this parameter (a number or \"auto\")",
                                  key=_join("params", name))
        object.__setattr__(self, "params", params)


_MISSING = object()


@dataclass(frozen=True)
class ZeroConfig:
    """A whole zero config.  Build it with ``ZeroConfig.load``."""

    train_batch_size: int | str | None = None
    train_micro_batch_size_per_gpu: int | str | None = None
    gradient_accumulation_steps: int | str | None = None
    gradient_clipping: float | str = 0.0
    fp16: FP16Config = field(default_factory=FP16Config)
    bf16: BF16Config = field(default_factory=BF16Config)
    hf_zero: HFZeroConfig = field(default_factory=HFZeroConfig)
    zero_optimization: ZeroOptimizationConfig = field(default_factory=ZeroOptimizationConfig)
    optimizer: OptimizerConfig | None = None
    scheduler: SchedulerConfig | None = None
    aio: AioConfig = field(default_factory=AioConfig)
    zero_allow_untested_optimizer: bool = False
    grad_accum_dtype: str | None = None
    communication_data_type: str | None = None
    prescale_gradients: bool = False
    gradient_predivide_factor: float = 1.0
    steps_per_print: int = 10
    wall_clock_breakdown: bool = False
    source: str = field(default="<dict>", compare=False)

    def __post_init__(self) -> None:
        try:
            self._validate()
        except ConfigError as e:
            raise e._from(self.source) from None

    def _validate(self) -> None:
        s = object.__setattr__
        for name in _BATCH_KEYS:
            s(self, name, _int(name, getattr(self, name), minimum=1, maximum=_BATCH_MAX, auto=True, optional=True))
        s(self, "gradient_clipping", _float("gradient_clipping", self.gradient_clipping, minimum=0.0, auto=True))
        for name, cls in (("fp16", FP16Config), ("bf16", BF16Config), ("zero_optimization", ZeroOptimizationConfig),
                          ("aio", AioConfig), ("hf_zero", HFZeroConfig)):
            if not isinstance(getattr(self, name), cls):
                raise _fail(name, f"a {cls.__name__}", getattr(self, name))
        for name, cls in (("optimizer", OptimizerConfig), ("scheduler", SchedulerConfig)):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), cls):
                raise _fail(name, f"a {cls.__name__} or null", getattr(self, name))
        for name in ("zero_allow_untested_optimizer", "prescale_gradients", "wall_clock_breakdown"):
            s(self, name, _bool(name, getattr(self, name)))
        s(self, "grad_accum_dtype", _choice("data_types.grad_accum_dtype", self.grad_accum_dtype, _DTYPES,
                                            optional=True))
        s(self, "communication_data_type", _choice("communication_data_type", self.communication_data_type,
                                                   _DTYPES, optional=True))
        s(self, "gradient_predivide_factor", _float("gradient_predivide_factor", self.gradient_predivide_factor,
                                                    above=0.0))
        s(self, "steps_per_print", _int("steps_per_print", self.steps_per_print, minimum=0))
        if not isinstance(self.source, str):
            raise _fail("source", "a string", self.source)
        if self.fp16.enabled is True and self.bf16.enabled is True:
            raise ConfigError("fp16.enabled and bf16.enabled are both true; enable at most one")

    # ------------------------------------------------------------------ load

    @classmethod
    def load(cls, config: str | os.PathLike | Mapping[str, Any] | ZeroConfig) -> ZeroConfig:
        """Build a config from a JSON file path, a mapping, or return a ZeroConfig as is."""
        if isinstance(config, ZeroConfig):
            return config
        if isinstance(config, (str, os.PathLike)):
            source = os.fspath(config)
            raw = _read_json(source)
        elif isinstance(config, Mapping):
            source, raw = "<dict>", config
        else:
            raise ConfigError(
                f"expected a JSON file path, a mapping or a ZeroConfig, got {type(config).__name__}"
            )
        try:
            return _parse(raw, source)
        except ConfigError as e:
            raise e._from(source) from None

    # ------------------------------------------------------------- queries

    @property
    def stage(self) -> int:
        return self.zero_optimization.stage

    @property
    def compute_dtype(self) -> torch.dtype:
        if _is_auto(self.fp16.enabled) or _is_auto(self.bf16.enabled):
            raise ConfigError('fp16.enabled or bf16.enabled is still "auto"; call resolve() first',
                              source=self.source)
        if self.fp16.enabled:
            return torch.float16
        if self.bf16.enabled:
            return torch.bfloat16
        return torch.float32

    def _get(self, key: str) -> Any:
        """Value at a dotted key, _MISSING if absent (e.g. no optimizer)."""
        node: Any = self
        for part in key.split("."):
            if node is None:
                return _MISSING
            if isinstance(node, Mapping):
                node = node.get(part, _MISSING)
            else:
                node = getattr(node, part, _MISSING)
            if node is _MISSING:
                return _MISSING
        return node

    def unresolved_keys(self) -> list[str]:
        """Dotted keys whose value is still "auto", in AUTO_KEYS order."""
        return [key for key in AUTO_KEYS if _is_auto(self._get(key))]

    # -------------------------------------------------------------- resolve

    def resolve(self, world_size: int, values: Mapping[str, Any] | None = None,
                explicit: Collection[str] = ()) -> ZeroConfig:
        """Return a new config with every "auto" filled and the batch sizes derived.

        ``values`` maps dotted keys (those of AUTO_KEYS, plus "hidden_size")
        to the caller's values; ``explicit`` names the keys the caller's user
        set explicitly.  See docs/config.md for the rules.
        """
        try:
            return self._resolve(world_size, dict(values or {}), frozenset(explicit))
        except ConfigError as e:
            raise e._from(self.source) from None

    def _resolve(self, world_size: int, values: dict[str, Any], explicit: frozenset[str]) -> ZeroConfig:
        _int("world_size", world_size, minimum=1)
        known = set(AUTO_KEYS) | {"hidden_size"}
        for key in values:
            if key not in known:
                raise _unknown_key(str(key), "", known, extra=" in resolve() values")
        hidden = values.get("hidden_size")
        if hidden is not None:
            hidden = _int("hidden_size", hidden, minimum=1)

        # 1. A concrete config value must agree with an explicit caller value.
        for key in sorted(explicit & values.keys()):
            if key == "hidden_size":
                continue
            current = self._get(key)
            if current is _MISSING or current is None or _is_auto(current):
                continue
            if not _same(current, values[key]):
                raise ConfigError(
                    "{key}=" + _show(current) + " contradicts the value " + _show(values[key])
                    + " given explicitly by the caller; make them agree or set the key to \"auto\"",
                    key=key, inline=True,
                )

        # 2. Batch sizes: fill, then derive with DeepSpeed's rules.
        batch: dict[str, Any] = {}
        for key in _BATCH_KEYS:
            current = getattr(self, key)
            if _is_auto(current):
                current = values.get(key)
            batch[key] = current
        # Absent keys: an explicit value always fills; another value only
        # while the config does not already determine the key.
        for only_explicit in (True, False):
            for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
                if batch[key] is not None or key not in values or getattr(self, key) is not None:
                    continue
                if only_explicit and key not in explicit:
                    continue
                if key in explicit or sum(v is not None for v in batch.values()) < 2:
                    batch[key] = values[key]
        for key in _BATCH_KEYS:
            batch[key] = _int(key, batch[key], minimum=1, maximum=_BATCH_MAX, optional=True)
        tbs, micro, gas = _derive_batch(
            batch["train_batch_size"], batch["train_micro_batch_size_per_gpu"],
            batch["gradient_accumulation_steps"], world_size,
        )

        # 3. Everything else that is "auto".
        def fill(key: str, fallback: Any = _MISSING) -> Any:
            current = self._get(key)
            if not _is_auto(current):
                return current
            if key in values:
                return values[key]
            if fallback is _MISSING:
                raise ConfigError(
                    '{key} is "auto" but no value was given for it; write a number in the config '
                    "or pass it through the Trainer's arguments",
                    key=key, inline=True,
                )
            return fallback

        defaults = ZeroOptimizationConfig()
        zero_values = {
            "reduce_bucket_size": fill(
                "zero_optimization.reduce_bucket_size",
                hidden * hidden if hidden else defaults.reduce_bucket_size),
            "stage3_prefetch_bucket_size": fill(
                "zero_optimization.stage3_prefetch_bucket_size",
                int(0.9 * hidden * hidden) if hidden else defaults.stage3_prefetch_bucket_size),
            "stage3_param_persistence_threshold": fill(
                "zero_optimization.stage3_param_persistence_threshold",
                10 * hidden if hidden else defaults.stage3_param_persistence_threshold),
        }
        with _within("zero_optimization"):
            zero = dataclasses.replace(self.zero_optimization, **zero_values)

        optimizer = self.optimizer
        if optimizer is not None:
            params = {name: fill(f"optimizer.params.{name}") for name in optimizer.params}
            with _within("optimizer"):
                optimizer = OptimizerConfig(type=optimizer.type, params=params)
        scheduler = self.scheduler
        if scheduler is not None:
            params = {name: fill(f"scheduler.params.{name}") for name in scheduler.params}
            with _within("scheduler"):
                scheduler = SchedulerConfig(type=scheduler.type, params=params)

        fp16_enabled = fill("fp16.enabled", False)
        bf16_enabled = fill("bf16.enabled", False)
        with _within("fp16"):
            fp16 = dataclasses.replace(self.fp16, enabled=fp16_enabled)
        with _within("bf16"):
            bf16 = dataclasses.replace(self.bf16, enabled=bf16_enabled)

        resolved = dataclasses.replace(
            self,
            train_batch_size=tbs,
            train_micro_batch_size_per_gpu=micro,
            gradient_accumulation_steps=gas,
            gradient_clipping=fill("gradient_clipping", 0.0),
            fp16=fp16,
            bf16=bf16,
            zero_optimization=zero,
            optimizer=optimizer,
            scheduler=scheduler,
        )
        assert not resolved.unresolved_keys(), resolved.unresolved_keys()
        return resolved

    # -------------------------------------------------------------- to_dict

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; ZeroConfig.load(c.to_dict()) == c."""
        out: dict[str, Any] = {}
        for key in _BATCH_KEYS:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["gradient_clipping"] = self.gradient_clipping
        out["fp16"] = dataclasses.asdict(self.fp16)
        out["bf16"] = dataclasses.asdict(self.bf16)
        zero = self.zero_optimization
        z: dict[str, Any] = {"stage": zero.stage}
        z["offload_optimizer"] = _offload_dict(zero.offload_optimizer, _OFFLOAD_OPTIMIZER_KEYS)
        z["offload_param"] = _offload_dict(zero.offload_param, _OFFLOAD_PARAM_KEYS)
        for f in dataclasses.fields(ZeroOptimizationConfig):
            if f.name in z:
                continue
            value = getattr(zero, f.name)
            if value is not None:
                z[f.name] = value
        out["zero_optimization"] = z
        for name in ("optimizer", "scheduler"):
            section = getattr(self, name)
            if section is not None:
                out[name] = {
                    "type": section.type,
                    "params": {k: list(v) if isinstance(v, tuple) else v for k, v in section.params.items()},
                }
        out["aio"] = dataclasses.asdict(self.aio)
        out["zero_allow_untested_optimizer"] = self.zero_allow_untested_optimizer
        if self.grad_accum_dtype is not None:
            out["data_types"] = {"grad_accum_dtype": self.grad_accum_dtype}
        if self.communication_data_type is not None:
            out["communication_data_type"] = self.communication_data_type
        out["prescale_gradients"] = self.prescale_gradients
        out["gradient_predivide_factor"] = self.gradient_predivide_factor
        out["steps_per_print"] = self.steps_per_print
        out["wall_clock_breakdown"] = self.wall_clock_breakdown
        out["hf_zero"] = dataclasses.asdict(self.hf_zero)
        return out


# --------------------------------------------------------------------------
# Helpers for load / resolve / to_dict
# --------------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _derive_batch(tbs: int | None, micro: int | None, gas: int | None, world: int) -> tuple[int, int, int]:
    """DeepSpeed's batch arithmetic: tbs == micro * gas * world."""

    def exact(num: int, den: int, what: str, den_text: str) -> int:
        if num % den:
            raise ConfigError(
                f"train_batch_size {num} is not divisible by {den_text} (= {den}); cannot derive {what}; "
                'fix one of them or set it to "auto"'
            )
        return num // den

    ws = f"world size {world}"
    if tbs is not None and micro is not None and gas is not None:
        pass
    elif tbs is not None and micro is not None:
        gas = exact(tbs, micro * world, "gradient_accumulation_steps",
                    f"train_micro_batch_size_per_gpu {micro} × {ws}")
    elif tbs is not None and gas is not None:
        micro = exact(tbs, gas * world, "train_micro_batch_size_per_gpu",
                      f"gradient_accumulation_steps {gas} × {ws}")
    elif micro is not None and gas is not None:
        tbs = micro * gas * world
    elif tbs is not None:
        gas = 1
        micro = exact(tbs, world, "train_micro_batch_size_per_gpu", ws)
    elif micro is not None:
        gas = 1
        tbs = micro * world
    elif gas is not None:
        micro = 1
        tbs = gas * world
    else:
        micro, gas, tbs = 1, 1, world
    if tbs != micro * gas * world:
        raise ConfigError(
            f"train_batch_size {tbs} != train_micro_batch_size_per_gpu {micro} × gradient_accumulation_steps "
            f"{gas} × {ws} (= {micro * gas * world}); fix one of them or set it to \"auto\""
        )
    return tbs, micro, gas


def _offload_dict(cfg: OffloadConfig, keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in keys if getattr(cfg, k) is not None}


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as e:
        raise ConfigError(f"cannot read the file: {e.strerror or e}", source=path) from None

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ConfigError(f"duplicate key '{key}' in a JSON object", source=path)
            out[key] = value
        return out

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise ConfigError(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}", source=path) from None


_TOP_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "fp16", "bf16", "bfloat16", "zero_optimization", "optimizer", "scheduler", "aio",
    "zero_allow_untested_optimizer", "data_types", "communication_data_type", "prescale_gradients",
    "gradient_predivide_factor", "steps_per_print", "wall_clock_breakdown", "hf_zero",
)
_FP16_KEYS = tuple(f.name for f in dataclasses.fields(FP16Config))
_AIO_KEYS = tuple(f.name for f in dataclasses.fields(AioConfig))
_HF_ZERO_KEYS = tuple(f.name for f in dataclasses.fields(HFZeroConfig))
_ZERO_KEYS = tuple(f.name for f in dataclasses.fields(ZeroOptimizationConfig)) + (
    "cpu_offload", "stage3_gather_fp16_weights_on_model_save",
)


def _build(cls: type, raw: dict[str, Any], section: str) -> Any:
    with _within(section):
        return cls(**raw)


def _parse(raw: Any, source: str) -> ZeroConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"the top level must be a JSON object, got {_show(raw)}")
    top = _section(raw, "", _TOP_KEYS)
    if "bf16" in top and "bfloat16" in top:
        raise ConfigError('give either "bf16" or its alias "bfloat16", not both', key="bfloat16")
    kwargs: dict[str, Any] = {"source": source}
    for key in _BATCH_KEYS + (
        "gradient_clipping", "zero_allow_untested_optimizer", "communication_data_type", "prescale_gradients",
        "gradient_predivide_factor", "steps_per_print", "wall_clock_breakdown",
    ):
        if key in top:
            kwargs[key] = top[key]
    if "fp16" in top:
        kwargs["fp16"] = _build(FP16Config, _section(top["fp16"], "fp16", _FP16_KEYS), "fp16")
    for name in ("bf16", "bfloat16"):
        if name in top:
            # compat keys are listed under "bf16"; check the alias the same way
            body = top[name]
            if not isinstance(body, Mapping):
                raise _fail(name, "a JSON object", body)
            try:
                fields = _section(body, "bf16", ("enabled",))
            except ConfigError as e:
                if name == "bfloat16" and e.key and e.key.startswith("bf16"):
                    raise ConfigError(e.detail, key="bfloat16" + e.key[4:], inline=e._inline) from None
                raise
            kwargs["bf16"] = _build(BF16Config, fields, name)
    if "hf_zero" in top:
        kwargs["hf_zero"] = _build(HFZeroConfig, _section(top["hf_zero"], "hf_zero", _HF_ZERO_KEYS), "hf_zero")
    if "aio" in top:
        kwargs["aio"] = _build(AioConfig, _section(top["aio"], "aio", _AIO_KEYS), "aio")
    if "zero_optimization" in top:
        kwargs["zero_optimization"] = _parse_zero(top["zero_optimization"])
    for name, cls in (("optimizer", OptimizerConfig), ("scheduler", SchedulerConfig)):
        if top.get(name) is not None:
            body = _section(top[name], name, ("type", "params"))
            if "type" not in body:
                raise ConfigError(f"missing; {name} needs a type", key=f"{name}.type")
            kwargs[name] = _build(cls, body, name)
    if "data_types" in top:
        body = _section(top["data_types"], "data_types", ("grad_accum_dtype",))
        kwargs["grad_accum_dtype"] = body.get("grad_accum_dtype")
    return ZeroConfig(**kwargs)


def _parse_zero(raw: Any) -> ZeroOptimizationConfig:
    section = "zero_optimization"
    body = _section(raw, section, _ZERO_KEYS)
    for name, keys, other_keys in (
        ("offload_optimizer", _OFFLOAD_OPTIMIZER_KEYS, _OFFLOAD_PARAM_KEYS),
        ("offload_param", _OFFLOAD_PARAM_KEYS, _OFFLOAD_OPTIMIZER_KEYS),
    ):
        path = f"{section}.{name}"
        if name not in body:
            continue
        if body[name] is None:
            body[name] = OffloadConfig()
            continue
        if isinstance(body[name], Mapping):
            other = "offload_param" if name == "offload_optimizer" else "offload_optimizer"
            for key in body[name]:
                if key in other_keys and key not in keys:
                    raise ConfigError(f"only valid in {section}.{other}", key=f"{path}.{key}")
        body[name] = _build(OffloadConfig, _section(body[name], path, keys), path)

    if "cpu_offload" in body:
        cpu_offload = _bool(f"{section}.cpu_offload", body.pop("cpu_offload"))
        if cpu_offload:
            current = body.get("offload_optimizer", OffloadConfig())
            if current.device not in ("none", "cpu"):
                raise ConfigError(
                    f'cpu_offload=true contradicts offload_optimizer.device {_show(current.device)}; '
                    "drop the old cpu_offload key",
                    key=f"{section}.cpu_offload",
                )
            body["offload_optimizer"] = dataclasses.replace(current, device="cpu")
    old = "stage3_gather_fp16_weights_on_model_save"
    new = "stage3_gather_16bit_weights_on_model_save"
    if old in body:
        value = _bool(f"{section}.{old}", body.pop(old))
        if new in body and body[new] != value:
            raise ConfigError(f"contradicts {new} (its new name); keep only {new}", key=f"{section}.{old}")
        body[new] = value
    return _build(ZeroOptimizationConfig, body, section)
