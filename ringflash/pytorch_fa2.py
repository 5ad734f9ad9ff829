"""FlashAttention-2 written in plain PyTorch: tiled forward with online softmax, and the
paper's recomputing backward. It is slow (a Python loop over tiles) and exists to make
the algorithm readable and testable on any device; the Triton kernels are the fast path.
"""

from __future__ import annotations

import torch

from . import validation as V
from .reference import visible_mask

#: Tile sizes (rows of Q, rows of K/V per step); the algorithm needs at least 16. On a GPU
#: each tile step is a handful of kernel launches, so larger tiles keep it usable there.
Q_TILE = 16
K_TILE = 16
CUDA_TILE = 128


def _tiles(device: torch.device) -> tuple[int, int]:
    return (CUDA_TILE, CUDA_TILE) if device.type == "cuda" else (Q_TILE, K_TILE)


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_3d(Q: torch.Tensor, K: torch.Tensor, Vt: torch.Tensor) -> None:
    V.check_rank("Q", Q, 3, "(batch, n_queries, d)")
    V.check_rank("K", K, 3, "(batch, n_keys, d)")
    V.check_rank("V", Vt, 3, "(batch, n_keys, d)")
    V.check_dtype("Q", Q, V.REFERENCE_DTYPES)
    V.check_same_dtype(("Q", "K", "V"), (Q, K, Vt))
    V.check_same_device(("Q", "K", "V"), (Q, K, Vt))
    if K.shape[0] != Q.shape[0] or Vt.shape[0] != Q.shape[0]:
        raise ValueError(f"K, V: batch {K.shape[0]}, {Vt.shape[0]} differ from Q's batch {Q.shape[0]}; expected {Q.shape[0]}")
    if Vt.shape[1] != K.shape[1]:
        raise ValueError(f"V: has {Vt.shape[1]} keys but K has {K.shape[1]}; expected {K.shape[1]}")
    for name, t in (("K", K), ("V", Vt)):
        if t.shape[2] != Q.shape[2]:
            raise ValueError(f"{name}: head dim {t.shape[2]} differs from Q's head dim {Q.shape[2]}; expected {Q.shape[2]}")
    V.check_headdim("Q", Q.shape[2], None)


def _key_tile_range(q0: int, q1: int, n_q: int, n_k: int, is_causal: bool, k_tile: int) -> range:
    """Key tiles that query rows [q0, q1) can see (bottom-right causal alignment)."""
    k_end = n_k
    if is_causal:
        k_end = max(0, min(n_k, q1 - 1 + n_k - n_q + 1))
    return range(0, k_end, k_tile)


