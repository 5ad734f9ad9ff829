"""``ringflash bench sweep``: attention time against sequence length, head dim and dtype,
for the FlashAttention-2 implementations in ringflash and PyTorch's own attention.

Grid (the default, on a GPU): batch 1, causal, one head, sequence lengths 128..65536
(powers of two), head dims 16, 32, 64 and 128, bf16 and fp32. Inputs are the seed's 3-D
layout (batch, n, d). Implementations:

* ``pytorch_fa2``: ``ringflash.FlashAttentionPyTorchFunc``, FlashAttention-2 tiled in
  plain PyTorch (a Python loop over tiles, so very slow at long lengths: cells above
  ``--pytorch-max-seqlen`` are recorded as "skipped: too slow" instead of being run);
* ``triton_fa2``: ``ringflash.FlashAttentionTritonFunc``, the Triton kernels;
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with PyTorch's default
  backend selection (the backend it picked is in the CSV's ``note`` column);
* ``eager``: softmax(q k^T / sqrt(d)) v written out in PyTorch, which materialises the
  n x n score matrix (16 GiB in fp32 at n=65536): the quadratic memory the other three avoid.

Each cell times the forward, the backward (alone, on a retained graph) and the end-to-end
forward+backward. On a GPU a time is the median of ``triton.testing.do_bench``; on the
CPU (``--device cpu``) it is a median of wall-clock times, labelled as such everywhere.
Out-of-memory, unsupported and failing cells are rows with a status ("oom",
"unsupported: ...", "skipped: ...", "error: ...") rather than a crash.

``--out DIR`` receives sweep.csv (one row per implementation x cell x pass), sweep.md
(tables a person can read) and PNG plots: time against sequence length per pass, and the
speed-up of each implementation over the tiled PyTorch one. ``--from-csv`` redraws them
from a saved sweep.csv. Ctrl-C stops the sweep and still writes the cells measured so far.

Run time: the full grid takes several minutes on one H200 (every pass of every cell is a
do_bench of ~0.1 s or more, plus Triton's compilation per head dim and dtype); ``--quick``
about a minute; ``--device cpu --quick`` (n 16..128, the Triton kernels interpreted, fp32
only) under a minute on two cores, for CI. With batch 1 and one head, the GPU times of short
sequences measure per-call host overhead more than the kernels.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .common import (
    BWD_FLOP_FACTOR, CPU_TIMER, CUDA_TIMER, attn_flops, bench_ms, cpu_wall_ms, device_description,
    format_table, free_memory, is_oom, read_csv_rows, tflops, write_csv, write_text,
)
from .harness import fmt_ms, interruptible, short_status
from .progress import progress_bar, show, write

PASSES = ("forward", "backward", "end-to-end")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

FULL_SEQLENS = [2**i for i in range(7, 17)]  # 128 .. 65536
FULL_HEADDIMS = [16, 32, 64, 128]
QUICK_SEQLENS = [128, 256, 512, 1024]
QUICK_HEADDIMS = [16, 64]
#: --device cpu --quick: the Triton kernels are interpreted (about a second per call at
#: n=128), so the CPU smoke run stays at toy lengths.
CPU_QUICK_SEQLENS = [16, 32, 64, 128]

#: Default --pytorch-max-seqlen. On a GPU the tiled PyTorch implementation issues ~20 small
#: kernels per (128 x 128) tile pair, so its time grows 4x per doubling of n: on an H200 its
#: forward+backward took ~0.5 s per call at n=4096 and ~2.5 s at n=8192, and do_bench calls
#: a function at least eight times per pass. Its n=8192 cells alone took about 5 of the
#: full sweep's 10 minutes there, hence 4096. On the CPU (16 x 16 tiles) 1024.
PYTORCH_MAX_SEQLEN = {"cuda": 4096, "cpu": 1024}
#: Default --interpreter-max-seqlen: Triton's CPU interpreter takes seconds per call beyond it.
INTERPRETER_MAX_SEQLEN = 256

BASELINE = "pytorch_fa2"
STATUS_PREFIXES = ("ok", "oom", "unsupported: ", "skipped: ", "error: ")
CSV_COLUMNS = ["impl", "dtype", "headdim", "seqlen", "batch", "causal", "pass", "ms", "tflops", "peak_mib",
               "status", "note", "timer", "device"]


@dataclass(frozen=True)
class Impl:
    """An attention implementation under test: ``fn(q, k, v)`` takes (batch, n, d) tensors
    and computes causal attention with scale 1/sqrt(d)."""

    name: str
    label: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _pytorch_fa2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from ..pytorch_fa2 import FlashAttentionPyTorchFunc

    return FlashAttentionPyTorchFunc.apply(q, k, v, True)


def _triton_fa2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from ..autograd import FlashAttentionTritonFunc

    return FlashAttentionTritonFunc.apply(q, k, v, True)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # A head axis, (b, 1, n, d): the fused backends accept only 4-D inputs, and without it
    # SDPA would fall back to its math path and not be the baseline people use.
    out = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1),
                                                           is_causal=True)
    return out.squeeze(1)


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    n_q, n_k = q.shape[1], k.shape[1]
    scores = torch.matmul(q, k.transpose(1, 2)) * q.shape[-1] ** -0.5
    # Bottom-right causal alignment, as the other implementations (n_q == n_k here anyway).
    hidden = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(n_k - n_q + 1)
    scores = scores.masked_fill(hidden, float("-inf"))
    # Softmax in float32, as eager attention in model code does for bf16 inputs.
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


#: What each implementation is, for the markdown report (the plots use the short labels).
IMPL_DESCRIPTIONS = {
    "pytorch_fa2": "ringflash.FlashAttentionPyTorchFunc (FlashAttention-2 tiled in PyTorch)",
    "triton_fa2": "ringflash.FlashAttentionTritonFunc (the Triton kernels)",
    "sdpa": "torch.nn.functional.scaled_dot_product_attention, default backend selection",
    "eager": "softmax(q k^T / sqrt(d)) v in PyTorch ops, materialising the n x n scores",
}

IMPLEMENTATIONS: dict[str, Impl] = {
    impl.name: impl for impl in (
        Impl("pytorch_fa2", "PyTorch FA2, tiled", _pytorch_fa2),
        Impl("triton_fa2", "Triton FA2 (ringflash)", _triton_fa2),
        Impl("sdpa", "SDPA, default backend", _sdpa),
        Impl("eager", "eager, n x n scores", _eager),
    )
}


@dataclass(frozen=True)
class Cell:
    """One point of the grid."""

    dtype: str
    headdim: int
    seqlen: int

    def describe(self) -> str:
        return f"{self.dtype} d={self.headdim} n={self.seqlen}"


@dataclass
class SweepOptions:
    device: str = "cuda"
    pytorch_max_seqlen: int = PYTORCH_MAX_SEQLEN["cuda"]
    interpreter_max_seqlen: int = INTERPRETER_MAX_SEQLEN


def grid(seqlens: Sequence[int], headdims: Sequence[int], dtypes: Sequence[str]) -> list[Cell]:
    """Cells in the order they run: dtype, then head dim, then ascending length, so that the
    last cells of each (dtype, head dim) are the expensive ones and a table fills in order."""
    return [Cell(dt, d, n) for dt in dtypes for d in headdims for n in sorted(seqlens)]


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def skip_status(impl: str, cell: Cell, opts: SweepOptions) -> Optional[str]:
    """The status of a cell that is not run at all, or None to run it."""
    if impl == "triton_fa2" and opts.device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "unsupported: Triton on CPU tensors needs TRITON_INTERPRET=1 (set before ringflash is imported)"
        if cell.dtype == "bf16":
            return "unsupported: bf16 on the CPU interpreter (its bf16 tl.dot is wrong)"
        if cell.seqlen > opts.interpreter_max_seqlen:
            return (f"skipped: too slow (Triton interpreter, n > {opts.interpreter_max_seqlen}; "
                    "--interpreter-max-seqlen)")
    if impl == "pytorch_fa2" and cell.seqlen > opts.pytorch_max_seqlen:
        return f"skipped: too slow (n > {opts.pytorch_max_seqlen}; --pytorch-max-seqlen)"
    if impl == "eager" and opts.device == "cpu":
        # A CUDA OOM is an exception and is recorded as one; on the CPU the kernel's OOM
        # killer ends the whole process instead, so refuse what cannot fit beforehand
        # (scores, probabilities and their gradient: about three n x n float32 matrices).
        if 3 * 4 * cell.seqlen**2 > _host_memory_bytes() // 2:
            return "skipped: the n x n scores would not fit in half the host memory"
    return None


def classify_failure(exc: BaseException) -> str:
    """A status for a cell whose run raised ``exc``: "oom", "unsupported: ..." or "error: ..."."""
    if is_oom(exc):
        return "oom"
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = text[:120] + ("..." if len(text) > 120 else "")
    if isinstance(exc, NotImplementedError):
        return f"unsupported: {text}"
    # Everything else is an error, Triton's OutOfResources included: a launch configuration
    # that does not fit the GPU is a bug of the configuration, not a limit of the method.
    return f"error: {type(exc).__name__}: {text}"


def sdpa_backend_note(q: torch.Tensor) -> str:
    """Which backend SDPA's default selection picks for (b, 1, n, d) inputs like ``q``.
    Uses a private PyTorch function, so it may say nothing on another version."""
    try:
        from torch.nn.attention import SDPBackend

        x = q.detach().unsqueeze(1)
        return f"backend {SDPBackend(torch._fused_sdp_choice(x, x, x, None, 0.0, True)).name}"
    except Exception:  # a private API: absent or changed on other torch versions
        return ""


def make_timer(device: str) -> tuple[Callable[[Callable[[], object]], float], str]:
    """(timer, its description): do_bench on a GPU, the wall-clock median on the CPU."""
    if device == "cuda":
        return bench_ms, CUDA_TIMER
    # About half a second of timed calls per pass (at least one call): an interpreted Triton
    # call at n=128 takes 0.3-1 s, and the CPU run only has to exercise the report path.
    return (lambda fn: cpu_wall_ms(fn, warmup=1, reps=3, budget_s=0.5)), CPU_TIMER


def _cell_inputs(cell: Cell, device: str) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (1, cell.seqlen, cell.headdim)

    def mk() -> torch.Tensor:
        return torch.randn(shape, device=device, dtype=DTYPES[cell.dtype], generator=gen)

    return tuple(mk().requires_grad_() for _ in range(3)), mk()


def measure(fn: Callable, inputs: Sequence[torch.Tensor], dout: torch.Tensor,
            timer: Callable[[Callable[[], object]], float]) -> dict[str, tuple[Optional[float], str, Optional[float]]]:
    """{pass: (ms or None, status, peak MiB or None)} for forward, backward and end-to-end.

    The peak is the CUDA memory allocated at the peak of one call, inputs (and for the
    backward the retained graph) included; it is read from a call before the timing, since
    do_bench's own 256 MB cache-flush buffer would count during the timing. A failing pass
    does not stop the others, except that the backward needs a forward output: when the
    forward fails the backward gets the forward's status.
    """
    cuda = inputs[0].is_cuda

    def run(call: Callable[[], object]) -> tuple[Optional[float], str, Optional[float]]:
        peak = None
        try:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                call()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() / 2**20
            ms, status = timer(call), "ok"
        except Exception as exc:  # recorded in the CSV; the sweep goes on
            ms, status = None, classify_failure(exc)
        if status != "ok" and cuda:
            free_memory()  # after the except block, once the traceback's frames are gone
        return ms, status, peak

    results = {"forward": run(lambda: fn(*inputs))}
    try:
        out = fn(*inputs)
        results["backward"] = run(lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True))
    except Exception as exc:
        results["backward"] = (None, classify_failure(exc), None)
    if results["backward"][1] != "ok" and cuda:
        free_memory()
    out = None  # drop the retained graph before the end-to-end pass allocates its own
    if cuda:
        torch.cuda.empty_cache()
    results["end-to-end"] = run(lambda: torch.autograd.grad(fn(*inputs), inputs, dout))
    return results


def run_sweep(cells: Sequence[Cell], impls: Sequence[Impl], opts: SweepOptions) -> tuple[list[dict], bool]:
    """Measure every (cell, implementation); returns (rows, interrupted). Ctrl-C or SIGTERM
    stops the sweep and returns the rows measured so far, so a long run still leaves a report."""
    timer, timer_name = make_timer(opts.device)
    device_name = device_description(opts.device)
    rows: list[dict] = []
    bar = progress_bar(len(cells) * len(impls), "sweep", unit="cell")
    threads = torch.get_num_threads()
    if opts.device == "cpu":
        # One intra-op thread: at toy sizes threads buy nothing, and on a CPU shared with
        # other processes waiting threads turn contention into 100x outliers.
        torch.set_num_threads(1)
    # interruptible: Ctrl-C and the SIGTERM of `timeout` (run 34 lost a cut sweep's cells to
    # the latter) both end the loop with the rows so far.
    try:
        with interruptible([]) as state:
            for cell in cells:
                inputs, dout = _cell_inputs(cell, opts.device)
                flops = attn_flops(1, 1, cell.seqlen, cell.seqlen, cell.headdim, causal=True)
                pass_flops = {"forward": flops, "backward": BWD_FLOP_FACTOR * flops,
                              "end-to-end": (1 + BWD_FLOP_FACTOR) * flops}
                for impl in impls:
                    show(bar, f"{cell.describe()} {impl.name}")
                    skipped = skip_status(impl.name, cell, opts)
                    if skipped is not None:
                        results = {p: (None, skipped, None) for p in PASSES}
                    else:
                        results = measure(impl.fn, inputs, dout, timer)
                    note = sdpa_backend_note(inputs[0]) if impl.name == "sdpa" else ""
                    for p in PASSES:
                        ms, status, peak = results[p]
                        rows.append(dict(
                            impl=impl.name, dtype=cell.dtype, headdim=cell.headdim, seqlen=cell.seqlen, batch=1,
                            causal=True, **{"pass": p}, ms=ms, tflops=tflops(pass_flops[p], ms) if ms else None,
                            peak_mib=peak, status=status, note=note, timer=timer_name, device=device_name,
                        ))
                    if opts.device == "cuda":
                        torch.cuda.empty_cache()
                    bar.update(1)
                del inputs, dout
                if opts.device == "cuda":
                    # gc.collect takes ~0.2 s with torch and triton loaded: once per cell on the
                    # GPU (and after every failure, in measure), never per call. On the CPU,
                    # reference counting already returns the memory.
                    free_memory()
        interrupted = state["interrupted"]
    finally:
        bar.close()
        torch.set_num_threads(threads)
    return rows, interrupted


# --- report -------------------------------------------------------------------------


def _ordered(values, order=None) -> list:
    present = list(dict.fromkeys(values))
    if order:
        return [v for v in order if v in present] + [v for v in present if v not in order]
    return sorted(present)


def _index(rows: Sequence[dict]) -> dict[tuple, dict]:
    return {(r["impl"], r["dtype"], r["headdim"], r["seqlen"], r["pass"]): r for r in rows}


def _axes(rows: Sequence[dict]) -> tuple[list[str], list[str], list[int], list[int]]:
    impls = _ordered((r["impl"] for r in rows), list(IMPLEMENTATIONS))
    dtypes = _ordered((r["dtype"] for r in rows), list(DTYPES))
    return impls, dtypes, _ordered(r["headdim"] for r in rows), _ordered(r["seqlen"] for r in rows)


def _speedup(index: dict, impl: str, base: str, key: tuple) -> Optional[float]:
    a, b = index.get((impl,) + key), index.get((base,) + key)
    if a and b and a["status"] == "ok" and b["status"] == "ok" and a["ms"] and b["ms"]:
        return b["ms"] / a["ms"]
    return None


def _not_measured(rows: Sequence[dict]) -> list[str]:
    """One line per (implementation, status) that was not "ok", with where it happened."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["status"] != "ok":
            groups.setdefault((r["impl"], r["status"]), []).append(r)
    lines = []
    for (impl, status), rs in groups.items():
        passes = ", ".join(_ordered((r["pass"] for r in rs), list(PASSES)))
        cells = list(dict.fromkeys(f"{r['dtype']} d={r['headdim']} n={r['seqlen']}" for r in rs))
        shown = "; ".join(cells[:6]) + (f"; ... ({len(cells) - 6} more)" if len(cells) > 6 else "")
        lines.append(f"- `{impl}` {status} ({passes}): {shown}")
    return lines


