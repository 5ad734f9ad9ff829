"""Where does a context-parallel step's time go? (a development tool, not part of the package)

On W local GPUs over NCCL, for the `bench cp` cases, prints per rank:
  * the CP step's forward and forward+backward time (as `bench cp` measures them);
  * the same local attention without communication: the local kernels against the
    already-gathered keys (what the step would cost with free, perfectly overlapped comm);
  * the single-GPU time of the whole batch / W;
and writes a torch.profiler trace of one forward+backward per rank to $OUT (chrome JSON),
plus a per-kernel summary table of rank 0.

    python scripts/profile_cp.py [--strategy zigzag_llama3] [--cases mixed single]
"""

from __future__ import annotations

import argparse
import os

import torch


# (block_m, block_n, num_warps, num_stages); the first of each is the sm_90 table's GQA causal entry.
DKDV_CANDS = [(64, 128, 8, 3), (64, 64, 4, 2), (128, 128, 8, 2), (64, 128, 8, 2), (128, 64, 8, 3), (32, 128, 4, 3)]
DQ_CANDS = [(128, 64, 8, 4), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 8, 3)]


def worker(rank: int, world: int, payload):
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from ringflash.bench.cp import HEADDIM, NHEADS, NHEADS_K, _timed, case_inputs
    from ringflash.cp import Plan
    from ringflash.cp.local import LocalParams, local_backward, local_forward
    from ringflash.kernels import configs
    from ringflash.kernels.bwd import prepare_backward
    from ringflash.kernels.configs import KernelConfig

    cases, strategy, options, out_dir, sweep_configs = payload
    dev = torch.device("cuda", torch.cuda.current_device())
    lines = []
    for case in cases:
        lengths, cu, (q_all, k_all, v_all, do_all), single, single_step = case_inputs(world, case, dev)
        total = sum(lengths)
        s_fwd = _timed(single, 7)
        s_tot = _timed(single_step, 7)

        plan = Plan(cu, strategy=strategy)
        q, k, v = (plan.shard(t).requires_grad_() for t in (q_all, k_all, v_all))
        dout = plan.shard(do_all)
        attend = lambda: plan.attention(q, k, v, causal=True, **options)  # noqa: E731
        step = lambda: torch.autograd.grad(attend(), (q, k, v), dout)  # noqa: E731
        c_fwd = _timed(attend, 7)
        c_tot = _timed(step, 7)

        # Local kernels only, against keys already gathered in global order.
        spec = plan._allgather_spec()
        params = LocalParams(HEADDIM ** -0.5, True, -1, -1, 0.0)
        mode = options.get("mode", "grouped")
        qd, doutd = q.detach(), dout.contiguous()
        out = torch.empty_like(qd)
        lse = torch.empty(NHEADS, qd.shape[0], dtype=torch.float32, device=dev)
        kd, vd = k_all, v_all
        fwd_only = lambda: local_forward(qd, kd, vd, spec.meta, params, spec.max_q, spec.max_k,  # noqa: E731
                                         out=out, lse=lse, mode=mode)
        fwd_only()
        dq = torch.empty_like(qd)
        dkv = torch.empty((total, 2, NHEADS_K, HEADDIM), dtype=torch.float32, device=dev)

        def bwd_only():
            prob = params.problem(qd, kd, spec.meta, spec.max_q, spec.max_k)
            prepared = prepare_backward(doutd, out, lse, prob)
            local_backward(doutd, qd, kd, vd, out, lse, spec.meta, params, spec.max_q, spec.max_k,
                           dq=dq, dk=dkv[:, 0], dv=dkv[:, 1], prepared=prepared, mode=mode)

        l_fwd = _timed(fwd_only, 7)
        l_bwd = _timed(bwd_only, 7)

        # Backward launch configurations: the local problem (this rank) against the
        # single-GPU problem, one kernel's config varied at a time.
        sweep = []
        if sweep_configs:
            for kind, cands in (("dkdv", DKDV_CANDS), ("dq", DQ_CANDS)):
                for cfg in cands:
                    with configs.override(**{kind: KernelConfig(*cfg)}):
                        try:
                            loc = _timed(bwd_only, 5)
                            glob = (_timed(single_step, 5) - s_fwd) / world
                        except Exception as exc:  # out of resources
                            loc = glob = float("nan")
                            print(f"rank {rank} {kind} {cfg}: {type(exc).__name__}", flush=True)
                    sweep.append(f"  {kind} {cfg}: local bwd {loc:.3f} ms, single-GPU bwd / W {glob:.3f} ms")
        with profile(activities=[ProfilerActivity.CUDA]) as sprof:
            single_step()
            torch.cuda.synchronize()

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                dist.barrier()
                step()
            torch.cuda.synchronize()
        if rank > 0:
            lines.append(f"rank {rank} {case}: local kernels fwd {l_fwd:.3f} bwd {l_bwd:.3f}; "
                         f"CP fwd {c_fwd:.3f} bwd {c_tot - c_fwd:.3f} ms")
        prof.export_chrome_trace(os.path.join(out_dir, f"trace_{case}_rank{rank}.json"))
        if rank == 0:
            lines.append(f"\n== {case} ({strategy} {options}), W={world}")
            lines.append(f"single-GPU/W    fwd {s_fwd / world:.3f}  bwd {(s_tot - s_fwd) / world:.3f}  "
                         f"total {s_tot / world:.3f} ms")
            lines.append(f"local kernels   fwd {l_fwd:.3f}  bwd {l_bwd:.3f}  total {l_fwd + l_bwd:.3f} ms")
            lines.append(f"CP step         fwd {c_fwd:.3f}  bwd {c_tot - c_fwd:.3f}  total {c_tot:.3f} ms")
            lines += sweep
            lines.append("single-GPU step kernels:")
            lines.append(sprof.key_averages().table(sort_by="device_time_total", row_limit=8, max_name_column_width=40))
            lines.append(prof.key_averages().table(sort_by="device_time_total", row_limit=25, max_name_column_width=60))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="zigzag_llama3")
    parser.add_argument("--mode", default=None)
    parser.add_argument("--cases", nargs="+", default=["mixed", "single"])
    parser.add_argument("--sweep", action="store_true", help="time other backward launch configurations")
    args = parser.parse_args()
    from ringflash.cp.launch import run_local

    out_dir = os.environ.get("OUT", "/tmp/ringflash_out")
    os.makedirs(out_dir, exist_ok=True)
    options = {} if args.mode is None else {"mode": args.mode}
    reports = run_local(worker, torch.cuda.device_count(), (args.cases, args.strategy, options, out_dir, args.sweep),
                        backend="nccl", timeout=900)
    for lines in reports:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
