"""An independent, deliberately naive float64 attention: one (batch, head, query) row at a
time with explicit index tests. It shares no code with ringflash.reference, so the two
check each other."""

import math

import torch


def naive_attention(q, k, v, causal=False, window=(-1, -1), softcap=0.0, scale=None, diag=None, alibi_slopes=None):
    """q (b, sq, h, d), k/v (b, sk, hk, d) -> out (b, sq, h, d) float64, lse (b, h, sq) float64.

    Query row i sees key j iff i + diag - left <= j <= i + diag + right (diag defaults to
    sk - sq, the bottom-right alignment); the window is taken literally (no widening).
    ``alibi_slopes`` (h,) or (b, h) adds -slope * |i + diag - j| after the softcap."""
    q, k, v = q.double(), k.double(), v.double()
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    left, right = window
    if causal:
        right = 0
    offset = sk - sq if diag is None else diag
    out = torch.zeros(b, sq, h, d, dtype=torch.float64)
    lse = torch.full((b, h, sq), float("-inf"), dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hk)
            for i in range(sq):
                keys = [
                    j for j in range(sk)
                    if (right < 0 or j <= i + offset + right) and (left < 0 or j >= i + offset - left)
                ]
                if not keys:
                    continue
                s = (k[bi, keys, kh] @ q[bi, i, hi]) * scale
                if softcap > 0:
                    s = softcap * torch.tanh(s / softcap)
                if alibi_slopes is not None:
                    slope = float(alibi_slopes[hi] if alibi_slopes.dim() == 1 else alibi_slopes[bi, hi])
                    s = s - slope * torch.tensor([abs(i + offset - j) for j in keys], dtype=torch.float64)
                m = s.max()
                w = torch.exp(s - m)
                lse[bi, hi, i] = m + torch.log(w.sum())
                p = w / w.sum()
                out[bi, i, hi] = (p[:, None] * v[bi, keys, kh]).sum(0)
    return out, lse
