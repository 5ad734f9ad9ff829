"""A device-side check of plain varlen metadata, for the calls whose values the host did
not check (``ringflash.validation``): a tensor checked before and possibly refilled behind
its version counter since (``.data``, a numpy view, ``dist.broadcast``), calls traced by
``torch.compile``, CUDA-graph capture, or ``RINGFLASH_CHECK_CU_SEQLENS=0``.

One program reads the metadata (no host sync) and, only if it is invalid, writes NaN over
every output of the call. It runs after the attention kernels on the same stream, so a
bad batch can never come back as a plausible wrong answer; a valid batch costs one small
launch that reads ``batch + 1`` integers per tensor.

The facts are those the host checks: ``cu_seqlens_q`` and ``cu_seqlens_k`` start at 0,
never decrease, end at the token counts (keys in a paged cache: anywhere) and have no
sequence longer than ``max_seqlen``;
``0 <= seqused_k[i] <=`` the sequence's key count.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .common import check_device, next_power_of_2
from .launch import ArgTemplate, PlannedLaunch, PlanTable
from .problem import SeqMeta, meta_signature


@triton.jit
def _poison(ptr, numel, BLOCK: tl.constexpr):
    for start in range(0, numel, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(ptr + offs, tl.full([BLOCK], float("nan"), tl.float32).to(ptr.dtype.element_ty), mask=offs < numel)


@triton.jit
def _varlen_guard_kernel(
    QStarts, QEnds, CuSeqlensK, SequsedK,
    batch, total_q, total_k, max_seqlen_q, max_seqlen_k,
    Out0, numel0, Out1, numel1, Out2, numel2,
    HAS_SEQUSED: tl.constexpr, NUM_OUT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid (1,). QStarts/QEnds are cu_seqlens_q[:-1] / [1:] (unit stride)."""
    bad = (tl.load(QStarts) != 0) | (tl.load(CuSeqlensK) != 0)
    bad = bad | (tl.load(QEnds + batch - 1) != total_q)
    if total_k >= 0:  # -1: keys in a paged cache, whose cu_seqlens_k ends anywhere
        bad = bad | (tl.load(CuSeqlensK + batch) != total_k)
    for b0 in range(0, batch, BLOCK_B):
        idx = b0 + tl.arange(0, BLOCK_B)
        live = idx < batch
        q_lo = tl.load(QStarts + idx, mask=live, other=0)
        q_hi = tl.load(QEnds + idx, mask=live, other=0)
        k_lo = tl.load(CuSeqlensK + idx, mask=live, other=0)
        k_hi = tl.load(CuSeqlensK + idx + 1, mask=live, other=0)
        n_q = q_hi - q_lo
        n_k = k_hi - k_lo
        wrong = (n_q < 0) | (n_q > max_seqlen_q) | (n_k < 0) | (n_k > max_seqlen_k)
        if HAS_SEQUSED:
            used = tl.load(SequsedK + idx, mask=live, other=0)
            wrong = wrong | (used < 0) | (used > n_k)
        bad = bad | (tl.max(tl.where(live & wrong, 1, 0), 0) > 0)
    if bad:
        _poison(Out0, numel0, BLOCK)
        if NUM_OUT > 1:
            _poison(Out1, numel1, BLOCK)
        if NUM_OUT > 2:
            _poison(Out2, numel2, BLOCK)


def _one_block(t: torch.Tensor) -> bool:
    """Whether ``t`` covers exactly the ``numel`` elements from its first one: positive
    strides that, sorted, are those of a contiguous tensor (dims of size 1 aside); an empty
    tensor has nothing to cover."""
    if t.numel() == 0:
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda pair: pair[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def poison_if_invalid(
    meta: SeqMeta, total_q: int, total_k: Optional[int], max_seqlen_q: int, max_seqlen_k: int,
    outputs: Sequence[torch.Tensor],
) -> None:
    """Check plain varlen ``meta`` (one group, no diagonals) on the device; if invalid, fill
    every tensor of ``outputs`` (1-3 tensors, each filling one block of memory from its first
    element: contiguous, or a permutation of a contiguous layout, as gradients laid out like
    transposed inputs are) with NaN. No host sync.
    ``total_k`` None: the keys live in a paged cache (cu_seqlens_k's end is not checked).
    The launch is worked out once per signature (``_PLANS``): a varlen training call runs
    the check in its forward and its backward."""
    if meta.num_groups != 1 or meta.diag is not None:
        raise ValueError("poison_if_invalid: expected plain varlen metadata (one group, no diagonals)")
    key = (meta_signature(meta), total_q, total_k, max_seqlen_q, max_seqlen_k,
           tuple((t.shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0) for t in outputs))
    plan = _PLANS.get(key)
    if plan is None and (not 1 <= len(outputs) <= 3 or not all(_one_block(t) for t in outputs)):
        raise ValueError("poison_if_invalid: expected 1 to 3 outputs, each a dense block of memory")
    check_device(meta.cu_seqlens_k, "cu_seqlens_k")
    batch = meta.batch
    if batch == 0:
        return
    # The kernel takes three outputs (the first one stands in for missing ones).
    outs = list(outputs) + [outputs[0]] * (3 - len(outputs))
    used = meta.seqused_k if meta.seqused_k is not None else meta.cu_seqlens_k
    if plan is None:
        plan = _PLANS.keep(key, (ArgTemplate((
            meta.q_starts, meta.q_ends, meta.cu_seqlens_k, used,
            batch, total_q, -1 if total_k is None else total_k, max_seqlen_q, max_seqlen_k,
            outs[0], outs[0].numel(), outs[1], outs[1].numel(), outs[2], outs[2].numel(),
        )), PlannedLaunch(_varlen_guard_kernel, dict(
            HAS_SEQUSED=meta.seqused_k is not None, NUM_OUT=len(outputs),
            BLOCK_B=min(1024, max(16, next_power_of_2(batch))), BLOCK=1024))))
    args, launch = plan
    # The tensors in the order of the kernel's pointer arguments (the template's).
    launch((1, 1, 1), args.fill((meta.q_starts, meta.q_ends, meta.cu_seqlens_k, used, outs[0], outs[1], outs[2])))


#: ``poison_if_invalid``'s (argument template, launch) by signature.
_PLANS = PlanTable()
