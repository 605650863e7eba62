"""The bootstrap: stock ``transformers.Trainer`` and ``accelerate.Accelerator`` scripts run on hf_zero
without an edit. This is the ONE module of hf_zero that patches other libraries.

What is patched (each entry point is wrapped once, the rest of their code runs as it is):

* ``transformers.TrainingArguments.__post_init__``: a ``deepspeed`` value (path, JSON string,
  dict) is moved aside into ``args.zero_config`` *before* Transformers sees it, so it never
  imports or checks the deepspeed package; ``args.deepspeed`` is then ``None``.
* ``transformers.Trainer.__new__``: a Trainer (or any subclass, defined before or after the
  bootstrap: TRL's trainers, a user's own) whose arguments carry a ZeRO config, given a
  :class:`~hf_zero.ZeroCallback`, or built while ``HF_ZERO_CONFIG`` is set, is created as
  ``class <Same name>(ZeroTrainerMixin, <its class>)``: exactly what ``ZeroTrainer`` does.
  ``isinstance(trainer, SFTTrainer)`` stays true.
* ``accelerate.Accelerator.__new__``: an Accelerator (or subclass) built while ``HF_ZERO_CONFIG``
  is set, or given a ``DeepSpeedPlugin`` (whose ``hf_ds_config`` / accelerate's
  ``ACCELERATE_DEEPSPEED_CONFIG_FILE`` is the config), is created as a
  :class:`~hf_zero.ZeroAccelerator` with the same arguments.

Invariants:

* Nothing is imported or patched before the library is: the patches are applied by an import
  hook when ``transformers.training_args`` / ``transformers.trainer`` /
  ``accelerate.accelerator`` load (at once when they already are). Installing twice is a no-op.
* Classes that already are hf_zero's (``ZeroTrainer``, ``ZeroTrainerMixin`` subclasses,
  ``ZeroAccelerator``) are never re-wrapped; the plain Accelerator that the Trainer builds
  inside ``ZeroTrainerMixin`` is left plain (:func:`plain_accelerators`).
* accelerate's DeepSpeed switch (``ACCELERATE_USE_DEEPSPEED=true``) is turned off by
  :func:`enable` after its config file has been taken as hf_zero's: hf_zero replaces DeepSpeed.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.abc
import importlib.machinery
import inspect
import json
import os
import sys
from typing import Any, Callable, Dict, Optional, Tuple

ENV_CONFIG = "HF_ZERO_CONFIG"

_plain = contextvars.ContextVar("hf_zero_plain_accelerators", default=False)
_installed: Dict[str, bool] = {}
_class_cache: Dict[Tuple[str, type], type] = {}


# ------------------------------------------------------------------------------------ public API
def enable(config: Optional[str] = None) -> None:
    """Run every Trainer / Accelerator of this process on hf_zero (the in-code form of
    ``python -m hf_zero.run``). ``config``: a path to (or JSON string of) a DeepSpeed-format
    config, stored in ``HF_ZERO_CONFIG``; without it, Trainers use their ``deepspeed`` argument
    and everything else ``HF_ZERO_CONFIG`` / accelerate's DeepSpeed config file."""
    if config is not None:
        if not isinstance(config, (str, os.PathLike)):
            raise TypeError(f"hf_zero.enable(config=...) takes a path or a JSON string, got {type(config).__name__}")
        os.environ[ENV_CONFIG] = os.fspath(config)
    adopt_accelerate_deepspeed_env()
    install_trainer_hook()
    install_accelerator_hook()


