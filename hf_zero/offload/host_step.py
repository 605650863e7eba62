"""The optimizer step on offloaded state: fp32 master shards and optimizer states in CPU RAM or
in NVMe swap files, stepped on the CPU one unit at a time.

Note:
    * The user's torch optimizer is kept; a unit is stepped through a view of it whose param
      groups hold that unit's pieces only (``step_pieces``, :func:`hf_zero.offload.partial.subset_view`),
      so per-group options, LR schedulers and per-piece states work unchanged. The views'
      hyperparameters are taken when a step is submitted (on the training thread). Steps run one
      unit at a time on one worker thread.
    * Partial offload (``offload_optimizer.ratio`` < 1): only the flats in ``host_indices`` are
      the host's (host gradient buffers, swap regions, :meth:`resident`); the engine steps the
      others on the device while this step runs (see :mod:`hf_zero.offload.partial`).
    * Gradients come down in the dtype they were reduced in (bf16 / fp16 under mixed precision,
      never widened on the device), on the copy stream (:mod:`hf_zero.offload.streams`), and
      are widened on the worker into one persistent fp32 host buffer per flat, which the pieces'
      ``.grad`` views. Updated masters go up cast to the compute dtype through a reused staging
      buffer per flat, on the copy stream too.
    * CPU: masters and states stay in (pinned) RAM. NVMe: between steps they live in the swap
      files; ``resident(flat)`` brings one flat's master and states into RAM (and writes them
      back) for the code that needs them outside the step (checkpoints, exports), and the step
      itself runs through :class:`~hf_zero.offload.nvme.SwapPipeline`, reading the next unit
      while stepping this one and writing the previous one.
    * An optimizer state is "element-wise" when it is a tensor with one value per parameter
      element (Adam's moments, SGD's momentum); 0-d states (Adam's ``step``) are kept in RAM per
      piece. The element-wise kinds are found by stepping a probe copy of the optimizer once.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import torch

from .nvme import NvmeSwapStore, Region, SwapPipeline, aligned_empty, region_layout
from .partial import subset_view
from .streams import DONE, CopyEvent, CopyStream


def step_pieces(optimizer: torch.optim.Optimizer, pieces: Sequence, view=None) -> None:
    """``optimizer.step()`` restricted to ``pieces``, through ``view`` (a
    :func:`~hf_zero.offload.partial.subset_view` made earlier) or a view made now. The user's
    ``param_groups`` are never mutated, so another thread may step other pieces meanwhile."""
    (view if view is not None else subset_view(optimizer, pieces)).step()


def elementwise_state_kinds(optimizer: torch.optim.Optimizer) -> List[str]:
    """The names of the optimizer's per-element states, found by stepping a probe copy."""
    import inspect

    accepted = inspect.signature(type(optimizer).__init__).parameters
    defaults = {k: v for k, v in optimizer.param_groups[0].items() if k != "params" and k in accepted}
    probe_param = torch.nn.Parameter(torch.ones(3))
    probe = type(optimizer)([probe_param], **defaults)
    probe_param.grad = torch.full((3,), 0.5)
    probe.step()
    return sorted(k for k, v in probe.state[probe_param].items() if torch.is_tensor(v) and v.dim() > 0)


