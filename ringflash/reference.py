"""Plain (materialized) attention: the ground truth every kernel is tested against.

It runs in whatever float dtype it is given; the tests give it float64.

Conventions shared by the whole library
---------------------------------------
* Causal masking and sliding windows are aligned to the **bottom right** when
  ``seqlen_q != seqlen_k``: query ``i`` sees key ``j`` iff
  ``i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right``,
  where ``window_size = (left, right)`` and -1 means unbounded. As in flash-attn, a
  side at least as wide as the keys (``seqlen_k``; ``max_seqlen_k`` of a varlen call) is
  unbounded: it differs from the literal bound only where queries outnumber keys.
  ``causal=True`` sets ``right = 0``.
* ``softcap > 0`` replaces the scaled score ``s`` with ``softcap * tanh(s / softcap)``.
* ``alibi_slopes`` (float32, ``(nheads,)`` or ``(batch, nheads)``) then adds
  ``-slope * |i + seqlen_k - seqlen_q - j|`` to the score of query ``i`` and key ``j``
  (flash-attn's ALiBi, aligned like the causal mask).
* The logsumexp (lse) is the natural log of the softmax denominator of the
  scaled (and capped) scores, in float32 from the kernels.
* A query row that sees no key at all yields ``out = 0`` and ``lse = -inf``.
  Merging partial results (split-KV, context parallelism) relies on this: a
  partial with ``lse = -inf`` has weight ``exp(-inf) = 0``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import validation as V


def visible_mask(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    seqlen_q: int | torch.Tensor,
    seqlen_k: int | torch.Tensor,
    causal: bool,
    window_size: tuple[int, int] = (-1, -1),
) -> torch.Tensor:
    """Boolean mask, True where query position ``q_idx`` may attend to key position ``k_idx``.

    ``q_idx`` and ``k_idx`` broadcast against each other (e.g. (M, 1) and (1, N)).
    Keys at or past ``seqlen_k`` are never visible.
    """
    left, right = window_size
    if causal:
        right = 0
    diag = q_idx + (seqlen_k - seqlen_q)
    mask = k_idx < seqlen_k
    if right >= 0:
        mask = mask & (k_idx <= diag + right)
    if left >= 0:
        mask = mask & (k_idx >= diag - left)
    return mask


def _masked_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    softmax_scale: float,
    softcap: float,
    bias: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (..., sq, d), k/v (..., sk, d), mask and bias broadcastable to (..., sq, sk) ->
    out (..., sq, d), lse (..., sq). The bias is added after the softcap."""
    probs, lse = _masked_softmax(q, k, mask, softmax_scale, softcap, bias)
    return torch.matmul(probs, v), lse


def _masked_softmax(q, k, mask, softmax_scale, softcap, bias):
    """(probabilities (..., sq, sk), lse (..., sq)) of the scaled, capped, biased, masked scores."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * softmax_scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # Rows that see no key: lse = -inf, and their probabilities are defined as 0 (not NaN).
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe_lse.unsqueeze(-1)).masked_fill(~mask, 0.0)
    return probs, lse


def _dense_setup(q, k, v, causal, softmax_scale, window_size, softcap, alibi_slopes, window_keys=None):
    """Validated options and the (b, h, s, d) operands, mask and ALiBi bias of dense attention;
    a window side of at least ``window_keys`` keys (default: seqlen_k) is unbounded."""
    shape = V.check_dense_qkv(q, k, v, dtypes=V.REFERENCE_DTYPES, max_headdim=None)
    causal = V.as_bool("causal", causal)
    window_size = V.window_within(*V.check_window(window_size),
                                  shape.seqlen_k if window_keys is None else window_keys)
    softcap = V.check_softcap(softcap)
    scale = V.resolve_softmax_scale(softmax_scale, shape.headdim)
    group = shape.nheads // shape.nheads_k
    qt = q.transpose(1, 2)  # (b, h, sq, d)
    kt = k.transpose(1, 2).repeat_interleave(group, dim=1)
    vt = v.transpose(1, 2).repeat_interleave(group, dim=1)
    q_idx = torch.arange(shape.seqlen_q, device=q.device).unsqueeze(1)
    k_idx = torch.arange(shape.seqlen_k, device=q.device).unsqueeze(0)
    mask = visible_mask(q_idx, k_idx, shape.seqlen_q, shape.seqlen_k, causal, window_size)
    bias = None
    if alibi_slopes is not None:
        slopes = V.check_alibi_slopes(alibi_slopes, shape.batch, shape.nheads, q.device)
        distance = (q_idx + (shape.seqlen_k - shape.seqlen_q) - k_idx).abs().to(q.dtype)
        bias = -slopes.to(q.dtype).view(-1, shape.nheads, 1, 1) * distance
    return qt, kt, vt, mask, scale, softcap, bias


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense reference attention.

    Args:
        q: (batch, seqlen_q, nheads, headdim)
        k, v: (batch, seqlen_k, nheads_k, headdim), nheads % nheads_k == 0 (GQA/MQA)
        alibi_slopes: optional float32 (nheads,) or (batch, nheads)
    Returns:
        out: (batch, seqlen_q, nheads, headdim), q's dtype
        lse: (batch, nheads, seqlen_q), q's dtype, natural log, -inf for rows that see no key
    """
    return _attention(q, k, v, causal, softmax_scale, window_size, softcap, alibi_slopes)


