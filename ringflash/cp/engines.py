"""The two execution engines of context-parallel attention. Strategies differ only in the
token layout and in the metadata their Plan feeds these engines.

* All-gather (llama3, zigzag_llama3): K/V are all-gathered ``heads_k_stride`` KV heads at
  a time into a double buffer, the next chunk's all-gather overlapping the current chunk's
  attention; the gathered keys are put in global sequence order and the local queries
  attend to them in one launch (several query groups for zigzag_llama3: the grouped
  kernels). The backward gathers K/V again the same way, computes dK/dV of the gathered
  buffer in float32 and reduce-scatters them to their owners, overlapped likewise.
* Ring (ring, zigzag_ring, stripe): K/V travel around the ring by P2P while each rank
  attends to the block it holds; the partial results merge through their lse in float32.
  The backward sends K/V around again, with a float32 dK/dV accumulator travelling beside
  each block until it is back at its owner; dQ accumulates locally in float32.

Gradients come back in the inputs' dtypes. The all-gather engine's forward and backward
are also plain functions (``allgather_forward``, ``allgather_backward``): the Ulysses engine
(``ulysses``) runs them across its groups for the hybrid strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..autograd import refuse_double_backward
from ..kernels.bwd import prepare_backward
from ..kernels.problem import SeqMeta
from .comm import Comm, settled_on_error, wait_all
from .local import LocalParams, local_backward, local_forward
from .merge import merge_partial_


@dataclass(frozen=True)
class LocalKeys:
    """The local-first split's first part: this rank's queries against its own keys, a plain
    varlen call over the local buffer (each document's local rows in position order, so a
    causal mask in local order is the global one)."""

    meta: SeqMeta
    max_len: int


@dataclass(frozen=True)
class AllGatherSpec:
    """Local attention against the gathered keys.

    The all-gather produces a rank-major buffer of ``world * n_max`` rows (each rank's
    local tokens, padded to ``n_max``). ``key_index`` (int64, rows of that buffer in global
    order) selects the keys ``meta`` describes; without it, ``key_slice`` of the buffer is
    already in order (equal-sized contiguous shards, llama3).

    ``local`` (the local-first split): the queries attend to their own rank's keys first
    (``local``, no communication, while the all-gather runs), then to the other ranks' keys
    (``meta`` and ``key_index`` then select only those), and the two partial results merge
    in float32.
    """

    meta: SeqMeta
    n_max: int
    max_q: int
    max_k: int
    key_index: Optional[torch.Tensor] = None
    key_slice: Optional[slice] = None  # with key_index None: the rows to use (None: all)
    local: Optional[LocalKeys] = None


@dataclass(frozen=True)
class RingStep:
    """Attention of the local queries to the K/V block held at one ring step."""

    meta: SeqMeta
    max_q: int
    max_k: int
    skip: bool  # no entry sees any key: nothing to compute
    covers_all: bool  # every local query row belongs to an entry


def _pack_kv(k: torch.Tensor, v: torch.Tensor, stride: int, n_max: int) -> torch.Tensor:
    """(chunks, n_max, 2, stride, d): KV-head chunk c of k and v in ``packed[c]``, contiguous
    (an all-gather or P2P buffer); rows past n are zero. One stacking copy with a single
    chunk, else one copy each of k and v. The backward reuses it (saved instead of k and v,
    the same memory) rather than packing again."""
    n, hk, d = k.shape
    chunks = hk // stride
    buf = k.new_empty((chunks, n_max, 2, stride, d))
    if chunks == 1:
        # One stacking copy instead of two strided ones: 30-40 us less per forward on
        # 2x H200 (docs/benchmarks.md, run 21).
        torch.stack((k, v), dim=1, out=buf[0, :n])
    else:
        buf[:, :n, 0] = k.unflatten(1, (chunks, stride)).transpose(0, 1)
        buf[:, :n, 1] = v.unflatten(1, (chunks, stride)).transpose(0, 1)
    if n < n_max:
        buf[:, n:].zero_()
    return buf


def _ordered_keys(buf: torch.Tensor, spec: AllGatherSpec) -> torch.Tensor:
    flat = buf.view(-1, *buf.shape[2:])
    if spec.key_index is not None:
        return flat.index_select(0, spec.key_index)
    return flat[spec.key_slice] if spec.key_slice is not None else flat


class _AllGather:
    """Double-buffered, head-chunked all-gather of packed K/V (``_pack_kv``'s layout)."""

    def __init__(self, comm: Comm, packed: torch.Tensor, spec: AllGatherSpec):
        self.comm, self.packed, self.spec = comm, packed, spec
        self.chunks = packed.shape[0]
        self.pending: dict[int, tuple] = {}

    def start(self, c: int) -> None:
        if c >= self.chunks:
            return
        send = self.packed[c]
        recv = send.new_empty((self.comm.world_size * self.spec.n_max,) + tuple(send.shape[1:]))
        self.pending[c] = (self.comm.all_gather(recv, send), recv)

    def keys(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gathered (k, v) of head chunk c in global key order; starts chunk c + 1's gather."""
        work, recv = self.pending.pop(c)
        work.wait()
        self.start(c + 1)
        kv = _ordered_keys(recv.view(self.comm.world_size, self.spec.n_max, *recv.shape[1:]), self.spec)
        return kv[:, 0], kv[:, 1]


def allgather_forward(q, k, v, spec: AllGatherSpec, params: LocalParams, comm: Comm, stride: int, mode: str,
                      keep_gathered: bool = False) -> tuple:
    """The all-gather engine's forward: (out, lse, saved tensors, setup) for ``allgather_backward``."""
    n, h, _ = q.shape
    hk = k.shape[1]
    qh = h // hk * stride  # query heads per KV-head chunk
    local = spec.local
    # Local-first: both parts' partial results in float32, merged into out_acc.
    out_acc = torch.empty(q.shape, dtype=torch.float32 if local else q.dtype, device=q.device)
    lse = torch.empty(h, n, dtype=torch.float32, device=q.device)
    if local is not None:
        out_remote, lse_remote = torch.empty_like(out_acc), torch.empty_like(lse)
    packed = _pack_kv(k, v, stride, spec.n_max)
    gather = _AllGather(comm, packed, spec)
    prof = comm.profiler
    with prof.pass_("forward"):
        gather.start(0)
        # keep_gathered: the backward reuses the ordered K/V instead of gathering again,
        # trading world_size x the local K/V per call for the re-gather's time.
        kept: list[torch.Tensor] = []
        for c in range(gather.chunks):
            prof.step = c if gather.chunks > 1 else None
            rows = slice(c * qh, (c + 1) * qh)
            if local is not None:  # while chunk c's gather runs
                with prof.span("attention (own keys)", q.device):
                    local_forward(q[:, rows], packed[c, :n, 0], packed[c, :n, 1], local.meta, params,
                                  local.max_len, local.max_len, out=out_acc[:, rows], lse=lse[rows])
            kc, vc = gather.keys(c)
            part_out, part_lse = (out_remote, lse_remote) if local is not None else (out_acc, lse)
            with prof.span("attention", q.device):
                local_forward(q[:, rows], kc, vc, spec.meta, params, spec.max_q, spec.max_k,
                              out=part_out[:, rows], lse=part_lse[rows], mode=mode)
            if local is not None:
                with prof.span("merge", q.device):
                    merge_partial_(out_acc[:, rows], lse[rows], out_remote[:, rows], lse_remote[rows])
            if keep_gathered:
                kept += [kc, vc]
    out = out_acc.to(q.dtype) if local is not None else out_acc
    return out, lse, (q, packed, out, lse, *kept), (spec, params, comm, mode, k.shape, k.dtype, v.dtype)


def allgather_backward(saved: tuple, setup: tuple, dout: torch.Tensor, dq: Optional[torch.Tensor] = None,
                       dk: Optional[torch.Tensor] = None, dv: Optional[torch.Tensor] = None) -> tuple:
    """(dq, dk, dv) of ``allgather_forward``'s call, written into the given buffers (views,
    or float32 dk/dv, allowed) or new ones in the inputs' dtypes."""
    q, packed, out, lse, *kept = saved
    spec, params, comm, mode, k_shape, k_dtype, v_dtype = setup
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k_shape, dtype=k_dtype, device=q.device) if dk is None else dk
    dv = torch.empty(k_shape, dtype=v_dtype, device=q.device) if dv is None else dv
    dout = dout.contiguous()
    gather = _AllGather(comm, packed, spec)
    with comm.profiler.pass_("backward"):
        _allgather_backward_steps(gather, kept, spec, params, comm, mode, q, out, lse, dout, dq, dk, dv)
    return dq, dk, dv


def _allgather_backward_steps(gather, kept, spec, params, comm, mode, q, out, lse, dout, dq, dk, dv) -> None:
    """The backward's work, one head chunk at a time (``allgather_backward``)."""
    n, h = q.shape[0], q.shape[1]
    chunks, stride = gather.chunks, gather.packed.shape[3]
    qh = h // (chunks * stride) * stride
    prof = comm.profiler
    if not kept:
        gather.start(0)  # the first re-gather overlaps the preprocessing
    prob = params.problem(q, gather.packed[0, :, 0], spec.meta, spec.max_q, spec.max_k)
    with prof.span("prepare", q.device):
        delta, lse2 = prepare_backward(dout, out, lse, prob)
    # dK/dV of the gathered keys, float32, in the all-gather's rank-major layout: the
    # kernel writes key i to row key_index[i] (no reordering copy), and the buffer is
    # reduce-scattered to the owners as it is. With key_index every real row is written;
    # padding rows are summed and never read. A key_slice leaves other ranks' rows zero.
    rows_total = comm.world_size * spec.n_max
    local = spec.local
    if local is not None:  # the two parts' dq in float32, summed at the end
        dq_parts = torch.empty((2,) + tuple(q.shape), dtype=torch.float32, device=q.device)
    scattering: list = []
    for c in range(gather.chunks):
        prof.step = c if gather.chunks > 1 else None
        rows = slice(c * qh, (c + 1) * qh)
        heads = slice(c * stride, (c + 1) * stride)
        if spec.key_index is not None:
            full = torch.empty((rows_total, 2, stride, q.shape[2]), dtype=torch.float32, device=q.device)
            dkv = full
            if local is not None:
                # dK/dV from this rank's own queries go straight to its own rows of the
                # buffer (the other part writes only the other ranks' rows), before the
                # re-gathered keys are needed.
                me = comm.rank * spec.n_max
                own = full[me:me + n]
                with prof.span("attention (own keys)", q.device):
                    local_backward(dout[:, rows], q[:, rows], gather.packed[c, :n, 0], gather.packed[c, :n, 1],
                                   out[:, rows], lse[rows], local.meta, params, local.max_len, local.max_len,
                                   dq=dq_parts[0][:, rows], dk=own[:, 0], dv=own[:, 1],
                                   prepared=(delta[rows], lse2[rows]))
        else:
            full = torch.zeros((rows_total, 2, stride, q.shape[2]), dtype=torch.float32, device=q.device)
            dkv = full[spec.key_slice] if spec.key_slice is not None else full

        def scatter_dkv(full=full, heads=heads):
            mine = full.new_empty((spec.n_max,) + tuple(full.shape[1:]))
            scattering.append((comm.reduce_scatter(mine, full), mine, full, heads))

        kc, vc = (kept[2 * c], kept[2 * c + 1]) if kept else gather.keys(c)
        with prof.span("attention", q.device):
            local_backward(dout[:, rows], q[:, rows], kc, vc, out[:, rows], lse[rows], spec.meta, params,
                           spec.max_q, spec.max_k, dq=(dq_parts[1] if local is not None else dq)[:, rows],
                           dk=dkv[:, 0], dv=dkv[:, 1],
                           prepared=(delta[rows], lse2[rows]), mode=mode, after_dkdv=scatter_dkv,
                           dkv_rows=spec.key_index)
        _finish_scatter(scattering, dk, dv, keep=1)
    prof.step = None
    if local is not None:
        dq.copy_(dq_parts[0].add_(dq_parts[1]))
    _finish_scatter(scattering, dk, dv, keep=0)


class AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: AllGatherSpec, params: LocalParams, comm: Comm, stride: int, mode: str,
                keep_gathered: bool = False):
        out, lse, saved, ctx.setup = allgather_forward(q, k, v, spec, params, comm, stride, mode, keep_gathered)
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        refuse_double_backward()
        dq, dk, dv = allgather_backward(ctx.saved_tensors, ctx.setup, dout)
        return dq, dk, dv, None, None, None, None, None, None