def adopt_accelerate_deepspeed_env(env=None) -> None:
    """accelerate's DeepSpeed settings (``ACCELERATE_USE_DEEPSPEED=true`` with
    ``ACCELERATE_DEEPSPEED_CONFIG_FILE``) become hf_zero's ``HF_ZERO_CONFIG``."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not env.get(ENV_CONFIG):
        if not path or path == "none":
            raise ValueError(
                "accelerate is configured for DeepSpeed (ACCELERATE_USE_DEEPSPEED=true) without a config file: "
                "hf_zero takes the DeepSpeed-format JSON itself. Put the settings in a file and name it in the "
                "accelerate config (deepspeed_config: {deepspeed_config_file: zero.json}) or set "
                f"{ENV_CONFIG}=zero.json"
            )
        env[ENV_CONFIG] = path
    env["ACCELERATE_USE_DEEPSPEED"] = "false"


@contextlib.contextmanager
def plain_accelerators():
    """Within this block ``Accelerator(...)`` stays accelerate's own (used by ZeroTrainerMixin,
    whose Trainer builds a plain Accelerator before it is rebuilt as a ZeroAccelerator)."""
    token = _plain.set(True)
    try:
        yield
    finally:
        _plain.reset(token)


def install_trainer_hook() -> None:
    """Patch ``TrainingArguments.__post_init__`` and ``Trainer.__new__`` (now, or when they load)."""
    _on_import("transformers.training_args", _patch_training_arguments)
    _on_import("transformers.trainer", _patch_trainer)


def install_accelerator_hook() -> None:
    """Patch ``Accelerator.__new__`` (now, or when accelerate loads)."""
    _on_import("accelerate.accelerator", _patch_accelerator)


def is_installed(name: str) -> bool:
    return _installed.get(name, False)


# ------------------------------------------------------------------------------------ import hook
class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, patch: Callable):
        self._loader, self._patch = loader, patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._patch(module)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.patches: Dict[str, Callable] = {}

    def find_spec(self, name, path=None, target=None):
        patch = self.patches.get(name)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, patch)
                return spec
        return None


_finder = _PatchOnImport()


def _on_import(module_name: str, patch: Callable) -> None:
    if module_name in sys.modules:
        patch(sys.modules[module_name])
        return
    _finder.patches[module_name] = patch
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


# ------------------------------------------------------------------------------------ TrainingArguments
def _patch_training_arguments(module) -> None:
    if _installed.get("training_args"):
        return
    cls = module.TrainingArguments
    original = cls.__post_init__

    def __post_init__(self, *args, **kwargs):
        from .trainer import adopt_deepspeed_argument

        adopt_deepspeed_argument(self)
        return original(self, *args, **kwargs)

    __post_init__.__wrapped__ = original
    cls.__post_init__ = __post_init__
    _installed["training_args"] = True


# ------------------------------------------------------------------------------------ Trainer
def _bound(init, args: tuple, kwargs: dict) -> Dict[str, Any]:
    try:
        return dict(inspect.signature(init).bind_partial(None, *args, **kwargs).arguments)
    except (TypeError, ValueError):
        return dict(kwargs)


def _passes_through(init) -> bool:
    """``def __init__(self, *args, **kwargs)``: names no argument of its own."""
    try:
        params = list(inspect.signature(init).parameters.values())[1:]
    except (TypeError, ValueError):
        return True
    return all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def init_arguments(cls: type, args: tuple, kwargs: dict) -> Dict[str, Any]:
    """The arguments of ``cls(*args, **kwargs)`` by name, bound against the first ``__init__`` in
    ``cls``'s MRO that names its parameters (so a mixin's ``(*args, **kwargs)`` pass-through, as
    in ``ZeroTrainerMixin`` first in the bases, does not hide ``callbacks=``)."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None and not _passes_through(init):
            return _bound(init, args, kwargs)
    return dict(kwargs)


def trainer_wants_zero(targs, callbacks) -> bool:
    """Should a Trainer with these ``args`` / ``callbacks`` run on hf_zero?"""
    from .trainer import ZeroCallback

    if getattr(targs, "zero_config", None) is not None:
        return True
    if any(isinstance(cb, ZeroCallback) for cb in (callbacks or ())):
        return True
    return bool(os.environ.get(ENV_CONFIG))


def _patch_trainer(module) -> None:
    if _installed.get("trainer"):
        return
    base = module.Trainer
    original_new = base.__dict__.get("__new__")

    def __new__(cls, *args, **kwargs):
        from .trainer import ZeroTrainerMixin

        if not issubclass(cls, ZeroTrainerMixin):
            bound = init_arguments(cls, args, kwargs)
            if trainer_wants_zero(bound.get("args"), bound.get("callbacks")):
                cls = _zero_trainer_class(cls)
        if original_new is not None:
            return original_new(cls, *args, **kwargs)
        return object.__new__(cls)

    base.__new__ = staticmethod(__new__)
    _installed["trainer"] = True


def _zero_trainer_class(cls: type) -> type:
    from .trainer import ZeroTrainerMixin

    key = ("trainer", cls)
    if key not in _class_cache:
        _class_cache[key] = type(cls.__name__, (ZeroTrainerMixin, cls),
                                 {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                  "__doc__": cls.__doc__, "_hf_zero_bootstrapped": True})
    return _class_cache[key]


