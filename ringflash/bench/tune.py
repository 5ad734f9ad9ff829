"""``ringflash bench tune``: time every candidate configuration of the three kernels on
representative shapes, print the winners as entries for ``configs.TABLE``, and measure the
forward's technique switches (cache modifier, causal phase split, exp2) and split-KV.

Compiling dozens of Triton variants serially takes minutes of GPU time, so the candidates
are first compiled in parallel worker processes; they land in Triton's on-disk cache and
the timing pass only loads them.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import Optional

import torch

TOKENS = 16384


def _case_inputs(d: int, seqlen: int, varlen: bool = False):
    batch, nheads = TOKENS // seqlen, 2048 // d
    gen = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda: torch.randn(batch, seqlen, nheads, d, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    return [mk().requires_grad_() for _ in range(3)], mk()


#: seqlen value that selects the Llama-3-8B varlen case of `bench kernels` instead of a dense one.
LLAMA_VARLEN = 0


def _run_once(d: int, seqlen: int, causal: bool) -> None:
    from ..interface import flash_attn_func, flash_attn_varlen_func

    if seqlen == LLAMA_VARLEN:
        from .kernels import LLAMA_LENGTHS

        gen = torch.Generator(device="cuda").manual_seed(0)
        total, max_len = sum(LLAMA_LENGTHS), max(LLAMA_LENGTHS)
        cu = torch.tensor([0] + torch.tensor(LLAMA_LENGTHS).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
        mk = lambda h: torch.randn(total, h, 128, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
        q, k, v = mk(32).requires_grad_(), mk(8).requires_grad_(), mk(8).requires_grad_()
        out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=causal)
        torch.autograd.grad(out, (q, k, v), mk(32))
        return
    (q, k, v), dout = _case_inputs(d, seqlen)
    out = flash_attn_func(q, k, v, causal=causal)
    torch.autograd.grad(out, (q, k, v), dout)


def _compile_worker(job) -> Optional[str]:
    """Run one (case, config) once so that Triton compiles it into the on-disk cache."""
    d, seqlen, causal, cfg = job
    from ..kernels import configs

    try:
        with configs.override(fwd=cfg, dkdv=cfg, dq=cfg):
            _run_once(d, seqlen, causal)
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # out of shared memory etc.: the timing pass skips it too
        return f"{cfg}: {type(exc).__name__}"


def precompile(cases, workers: int) -> None:
    from ..kernels import configs

    # Every kind's candidates (a job compiles all three kernels with one config).
    jobs = [(d, s, c, cfg) for (d, s, c) in cases
            for cfg in dict.fromkeys(x for kind in configs.KINDS for x in configs.candidates(kind, d))]
    ctx = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        failures = [f for f in pool.map(_compile_worker, jobs) if f]
    print(f"precompiled {len(jobs)} variants in {workers} processes; {len(failures)} did not run", flush=True)


def _kind_ms(kind: str, d: int, seqlen: int, causal: bool, cfg) -> float:
    """Time one kernel alone with a given config (others from the table)."""
    from ..kernels import configs
    from .common import bench_ms

    with configs.override(**{kind: cfg}):
        _run_once(d, seqlen, causal)
        (q, k, v), dout = _case_inputs(d, seqlen)
        from ..interface import flash_attn_func

        if kind == "fwd":
            return bench_ms(lambda: flash_attn_func(q, k, v, causal=causal))
        out = flash_attn_func(q, k, v, causal=causal)
        return bench_ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ringflash bench tune")
    parser.add_argument("--headdims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--skip-ablations", action="store_true")
    parser.add_argument("--only-splits", action="store_true", help="run only the split-KV sweep")
    parser.add_argument("--only-overhead", action="store_true", help="run only the host-overhead probe")
    parser.add_argument("--llama-varlen", action="store_true",
                        help="tune on the Llama-3-8B varlen case of `bench kernels` (GQA 32/8, d=128) instead")
    parser.add_argument("--calls", type=int, default=500, help="timed calls per row of --only-overhead")
    args = parser.parse_args(argv)
    if args.only_overhead and not torch.cuda.is_available():  # the whole path, interpreted (tests)
        host_overhead("cpu", args.calls)
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("ringflash bench tune needs a CUDA GPU")
    from ..kernels import configs
    from .common import attn_flops, device_description, format_table, tflops

    print(f"device: {device_description()}", flush=True)
    if args.only_splits:
        split_sweep()
        return 0
    if args.only_overhead:
        host_overhead("cuda", args.calls)
        return 0
    if args.llama_varlen:
        cases = [(128, LLAMA_VARLEN, c) for c in (False, True)]
    else:
        cases = [(d, args.seqlen, c) for d in args.headdims for c in (False, True)]
    precompile(cases, args.workers)

    os.environ["RINGFLASH_AUTOTUNE"] = "1"
    winners: dict[str, dict[int, object]] = {k: {} for k in configs.KINDS}
    for d, seqlen, causal in cases:
        configs._tuned.clear()
        configs.tuning_log.clear()
        _run_once(d, seqlen, causal)
        if seqlen == LLAMA_VARLEN:
            from .common import varlen_flops
            from .kernels import LLAMA_LENGTHS

            flops = varlen_flops(LLAMA_LENGTHS, 32, 128, causal)
        else:
            flops = attn_flops(TOKENS // seqlen, 2048 // d, seqlen, seqlen, d, causal)
        for key, log in configs.tuning_log.items():
            kind = key[0]
            timed = sorted((ms, str(cfg)) for cfg, ms in log if ms is not None)
            print(f"\n{kind} d={d} causal={causal} s={seqlen}: best of {len(timed)}")
            # dkdv and dq share the backward's FLOPs; report each kernel's ms and its share.
            scale = 1.0 if kind == "fwd" else 2.5
            rows = [[f"{ms:.3f}", f"{tflops(scale * flops, ms):.0f}", cfg] for ms, cfg in timed[:6]]
            print(format_table(["ms", "TFLOP/s (fwd, or bwd flops/this kernel)", "config"], rows))
            best = configs._tuned[key]
            winners[kind].setdefault(d, {})[causal] = best
    os.environ["RINGFLASH_AUTOTUNE"] = "0"
    print("\nwinners (kind, headdim, causal):")
    for kind, by_d in winners.items():
        for d, by_c in by_d.items():
            for causal, cfg in by_c.items():
                print(f"  {kind} d={d} causal={causal}: {cfg}")

    if args.skip_ablations or args.llama_varlen or 128 not in winners["fwd"]:
        return 0
    split_sweep()
    # Technique switches on the forward, each against the tuned config, d=128.
    print("\nforward technique switches (d=128, s=%d):" % args.seqlen)
    rows = []
    for causal in (False, True):
        base = winners["fwd"][128][causal]
        flops = attn_flops(TOKENS // args.seqlen, 16, args.seqlen, args.seqlen, 128, causal)
        variants = {
            "tuned": base,
            "kv .cg": replace(base, kv_cache=".cg"),
            "one masked loop": replace(base, split_phases=False),
            "exp (not exp2)": replace(base, exp2=False),
        }
        ref_ms = None
        for name, cfg in variants.items():
            ms = _kind_ms("fwd", 128, args.seqlen, causal, cfg)
            ref_ms = ref_ms or ms
            rows.append([f"{'causal' if causal else 'full'}", name, f"{ms:.3f}", f"{tflops(flops, ms):.0f}", f"{ref_ms / ms:.3f}"])
    print(format_table(["mask", "variant", "ms", "TFLOP/s", "speed vs tuned"], rows))

    return 0


#: (batch, seqlen_q, seqlen_k) of ``split_sweep``: few query blocks, long keys.
SPLIT_SHAPES = ((1, 1, 32768), (1, 128, 32768), (4, 64, 8192), (2, 1024, 16384), (8, 1, 4096))
SPLIT_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16)


def split_sweep(dev: str = "cuda", shapes=SPLIT_SHAPES, counts=SPLIT_COUNTS) -> None:
    """Forward time against the number of key splits on shapes with few query blocks.
    ``dev="cpu"`` runs the same path interpreted at the given (toy) shapes (a test of this
    sweep; its times mean nothing)."""
    from ..interface import flash_attn_func
    from ..kernels import configs
    from ..kernels.fwd import attention_forward
    # make_problem lives in kernels.problem (it was imported from kernels.fwd, which does
    # not export it, and called with an extra batch argument: --only-splits crashed).
    from ..kernels.problem import make_problem
    from .common import bench_ms, cpu_wall_ms, format_table

    timer = bench_ms if dev == "cuda" else (lambda fn: cpu_wall_ms(fn, warmup=0, reps=1))
    dtype = torch.bfloat16 if dev == "cuda" else torch.float16  # the interpreter's bf16 dot is wrong
    heads, d = (16, 128) if dev == "cuda" else (2, 16)
    print(f"\nsplit-KV sweep ({str(dtype).removeprefix('torch.')}, d={d}, {heads} heads, full attention): "
          "forward ms by number of splits")
    rows = []
    for batch, sq, sk in shapes:
        gen = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(batch, sq, heads, d, device=dev, dtype=dtype, generator=gen)
        k = torch.randn(batch, sk, heads, d, device=dev, dtype=dtype, generator=gen)
        v = torch.randn_like(k)
        prob = make_problem(q, k, None, sq, sk, d ** -0.5, False, -1, -1, 0.0)
        row = [f"b={batch} sq={sq} sk={sk}"]
        for n in counts:
            with configs.override(num_splits=n):
                row.append(f"{timer(lambda: attention_forward(q, k, v, prob)):.3f}")
        row.append(f"{timer(lambda: attention_forward(q, k, v, prob)):.3f}")
        row.append(f"{timer(lambda: flash_attn_func(q, k, v)):.3f}")
        rows.append(row)
    print(format_table(["shape"] + [f"S={n}" for n in counts] + ["heuristic", "api (heuristic)"], rows))


def host_overhead(dev: str = "cuda", calls: int = 500) -> None:
    """Host time per call of each layer and entry point on tiny problems (the GPU work is
    negligible, so a loop of calls measures the host), as wall-clock microseconds per call
    over ``calls`` calls, synchronizing once at the end; then cProfile of the launcher and of
    a decode step. ``dev="cpu"`` runs the same path interpreted (a test of this probe; its
    times mean nothing)."""
    import time

    from .. import ops
    from ..interface import _options, flash_attn_func, flash_attn_varlen_func
    from ..kernels.fwd import attention_forward
    from ..kernels.problem import make_problem
    from ..kvcache import flash_attn_with_kvcache
    from ..validation import check_dense_qkv
    from .common import format_table

    bf16 = torch.bfloat16 if dev == "cuda" else torch.float16  # the interpreter's bf16 dot is wrong
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    q = torch.randn(1, 128, 4, 64, device=dev, dtype=bf16)
    prob = make_problem(q, q, None, 128, 128, 0.125, False, -1, -1, 0.0)
    qg = q.clone().requires_grad_()
    grad = torch.randn_like(q)
    # A decode step at b=8, 32/8 heads, d=128 with 256 cached keys (a few us of GPU work).
    b, sk = 8, 256
    hq, hk, d = (32, 8, 128) if dev == "cuda" else (4, 2, 16)  # interpreted: small
    dq = torch.randn(b, 1, hq, d, device=dev, dtype=bf16)
    kc, vc = (torch.randn(b, sk, hk, d, device=dev, dtype=bf16) for _ in range(2))
    seqlens = torch.full((b,), sk, dtype=torch.int32, device=dev)
    cu_q = torch.arange(b + 1, dtype=torch.int32, device=dev)
    cu_k = cu_q * sk
    qp, kp, vp = dq.view(b, hq, d), kc.view(b * sk, hk, d), vc.view(b * sk, hk, d)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_fa2_decode():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(
                dq.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), enable_gqa=True)

    qgt, qt, gradt = (x.transpose(1, 2) for x in (qg, q, grad))

    def sdpa_fa2_step():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION if dev == "cuda" else SDPBackend.MATH):
            torch.nn.functional.scaled_dot_product_attention(qgt, qt, qt).backward(gradt)

    def varlen_decode():
        old = os.environ.get("RINGFLASH_DECODE")
        os.environ["RINGFLASH_DECODE"] = "1"
        try:
            return flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, 1, sk, causal=True)
        finally:
            if old is None:
                del os.environ["RINGFLASH_DECODE"]
            else:
                os.environ["RINGFLASH_DECODE"] = old

    import triton

    @triton.jit
    def _one_arg(X):
        pass

    layers = {
        "flash_attn_func": lambda: flash_attn_func(q, q, q),
        "flash_attn_func (requires_grad)": lambda: flash_attn_func(qg, q, q),
        "flash_attn_func fwd+bwd (requires_grad)": lambda: flash_attn_func(qg, q, q).backward(grad),
        "SDPA FA2 fwd+bwd (requires_grad)": sdpa_fa2_step,
        # The layers above the launcher, one at a time (what flash_attn_func adds to it).
        "  validation: check_dense_qkv": lambda: check_dense_qkv(q, q, q),
        # (batch, nheads, headdim, seqlen_k, device) last, as flash_attn_func passes them (seqlen_k
        # was missing since _options took it: the probe raised a TypeError at this row).
        "  options (interface._options)": lambda: _options(0.0, None, False, (-1, -1), 0.0, None, False, False, 1, 4,
                                                           64, 128, q.device),
        "  make_problem": lambda: make_problem(q, q, None, 128, 128, 0.125, False, -1, -1, 0.0),
        "  ops.fwd (the op's implementation, no dispatcher)": lambda: ops.fwd(
            q, q, q, None, None, None, None, None, 128, 128, 0.125, False, -1, -1, 0.0),
        "torch.ops.ringflash.attn_fwd": lambda: torch.ops.ringflash.attn_fwd(q, q, q, None, None, None, None, None, 128, 128, 0.125, False, -1, -1, 0.0),
        "attention_forward (launcher)": lambda: attention_forward(q, q, q, prob),
        "decode b=8: flash_attn_with_kvcache": lambda: flash_attn_with_kvcache(dq, kc, vc, cache_seqlens=seqlens,
                                                                               causal=True),
        "decode b=8: flash_attn_func": lambda: flash_attn_func(dq, kc, vc, causal=True),
        "decode b=8: varlen (RINGFLASH_DECODE=1)": varlen_decode,
        "decode b=8: SDPA FA2": sdpa_fa2_decode,
        "Triton launch floor (empty kernel, 1 arg)": lambda: _one_arg[(1,)](q),
        "torch.empty x2 (allocation floor)": lambda: (torch.empty_like(q), torch.empty(1, 4, 128, device=dev)),
    }
    rows = []
    for name, fn in layers.items():
        for _ in range(min(20, calls)):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        rows.append([name, f"{(time.perf_counter() - t0) / calls * 1e6:.1f}"])
    print("\nhost overhead per call (us; 1x128x4x64 bf16, decode: b=8 sk=256 32/8 heads d=128):")
    print(format_table(["layer", "us/call"], rows))
    import cProfile
    import io
    import pstats

    for title, fn in (("launcher", lambda: attention_forward(q, q, q, prob)),
                      ("decode step (flash_attn_with_kvcache)", layers["decode b=8: flash_attn_with_kvcache"]),
                      ("training step (flash_attn_func fwd+bwd)", layers["flash_attn_func fwd+bwd (requires_grad)"])):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(min(300, calls)):
            fn()
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
        print(f"\n{title} profile ({min(300, calls)} calls, by own time):")
        print("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[-2500:])
