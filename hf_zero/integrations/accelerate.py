"""Accelerate integration: ``ZeroPlugin`` and ``ZeroAccelerator``.

Note:
    * Accelerate's distributed type stays MULTI_CPU / MULTI_GPU (or NO for one process), so
      ``gather``, ``wait_for_everyone``, dataloader sharding and trackers behave as usual. Only
      the DDP wrapping is replaced: a prepared model is the user's own ``nn.Module``, sharded in
      place by a :class:`~hf_zero.engine.engine.ZeroEngine` (``accelerator.zero_engine``).
    * The engine needs the model and its optimizer together. ``prepare(model, optimizer, ...)``
      builds it at the end of the call; a model prepared alone waits until its optimizer is
      prepared (or is built at once when the config has an ``optimizer`` section).
    * Loss scaling is Accelerate's: ``backward`` divides the loss by the Accelerator's
      ``gradient_accumulation_steps`` and the engine is told not to divide again
      (``scale_wrt_gas=False``). The fp16 loss scale is the engine's.
    * The prepared optimizer's ``step()`` applies the engine's update only when
      ``accelerator.sync_gradients`` is true, exactly where Accelerate would step. ``zero_grad()``
      likewise only acts then. The torch optimizer object is kept (re-pointed at fp32 master
      shards), so schedulers built on it keep working.
    * ``clip_grad_norm_`` cannot return the norm at call time without an extra reduction: it
      records ``max_norm`` for the coming update and returns a 0-d tensor that the update fills
      with the global gradient norm before clipping (NaN until then).
    * ``ZeroPlugin(timeout=)`` becomes the process group's timeout (Accelerate's
      ``InitProcessGroupKwargs``) when the ``ZeroAccelerator`` creates the group, and is set on a
      group that already exists (torch's ``_set_pg_timeout``; an error if that cannot be done).
      Every engine collective then ends a frozen peer with a ``CollectiveTimeout`` naming this
      rank and the operation. The Trainer passes ``TrainingArguments.ddp_timeout`` this way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
from datetime import timedelta
from typing import Any, Dict, List, Optional, Set

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType

from ..config import ConfigError, ZeroConfig
from ..engine.collectives import Collectives
from ..engine.engine import ZeroEngine
from .launch_check import check_world_size

ENV_CONFIG = "HF_ZERO_CONFIG"


class ZeroPlugin:
    """The ZeRO config for a :class:`ZeroAccelerator`.

    ``config``: a path to a DeepSpeed-format JSON file, a JSON string, a dict or a
    :class:`~hf_zero.ZeroConfig`; ``None`` reads the path from the ``HF_ZERO_CONFIG``
    environment variable. The config is parsed here, so a malformed one fails at once.

    ``values`` / ``explicit`` (set by integrations such as the Trainer) override what the
    Accelerator would derive for "auto" keys; ``origins`` names where each value came from, for
    error messages.

    ``timeout`` (seconds or a ``timedelta``): the process group's timeout for every collective,
    so a frozen peer ends the job with an error instead of torch's default 30-minute wait (see
    the module note).
    """

    def __init__(self, config: Any = None, *, timeout: Any = None):
        self.timeout: Optional[timedelta] = _as_timeout(timeout)
        if config is None:
            config = os.environ.get(ENV_CONFIG) or None
            if config is None:
                raise ValueError(
                    f"ZeroPlugin needs a config: pass ZeroPlugin(config=<path or dict>) or set the environment "
                    f"variable {ENV_CONFIG} to the path of a ZeRO (DeepSpeed-format) JSON config"
                )
        if isinstance(config, str) and config.lstrip().startswith("{"):
            config = json.loads(config)
        parsed = ZeroConfig.load(config)  # validates (and reads a path) first
        if isinstance(config, (str, os.PathLike)):
            with open(config, encoding="utf-8") as fh:
                config = json.load(fh)
        if isinstance(config, dict):
            # A key the user did not write takes the caller's value ("auto"), instead of a
            # default that would then "contradict" the Accelerator / TrainingArguments.
            parsed = dataclasses.replace(ZeroConfig.load(_absent_as_auto(config)), source=parsed.source)
        self.config: ZeroConfig = parsed
        self.values: Dict[str, Any] = {}
        self.explicit: Set[str] = set()
        self.origins: Dict[str, str] = {}

    @property
    def stage(self) -> int:
        return self.config.stage

    def __repr__(self) -> str:
        extra = f", timeout={self.timeout.total_seconds():g}s" if self.timeout is not None else ""
        return f"ZeroPlugin(stage={self.stage}, source={self.config.source!r}{extra})"


def _as_timeout(value: Any) -> Optional[timedelta]:
    if value is None or isinstance(value, timedelta):
        seconds = None if value is None else value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ValueError(f"ZeroPlugin(timeout={value!r}): expected seconds (a number) or a datetime.timedelta")
    if seconds is None:
        return None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"ZeroPlugin(timeout={value!r}): the timeout must be a positive, finite number of seconds")
    return timedelta(seconds=seconds)


def _existing_group_timeout() -> Optional[timedelta]:
    """The timeout of the default process group if one exists (None if none, or unknown)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    for device in (torch.device("cpu"), torch.device("cuda")):
        try:
            return dist.group.WORLD._get_backend(device).options._timeout
        except Exception:  # noqa: BLE001 - no backend for that device, or a torch without the field
            continue
    return None


