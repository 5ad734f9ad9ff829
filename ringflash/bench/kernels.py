"""``ringflash bench kernels``: our kernels against PyTorch's FA2 (SDPA flash backend),
cuDNN (SDPA cuDNN backend) and compiled FlexAttention, forward and backward, on one GPU.

Grid: bf16, head dims 64 and 128, causal and not, 16k total tokens at seqlen 1k/4k/16k
(batch = 16k / seqlen, nheads = 2048 / headdim); plus the Llama-3-8B varlen case
(32 query heads, 8 KV heads, d=128, packed 8192+4096+2048+1024+512+512) against
aten._flash_attention_forward/backward (FA2 varlen).
"""

from __future__ import annotations

import argparse
from typing import Callable, Optional

import torch

from ..interface import flash_attn_func, flash_attn_varlen_func
from ..testing import error_stats
from .common import (
    BWD_FLOP_FACTOR, AtenFlashVarlen, attn_flops, device_description, flex_baseline, format_table,
    sdpa_baseline, tflops, time_fwd_bwd, varlen_flops, write_csv,
)

TOTAL_TOKENS = 16384
LLAMA_LENGTHS = [8192, 4096, 2048, 1024, 512, 512]


def _ours(q, k, v, causal):
    return flash_attn_func(q, k, v, causal=causal)


def dense_implementations(with_flex: bool) -> dict[str, Callable]:
    impls = {
        "ringflash": _ours,
        "fa2": sdpa_baseline("FLASH_ATTENTION"),
        "cudnn": sdpa_baseline("CUDNN_ATTENTION"),
    }
    if with_flex:
        impls["flex"] = flex_baseline()
    return impls


def _guarded(name: str, fn: Callable[[], tuple[float, float]]) -> tuple[Optional[float], Optional[float]]:
    try:
        return fn()
    except Exception as exc:  # a baseline that cannot run this case is reported, not fatal
        print(f"  {name}: unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
        return None, None


def run_dense_grid(headdims, seqlens, causals, with_flex: bool, dtype=torch.bfloat16) -> list[dict]:
    impls = dense_implementations(with_flex)
    results = []
    for d in headdims:
        for causal in causals:
            for seqlen in seqlens:
                batch, nheads = TOTAL_TOKENS // seqlen, 2048 // d
                gen = torch.Generator(device="cuda").manual_seed(0)
                mk = lambda: torch.randn(batch, seqlen, nheads, d, device="cuda", dtype=dtype, generator=gen)  # noqa: E731
                q, k, v = (mk().requires_grad_() for _ in range(3))
                dout = mk()
                flops = attn_flops(batch, nheads, seqlen, seqlen, d, causal)
                row = dict(case=f"d={d} {'causal' if causal else 'full'} s={seqlen} b={batch} h={nheads}",
                           headdim=d, causal=causal, seqlen=seqlen, batch=batch, nheads=nheads)
                # Sanity: our output against FA2's on this case (not a test; a guard on the numbers).
                with torch.no_grad():
                    err = error_stats(_ours(q, k, v, causal).float(), impls["fa2"](q, k, v, causal).float())
                row["rel_err_vs_fa2"] = err.rel
                for name, fn in impls.items():
                    fwd_ms, bwd_ms = _guarded(name, lambda: time_fwd_bwd(lambda *t: fn(*t, causal), (q, k, v), dout))
                    row[f"{name}_fwd_tflops"] = tflops(flops, fwd_ms) if fwd_ms else None
                    row[f"{name}_bwd_tflops"] = tflops(BWD_FLOP_FACTOR * flops, bwd_ms) if bwd_ms else None
                print(f"  {row['case']}: " + ", ".join(
                    f"{n} {row[f'{n}_fwd_tflops'] or 0:.0f}/{row[f'{n}_bwd_tflops'] or 0:.0f}" for n in impls),
                    flush=True)
                results.append(row)
    return results


def run_varlen_llama(causals, dtype=torch.bfloat16) -> list[dict]:
    nheads, nheads_k, d = 32, 8, 128
    total = sum(LLAMA_LENGTHS)
    cu = torch.tensor([0] + list(torch.tensor(LLAMA_LENGTHS).cumsum(0)), dtype=torch.int32, device="cuda")
    max_len = max(LLAMA_LENGTHS)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(total, nheads, d, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    k = torch.randn(total, nheads_k, d, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    v = torch.randn(total, nheads_k, d, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    dout = torch.randn(total, nheads, d, device="cuda", dtype=dtype, generator=gen)
    results = []
    for causal in causals:
        flops = varlen_flops(LLAMA_LENGTHS, nheads, d, causal)
        ours = lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=causal)  # noqa: E731
        fa2 = lambda q, k, v: AtenFlashVarlen.apply(q, k, v, cu, cu, max_len, max_len, causal)  # noqa: E731
        row = dict(case=f"llama3-8b varlen {'causal' if causal else 'full'} 32/8 heads d=128 {'+'.join(map(str, LLAMA_LENGTHS))}",
                   headdim=d, causal=causal, seqlen=total, batch=len(LLAMA_LENGTHS), nheads=nheads)
        with torch.no_grad():
            row["rel_err_vs_fa2"] = error_stats(ours(q, k, v).float(), fa2(q, k, v).float()).rel
        for name, fn in (("ringflash", ours), ("fa2", fa2)):
            fwd_ms, bwd_ms = _guarded(name, lambda: time_fwd_bwd(fn, (q, k, v), dout))
            row[f"{name}_fwd_tflops"] = tflops(flops, fwd_ms) if fwd_ms else None
            row[f"{name}_bwd_tflops"] = tflops(BWD_FLOP_FACTOR * flops, bwd_ms) if bwd_ms else None
        print(f"  {row['case']}: ours {row['ringflash_fwd_tflops'] or 0:.0f}/{row['ringflash_bwd_tflops'] or 0:.0f}, "
              f"fa2 {row['fa2_fwd_tflops'] or 0:.0f}/{row['fa2_bwd_tflops'] or 0:.0f}", flush=True)
        results.append(row)
    return results


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def _num(x: Optional[float]) -> str:
    return f"{x:.0f}" if x else "-"


def summarize(results: list[dict], baselines=("fa2", "cudnn", "flex")) -> str:
    out = []
    for phase in ("fwd", "bwd"):
        header = ["case", "ours"] + list(baselines) + [f"ours/{b}" for b in baselines]
        rows = []
        for r in results:
            ours = r.get(f"ringflash_{phase}_tflops")
            vals = [r.get(f"{b}_{phase}_tflops") for b in baselines]
            rows.append([r["case"], _num(ours)] + [_num(v) for v in vals] + [_ratio(ours, v) for v in vals])
        out.append(f"{phase} TFLOP/s\n" + format_table(header, rows))
    return "\n\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ringflash bench kernels")
    parser.add_argument("--csv", default="bench_out/kernels.csv")
    parser.add_argument("--headdims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--causal", choices=["both", "causal", "full"], default="both")
    parser.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention (slow to compile)")
    parser.add_argument("--no-varlen", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("ringflash bench kernels needs a CUDA GPU")
    causals = {"both": [False, True], "causal": [True], "full": [False]}[args.causal]
    print(f"device: {device_description()}", flush=True)
    results = run_dense_grid(args.headdims, args.seqlens, causals, with_flex=not args.no_flex)
    if not args.no_varlen:
        results += run_varlen_llama(causals)
    keys = sorted({k for r in results for k in r})
    write_csv(args.csv, keys, [[r.get(k) for k in keys] for r in results])
    print()
    print(summarize(results))
    return 0
