"""Transformers Trainer integration: ``ZeroTrainingArguments``, ``ZeroTrainerMixin``,
``ZeroTrainer`` and ``ZeroCallback``.

Note:
    * The Trainer keeps its whole loop; the mixin only swaps its Accelerator for a
      :class:`~hf_zero.integrations.accelerate.ZeroAccelerator` built from the Trainer's own
      accelerator arguments. Everything the loop does through the Accelerator (prepare, backward,
      no_sync, clip_grad_norm_, optimizer.step, gather) then reaches the engine.
    * The Trainer scales the loss for accumulation itself and gives Accelerate
      ``gradient_accumulation_steps=1``; the engine is told not to scale again. The config's batch
      keys are filled from the TrainingArguments, never from that 1.
    * The config is resolved when the Trainer is built, so a value that contradicts an argument
      fails before any training, naming both. Scheduler "auto" steps need the number of training
      steps, known only in ``train()``: they are resolved again in ``create_scheduler``.
    * A config ``optimizer`` / ``scheduler`` section replaces the Trainer's own optimizer /
      scheduler (as with DeepSpeed); the engine is then given them as client objects.
    * ``save_model`` is collective (all ranks call it in the Trainer): it gathers the full fp32
      weights and writes them in ``save_pretrained`` format from the main process.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..config import ZeroConfig
from .accelerate import ZeroAccelerator, ZeroPlugin, resolve_with_origins

logger = logging.getLogger(__name__)


@dataclass
class ZeroTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus ``zero_config``: a path to a DeepSpeed-format JSON config, a dict,
    or (on the command line) a JSON string. ``None`` reads the path from ``HF_ZERO_CONFIG``."""

    zero_config: Optional[Union[dict, str]] = field(
        default=None,
        metadata={"help": "ZeRO config for hf_zero: a path to a DeepSpeed-format JSON file or a JSON string/dict. "
                          "Defaults to the HF_ZERO_CONFIG environment variable."},
    )

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["zero_config"]

    def __post_init__(self):
        adopt_deepspeed_argument(self)
        super().__post_init__()


def adopt_deepspeed_argument(args) -> None:
    """Move a ``deepspeed`` argument (path, JSON string or dict: the DeepSpeed-format config hf_zero
    reads) into ``args.zero_config`` and clear ``args.deepspeed``, before Transformers would import
    the deepspeed package for it. Both set to different values is an error naming both."""
    ds = getattr(args, "deepspeed", None)
    if not ds:
        return
    current = getattr(args, "zero_config", None)
    if current is not None and current != ds:
        raise ValueError(
            f"both zero_config={current!r} and deepspeed={ds!r} are given: hf_zero reads one ZeRO config; "
            "keep one of them"
        )
    args.zero_config = ds
    args.deepspeed = None


