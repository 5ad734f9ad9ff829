"""The dropout keep mask as a tensor, for ``return_attn_probs`` (flash-attn's ``S_dmask``,
a testing aid): the same draws as the attention kernels (``common.dropout_keep``),
so the mask returned is the one the forward and backward applied."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, check_device, dropout_keep
from .launch import fast_launch
from .problem import dropout_args


@triton.jit
def _dropout_mask_kernel(
    Keep, rows, cols, nheads, first_sequence, dropout_threshold, dropout_seed,
    stride_b, stride_h, stride_r,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid (batch * nheads, cdiv(rows, BLOCK_R), cdiv(cols, BLOCK_C)): batch x heads on axis
    0, whose limit is 2**31 - 1 (axes 1 and 2 stop at 65535). Keep (batch, nheads, rows, cols)
    int8; entry (z, i, j) is sequence first_sequence + z // nheads, head z % nheads."""
    z = tl.program_id(0)
    b = first_sequence + z // nheads
    h = z % nheads
    r0 = tl.program_id(1) * BLOCK_R
    offs_r = r0 + tl.arange(0, BLOCK_R)
    n0 = tl.program_id(2) * BLOCK_C
    offs_c = n0 + tl.arange(0, BLOCK_C)
    keep = dropout_keep(dropout_seed, b, h, r0, n0, dropout_threshold, BLOCK_R, BLOCK_C, False)
    ptrs = (Keep + (z // nheads).to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
            + offs_r[:, None].to(tl.int64) * stride_r + offs_c[None, :])
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_r[:, None] < rows) & (offs_c[None, :] < cols))


def dropout_keep_mask(
    batch: int, nheads: int, rows: int, cols: int, dropout_p: float, seed: int, device: torch.device,
    first_sequence: int = 0,
) -> torch.Tensor:
    """bool (batch, nheads, rows, cols): whether the attention kernels keep the probability of
    query row i and key j of sequence ``first_sequence + b``, head h, for this seed."""
    keep = torch.empty((batch, nheads, rows, cols), dtype=torch.int8, device=device)
    if keep.numel() == 0:
        return keep.bool()
    check_device(keep, "q")
    block = 32
    grid = (batch * nheads, cdiv(rows, block), cdiv(cols, block))
    _dropout_mask_kernel[grid](
        keep, rows, cols, nheads, first_sequence, *dropout_args((dropout_p, seed))[::2],
        keep.stride(0), keep.stride(1), keep.stride(2), BLOCK_R=block, BLOCK_C=block,
    )
    return keep.bool()


@triton.jit
def _dropout_keys_kernel(Keys, nheads, dropout_seed):
    """Grid (batch * nheads,): entry z = b * nheads + h of Keys (int32 (batch * nheads, 2))
    gets the two Philox words ``common.dropout_keep`` derives its row and key words from for
    sequence b, head h (stored bit for bit)."""
    z = tl.program_id(0)
    key_r, key_c, _, _ = tl.philox(dropout_seed, z // nheads, z % nheads, 0, 0)
    tl.store(Keys + 2 * z, key_r.to(tl.int32, bitcast=True))
    tl.store(Keys + 2 * z + 1, key_c.to(tl.int32, bitcast=True))


def dropout_keys(batch: int, nheads: int, seed: int, device: torch.device) -> torch.Tensor:
    """int32 (batch, nheads, 2): the per-(sequence, head) Philox words of the dropout mask
    (``common.dropout_keep``), for kernels that build the mask from them without calling
    Philox themselves (the Gluon kernels of ``kernels.sm90``). One launch per call."""
    keys = torch.empty((batch, nheads, 2), dtype=torch.int32, device=device)
    if keys.numel():
        fast_launch(_dropout_keys_kernel, (batch * nheads, 1, 1), (keys, nheads, int(seed)), {})
    return keys