def markdown_report(rows: Sequence[dict], notes: Sequence[str] = ()) -> str:
    """sweep.md: the device and timer, then per pass a table of milliseconds (rows = cells,
    columns = implementations), the speed-up over the tiled PyTorch implementation, and
    the cells that were not measured with their reasons."""
    if not rows:
        return "# ringflash bench sweep\n\nNo results.\n"
    impls, dtypes, headdims, seqlens = _axes(rows)
    index = _index(rows)
    cells = [(dt, d, n) for dt in dtypes for d in headdims for n in seqlens
             if any((i, dt, d, n, PASSES[0]) in index for i in impls)]
    devices = ", ".join(_ordered(r["device"] for r in rows))
    timers = ", ".join(_ordered(r["timer"] for r in rows))
    sdpa_notes = "; ".join(f"{dt}: " + ", ".join(_ordered(
        r["note"].removeprefix("backend ") for r in rows if r["impl"] == "sdpa" and r["dtype"] == dt and r.get("note")))
        for dt in dtypes if any(r["impl"] == "sdpa" and r["dtype"] == dt and r.get("note") for r in rows))
    out = ["# ringflash bench sweep", "",
           f"- Device: {devices}",
           f"- Timer: {timers}; milliseconds per call",
           "- Inputs: batch 1, causal, one head, 3-D (batch, n, d) tensors; "
           f"n = {', '.join(map(str, seqlens))}; d = {', '.join(map(str, headdims))}; {', '.join(dtypes)}",
           "- Implementations: " + "; ".join(f"`{i}` = {IMPL_DESCRIPTIONS.get(i, i)}" for i in impls)]
    if sdpa_notes:
        out.append(f"- SDPA's default selection picked: {sdpa_notes}")
    out += [f"- {n}" for n in notes]
    out.append("- Entries: milliseconds, or OOM (out of memory), skip (not run, see below), "
               "n/a (unsupported), err (failed, see below).")
    for p in PASSES:
        table = []
        for dt, d, n in cells:
            entries = []
            for i in impls:
                r = index.get((i, dt, d, n, p))
                if r is None:
                    entries.append("")
                else:
                    entries.append(fmt_ms(r["ms"]) if r["status"] == "ok" else short_status(r["status"]))
            table.append([dt, d, n] + entries)
        out += ["", f"## {p} (ms)", "", format_table(["dtype", "d", "n"] + impls, table)]
    others = [i for i in impls if i != BASELINE]
    if BASELINE in impls and others:
        for p in PASSES:
            table = []
            for dt, d, n in cells:
                ratios = [_speedup(index, i, BASELINE, (dt, d, n, p)) for i in others]
                if any(ratios):  # rows without any ratio say nothing; "Not measured" explains them
                    table.append([dt, d, n] + [f"{x:.2f}x" if x else "-" for x in ratios])
            out += ["", f"## {p}: speed-up over `{BASELINE}` (its time / this time)", "",
                    format_table(["dtype", "d", "n"] + others, table)]
    if "triton_fa2" in impls and "sdpa" in impls:
        table = []
        for dt, d, n in cells:
            ratios = [_speedup(index, "triton_fa2", "sdpa", (dt, d, n, p)) for p in PASSES]
            if any(ratios):
                table.append([dt, d, n] + [f"{x:.2f}x" if x else "-" for x in ratios])
        out += ["", "## `triton_fa2` speed-up over `sdpa` (SDPA's time / Triton's time)", "",
                format_table(["dtype", "d", "n"] + list(PASSES), table)]
    if any(r.get("peak_mib") is not None for r in rows):
        table = []
        for dt, d, n in cells:
            peaks = [index.get((i, dt, d, n, "end-to-end"), {}).get("peak_mib") for i in impls]
            table.append([dt, d, n] + [f"{x:.0f}" if x is not None else "-" for x in peaks])
        out += ["", "## end-to-end: peak CUDA memory of one call (MiB, inputs included)", "",
                format_table(["dtype", "d", "n"] + impls, table)]
    missing = _not_measured(rows)
    if missing:
        out += ["", "## Not measured", ""] + missing
    return "\n".join(out) + "\n"