def _with_timeout(plugin: "ZeroPlugin", kwargs: dict) -> dict:
    """``kwargs`` for ``Accelerator.__init__`` with the plugin's timeout in its
    ``InitProcessGroupKwargs`` (checked against one the caller passed, and an existing group)."""
    if plugin.timeout is None:
        return kwargs
    from accelerate.utils import InitProcessGroupKwargs

    seconds = plugin.timeout.total_seconds()
    handlers = list(kwargs.get("kwargs_handlers") or [])
    given = [h for h in handlers if isinstance(h, InitProcessGroupKwargs)]
    if given and given[0].timeout is not None and given[0].timeout != plugin.timeout:
        raise ValueError(
            f"ZeroPlugin(timeout={seconds:g}) and kwargs_handlers=[InitProcessGroupKwargs(timeout="
            f"{given[0].timeout.total_seconds():g} s)] disagree: give the timeout once")
    if given:
        given[0].timeout = plugin.timeout
    else:
        handlers.append(InitProcessGroupKwargs(timeout=plugin.timeout))
    return {**kwargs, "kwargs_handlers": handlers}


def _apply_timeout_to_group(timeout: Optional[timedelta]) -> None:
    """A group created before (by transformers' ``TrainingArguments`` on CPU, which does not pass
    ``ddp_timeout`` on that path, or by the user) gets ``timeout`` now: torch's
    ``_set_pg_timeout`` sets each backend's default, which every later collective uses (checked by
    reading it back; tests/test_faults.py::test_frozen_peer_ends_within_the_integrations_timeout)."""
    existing = _existing_group_timeout()
    if timeout is None or existing is None or existing == timeout:
        return
    import torch.distributed.distributed_c10d as c10d

    try:
        c10d._set_pg_timeout(timeout, None)
        now = _existing_group_timeout()
    except Exception as exc:  # noqa: BLE001 - a torch without that private function
        now, why = None, f" ({type(exc).__name__}: {exc})"
    else:
        why = ""
    if now != timeout:
        raise ValueError(
            f"ZeroPlugin(timeout={timeout.total_seconds():g}): the process group already exists with a timeout of "
            f"{existing.total_seconds():g} s and this torch cannot change it{why}. Set it where the group is "
            "created (PartialState(timeout=...), hf_zero.initialize(timeout=...)) or build the ZeroAccelerator first")


