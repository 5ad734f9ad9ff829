"""``ringflash bench kernels``: our kernels against PyTorch's FA2 (SDPA flash backend),
cuDNN (SDPA cuDNN backend) and compiled FlexAttention, forward and backward, on one GPU.

Grid: bf16, head dims 64 and 128, causal and not, 16k total tokens at seqlen 1k/4k/16k
(batch = 16k / seqlen, nheads = 2048 / headdim); plus the Llama-3-8B varlen case
(32 query heads, 8 KV heads, d=128, packed 8192+4096+2048+1024+512+512) against
aten._flash_attention_forward/backward (FA2 varlen).

``--out DIR`` writes kernels.csv, kernels.md and kernels_speed_ratios.png (our TFLOP/s over
each baseline's, per case); ``--from-csv`` redraws those from a saved CSV without a GPU.

``--grid wide`` runs issue 15's wide grid instead (``ringflash.bench.kernels_wide``: more
head dims and lengths, GQA, four varlen packs, the 3-D interface, the atomic backward,
statuses for failing cells, ``--device cpu`` smoke runs); its CSV is long-format and
``--from-csv`` recognises it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

import torch

from ..interface import flash_attn_func, flash_attn_varlen_func
from ..testing import error_stats
from .common import (
    BWD_FLOP_FACTOR, AtenFlashVarlen, attn_flops, device_description, flex_baseline, format_table,
    read_csv_rows, sdpa_baseline, tflops, time_fwd_bwd, varlen_flops, write_csv, write_text,
)
from .kernels_wide import is_wide_csv
from .progress import progress_bar, show, write

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
        write(f"  {name}: unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
        return None, None


def _sanity(pair: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> Optional[float]:
    """Relative error of our output against FA2's (the first and second of ``pair``), or
    None where FA2 cannot run the case (reported, as ``_guarded`` does)."""
    try:
        with torch.no_grad():
            ours, fa2 = pair()
            return error_stats(ours.float(), fa2.float()).rel
    except Exception as exc:
        write(f"  sanity check against FA2: unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
        return None


def run_dense_grid(headdims, seqlens, causals, with_flex: bool, dtype=torch.bfloat16, bar=None) -> list[dict]:
    """One row per (head dim, causal, seqlen); ``bar`` (a progress bar) advances per case."""
    impls = dense_implementations(with_flex)
    results = []
    for d in headdims:
        for causal in causals:
            for seqlen in seqlens:
                if bar is not None:
                    show(bar, f"d={d} {'causal' if causal else 'full'} s={seqlen}")
                batch, nheads = TOTAL_TOKENS // seqlen, 2048 // d
                gen = torch.Generator(device="cuda").manual_seed(0)
                mk = lambda: torch.randn(batch, seqlen, nheads, d, device="cuda", dtype=dtype, generator=gen)  # noqa: E731
                q, k, v = (mk().requires_grad_() for _ in range(3))
                dout = mk()
                flops = attn_flops(batch, nheads, seqlen, seqlen, d, causal)
                row = dict(case=f"d={d} {'causal' if causal else 'full'} s={seqlen} b={batch} h={nheads}",
                           headdim=d, causal=causal, seqlen=seqlen, batch=batch, nheads=nheads)
                # Sanity: our output against FA2's on this case (not a test; a guard on the numbers).
                # A case FA2 refuses leaves the guard blank; it must not end the run.
                row["rel_err_vs_fa2"] = _sanity(lambda: (_ours(q, k, v, causal), impls["fa2"](q, k, v, causal)))
                for name, fn in impls.items():
                    fwd_ms, bwd_ms = _guarded(name, lambda: time_fwd_bwd(lambda *t: fn(*t, causal), (q, k, v), dout))
                    row[f"{name}_fwd_tflops"] = tflops(flops, fwd_ms) if fwd_ms else None
                    row[f"{name}_bwd_tflops"] = tflops(BWD_FLOP_FACTOR * flops, bwd_ms) if bwd_ms else None
                write(f"  {row['case']}: " + ", ".join(
                    f"{n} {_num(row[f'{n}_fwd_tflops'])}/{_num(row[f'{n}_bwd_tflops'])}" for n in impls))
                results.append(row)
                if bar is not None:
                    bar.update(1)
    return results


def run_varlen_llama(causals, dtype=torch.bfloat16, bar=None) -> list[dict]:
    """The Llama-3-8B varlen case against PyTorch's FA2 varlen, one row per causal setting."""
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
        if bar is not None:
            show(bar, f"llama3-8b varlen {'causal' if causal else 'full'}")
        flops = varlen_flops(LLAMA_LENGTHS, nheads, d, causal)
        ours = lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=causal)  # noqa: E731
        fa2 = lambda q, k, v: AtenFlashVarlen.apply(q, k, v, cu, cu, max_len, max_len, causal)  # noqa: E731
        row = dict(case=f"llama3-8b varlen {'causal' if causal else 'full'} 32/8 heads d=128 {'+'.join(map(str, LLAMA_LENGTHS))}",
                   headdim=d, causal=causal, seqlen=total, batch=len(LLAMA_LENGTHS), nheads=nheads)
        row["rel_err_vs_fa2"] = _sanity(lambda: (ours(q, k, v), fa2(q, k, v)))
        for name, fn in (("ringflash", ours), ("fa2", fa2)):
            fwd_ms, bwd_ms = _guarded(name, lambda: time_fwd_bwd(fn, (q, k, v), dout))
            row[f"{name}_fwd_tflops"] = tflops(flops, fwd_ms) if fwd_ms else None
            row[f"{name}_bwd_tflops"] = tflops(BWD_FLOP_FACTOR * flops, bwd_ms) if bwd_ms else None
        write(f"  {row['case']}: ours {_num(row['ringflash_fwd_tflops'])}/{_num(row['ringflash_bwd_tflops'])}, "
              f"fa2 {_num(row['fa2_fwd_tflops'])}/{_num(row['fa2_bwd_tflops'])}")
        results.append(row)
        if bar is not None:
            bar.update(1)
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


