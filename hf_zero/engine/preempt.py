"""Preemption: on SIGTERM, finish the optimizer step, save a checkpoint on every rank, exit 0.

Cloud schedulers and Kubernetes send SIGTERM some seconds before they kill a job. With
``"hf_zero": {"save_on_signal": DIR}`` the engine turns that into a clean stop that a restarted
job resumes from exactly (``engine.load_checkpoint(DIR)``, at any world size).

Invariants:
    * The signal handler only records the signal (async-signal-safe: one attribute write); all
      work happens on the training thread at an optimizer-step boundary, never inside a step.
    * Every rank decides at the same boundary: after each optimizer step the ranks all-reduce
      (max) one flag, so a signal that reached one rank only still stops all of them at the same
      step, and nobody waits in a collective its peers never enter. The cost is that one control
      all-reduce of a single float per optimizer step, paid only when ``save_on_signal`` is set.
    * A signal that arrives during a step is acted on after that step: the checkpoint holds the
      weights, optimizer state, schedule and RNG after step N, tag ``save_on_signal_tag`` or
      ``global_step<N>``, written with the ordinary atomic save (``latest`` points to it).
    * After the save the engine releases its swap files and raises ``SystemExit(0)`` out of
      ``engine.step()`` (or ``apply_update()``): ``finally`` blocks and ``atexit`` callbacks run
      (the process group is torn down by :mod:`hf_zero.engine.teardown`), the exit code is 0.
    * A second signal before that boundary is passed to the handler that was installed before
      this one (by default: die of the signal), so a process that no longer steps can still be
      stopped. :meth:`PreemptionGuard.close` restores the previous handlers.
    * Handlers are installed only from the main thread (Python's rule); elsewhere construction
      raises a clear error naming the key.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Callable, Dict, Optional, Sequence

import torch

_LOG = logging.getLogger("hf_zero")


class PreemptionGuard:
    """Records SIGTERM (and any ``signals`` given); :meth:`agreed` says, identically on every
    rank, whether some rank got one; :meth:`stop` saves and exits."""

    def __init__(self, save_dir: str, tag: Optional[str], rank: int,
                 signals: Sequence[int] = (signal.SIGTERM,)):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "hf_zero.save_on_signal needs the engine to be built in the main thread (only it may "
                "install signal handlers); build the engine there or remove hf_zero.save_on_signal"
            )
        self.save_dir, self.tag, self.rank = save_dir, tag, rank
        self.received: Optional[int] = None  # the first signal number seen, or None
        self._previous: Dict[int, object] = {}
        for signum in signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            return
        previous = self._previous.get(signum, signal.SIG_DFL)  # a second signal: the old meaning
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            import os

            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def agreed(self, all_reduce_max: Optional[Callable[[torch.Tensor], None]], device) -> bool:
        """Collective when ``all_reduce_max`` is given: whether any rank has received a signal."""
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=device)
        if all_reduce_max is not None:
            all_reduce_max(flag)
        return bool(flag.item() > 0)

    def stop(self, engine) -> None:
        """Every rank: save the checkpoint, release the engine's resources, exit 0."""
        why = signal.Signals(self.received).name if self.received is not None else "a peer's signal"
        if self.rank == 0:
            _LOG.warning("hf_zero: %s received: saving a checkpoint after step %d to %s and exiting",
                         why, engine.global_steps, self.save_dir)
        path = engine.save_checkpoint(self.save_dir, tag=self.tag, async_save=False)  # complete before exit 0
        if self.rank == 0:
            _LOG.warning("hf_zero: checkpoint saved to %s; exiting with code 0", path)
        self.close()
        engine.destroy()
        raise SystemExit(0)

    def close(self) -> None:
        """Put the handlers that were there before back (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
