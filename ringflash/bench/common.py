"""Timing, FLOP counting, the PyTorch baselines and the report files shared by the
benchmark commands.

Times are medians of ``triton.testing.do_bench`` (CUDA events) on a GPU; on the CPU (where
CUDA events do not exist) ``cpu_wall_ms`` takes a median of wall-clock times instead.
FLOPs follow the usual convention: forward 4 * b * h * sq * sk * d (halved when causal and
sq == sk; ``attn_flops`` counts the bottom-right mask's area otherwise), backward 2.5x forward.
"""

from __future__ import annotations

import csv
import gc
import os
import platform
import statistics
import time
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F


#: How each timer is named in reports, so that CPU wall-clock numbers are never mistaken
#: for GPU kernel times.
CUDA_TIMER = "triton.testing.do_bench median (CUDA events)"
CPU_TIMER = "CPU wall-clock median (time.perf_counter)"


#: The fewest timed calls a GPU median is taken over. do_bench sizes its repeat count from
#: its time budget (``rep`` over its estimate of one call), so a call longer than the budget
#: is timed once: run 48's wide grid read 104.5 ms for a 64k backward that the two other
#: columns of the same row, running the very same kernels, read at 91.0 and 92.5 ms.
MIN_TIMED_CALLS = 5


def bench_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()`` on the GPU; ``warmup`` and ``rep`` are time budgets in
    ms. A call too long for ``MIN_TIMED_CALLS`` of it to fit in ``rep`` is timed over that
    many more calls (do_bench's calls warmed it), one by one, as do_bench times each."""
    import triton.testing

    ms = float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    if ms * MIN_TIMED_CALLS > rep:
        ms = _median_of_calls(fn, MIN_TIMED_CALLS)
    return ms


def bench_call_count(ms: float, warmup: float = 25, rep: float = 100) -> int:
    """How many times ``bench_ms`` calls a function of ``ms`` milliseconds: do_bench's first
    call, 5 to estimate, its warm-up and timed calls (at least one each), and for a call too
    long for MIN_TIMED_CALLS of it in ``rep``, that many more."""
    calls = 6 + max(1, int(warmup / ms)) + max(1, int(rep / ms))
    return calls + (MIN_TIMED_CALLS if ms * MIN_TIMED_CALLS > rep else 0)


def _median_of_calls(fn: Callable[[], object], calls: int) -> float:
    """Median milliseconds of ``calls`` calls, each between its own CUDA events after an L2
    flush, as do_bench times its repeats."""
    from triton import runtime

    driver = runtime.driver.active
    device = driver.get_device_interface()
    cache = driver.get_empty_cache_for_benchmark()
    events = [(device.Event(enable_timing=True), device.Event(enable_timing=True)) for _ in range(calls)]
    for start, end in events:
        driver.clear_cache(cache)
        start.record()
        fn()
        end.record()
    device.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def cpu_wall_ms(fn: Callable[[], object], warmup: int = 1, reps: int = 3, budget_s: float = 2.0) -> float:
    """Median wall-clock milliseconds of ``fn()`` on the CPU.

    ``do_bench`` needs CUDA events, so CPU runs use this instead: ``warmup`` untimed calls,
    then up to ``reps`` timed ones, stopping early (after at least one) once ``budget_s``
    seconds have gone, because interpreted Triton kernels take seconds per call.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max(1, reps) and (not times or time.perf_counter() < deadline):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def is_oom(exc: BaseException) -> bool:
    """True for CUDA out-of-memory errors, including the RuntimeErrors that some allocators
    and older torch versions raise instead of ``torch.cuda.OutOfMemoryError``."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory() -> None:
    """Release what the previous case left: unreachable tensors (gc) and the CUDA caching
    allocator's free blocks, so that one case's peak (or OOM) does not shape the next."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def attn_flops(batch: int, nheads: int, seqlen_q: int, seqlen_k: int, headdim: int, causal: bool) -> float:
    """Forward FLOPs of dense attention (two matmuls), ``nheads`` the query heads.

    Causal counts the visible area of the bottom-right-aligned mask (query row i sees keys
    up to i + seqlen_k - seqlen_q), as the kernels compute it: half the square when
    seqlen_q == seqlen_k (the usual convention), about all of it for a few queries against
    many keys, and half of seqlen_k^2 when queries outnumber keys (the first rows see none).
    Halving sq * sk regardless counted a one-query decode step at half its work."""
    if not causal:
        return 4.0 * batch * nheads * seqlen_q * seqlen_k * headdim
    m = min(seqlen_q, seqlen_k)
    return 4.0 * batch * nheads * (m * (seqlen_k - m) + m * m / 2) * headdim


def varlen_flops(lengths: Sequence[int], nheads: int, headdim: int, causal: bool) -> float:
    return sum(attn_flops(1, nheads, n, n, headdim, causal) for n in lengths)


BWD_FLOP_FACTOR = 2.5


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def time_fwd_bwd(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], dout: torch.Tensor) -> tuple[float, float]:
    """(forward ms, backward ms); the backward is timed alone on a retained graph."""
    fwd_ms = bench_ms(lambda: fn(*inputs))
    out = fn(*inputs)
    bwd_ms = bench_ms(lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True))
    return fwd_ms, bwd_ms


# --- PyTorch baselines, all taking (b, s, h, d) tensors like flash_attn_func --------------


def _expand_heads(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[2] == q.shape[2] else x.repeat_interleave(q.shape[2] // x.shape[2], dim=2)


def sdpa_is_causal(seqlen_q: int, seqlen_k: int, causal: bool) -> bool:
    """SDPA's ``is_causal`` for our causal mask, which is aligned to the bottom right.

    SDPA aligns its causal mask to the top left: the same mask when seqlen_q == seqlen_k,
    and one query row sees every key under ours (no mask). Any other causal shape would
    make the baseline compute a different problem, so it raises NotImplementedError (the
    baseline's cell is reported unavailable rather than timed on the wrong mask)."""
    if not causal or seqlen_q == seqlen_k:
        return causal
    if seqlen_q == 1:
        return False
    raise NotImplementedError(f"SDPA's causal mask is aligned to the top left; ours to the bottom right "
                              f"(seqlen_q={seqlen_q}, seqlen_k={seqlen_k})")


def sdpa_baseline(backend_name: str) -> Callable[..., torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, causal):
        is_causal = sdpa_is_causal(q.shape[1], k.shape[1], causal)
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), _expand_heads(q, k).transpose(1, 2), _expand_heads(q, v).transpose(1, 2),
                is_causal=is_causal,
            )
        return out.transpose(1, 2)

    return run


