"""Rotary position embeddings in PyTorch (flash-attn's ``apply_rotary_emb`` math), for
``flash_attn_with_kvcache``: float32 inside, the input's dtype out."""

from __future__ import annotations

import torch


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotary embedding of x (batch, n, heads, d) with per-token cos/sin (batch, n, rotary_dim / 2),
    on the first rotary_dim dims: pairs (2i, 2i + 1) when interleaved (GPT-J), else (i,
    i + rotary_dim / 2) (GPT-NeoX). Computed in float32; returns x's dtype."""
    rot = 2 * cos.shape[-1]
    head, tail = x[..., :rot].float(), x[..., rot:]
    c, s = cos.float()[:, :, None, :], sin.float()[:, :, None, :]
    if interleaved:
        x1, x2 = head[..., 0::2], head[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = head[..., :rot // 2], head[..., rot // 2:]
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rotated.to(x.dtype), tail), dim=-1)


def rotary_rows(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin rows (batch, n, rotary_dim / 2) of (batch, n) positions; NaN for a position
    outside the table (a device-side length past it: NaN, not the last row's rotation)."""
    idx = positions.clamp(0, cos.shape[0] - 1)
    outside = ((positions < 0) | (positions >= cos.shape[0]))[..., None]
    nan = torch.tensor(float("nan"), dtype=cos.dtype, device=cos.device)
    return torch.where(outside, nan, cos[idx]), torch.where(outside, nan, sin[idx])