def _label(impl: str) -> str:
    return IMPLEMENTATIONS[impl].label if impl in IMPLEMENTATIONS else impl


def _panel_note(index: dict, impls: Sequence[str], key: tuple, seqlens: Sequence[int], p: str) -> str:
    """Which implementations have missing points in a panel, and from which length on."""
    lines = []
    for i in impls:
        bad = [(n, index[(i,) + key + (n, p)]["status"]) for n in seqlens
               if (i,) + key + (n, p) in index and index[(i,) + key + (n, p)]["status"] != "ok"]
        if bad:
            kinds = ", ".join(dict.fromkeys(short_status(s) for _, s in bad))
            lines.append(f"{i}: {kinds} at n " + (f"= {bad[0][0]}" if len(bad) == 1 else f"{bad[0][0]}..{bad[-1][0]}"))
    return "\n".join(lines)


def write_plots(rows: Sequence[dict], out_dir: str) -> list[str]:
    """Time against sequence length (one figure per pass; one panel per (dtype, head dim);
    one line per implementation) and the speed-up over the tiled PyTorch implementation
    (one figure per pass). Returns the PNG paths."""
    from .plots import LinePanel, line_grid

    impls, dtypes, headdims, seqlens = _axes(rows)
    index = _index(rows)
    note = f"{', '.join(_ordered(r['device'] for r in rows))} | {', '.join(_ordered(r['timer'] for r in rows))}"
    labels = [_label(i) for i in impls]
    paths = []
    for p in PASSES:
        panels = []
        for dt in dtypes:
            row = []
            for d in headdims:
                series = {_label(i): [(n, index[(i, dt, d, n, p)]["ms"]) for n in seqlens
                                      if (i, dt, d, n, p) in index and index[(i, dt, d, n, p)]["status"] == "ok"]
                          for i in impls}
                row.append(LinePanel(f"{dt}, d={d}", series, _panel_note(index, impls, (dt, d), seqlens, p)))
            panels.append(row)
        paths.append(line_grid(
            os.path.join(out_dir, f"sweep_time_{p}.png"), panels,
            f"{p.capitalize()} time vs sequence length (batch 1, causal, one head)",
            "sequence length n (tokens)", "time per call (ms)", note=note, series_order=labels))
    others = [i for i in impls if i != BASELINE]
    if BASELINE in impls and others:
        for p in PASSES:
            panels = [[LinePanel(f"{dt}, d={d}", {
                _label(i): [(n, _speedup(index, i, BASELINE, (dt, d, n, p))) for n in seqlens] for i in others},
                _panel_note(index, impls, (dt, d), seqlens, p)) for d in headdims] for dt in dtypes]
            paths.append(line_grid(
                os.path.join(out_dir, f"sweep_speedup_{p}.png"), panels,
                f"{p.capitalize()}: speed-up over the tiled PyTorch FA2 (higher is faster)",
                "sequence length n (tokens)", f"speed-up (x, {BASELINE} time / time)", note=note,
                series_order=labels, hline=1.0, hline_label=f"{_label(BASELINE)} = 1"))
    return paths


