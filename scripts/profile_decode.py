"""Where does an eager decode call's time go? (a development tool, not part of the package)

`bench decode` measures a Python call of `flash_attn_with_kvcache` at batch 8 (8k cached
keys, 32/8 heads, d=128) at about twice the kernel's time, and the paged cache's call at 1.6x
the contiguous one's, while CUDA-graph replays of both match FA2 and the host probe
(`bench tune --only-overhead`) gives them the same Python cost. For each call below this
prints, over ``--calls`` back-to-back calls:

  * wall-clock time per call (host-bound when the GPU waits on the launches);
  * ``triton.testing.do_bench`` per call (as `bench decode`'s "call" pass: L2 flushed
    before each call, one call between CUDA events);
  * torch.profiler's per-op summary of a few calls (CPU time per op and launch, CUDA time
    per kernel), and a chrome trace per call in $OUT (or --out).

    python scripts/profile_decode.py [--calls 200] [--out DIR]

On a machine without a GPU it runs the same calls interpreted at tiny sizes (a test that it
runs; the times mean nothing).
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def make_calls(dev: str) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ringflash import flash_attn_func, flash_attn_with_kvcache

    gpu = dev == "cuda"
    b, sk, hq, hk, d, page = (8, 8192, 32, 8, 128, 256) if gpu else (2, 512, 4, 2, 16, 256)
    dtype = torch.bfloat16 if gpu else torch.float16  # the interpreter's bf16 dot is wrong
    q = torch.randn(b, 1, hq, d, device=dev, dtype=dtype)
    k, v = (torch.randn(b, sk, hk, d, device=dev, dtype=dtype) for _ in range(2))
    lengths = torch.full((b,), sk, dtype=torch.int32, device=dev)
    pages = b * sk // page
    block_table = torch.randperm(pages, device=dev).to(torch.int32).reshape(b, -1)
    k_paged, v_paged = (torch.empty(pages, page, hk, d, device=dev, dtype=dtype) for _ in range(2))
    for x, paged in ((k, k_paged), (v, v_paged)):  # the same keys, page by page
        paged[block_table.flatten().long()] = x.reshape(pages, page, hk, d)

    def sdpa_fa2():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True)

    calls = {
        "kvcache": lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=lengths, causal=True),
        "kvcache paged": lambda: flash_attn_with_kvcache(q, k_paged, v_paged, cache_seqlens=lengths,
                                                         block_table=block_table, causal=True),
        "flash_attn_func": lambda: flash_attn_func(q, k, v, causal=True),
    }
    if gpu:
        calls["SDPA FA2"] = sdpa_fa2
    return calls


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {value}; expected at least 1")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=_positive, default=200, help="timed calls per row (at least 1)")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/ringflash_out"))
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from torch.profiler import ProfilerActivity, profile

    dev = "cuda" if gpu else "cpu"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    calls = make_calls(dev)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name, fn in calls.items():
        for _ in range(min(20, args.calls)):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            fn()
        sync()
        wall_us = (time.perf_counter() - t0) / args.calls * 1e6
        bench_us = None
        if gpu:
            import triton

            bench_us = 1e3 * triton.testing.do_bench(fn, return_mode="median")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with profile(activities=activities) as prof:
            for _ in range(5):
                fn()
            sync()
        prof.export_chrome_trace(os.path.join(args.out, f"decode_{name.replace(' ', '_')}.json"))
        print(f"\n=== {name}: {wall_us:.1f} us per call back to back"
              + (f"; do_bench {bench_us:.1f} us per call" if bench_us is not None else ""))
        sort = "self_cuda_time_total" if gpu else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=12))
        rows.append((name, wall_us, bench_us))
    print("\n| call | back-to-back us | do_bench us |\n|---|---|---|")
    for name, wall, bench in rows:
        print(f"| {name} | {wall:.1f} | {'-' if bench is None else f'{bench:.1f}'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
