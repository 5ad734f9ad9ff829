"""Launch shapes with dropout on the GPU (issue 16's 1.15x bar): time the forward, and the
backward with each candidate dK/dV or dQ config (the other kernel from the table), of
``bench dropout``'s case (b=4 s=4k h=16 d=128 causal bf16, dropout 0.1), against the same
call without dropout.

The tables were tuned without dropout; the mask's words add registers and ALU work per
score entry, so other tile shapes may win with it. Candidates compile first in worker
processes (Triton's disk cache), then each is timed. Prints a line per candidate and a
table of the fastest per kernel last.

    python scripts/probe_dropout.py [--headdim 128] [--seqlen 4096] [--batch 4] [--heads 16]
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import torch
import triton.testing

from ringflash import flash_attn_func
from ringflash.kernels import configs
from ringflash.kernels.configs import KernelConfig

P = 0.1


def bench(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median"))


def inputs(args):
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (args.batch, args.seqlen, args.heads, args.headdim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_() for _ in range(3))
    return q, k, v, torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)


def _compile(job) -> str:
    args, kind, cfg = job
    try:
        with configs.override(**{kind: cfg}):
            q, k, v, do = inputs(args)
            out = flash_attn_func(q, k, v, dropout_p=P, causal=args.causal)
            if kind != "fwd":
                torch.autograd.grad(out, (q, k, v), do)
        torch.cuda.synchronize()
        return ""
    except Exception as exc:  # out of resources: the timing pass skips it too
        return f"{kind} {cfg}: {type(exc).__name__}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--full", dest="causal", action="store_false", help="full attention instead of causal")
    ap.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    args = ap.parse_args()
    jobs = [(args, kind, cfg) for kind in configs.KINDS for cfg in configs.candidates(kind, args.headdim)]
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=torch.multiprocessing.get_context("spawn")) as pool:
        failed = [f for f in pool.map(_compile, jobs) if f]
    print(f"compiled {len(jobs)} variants; {len(failed)} did not run: {failed}", flush=True)

    q, k, v, do = inputs(args)
    fwd = lambda p: flash_attn_func(q, k, v, dropout_p=p, causal=args.causal)  # noqa: E731

    def bwd_ms(p: float) -> float:
        torch.manual_seed(0)
        out = fwd(p)
        return bench(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))

    base = {p: (bench(lambda: fwd(p)), bwd_ms(p)) for p in (0.0, P)}
    for p, (f, b) in base.items():
        print(f"table, dropout {p}: fwd {f:.3f} bwd {b:.3f} fwd+bwd {f + b:.3f} ms", flush=True)
    best = {}
    for kind, cfg in ((kind, cfg) for _, kind, cfg in jobs):
        try:
            with configs.override(**{kind: cfg}):
                ms = bench(lambda: fwd(P)) if kind == "fwd" else bwd_ms(P)
        except Exception as exc:
            print(f"  {kind} {cfg}: {type(exc).__name__}", flush=True)
            continue
        print(f"  {kind} {cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}: {ms:.3f} ms", flush=True)
        if kind not in best or ms < best[kind][0]:
            best[kind] = (ms, cfg)
    # The fastest of each kind together (the backward kernels' times are not additive).
    with configs.override(fwd=best["fwd"][1], dkdv=best["dkdv"][1], dq=best["dq"][1]):
        f, b = bench(lambda: fwd(P)), bwd_ms(P)
    none = sum(base[0.0])
    print(f"\ncase b={args.batch} s={args.seqlen} h={args.heads} d={args.headdim} causal={args.causal}, bf16, dropout {P}")
    print("| kernel | fastest with dropout | ms | the table's ms (dropout) |")
    print("|---|---|---|---|")
    for kind in configs.KINDS:
        ms, c = best[kind]
        table_ms = base[P][0] if kind == "fwd" else base[P][1]
        print(f"| {kind} | {c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages} | {ms:.3f} | {table_ms:.3f} |")
    print(f"\nno dropout (table): {none:.3f} ms fwd+bwd; dropout (table): {sum(base[P]):.3f} ms = "
          f"{sum(base[P]) / none:.3f}x; dropout (fastest of each): {f:.3f} + {b:.3f} = {f + b:.3f} ms = {(f + b) / none:.3f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