def _finish_scatter(scattering: list, dk: torch.Tensor, dv: torch.Tensor, keep: int) -> None:
    """Complete all but the last ``keep`` reduce-scatters, writing their heads of dk/dv."""
    while len(scattering) > keep:
        work, mine, _, heads = scattering.pop(0)
        work.wait()
        n = dk.shape[0]
        dk[:, heads].copy_(mine[:n, 0])
        dv[:, heads].copy_(mine[:n, 1])


def _pass_block_on(comm: Comm, kv: torch.Tensor, more: bool) -> tuple[list, Optional[torch.Tensor]]:
    """Start sending the K/V block to the next rank and receiving the previous rank's (the
    next step's), unless this is the last step: (work handles, the receive buffer)."""
    if not more:
        return [], None
    nxt = torch.empty_like(kv)
    return comm.ring_exchange(kv, nxt), nxt


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, steps: list, n_max: int, params: LocalParams, comm: Comm):
        n, h, d = q.shape
        out_acc = torch.zeros(n, h, d, dtype=torch.float32, device=q.device)
        lse_acc = torch.full((h, n), float("-inf"), dtype=torch.float32, device=q.device)
        kv = own = _pack_kv(k, v, k.shape[1], n_max)[0]
        prof = comm.profiler
        # The exchange in flight, waited for if a step raises. Only the current one: a work
        # handle keeps its buffers alive, so keeping every step's would hold all W blocks.
        posted: list = []
        with prof.pass_("forward"), settled_on_error(posted):
            for s, step in enumerate(steps):
                prof.step = s
                works, nxt = _pass_block_on(comm, kv, s + 1 < len(steps))
                posted[:] = works
                if not step.skip:
                    # Rows no entry covers must read as "no key seen" (0, -inf) in the merge.
                    out_s = torch.empty(n, h, d, dtype=torch.float32, device=q.device)
                    lse_s = torch.empty(h, n, dtype=torch.float32, device=q.device)
                    if not step.covers_all:
                        out_s.zero_()
                        lse_s.fill_(float("-inf"))
                    with prof.span("attention", q.device):
                        local_forward(q, kv[:, 0], kv[:, 1], step.meta, params, step.max_q, step.max_k,
                                      out=out_s, lse=lse_s)
                    with prof.span("merge", q.device):
                        merge_partial_(out_acc, lse_acc, out_s, lse_s)
                wait_all(works)
                kv = nxt if nxt is not None else kv
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, own, out, lse_acc)
        ctx.setup = (steps, params, comm, k.shape[0], k.dtype, v.dtype)
        ctx.mark_non_differentiable(lse_acc)
        return out, lse_acc

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, kv, out, lse = ctx.saved_tensors
        refuse_double_backward()
        steps, params, comm, n_k, k_dtype, v_dtype = ctx.setup
        dout = dout.contiguous()
        with comm.profiler.pass_("backward"):
            dq_acc, dkv = _ring_backward_steps(steps, params, comm, q, kv, out, lse, dout)
        dk = dkv[:n_k, 0].to(k_dtype, memory_format=torch.contiguous_format)
        dv = dkv[:n_k, 1].to(v_dtype, memory_format=torch.contiguous_format)
        return dq_acc.to(q.dtype), dk, dv, None, None, None, None


