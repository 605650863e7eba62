"""Host <-> device copies off the compute stream: a copy stream and the events that order it.

Note:
    * :meth:`CopyStream.copy` issues ``dst.copy_(src)`` on the copy stream's own CUDA stream,
      after everything the compute stream (the current stream when it is called) has queued so
      far: the copy stream waits for it on the GPU, so the source is complete, and the host does
      not block. The copy returns a :class:`CopyEvent` recorded after it on the copy stream.
    * Whoever uses the destination waits for that event: the host, before it reads a
      device-to-host destination (:meth:`CopyEvent.synchronize`); the compute stream, before a
      kernel reads a host-to-device destination or writes a device source again
      (:meth:`CopyEvent.wait_compute`, a GPU-side wait: the host does not block).
    * A device tensor the copy stream reads or writes is marked with ``record_stream``, so the
      caching allocator does not hand its memory to another tensor before the copy is done.
      Pinned host buffers are protected by torch's pinned-memory allocator the same way.
    * Without CUDA (a CPU-only run, or a copy between two CPU tensors) a copy is a plain
      synchronous ``copy_`` and its event is complete from the start: the same code runs with
      the streams and events as no-ops.
    * One copy stream per engine, created on the thread that builds it; copies may be issued
      from any thread (CUDA streams are thread-safe), e.g. the host optimizer step's worker.
"""

from __future__ import annotations

from typing import Optional

import torch


class CopyEvent:
    """The completion of one copy (always complete on CPU)."""

    __slots__ = ("_event",)

    def __init__(self, event: Optional["torch.cuda.Event"] = None):
        self._event = event

    @property
    def on_gpu(self) -> bool:
        return self._event is not None

    def done(self) -> bool:
        return self._event is None or self._event.query()

    def synchronize(self) -> None:
        """Block the calling host thread until the copy is done (before the host reads it)."""
        if self._event is not None:
            self._event.synchronize()

    def wait_compute(self, stream: Optional["torch.cuda.Stream"] = None) -> None:
        """Make ``stream`` (default: the current stream) wait on the GPU until the copy is done."""
        if self._event is not None:
            (stream if stream is not None else torch.cuda.current_stream()).wait_event(self._event)


DONE = CopyEvent()


class CopyStream:
    """A side stream for host <-> device copies (see the module note)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self.issued = 0     # copies issued
        self.async_issued = 0  # of which on the CUDA copy stream

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> CopyEvent:
        """``dst.copy_(src)`` off the compute stream; returns the event that completes it."""
        self.issued += 1
        if not self.cuda or not (dst.is_cuda or src.is_cuda):
            dst.copy_(src)
            return DONE
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
        for t in (dst, src):
            if t.is_cuda:
                t.record_stream(self.stream)
        event = torch.cuda.Event()
        event.record(self.stream)
        self.async_issued += 1
        return CopyEvent(event)