BASELINES = ("fa2", "cudnn", "flex")


def speed_ratios(rows: Sequence[dict], phase: str, baselines: Sequence[str] = BASELINES) -> dict[str, list]:
    """{"ours / <baseline>": [ratio or None per row]}: our TFLOP/s over the baseline's in
    ``phase`` ("fwd" or "bwd"); above 1 means ours is faster. Baselines with no value in any
    row (e.g. flex after --no-flex) are left out."""
    out = {}
    for b in baselines:
        vals = []
        for r in rows:
            ours, base = r.get(f"ringflash_{phase}_tflops"), r.get(f"{b}_{phase}_tflops")
            vals.append(ours / base if ours and base else None)
        if any(v is not None for v in vals):
            out[f"ours / {b}"] = vals
    return out


def plot_speed_ratios(rows: Sequence[dict], path: str, note: str = "") -> str:
    """Bar chart of our speed over each baseline's, per case: forward and backward panels."""
    from .plots import BarPanel, ratio_bars

    cases = [str(r["case"]) for r in rows]
    panels = [BarPanel(f"{name} (TFLOP/s ratio)", cases, speed_ratios(rows, phase))
              for phase, name in (("fwd", "forward"), ("bwd", "backward"))]
    return ratio_bars(path, panels, "ringflash kernels: speed relative to PyTorch's FA2, cuDNN and FlexAttention",
                      "speed ratio (ours / baseline; > 1: ours faster)", note=note, reference=1.0,
                      reference_label="parity")


def _device_of(rows: Sequence[dict], fallback: str) -> str:
    found = sorted({str(r["device"]) for r in rows if r.get("device")})
    return ", ".join(found) or fallback


def write_outputs(rows: Sequence[dict], out_dir: str, device: str) -> list[str]:
    """kernels.csv, kernels.md and (with matplotlib) kernels_speed_ratios.png in ``out_dir``."""
    from .plots import have_matplotlib

    keys = sorted({k for r in rows for k in r})
    paths = [os.path.join(out_dir, "kernels.csv"), os.path.join(out_dir, "kernels.md")]
    write_csv(paths[0], keys, [[r.get(k) for k in keys] for r in rows])
    write_text(paths[1], f"# ringflash bench kernels\n\n- Device: {device}\n- TFLOP/s from do_bench medians "
                         f"(forward 4*b*h*s^2*d, halved when causal; backward 2.5x)\n\n"
                         + summarize(rows).replace(" TFLOP/s\n", " TFLOP/s\n\n"))
    if have_matplotlib():
        paths.append(plot_speed_ratios(rows, os.path.join(out_dir, "kernels_speed_ratios.png"), device))
    else:
        write("matplotlib is not installed (pip install 'ringflash[bench]'): no plots")
    return paths


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--grid", choices=["default", "wide"], default="default")
    pre.add_argument("--from-csv")
    known, _ = pre.parse_known_args(argv)
    if known.grid == "wide" or (known.grid == "default" and known.from_csv and os.path.isfile(known.from_csv)
                                and "--grid" not in argv and is_wide_csv(known.from_csv)):
        from .kernels_wide import main as wide_main

        return wide_main(argv)
    parser = argparse.ArgumentParser(prog="ringflash bench kernels")
    parser.add_argument("--grid", choices=["default", "wide"], default="default",
                        help="wide: issue 15's wide grid (head dims 64-256, seqlen 512-64k, GQA, four varlen packs, "
                             "the seed-004 3-D interface; atomic backward too); `--grid wide --help` lists its options")
    parser.add_argument("--csv", default="bench_out/kernels.csv")
    parser.add_argument("--out", metavar="DIR",
                        help="also write kernels.csv, kernels.md and kernels_speed_ratios.png into DIR")
    parser.add_argument("--from-csv", metavar="CSV",
                        help="measure nothing: print the tables of a saved kernels CSV (and with --out, "
                             "write its report and plot); needs no GPU")
    parser.add_argument("--headdims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--causal", choices=["both", "causal", "full"], default="both")
    parser.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention (slow to compile)")
    parser.add_argument("--no-varlen", action="store_true")
    args = parser.parse_args(argv)
    if args.from_csv:
        results = read_csv_rows([args.from_csv])
        device = _device_of(results, f"device not recorded in {os.path.basename(args.from_csv)}")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("ringflash bench kernels needs a CUDA GPU")
        causals = {"both": [False, True], "causal": [True], "full": [False]}[args.causal]
        device = device_description()
        print(f"device: {device}", flush=True)
        n_cases = len(args.headdims) * len(causals) * len(args.seqlens) + (0 if args.no_varlen else len(causals))
        with progress_bar(n_cases, "kernels") as bar:
            results = run_dense_grid(args.headdims, args.seqlens, causals, with_flex=not args.no_flex, bar=bar)
            if not args.no_varlen:
                results += run_varlen_llama(causals, bar=bar)
        for r in results:
            r["device"] = device
        keys = sorted({k for r in results for k in r})
        write_csv(args.csv, keys, [[r.get(k) for k in keys] for r in results])
    if args.out:
        paths = write_outputs(results, args.out, device)
        print("wrote " + ", ".join(paths))
    print()
    print(summarize(results))
    return 0