def trainer_values(args: TrainingArguments, world_size: int, num_training_steps: Optional[int] = None):
    """``(values, explicit, origins)`` for ``ZeroConfig.resolve`` from the TrainingArguments."""
    values: Dict[str, Any] = {}
    origins: Dict[str, str] = {}

    def put(key, value, origin):
        values[key] = value
        origins[key] = f"TrainingArguments.{origin}"

    micro, gas = args.per_device_train_batch_size, args.gradient_accumulation_steps
    put("train_micro_batch_size_per_gpu", micro, f"per_device_train_batch_size={micro}")
    put("gradient_accumulation_steps", gas, f"gradient_accumulation_steps={gas}")
    put("train_batch_size", micro * gas * world_size,
        f"per_device_train_batch_size={micro} × gradient_accumulation_steps={gas} × world size {world_size}")
    put("gradient_clipping", float(args.max_grad_norm or 0.0), f"max_grad_norm={args.max_grad_norm}")
    put("optimizer.params.lr", args.learning_rate, f"learning_rate={args.learning_rate}")
    put("optimizer.params.betas", [args.adam_beta1, args.adam_beta2],
        f"adam_beta1={args.adam_beta1}, adam_beta2={args.adam_beta2}")
    put("optimizer.params.eps", args.adam_epsilon, f"adam_epsilon={args.adam_epsilon}")
    put("optimizer.params.weight_decay", args.weight_decay, f"weight_decay={args.weight_decay}")
    put("scheduler.params.warmup_min_lr", 0.0, "(warmup starts at lr 0)")
    put("scheduler.params.warmup_max_lr", args.learning_rate, f"learning_rate={args.learning_rate}")
    steps = num_training_steps if num_training_steps is not None else (args.max_steps if args.max_steps > 0 else None)
    if steps is not None:
        put("scheduler.params.total_num_steps", int(steps), f"max_steps / training steps = {steps}")
        put("scheduler.params.warmup_num_steps", int(args.get_warmup_steps(int(steps))),
            f"warmup_steps / warmup_ratio = {args.get_warmup_steps(int(steps))}")
    precision = f"fp16={args.fp16}, bf16={args.bf16}"
    put("fp16.enabled", bool(args.fp16), precision)
    put("bf16.enabled", bool(args.bf16), precision)
    explicit = set(values)
    if not (args.fp16 or args.bf16):  # precision left at its default: the config decides
        explicit -= {"fp16.enabled", "bf16.enabled"}
    return values, explicit, origins


class ZeroCallback(TrainerCallback):
    """Turns hf_zero on for the Trainer it is given to, and logs, at every logging step: per-rank
    model-state memory (MB, from ``memory_report``), the fp16 loss scale, skipped steps and the
    engine's global grad norm. The per-rank numbers are gathered in ``on_step_end`` (all ranks run
    it together) and added to the next ``log`` call.

    ``Trainer(..., callbacks=[ZeroCallback("zero.json")])`` on a stock Trainer runs it on hf_zero
    with that config (``None``: the Trainer's ``deepspeed`` argument or ``HF_ZERO_CONFIG``):
    creating the callback installs the Trainer hook of :mod:`hf_zero.integrations.bootstrap`. A
    callback that ends up on a Trainer without hf_zero (``add_callback`` after construction) fails
    at ``on_train_begin`` instead of doing nothing.
    """

    def __init__(self, config: Any = None, *, accelerator: Optional[ZeroAccelerator] = None):
        if isinstance(config, ZeroAccelerator):  # the earlier positional form ZeroCallback(accelerator)
            config, accelerator = None, config
        self.config = config
        self.accelerator = accelerator
        self._pending: Dict[str, float] = {}
        from .bootstrap import install_trainer_hook

        install_trainer_hook()

    def on_train_begin(self, args, state, control, **kwargs):
        if self.accelerator is None:
            raise RuntimeError(
                "ZeroCallback is on a Trainer that does not run hf_zero (it was added after the Trainer was built). "
                "Give it when building the Trainer: Trainer(..., callbacks=[hf_zero.ZeroCallback('zero.json')]), "
                "or launch with `python -m hf_zero.run train.py --deepspeed zero.json`"
            )
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log:
            self._pending = self.metrics()
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._pending:
            logs.update(self.pop())
        return control

    def pop(self) -> Dict[str, float]:
        out, self._pending = self._pending, {}
        return out

    def metrics(self) -> Dict[str, float]:
        """Collective when the world has several ranks: every rank must call it."""
        engine = getattr(self.accelerator, "zero_engine", None)
        if engine is None:
            return {}
        report = engine.memory_report()
        fields = ("param_bytes", "grad_bytes", "master_bytes", "optimizer_state_bytes", "model_state_bytes")
        mine = torch.tensor([float(report[f]) for f in fields], dtype=torch.float64, device=engine.device)
        rows = [mine]
        if engine.world_size > 1:
            import torch.distributed as dist

            rows = [torch.empty_like(mine) for _ in range(engine.world_size)]
            dist.all_gather(rows, mine)
        out: Dict[str, float] = {}
        for r, row in enumerate(rows):
            for f, v in zip(fields, row.tolist()):
                out[f"zero/rank{r}_{f.replace('_bytes', '')}_mb"] = round(v / 2**20, 4)
        out["zero/loss_scale"] = float(engine.loss_scale)
        out["zero/skipped_steps"] = float(engine.skipped_steps)
        norm = engine.get_global_grad_norm()
        if norm is not None:
            out["zero/grad_norm"] = norm
        return out


