"""``ringflash bench dropout`` (issue 16): what attention dropout and ALiBi cost.

Issue 16's bar: dropout may cost at most 15% over no dropout, forward+backward. Case (GPU):
``flash_attn_func``, bf16, d=128, causal, 16k tokens as batch 4 x 4k, 16 heads
(``--quick``: batch 2 x 2k). Implementations, on the same tensors:

* ``ours``: dropout_p=0, no ALiBi;
* ``ours_dropout``: dropout_p=0.1 (Philox keep mask in the forward, regenerated in the
  backward);
* ``ours_alibi``: ALiBi slopes (the usual 2^(-8 i / nheads), float32), no dropout;
* ``ours_atomic`` / ``ours_dropout_atomic``: ``ours`` and ``ours_dropout`` under
  ``RINGFLASH_BACKWARD=atomic``, the backward whose dK/dV kernel also accumulates dQ, so
  the dropout mask is regenerated once in the backward instead of twice (once per kernel);
* ``ours_sm90`` / ``ours_dropout_sm90``: ``ours`` and ``ours_dropout`` under
  ``RINGFLASH_BACKEND=sm90``, the Gluon Hopper kernels forward and backward (their dropout
  mask drawn by inline PTX, each key pair's draw mixed once);
* ``fa2`` / ``fa2_dropout``: SDPA's flash backend at dropout_p 0 and 0.1, for reference
  (FA2's own dropout overhead; SDPA has no ALiBi on that backend).

Passes: ``fwd``, ``bwd`` (alone, on a retained graph) and ``fwd+bwd``. The report gives the
overhead ratios (time with / time without) and whether forward+backward meets the bar.

``--out DIR`` writes dropout.csv, dropout.md and dropout_overhead.png; ``--from-csv`` redraws.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .common import BWD_FLOP_FACTOR, attn_flops, device_description, free_memory, tflops
from .harness import (
    interruptible, publish, redraw,
    BASE_COLUMNS, add_device_options, cell, cpu_threads, environ, fmt_ratio, index_rows, make_timer,
    measure_passes, not_measured, ordered, rel_err, resolve_device, rows_device_timer, sdpa_call, table,
)
from .progress import progress_bar, show

NAME = "dropout"
COLUMNS = BASE_COLUMNS + ["tflops", "rel_err", "dropout_p", "alibi", "batch", "seqlen", "nheads", "headdim", "causal"]
PASSES = ("fwd", "bwd", "fwd+bwd")
IMPLS = ("ours", "ours_dropout", "ours_alibi", "ours_atomic", "ours_dropout_atomic", "ours_sm90", "ours_dropout_sm90",
         "fa2", "fa2_dropout")
#: The environment of each ringflash variant (the rest run under the defaults).
IMPL_ENV = {"ours_atomic": {"RINGFLASH_BACKWARD": "atomic"}, "ours_dropout_atomic": {"RINGFLASH_BACKWARD": "atomic"},
            "ours_sm90": {"RINGFLASH_BACKEND": "sm90"}, "ours_dropout_sm90": {"RINGFLASH_BACKEND": "sm90"}}
DROPOUT_P = 0.1
#: Issue 16: dropout's forward+backward time at most 15% over no dropout.
BAR = 1.15
#: (ratio label, impl, its no-op counterpart, the bar or None)
OVERHEADS = (("ours: dropout 0.1 / none", "ours_dropout", "ours", BAR),
             ("ours, atomic backward: dropout 0.1 / none", "ours_dropout_atomic", "ours_atomic", BAR),
             ("ours, sm90 kernels: dropout 0.1 / none", "ours_dropout_sm90", "ours_sm90", BAR),
             ("ours: ALiBi / none", "ours_alibi", "ours", None),
             ("FA2 (SDPA): dropout 0.1 / none", "fa2_dropout", "fa2", None))


@dataclass(frozen=True)
class Case:
    batch: int
    seqlen: int
    nheads: int
    headdim: int
    causal: bool = True

    @property
    def name(self) -> str:
        s = f"{self.seqlen // 1024}k" if self.seqlen % 1024 == 0 else str(self.seqlen)
        return f"b={self.batch} s={s} h={self.nheads} d={self.headdim} {'causal' if self.causal else 'full'}"


GPU_CASE = Case(4, 4096, 16, 128)
QUICK_CASE = Case(2, 2048, 16, 128)
CPU_CASE = Case(1, 64, 2, 16)


def alibi_slopes(nheads: int, device: str) -> torch.Tensor:
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / nheads) for i in range(nheads)], dtype=torch.float32, device=device)


def run_case(case: Case, device: str, dtype: torch.dtype, timer, timer_name: str, device_name: str) -> list[dict]:
    from ..interface import flash_attn_func

    gen = torch.Generator(device=device).manual_seed(0)
    mk = lambda: torch.randn(case.batch, case.seqlen, case.nheads, case.headdim, device=device, dtype=dtype,  # noqa: E731
                             generator=gen)
    inputs = tuple(mk().requires_grad_() for _ in range(3))
    dout = mk()
    slopes = alibi_slopes(case.nheads, device)
    c = case.causal
    plain = lambda q, k, v: flash_attn_func(q, k, v, causal=c)  # noqa: E731
    dropped = lambda q, k, v: flash_attn_func(q, k, v, dropout_p=DROPOUT_P, causal=c)  # noqa: E731
    fns = {
        "ours": (plain, 0.0, False),
        "ours_dropout": (dropped, DROPOUT_P, False),
        "ours_atomic": (plain, 0.0, False),
        "ours_dropout_atomic": (dropped, DROPOUT_P, False),
        "ours_sm90": (plain, 0.0, False),
        "ours_dropout_sm90": (dropped, DROPOUT_P, False),
        "ours_alibi": (lambda q, k, v: flash_attn_func(q, k, v, causal=c, alibi_slopes=slopes), 0.0, True),
        "fa2": (lambda q, k, v: sdpa_call(q, k, v, c, "FLASH_ATTENTION"), 0.0, False),
        "fa2_dropout": (lambda q, k, v: sdpa_call(q, k, v, c, "FLASH_ATTENTION", dropout_p=DROPOUT_P), DROPOUT_P,
                        False),
    }
    flops = attn_flops(case.batch, case.nheads, case.seqlen, case.seqlen, case.headdim, c)
    pass_flops = {"fwd": flops, "bwd": BWD_FLOP_FACTOR * flops, "fwd+bwd": (1 + BWD_FLOP_FACTOR) * flops}
    err = None
    try:  # a guard on the numbers: our no-dropout output against FA2's
        with torch.no_grad():
            err = rel_err(fns["ours"][0](*inputs), fns["fa2"][0](*inputs))
    except Exception:  # the rows below record the failing side
        pass
    rows = []
    for impl, (fn, p, alibi) in fns.items():
        env = IMPL_ENV.get(impl, {})
        with environ(**env):
            results = measure_passes(fn, inputs, dout, timer, device, passes=PASSES)
        for ps, (ms, status) in results.items():
            rows.append(dict(case=case.name, impl=impl, **{"pass": ps}, ms=ms, status=status,
                             note=(" ".join(f"{k}={v}" for k, v in env.items()) if env else
                                   "defaults" if impl.startswith("ours") else ""),
                             timer=timer_name, device=device_name,
                             tflops=tflops(pass_flops[ps], ms) if ms else None,
                             rel_err=err if impl == "ours" else None, dropout_p=p, alibi=alibi, batch=case.batch,
                             seqlen=case.seqlen, nheads=case.nheads, headdim=case.headdim, causal=c))
        if device == "cuda":
            free_memory()
    return rows


def overhead(index: dict, case: str, impl: str, base: str, p: str) -> Optional[float]:
    """impl ms / base ms (> 1: impl slower), or None."""
    a, b = index.get((case, impl, p)), index.get((case, base, p))
    if a and b and a.get("status") == "ok" and b.get("status") == "ok" and a.get("ms") and b.get("ms"):
        return a["ms"] / b["ms"]
    return None


def overhead_table(rows: Sequence[dict]) -> str:
    index = index_rows(rows)
    out = []
    for c in ordered(str(r["case"]) for r in rows):
        for label, impl, base, bar in OVERHEADS:
            vals = [overhead(index, c, impl, base, p) for p in PASSES]
            verdict = "-"
            if bar is not None and vals[2] is not None:
                verdict = f"{'met' if vals[2] <= bar else 'NOT met'} (<= {bar:.2f}x)"
            out.append([c, label] + [fmt_ratio(v) + ("x" if v is not None else "") for v in vals] + [verdict])
    return table(["case", "time ratio", "fwd", "bwd", "fwd+bwd", "issue 16 bar (fwd+bwd)"], out)


def markdown_report(rows: Sequence[dict], notes: Sequence[str] = ()) -> str:
    if not rows:
        return "# ringflash bench dropout\n\nNo results.\n"
    devices, timers = rows_device_timer(rows)
    index = index_rows(rows)
    cases = ordered(str(r["case"]) for r in rows)
    impls = ordered((str(r["impl"]) for r in rows), IMPLS)
    errs = [r["rel_err"] for r in rows if isinstance(r.get("rel_err"), (int, float))]
    out = ["# ringflash bench dropout", "",
           f"- Device: {devices}",
           f"- Timer: {timers}; milliseconds per call",
           f"- flash_attn_func with dropout_p={DROPOUT_P} or ALiBi slopes against neither; SDPA's flash backend "
           "with and without dropout for reference. `bwd` is the backward alone on a retained graph; `fwd+bwd` "
           "both, as a training step",
           f"- Issue 16's bar: dropout's fwd+bwd time at most {BAR:.2f}x that without dropout"]
    if errs:
        out.append(f"- Sanity: our no-dropout output against FA2's: relative error {max(errs):.2e}")
    out += [f"- {n}" for n in notes]
    for p in PASSES:
        ms = [[c] + [cell(index.get((c, i, p))) for i in impls] for c in cases]
        out += ["", f"## {p} (ms)", "", table(["case"] + impls, ms)]
    missing = not_measured(rows)
    if missing:
        out += ["", "## Not measured", ""] + missing
    out += ["", "## Overhead (time with / time without; 1.00x = free)", "", overhead_table(rows)]
    return "\n".join(out) + "\n"


def plot_overheads(rows: Sequence[dict], prefix: str) -> str:
    from .plots import BarPanel, ratio_bars

    index = index_rows(rows)
    cases = ordered(str(r["case"]) for r in rows)
    cats = [f"{c}: {label}" for c in cases for label, *_ in OVERHEADS]
    series = {p: [overhead(index, c, impl, base, p) for c in cases for _, impl, base, _ in OVERHEADS] for p in PASSES}
    devices, timers = rows_device_timer(rows)
    return ratio_bars(f"{prefix}_overhead.png", [BarPanel("time with / time without", cats, series)],
                      "ringflash dropout and ALiBi: overhead over plain attention",
                      "time ratio (1 = no overhead; lower is better)", note=f"{devices} | {timers}", reference=BAR,
                      reference_label=f"issue 16 bar for dropout, fwd+bwd ({BAR:.2f}x)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ringflash bench dropout", description=__doc__.split("\n\n")[0])
    add_device_options(parser, "GPU: batch 2 x 2k instead of 4 x 4k")
    args = parser.parse_args(argv)
    if args.from_csv:
        return redraw(args, NAME, COLUMNS, markdown_report, plot_overheads)
    device = resolve_device(args.device)
    case = CPU_CASE if device == "cpu" else (QUICK_CASE if args.quick else GPU_CASE)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    timer, timer_name = make_timer(device)
    device_name = device_description(device)
    print(f"device: {device_name}", flush=True)
    notes = ["CPU run: float32, Triton interpreted, wall-clock times; they check the report path and say nothing "
             "about GPU speed."] if device == "cpu" else []
    rows: list[dict] = []
    with interruptible(notes, "passes") as run, cpu_threads(device), progress_bar(1, "dropout") as bar:
        show(bar, case.name)
        rows = run_case(case, device, dtype, timer, timer_name, device_name)
        bar.update(1)
    publish(args, NAME, COLUMNS, rows, markdown_report(rows, notes), plot_overheads)
    return 130 if run["interrupted"] else 0