def _ring_backward_steps(steps: list, params: LocalParams, comm: Comm, q, kv, out, lse, dout) -> tuple:
    """The ring backward's steps: (dq float32, this rank's float32 dK/dV block)."""
    n, h, d = q.shape
    prof = comm.profiler
    prob = params.problem(q, kv[:, 0], steps[0].meta, steps[0].max_q, steps[0].max_k)
    with prof.span("prepare", q.device):
        prepared = prepare_backward(dout, out, lse, prob)
    dq_acc = torch.zeros(n, h, d, dtype=torch.float32, device=q.device)
    # The float32 dK/dV accumulator of the block held at step s arrives from the previous
    # rank while step s computes; after the last step, the one that arrives is our own.
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
    incoming: Optional[tuple] = None
    posted: list = []  # the exchanges in flight (as in the forward), waited for if a step raises
    with settled_on_error(posted):
        for s, step in enumerate(steps):
            prof.step = s
            works, nxt = _pass_block_on(comm, kv, s + 1 < len(steps))
            posted[:] = works + (incoming[0] if incoming is not None else [])
            dkv_s = None
            if not step.skip:
                dq_s = (torch.zeros if not step.covers_all else torch.empty)(n, h, d, dtype=torch.float32,
                                                                            device=q.device)
                dkv_s = torch.empty_like(dkv)  # rows past the block's tokens stay unwritten and unread
                with prof.span("attention", q.device):
                    local_backward(dout, q, kv[:, 0], kv[:, 1], out, lse, step.meta, params, step.max_q, step.max_k,
                                   dq=dq_s, dk=dkv_s[:, 0], dv=dkv_s[:, 1], prepared=prepared)
                dq_acc.add_(dq_s)
            if incoming is not None:
                wait_all(incoming[0])
                dkv = incoming[1]
            if dkv_s is not None:
                dkv.add_(dkv_s)
            if comm.world_size > 1:
                dkv_next = torch.empty_like(dkv)
                incoming = (comm.ring_exchange(dkv, dkv_next), dkv_next)
                posted[:] = works + incoming[0]
            wait_all(works)
            kv = nxt if nxt is not None else kv
        prof.step = None
        if incoming is not None:
            wait_all(incoming[0])
            dkv = incoming[1]
    return dq_acc, dkv