class HostStep:
    """Owns the host-side state of an engine with ``offload_optimizer`` enabled."""

    def __init__(self, engine, device_kind: str, nvme_path: Optional[str] = None, buffer_count: int = 4,
                 aio_block_size: int = 1 << 20, aio_threads: int = 4, pin: bool = False,
                 host_indices: Optional[Iterable[int]] = None):
        self.engine = engine
        self.kind = device_kind
        self.flats = engine._trainable_flats
        self.host_indices = frozenset(range(len(self.flats)) if host_indices is None else host_indices)
        self.pieces_by_flat: Dict[int, list] = {}
        for piece in engine.pieces:
            self.pieces_by_flat.setdefault(piece.flat_index, []).append(piece)
        self.pin = pin
        self.host_grad = [torch.zeros(f.shard_numel if i in self.host_indices else 0, dtype=torch.float32,
                                      pin_memory=pin and i in self.host_indices)
                          for i, f in enumerate(self.flats)]
        # copies off the compute stream (hf_zero.offload.streams): gradients down, weights up
        self.copies = CopyStream(engine.device)
        self.host_grad_low: Dict[int, torch.Tensor] = {}   # flat -> pinned bf16/fp16 landing buffer
        self._grad_copy: Dict[int, tuple] = {}            # flat -> (event, landed buffer, scale)
        self.staging: Dict[int, torch.Tensor] = {}         # flat -> compute-dtype weights going up
        self._published: Dict[int, CopyEvent] = {}         # flat -> its last upward copy
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_zero-host-step")
        self.pending: List[Future] = []
        self.store: Optional[NvmeSwapStore] = None
        self.scalar_state: Dict[int, dict] = {}  # id(piece.param) -> 0-d states (NVMe)
        self._pipeline: Optional[SwapPipeline] = None  # built at the first NVMe step, then reused
        if device_kind == "nvme":
            self.kinds = ["master"] + elementwise_state_kinds(engine.optimizer)
            sizes = [f.shard_numel if i in self.host_indices else 0 for i, f in enumerate(self.flats)]
            self.offsets, total = region_layout(sizes)
            self.regions = [Region(o, n) for o, n in zip(self.offsets, sizes)]
            self.store = NvmeSwapStore(nvme_path, engine.rank, {k: total for k in self.kinds},
                                       block_size=aio_block_size, threads=aio_threads,
                                       checksums=engine.config.hf_zero.swap_checksums)
            self.buffer_count = max(2, buffer_count)
            for i, f in enumerate(self.flats):  # initial masters go to disk; RAM is released
                if i not in self.host_indices:
                    continue
                self.store.write_from("master", f.master, self.offsets[i])
                f.master_is_shard = False  # a shard that aliased it (fp32) is now a separate copy
                for k in self.kinds[1:]:
                    self.store.write_from(k, torch.zeros(f.shard_numel), self.offsets[i])
                self._detach(i)

    # ---------------------------------------------------------------------------- residency
    def _index(self, flat) -> int:
        for i, f in enumerate(self.flats):
            if f is flat:
                return i
        raise KeyError("not a trainable flat of this engine")

    def _attach(self, i: int, tensors: Dict[str, torch.Tensor]) -> None:
        """Point flat i's master, pieces and optimizer states at ``tensors`` (NVMe)."""
        f = self.flats[i]
        f.master = tensors["master"]
        opt = self.engine.optimizer
        for piece in self.pieces_by_flat.get(i, []):
            piece.param.data = f.master[piece.start : piece.end]
            scalars = self.scalar_state.get(id(piece.param))
            if scalars is None:
                opt.state.pop(piece.param, None)  # never stepped: torch initialises it
            else:
                st = {k: tensors[k][piece.start : piece.end] for k in self.kinds[1:]}
                st.update(scalars)
                opt.state[piece.param] = st

    def _collect(self, i: int, tensors: Dict[str, torch.Tensor]) -> None:
        """After a step: move states torch created into ``tensors`` and remember 0-d ones."""
        opt = self.engine.optimizer
        for piece in self.pieces_by_flat.get(i, []):
            st = opt.state.get(piece.param)
            if not st:
                continue
            scalars = {}
            for k, v in st.items():
                if k in tensors and torch.is_tensor(v) and v.dim() > 0:
                    dst = tensors[k][piece.start : piece.end]
                    if v.data_ptr() != dst.data_ptr():
                        dst.copy_(v.reshape(-1))
                else:
                    scalars[k] = v
            self.scalar_state[id(piece.param)] = scalars

    def _detach(self, i: int) -> None:
        f = self.flats[i]
        f.master = None
        for piece in self.pieces_by_flat.get(i, []):
            piece.param.data = torch.empty(0)
            self.engine.optimizer.state.pop(piece.param, None)

    @contextlib.contextmanager
    def resident(self, flat, write_back: bool = False) -> Iterator[None]:
        """Within the block, ``flat.master`` and its pieces' optimizer states are in RAM."""
        i = self._index(flat)
        if self.store is None or i not in self.host_indices:
            yield
            return
        self.wait()
        tensors = {k: aligned_empty(flat.shard_numel) for k in self.kinds}
        for k in self.kinds:
            self.store.read_into(k, tensors[k], self.offsets[i])
        self._attach(i, tensors)
        try:
            yield
            if write_back:
                self._collect(i, tensors)
                for k in self.kinds:
                    self.store.write_from(k, tensors[k], self.offsets[i])
        finally:
            self._detach(i)

    # ---------------------------------------------------------------------------- the step
    def grads_down(self, indices: Iterable[int], device_grads: Sequence[torch.Tensor], coef: torch.Tensor) -> None:
        """Start copying device gradient shards to the host, off the compute stream (in their
        own dtype: a bf16 / fp16 shard lands in a pinned buffer of that dtype); the step waits for
        each copy, widens it into the fp32 host buffer and scales it by ``coef``."""
        c = coef.to("cpu", torch.float32)
        for i in indices:
            g = device_grads[i]
            dst = self.host_grad[i]
            if g.dtype != torch.float32:
                dst = self.host_grad_low.get(i)
                if dst is None or dst.dtype != g.dtype:
                    dst = self.host_grad_low[i] = torch.empty(g.numel(), dtype=g.dtype, pin_memory=self.pin)
            self._grad_copy[i] = (self.copies.copy(dst, g), dst, c)

    def fence_grads(self) -> None:
        """Compute stream: wait for the gradient copies issued so far before it writes the
        device gradient buffers again (zeroing, the next accumulation). GPU-side only."""
        for event, _, _ in list(self._grad_copy.values()):
            event.wait_compute()

    def _grad_ready(self, i: int) -> None:
        """Worker: flat i's fp32 host gradient, scaled, once its copy has landed."""
        event, landed, c = self._grad_copy[i]
        event.synchronize()
        if landed is not self.host_grad[i]:
            self.host_grad[i].copy_(landed)
        self.host_grad[i].mul_(c)

    # ---------------------------------------------------------------------------- publishing
    def stage(self, i: int, master: torch.Tensor, dtype: torch.dtype, reuse: bool = True) -> torch.Tensor:
        """Worker: flat i's new weights cast to the compute dtype, in a host buffer (pinned with
        CUDA) kept for the next step when ``reuse`` (then the previous copy from it is waited
        for first)."""
        if not reuse:
            return master.to(dtype, copy=True)
        buf = self.staging.get(i)
        if buf is None or buf.dtype != dtype or buf.numel() != master.numel():
            buf = self.staging[i] = torch.empty(master.numel(), dtype=dtype, pin_memory=self.pin)
        else:
            self._published.get(i, DONE).synchronize()
        buf.copy_(master)
        return buf

    def publish(self, i: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy flat i's staged weights ``src`` into its device shard ``dst`` off the compute
        stream (any thread); :meth:`fence_published` orders later device work after it."""
        self._published[i] = self.copies.copy(dst, src)

    def fence_published(self) -> None:
        """Compute stream: wait for every published shard before it reads them (GPU-side)."""
        for event in list(self._published.values()):
            event.wait_compute()

    def _step_resident(self, indices: Sequence[int], view=None) -> None:
        opt = self.engine.optimizer
        for i in indices:
            self._grad_ready(i)
        pieces = [p for i in indices for p in self.pieces_by_flat.get(i, [])]
        for piece in pieces:
            piece.param.grad = self.host_grad[piece.flat_index][piece.start : piece.end]
        step_pieces(opt, pieces, view)
        for piece in pieces:
            piece.param.grad = None

    def _view(self, indices: Sequence[int]):
        """The optimizer view for flats ``indices`` (hyperparameters as of now)."""
        bad = [i for i in indices if i not in self.host_indices]
        if bad:
            raise ValueError(f"flats {bad} are stepped on the device (offload_optimizer.ratio), not on the host")
        return subset_view(self.engine.optimizer, [p for i in indices for p in self.pieces_by_flat.get(i, [])])

    def step(self, indices: Sequence[int], publish, view=None) -> None:
        """Step flats ``indices``; ``publish(i)`` copies flat i's new master to the device (called
        while the master is in RAM; for NVMe, before it is written back). ``view``: the
        optimizer view to step (:meth:`_view`), made now if None."""
        indices = list(indices)
        if view is None:
            view = self._view(indices)
        if self.store is None:
            self._step_resident(indices, view)
            for i in indices:
                publish(i)
            return
        if self._pipeline is None:  # one set of buffers, sized to the largest flat, for every step
            self._pipeline = SwapPipeline(self.store, self.regions, buffer_count=self.buffer_count, kinds=self.kinds)

        def step_fn(j, region, tensors):
            i = indices[j]
            self._attach(i, tensors)
            try:
                self._step_resident([i], view)
                self._collect(i, tensors)
                publish(i)
            finally:
                self._detach(i)

        self._pipeline.run(step_fn, [self.regions[i] for i in indices])

    def submit(self, indices: Sequence[int], publish) -> None:
        """Run :meth:`step` on the worker thread."""
        indices = list(indices)
        self.pending.append(self.executor.submit(self.step, indices, publish, self._view(indices)))

    def wait(self) -> None:
        while self.pending:
            self.pending.pop(0).result()

    def host_bytes(self) -> Dict[str, int]:
        grads = sum(t.numel() * 4 for t in self.host_grad)
        if self.store is not None:
            disk = sum(self.store.numels[k] * 4 for k in self.kinds)
            return {"host_grad_bytes": grads, "nvme_bytes": disk}
        return {"host_grad_bytes": grads}

    def close(self) -> None:
        self.wait()
        self.executor.shutdown(wait=True)
        if self.store is not None:
            self.store.close()
            self.store = None