class ZeroOptimizer(AcceleratedOptimizer):
    """What ``ZeroAccelerator.prepare`` returns for an optimizer: Accelerate's optimizer wrapper
    whose ``step`` is the engine's update (at accumulation boundaries only)."""

    def __init__(self, optimizer: torch.optim.Optimizer, accelerator: "ZeroAccelerator"):
        super().__init__(optimizer, device_placement=False, scaler=None)
        self._zero_accelerator = accelerator
        self.engine: Optional[ZeroEngine] = None

    def step(self, closure=None):
        if closure is not None:
            raise NotImplementedError("optimizer.step(closure) is not supported under ZeRO")
        if not self.gradient_state.sync_gradients:
            return
        if self.engine is None:
            raise RuntimeError(
                "this optimizer's model has not been prepared: call accelerator.prepare(model, optimizer, ...) "
                "before stepping"
            )
        self._is_overflow = self._zero_accelerator._zero_update()

    def zero_grad(self, set_to_none=None):
        if self.gradient_state.sync_gradients and self.engine is not None:
            self.engine.zero_grad()

    def __getstate__(self):
        raise TypeError("a ZeRO-prepared optimizer cannot be pickled; save it with the engine's checkpoint API")


class ZeroAccelerator(Accelerator):
    """``accelerate.Accelerator`` with ZeRO data parallelism (stages 0-3) instead of DDP.

    ``ZeroAccelerator(zero_plugin=ZeroPlugin("zero.json"), **accelerator_kwargs)``; without
    ``zero_plugin`` the config path comes from ``HF_ZERO_CONFIG``. Keyword arguments only.
    """

    def __init__(self, *, zero_plugin: Optional[ZeroPlugin] = None, **kwargs):
        for forbidden in ("deepspeed_plugin", "deepspeed_plugins", "fsdp_plugin", "megatron_lm_plugin"):
            if kwargs.get(forbidden) is not None:
                raise ValueError(f"ZeroAccelerator replaces data-parallel wrapping; do not pass {forbidden}")
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" or \
                os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            raise ValueError("ZeroAccelerator cannot run under an accelerate config that enables DeepSpeed or FSDP")
        self.zero_plugin = zero_plugin if zero_plugin is not None else ZeroPlugin()
        self._zero_explicit_mp = kwargs.get("mixed_precision") is not None
        self._zero_explicit_gas = (
            "gradient_accumulation_steps" in kwargs or kwargs.get("gradient_accumulation_plugin") is not None
        )
        super().__init__(**_with_timeout(self.zero_plugin, kwargs))
        _apply_timeout_to_group(self.zero_plugin.timeout)
        check_world_size(self.num_processes)
        if self.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
            raise ValueError(f"ZeroAccelerator supports CPU and CUDA processes, not {self.distributed_type}")
        self.zero_engine: Optional[ZeroEngine] = None
        self.zero_config: Optional[ZeroConfig] = None
        self._zero_pending_model: Optional[torch.nn.Module] = None
        self._zero_micro_batch: Optional[int] = None
        self._zero_clip: Optional[float] = None
        self._zero_norms: List[torch.Tensor] = []
        if self.is_main_process:
            print(active_line(self.zero_plugin.config, self.num_processes), file=sys.stderr, flush=True)

    # ------------------------------------------------------------------------------ config
    def resolve_zero_config(self, model: Optional[torch.nn.Module] = None) -> ZeroConfig:
        """Fill the config's "auto" keys from this Accelerator (and the plugin's values) and check
        that no concrete config value contradicts an explicit argument."""
        plugin = self.zero_plugin
        values, explicit, origins = dict(plugin.values), set(plugin.explicit), dict(plugin.origins)

        def offer(key, value, is_explicit, origin):
            if key in values or value is None:
                return
            values[key] = value
            origins[key] = origin
            if is_explicit:
                explicit.add(key)

        gas = self.gradient_accumulation_steps
        offer("gradient_accumulation_steps", gas, self._zero_explicit_gas,
              f"Accelerator(gradient_accumulation_steps={gas})")
        offer("train_micro_batch_size_per_gpu", self._zero_micro_batch, True,
              f"the prepared (smallest) DataLoader batch_size={self._zero_micro_batch}")
        mp = str(self.mixed_precision)
        mp_explicit = self._zero_explicit_mp or mp != "no"
        if "fp16.enabled" not in values and "bf16.enabled" not in values:
            offer("fp16.enabled", mp == "fp16", mp_explicit, f"Accelerator(mixed_precision={mp!r})")
            offer("bf16.enabled", mp == "bf16", mp_explicit, f"Accelerator(mixed_precision={mp!r})")
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if isinstance(hidden, int) and "hidden_size" not in values:
            values["hidden_size"] = hidden
        return resolve_with_origins(plugin.config, self.num_processes, values, explicit, origins)

    # ------------------------------------------------------------------------------ prepare
    def prepare(self, *args, device_placement=None):
        # The micro-batch is the smallest batch size among the DataLoaders of this call (the train
        # loader, when an eval loader of a larger batch is prepared with it), as accelerate's
        # DeepSpeed path does; never simply the last loader's.
        sizes = [int(obj.batch_size) for obj in args
                 if isinstance(obj, torch.utils.data.DataLoader) and obj.batch_size is not None]
        if sizes and self.zero_engine is None:
            self._zero_micro_batch = min(sizes)
        result = super().prepare(*args, device_placement=device_placement)
        self._zero_build_if_ready()
        return result

    def prepare_model(self, model: torch.nn.Module, device_placement: Optional[bool] = None,
                      evaluation_mode: bool = False):
        if evaluation_mode or getattr(model, "_is_accelerate_prepared", False):
            return super().prepare_model(model, device_placement=device_placement, evaluation_mode=True)
        if self.zero_engine is not None or (
            self._zero_pending_model is not None and self._zero_pending_model is not model
        ):
            raise ValueError("ZeroAccelerator trains one model per Accelerator; call free_memory() before another")
        # The engine casts parameters to the config's compute dtype and keeps fp32 masters, so
        # Accelerate's autocast forward wrapper is not applied.
        native_amp, self.native_amp = self.native_amp, False
        if any(p.is_meta for p in model.parameters()):
            device_placement = False  # weights arrive from rank 0 when the engine is built
        try:
            model = super().prepare_model(model, device_placement=device_placement, evaluation_mode=True)
        finally:
            self.native_amp = native_amp
        self._zero_pending_model = model
        return model

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer, device_placement=None):
        if getattr(optimizer, "_is_accelerate_prepared", False):
            if optimizer not in self._optimizers:
                self._optimizers.append(optimizer)
            return optimizer
        wrapped = ZeroOptimizer(optimizer, self)
        self._optimizers.append(wrapped)
        return wrapped

    def _zero_build_if_ready(self) -> None:
        model = self._zero_pending_model
        if model is None or self.zero_engine is not None:
            return
        trainable = {id(p) for p in model.parameters()}
        mine = [
            o for o in self._optimizers
            if isinstance(o, ZeroOptimizer) and o.engine is None
            and all(id(p) in trainable for g in o.optimizer.param_groups for p in g["params"])
        ]
        if len(mine) > 1:
            raise ValueError("ZeroAccelerator supports one optimizer per model")
        if not mine and self.zero_plugin.config.optimizer is None:
            return  # wait for the optimizer (or the model is only evaluated)
        self._zero_build(model, mine[0] if mine else None)

    def _zero_build(self, model: torch.nn.Module, wrapped: Optional[ZeroOptimizer]) -> None:
        cfg = self.resolve_zero_config(model)
        engine = ZeroEngine(
            model, cfg, comm=Collectives(), device=self.device,
            optimizer=wrapped.optimizer if wrapped is not None else None,
        )
        if wrapped is None:  # the config's optimizer section built it
            wrapped = ZeroOptimizer(engine.optimizer, self)
            wrapped._is_accelerate_prepared = True
            self._optimizers.append(wrapped)
        wrapped.engine = engine
        self.zero_engine, self.zero_config = engine, cfg
        self._zero_pending_model = None
        if engine.stage == 3 and engine.world_size > 1 and hasattr(model, "generate"):
            model.generate = _synced_generate(model.generate)

    @property
    def zero_optimizer(self) -> Optional[ZeroOptimizer]:
        """The prepared optimizer the engine steps (useful when the config built it)."""
        for o in self._optimizers:
            if isinstance(o, ZeroOptimizer) and o.engine is self.zero_engine and o.engine is not None:
                return o
        return None

    # ------------------------------------------------------------------------------ training
    def backward(self, loss: torch.Tensor, **kwargs):
        engine = self.zero_engine
        if engine is None:
            if self._zero_pending_model is not None:
                raise RuntimeError("backward() before the model's optimizer was prepared: the ZeRO engine is not "
                                   "built yet; prepare the model and its optimizer first")
            return super().backward(loss, **kwargs)
        kwargs.pop("learning_rate", None)
        kwargs.pop("scale_wrt_gas", None)
        retain_graph = bool(kwargs.pop("retain_graph", False))
        if kwargs:
            raise TypeError(f"unsupported backward() arguments under ZeRO: {sorted(kwargs)}")
        engine.backward(loss / self.gradient_accumulation_steps, retain_graph=retain_graph, scale_wrt_gas=False)
        engine.micro_steps += 1

    @contextlib.contextmanager
    def no_sync(self, model):
        # Stages 0/1 reduce at the update only; stages 2/3 reduce every micro-step (as DeepSpeed),
        # so there is nothing to switch off.
        yield

    def unscale_gradients(self, optimizer=None):
        if self.zero_engine is None:
            return super().unscale_gradients(optimizer)
        # the engine unscales (fp16) on its fp32 master gradients during the update

    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        """Clip at the coming update to ``max_norm``; returns a 0-d tensor that the update fills
        with the global gradient norm before clipping (NaN until ``optimizer.step()`` runs)."""
        engine = self.zero_engine
        if engine is None:
            return super().clip_grad_norm_(parameters, max_norm, norm_type)
        if float(norm_type) != 2.0:
            raise NotImplementedError("ZeRO clips by the global L2 norm only (norm_type=2)")
        m = float(max_norm)
        self._zero_clip = m if (math.isfinite(m) and m > 0) else 0.0
        norm = torch.full((), float("nan"), dtype=torch.float32)
        self._zero_norms.append(norm)
        return norm

    def clip_grad_value_(self, parameters, clip_value):
        if self.zero_engine is not None:
            raise NotImplementedError("clip_grad_value_ is not supported under ZeRO (gradients are sharded)")
        return super().clip_grad_value_(parameters, clip_value)

    def _zero_update(self) -> bool:
        """Apply the engine's update now; return True when the step was skipped (fp16 overflow)."""
        engine = self.zero_engine
        default = float(self.zero_config.gradient_clipping or 0.0)
        engine.gradient_clipping = default if self._zero_clip is None else self._zero_clip
        skipped_before = engine.skipped_steps
        try:
            engine.apply_update()
        finally:
            engine.gradient_clipping = default
            self._zero_clip = None
        norm = engine.get_global_grad_norm()
        for t in self._zero_norms:
            t.fill_(float("nan") if norm is None else norm)
        self._zero_norms = []
        return engine.skipped_steps > skipped_before

    # ------------------------------------------------------------------------------ weights
    def _is_engine_model(self, model) -> bool:
        engine = self.zero_engine
        return engine is not None and (model is engine.module or self.unwrap_model(model) is engine.module)

    def get_state_dict(self, model, unwrap: bool = True):
        """Collective under ZeRO (every rank must call it): the full fp32 state dict on every rank."""
        if self._is_engine_model(model):
            return self.zero_engine.full_state_dict()
        return super().get_state_dict(model, unwrap=unwrap)

    def save_model(self, model, save_directory, max_shard_size="10GB", safe_serialization: bool = True):
        """Collective under ZeRO. A PEFT model is saved by PEFT's ``save_pretrained`` from the
        gathered weights (adapter format); any other model by the engine's bounded-memory export
        (Hugging Face safetensors, one unit gathered at a time)."""
        if not self._is_engine_model(model):
            return super().save_model(model, save_directory, max_shard_size, safe_serialization)
        engine = self.zero_engine
        unwrapped = self.unwrap_model(model)
        if not _is_peft_model(unwrapped):
            engine.save_pretrained(save_directory, max_shard_size=max_shard_size)
            self.wait_for_everyone()
            return
        state_dict = engine.full_state_dict()
        if self.is_main_process:
            os.makedirs(save_directory, exist_ok=True)
            unwrapped.save_pretrained(save_directory, state_dict=state_dict, max_shard_size=max_shard_size)
        self.wait_for_everyone()

    def save_state(self, output_dir: Optional[str] = None, safe_serialization: bool = True,
                   async_save: Optional[bool] = None, **kwargs):
        """Under ZeRO: the engine's sharded checkpoint (see docs/checkpoints.md) in ``output_dir``,
        with the schedulers and Accelerate's step counter as its client state. ``async_save``
        (default: the config's ``hf_zero.async_save``): return once the shards are in host
        memory, the files being written in the background (``zero_engine.wait_for_checkpoint()``
        waits; the next ``save_state`` / ``load_state`` waits first)."""
        if self.zero_engine is not None:
            return self._zero_save_state(output_dir, async_save)
        if async_save:
            raise ValueError("save_state(async_save=True) needs the hf_zero engine (accelerator.prepare the "
                             "model under a ZeroPlugin first); stock Accelerate saves synchronously")
        return super().save_state(output_dir, safe_serialization=safe_serialization, **kwargs)

    def load_state(self, input_dir: Optional[str] = None, **kwargs):
        if self.zero_engine is not None:
            return self._zero_load_state(input_dir)
        return super().load_state(input_dir, **kwargs)

    def _zero_save_state(self, output_dir: Optional[str], async_save: Optional[bool] = None):
        if output_dir is None:
            raise ValueError("save_state under ZeRO needs an output_dir")
        client = {"accelerate_step": self.step,
                  "schedulers": [s.state_dict() for s in self._schedulers]}
        self.zero_engine.save_checkpoint(output_dir, client_state=client, async_save=async_save)
        self.wait_for_everyone()
        return output_dir

    def _zero_load_state(self, input_dir: Optional[str]):
        if input_dir is None:
            raise ValueError("load_state under ZeRO needs an input_dir")
        _, client = self.zero_engine.load_checkpoint(input_dir)
        client = client or {}
        for s, sd in zip(self._schedulers, client.get("schedulers", [])):
            s.load_state_dict(sd)
        self.step = int(client.get("accelerate_step", self.step))

    def free_memory(self, *objects):
        if self.zero_engine is not None:
            self.zero_engine.destroy()
        self.zero_engine = self.zero_config = self._zero_pending_model = None
        self._zero_norms, self._zero_clip = [], None
        return super().free_memory(*objects)

    def clear(self, *objects):
        return self.free_memory(*objects)


