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

Invariants:
    * :func:`install_exit_teardown` is idempotent: one callback per process, whoever calls it.
    * The callback does nothing when no process group is initialized at exit (the user's script or
      a launcher already destroyed it).
    * After an uncaught exception (``sys.last_value`` is set) it does nothing: the run has failed
      already, and waiting for collectives that peers will never join would delay the failure
      reaching them. Today's fast failure propagation (a crashed rank ends the others in ~1 s)
      is kept.
    * It never hangs the exit: the destroy runs under a watchdog; past ``deadline_s`` the process
      prints why and leaves with exit code 1 (a peer stopped answering during teardown).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading

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
    if not (dist.is_available() and dist.is_initialized()):
        return
    watchdog = threading.Timer(deadline_s, _give_up, args=(deadline_s,))
    watchdog.daemon = True
    watchdog.start()
    try:
        dist.destroy_process_group()
    except Exception as exc:  # the run itself finished; report, do not mask its exit code
        print(f"hf_zero: tearing down the process group at exit failed: {exc!r}", file=sys.stderr, flush=True)
    finally:
        watchdog.cancel()
        watchdog.join()


def _give_up(deadline_s: float) -> None:
    print(f"hf_zero: the process group did not shut down within {deadline_s:.0f} s at exit (a peer "
          "stopped answering during teardown); leaving with exit code 1", file=sys.stderr, flush=True)
    os._exit(1)
