"""Split-KV fan-out of the decode kernel on the GPU: CUDA-graph time of
``flash_attn_with_kvcache`` for num_splits 1..16 against the heuristic's choice (0) and SDPA
FA2, for the two decode cases of ``bench decode`` (b=8 sk=8k, b=64 sk=2k; 32/8 heads, d=128,
bf16). Prints a table last.

    python scripts/probe_decode_splits.py
"""

from __future__ import annotations

import sys

import torch
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from ringflash import flash_attn_with_kvcache


SPLITS = [int(x) for x in sys.argv[1:]] or list(range(0, 17))


def graph_ms(fn) -> float:
    return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for b, sk in ((8, 8192), (64, 2048), (1, 32768), (16, 4096)):
        q = torch.randn(b, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, sk, 8, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        with torch.no_grad():
            graph_ms(lambda: flash_attn_with_kvcache(q, k, v, causal=True))  # clocks up
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                fa2 = graph_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True))
            times = {}
            for s in SPLITS:
                times[s] = graph_ms(lambda: flash_attn_with_kvcache(q, k, v, causal=True, num_splits=s))
        best = min((t, s) for s, t in times.items())
        print(f"b={b} sk={sk}: FA2 {fa2 * 1e3:.1f} us; " +
              " ".join(f"{s}:{t * 1e3:.1f}" for s, t in times.items()), flush=True)
        rows.append((b, sk, fa2, times[0], best[1], best[0]))
    print("\n| case | FA2 us | ours, heuristic, us | best splits | best us | FA2 / best |")
    print("|---|---|---|---|---|---|")
    for b, sk, fa2, t0, s, t in rows:
        print(f"| b={b} sk={sk} | {fa2 * 1e3:.1f} | {t0 * 1e3:.1f} | {s} | {t * 1e3:.1f} | {fa2 / t:.3f} |")


if __name__ == "__main__":
    main()
