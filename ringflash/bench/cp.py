"""``ringflash bench cp``: context-parallel attention on the local GPUs (NCCL, one process
per GPU), every strategy and mode, forward and forward+backward.

Llama-3-8B attention (32 query heads, 8 KV heads, d=128), bf16, causal, 8k tokens per
GPU; one packed batch of mixed document lengths and one single document. Efficiency =
(single-GPU time of our kernel on the whole global batch / W) / CP time, where a CP time
is the slowest rank's median over repeated samples of back-to-back calls (see ``_timed``)
and the single-GPU time is measured the same way on the same GPUs in the same run. The
forward+backward efficiency of a single call from an idle GPU is reported beside it, and
each rank's peak memory.

``--world-sizes 2 4 8`` runs the benchmark once per world size, so that ``--out DIR``
(cp.csv, cp.md, cp_efficiency.png) can plot efficiency against W per strategy;
``--from-csv`` redraws the report from saved CSVs (for example one per machine size)
without any GPU.

``--simulate W [W ...]`` measures something else, on one device: the compute balance of
every strategy's layout at those world sizes, each rank's local attention run alone, and
the cost model's per-rank prediction against it (``cp_simulate``; issue 18). It takes
``--device cpu --quick`` (toy sizes, interpreted kernels) like the other commands.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

import torch

TOKENS_PER_GPU = 8192
NHEADS, NHEADS_K, HEADDIM = 32, 8, 128
#: Calls per timed sample (back-to-back, as a training loop issues them).
CHAIN = 10

VARIANTS = [  # (label, strategy, options)
    ("zigzag_llama3 grouped", "zigzag_llama3", dict(mode="grouped")),
    ("zigzag_llama3 grouped, heads_k_stride=4", "zigzag_llama3", dict(mode="grouped", heads_k_stride=4)),
    ("zigzag_llama3 grouped, heads_k_stride=2", "zigzag_llama3", dict(mode="grouped", heads_k_stride=2)),
    ("zigzag_llama3 two_kernels", "zigzag_llama3", dict(mode="two_kernels")),
    ("zigzag_llama3 grouped, keep_gathered_kv", "zigzag_llama3", dict(mode="grouped", keep_gathered_kv=True)),
    ("llama3", "llama3", {}),
    ("ring", "ring", {}),
    ("zigzag_ring", "zigzag_ring", {}),
    ("stripe", "stripe", {}),
]


#: The batches: one document, the mixed pack, many short documents (``batch_lengths``).
CASES = ("single", "mixed", "short")


def batch_lengths(case: str, world: int, tokens_per_gpu: int = TOKENS_PER_GPU) -> list[int]:
    """Document lengths of a batch of T = ``tokens_per_gpu * world`` tokens: ``single`` one
    document; ``mixed`` T/2, T/4, T/8, T/16, T/32 and the rest (T/32 when 32 divides T);
    ``short`` documents of 1/64 to 1/4 of a GPU's tokens (128 to 2048 at 8k), a fixed
    pseudo-random draw, the last one cut to fill the batch."""
    total = tokens_per_gpu * world
    if case == "single":
        return [total]
    if case == "mixed":
        head = [total // 2, total // 4, total // 8, total // 16, total // 32]
        return head + [total - sum(head)]
    if case == "short":
        import random

        rng = random.Random(18)
        lo = max(1, tokens_per_gpu // 64)
        hi = max(lo, tokens_per_gpu // 4)
        out: list[int] = []
        while sum(out) < total:
            out.append(min(rng.randint(lo, hi), total - sum(out)))
        return out
    raise ValueError(f"case: got {case!r}; expected one of {', '.join(CASES)}")


def _lengths(world: int, case: str) -> list[int]:
    return batch_lengths(case, world)


def _timed(fn, iters: int, chain: int = CHAIN) -> float:
    """Milliseconds per call: the median over ``iters`` samples of ``chain`` back-to-back
    calls, then the maximum over ranks. Same count on every rank, a barrier before each
    sample. With ``chain`` > 1 the host queues work ahead of the GPU as in a training loop
    (ring-flash-attn's benchmark times such loops); ``chain=1`` times one call from an idle
    GPU, so the host's launch latency counts too."""
    import torch.distributed as dist

    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(chain):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / chain)
    med = torch.tensor([sorted(times)[len(times) // 2]], device="cuda")
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return med.item()


def case_inputs(world: int, case: str, dev: torch.device) -> tuple:
    """(lengths, cu_seqlens, (q, k, v, dout), single, single_step) of one case: the global
    batch in bf16, the same on every rank; ``single`` runs our varlen kernel on the whole
    batch (forward) and ``single_step`` forward and backward, on copies that require grad."""
    from ..interface import flash_attn_varlen_func

    lengths = _lengths(world, case)
    total = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    mk = lambda h: torch.randn(total, h, HEADDIM, device=dev, dtype=torch.bfloat16, generator=gen)  # noqa: E731
    q_all, k_all, v_all, do_all = mk(NHEADS), mk(NHEADS_K), mk(NHEADS_K), mk(NHEADS)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q_all, k_all, v_all))
    m = max(lengths)

    def single() -> torch.Tensor:
        return flash_attn_varlen_func(qg, kg, vg, cu, cu, m, m, causal=True)

    def single_step():
        return torch.autograd.grad(single(), (qg, kg, vg), do_all)

    return lengths, cu, (q_all, k_all, v_all, do_all), single, single_step


def bench_worker(rank: int, world: int, payload: tuple) -> Optional[list]:
    import torch.distributed as dist

    from ..cp import Plan

    from .progress import progress_bar, show, write

    cases, iters, variants = payload
    dev = torch.device("cuda", torch.cuda.current_device())
    rows = []
    # Every rank runs every step (they meet in collectives); rank 0 alone draws the bar.
    bar = progress_bar(len(cases) * len(variants), f"cp W={world}", unit="variant", disable=rank != 0 or None)
    for case in cases:
        # Single GPU, whole global batch (every rank measures it on its own GPU).
        _, cu, (q_all, k_all, v_all, do_all), single, single_step = case_inputs(world, case, dev)
        single_fwd = _timed(single, iters)
        single_total = _timed(single_step, iters)
        single_cold = _timed(single_step, iters, chain=1)
        ref = single().detach()
        for label, strategy, options in variants:
            show(bar, f"{case} {label}")
            plan = Plan(cu, strategy=strategy)
            q, k, v = (plan.shard(t).requires_grad_() for t in (q_all, k_all, v_all))
            dout = plan.shard(do_all)
            attend = lambda: plan.attention(q, k, v, causal=True, **options)  # noqa: E731
            torch.cuda.reset_peak_memory_stats()
            fwd = _timed(attend, iters)
            step = lambda: torch.autograd.grad(attend(), (q, k, v), dout)  # noqa: E731
            total_ms = _timed(step, iters)
            cold_ms = _timed(step, iters, chain=1)
            peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=dev)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            err = (plan.gather(attend().detach()).float() - ref.float()).norm() / ref.float().norm()
            rows.append(dict(case=case, variant=label, world=world, fwd_ms=fwd, fwd_bwd_ms=total_ms,
                             single_fwd_ms=single_fwd, single_fwd_bwd_ms=single_total,
                             single_fwd_bwd_cold_ms=single_cold, fwd_bwd_cold_ms=cold_ms,
                             fwd_eff=single_fwd / world / fwd, fwd_bwd_eff=single_total / world / total_ms,
                             fwd_bwd_cold_eff=single_cold / world / cold_ms,
                             peak_gib=peak.item(), rel_err_vs_single=err.item()))
            if rank == 0:
                r = rows[-1]
                write(f"  {case} {label}: fwd {fwd:.3f} ms ({r['fwd_eff']:.0%}), fwd+bwd {total_ms:.3f} ms "
                      f"({r['fwd_bwd_eff']:.0%}), one call {cold_ms:.3f} ms ({r['fwd_bwd_cold_eff']:.0%}), "
                      f"peak {r['peak_gib']:.2f} GiB, rel err {r['rel_err_vs_single']:.1e}")
            bar.update(1)
    bar.close()
    return rows if rank == 0 else None