def write_report(rows: Sequence[dict], out_dir: str, notes: Sequence[str] = (), plots: bool = True) -> list[str]:
    """Write sweep.csv, sweep.md and (when matplotlib is installed) the PNGs into ``out_dir``.
    Returns the paths written."""
    from .plots import have_matplotlib

    csv_path, md_path = os.path.join(out_dir, "sweep.csv"), os.path.join(out_dir, "sweep.md")
    write_csv(csv_path, CSV_COLUMNS, [[r.get(c) for c in CSV_COLUMNS] for r in rows])
    write_text(md_path, markdown_report(rows, notes))
    paths = [csv_path, md_path]
    if plots and rows:
        if have_matplotlib():
            paths += write_plots(rows, out_dir)
        else:
            write("matplotlib is not installed (pip install 'ringflash[bench]'): no plots")
    return paths


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible (use --device cpu for the interpreted smoke run)")
    return device


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ringflash bench sweep",
        description="Forward, backward and end-to-end time of the PyTorch-tiled FA2, the Triton FA2, SDPA and "
                    "eager attention over sequence length x head dim x dtype (batch 1, causal). Writes "
                    "DIR/sweep.csv, DIR/sweep.md and PNG plots.")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="cuda: do_bench medians; cpu: wall-clock medians, Triton interpreted, for smoke runs "
                             "(default: cuda when a GPU is visible)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a small grid: n {QUICK_SEQLENS[0]}..{QUICK_SEQLENS[-1]}, d {QUICK_HEADDIMS} "
                             f"(on the CPU n {CPU_QUICK_SEQLENS[0]}..{CPU_QUICK_SEQLENS[-1]})")
    parser.add_argument("--seqlens", type=int, nargs="+", help="sequence lengths (overrides the grid's)")
    parser.add_argument("--headdims", type=int, nargs="+", help="head dims (overrides the grid's)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--impls", nargs="+", choices=list(IMPLEMENTATIONS), default=list(IMPLEMENTATIONS),
                        help="implementations to time (default: all)")
    parser.add_argument("--pytorch-max-seqlen", type=int, default=None, metavar="N",
                        help="record pytorch_fa2 cells with n > N as 'skipped: too slow' instead of running them "
                             f"(default {PYTORCH_MAX_SEQLEN['cuda']} on a GPU, {PYTORCH_MAX_SEQLEN['cpu']} on the CPU)")
    parser.add_argument("--interpreter-max-seqlen", type=int, default=INTERPRETER_MAX_SEQLEN, metavar="N",
                        help="on the CPU, skip Triton cells with n > N (the interpreter takes seconds per call)")
    parser.add_argument("--out", default="bench_out/sweep", metavar="DIR",
                        help="folder for sweep.csv, sweep.md and the PNGs (default: %(default)s)")
    parser.add_argument("--no-plots", action="store_true", help="write the CSV and markdown only")
    parser.add_argument("--from-csv", metavar="CSV",
                        help="measure nothing: redraw sweep.md and the plots in --out from a saved sweep.csv")
    args = parser.parse_args(argv)

    if args.from_csv:
        rows = read_csv_rows([args.from_csv])
        for r in rows:  # cells the CSV left empty come back as None
            r["note"] = r.get("note") or ""
        paths = write_report(rows, args.out, plots=not args.no_plots)
        print(markdown_report(rows))
        print("wrote " + ", ".join(paths))
        return 0

    device = _resolve_device(args.device)
    if device == "cpu" and not (args.quick or args.seqlens):
        write("note: the CPU run is a smoke test; without --quick (or --seqlens) it walks the GPU grid up to "
              "n=65536 on the CPU, which takes hours")
    if args.quick:
        seqlens, headdims = (CPU_QUICK_SEQLENS if device == "cpu" else QUICK_SEQLENS), QUICK_HEADDIMS
    else:
        seqlens, headdims = FULL_SEQLENS, FULL_HEADDIMS
    seqlens, headdims = args.seqlens or seqlens, args.headdims or headdims
    opts = SweepOptions(
        device=device,
        pytorch_max_seqlen=args.pytorch_max_seqlen or PYTORCH_MAX_SEQLEN[device],
        interpreter_max_seqlen=args.interpreter_max_seqlen,
    )
    cells = grid(seqlens, headdims, args.dtypes)
    impls = [IMPLEMENTATIONS[name] for name in args.impls]
    notes = [f"`pytorch_fa2` runs only up to n = {opts.pytorch_max_seqlen} (`--pytorch-max-seqlen`): "
             "it is a Python loop over tiles."]
    if device == "cpu":
        notes.append("CPU run: wall-clock times (one thread) of Triton's interpreter and of PyTorch's CPU "
                     "kernels; they check the report path and say nothing about GPU speed.")
    elif "fp32" in args.dtypes:
        from ..kernels.configs import input_precision

        notes.append(f"fp32: `triton_fa2` runs its matmuls in {input_precision(torch.float32)} "
                     f"(torch.get_float32_matmul_precision() = {torch.get_float32_matmul_precision()!r}, "
                     f"or RINGFLASH_FP32_PRECISION); PyTorch's fp32 matmuls use tf32 only if torch.backends "
                     f"allow it (matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}).")
    print(f"device: {device_description(device)}", flush=True)
    print(f"{len(cells)} cells x {len(impls)} implementations x {len(PASSES)} passes", flush=True)
    rows, interrupted = run_sweep(cells, impls, opts)
    if interrupted:
        notes.append("Interrupted (Ctrl-C): the tables hold the cells measured before it.")
    paths = write_report(rows, args.out, notes, plots=not args.no_plots)
    print()
    print(markdown_report(rows, notes))
    print("wrote " + ", ".join(paths))
    return 130 if interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
