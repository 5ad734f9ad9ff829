"""The Gluon Hopper forward (``kernels.sm90``) on the GPU: its error against the portable
forward and a float64 reference on a small case per variant, then its forward time against
the portable forward, SDPA's FA2 and cuDNN on the same tensors, for each variant
(``sm90.VARIANTS``) and a few candidate tiles.

    python scripts/probe_sm90.py                  # bf16, d=64/128, causal and full, 16k tokens
    python scripts/probe_sm90.py --headdims 128 --seqlens 4096 16384 --tiles pipelined:128x128x8x2 pingpong:128x128x4x2

Prints a line per measurement as it goes and a table of forward TFLOP/s and ratios last.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from ringflash import attention_ref, flash_attn_func  # noqa: E402
from ringflash.bench.common import attn_flops, bench_ms, format_table, sdpa_baseline, tflops  # noqa: E402
from ringflash.kernels import configs, sm90  # noqa: E402
from ringflash.kernels.problem import make_problem  # noqa: E402


def candidate(spec: str) -> tuple[str, configs.KernelConfig]:
    """"variant:BMxBNxWARPSxSTAGES" (warps are fixed by the specialized variants)."""
    variant, _, tiles = spec.partition(":")
    bm, bn, warps, stages = (int(x) for x in tiles.split("x"))
    return variant, configs.KernelConfig(bm, bn, warps, stages)


def sm90_call(q, k, v, causal, variant):
    prob = make_problem(q, k, None, q.shape[1], k.shape[1], q.shape[-1] ** -0.5, causal, -1, -1, 0.0)
    return sm90.attention_forward_sm90(q, k, v, prob, variant=variant)


def check(d: int, causal: bool, variant: str, cfg: configs.KernelConfig) -> str:
    """Max error of out and lse against float64, next to the portable forward's."""
    gen = torch.Generator(device="cuda").manual_seed(d + causal)
    shapes = [(2, 1000, 8, d), (2, 1537, 2, d), (2, 1537, 2, d)]
    q64, k64, v64 = (torch.randn(s, device="cuda", dtype=torch.float64, generator=gen) for s in shapes)
    want_out, want_lse = attention_ref(q64, k64, v64, causal=causal)
    q, k, v = (t.bfloat16() for t in (q64, k64, v64))
    with configs.override(sm90_fwd=cfg):
        out, lse = sm90_call(q, k, v, causal, variant)
    ref_out, ref_lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    err = lambda a, b: (a.double() - b).abs().max().item()  # noqa: E731
    return (f"out {err(out, want_out):.2e} (portable {err(ref_out, want_out):.2e}), "
            f"lse {err(lse, want_lse):.2e} (portable {err(ref_lse, want_lse):.2e})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--headdims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--tokens", type=int, default=16384, help="batch = tokens / seqlen")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--tiles", nargs="+", metavar="VARIANT:BMxBNxWxS",
                        default=["pipelined:128x128x8x2", "pipelined:128x64x8x2", "pipelined:128x128x8x3",
                                 "specialized:128x128x4x2", "pingpong:128x128x4x2", "pingpong:128x128x4x3"])
    args = parser.parse_args(argv)
    # flash_attn_func is the portable baseline here (the sm90 calls go to its launcher).
    os.environ["RINGFLASH_BACKEND"] = "portable"
    cfgs = [candidate(s) for s in args.tiles]
    fa2, cudnn = sdpa_baseline("FLASH_ATTENTION"), sdpa_baseline("CUDNN_ATTENTION")
    rows = []
    for d in args.headdims:
        for causal in (False, True):
            for variant, cfg in cfgs:
                label = f"{variant}:{cfg.block_m}x{cfg.block_n}x{cfg.num_warps}x{cfg.num_stages}"
                try:
                    print(f"check d={d} causal={causal} {label}: {check(d, causal, variant, cfg)}", flush=True)
                except Exception as exc:  # a tile that does not fit: say so and go on
                    print(f"check d={d} causal={causal} {label}: FAILED {type(exc).__name__}: {str(exc)[:300]}",
                          flush=True)
            for seqlen in args.seqlens:
                batch = max(1, args.tokens // seqlen)
                gen = torch.Generator(device="cuda").manual_seed(seqlen)
                q, k, v = (torch.randn(batch, seqlen, args.heads, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                           for _ in range(3))
                flops = attn_flops(batch, args.heads, seqlen, seqlen, d, causal)
                base = {"portable": bench_ms(lambda: flash_attn_func(q, k, v, causal=causal)),
                        "FA2": bench_ms(lambda: fa2(q, k, v, causal)),
                        "cuDNN": bench_ms(lambda: cudnn(q, k, v, causal))}
                for variant, cfg in cfgs:
                    name = f"{variant}:{cfg.block_m}x{cfg.block_n}x{cfg.num_warps}x{cfg.num_stages}"
                    try:
                        with configs.override(sm90_fwd=cfg):
                            ms = bench_ms(lambda: sm90_call(q, k, v, causal, variant))
                    except Exception as exc:
                        print(f"time d={d} causal={causal} s={seqlen} {name}: FAILED {type(exc).__name__}", flush=True)
                        continue
                    row = [d, "causal" if causal else "full", seqlen, batch, name, f"{tflops(flops, ms):.0f}",
                           f"{tflops(flops, base['portable']):.0f}", f"{tflops(flops, base['FA2']):.0f}",
                           f"{tflops(flops, base['cuDNN']):.0f}", f"{base['portable'] / ms:.2f}",
                           f"{base['FA2'] / ms:.2f}", f"{base['cuDNN'] / ms:.2f}"]
                    print("time", row, flush=True)
                    rows.append(row)
    print(format_table(["d", "mask", "s", "b", "sm90 variant:tile", "sm90 TF/s", "portable", "FA2", "cuDNN",
                        "vs portable", "vs FA2", "vs cuDNN"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