#: Efficiency columns of a result row and how the report names them.
EFFICIENCY_METRICS = {
    "fwd_eff": "forward",
    "fwd_bwd_eff": "forward+backward",
    "fwd_bwd_cold_eff": "forward+backward, one call from an idle GPU",
}


def efficiency_series(rows: Sequence[dict], case: str, metric: str) -> dict[str, list[tuple[int, float]]]:
    """{variant: [(W, efficiency in %)]} of one case and metric, W ascending. Rows of the same
    (variant, W) from several runs are averaged; rows without the metric (older CSVs have no
    one-call columns) are left out."""
    acc: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        if r.get("case") != case or r.get(metric) is None:
            continue
        acc.setdefault(str(r["variant"]), {}).setdefault(int(r["world"]), []).append(100.0 * float(r[metric]))
    return {v: sorted((w, sum(x) / len(x)) for w, x in by_w.items()) for v, by_w in acc.items()}


def plot_efficiency(rows: Sequence[dict], path: str, note: str = "") -> str:
    """Efficiency against world size W, one line per strategy/variant: one panel per
    (metric, case), rows = metrics present in ``rows``, columns = cases. A pure function
    of the result rows (as ``bench_worker`` returns them or as read back from CSVs)."""
    from .plots import LinePanel, line_grid

    cases = list(dict.fromkeys(str(r["case"]) for r in rows))
    metrics = [m for m in EFFICIENCY_METRICS if any(r.get(m) is not None for r in rows)]
    variants = list(dict.fromkeys(str(r["variant"]) for r in rows))
    panels = [[LinePanel(f"{case}: {EFFICIENCY_METRICS[m]}", efficiency_series(rows, case, m)) for case in cases]
              for m in metrics]
    top = max([100.0] + [y for row in panels for p in row for pts in p.series.values() for _, y in pts])
    return line_grid(path, panels, "Context-parallel efficiency vs world size (single-GPU time / W / CP time)",
                     "world size W (GPUs)", "efficiency (%)", note=note, series_order=variants, ylog=False,
                     hline=100.0, hline_label="100% (linear scaling)", ylim=(0, top * 1.05))


