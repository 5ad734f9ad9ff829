"""Grouped attention: several query groups attend to different prefixes of one K/V buffer,
in one launch per kernel.

Group g has its own packed queries ``q_list[g]`` (total_q_g, nheads, d) laid out by
``cu_seqlens_q_list[g]``. All groups share ``k``, ``v`` (total_k, nheads_k, d) laid out by
``cu_seqlens_k``. For sequence i, group g attends to the first ``seqused_k_list[g][i]``
keys of that sequence, ``k[cu_seqlens_k[i] : cu_seqlens_k[i] + seqused_k_list[g][i]]``,
with causal masks and windows aligned to the bottom right *within that prefix*.

This is the local step of zigzag context parallelism: rank r holds chunks r and 2W-1-r of
every sequence, and after the K/V all-gather chunk c attends causally to the sequence's
first (c+1)·L/(2W) keys (``zigzag_group_ranges`` builds those ranges).

Implementation: the varlen kernels with a group axis (``ringflash.kernels.problem.SeqMeta``).
The forward and dQ kernels launch the last group's programs (under zigzag, the heavier
chunk's) over all heads and sequences first, so that the other group's shorter programs
fill the launch's tail (``configs.KernelConfig.group_order``; docs/benchmarks.md compares
this with the other orders); the dK/dV kernel adds
every group's contribution for a key block in one program (no atomics, deterministic);
dQ is computed per group.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import validation as V
from .autograd import apply_flash_attn
from .kernels.problem import SeqMeta


def _check_groups(q_list, cu_seqlens_q_list, seqused_k_list, max_seqlen_q_list) -> int:
    if not isinstance(q_list, (list, tuple)) or len(q_list) == 0:
        raise TypeError(f"q_list: expected a non-empty list of tensors, got {type(q_list).__name__}")
    groups = len(q_list)
    for name, value in (("cu_seqlens_q_list", cu_seqlens_q_list), ("seqused_k_list", seqused_k_list),
                        ("max_seqlen_q_list", max_seqlen_q_list)):
        if not isinstance(value, (list, tuple)) or len(value) != groups:
            got = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
            raise ValueError(f"{name}: expected a list of {groups} entries (one per group in q_list), got {got}")
    return groups


def grouped_flash_attn_varlen_func(
    q_list: Sequence[torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q_list: Sequence[torch.Tensor],
    cu_seqlens_k: torch.Tensor,
    seqused_k_list: Sequence[Optional[torch.Tensor]],
    max_seqlen_q_list: Sequence[int],
    max_seqlen_k: int,
    softmax_scale: Optional[float] = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Attention of G query groups against prefixes of one shared K/V buffer.

    Args:
        q_list: G tensors (total_q_g, nheads, headdim).
        k, v: (total_k, nheads_k, headdim), sequences laid out by cu_seqlens_k (batch + 1,) int32.
        cu_seqlens_q_list: G int32 (batch + 1,) tensors; group g's sequence i is
            q_list[g][cu[i]:cu[i+1]] (it may be empty).
        seqused_k_list: G int32 (batch,) tensors, or None for "all keys": the prefix
            length of each sequence that group g sees (0 allowed).
        max_seqlen_q_list: G ints, the longest sequence of each group; max_seqlen_k an int.
    Returns:
        out_list: G tensors (total_q_g, nheads, headdim), views of one output buffer.
        lse_list: G float32 tensors (nheads, total_q_g), natural log, -inf for rows that see
            no key; views into one (nheads, sum total_q_g) buffer.
    Differentiable with respect to every q, k and v.
    """
    groups = _check_groups(q_list, cu_seqlens_q_list, seqused_k_list, max_seqlen_q_list)
    for name, value in [("max_seqlen_k", max_seqlen_k)] + [(f"max_seqlen_q_list[{g}]", m)
                                                          for g, m in enumerate(max_seqlen_q_list)]:
        if value is None:
            raise TypeError(f"{name}: expected an int, got None")
    max_q = []
    for g in range(groups):
        try:
            shape = V.check_varlen_qkv(
                q_list[g], k, v, cu_seqlens_q_list[g], cu_seqlens_k, max_seqlen_q_list[g], max_seqlen_k,
                seqused_k_list[g],
            )
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"group {g}: {exc}") from None
        max_q.append(shape.max_seqlen_q)
        if g > 0 and (q_list[g].shape[1:] != q_list[0].shape[1:] or q_list[g].dtype != q_list[0].dtype):
            raise ValueError(
                f"q_list[{g}]: (nheads, headdim, dtype) = ({tuple(q_list[g].shape[1:])}, {q_list[g].dtype}) differs "
                f"from q_list[0]'s ({tuple(q_list[0].shape[1:])}, {q_list[0].dtype}); expected the same"
            )
    # As flash_attn_varlen_func: a window side of at least max_seqlen_k keys is unbounded.
    left, right = V.window_within(*V.check_window(window_size), shape.max_seqlen_k)
    softcap = V.check_softcap(softcap)
    scale = V.resolve_softmax_scale(softmax_scale, shape.headdim)
    causal = V.as_bool("causal", causal)

    sizes = [q.shape[0] for q in q_list]
    offsets = [sum(sizes[:g]) for g in range(groups)]
    q_all = torch.cat(list(q_list)) if groups > 1 else q_list[0]
    key_lens = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    meta = SeqMeta(
        q_starts=torch.stack([cu[:-1] + off for cu, off in zip(cu_seqlens_q_list, offsets)]),
        q_ends=torch.stack([cu[1:] + off for cu, off in zip(cu_seqlens_q_list, offsets)]),
        cu_seqlens_k=cu_seqlens_k,
        seqused_k=torch.stack([key_lens if u is None else u for u in seqused_k_list]),
    )
    out, lse = apply_flash_attn(
        q_all, k, v, meta, max(max_q), shape.max_seqlen_k, scale, causal, left, right, softcap
    )
    out_list = list(out.split(sizes))
    lse_list = [lse[:, off:off + n] for off, n in zip(offsets, sizes)]
    return out_list, lse_list


