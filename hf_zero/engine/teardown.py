"""A clean process exit: the process group is torn down before the interpreter finalizes.

Why this exists (issue 13, item 10). A finished run sometimes died at exit with ``terminate called
without an active exception`` (SIGABRT, exit code -6), so the launcher reported a failure for a run
whose weights were right. The core dump shows the mechanism:

    ProcessGroupGloo::runLoop -> ~AsyncAllgatherWork -> TensorImpl::decref_pyobject
    -> gil_scoped_acquire -> take_gil -> PyThread_exit_thread -> pthread_exit
    -> forced unwind through a noexcept destructor -> std::terminate

A gloo worker thread releases a collective's ``Work`` a moment *after* it woke the thread that
waited on it. When that ``Work`` held the last reference to a tensor whose Python object had
already been dropped, freeing it needs the GIL. If the main thread has begun finalizing the
interpreter in that moment, CPython ends any thread that asks for the GIL with ``pthread_exit``;
the unwind crosses a destructor that may not throw, and libstdc++ aborts the whole process. Any
gloo collective can leave this tail behind (ours, accelerate's ``gather``, the Trainer's logging),
so the fix cannot be per call site.

The cure: destroy the process group from an :mod:`atexit` callback. ``atexit`` callbacks run while
the interpreter is still whole, and ``destroy_process_group`` shuts the backends down with the GIL
released, joining their worker threads, so a pending release finishes normally before
finalization can start. (Checked with a deterministic reproducer: an asynchronous all-gather whose
tensors were dropped in Python, still in flight at exit, aborts every time without this and exits
0 with it.)

Why destroying is not always enough. ``destroy_process_group`` only drops the registry's
references; the gloo backend (and its worker threads) lives on while anything else still holds the
group. ``torch.distributed.nn.functional`` does: its functions take ``group=group.WORLD`` as a
default argument, evaluated when the module is imported. transformers imports it lazily (building
any ``PretrainedConfig`` does), so in the usual order -- process group first, model second -- the
default group is pinned by ten function defaults, survives every destroy, and its workers run into
finalization. That is how a worker that called ``destroy_process_group()`` itself still aborted.
So after the destroy we also release pins like these: every default argument of a function in a
loaded ``torch.distributed`` module that is a process group no longer registered is reset to
``None`` (which those functions read as "the default group", the same meaning), and a garbage
collection frees what cycles still held. Measured: the gloo threads are gone after this, not after
the destroy alone (``tests/test_teardown.py`` checks by thread name).

Invariants:
    * Before any destroy and any release, every engine's post-step all-gathers still in flight
      (stages 1-2, :func:`hf_zero.engine.pending.settle_all`) are waited for: their works hold
      the group. They were issued by every rank in the same ``step()``, so the wait completes.
    * :func:`install_exit_teardown` is idempotent: one callback per process, whoever calls it.
    * When no process group is initialized at exit (the user's script or a launcher destroyed it)
      the callback only releases pinned, destroyed groups (above); it starts no collective.
    * After an uncaught exception (``sys.last_value`` is set) it does nothing: the run has failed
      already, and waiting for collectives that peers will never join would delay the failure
      reaching them. Today's fast failure propagation (a crashed rank ends the others in ~1 s)
      is kept.
    * It never hangs the exit: the destroy runs under a watchdog; past ``deadline_s`` the process
      prints why and leaves with exit code 1 (a peer stopped answering during teardown).
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading
import types

import torch.distributed as dist

DEFAULT_DEADLINE_S = 120.0

_installed = False
_lock = threading.Lock()


def install_exit_teardown(deadline_s: float = DEFAULT_DEADLINE_S) -> bool:
    """Register the exit-time teardown once per process. Returns True if this call installed it."""
    global _installed
    with _lock:
        if _installed:
            return False
        atexit.register(_teardown_at_exit, deadline_s)
        _installed = True
        return True


def _teardown_at_exit(deadline_s: float) -> None:
    if getattr(sys, "last_value", None) is not None:
        return
    if not dist.is_available():
        return
    if not dist.is_initialized():
        release_destroyed_groups()
        return
    watchdog = threading.Timer(deadline_s, _give_up, args=(deadline_s,))
    watchdog.daemon = True
    watchdog.start()
    try:
        _settle_engines()
        dist.destroy_process_group()
    except Exception as exc:  # the run itself finished; report, do not mask its exit code
        print(f"hf_zero: tearing down the process group at exit failed: {exc!r}", file=sys.stderr, flush=True)
    finally:
        watchdog.cancel()
        watchdog.join()
    release_destroyed_groups()


def release_destroyed_groups() -> int:
    """Drop the references that keep destroyed process groups (and their threads) alive.

    Resets each default argument of a function in a loaded ``torch.distributed`` module that is a
    process group no longer in the registry to ``None``, then collects garbage. Returns how many
    defaults were reset. Live groups are never touched.
    """
    from torch.distributed import distributed_c10d as c10d

    _settle_engines()
    live = set(map(id, getattr(c10d._world, "pg_map", {}) or {}))
    reset = 0
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "torch.distributed" or name.startswith("torch.distributed.")):
            continue
        for value in list(vars(module).values()):
            fn, depth = value, 0
            while type(fn) is types.FunctionType and depth < 8:  # follow functools.wraps chains (type(), not
                # isinstance(): some module attributes warn when their __class__ is read)
                reset += _reset_defaults(fn, live)
                fn, depth = getattr(fn, "__wrapped__", None), depth + 1
    gc.collect()
    return reset


def _settle_engines() -> None:
    """Stages 1-2: post-step all-gathers still in flight hold their group (hf_zero.engine.pending)."""
    from .pending import settle_all

    settle_all()


def _reset_defaults(fn: types.FunctionType, live: set) -> int:
    reset = 0
    defaults = fn.__defaults__
    if defaults:
        dead = [_is_dead_group(d, live) for d in defaults]
        if any(dead):
            fn.__defaults__ = tuple(None if is_dead else d for d, is_dead in zip(defaults, dead))
            reset += sum(dead)
    kwdefaults = fn.__kwdefaults__
    if kwdefaults:
        for key, d in list(kwdefaults.items()):
            if _is_dead_group(d, live):
                kwdefaults[key] = None
                reset += 1
    return reset


def _is_dead_group(value, live: set) -> bool:
    return isinstance(value, dist.ProcessGroup) and id(value) not in live


def _give_up(deadline_s: float) -> None:
    print(f"hf_zero: the process group did not shut down within {deadline_s:.0f} s at exit (a peer "
          "stopped answering during teardown); leaving with exit code 1", file=sys.stderr, flush=True)
    os._exit(1)
