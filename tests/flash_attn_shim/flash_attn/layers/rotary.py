"""``flash_attn.layers.rotary.apply_rotary_emb`` in PyTorch, on ringflash's rotary math
(``ringflash.rotary.apply_rotary``: float32 inside, the input's dtype out)."""

from __future__ import annotations

from typing import Optional, Union

import torch

from ringflash.rotary import apply_rotary

__all__ = ["apply_rotary_emb"]


def apply_rotary_emb(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    inplace: bool = False,
    seqlen_offsets: Union[int, torch.Tensor] = 0,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
) -> torch.Tensor:
    """Rotate the first ``rotary_dim = 2 * cos.shape[1]`` dims of each head of ``x``.

    Args:
        x: (batch, seqlen, nheads, headdim), or (total, nheads, headdim) with ``cu_seqlens``.
        cos, sin: (seqlen_ro, rotary_dim / 2); row p rotates the token at position p.
        interleaved: rotate pairs (2i, 2i + 1) (GPT-J) instead of (i, i + rotary_dim / 2)
            (GPT-NeoX).
        inplace: write the result into ``x`` and return it.
        seqlen_offsets: an int, or a (batch,) integer tensor: token i of sequence b sits at
            position i + offset (of b). Positions past the table are left unrotated, as in
            flash-attn's kernel.
        cu_seqlens: optional int32 (batch + 1,): the sequences of a packed ``x``.
        max_seqlen: the longest sequence with ``cu_seqlens`` (accepted; not needed here).
    Returns:
        The rotated tensor, shaped and typed as ``x``.
    """
    del max_seqlen
    if cos.dim() != 2 or sin.shape != cos.shape:
        raise ValueError(f"cos, sin: expected equal shapes (seqlen_ro, rotary_dim / 2), got {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    seqlen_ro, half = cos.shape
    if 2 * half > x.shape[-1]:
        raise ValueError(f"rotary_dim {2 * half} exceeds the head dim {x.shape[-1]}")
    device = x.device
    offsets = seqlen_offsets.to(device=device, dtype=torch.long) if isinstance(seqlen_offsets, torch.Tensor) \
        else int(seqlen_offsets)
    if cu_seqlens is None:
        positions = torch.arange(x.shape[1], device=device)[None, :]
        positions = positions + (offsets[:, None] if isinstance(offsets, torch.Tensor) else offsets)
        positions = positions.expand(x.shape[0], x.shape[1])
        x4 = x
    else:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        token = torch.arange(x.shape[0], device=device)
        seq = torch.searchsorted(cu[1:], token, right=True)  # the sequence each token is in
        positions = token - cu[seq] + (offsets[seq] if isinstance(offsets, torch.Tensor) else offsets)
        positions, x4 = positions[None], x[None]
    inside = ((positions >= 0) & (positions < seqlen_ro))[..., None]
    rows = positions.clamp(0, seqlen_ro - 1)
    c = torch.where(inside, cos[rows], torch.ones((), dtype=cos.dtype, device=device))
    s = torch.where(inside, sin[rows], torch.zeros((), dtype=sin.dtype, device=device))
    out = apply_rotary(x4, c, s, bool(interleaved))
    if cu_seqlens is not None:
        out = out[0]
    if inplace:
        return x.copy_(out)
    return out
