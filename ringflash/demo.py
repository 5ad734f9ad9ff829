"""``ringflash demo``: environment, then every available attention implementation checked
against the float64 reference and timed, at a representative size (small on the CPU)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .reference import attention_ref
from .testing import error_stats


@dataclass
class Problem:
    batch: int
    seqlen: int
    nheads: int
    nheads_k: int
    headdim: int
    dtype: torch.dtype
    causal: bool
    device: torch.device

    def __str__(self) -> str:
        return (
            f"batch={self.batch} seqlen={self.seqlen} nheads={self.nheads}/{self.nheads_k} "
            f"headdim={self.headdim} dtype={str(self.dtype).replace('torch.', '')} causal={self.causal} "
            f"device={self.device}"
        )


# An implementation maps dense (q, k, v, causal) -> out with q (b, s, h, d), k/v (b, s, hk, d).
Implementation = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


def _expand_kv(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x.repeat_interleave(q.shape[2] // x.shape[2], dim=2)


def _pytorch_fa2(q, k, v, causal):
    from .pytorch_fa2 import FlashAttentionPyTorchFunc

    b, s, h, d = q.shape
    fold = lambda x: x.transpose(1, 2).reshape(b * h, x.shape[1], d)  # noqa: E731
    out = FlashAttentionPyTorchFunc.apply(fold(q), fold(_expand_kv(q, k)), fold(_expand_kv(q, v)), causal)
    return out.reshape(b, h, s, d).transpose(1, 2)


def _torch_sdpa(q, k, v, causal):
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), _expand_kv(q, k).transpose(1, 2), _expand_kv(q, v).transpose(1, 2), is_causal=causal
    )
    return out.transpose(1, 2)


def _grouped_zigzag(q, k, v, causal):
    """Grouped attention as the zigzag local step of world size 1: each sequence's two
    halves are the two query groups, against prefixes of the shared K/V. Together they
    equal causal attention over the whole sequences."""
    from .grouped import grouped_flash_attn_varlen_func, zigzag_group_ranges

    if not causal:
        raise ValueError("the zigzag step is causal")
    b, s, h, d = q.shape
    cu_k = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q.device)
    cu_q, used, max_q = zigzag_group_ranges(cu_k, s, [0, 1], 2)
    halves = q.reshape(b, 2, s // 2, h, d)
    q_list = [halves[:, c].reshape(b * s // 2, h, d) for c in (0, 1)]
    outs, _ = grouped_flash_attn_varlen_func(
        q_list, k.reshape(b * s, -1, d), v.reshape(b * s, -1, d), cu_q, cu_k, used, max_q, s
    )
    return torch.stack([o.reshape(b, s // 2, h, d) for o in outs], dim=1).reshape(b, s, h, d)


def implementations() -> dict[str, Implementation]:
    impls: dict[str, Implementation] = {
        "torch sdpa": _torch_sdpa,
        "pytorch_fa2 (tiled)": _pytorch_fa2,
    }
    try:
        from .interface import flash_attn_func
    except ImportError:
        return impls
    impls["ringflash triton"] = lambda q, k, v, causal: flash_attn_func(q, k, v, causal=causal)
    impls["ringflash grouped (zigzag step)"] = _grouped_zigzag
    return impls


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds; do_bench on the GPU, a few wall-clock runs on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, return_mode="median"))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def _kernels_interpreted() -> Optional[bool]:
    """Whether this process's kernels run in Triton's interpreter, as fixed when ringflash
    was imported (None without Triton). Setting TRITON_INTERPRET later changes nothing."""
    try:
        from .kernels.common import interpreting
    except ImportError:
        return None
    return interpreting()


def describe_environment(device: torch.device) -> list[str]:
    lines = [f"python {platform.python_version()}, torch {torch.__version__}"]
    try:
        import triton

        # What the kernels were built as, not the environment variable now: the demo used
        # to print "interpreted" for --device cpu whatever the kernels were.
        mode = "interpreted (TRITON_INTERPRET=1)" if _kernels_interpreted() else "compiled"
        lines.append(f"triton {triton.__version__}: {mode}")
    except ImportError:
        lines.append("triton: not installed")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"device: {props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs)")
    else:
        lines.append(f"device: CPU{'' if torch.cuda.is_available() else ' (no CUDA GPU)'}: small sizes")
    return lines


def cp_demo_worker(rank: int, world_size: int, payload: tuple) -> Optional[tuple]:
    """One rank of the demo's context-parallel run: shard, attend, gather; rank 0 checks."""
    import torch.distributed as dist

    from .cp import Plan

    strategy, lengths, heads, headdim, dtype_name = payload
    dtype = getattr(torch, dtype_name)
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    total = sum(lengths)
    mk = lambda h: torch.randn(total, h, headdim, generator=gen, dtype=torch.float64).to(dev)  # noqa: E731
    q64, k64, v64, do64 = mk(heads[0]), mk(heads[1]), mk(heads[1]), mk(heads[0])
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    plan = Plan(cu, strategy=strategy)
    q, k, v = (plan.shard(t.to(dtype)).requires_grad_() for t in (q64, k64, v64))

    def step():
        out = plan.attention(q, k, v, causal=True)
        return out, torch.autograd.grad(out, (q, k, v), plan.shard(do64.to(dtype)))

    out, grads = step()  # warm-up (compilation)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    out, grads = step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    gathered = [plan.gather(x) for x in (out, *grads)]
    if rank != 0:
        return None
    # Single-process attention on the whole batch, in float64 (ground truth).
    leaves = [t.requires_grad_() for t in (q64, k64, v64)]
    from .reference import attention_varlen_ref

    ref_out, _ = attention_varlen_ref(*leaves, cu, cu, max(lengths), max(lengths), causal=True)
    ref_grads = torch.autograd.grad(ref_out, leaves, do64)
    out_err = error_stats(gathered[0], ref_out).rel
    grad_err = max(error_stats(g, r).rel for g, r in zip(gathered[1:], ref_grads))
    return out_err, grad_err, ms