def cp_table(rows: Sequence[dict]) -> str:
    """The console/markdown table, one row per (W, case, variant)."""
    def pct(x) -> str:
        return "-" if x is None else f"{x:.1%}"

    table = [[r["world"], r["case"], r["variant"], f"{r['fwd_ms']:.2f}", f"{r['fwd_bwd_ms']:.2f}", pct(r["fwd_eff"]),
              pct(r["fwd_bwd_eff"]), pct(r.get("fwd_bwd_cold_eff")), f"{r['peak_gib']:.2f}",
              f"{r['rel_err_vs_single']:.1e}"] for r in rows]
    from .common import format_table

    return format_table(["W", "case", "strategy", "fwd ms", "fwd+bwd ms", "fwd eff", "fwd+bwd eff",
                         "fwd+bwd eff, one call", "peak GiB/rank", "rel err vs 1 GPU"], table)


def single_gpu_summary(rows: Sequence[dict]) -> str:
    """One line per W: the single-GPU reference times of each case."""
    lines = []
    for w in sorted({int(r["world"]) for r in rows}):
        refs = sorted({f"{r['case']} {r['single_fwd_ms']:.2f} / {r['single_fwd_bwd_ms']:.2f} / "
                       + (f"{r['single_fwd_bwd_cold_ms']:.2f}" if r.get("single_fwd_bwd_cold_ms") is not None else "-")
                       for r in rows if int(r["world"]) == w})
        lines.append(f"W={w}; single-GPU reference per case (ms, fwd / fwd+bwd / fwd+bwd one call): "
                     + ", ".join(refs))
    return "\n".join(lines)


def write_outputs(rows: Sequence[dict], out_dir: str, device: str) -> list[str]:
    """cp.csv, cp.md and (with matplotlib) cp_efficiency.png in ``out_dir``."""
    from .common import write_csv, write_text
    from .plots import have_matplotlib
    from .progress import write

    keys = sorted({k for r in rows for k in r})
    paths = [os.path.join(out_dir, "cp.csv"), os.path.join(out_dir, "cp.md")]
    write_csv(paths[0], keys, [[r.get(k) for k in keys] for r in rows])
    write_text(paths[1], f"# ringflash bench cp\n\n- Device: {device}\n- Times per call over {CHAIN} back-to-back "
                         "calls (slowest rank's median); 'one call' times a single fwd+bwd from an idle GPU.\n"
                         "- Efficiency = single-GPU time on the whole batch / W / CP time.\n\n"
                         + single_gpu_summary(rows).replace("\n", "\n\n") + "\n\n" + cp_table(rows))
    if have_matplotlib():
        paths.append(plot_efficiency(rows, os.path.join(out_dir, "cp_efficiency.png"), device))
    else:
        write("matplotlib is not installed (pip install 'ringflash[bench]'): no plots")
    return paths


