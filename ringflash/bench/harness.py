"""Shared plumbing of the benchmark commands that record one row per (case, implementation,
pass): ``bench kernels --grid wide``, ``bench hf``, ``bench decode`` and ``bench dropout``.

* devices and timers: ``triton.testing.do_bench`` medians on a GPU, wall-clock medians on
  the CPU (where the Triton kernels run interpreted: a smoke test of the plumbing, not a
  speed measurement);
* failures as statuses, never crashes: "ok", "oom", "unsupported: ...", "skipped: ...",
  "error: ..." (the same vocabulary as ``bench sweep``);
* environment overrides around a measurement (``RINGFLASH_BACKWARD=atomic``,
  ``RINGFLASH_DECODE=1``), which the library reads at every call;
* PyTorch SDPA baselines on flash-attn-layout tensors, with GQA through ``enable_gqa``
  where this torch and backend take it, else through repeated K/V heads (the row's note
  says which);
* the report: CSV of fixed columns, markdown tables of milliseconds and speed ratios, and
  the ``--out`` / ``--from-csv`` / ``--csv-only`` / ``--no-plots`` options.

Speed ratios are always ``baseline ms / our ms`` of the same case in the same run: above 1
means ours is faster.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import os
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from .common import (
    CPU_TIMER, CUDA_TIMER, bench_ms, cpu_wall_ms, format_table, free_memory, is_oom, read_csv_rows, sdpa_is_causal,
    write_csv, write_text,
)
from .progress import write

Timer = Callable[[Callable[[], object]], float]

#: Columns every long-format CSV of these commands starts with; each command appends its own.
BASE_COLUMNS = ["case", "impl", "pass", "ms", "status", "note", "timer", "device"]


# --- devices and timers ---------------------------------------------------------------


def add_device_options(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """--device, --quick, --out, --from-csv, --csv-only, --no-plots (the same on every command)."""
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="cuda: do_bench medians; cpu: wall-clock medians of the interpreted kernels at toy "
                             "sizes, float32 (a smoke test of the plumbing; default: cuda when a GPU is visible)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", metavar="DIR", help="write the CSV, markdown and PNG report into DIR")
    parser.add_argument("--from-csv", metavar="CSV",
                        help="measure nothing: print the tables of a saved CSV (with --out, write its markdown "
                             "and plots); needs no GPU")
    parser.add_argument("--csv-only", action="store_true",
                        help="with --out, write only the CSV (redraw the rest later with --from-csv); the tables "
                             "are printed either way")
    parser.add_argument("--no-plots", action="store_true", help="with --out, write no PNG")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible (use --device cpu for the interpreted smoke run)")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # ringflash turns the interpreter on only when no GPU is visible; on a GPU machine the
        # CPU smoke run needs it set before triton is imported.
        raise SystemExit("--device cpu on a machine with a GPU: set TRITON_INTERPRET=1 before starting")
    return device


def make_timer(device: str, warmup_ms: int = 25, rep_ms: int = 100) -> tuple[Timer, str]:
    """(timer, its description). GPU: ``bench_ms`` (do_bench median; warmup/rep are time
    budgets in ms). CPU: a median of at most three wall-clock calls within 0.15 s (at least
    one), since an interpreted call takes a good fraction of a second."""
    if device == "cuda":
        return (lambda fn: bench_ms(fn, warmup=warmup_ms, rep=rep_ms)), CUDA_TIMER
    return (lambda fn: cpu_wall_ms(fn, warmup=0, reps=3, budget_s=0.15)), CPU_TIMER


@contextlib.contextmanager
def cpu_threads(device: str, n: int = 1) -> Iterator[None]:
    """One intra-op thread on the CPU: toy sizes gain nothing from threads, and on a shared
    CPU waiting threads turn contention into outliers (as ``bench sweep`` does)."""
    saved = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --- failures ----------------------------------------------------------------------------


def classify_failure(exc: BaseException) -> str:
    """A status for a run that raised: "oom", "unsupported: ..." (NotImplementedError, or
    SDPA's "No available kernel" when the chosen backend refuses the inputs) or "error: ..."."""
    if is_oom(exc):
        return "oom"
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = text[:160] + ("..." if len(text) > 160 else "")
    if isinstance(exc, NotImplementedError) or "No available kernel" in text or "No viable backend" in text:
        return f"unsupported: {text}"
    return f"error: {type(exc).__name__}: {text}"


def short_status(status: str) -> str:
    if status == "oom":
        return "OOM"
    for prefix, short in (("skipped", "skip"), ("unsupported", "n/a"), ("error", "err")):
        if status.startswith(prefix):
            return short
    return status


def run_timed(timer: Timer, fn: Callable[[], object], device: str) -> tuple[Optional[float], str]:
    """(ms, "ok") or (None, status); frees the CUDA cache after a failure."""
    try:
        return timer(fn), "ok"
    except Exception as exc:  # recorded as the cell's status; the benchmark goes on
        status = classify_failure(exc)
    if device == "cuda":
        free_memory()  # outside the except block, once the traceback's frames are released
    return None, status


@contextlib.contextmanager
def environ(**values: Optional[str]) -> Iterator[None]:
    """Set (or with None remove) environment variables inside the block, restoring them after.
    ringflash reads RINGFLASH_BACKWARD at each backward call and RINGFLASH_DECODE at each
    forward call, so the block must span every call that should see the value."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def measure_passes(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], dout: torch.Tensor,
                   timer: Timer, device: str, passes: Sequence[str] = ("fwd", "bwd")) -> dict[str, tuple]:
    """{pass: (ms or None, status)} for "fwd" (the call), "bwd" (the backward alone, on a
    retained graph) and "fwd+bwd" (both, as a training step). A failed forward gives the
    backward its status."""
    results: dict[str, tuple] = {}
    if "fwd" in passes:
        results["fwd"] = run_timed(timer, lambda: fn(*inputs), device)
    if "bwd" in passes:
        try:
            out = fn(*inputs)
        except Exception as exc:
            out, results["bwd"] = None, (None, classify_failure(exc))
        if out is None and device == "cuda":
            free_memory()
        if out is not None:
            results["bwd"] = run_timed(timer, lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True),
                                       device)
        out = None  # drop the retained graph before the next pass allocates its own
    if "fwd+bwd" in passes:
        results["fwd+bwd"] = run_timed(timer, lambda: torch.autograd.grad(fn(*inputs), inputs, dout), device)
    return results


def rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Norm-wise relative error, computed on the tensors' device in float32 (the inputs of
    these benchmarks are too large to copy to the host as float64)."""
    a, r = actual.detach().float(), reference.detach().float()
    norm = r.norm().item()
    diff = (a - r).norm().item()
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


# --- SDPA baselines ------------------------------------------------------------------------


_GQA_FLAG: Optional[bool] = None


def sdpa_has_enable_gqa() -> bool:
    """Whether this torch's scaled_dot_product_attention takes ``enable_gqa`` (torch >= 2.5):
    a tiny call on the CPU, once per process."""
    global _GQA_FLAG
    if _GQA_FLAG is None:
        x, y = torch.zeros(1, 2, 1, 8), torch.zeros(1, 1, 1, 8)
        try:
            F.scaled_dot_product_attention(x, y, y, enable_gqa=True)
            _GQA_FLAG = True
        except TypeError:
            _GQA_FLAG = False
        except RuntimeError:  # the flag exists; this CPU build refused the call for another reason
            _GQA_FLAG = True
    return _GQA_FLAG


def repeat_kv(q: torch.Tensor, x: torch.Tensor, head_dim: int = 2) -> torch.Tensor:
    """x with its heads (dim ``head_dim``) repeated to q's head count (no copy without GQA)."""
    group = q.shape[head_dim] // x.shape[head_dim]
    return x if group == 1 else x.repeat_interleave(group, dim=head_dim)


def sdpa_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, backend: Optional[str],
              gqa: str = "native", dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA on (batch, seqlen, heads, d) tensors, returning (batch, seqlen_q, heads, d).

    ``backend``: an ``SDPBackend`` name (FLASH_ATTENTION, CUDNN_ATTENTION, ...) to restrict
    to, or None for PyTorch's own choice. ``gqa``: "native" passes ``enable_gqa=True`` when
    K/V have fewer heads; "repeat" repeats them inside the call (autograd sums the copies'
    gradients back). SDPA's causal mask is aligned to the top left, ours to the bottom right:
    ``common.sdpa_is_causal`` drops the mask for one query row (it sees every key) and refuses
    other shapes with seqlen_q != seqlen_k (NotImplementedError: "unsupported").
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    causal = sdpa_is_causal(q.shape[1], k.shape[1], causal)
    kwargs = {}
    if k.shape[2] != q.shape[2]:
        if gqa == "native":
            kwargs["enable_gqa"] = True
        else:
            k, v = repeat_kv(q, k), repeat_kv(q, v)
    ctx = sdpa_kernel(getattr(SDPBackend, backend)) if backend else contextlib.nullcontext()
    with ctx:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, dropout_p=dropout_p, **kwargs)
    return out.transpose(1, 2)


