"""The Ulysses engine (DeepSpeed-Ulysses, USP): all-to-all from tokens to heads, attention
over every token of a subset of heads, all-to-all back.

Each of the W ranks of the Ulysses group holds its tokens (a contiguous slice of a stream,
in rank order) of every head. One all-to-all of the packed q, k, v gives each rank the
whole stream for ``nheads / W`` query heads and their KV heads; an *inner* attention runs
on them; one all-to-all brings the output (and lse) back to the tokens' owners. Ranks may
hold different numbers of tokens (uneven splits; nothing is padded).

Inner attention: the unsplit varlen kernel over all documents (``LocalInner``, strategy
ulysses), or the all-gather engine over the ranks that hold the same heads in the other
Ulysses groups (``AllGatherInner``, strategy hybrid).

KV heads: with ``nheads_k % W == 0`` they are sharded like the query heads. With
``W % nheads_k == 0`` each rank receives the one KV head its query heads use (query heads
``[r * nheads / W, (r + 1) * nheads / W)`` of rank r read KV head ``r // (W / nheads_k)``),
as DeepSpeed does; the backward computes each rank's dK/dV in float32 and sums the
contributions of the ranks that share a head. The backward is the forward in reverse: dout
to heads, the inner backward, dq/dk/dv back to tokens, gradients in the inputs' dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..autograd import refuse_double_backward
from ..kernels.problem import SeqMeta
from . import profile
from .comm import Comm
from .engines import AllGatherSpec, allgather_backward, allgather_forward
from .local import LocalParams, local_backward, local_forward


@dataclass(frozen=True)
class HeadSplit:
    """How the heads of one call split over a Ulysses group of ``degree`` ranks."""

    degree: int
    nheads: int
    nheads_k: int

    @property
    def q_local(self) -> int:
        return self.nheads // self.degree

    @property
    def replicated(self) -> bool:
        """KV heads fewer than the ranks: each rank gets the one its query heads use."""
        return self.nheads_k % self.degree != 0

    @property
    def kv_local(self) -> int:
        return 1 if self.replicated else self.nheads_k // self.degree


def check_heads(nheads: int, nheads_k: int, degree: int, what: str) -> HeadSplit:
    """The head split over ``degree`` ranks (``what`` names the degree in errors), or a
    ValueError naming the numbers."""
    if nheads % degree != 0:
        raise ValueError(f"q: nheads={nheads} is not divisible by {what}={degree}; expected a multiple "
                         "(Ulysses gives each rank nheads / its degree query heads)")
    if nheads_k % degree != 0 and degree % nheads_k != 0:
        raise ValueError(f"k: nheads_k={nheads_k} neither divides nor is a multiple of {what}={degree}; expected "
                         "one of the two (KV heads sharded, or replicated to the ranks that share them)")
    return HeadSplit(degree, nheads, nheads_k)


def _to_heads(comm: Comm, counts: list[int], heads: HeadSplit, q: torch.Tensor,
              k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Local (n, nheads, d) q [and (n, nheads_k, d) k, v] -> (sum(counts), q_local [+ 2 kv_local], d):
    the whole stream of this rank's heads, packed q | k | v along the head axis."""
    w, n, d = comm.world_size, q.shape[0], q.shape[2]
    hq, hk = heads.q_local, heads.kv_local if k is not None else 0
    send = q.new_empty((w, n, hq + 2 * hk, d))  # destination-major
    send[:, :, :hq] = q.unflatten(1, (w, hq)).transpose(0, 1)
    for i, t in enumerate((k, v) if k is not None else ()):
        dst = send[:, :, hq + i * hk:hq + (i + 1) * hk]
        if heads.replicated:  # ranks s = g * share + t, t < share, all get KV head g
            dst.unflatten(0, (heads.nheads_k, w // heads.nheads_k)).copy_(t.transpose(0, 1)[:, None, :, None])
        else:
            dst.copy_(t.unflatten(1, (w, hk)).transpose(0, 1))
    recv = send.new_empty((sum(counts),) + tuple(send.shape[2:]))
    comm.all_to_all(recv, send.view(w * n, *send.shape[2:]), list(counts), [n] * w).wait()
    return recv


def _to_tokens(comm: Comm, counts: list[int], y: torch.Tensor, n: int) -> tuple:
    """Start sending rows of ``y`` (sum(counts), ...) (this rank's heads, whole stream) back to
    their owners. Returns (work, recv): recv (W, n, ...) holds, at [s], head block s of this
    rank's n tokens once the work completes."""
    y = y.contiguous()
    recv = y.new_empty((comm.world_size * n,) + tuple(y.shape[1:]))
    work = comm.all_to_all(recv, y, [n] * comm.world_size, list(counts))
    return work, recv.view(comm.world_size, n, *y.shape[1:])


def _heads_major(recv: torch.Tensor) -> torch.Tensor:
    """(W, n, c, d) head blocks -> (n, W * c, d), contiguous."""
    w, n, c, d = recv.shape
    return recv.permute(1, 0, 2, 3).reshape(n, w * c, d)


class LocalInner:
    """Strategy ulysses: the plain varlen kernel over every document of the stream."""

    def __init__(self, meta: SeqMeta, max_len: int, params: LocalParams, profiler=profile.OFF):
        self.meta, self.max_len, self.params, self.profiler = meta, max_len, params, profiler

    def forward(self, q, k, v) -> tuple:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
        with self.profiler.span("attention", q.device):
            local_forward(q, k, v, self.meta, self.params, self.max_len, self.max_len, out=out, lse=lse)
        return out, lse, (q, k, v, out, lse), None

    def backward(self, saved: tuple, setup, dout, dq, dk, dv) -> None:
        q, k, v, out, lse = saved
        with self.profiler.span("attention", q.device):
            local_backward(dout, q, k, v, out, lse, self.meta, self.params, self.max_len, self.max_len,
                           dq=dq, dk=dk, dv=dv)


class AllGatherInner:
    """Strategy hybrid: the all-gather engine (``spec``) across the Ulysses groups."""

    def __init__(self, spec: AllGatherSpec, params: LocalParams, comm: Comm, stride: int, mode: str, keep: bool):
        self.args = (spec, params, comm, stride, mode, keep)

    def forward(self, q, k, v) -> tuple:
        return allgather_forward(q, k, v, *self.args)

    def backward(self, saved: tuple, setup, dout, dq, dk, dv) -> None:
        allgather_backward(saved, setup, dout, dq, dk, dv)


class UlyssesAttention(torch.autograd.Function):
    """out (n, nheads, d), lse (nheads, n) float32 (empty unless ``need_lse``) of this
    rank's n tokens; ``counts``: the tokens of each rank of ``comm``, in stream order."""

    @staticmethod
    def forward(ctx, q, k, v, counts: list[int], comm: Comm, inner, heads: HeadSplit, need_lse: bool):
        with comm.profiler.pass_("forward"):
            return UlyssesAttention._forward(ctx, q, k, v, counts, comm, inner, heads, need_lse)

    @staticmethod
    def _forward(ctx, q, k, v, counts: list[int], comm: Comm, inner, heads: HeadSplit, need_lse: bool):
        n = q.shape[0]
        hq, hk = heads.q_local, heads.kv_local
        qkv = _to_heads(comm, counts, heads, q, k, v)
        out_h, lse_h, saved, setup = inner.forward(qkv[:, :hq], qkv[:, hq:hq + hk], qkv[:, hq + hk:])
        work, recv = _to_tokens(comm, counts, out_h, n)
        if need_lse:
            lse_work, lse_recv = _to_tokens(comm, counts, lse_h.t(), n)  # (W, n, hq)
            lse_work.wait()
            lse = lse_recv.permute(0, 2, 1).reshape(heads.nheads, n)
        else:
            lse = lse_h.new_empty(0)
        work.wait()
        out = _heads_major(recv)
        ctx.save_for_backward(*saved)
        ctx.setup = (counts, comm, inner, heads, setup, k.dtype)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        refuse_double_backward()
        with ctx.setup[1].profiler.pass_("backward"):
            return UlyssesAttention._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        counts, comm, inner, heads, setup, kv_dtype = ctx.setup
        n, _, d = dout.shape
        hq, hk = heads.q_local, heads.kv_local
        dout_h = _to_heads(comm, counts, heads, dout)
        total = dout_h.shape[0]
        # Shared KV heads: every rank's part in float32, summed below, rounded once.
        dkv_dtype = torch.float32 if heads.replicated else kv_dtype
        if dkv_dtype == dout.dtype:
            grads = dout_h.new_empty((total, hq + 2 * hk, d))  # one all-to-all back
            dq_h, dkv_h = grads[:, :hq], grads[:, hq:]
        else:
            dq_h = dout_h.new_empty((total, hq, d))
            dkv_h = torch.empty((total, 2 * hk, d), dtype=dkv_dtype, device=dout.device)
        inner.backward(ctx.saved_tensors, setup, dout_h, dq_h, dkv_h[:, :hk], dkv_h[:, hk:])
        if dkv_dtype == dout.dtype:
            work, recv = _to_tokens(comm, counts, grads, n)
            work.wait()
            recv_q, recv_kv = recv[:, :, :hq], recv[:, :, hq:]
        else:
            work_q, recv_q = _to_tokens(comm, counts, dq_h, n)
            work, recv_kv = _to_tokens(comm, counts, dkv_h, n)
            work_q.wait()
            work.wait()
        dq = _heads_major(recv_q)
        if heads.replicated:  # (W, n, 2, d): sum the parts of the ranks that share each KV head
            share = comm.world_size // heads.nheads_k
            summed = recv_kv.unflatten(0, (heads.nheads_k, share)).sum(1)  # (nheads_k, n, 2, d)
            dk, dv = (summed[:, :, i].transpose(0, 1).to(kv_dtype, memory_format=torch.contiguous_format)
                      for i in (0, 1))
        else:
            dk, dv = _heads_major(recv_kv[:, :, :hk]), _heads_major(recv_kv[:, :, hk:])
        return dq, dk, dv, None, None, None, None, None