class ZeroTrainerMixin:
    """Mix into any ``transformers.Trainer`` subclass, first in the bases:
    ``class MySFT(hf_zero.ZeroTrainerMixin, trl.SFTTrainer)``. The arguments must be
    :class:`ZeroTrainingArguments` (or any TrainingArguments with a ``zero_config`` attribute;
    without one the path comes from ``HF_ZERO_CONFIG``). A :class:`ZeroCallback` in ``callbacks``
    may carry the config instead."""

    def __init__(self, *args, **kwargs):
        from .bootstrap import init_arguments

        callbacks = init_arguments(type(self), args, kwargs).get("callbacks") or ()
        mine = [cb for cb in callbacks if isinstance(cb, ZeroCallback)]
        if len(mine) > 1:
            raise ValueError(f"give at most one ZeroCallback to a Trainer, got {len(mine)}")
        self._zero_user_callback = mine[0] if mine else None
        super().__init__(*args, **kwargs)
        cb = getattr(self, "_zero_callback", None)
        if cb is not None and cb not in self.callback_handler.callbacks:
            self.add_callback(cb)

    # ------------------------------------------------------------------ accelerator
    def _build_accelerator_args(self, **kwargs) -> Dict[str, Any]:
        args = super()._build_accelerator_args(**kwargs)
        self._zero_accelerator_args = dict(args)
        return args

    def create_accelerator_and_postprocess(self) -> None:
        if getattr(self.args, "deepspeed", None) or getattr(self.args, "fsdp_plugin_args", None):
            raise ValueError("ZeroTrainer replaces DeepSpeed / FSDP: remove the deepspeed / fsdp arguments")
        # The Trainer's own method builds its accelerator arguments (and a plain Accelerator that
        # shares the same process state); rebuild it as a ZeroAccelerator with the same arguments.
        from .bootstrap import plain_accelerators

        with plain_accelerators():
            super().create_accelerator_and_postprocess()
        config = getattr(self.args, "zero_config", None)
        user_cb = getattr(self, "_zero_user_callback", None)
        if user_cb is not None and user_cb.config is not None:
            if config is not None and config != user_cb.config:
                raise ValueError(f"the ZeroCallback's config {user_cb.config!r} and the arguments' zero_config / "
                                 f"deepspeed {config!r} differ: give the ZeRO config once")
            config = user_cb.config
        # ddp_timeout: transformers passes it to the process group on GPUs only, not with use_cpu
        plugin = ZeroPlugin(config, timeout=self.args.ddp_timeout)
        accel_args = dict(self._zero_accelerator_args)
        accel_args.pop("deepspeed_plugin", None)
        self.accelerator = ZeroAccelerator(zero_plugin=plugin, **accel_args)
        self.gather_function = self.accelerator.gather_for_metrics
        if "use_gather_object" in inspect.signature(self.gather_function).parameters:
            self.gather_function = functools.partial(
                self.gather_function, use_gather_object=self.args.eval_use_gather_object
            )
        self.is_deepspeed_enabled = False
        self.is_fsdp_enabled = False
        self._zero_plugin = plugin
        self._zero_raw_config = plugin.config
        self._zero_set_values(None)
        # Resolve now (placeholder step counts for schedulers) so contradictions fail before training.
        resolved = self._zero_resolve(check_only=True)
        self.zero_config_resolved = resolved
        # The engine gets the Trainer's (or the config-built) optimizer and scheduler as client objects.
        plugin.config = dataclasses.replace(resolved, optimizer=None, scheduler=None)
        self._zero_callback = user_cb if user_cb is not None else ZeroCallback(accelerator=self.accelerator)
        self._zero_callback.accelerator = self.accelerator
        if hasattr(self, "callback_handler"):
            self.add_callback(self._zero_callback)

    def _zero_set_values(self, num_training_steps: Optional[int]) -> None:
        values, explicit, origins = trainer_values(self.args, self.accelerator.num_processes, num_training_steps)
        self._zero_plugin.values, self._zero_plugin.explicit, self._zero_plugin.origins = values, explicit, origins

    def _zero_resolve(self, check_only: bool = False) -> ZeroConfig:
        p = self._zero_plugin
        values = dict(p.values)
        if check_only:
            for key in ("scheduler.params.total_num_steps", "scheduler.params.warmup_num_steps"):
                values.setdefault(key, 1)
        hidden = getattr(getattr(self.model, "config", None), "hidden_size", None)
        if isinstance(hidden, int):
            values["hidden_size"] = hidden
        return resolve_with_origins(self._zero_raw_config, self.accelerator.num_processes, values,
                                    set(p.explicit), p.origins)

    @property
    def zero_engine(self):
        return getattr(getattr(self, "accelerator", None), "zero_engine", None)

    # ------------------------------------------------------------------ optimizer / scheduler
    def create_optimizer(self, model=None):
        section = self.zero_config_resolved.optimizer
        if section is None or self.optimizer is not None:
            return super().create_optimizer(model) if _accepts_model(super().create_optimizer) \
                else super().create_optimizer()
        from ..engine.optim import build_optimizer

        model = model if model is not None else self.model
        decay = set(self.get_decay_parameter_names(model))
        params = dict(section.params)
        wd = float(params.get("weight_decay", 0.0))
        groups = [
            {"params": [p for n, p in model.named_parameters() if p.requires_grad and n in decay], "weight_decay": wd},
            {"params": [p for n, p in model.named_parameters() if p.requires_grad and n not in decay],
             "weight_decay": 0.0},
        ]
        self.optimizer = build_optimizer(section.type, params, [g for g in groups if g["params"]])
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self._zero_raw_config.scheduler is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        from ..engine.schedulers import build_scheduler

        self._zero_set_values(num_training_steps)
        section = self._zero_resolve().scheduler
        optimizer = optimizer if optimizer is not None else self.optimizer
        optimizer = getattr(optimizer, "optimizer", optimizer)
        self.lr_scheduler = build_scheduler(section, optimizer)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # ------------------------------------------------------------------ logging / saving
    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        cb = getattr(self, "_zero_callback", None)
        if cb is not None:
            logs.update(cb.pop())
        return super().log(logs, *args, **kwargs)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Collective: gathers the full fp32 weights and writes them with ``save_pretrained``
        (safetensors) from the main process."""
        engine = self.zero_engine
        if engine is None:
            return super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state_dict = engine.full_state_dict()
        self._save(output_dir, state_dict=state_dict)
        self.accelerator.wait_for_everyone()

    def _zero_async(self) -> bool:
        engine = self.zero_engine
        return engine is not None and bool(engine.config.hf_zero.async_save)

    def _save_checkpoint(self, model, trial) -> None:
        """With ``hf_zero.async_save`` the newest ``checkpoint-N`` is still being written when the
        Trainer rotates folders: rotation then keeps one folder more than ``save_total_limit``,
        so the previous (complete) checkpoint survives a crash during the background write. The
        engine waits for the previous background write before starting this one, so every folder
        but the newest is complete; the surplus folder goes at the next save or at the end of
        ``train``."""
        if not self._zero_async():
            return super()._save_checkpoint(model, trial)
        limit = self.args.save_total_limit
        if limit is not None and limit > 0:
            self.args.save_total_limit = limit + 1
        try:
            return super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``resume_from_checkpoint=True`` resumes from the newest ``checkpoint-N`` whose engine
        checkpoint is complete (an asynchronous save interrupted by a crash leaves a newer folder
        without one). At the end, a background save still running is waited for, its failure
        raised, and ``save_total_limit`` applied."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = newest_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        result = super().train(resume_from_checkpoint, *args, **kwargs)
        if self._zero_async():
            self.zero_engine.wait_for_checkpoint()  # collective: all ranks end train() here
            if self.args.should_save and self.args.save_total_limit:
                from transformers.trainer_utils import rotate_checkpoints

                rotate_checkpoints(output_dir=self.args.output_dir, save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        return result

    def _save_optimizer_and_scheduler(self, output_dir):
        engine = self.zero_engine
        if engine is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        engine.save_checkpoint(output_dir, client_state={"lr_scheduler": self.lr_scheduler.state_dict()})
        if self.args.should_save:  # a stock Trainer resuming this folder must fail, not start afresh
            from ..checkpoint.trainer_format import write_stock_trainer_markers

            write_stock_trainer_markers(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint):
        engine = self.zero_engine
        if engine is None or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        from ..checkpoint.detect import detect

        if detect(checkpoint).kind == "trainer":  # a stock (DDP) Trainer's checkpoint: switch mid-run
            from ..checkpoint.trainer_format import load_trainer_checkpoint

            engine.runtime.release_all()
            load_trainer_checkpoint(engine, checkpoint, self._stock_group_names(), self.lr_scheduler)
            return
        _, client = engine.load_checkpoint(checkpoint)
        if client and "lr_scheduler" in client:
            self.lr_scheduler.load_state_dict(client["lr_scheduler"])
        elif detect(checkpoint).kind == "deepspeed":  # a DeepSpeed Trainer run: its scheduler too
            from ..checkpoint.deepspeed_format import trainer_scheduler_state

            state = trainer_scheduler_state(checkpoint, self.lr_scheduler)
            if state is not None:
                self.lr_scheduler.load_state_dict(state)


    def _stock_group_names(self):
        """The parameter names of the stock Trainer's optimizer groups, in its order: those that
        get weight decay, then the others (Trainer.create_optimizer)."""
        model = self.zero_engine.module
        decay = set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [[n for n, _ in named if n in decay], [n for n, _ in named if n not in decay]]

    def _move_model_to_device(self, model, device) -> None:
        """The engine places the model itself; a model whose weights are still on the meta
        device (ranks other than 0 under hf_zero.from_pretrained) must not be moved."""
        if any(p.is_meta for p in model.parameters()):
            return None
        return super()._move_model_to_device(model, device)

    def _load_best_model(self) -> None:
        """The best checkpoint's weights come from its sharded checkpoint (exact fp32 masters),
        not from its exported safetensors, which a sharded model cannot load in place."""
        engine = self.zero_engine
        if engine is None:
            return super()._load_best_model()
        engine.load_checkpoint(self.state.best_model_checkpoint, load_module_only=True)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Before the engine exists, the Trainer loads the exported weights into the plain model
        (as for DDP); once it exists, the sharded checkpoint restores everything instead."""
        if self.zero_engine is not None:
            return None
        return super()._load_from_checkpoint(resume_from_checkpoint, model)


def newest_complete_checkpoint(output_dir) -> Optional[str]:
    """The newest ``checkpoint-N`` folder of ``output_dir`` that holds no interrupted save: a
    ``.partial-<tag>`` directory without a complete ``<tag>`` (one with ``index.json``) beside it
    is an asynchronous save that never finished (see docs/checkpoints.md). None if none."""
    import re

    from ..checkpoint.format import INDEX

    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        if m and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    for _, path in sorted(found, reverse=True):
        interrupted = [n for n in os.listdir(path) if n.startswith(".partial-")
                       and not os.path.isfile(os.path.join(path, n[len(".partial-"):], INDEX))]
        if interrupted:
            logger.warning("%s: skipped, its checkpoint %s was never completed (interrupted save)",
                           path, interrupted[0][len(".partial-"):])
            continue
        return path
    return None


class ZeroTrainer(ZeroTrainerMixin, Trainer):
    """``transformers.Trainer`` with hf_zero's ZeRO engine instead of DDP / DeepSpeed."""


def _accepts_model(method) -> bool:
    try:
        return "model" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