def _attention(q, k, v, causal, softmax_scale, window_size, softcap, alibi_slopes, window_keys=None):
    qt, kt, vt, mask, scale, softcap, bias = _dense_setup(q, k, v, causal, softmax_scale, window_size, softcap,
                                                          alibi_slopes, window_keys)
    out, lse = _masked_softmax_attention(qt, kt, vt, mask, scale, softcap, bias)
    return out.transpose(1, 2), lse


def attention_probs_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    window_keys: Optional[int] = None,
) -> torch.Tensor:
    """The attention probabilities (batch, nheads, seqlen_q, seqlen_k) of ``attention_ref``
    (0 where masked), in q's dtype. ``window_keys``: the key count a window side must reach
    to be unbounded (default seqlen_k; a varlen call's max_seqlen_k for one of its sequences)."""
    qt, kt, _, mask, scale, softcap, bias = _dense_setup(q, k, k, causal, softmax_scale, window_size, softcap,
                                                         alibi_slopes, window_keys)
    return _masked_softmax(qt, kt, mask, scale, softcap, bias)[0]


def attention_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    seqused_k: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed variable-length reference attention.

    Args:
        q: (total_q, nheads, headdim); sequence i is ``q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]``.
        k, v: (total_k, nheads_k, headdim), laid out by ``cu_seqlens_k``.
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,).
        seqused_k: optional int32 (batch,): sequence i uses only its first ``seqused_k[i]``
            keys, and causal/window alignment is against that length.
        alibi_slopes: optional float32 (nheads,) or (batch, nheads); row i of the latter
            is sequence i's.
    Returns:
        out: (total_q, nheads, headdim)
        lse: (nheads, total_q), natural log, -inf for rows that see no key
    """
    shape = V.check_varlen_qkv(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k,
        dtypes=V.REFERENCE_DTYPES, max_headdim=None,
    )
    causal = V.as_bool("causal", causal)
    window_size = V.check_window(window_size)
    softcap = V.check_softcap(softcap)
    scale = V.resolve_softmax_scale(softmax_scale, shape.headdim)
    slopes = None if alibi_slopes is None else V.check_alibi_slopes(alibi_slopes, shape.batch, shape.nheads, q.device)
    out = torch.zeros_like(q)
    lse = torch.full((shape.nheads, shape.total_q), float("-inf"), dtype=q.dtype, device=q.device)
    cu_q = cu_seqlens_q.tolist()  # a reference: host loops over sequences are fine here
    cu_k = cu_seqlens_k.tolist()
    used = seqused_k.tolist() if seqused_k is not None else None
    # Windows are bounded against max_seqlen_k, as flash-attn's: not each sequence's keys.
    window_keys = shape.max_seqlen_k
    if window_keys is None:
        window_keys = max((b - a for a, b in zip(cu_k, cu_k[1:])), default=0)
    for i in range(shape.batch):
        q0, q1 = cu_q[i], cu_q[i + 1]
        k0, k1 = cu_k[i], cu_k[i + 1]
        if used is not None:
            k1 = k0 + used[i]
        if q1 == q0:
            continue
        o_i, lse_i = _attention(
            q[q0:q1].unsqueeze(0), k[k0:k1].unsqueeze(0), v[k0:k1].unsqueeze(0), causal, scale, window_size,
            softcap, None if slopes is None else slopes[i if slopes.shape[0] > 1 else 0],
            window_keys=window_keys,
        )
        out[q0:q1] = o_i[0]
        lse[:, q0:q1] = lse_i[0]
    return out, lse