def flex_baseline() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import torch._dynamo

    # One compiled graph per shape: allow more than the default 8 before dynamo gives up.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    compiled = torch.compile(flex_attention, dynamic=False)
    masks: dict[tuple, object] = {}

    def causal_mask(offset: int):
        # Bottom-right aligned as ours: query i sees keys up to i + sk - sq (q_idx >= kv_idx
        # alone is top-left, a different problem whenever sq != sk).
        def mask(b, h, q_idx, kv_idx):
            return q_idx + offset >= kv_idx

        return mask

    def run(q, k, v, causal):
        sq, sk = q.shape[1], k.shape[1]
        block_mask = None
        if causal:
            key = (sq, sk, q.device)
            if key not in masks:
                masks[key] = create_block_mask(causal_mask(sk - sq), B=None, H=None, Q_LEN=sq, KV_LEN=sk,
                                               device=q.device)
            block_mask = masks[key]
        out = compiled(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
            enable_gqa=q.shape[2] != k.shape[2],
        )
        return out.transpose(1, 2)

    return run


class AtenFlashVarlen(torch.autograd.Function):
    """PyTorch's FA2 varlen kernels (aten._flash_attention_forward/backward) as a function."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal):
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False
        )
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, rng_state, unused)
        ctx.args = (max_q, max_k, causal)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_q, cu_k, rng_state, unused = ctx.saved_tensors
        max_q, max_k, causal = ctx.args
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal, rng_state, unused
        )
        return dq, dk, dv, None, None, None, None, None


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in header]] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_csv(path: Optional[str], header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: str = "cuda") -> str:
    """The device and library versions, for the header of every report."""
    import triton

    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    if device == "cpu":
        interp = ", Triton interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else ""
        return f"CPU: {_cpu_model()} ({os.cpu_count()} logical cores{interp}), {versions}"
    props = torch.cuda.get_device_properties(0)
    return f"{props.name} ({props.multi_processor_count} SMs), {versions}"


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path``, creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def parse_cell(text: str) -> object:
    """A CSV cell back to the Python value ``write_csv`` wrote: int, float, bool, None
    (empty cell or "None"), or the string itself."""
    if text in ("", "None"):
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_csv_rows(paths: Iterable[str]) -> list[dict]:
    """Rows of one or more CSV files written by ``write_csv``, as dicts of parsed values
    (used to redraw a report from saved results without re-running the benchmark)."""
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            rows += [{k: parse_cell(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return rows