def main(argv=None) -> int:
    from ..cp.layout import STRATEGIES

    parser = argparse.ArgumentParser(prog="ringflash bench cp")
    parser.add_argument("--world-size", type=int, default=None, help="GPUs to use (default: all visible)")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=None, metavar="W",
                        help="run once per world size (e.g. 2 4 8), for the efficiency-vs-W plot")
    parser.add_argument("--cases", nargs="+", default=None, choices=list(CASES),
                        help="batches (default: mixed single; with --simulate all three)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help="run only these variants: a strategy name or a full variant label (default: all)")
    parser.add_argument("--csv", default=None, help="CSV of the results (default bench_out/cp.csv; with "
                        "--simulate none unless given)")
    parser.add_argument("--out", metavar="DIR", help="also write cp.csv, cp.md and cp_efficiency.png into DIR "
                        "(--simulate: cp_simulate.csv, .md, _balance.png, _model.png)")
    parser.add_argument("--from-csv", nargs="+", metavar="CSV",
                        help="measure nothing: print the report of saved cp CSVs (several: e.g. one per world "
                             "size; or --simulate CSVs) and with --out write it and the plot; needs no GPU")
    sim = parser.add_argument_group("--simulate: the compute balance of the layouts on one device (issue 18)")
    sim.add_argument("--simulate", type=int, nargs="+", metavar="W",
                     help="run every rank of W-rank plans alone on one device (no communication): per-rank "
                          "forward and fwd+bwd times, max/mean balance and the cost model's error")
    sim.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                     help="cuda: do_bench medians, bf16, Llama-3-8B heads; cpu: wall-clock medians of the "
                          "interpreted kernels at toy sizes, float32 (a smoke test of the plumbing)")
    sim.add_argument("--quick", action="store_true", help="GPU: 2k tokens per GPU instead of 8k; --device cpu: "
                     "one strategy per engine (balanced, zigzag_ring, ulysses, hybrid) and auto, two batches")
    sim.add_argument("--strategies", nargs="+", metavar="NAME", choices=list(STRATEGIES) + ["auto"],
                     help="default: all, and auto's choice")
    sim.add_argument("--tokens-per-gpu", type=int, default=None, help="default 8192 (--quick 2048, cpu 16)")
    sim.add_argument("--ulysses-degree", type=int, default=2, help="hybrid's Ulysses group size (default 2)")
    sim.add_argument("--min-piece", type=int, default=None,
                     help="balanced's shortest chunk (default 256, scaled down with --tokens-per-gpu)")
    sim.add_argument("--tflops", type=float, default=None,
                     help="the model's kernel rate for the 'default rate' predictions (default cost.Machine's)")
    sim.add_argument("--fit", action="store_true",
                     help="also fit cost.Machine's forward and step models (rates and layout.CostModel "
                          "terms) to the measured ranks and print them, with the largest error per strategy "
                          "(works with --from-csv; an older CSV's model columns are computed from its layouts)")
    sim.add_argument("--estimate", action="store_true", help="measure nothing: print the run's estimated GPU time")
    sim.add_argument("--csv-only", action="store_true", help="with --out, write only the CSV")
    sim.add_argument("--no-plots", action="store_true", help="with --out, write no PNG")
    args = parser.parse_args(argv)
    from .common import device_description, read_csv_rows, write_csv

    if args.simulate and not args.from_csv:
        from . import cp_simulate

        return cp_simulate.main(args)
    if args.from_csv:
        rows = read_csv_rows(args.from_csv)
        from . import cp_simulate

        if cp_simulate.is_simulate_csv(rows):
            return cp_simulate.redraw(args, rows)
        devices = sorted({str(r["device"]) for r in rows if r.get("device")})
        device = ", ".join(devices) or "device not recorded in " + ", ".join(map(os.path.basename, args.from_csv))
        if args.out:
            print("wrote " + ", ".join(write_outputs(rows, args.out, device)))
        print(single_gpu_summary(rows))
        print(cp_table(rows))
        return 0
    from ..cp.launch import run_local

    args.cases = args.cases or ["mixed", "single"]
    args.csv = args.csv or "bench_out/cp.csv"
    variants = VARIANTS if args.variants is None else [
        v for v in VARIANTS if v[0] in args.variants or v[1] in args.variants]
    if not variants:
        raise SystemExit(f"--variants: {args.variants} match none of: {', '.join(v[0] for v in VARIANTS)}")
    visible = torch.cuda.device_count()
    if visible < 2:
        raise SystemExit(f"ringflash bench cp needs at least 2 GPUs; {visible} visible "
                         "(--from-csv redraws a saved report without any)")
    worlds = args.world_sizes or [args.world_size or visible]
    if min(worlds) < 2 or max(worlds) > visible:
        raise SystemExit(f"ringflash bench cp: world sizes must be 2..{visible} (the visible GPUs); got {worlds}")
    rows = []
    for world in worlds:
        device = f"{device_description()} x {world}"
        print(f"device: {device}", flush=True)
        for r in run_local(bench_worker, world, (args.cases, args.iters, variants), backend="nccl", timeout=1800)[0]:
            r["device"] = device_description()
            rows.append(r)
    device = device_description()
    keys = sorted({k for r in rows for k in r})
    write_csv(args.csv, keys, [[r.get(k) for k in keys] for r in rows])
    if args.out:
        print("wrote " + ", ".join(write_outputs(rows, args.out, device)))
    print()
    print(single_gpu_summary(rows))
    print(f"Times per call over {CHAIN} back-to-back calls; 'one call' times a single fwd+bwd from an idle GPU.")
    print(cp_table(rows))
    return 0