def active_line(config: ZeroConfig, world_size: int) -> str:
    """The one start-up line rank 0 prints when hf_zero takes over a run."""
    z = config.zero_optimization
    return (f"hf_zero active: ZeRO stage {z.stage}, offload optimizer={z.offload_optimizer.device} "
            f"param={z.offload_param.device}, world size {world_size}, config {config.source}")


#: Keys that, when absent from the user's config, are filled from the caller as if "auto".
ABSENT_AS_AUTO = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
                  "fp16.enabled", "bf16.enabled")


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _absent_as_auto(raw: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for key in ABSENT_AS_AUTO:
        if "." not in key:
            out.setdefault(key, "auto")
            continue
        section, name = key.split(".")
        if section == "bf16" and "bfloat16" in out:
            section = "bfloat16"
        body = out.setdefault(section, {})
        if isinstance(body, dict):
            body.setdefault(name, "auto")
    return out


def _synced_generate(generate):
    """Stage 3 with several ranks: every forward gathers shards from all ranks, so all ranks must
    run the same number of decoding steps; ``synced_gpus=True`` keeps finished ranks stepping."""
    if getattr(generate, "_hf_zero_synced", False):
        return generate

    @functools.wraps(generate)
    def wrapper(*args, **kwargs):
        kwargs["synced_gpus"] = True
        return generate(*args, **kwargs)

    wrapper._hf_zero_synced = True
    return wrapper


def resolve_with_origins(config: ZeroConfig, world_size: int, values: Dict[str, Any], explicit: Set[str],
                         origins: Dict[str, str]) -> ZeroConfig:
    """``config.resolve`` whose errors also say where the caller's value came from."""
    try:
        return config.resolve(world_size=world_size, values=values, explicit=explicit)
    except ConfigError as e:
        where = origins.get(e.key) if e.key else None
        if where is None and e.key is None and "train_batch_size" in str(e):
            where = "; ".join(origins[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
                              if k in origins)
        if where:
            raise ConfigError(f"{e} (the caller's value comes from {where})") from None
        raise