def gqa_modes(q: torch.Tensor, k: torch.Tensor) -> list[str]:
    """The GQA modes to try for an SDPA baseline, best first: enable_gqa (no copy) when this
    torch has it, then repeated heads."""
    if k.shape[2] == q.shape[2]:
        return ["native"]
    return (["native"] if sdpa_has_enable_gqa() else []) + ["repeat"]


GQA_NOTES = {"native": "GQA via enable_gqa=True (no K/V copy)",
             "repeat": "GQA via K/V heads repeated inside the call (enable_gqa refused or absent)"}


def first_working(candidates: Sequence[tuple[str, Callable[[], object]]]) -> tuple[Optional[str], Optional[str]]:
    """(name of the first candidate whose call succeeds, None) or (None, the last failure's
    status). Used to pick an SDPA GQA mode that the backend accepts."""
    status = "unsupported: no candidate"
    for name, call in candidates:
        try:
            call()
            return name, None
        except Exception as exc:
            status = classify_failure(exc)
    return None, status


# --- report helpers ------------------------------------------------------------------------


def fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3g}"


def fmt_ratio(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def fmt_tflops(x: Optional[float]) -> str:
    """TFLOP/s: whole numbers on a GPU, three significant digits for the CPU's tiny values."""
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 10 else f"{x:.3g}"


def cell(row: Optional[dict], key: str = "ms", fmt: Callable = fmt_ms) -> str:
    """A table entry: the value when the row's status is ok, else its short status."""
    if row is None:
        return ""
    if row.get("status") != "ok":
        return short_status(str(row.get("status")))
    return fmt(row.get(key))


def index_rows(rows: Sequence[dict]) -> dict[tuple, dict]:
    """{(case, impl, pass): row}."""
    return {(r["case"], r["impl"], r["pass"]): r for r in rows}


def ordered(values, order: Optional[Sequence] = None) -> list:
    present = list(dict.fromkeys(values))
    if order:
        return [v for v in order if v in present] + [v for v in present if v not in order]
    return present


def speed_ratio(index: dict, case: str, impl: str, base: str, pass_: str, base_pass: Optional[str] = None
                ) -> Optional[float]:
    """base ms / impl ms for one case (> 1: impl faster), or None unless both are ok."""
    a, b = index.get((case, impl, pass_)), index.get((case, base, base_pass or pass_))
    if a and b and a.get("status") == "ok" and b.get("status") == "ok" and a.get("ms") and b.get("ms"):
        return b["ms"] / a["ms"]
    return None


def not_measured(rows: Sequence[dict]) -> list[str]:
    """One markdown line per (implementation, status) that was not ok, with its cases."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r.get("status") != "ok":
            groups.setdefault((str(r["impl"]), str(r["status"])), []).append(f"{r['case']} ({r['pass']})")
    lines = []
    for (impl, status), where in groups.items():
        shown = "; ".join(where[:4]) + (f"; ... ({len(where) - 4} more)" if len(where) > 4 else "")
        lines.append(f"- `{impl}` {status}: {shown}")
    return lines


def rows_device_timer(rows: Sequence[dict]) -> tuple[str, str]:
    devices = ", ".join(ordered(str(r["device"]) for r in rows if r.get("device"))) or "device not recorded"
    timers = ", ".join(ordered(str(r["timer"]) for r in rows if r.get("timer"))) or "timer not recorded"
    return devices, timers


def write_report(out_dir: str, name: str, columns: Sequence[str], rows: Sequence[dict], markdown: str,
                 plot: Optional[Callable[[str], Optional[str]]], csv_only: bool = False, plots: bool = True
                 ) -> list[str]:
    """``name``.csv, ``name``.md and (with matplotlib) the plot into ``out_dir``; ``plot(path
    prefix)`` draws and returns its PNG path (or None). Returns the paths written."""
    from .plots import have_matplotlib

    paths = [os.path.join(out_dir, f"{name}.csv")]
    write_csv(paths[0], columns, [[r.get(c) for c in columns] for r in rows])
    if csv_only:
        return paths
    paths.append(os.path.join(out_dir, f"{name}.md"))
    write_text(paths[1], markdown)
    if plots and plot is not None and rows:
        if have_matplotlib():
            png = plot(os.path.join(out_dir, name))
            if png:
                paths.append(png)
        else:
            write("matplotlib is not installed (pip install 'ringflash[bench]'): no plots")
    return paths


def load_csv(path: str) -> list[dict]:
    rows = read_csv_rows([path])
    for r in rows:  # empty cells come back as None
        r["note"] = r.get("note") or ""
        r["status"] = r.get("status") or ""
    return rows


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    return format_table(header, rows)


# -- the shared ending of every benchmark command ------------------------------------------


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def interruptible(notes: list, what: str = "cases") -> Iterator[dict]:
    """Ctrl-C, and the SIGTERM that ``timeout`` sends, end the run early but still let it
    write its report: yields a dict whose "interrupted" turns True, and adds a note."""
    state = {"interrupted": False}
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield state
    except KeyboardInterrupt:
        state["interrupted"] = True
        notes.append(f"Interrupted (Ctrl-C or the time limit): the tables hold the {what} measured before it.")
    finally:
        signal.signal(signal.SIGTERM, previous)


def publish(args: argparse.Namespace, name: str, columns: Sequence[str], rows: Sequence[dict], report: str,
            plot: Callable[[list[dict], str], object]) -> None:
    """Write the CSV, markdown and plot under ``--out`` (if given), then print the report."""
    if args.out:
        paths = write_report(args.out, name, columns, rows, report, lambda path: plot(list(rows), path),
                             csv_only=args.csv_only, plots=not args.no_plots)
        print("wrote " + ", ".join(paths))
    print()
    print(report)


def redraw(args: argparse.Namespace, name: str, columns: Sequence[str], markdown_report: Callable[[list], str],
           plot: Callable[[list[dict], str], object]) -> int:
    """``--from-csv``: the report of a saved run, without measuring anything."""
    rows = load_csv(args.from_csv)
    publish(args, name, columns, rows, markdown_report(rows), plot)
    return 0
