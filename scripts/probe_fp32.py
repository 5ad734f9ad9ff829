"""Exact-fp32 launch shapes on the GPU: time the forward, and the backward's dK/dV and dQ
kernels, of fp32 attention (ieee dots: FMA, no tensor cores) over a few tile shapes, against
SDPA's fp32 (memory-efficient attention) on the same tensors.

The config tables are tuned for 16-bit inputs on tensor cores; an fp32 dot in exact
precision is a loop of FMAs whose tiles live in registers, so big tiles spill. Prints one
line per candidate and a table of the fastest per kind last.

    python scripts/probe_fp32.py [--headdims 64 128] [--seqlen 4096]
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from ringflash import flash_attn_func
from ringflash.kernels import configs
from ringflash.kernels.configs import KernelConfig

SHAPES = [(16, 64, 4, 1), (32, 32, 4, 1), (32, 64, 4, 1), (64, 32, 4, 1), (64, 64, 4, 1), (64, 64, 8, 1),
          (128, 32, 8, 1), (32, 32, 4, 2), (64, 32, 4, 2), (64, 64, 8, 2), (128, 64, 8, 1)]


def bench(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=3, rep=20, return_mode="median"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--headdims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--causal", choices=["both", "causal", "full"], default="both")
    ap.add_argument("--shapes", nargs="+", default=None,
                    help="tiles as BMxBNxWARPSxSTAGES (e.g. 32x32x4x2); default: the built-in list")
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in t.split("x")) for t in args.shapes] if args.shapes else SHAPES
    causal_opts = {"both": (True, False), "causal": (True,), "full": (False,)}[args.causal]
    torch.manual_seed(0)
    best = []
    for d in args.headdims:
        for causal in causal_opts:
            shape = (args.batch, args.seqlen, args.heads, d)
            q, k, v = (torch.randn(shape, device="cuda", requires_grad=True) for _ in range(3))
            do = torch.randn(shape, device="cuda")
            qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                sdpa_f = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal))
                o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                sdpa_b = bench(lambda: torch.autograd.grad(o, (qt, kt, vt), do.transpose(1, 2), retain_graph=True))
            ours_default_f = bench(lambda: flash_attn_func(q, k, v, causal=causal))
            o = flash_attn_func(q, k, v, causal=causal)
            ours_default_b = bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
            print(f"d={d} causal={causal}: SDPA fwd {sdpa_f:.3f} bwd {sdpa_b:.3f} ms; ours (table) fwd "
                  f"{ours_default_f:.3f} bwd {ours_default_b:.3f} ms", flush=True)
            rows = {"fwd": [], "bwd": []}
            for bm, bn, w, s in shapes:
                cfg = KernelConfig(bm, bn, w, s)
                try:
                    with configs.override(fwd=cfg):
                        f = bench(lambda: flash_attn_func(q, k, v, causal=causal))
                except Exception as e:  # out of resources: not a candidate
                    f = float("nan")
                    print(f"  fwd {cfg}: {type(e).__name__}", flush=True)
                try:
                    with configs.override(dkdv=cfg, dq=cfg):
                        o = flash_attn_func(q, k, v, causal=causal)
                        b = bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
                except Exception as e:
                    b = float("nan")
                    print(f"  bwd {cfg}: {type(e).__name__}", flush=True)
                print(f"  {bm}x{bn} w{w} s{s}: fwd {f:.3f} ms ({sdpa_f / f:.2f}x SDPA)  bwd {b:.3f} ms "
                      f"({sdpa_b / b:.2f}x SDPA)", flush=True)
                rows["fwd"].append((f, cfg))
                rows["bwd"].append((b, cfg))
            for kind, sdpa_t, table_t in (("fwd", sdpa_f, ours_default_f), ("bwd", sdpa_b, ours_default_b)):
                timed = [(t, c) for t, c in rows[kind] if t == t]
                t, c = min(timed, key=lambda x: x[0]) if timed else (float("nan"), None)
                best.append((d, causal, kind, c, t, table_t, sdpa_t))
    print("\n| d | causal | pass | fastest tile | ms | table's ms | SDPA ms | SDPA / fastest |")
    print("|---|---|---|---|---|---|---|---|")
    for d, causal, kind, c, t, table_t, sdpa_t in best:
        name = f"{c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}" if c else "-"
        print(f"| {d} | {causal} | {kind} | {name} | {t:.3f} | {table_t:.3f} | {sdpa_t:.3f} | {sdpa_t / t:.2f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
