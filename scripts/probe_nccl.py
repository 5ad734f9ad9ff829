"""Time the collectives of one zigzag_llama3 step (2 GPUs, Llama-3-8B K/V, 8k tokens per
GPU) alone under the current NCCL environment: the bf16 K/V all-gather and the float32
dK/dV reduce-scatter. Used to try NCCL settings (channels, protocol) before a full
``ringflash bench cp``; run it once per setting, e.g.

    NCCL_MIN_NCHANNELS=32 python scripts/probe_nccl.py
"""

import os

import torch

from ringflash.cp.comm import Comm
from ringflash.cp.launch import run_local

ROWS, KV_HEADS, HEADDIM = 8192, 8, 128


def worker(rank: int, world: int, _payload):
    import torch.distributed as dist

    comm = Comm()
    dev = torch.device("cuda", torch.cuda.current_device())
    send = torch.randn(ROWS, 2, KV_HEADS, HEADDIM, device=dev, dtype=torch.bfloat16)
    gathered = send.new_empty((world * ROWS,) + tuple(send.shape[1:]))
    grads = torch.randn(world * ROWS, 2, KV_HEADS, HEADDIM, device=dev)
    mine = grads.new_empty((ROWS,) + tuple(grads.shape[1:]))
    out = {}
    for name, fn in (("all_gather bf16", lambda: comm.all_gather(gathered, send).wait()),
                     ("reduce_scatter f32", lambda: comm.reduce_scatter(mine, grads).wait())):
        for _ in range(3):
            fn()
        times = []
        for _ in range(20):
            dist.barrier()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1000)
        out[name] = sorted(times)[len(times) // 2]
    return out


if __name__ == "__main__":
    settings = {k: v for k, v in os.environ.items() if k.startswith("NCCL_") and k != "NCCL_NVLS_ENABLE"}
    res = run_local(worker, 2, None, backend="nccl", timeout=300)
    mb_gather = ROWS * 2 * KV_HEADS * HEADDIM * 2 / 1e6
    for name in res[0]:
        us = max(r[name] for r in res)
        print(f"{settings or 'default'}: {name}: {us:.1f} us (median, slowest rank)"
              + (f", {mb_gather / us * 1e3:.0f} GB/s received per rank" if "gather" in name else ""))