def run_cp_demo(device: torch.device, world_size: int, strategy: str) -> tuple:
    """Spawn ``world_size`` local processes (NCCL with a GPU each if there are enough GPUs,
    else gloo on the CPU) and run context-parallel attention; returns a table row."""
    from .cp.launch import run_local

    use_nccl = device.type == "cuda" and torch.cuda.device_count() >= world_size
    if use_nccl:
        payload = (strategy, [8192, 4096, 2048, 1024, 512, 512], (32, 8), 128, "bfloat16")
    else:
        payload = (strategy, [96, 17, 1, 40], (4, 2), 32, "float32")
    backend = "nccl" if use_nccl else "gloo"
    results = run_local(cp_demo_worker, world_size, payload, backend=backend, timeout=600)
    out_err, grad_err, ms = results[0]
    # Say where it ran: with fewer GPUs than ranks (a 1-GPU machine) the ranks are CPU
    # processes running the kernels in Triton's interpreter, at small sizes.
    where = f"NCCL, {world_size} GPUs" if use_nccl else "gloo on the CPU, interpreted, small sizes"
    name = f"context parallel ({strategy}, {world_size} ranks, {where})"
    return name, out_err, grad_err, None, ms, payload[-1]


def run_demo(device_choice: str = "auto", cp_world_size: int = 2, cp_strategy: str = "zigzag_llama3") -> int:
    use_cuda = torch.cuda.is_available() if device_choice == "auto" else device_choice == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("ringflash demo: --device cuda asked for, but no CUDA GPU is visible")
    device = torch.device("cuda" if use_cuda else "cpu")
    if device.type == "cpu" and _kernels_interpreted() is False:
        # A GPU was visible when ringflash was imported, so its kernels are compiled ones,
        # which cannot read CPU tensors, and Triton picks its interpreter at import: setting
        # TRITON_INTERPRET here (as the demo did) came too late, and the Triton rows failed
        # under a heading that said "interpreted". Run the demo in a child that starts with it.
        print("ringflash demo --device cpu: this process compiled the kernels for the GPU; running the demo in a "
              "child process with TRITON_INTERPRET=1", flush=True)
        return subprocess.call([sys.executable, "-m", "ringflash", "demo", "--device", "cpu", "--cp-world-size",
                                str(cp_world_size), "--cp-strategy", cp_strategy],
                               env=dict(os.environ, TRITON_INTERPRET="1"))
    for line in describe_environment(device):
        print(line)
    if device.type == "cuda":
        prob = Problem(2, 2048, 16, 4, 128, torch.bfloat16, True, device)
    else:
        # fp32: Triton's interpreter gets bf16 dots wrong; fp32 on the CPU is exact enough to check.
        prob = Problem(1, 192, 4, 2, 64, torch.float32, True, device)
    print(f"problem: {prob}")

    gen = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda h: torch.randn(prob.batch, prob.seqlen, h, prob.headdim, generator=gen, dtype=torch.float64)  # noqa: E731
    q64, k64, v64, do64 = mk(prob.nheads), mk(prob.nheads_k), mk(prob.nheads_k), mk(prob.nheads)
    tensors64 = [t.to(device).requires_grad_() for t in (q64, k64, v64)]
    ref_out, _ = attention_ref(*tensors64, causal=prob.causal)
    ref_grads = torch.autograd.grad(ref_out, tensors64, do64.to(device))

    rows = []
    for name, impl in implementations().items():
        q, k, v = (t.detach().to(prob.dtype).requires_grad_() for t in tensors64)
        do = do64.to(device=device, dtype=prob.dtype)
        try:
            out = impl(q, k, v, prob.causal)
            grads = torch.autograd.grad(out, (q, k, v), do)
            out_err = error_stats(out, ref_out)
            grad_err = max((error_stats(g, r) for g, r in zip(grads, ref_grads)), key=lambda s: s.rel)
            fwd_ms = _timed(lambda: impl(q, k, v, prob.causal), device)

            def fwd_bwd():
                o = impl(q, k, v, prob.causal)
                torch.autograd.grad(o, (q, k, v), do)

            total_ms = _timed(fwd_bwd, device)
        except Exception as exc:  # reported in the table, and the demo then exits non-zero
            rows.append(_failed_row(name, exc))
            continue
        rows.append(_row(name, out_err.rel, grad_err.rel, fwd_ms, total_ms, prob.dtype))

    if cp_world_size > 0:
        try:
            name, out_err, grad_err, fwd_ms, total_ms, dtype_name = run_cp_demo(device, cp_world_size, cp_strategy)
            rows.append(_row(name, out_err, grad_err, fwd_ms, total_ms, getattr(torch, dtype_name)))
        except Exception as exc:
            rows.append(_failed_row(f"context parallel ({cp_strategy})", exc))

    header = ("implementation", "check", "out rel err", "grad rel err", "fwd ms", "fwd+bwd ms")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print()
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    failed = [r[0] for r in rows if r[1] != "ok"]
    print()
    if failed:
        print(f"FAILED: {len(failed)} of {len(rows)} rows: {', '.join(failed)}")
        return 1
    print(f"all {len(rows)} rows passed (relative errors within the tolerance of their dtype)")
    return 0


#: Largest norm-wise relative error (out and every gradient) a row may show against the
#: float64 reference: a few times the dtype's unit roundoff (float32 allows for tf32, which
#: a user's torch.set_float32_matmul_precision may turn on).
ROW_TOLERANCE = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _row(name: str, out_rel: float, grad_rel: float, fwd_ms: Optional[float], total_ms: float,
         dtype: torch.dtype) -> tuple:
    tol = ROW_TOLERANCE[dtype]
    ok = out_rel <= tol and grad_rel <= tol  # NaN fails both comparisons
    check = "ok" if ok else f"FAILED (> {tol:.0e})"
    return (name, check, f"{out_rel:.2e}", f"{grad_rel:.2e}", "-" if fwd_ms is None else f"{fwd_ms:.2f}",
            f"{total_ms:.2f}")


def _failed_row(name: str, exc: BaseException) -> tuple:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return (name, f"FAILED: {type(exc).__name__}: {lines[-1][:80] if lines else ''}", "", "", "", "")
