"""``ringflash bench cp``: context-parallel attention on the local GPUs (NCCL, one process
per GPU), every strategy and mode, forward and forward+backward.

Llama-3-8B attention (32 query heads, 8 KV heads, d=128), bf16, causal, 8k tokens per
GPU; one packed batch of mixed document lengths and one single document. Efficiency =
(single-GPU time of our kernel on the whole global batch / W) / CP time, where a CP time
is the slowest rank's median over repeated samples of back-to-back calls (see ``_timed``)
and the single-GPU time is measured the same way on the same GPUs in the same run. The
forward+backward efficiency of a single call from an idle GPU is reported beside it, and
each rank's peak memory.
"""

from __future__ import annotations

import argparse
from typing import Optional

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


def _lengths(world: int, case: str) -> list[int]:
    total = TOKENS_PER_GPU * world
    if case == "single":
        return [total]
    return [total // 2, total // 4, total // 8, total // 16, total // 32, total // 32]


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

    cases, iters, variants = payload
    dev = torch.device("cuda", torch.cuda.current_device())
    rows = []
    for case in cases:
        # Single GPU, whole global batch (every rank measures it on its own GPU).
        _, cu, (q_all, k_all, v_all, do_all), single, single_step = case_inputs(world, case, dev)
        single_fwd = _timed(single, iters)
        single_total = _timed(single_step, iters)
        single_cold = _timed(single_step, iters, chain=1)
        ref = single().detach()
        for label, strategy, options in variants:
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
                print(f"  {case} {label}: fwd {fwd:.3f} ms ({r['fwd_eff']:.0%}), fwd+bwd {total_ms:.3f} ms "
                      f"({r['fwd_bwd_eff']:.0%}), one call {cold_ms:.3f} ms ({r['fwd_bwd_cold_eff']:.0%}), peak {r['peak_gib']:.2f} GiB, rel err {r['rel_err_vs_single']:.1e}",
                      flush=True)
    return rows if rank == 0 else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ringflash bench cp")
    parser.add_argument("--world-size", type=int, default=None, help="GPUs to use (default: all visible)")
    parser.add_argument("--cases", nargs="+", default=["mixed", "single"], choices=["mixed", "single"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help="run only these variants: a strategy name or a full variant label (default: all)")
    parser.add_argument("--csv", default="bench_out/cp.csv")
    args = parser.parse_args(argv)
    from ..cp.launch import run_local
    from .common import device_description, format_table, write_csv

    variants = VARIANTS if args.variants is None else [
        v for v in VARIANTS if v[0] in args.variants or v[1] in args.variants]
    if not variants:
        raise SystemExit(f"--variants: {args.variants} match none of: {', '.join(v[0] for v in VARIANTS)}")
    world = args.world_size or torch.cuda.device_count()
    if world < 2:
        raise SystemExit(f"ringflash bench cp needs at least 2 GPUs; {torch.cuda.device_count()} visible")
    print(f"device: {device_description()} x {world}", flush=True)
    rows = run_local(bench_worker, world, (args.cases, args.iters, variants), backend="nccl", timeout=1800)[0]
    keys = sorted(rows[0])
    write_csv(args.csv, keys, [[r[k] for k in keys] for r in rows])
    table = [[r["case"], r["variant"], f"{r['fwd_ms']:.2f}", f"{r['fwd_bwd_ms']:.2f}", f"{r['fwd_eff']:.1%}",
              f"{r['fwd_bwd_eff']:.1%}", f"{r['fwd_bwd_cold_eff']:.1%}", f"{r['peak_gib']:.2f}",
              f"{r['rel_err_vs_single']:.1e}"] for r in rows]
    print(f"\nW={world}; single-GPU reference per case (ms, fwd / fwd+bwd / fwd+bwd one call): " + ", ".join(
        sorted({f"{r['case']} {r['single_fwd_ms']:.2f} / {r['single_fwd_bwd_ms']:.2f} / "
                f"{r['single_fwd_bwd_cold_ms']:.2f}" for r in rows})))
    print(f"Times per call over {CHAIN} back-to-back calls; 'one call' times a single fwd+bwd from an idle GPU.")
    print(format_table(["case", "strategy", "fwd ms", "fwd+bwd ms", "fwd eff", "fwd+bwd eff",
                        "fwd+bwd eff, one call", "peak GiB/rank", "rel err vs 1 GPU"], table))
    return 0
