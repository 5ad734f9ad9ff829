"""Timing, FLOP counting and the PyTorch baselines shared by the benchmark commands.

Times are medians of ``triton.testing.do_bench`` (CUDA events). FLOPs follow the usual
convention: forward 4 * b * h * sq * sk * d (halved when causal), backward 2.5x forward.
"""

from __future__ import annotations

import csv
import os
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F


def bench_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def attn_flops(batch: int, nheads: int, seqlen_q: int, seqlen_k: int, headdim: int, causal: bool) -> float:
    """Forward FLOPs of dense attention (two matmuls)."""
    flops = 4.0 * batch * nheads * seqlen_q * seqlen_k * headdim
    return flops / 2 if causal else flops


def varlen_flops(lengths: Sequence[int], nheads: int, headdim: int, causal: bool) -> float:
    return sum(attn_flops(1, nheads, n, n, headdim, causal) for n in lengths)


BWD_FLOP_FACTOR = 2.5


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def time_fwd_bwd(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], dout: torch.Tensor) -> tuple[float, float]:
    """(forward ms, backward ms); the backward is timed alone on a retained graph."""
    fwd_ms = bench_ms(lambda: fn(*inputs))
    out = fn(*inputs)
    bwd_ms = bench_ms(lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True))
    return fwd_ms, bwd_ms


# --- PyTorch baselines, all taking (b, s, h, d) tensors like flash_attn_func --------------


def _expand_heads(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[2] == q.shape[2] else x.repeat_interleave(q.shape[2] // x.shape[2], dim=2)


def sdpa_baseline(backend_name: str) -> Callable[..., torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), _expand_heads(q, k).transpose(1, 2), _expand_heads(q, v).transpose(1, 2),
                is_causal=causal,
            )
        return out.transpose(1, 2)

    return run


def flex_baseline() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import torch._dynamo

    # One compiled graph per shape: allow more than the default 8 before dynamo gives up.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    compiled = torch.compile(flex_attention, dynamic=False)
    masks: dict[tuple, object] = {}

    def causal_mask(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def run(q, k, v, causal):
        sq, sk = q.shape[1], k.shape[1]
        block_mask = None
        if causal:
            key = (sq, sk, q.device)
            if key not in masks:
                masks[key] = create_block_mask(causal_mask, B=None, H=None, Q_LEN=sq, KV_LEN=sk, device=q.device)
            block_mask = masks[key]
        out = compiled(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
            enable_gqa=q.shape[2] != k.shape[2],
        )
        return out.transpose(1, 2)

    return run


class AtenFlashVarlen(torch.autograd.Function):
    """PyTorch's FA2 varlen kernels (aten._flash_attention_forward/backward) as a function."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal):
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False
        )
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, rng_state, unused)
        ctx.args = (max_q, max_k, causal)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_q, cu_k, rng_state, unused = ctx.saved_tensors
        max_q, max_k, causal = ctx.args
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal, rng_state, unused
        )
        return dq, dk, dv, None, None, None, None, None


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in header]] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_csv(path: Optional[str], header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def device_description() -> str:
    props = torch.cuda.get_device_properties(0)
    import triton

    return f"{props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, triton {triton.__version__}"