# ------------------------------------------------------------------------------------ Accelerator
def accelerator_config(kwargs: Dict[str, Any]):
    """``(True, config)`` when an Accelerator with these keyword arguments should be hf_zero's:
    ``config`` is a DeepSpeedPlugin's config dict, or ``None`` for ``HF_ZERO_CONFIG``."""
    plugin = kwargs.get("deepspeed_plugin")
    if plugin is None and kwargs.get("deepspeed_plugins"):
        plugins = kwargs["deepspeed_plugins"]
        plugins = list(plugins.values()) if isinstance(plugins, dict) else list(plugins)
        if len(plugins) != 1:
            raise ValueError(f"hf_zero trains one model per Accelerator: got {len(plugins)} DeepSpeed plugins")
        plugin = plugins[0]
    if plugin is not None:
        if os.environ.get(ENV_CONFIG):
            return True, None  # the launcher's config wins, as for the Trainer's own plugin
        hf = getattr(plugin, "hf_ds_config", None)
        config = getattr(hf, "config", None)
        if not isinstance(config, dict):
            raise ValueError(
                "DeepSpeedPlugin without a config file: hf_zero needs a DeepSpeed-format JSON config; pass "
                f"DeepSpeedPlugin(hf_ds_config='zero.json') or set {ENV_CONFIG}=zero.json"
            )
        return True, _plugin_config(config)
    if os.environ.get(ENV_CONFIG):
        return True, None
    return False, None


def _plugin_config(config: dict) -> dict:
    out = json.loads(json.dumps(config, default=str).replace("Infinity", "null"))
    if out.get("steps_per_print") is None:  # accelerate sets it to inf to silence DeepSpeed
        out.pop("steps_per_print", None)
    return out


class _FromAcceleratorArguments:
    """First base of the hf_zero Accelerator the bootstrap builds: takes accelerate's own
    arguments (positional ones too) and turns a DeepSpeed plugin into a ZeroPlugin."""

    def __init__(self, *args, **kwargs):
        from accelerate import Accelerator

        from .accelerate import ZeroPlugin

        if args:
            names = list(inspect.signature(Accelerator.__init__).parameters)[1:]
            kwargs.update(zip(names, args))
        _, config = accelerator_config(kwargs)
        kwargs.pop("deepspeed_plugin", None)
        kwargs.pop("deepspeed_plugins", None)
        if isinstance(config, dict):
            gas = config.get("gradient_accumulation_steps")
            if "gradient_accumulation_steps" in kwargs or kwargs.get("gradient_accumulation_plugin") is not None:
                config["gradient_accumulation_steps"] = "auto"
            elif isinstance(gas, int):  # accelerate's DeepSpeed path accumulates the config's steps
                kwargs["gradient_accumulation_steps"] = gas
        super().__init__(zero_plugin=ZeroPlugin(config), **kwargs)


def _patch_accelerator(module) -> None:
    if _installed.get("accelerator"):
        return
    base = module.Accelerator
    original_new = base.__dict__.get("__new__")

    def __new__(cls, *args, **kwargs):
        from .accelerate import ZeroAccelerator

        if not _plain.get() and not issubclass(cls, ZeroAccelerator):
            if args:
                names = list(inspect.signature(base.__init__).parameters)[1:]
                probe = dict(kwargs, **dict(zip(names, args)))
            else:
                probe = kwargs
            wanted, _ = accelerator_config(probe)
            if wanted:
                cls = _zero_accelerator_class(cls, base)
        if original_new is not None:
            return original_new(cls, *args, **kwargs)
        return object.__new__(cls)

    base.__new__ = staticmethod(__new__)
    _installed["accelerator"] = True


def _zero_accelerator_class(cls: type, base: type) -> type:
    from .accelerate import ZeroAccelerator

    key = ("accelerator", cls)
    if key not in _class_cache:
        bases = (_FromAcceleratorArguments, ZeroAccelerator) if cls is base else \
            (_FromAcceleratorArguments, ZeroAccelerator, cls)
        _class_cache[key] = type(cls.__name__, bases, {"__module__": cls.__module__,
                                                       "__qualname__": cls.__qualname__,
                                                       "_hf_zero_bootstrapped": True})
    return _class_cache[key]