def zigzag_group_ranges(
    cu_seqlens_k: torch.Tensor,
    max_seqlen_k: int,
    chunk_indices: Sequence[int],
    total_chunks: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """Ranges of the zigzag local step for ``grouped_flash_attn_varlen_func``.

    Every sequence of ``cu_seqlens_k`` (the gathered, global sequences) is cut into
    ``total_chunks`` equal chunks (each length must be divisible by it). The group of chunk
    c holds chunk c of every sequence, packed, and attends causally to the sequence's first
    (c+1)·L/total_chunks keys.

    Returns (cu_seqlens_q_list, seqused_k_list, max_seqlen_q_list), one entry per chunk
    index, computed on cu_seqlens_k's device; the checks of cu_seqlens_k's values (against
    max_seqlen_k, divisibility) read it on the host once per tensor object.
    """
    V.check_cu_seqlens_shape("cu_seqlens_k", cu_seqlens_k)
    # integer_value refuses bools (True passed for 1 chunk) and takes numpy ints, as flash-attn's sizes.
    chunks = V.integer_value(total_chunks)
    if chunks is None or chunks < 1:
        raise ValueError(f"total_chunks: got {total_chunks!r}; expected a positive int")
    total_chunks = chunks
    indices = [V.integer_value(c) for c in chunk_indices]
    for c, given in zip(indices, chunk_indices):
        if c is None or not 0 <= c < total_chunks:
            raise ValueError(f"chunk_indices: got {given!r}; expected ints in [0, {total_chunks})")
    if max_seqlen_k is None:
        raise TypeError("max_seqlen_k: expected an int, got None")
    max_seqlen_k = V.check_max_seqlen("max_seqlen_k", max_seqlen_k)
    # Checked here, where the caller named it: too small a value would surface only as a
    # group's max_seqlen_q (max_seqlen_k // total_chunks) in grouped_flash_attn_varlen_func.
    V.check_cu_seqlens_values("cu_seqlens_k", cu_seqlens_k, None, "max_seqlen_k", max_seqlen_k)
    V.check_divisible_lengths("cu_seqlens_k", cu_seqlens_k, total_chunks)
    chunk = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]) // total_chunks
    cu_q = torch.cat([cu_seqlens_k.new_zeros(1), chunk.cumsum(0, dtype=torch.int32)])
    max_q = max_seqlen_k // total_chunks
    return (
        [cu_q for _ in indices],
        [(c + 1) * chunk for c in indices],
        [max_q for _ in indices],
    )