def flash_fwd_pytorch(
    Q: torch.Tensor, K: torch.Tensor, Vt: torch.Tensor, is_causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Q (b, n_q, d), K/V (b, n_k, d) -> O (b, n_q, d) in Q's dtype, L (b, n_q) float32/64 (natural log)."""
    b, n_q, _ = Q.shape
    n_k = K.shape[1]
    acc_dtype = _accum_dtype(Q.dtype)
    O = torch.empty_like(Q)
    L = torch.empty(b, n_q, dtype=acc_dtype, device=Q.device)
    q_rows, k_rows = _tiles(Q.device)
    for q0 in range(0, n_q, q_rows):
        q1 = min(q0 + q_rows, n_q)
        q_tile = Q[:, q0:q1].to(acc_dtype)
        row_max = torch.full((b, q1 - q0), float("-inf"), dtype=acc_dtype, device=Q.device)
        row_sum = torch.zeros(b, q1 - q0, dtype=acc_dtype, device=Q.device)
        acc = torch.zeros(b, q1 - q0, Q.shape[2], dtype=acc_dtype, device=Q.device)
        q_idx = torch.arange(q0, q1, device=Q.device).unsqueeze(1)
        for k0 in _key_tile_range(q0, q1, n_q, n_k, is_causal, k_rows):
            k1 = min(k0 + k_rows, n_k)
            k_idx = torch.arange(k0, k1, device=Q.device).unsqueeze(0)
            s = torch.matmul(q_tile, K[:, k0:k1].to(acc_dtype).transpose(1, 2)) * scale
            s = s.masked_fill(~visible_mask(q_idx, k_idx, n_q, n_k, is_causal), float("-inf"))
            new_max = torch.maximum(row_max, s.amax(dim=-1))
            # A row that has seen only masked keys keeps max -inf; subtract 0 instead so no NaN appears.
            safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            p = torch.exp(s - safe_max.unsqueeze(-1))
            rescale = torch.exp(row_max - safe_max)
            row_sum = row_sum * rescale + p.sum(dim=-1)
            acc = acc * rescale.unsqueeze(-1) + torch.matmul(p, Vt[:, k0:k1].to(acc_dtype))
            row_max = new_max
        empty = row_sum == 0
        O[:, q0:q1] = (acc / torch.where(empty, 1.0, row_sum).unsqueeze(-1)).to(Q.dtype)
        L[:, q0:q1] = torch.where(empty, float("-inf"), row_max + torch.log(row_sum))
    return O, L


def flash_bwd_pytorch(
    dO: torch.Tensor,
    Q: torch.Tensor,
    K: torch.Tensor,
    Vt: torch.Tensor,
    O: torch.Tensor,
    L: torch.Tensor,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention-2 backward: P is recomputed from Q, K and L tile by tile."""
    b, n_q, d = Q.shape
    n_k = K.shape[1]
    acc_dtype = _accum_dtype(Q.dtype)
    D = (dO.to(acc_dtype) * O.to(acc_dtype)).sum(dim=-1)  # (b, n_q)
    # Rows with L = -inf saw no key; P must be 0 there, which exp(s - (+inf)) gives.
    L = torch.where(torch.isinf(L), float("inf"), L.to(acc_dtype))
    dQ = torch.zeros(b, n_q, d, dtype=acc_dtype, device=Q.device)
    dK = torch.zeros(b, n_k, d, dtype=acc_dtype, device=Q.device)
    dV = torch.zeros(b, n_k, d, dtype=acc_dtype, device=Q.device)
    q_rows, k_rows = _tiles(Q.device)
    for q0 in range(0, n_q, q_rows):
        q1 = min(q0 + q_rows, n_q)
        q_tile = Q[:, q0:q1].to(acc_dtype)
        do_tile = dO[:, q0:q1].to(acc_dtype)
        q_idx = torch.arange(q0, q1, device=Q.device).unsqueeze(1)
        for k0 in _key_tile_range(q0, q1, n_q, n_k, is_causal, k_rows):
            k1 = min(k0 + k_rows, n_k)
            k_tile = K[:, k0:k1].to(acc_dtype)
            v_tile = Vt[:, k0:k1].to(acc_dtype)
            k_idx = torch.arange(k0, k1, device=Q.device).unsqueeze(0)
            s = torch.matmul(q_tile, k_tile.transpose(1, 2)) * scale
            p = torch.exp(s - L[:, q0:q1].unsqueeze(-1))
            p = p.masked_fill(~visible_mask(q_idx, k_idx, n_q, n_k, is_causal), 0.0)
            dV[:, k0:k1] += torch.matmul(p.transpose(1, 2), do_tile)
            dp = torch.matmul(do_tile, v_tile.transpose(1, 2))
            ds = p * (dp - D[:, q0:q1].unsqueeze(-1))
            dQ[:, q0:q1] += torch.matmul(ds, k_tile) * scale
            dK[:, k0:k1] += torch.matmul(ds.transpose(1, 2), q_tile) * scale
    return dQ.to(Q.dtype), dK.to(K.dtype), dV.to(Vt.dtype)


class FlashAttentionPyTorchFunc(torch.autograd.Function):
    """FlashAttention-2 in PyTorch. ``.apply(Q, K, V, is_causal)``.

    Q: (batch, n_queries, d); K, V: (batch, n_keys, d). Scale 1/sqrt(d). Causal masking is
    aligned to the bottom right when n_queries != n_keys. Returns O (batch, n_queries, d).
    Saves only Q, K, V, O and L (batch, n_queries), the natural-log logsumexp.
    """

    @staticmethod
    def forward(ctx, Q: torch.Tensor, K: torch.Tensor, Vt: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        is_causal = V.as_bool("is_causal", is_causal)
        _check_3d(Q, K, Vt)
        scale = Q.shape[-1] ** -0.5
        O, L = flash_fwd_pytorch(Q, K, Vt, is_causal, scale)
        ctx.save_for_backward(Q, K, Vt, O, L)
        ctx.is_causal = is_causal
        ctx.scale = scale
        return O

    @staticmethod
    def backward(ctx, dO: torch.Tensor):
        Q, K, Vt, O, L = ctx.saved_tensors
        dQ, dK, dV = flash_bwd_pytorch(dO, Q, K, Vt, O, L, ctx.is_causal, ctx.scale)
        return dQ, dK, dV, None
