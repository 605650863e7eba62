"""The background half of ``save_checkpoint(..., async_save=True)``.

The calling thread (every rank, collectively) does what needs agreement: the tag, the partial
directory, a snapshot of the rank's shards in host memory (copies: later optimizer steps cannot
change what is written), the index built from the state at that step (rank 0) and the agreed
outcome of all of that. Training resumes then. A thread per rank writes the rank file; no
collective ever runs off the main thread (gloo collectives are not safe from two threads).

Invariants:
    * Ranks agree through the shared checkpoint directory instead of a collective: when its file
      is written and fsynced, each rank atomically writes ``.done-<rank file>.json`` (its entry
      of the index's ``files``: size, sha256 and export range; or the error) into
      ``.partial-<tag>``. Rank 0's thread waits until every rank's marker exists, fills the
      index's file list from them, writes ``index.json``, renames the directory to ``<tag>``
      and only then moves ``latest``: ``latest`` names a checkpoint only when every rank's file
      is complete. Any rank crashing before that leaves the previous
      checkpoint and ``latest`` untouched (a ``.partial-*`` directory is never loaded).
    * The next ``save_checkpoint`` first calls ``finish_pending`` (collective, main thread): it
      joins this rank's thread and all ranks agree on every rank's outcome; a failure is raised
      there on every rank, and the partial directory removed. A failure is also raised, once, on
      its own rank at the first ``step`` after the thread ended (``raise_if_failed``).
    * ``engine.destroy()`` and interpreter exit wait for the thread (it is not a daemon; an
      ``atexit`` hook reports a failure nobody saw on stderr, so it is never silently lost).
      Rank 0 gives up waiting for a rank whose file stopped growing for ``STALL_S`` seconds
      without its marker (that rank died): the save then fails, nothing is published.
"""

from __future__ import annotations

import atexit
import json
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch

from .format import CheckpointError, rank_file, write_json_atomic

# rank 0 gives up publishing when a rank's file has not grown (and its marker has not appeared)
# for this long: that rank died (its process would otherwise keep writing)
STALL_S = 120.0


def done_marker(partial: Path, file_name: str) -> Path:
    return partial / f".done-{file_name}.json"


@dataclass
class AsyncSave:
    """One background save of one rank; ``start`` launches it."""

    rank: int
    world_size: int
    save_dir: Path
    tag: str
    partial: Path
    final: Path
    file_name: str
    index: Optional[dict]
    save_latest: bool
    nbytes: int
    error: str = ""
    reported: bool = False
    thread: Optional[threading.Thread] = None
    _tensors: Optional[Dict[str, torch.Tensor]] = field(default=None, repr=False)

    @classmethod
    def start(cls, *, tensors: Dict[str, torch.Tensor], **kw) -> "AsyncSave":
        job = cls(**kw)
        job._tensors = tensors
        job.thread = threading.Thread(target=job._run, name=f"hf_zero-save-{job.tag}", daemon=False)
        atexit.register(job._at_exit)
        job.thread.start()
        return job

    # ------------------------------------------------------------------ the background thread
    def _run(self) -> None:
        from .sharded import _as_os_error, _disk_error, _write_rank_file

        path = self.partial / self.file_name
        try:
            written = _write_rank_file(path, self._tensors)
            self._tensors = None  # the snapshot's memory goes back as soon as it is on disk
            write_json_atomic(done_marker(self.partial, self.file_name), {"written": written})
        except Exception as exc:  # noqa: BLE001 - recorded, agreed at the next save
            err = exc if isinstance(exc, OSError) else _as_os_error(exc)
            self.error = _disk_error(err, path, self.nbytes)
            self._tensors = None
            try:
                write_json_atomic(done_marker(self.partial, self.file_name), {"error": self.error})
            except OSError:
                pass  # rank 0 times out instead; this rank raises its own error anyway
            return
        if self.rank == 0:
            try:
                self._publish()
            except CheckpointError as exc:
                self.error = str(exc)
            except OSError as exc:
                self.error = _disk_error(exc, Path(exc.filename) if exc.filename else self.partial, 0)

    def _publish(self) -> None:
        from .sharded import _publish

        files, failed = {}, []
        for r in range(self.world_size):
            name = rank_file(r, self.world_size)
            marker = done_marker(self.partial, name)
            last_size, last_change = -1, time.monotonic()
            while not marker.is_file():
                try:
                    size = (self.partial / name).stat().st_size
                except OSError:
                    size = -1
                now = time.monotonic()
                if size != last_size:
                    last_size, last_change = size, now
                elif now - last_change > STALL_S:
                    raise CheckpointError(
                        f"{self.partial / name}: rank {r}'s file has not grown for {STALL_S:.0f} s and it has "
                        f"not reported completion; {self.final} is not published (did rank {r} die?)")
                time.sleep(0.02)
            done = json.loads(marker.read_text())
            if "error" in done:
                failed.append(f"rank {r}: {done['error']}")
            else:
                files[name] = done["written"]
        if failed:
            raise CheckpointError(f"asynchronous save of {self.final} failed on other rank(s): " + "; ".join(failed))
        for r in range(self.world_size):
            done_marker(self.partial, rank_file(r, self.world_size)).unlink()
        index = dict(self.index)
        index["files"] = files
        _publish(self.save_dir, self.tag, self.partial, self.final, index, self.save_latest)

    # ------------------------------------------------------------------ the main thread
    def wait(self) -> str:
        """Join the thread; this rank's error ("" when it succeeded)."""
        if self.thread is not None:
            self.thread.join()
        atexit.unregister(self._at_exit)
        return self.error

    def _at_exit(self) -> None:
        error = self.wait()
        if error and not self.reported:
            print(f"hf_zero: the asynchronous checkpoint save of {self.final} failed: {error}", file=sys.stderr)


def finish_pending(engine) -> None:
    """Collective: wait for the engine's background save (if any) and agree on its outcome;
    raises CheckpointError on every rank if any rank's write or the publication failed."""
    from .sharded import _agree

    job: Optional[AsyncSave] = getattr(engine, "_pending_save", None)
    if job is None:
        return
    error = job.wait()
    engine._pending_save = None
    try:
        _agree(engine, error, f"asynchronous save of checkpoint {job.final}")
    except CheckpointError:
        if engine.rank == 0 and job.partial.exists():
            shutil.rmtree(job.partial, ignore_errors=True)
        engine.comm.barrier()
        raise


def wait_pending(engine) -> None:
    """Rank-local: wait for the background save; raise its failure if nobody has seen it."""
    job: Optional[AsyncSave] = getattr(engine, "_pending_save", None)
    if job is None:
        return
    error = job.wait()
    if error and not job.reported:
        job.reported = True
        raise CheckpointError(f"asynchronous save of checkpoint {job.final} failed: {error}")


def raise_if_failed(engine) -> None:
    """Rank-local and non-blocking (called by ``step``): raise a finished background save's
    failure once; the next save agrees on it on every rank."""
    job: Optional[AsyncSave] = getattr(engine, "_pending_save", None)
    if job is None or job.reported or job.thread is None or job.thread.is_alive() or not job.error:
        return
    job.reported = True
    raise CheckpointError(f"asynchronous save of checkpoint {job.final} failed: {job.error}")
