"""``ringflash bench cp --simulate W [W ...]``: the compute balance of every CP strategy's
layout, measured on one device (issue 18).

For each batch (one document, the mixed pack, many short documents; ``bench cp``'s sizes:
8k tokens per GPU), strategy (all of them, and ``auto``'s choice) and world size W, every
rank's local attention of the W-rank plan runs alone (``ringflash.cp.simulate``: the
plan's own metadata, the same kernel calls, random inputs of that rank's shapes), forward
and forward+backward, timed with the project's timer (``do_bench`` median on a GPU; the
CPU wall-clock timer with ``--device cpu``). Communication is not simulated: these are
compute times, and max/mean over the ranks is the layout's compute balance.

Reported per (batch, strategy, W): the balance of the measured rank times, the cost
model's balance (causal pairs per rank, ``cost.layout_work``), and the models' per-rank
times against the measured ones, as the largest |predicted - measured| / measured over the
ranks: pairs only (4 d nheads FLOPs per pair) at ``Machine.tflops`` and at one rate per
pass fitted to the run, and cost.py's models (``Machine.fwd_model`` at ``fwd_tflops`` for
the forward, ``step_model`` at ``step_tflops`` for forward+backward: pairs, query rows,
pieces, and the call's terms per query group). ``--fit`` fits those models' rates and
terms to the run (the calibration this command exists for). Issue 18's bars: balanced's
max/mean rank time at most 1.05; cost.py's models within 10% per rank.

``--out DIR`` writes cp_simulate.csv (one row per rank), cp_simulate.md,
cp_simulate_balance.png and cp_simulate_model.png; ``bench cp --from-csv`` redraws them.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import astuple
from typing import Optional, Sequence

import torch

from ..cp.cost import AUTO_CANDIDATES, Heads, Machine
from ..cp.layout import BALANCED_MIN_PIECE, STRATEGIES, CostModel
from .cp import CASES, TOKENS_PER_GPU, batch_lengths
from .common import BWD_FLOP_FACTOR, bench_call_count, device_description, free_memory, write_csv
from .harness import (
    classify_failure, cpu_threads, interruptible, make_timer, ordered, resolve_device, run_timed, table,
    write_report,
)
from .progress import progress_bar, show, write

NAME = "cp_simulate"
#: Issue 18's bars.
BALANCE_BAR = 1.05
MODEL_BAR = 0.10
PASSES = {"fwd": "fwd_ms", "fwd+bwd": "fwd_bwd_ms"}
CASE_NAMES = {"single": "one document", "mixed": "mixed pack", "short": "many short documents"}
COLUMNS = ["batch", "strategy", "chosen", "world", "rank", "status", "fwd_ms", "fwd_bwd_ms", "pred_fwd_ms",
           "pred_fwd_bwd_ms", "pairs", "kernel_pairs", "model_rows", "model_pieces", "model_group_key_rows",
           "model_entries", "tokens", "q_rows", "key_rows", "q_heads", "query_groups", "calls", "documents",
           "total_tokens", "nheads", "nheads_k", "headdim", "dtype", "tflops", "ulysses_degree", "min_piece", "timer",
           "device", "note"]

QUICK_TOKENS_PER_GPU = 2048
#: --device cpu: tiny sizes (the interpreter runs ~0.1-0.5 s per kernel call whatever the size).
CPU_TOKENS_PER_GPU = 16
CPU_HEADS = Heads(nheads=2, nheads_k=1, headdim=16)
GPU_HEADS = Heads()  # Llama-3-8B: 32 / 8 heads, d=128
#: --device cpu --quick: one strategy per engine kind (all-gather with several query groups,
#: ring, Ulysses, hybrid) and auto; the layout accounting of every strategy is tested
#: without running kernels (tests/test_bench_cp_simulate.py).
CPU_QUICK_STRATEGIES = ("balanced", "zigzag_ring", "ulysses", "hybrid", "auto")
#: ... and two batches (the interpreter's time grows with the documents: ~12 for ``short``).
CPU_QUICK_CASES = ("single", "mixed")
DEFAULT_ULYSSES_DEGREE = 2


def _flops_per_pair(row: dict) -> float:
    return 4.0 * float(row["headdim"]) * float(row["nheads"])


def _ok(row: dict) -> bool:
    return row.get("status") == "ok"


#: The CSV's model columns: a rank's work under each ``CostModel`` term alone (field order).
MODEL_TERMS = {"pairs": (1, 0, 0, 0, 0), "model_rows": (0, 1, 0, 0, 0), "model_pieces": (0, 0, 1, 0, 0),
               "model_group_key_rows": (0, 0, 0, 1, 0), "model_entries": (0, 0, 0, 0, 1)}
#: Each pass's model in cost.py (``Machine`` fields: rate, model) and the terms it is fitted
#: with (the others stay 0): the forward's launch grid holds programs for every (query group,
#: document) entry; the backward's dK/dV programs loop over every query group per key block.
PASS_MODELS = {"fwd": ("fwd_tflops", "fwd_model"), "fwd+bwd": ("step_tflops", "step_model")}
PASS_TERMS = {"fwd": ("pairs", "model_rows", "model_pieces", "model_entries"),
              "fwd+bwd": ("pairs", "model_rows", "model_pieces", "model_group_key_rows")}
#: The strategies whose work ``sim.model_work`` models as their engines run it (the ring
#: strategies' W calls are not measured against it yet): the fits use their ranks.
FIT_STRATEGIES = AUTO_CANDIDATES + ("hybrid",)


def _has_terms(row: dict) -> bool:
    return all(row.get(k) not in (None, "") for k in MODEL_TERMS)


def _terms(row: dict) -> list[float]:
    """The row's work per model term (``fill_model_terms`` completes an older run's CSV)."""
    return [float(row[k]) for k in MODEL_TERMS]


def model_ms(row: dict, p: str, machine: Machine = Machine()) -> float:
    """cost.py's predicted time of pass ``p`` ("fwd" or "fwd+bwd") of the rank."""
    rate, model = (getattr(machine, a) for a in PASS_MODELS[p])
    units = sum(c * x for c, x in zip(astuple(model), _terms(row)))
    return units * _flops_per_pair(row) / rate / 1e9


def step_ms(row: dict, machine: Machine = Machine()) -> float:
    """``cost.predict``'s fwd+bwd compute time of the rank (``Machine.step_model``)."""
    return model_ms(row, "fwd+bwd", machine)


def fill_model_terms(rows: Sequence[dict]) -> int:
    """Computes the model columns that a CSV of an older run lacks (runs 33 to 35 have no
    group key rows or entries) from the same layouts (deterministic: ``batch_lengths`` of
    the row's batch, W and tokens, ``sim.model_work``); rows whose batch does not rebuild
    (another document count) are left as they are. Returns how many rows it filled."""
    from ..cp import simulate as sim

    cache: dict[tuple, Optional[dict]] = {}
    filled = 0
    for r in rows:
        if _has_terms(r) or not _ok(r) or r.get("total_tokens") in (None, ""):
            continue
        w = int(r["world"])
        strategy = str(r.get("chosen") or r["strategy"])
        u = int(r["ulysses_degree"]) if r.get("ulysses_degree") not in (None, "") else DEFAULT_ULYSSES_DEGREE
        min_piece = int(r["min_piece"]) if r.get("min_piece") not in (None, "") else BALANCED_MIN_PIECE
        heads = Heads(int(r["nheads"]), int(r["nheads_k"]), int(r["headdim"]))
        key = (str(r["batch"]), strategy, w, int(r["total_tokens"]), u, min_piece, heads)
        if key not in cache:
            work = None
            try:
                seqlens = batch_lengths(key[0], w, key[3] // w)
                if sum(seqlens) == key[3] and len(seqlens) == int(r.get("documents") or len(seqlens)):
                    work = {k: sim.model_work(strategy, seqlens, w, heads, min_piece, u, CostModel(*c))
                            for k, c in MODEL_TERMS.items()}
            except (ValueError, sim.Unsupported):
                pass
            cache[key] = work
        work = cache[key]
        if work is not None:
            r.update({k: v[int(r["rank"])] for k, v in work.items()})
            filled += 1
    return filled


# --- measuring --------------------------------------------------------------------------------


def _rank_rows(case: str, strategy: str, world: int, seqlens: list[int], heads: Heads, dtype: torch.dtype,
               device: str, timer, timer_name: str, device_name: str, ulysses_degree: int, min_piece: int,
               bar) -> list[dict]:
    from ..cp import simulate as sim

    base = dict(batch=case, strategy=strategy, chosen=strategy, world=world, documents=len(seqlens),
                total_tokens=sum(seqlens), nheads=heads.nheads, nheads_k=heads.nheads_k, headdim=heads.headdim,
                dtype=str(dtype).replace("torch.", ""), tflops=Machine().tflops,
                ulysses_degree=ulysses_degree if strategy == "hybrid" else None,
                min_piece=min_piece if strategy == "balanced" else None, timer=timer_name, device=device_name,
                note="")
    try:
        work = {k: sim.model_work(strategy, seqlens, world, heads, min_piece, ulysses_degree, CostModel(*c))
                for k, c in MODEL_TERMS.items()}
    except Exception as exc:
        work, failed = None, classify_failure(exc)
    rows = []
    for rank in range(world):
        show(bar, f"{case} {strategy} W={world} rank {rank}")
        row = dict(base, rank=rank)
        status = failed if work is None else "ok"
        if work is not None:
            row.update({k: v[rank] for k, v in work.items()})
            row.update(pred_fwd_ms=model_ms(row, "fwd"), pred_fwd_bwd_ms=step_ms(row))
            try:
                r = sim.simulate_rank(strategy, seqlens, world, rank, heads, dtype, device,
                                      ulysses_degree=ulysses_degree, min_piece=min_piece)
                row.update(tokens=r.tokens, q_rows=r.q_rows, key_rows=r.key_rows, q_heads=r.q_heads, calls=r.calls,
                           query_groups=r.query_groups, kernel_pairs=r.kernel_pairs)
                row["fwd_ms"], status = run_timed(timer, r.forward, device)
                if status == "ok":
                    row["fwd_bwd_ms"], status = run_timed(timer, r.forward_backward, device)
                r = None
            except Exception as exc:  # a setup failure (unsupported heads, OOM): the row's status
                status = classify_failure(exc)
        row["status"] = status
        rows.append(row)
        bar.update(1)
        if device == "cuda":
            free_memory()
    return rows


#: Measuring order: balanced (issue 18's bar) first, then auto's other candidates (what the
#: model is calibrated on), then the rest, so that a run cut short by its time limit still
#: reports the strategies that matter most, at every W and batch.
PRIORITY = ("balanced", "zigzag_llama3", "llama3", "ulysses", "hybrid", "zigzag_ring", "stripe", "ring")


def run_grid(worlds: Sequence[int], cases: Sequence[str], strategies: Sequence[str], heads: Heads,
             dtype: torch.dtype, device: str, tokens_per_gpu: int, timer, timer_name: str, device_name: str,
             ulysses_degree: int = DEFAULT_ULYSSES_DEGREE, min_piece: int = BALANCED_MIN_PIECE,
             rows: Optional[list] = None) -> list[dict]:
    """One row per rank of every (strategy, W, batch), in ``PRIORITY`` order. ``auto``
    repeats the rows of the strategy it picks (measured once) under strategy "auto";
    ``rows`` collects them as they come (an interrupted run keeps what it measured)."""
    from ..cp.simulate import resolve_strategy

    rows = [] if rows is None else rows
    plain = [s for s in strategies if s != "auto"]
    seqlens = {(w, c): batch_lengths(c, w, tokens_per_gpu) for w in worlds for c in cases}
    auto = {key: resolve_strategy("auto", lens, key[0], heads, min_piece) for key, lens in seqlens.items()} \
        if "auto" in strategies else {}
    jobs = sorted({(s, w, c) for (w, c) in seqlens for s in plain + ([auto[(w, c)][0]] if auto else [])},
                  key=lambda j: (PRIORITY.index(j[0]), worlds.index(j[1]), cases.index(j[2])))
    with progress_bar(sum(w for _, w, _ in jobs), "cp --simulate", unit="rank") as bar:
        for s, w, case in jobs:
            measured = _rank_rows(case, s, w, seqlens[(w, case)], heads, dtype, device, timer, timer_name,
                                  device_name, ulysses_degree, min_piece, bar)
            _print_group(measured)
            if s in plain:
                rows += measured
            if auto and auto[(w, case)][0] == s:
                why = auto[(w, case)][1]
                rows += [dict(r, strategy="auto", chosen=s, note=why if i == 0 else "") for i, r in enumerate(measured)]
    return rows


def _print_group(rows: list[dict]) -> None:
    r0 = rows[0]
    head = f"  W={r0['world']} {r0['batch']} {r0['strategy']}:"
    if not all(_ok(r) for r in rows):
        write(f"{head} {next(r['status'] for r in rows if not _ok(r))}")
        return
    parts = []
    for p, key in PASSES.items():
        ms = [r[key] for r in rows]
        parts.append(f"{p} max {max(ms):.3g} ms, balance {max(ms) / (sum(ms) / len(ms)):.3f}")
    write(f"{head} " + "; ".join(parts))


# --- the model's accuracy ---------------------------------------------------------------------


def fit_rates(rows: Sequence[dict]) -> dict[str, Optional[float]]:
    """{pass: TFLOP/s}: the one kernel rate per pass that best predicts the measured rank
    times of ``FIT_STRATEGIES`` (least squares of the relative error), in the cost model's
    units (forward FLOPs: 4 d nheads per causal pair; for fwd+bwd, the forward FLOPs over
    the step's time)."""
    rates: dict[str, Optional[float]] = {}
    for p, key in PASSES.items():
        xs = [(float(r["pairs"]) * _flops_per_pair(r), float(r[key])) for r in _fit_rows(rows, key)]
        s1 = sum(x / y for x, y in xs)
        s2 = sum((x / y) ** 2 for x, y in xs)
        rates[p] = (s2 / s1) / 1e9 if s1 > 0 else None  # ms per FLOP = s1 / s2
    return rates


def _fit_rows(rows: Sequence[dict], key: str) -> list[dict]:
    return [r for r in rows if _ok(r) and r["strategy"] in FIT_STRATEGIES and r.get(key)
            and float(r[key]) > 0 and float(r.get("pairs") or 0) > 0]


def _rel_err(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured


def fit_constants(rows: Sequence[dict]) -> dict[str, dict]:
    """{pass: fit}: measured ms = (pairs + the pass's other ``PASS_TERMS``, each times its
    coefficient) x 4 d nheads / rate, fitted by least squares of the relative error over the
    ranks of ``FIT_STRATEGIES``: the rate is ``cost.Machine.fwd_tflops``' or
    ``step_tflops``' counterpart, ``model`` the ``layout.CostModel`` (relative to one pair)
    of ``fwd_model`` or ``step_model``. Each fit also gives its largest relative error,
    overall (``max_err``) and per strategy (``by_strategy``)."""
    out = {}
    for p, key in PASSES.items():
        fit_rows = [r for r in _fit_rows(rows, key) if _has_terms(r)]
        terms = PASS_TERMS[p]
        if len(fit_rows) < len(terms) + 1:
            continue
        a = torch.tensor([[float(r[k]) * _flops_per_pair(r) for k in terms] for r in fit_rows], dtype=torch.float64)
        y = torch.tensor([float(r[key]) for r in fit_rows], dtype=torch.float64)
        coef = torch.linalg.lstsq(a / y[:, None], torch.ones_like(y)[:, None]).solution[:, 0]
        errs = ((a @ coef - y).abs() / y).tolist()
        by_strategy: dict[str, float] = {}
        for r, e in zip(fit_rows, errs):
            by_strategy[r["strategy"]] = max(by_strategy.get(r["strategy"], 0.0), e)
        alpha = coef[0].item()
        fields = {k: 0.0 for k in MODEL_TERMS}
        fields.update({k: c / alpha for k, c in zip(terms, coef.tolist())} if alpha else {})
        model = CostModel(*(fields[k] for k in MODEL_TERMS)) if alpha > 0 else None
        out[p] = dict(tflops=1 / alpha / 1e9 if alpha > 0 else None, model=model, max_err=max(errs),
                      by_strategy=by_strategy, ranks=len(fit_rows))
    return out


def summarize(rows: Sequence[dict], tflops: Optional[float] = None) -> list[dict]:
    """One entry per (batch, strategy, W), in the rows' order: balances, the model's
    balance and its largest per-rank error (pairs only at the default or given rate and at
    the fitted rates; cost.py's forward and step models)."""
    rates = fit_rates(rows)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((str(r["batch"]), str(r["strategy"]), int(r["world"])), []).append(r)
    out = []
    for (batch, strategy, world), rs in groups.items():
        rs = sorted(rs, key=lambda r: int(r["rank"]))
        s = dict(batch=batch, strategy=strategy, world=world, chosen=rs[0].get("chosen") or strategy,
                 status=next((str(r["status"]) for r in rs if not _ok(r)), "ok"))
        pairs = [float(r["pairs"]) for r in rs if r.get("pairs") not in (None, "")]
        if pairs and len(pairs) == len(rs):
            mean = sum(pairs) / len(pairs)
            s["model_balance"] = max(pairs) / mean if mean else 1.0
        if s["status"] == "ok":
            terms = all(_has_terms(r) for r in rs)  # runs that recorded (or filled) every term
            for p, key in PASSES.items():
                ms = [float(r[key]) for r in rs]
                mean = sum(ms) / len(ms)
                s[f"max_{key}"], s[f"mean_{key}"] = max(ms), mean
                s[f"balance_{p}"] = max(ms) / mean if mean else 1.0
                factor = 1.0 if p == "fwd" else 1 + BWD_FLOP_FACTOR
                rate = tflops or float(rs[0].get("tflops") or Machine().tflops)
                s[f"err_{p}"] = max(_rel_err(float(r["pairs"]) * _flops_per_pair(r) * factor / rate / 1e9, m)
                                    for r, m in zip(rs, ms))
                if rates.get(p):
                    s[f"err_fit_{p}"] = max(_rel_err(float(r["pairs"]) * _flops_per_pair(r) / rates[p] / 1e9, m)
                                            for r, m in zip(rs, ms))
                if terms:
                    s[f"err_model_{p}"] = max(_rel_err(model_ms(r, p), m) for r, m in zip(rs, ms))
            if terms:
                s["err_step"] = s["err_model_fwd+bwd"]
        out.append(s)
    order = list(PRIORITY) + ["auto"]
    return sorted(out, key=lambda s: (CASES.index(s["batch"]) if s["batch"] in CASES else len(CASES), s["world"],
                                      order.index(s["strategy"]) if s["strategy"] in order else len(order)))


# --- report -----------------------------------------------------------------------------------


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: Optional[float], fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _verdicts(s: dict) -> tuple[str, str]:
    bal = "-"
    if s["strategy"] == "balanced" and s["status"] == "ok":
        worst = max(s["balance_fwd"], s["balance_fwd+bwd"])
        bal = "met" if worst <= BALANCE_BAR else "NOT met"
    model = "-"
    errs = [s.get(f"err_model_{p}") for p in PASSES]
    if all(e is not None for e in errs):
        model = "met" if max(errs) <= MODEL_BAR else "NOT met"
    return bal, model


def summary_table(summary: Sequence[dict]) -> str:
    body = []
    for s in summary:
        bal, model = _verdicts(s)
        strategy = s["strategy"] + (f" ({s['chosen']})" if s["strategy"] == "auto" else "")
        if s["status"] != "ok":
            body.append([s["batch"], s["world"], strategy, s["status"][:60]] + ["-"] * 10)
            continue
        body.append([s["batch"], s["world"], strategy, f"{s['max_fwd_bwd_ms']:.3g} / {s['mean_fwd_bwd_ms']:.3g}",
                     _num(s["balance_fwd"]), _num(s["balance_fwd+bwd"]), _num(s.get("model_balance")),
                     _pct(s.get("err_fwd")), _pct(s.get("err_fit_fwd")), _pct(s.get("err_fit_fwd+bwd")),
                     _pct(s.get("err_model_fwd")), _pct(s.get("err_model_fwd+bwd")), bal, model])
    return table(["batch", "W", "strategy", "fwd+bwd ms (max / mean rank)", "balance fwd", "balance fwd+bwd",
                  "model balance", "pairs err fwd (default rate)", "pairs err fwd (fitted rate)",
                  "pairs err fwd+bwd (fitted rate)", "model err fwd (cost.py forward model)",
                  "model err fwd+bwd (cost.py step model)", f"balance <= {BALANCE_BAR}", f"model <= {MODEL_BAR:.0%}"],
                 body)


def _model_repr(model: CostModel) -> str:
    fields = ", ".join(f"{k}={_num(v, '.4g')}" for k, v in zip(("pair", "row", "piece", "group_key_row", "entry"),
                                                                astuple(model)) if v or k == "pair")
    return f"CostModel({fields})"


def _by_strategy(errs: dict[str, float]) -> str:
    return ", ".join(f"{k} {_pct(v)}" for k, v in sorted(errs.items(), key=lambda t: PRIORITY.index(t[0])
                                                           if t[0] in PRIORITY else len(PRIORITY)))


def fit_report(rows: Sequence[dict]) -> list[str]:
    """Markdown lines: the fitted constants and how well each model fits, overall and per
    strategy."""
    rates = fit_rates(rows)
    fits = fit_constants(rows)
    out = ["## Calibration (fitted to this run's ranks of " + ", ".join(FIT_STRATEGIES) + ")", ""]
    for p in PASSES:
        if not rates.get(p):
            out.append(f"- {p}: nothing to fit")
            continue
        key = PASSES[p]
        err_rate = max(_rel_err(float(r["pairs"]) * _flops_per_pair(r) / rates[p] / 1e9, float(r[key]))
                       for r in _fit_rows(rows, key))
        rate_name, model_name = PASS_MODELS[p]
        line = f"- {p}: pairs only: `Machine(tflops={rates[p]:.4g})` (max rank error {_pct(err_rate)})"
        f = fits.get(p)
        if f and f["tflops"]:
            line += (f"; cost.py's terms ({', '.join(PASS_TERMS[p])}): `Machine({rate_name}={f['tflops']:.4g}, "
                     f"{model_name}={_model_repr(f['model'])})` (max rank error {_pct(f['max_err'])} over "
                     f"{f['ranks']} ranks; per strategy: {_by_strategy(f['by_strategy'])})")
        elif f:
            line += (f"; cost.py's terms: no positive pair term (the times do not follow the pairs; "
                     f"max rank error {_pct(f['max_err'])})")
        else:
            line += "; cost.py's terms: not recorded in these rows"
        out.append(line)
    m = Machine()
    defaults = {}
    for p, key in PASSES.items():
        fit_rows = [r for r in _fit_rows(rows, key) if _has_terms(r)]
        by: dict[str, float] = {}
        for r in fit_rows:
            by[r["strategy"]] = max(by.get(r["strategy"], 0.0), _rel_err(model_ms(r, p, m), float(r[key])))
        if by:
            defaults[p] = f"{_pct(max(by.values()))} ({_by_strategy(by)})"
    out += ["", f"cost.py's defaults: `Machine(tflops={m.tflops})` (forward, pairs only: rough estimates), the "
                f"forward's `fwd_tflops={m.fwd_tflops}`, `fwd_model={_model_repr(m.fwd_model)}` and, for the "
                f"training step that `auto` ranks, `step_tflops={m.step_tflops}`, "
                f"`step_model={_model_repr(m.step_model)}`"
                + (": largest rank error on this run " + "; ".join(f"{p} {v}" for p, v in defaults.items())
                   if defaults else "")
                + ". The rates count forward FLOPs (4 d nheads per pair) over the pass's time (x"
                f"{1 + BWD_FLOP_FACTOR} for the usual fwd+bwd FLOP count). Negative terms are not physical: keep "
                "the defaults then."]
    return out


def markdown_report(rows: Sequence[dict], notes: Sequence[str] = (), fit: bool = False,
                    tflops: Optional[float] = None) -> str:
    head = ["# ringflash bench cp --simulate", ""]
    if not rows:
        return "\n".join(head + ["No results."]) + "\n"
    devices = ", ".join(ordered(str(r["device"]) for r in rows if r.get("device"))) or "device not recorded"
    timers = ", ".join(ordered(str(r["timer"]) for r in rows if r.get("timer"))) or "timer not recorded"
    r0 = rows[0]
    summary = summarize(rows, tflops)
    rates = fit_rates(rows)
    rate = tflops or float(r0.get("tflops") or Machine().tflops)
    batches = "; ".join(f"{c}: {CASE_NAMES.get(c, c)}, {_docs(rows, c)}" for c in ordered(str(r["batch"]) for r in rows))
    out = head + [
        f"- Device: {devices}",
        f"- Timer: {timers}; milliseconds per call of one rank's work",
        "- What: every rank's local attention of a W-rank plan, run alone on this one device (the plan's own "
        "metadata and kernel calls, random inputs of that rank's shapes), forward and forward+backward. "
        "Communication is not simulated, nor the engines' elementwise work around the kernels (packing K/V, "
        "reordering gathered keys, the ring's merges, float32 accumulation): these are compute times, and max / "
        "mean over the ranks is the layout's compute balance.",
        f"- Attention: {r0['nheads']} / {r0['nheads_k']} heads, d={r0['headdim']}, {r0['dtype']}, causal. "
        f"Batches ({_tokens_per_gpu(rows)} tokens per GPU): {batches}.",
        f"- Pairs model: causal (query, key) pairs per rank (`cost.layout_work`; ulysses every document's pairs / "
        f"W, hybrid its group's / u) x 4 d nheads FLOPs at a rate: `cost.Machine`'s {rate:g} TFLOP/s (\"default "
        "rate\"), or the rate fitted to this run per pass (\"fitted rate\": " + ", ".join(
            f"{p} {_num(v, '.4g')}" for p, v in rates.items()) + " TFLOP/s in forward FLOPs). Errors: the largest "
        "|predicted - measured| / measured over the ranks.",
        "- cost.py's models: the forward's (`cost.Machine.fwd_model` at `fwd_tflops`) and the training step's, "
        "which `auto` ranks (`step_model` at `step_tflops`, against fwd+bwd): pairs, query rows, pieces, and the "
        "kernel call's terms per query group (the forward: per (group, document) entry; the step: per K/V row).",
        f"- Issue 18's bars: balanced's max / mean rank time <= {BALANCE_BAR} (forward and forward+backward); "
        f"cost.py's models' per-rank time within {MODEL_BAR:.0%} (both passes).",
    ]
    out += [f"- {n}" for n in notes]
    bars = _bars(summary)
    if bars:
        out += ["", "## Issue 18's bars"] + bars
    out += ["", "## Balance and model accuracy", "", summary_table(summary)]
    autos = [s for s in summary if s["strategy"] == "auto"]
    if autos:
        out += ["", "## auto's choices (`cost.choose` with these heads)", ""]
        whys = {(str(r["batch"]), int(r["world"])): r.get("note") for r in rows if r["strategy"] == "auto" and r.get("note")}
        for s in autos:
            out.append(f"- {s['batch']}, W={s['world']}: {s['chosen']} ({whys.get((s['batch'], s['world']), '')})")
    missing = [s for s in summary if s["status"] != "ok"]
    if missing:
        out += ["", "## Not measured", ""] + [f"- {s['batch']} W={s['world']} `{s['strategy']}`: {s['status']}"
                                              for s in missing]
    if fit:
        out += [""] + fit_report(rows)
    return "\n".join(out) + "\n"


def _docs(rows: Sequence[dict], case: str) -> str:
    ds = sorted({int(r["documents"]) for r in rows if r["batch"] == case and r.get("documents") is not None})
    return "-".join(map(str, [ds[0], ds[-1]] if len(ds) > 1 else ds)) + " documents" if ds else "?"


def _tokens_per_gpu(rows: Sequence[dict]) -> str:
    vals = sorted({int(r["total_tokens"]) // int(r["world"]) for r in rows if r.get("total_tokens")})
    return ", ".join(map(str, vals)) or "?"


def _bars(summary: Sequence[dict]) -> list[str]:
    lines = []
    bal = [s for s in summary if s["strategy"] == "balanced" and s["status"] == "ok"]
    if bal:
        worst = max(bal, key=lambda s: max(s["balance_fwd"], s["balance_fwd+bwd"]))
        value = max(worst["balance_fwd"], worst["balance_fwd+bwd"])
        lines.append(f"- balanced: largest max/mean rank time {value:.3f} ({worst['batch']}, W={worst['world']}) "
                     f"over {len(bal)} (batch, W): bar <= {BALANCE_BAR} {'met' if value <= BALANCE_BAR else 'NOT met'}")
    for p, name in (("fwd", "forward model"), ("fwd+bwd", "step model (what auto ranks)")):
        errs = [(s[f"err_model_{p}"], s) for s in summary
                if s.get(f"err_model_{p}") is not None and s["strategy"] in FIT_STRATEGIES]
        if errs:
            e, s = max(errs, key=lambda t: t[0])
            by: dict[str, float] = {}
            for x, t in errs:
                by[t["strategy"]] = max(by.get(t["strategy"], 0.0), x)
            lines.append(f"- cost.py's {name}, {p}: largest per-rank error {_pct(e)} ({s['batch']} {s['strategy']} "
                         f"W={s['world']}; per strategy: {_by_strategy(by)}): bar <= {MODEL_BAR:.0%} "
                         f"{'met' if e <= MODEL_BAR else 'NOT met'}")
    errs = [(max(s["err_fit_fwd"], s["err_fit_fwd+bwd"]), s) for s in summary
            if s.get("err_fit_fwd") is not None and s.get("err_fit_fwd+bwd") is not None and s["strategy"] != "auto"]
    if errs:
        e, s = max(errs, key=lambda t: t[0])
        lines.append(f"- for comparison, pairs only at the fitted rates, all strategies: largest per-rank error "
                     f"{_pct(e)} ({s['batch']} {s['strategy']} W={s['world']})")
    return [""] + lines if lines else []


def _series(summary: Sequence[dict], batch: str, key: str, scale: float = 1.0) -> dict:
    out: dict[str, list] = {}
    for s in summary:
        if s["batch"] == batch and s["strategy"] != "auto" and s.get(key) is not None:
            out.setdefault(s["strategy"], []).append((s["world"], scale * s[key]))
    return out


def plot_balance(rows: Sequence[dict], prefix: str) -> Optional[str]:
    """Max/mean rank time against W, one line per strategy: rows fwd and fwd+bwd, a column per batch."""
    from .plots import LinePanel, line_grid

    summary = summarize(rows)
    batches = ordered(s["batch"] for s in summary)
    panels = [[LinePanel(f"{CASE_NAMES.get(b, b)}: {p}", _series(summary, b, f"balance_{p}")) for b in batches]
              for p in PASSES]
    top = max([BALANCE_BAR] + [y for row in panels for pl in row for pts in pl.series.values() for _, y in pts])
    return line_grid(f"{prefix}_balance.png", panels, "Compute balance of the CP layouts (each rank alone on one "
                     "device; no communication)", "world size W", "max / mean rank time", note=_note(rows),
                     series_order=list(STRATEGIES), ylog=False, hline=BALANCE_BAR,
                     hline_label=f"issue 18 bar for balanced ({BALANCE_BAR})", ylim=(0.95, top * 1.03 + 0.02))


def plot_model(rows: Sequence[dict], prefix: str) -> Optional[str]:
    """cost.py's models' largest per-rank error against W, one line per strategy (pairs
    only at the fitted rate for rows without the models' terms)."""
    from .plots import LinePanel, line_grid

    summary = summarize(rows)
    batches = ordered(s["batch"] for s in summary)
    key = "err_model" if any(s.get("err_model_fwd") is not None for s in summary) else "err_fit"
    panels = [[LinePanel(f"{CASE_NAMES.get(b, b)}: {p}", _series(summary, b, f"{key}_{p}", 100.0)) for b in batches]
              for p in PASSES]
    if not any(pl.series for row in panels for pl in row):
        return None
    top = max([100 * MODEL_BAR] + [y for row in panels for pl in row for pts in pl.series.values() for _, y in pts])
    title = "cost.py's forward and step models" if key == "err_model" else "pairs only, rate fitted per pass"
    return line_grid(f"{prefix}_model.png", panels, "Cost model: largest per-rank |predicted - measured| / measured "
                     f"({title})", "world size W", "error (%)", note=_note(rows),
                     series_order=list(STRATEGIES), ylog=False, hline=100 * MODEL_BAR,
                     hline_label=f"issue 18 bar ({MODEL_BAR:.0%})", ylim=(0, top * 1.05))


def _note(rows: Sequence[dict]) -> str:
    devices = ", ".join(ordered(str(r["device"]) for r in rows if r.get("device")))
    timers = ", ".join(ordered(str(r["timer"]) for r in rows if r.get("timer")))
    return f"{devices} | {timers}"


def write_outputs(args: argparse.Namespace, rows: Sequence[dict], report: str) -> list[str]:
    """cp_simulate.csv, .md and the two PNGs under ``args.out`` (as ``--csv-only`` and
    ``--no-plots`` allow)."""
    from .plots import have_matplotlib

    paths = write_report(args.out, NAME, COLUMNS, rows, report, lambda prefix: plot_balance(rows, prefix),
                         csv_only=args.csv_only, plots=not args.no_plots)
    if not args.csv_only and not args.no_plots and rows and have_matplotlib():
        png = plot_model(rows, os.path.join(args.out, NAME))
        if png:
            paths.append(png)
    return paths


def publish(args: argparse.Namespace, rows: Sequence[dict], notes: Sequence[str] = ()) -> None:
    report = markdown_report(rows, notes, fit=args.fit, tflops=args.tflops)
    if args.csv:
        write_csv(args.csv, COLUMNS, [[r.get(c) for c in COLUMNS] for r in rows])
    if args.out:
        print("wrote " + ", ".join(write_outputs(args, rows, report)))
    print()
    print(report)


# --- the GPU time of a run ------------------------------------------------------------------


def estimate_seconds(worlds: Sequence[int], cases: Sequence[str], strategies: Sequence[str], heads: Heads,
                     tokens_per_gpu: int, ulysses_degree: int = DEFAULT_ULYSSES_DEGREE,
                     min_piece: int = BALANCED_MIN_PIECE, tflops: float = 450.0, bwd_factor: float = 4.0,
                     launch_ms: float = 0.05, compile_s: float = 60.0, start_s: float = 15.0) -> dict:
    """A rough GPU wall time of a run: each rank's forward at ``tflops`` (plus ``launch_ms``
    per kernel call), its fwd+bwd ``bwd_factor`` x that, and the timer's calls for a call of
    t ms (``bench_call_count``), plus the kernels' compilation and the process start.
    {"total": s, "per W": {W: s}}."""
    from ..cp import simulate as sim

    def bench(t: float) -> float:
        return bench_call_count(t) * t

    per_w: dict[int, float] = {}
    for w in worlds:
        ms = 0.0
        for case in cases:
            seqlens = batch_lengths(case, w, tokens_per_gpu)
            measure = [s for s in strategies if s != "auto"]
            if "auto" in strategies:
                chosen = sim.resolve_strategy("auto", seqlens, w, heads, min_piece)[0]
                measure += [chosen] if chosen not in measure else []
            for s in measure:
                try:
                    work = sim.model_work(s, seqlens, w, heads, min_piece, ulysses_degree)
                except sim.Unsupported:
                    continue
                calls = w if s in sim.RING_STRATEGIES else 1
                for pairs in work:
                    t = sim.predicted_ms(pairs, heads, Machine(tflops=tflops)) + launch_ms * calls
                    ms += bench(t) + bench(bwd_factor * t)
        per_w[w] = ms / 1e3
    return {"total": sum(per_w.values()) + compile_s + start_s, "per W": per_w, "compile_s": compile_s,
            "start_s": start_s}


# --- the command ------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    """``bench cp --simulate``: measure (or with ``--estimate`` only estimate) and report."""
    worlds = list(args.simulate)
    if min(worlds) < 1:
        raise SystemExit(f"--simulate: world sizes must be >= 1; got {worlds}")
    device = "cuda" if args.estimate else resolve_device(args.device)
    default = CPU_QUICK_STRATEGIES if device == "cpu" and args.quick else list(STRATEGIES) + ["auto"]
    strategies = list(args.strategies or default)
    cases = list(args.cases or (CPU_QUICK_CASES if device == "cpu" and args.quick else CASES))
    heads = CPU_HEADS if device == "cpu" else GPU_HEADS
    tokens = args.tokens_per_gpu or (CPU_TOKENS_PER_GPU if device == "cpu" else
                                     QUICK_TOKENS_PER_GPU if args.quick else TOKENS_PER_GPU)
    # balanced's shortest piece scales with the toy sizes, so that it still cuts documents
    min_piece = args.min_piece or max(1, BALANCED_MIN_PIECE * tokens // TOKENS_PER_GPU)
    u = args.ulysses_degree
    if args.estimate:
        est = estimate_seconds(worlds, cases, strategies, heads, tokens, u, min_piece)
        print(f"estimated GPU time of `bench cp --simulate {' '.join(map(str, worlds))}` ({tokens} tokens per GPU, "
              f"{heads.nheads}/{heads.nheads_k} heads, d={heads.headdim}): about {est['total']:.0f} s "
              f"(per W: " + ", ".join(f"{w}: {s:.0f} s" for w, s in est["per W"].items())
              + f"; compilation ~{est['compile_s']:.0f} s and start ~{est['start_s']:.0f} s assumed)")
        return 0
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    timer, timer_name = make_timer(device)
    device_name = device_description(device)
    print(f"device: {device_name}", flush=True)
    notes = [f"{tokens} tokens per GPU; balanced's min_piece={min_piece}; hybrid's ulysses_degree={u}."]
    if device == "cpu":
        notes.append("CPU run: float32, Triton interpreted, wall-clock times of toy sizes; they check the report "
                     "path and say nothing about GPU balance or the model's accuracy.")
    rows: list[dict] = []
    with interruptible(notes, "ranks") as run, cpu_threads(device):
        run_grid(worlds, cases, strategies, heads, dtype, device, tokens, timer, timer_name, device_name, u,
                 min_piece, rows=rows)
    publish(args, rows, notes)
    return 130 if run["interrupted"] else 0


def redraw(args: argparse.Namespace, rows: list[dict]) -> int:
    """``bench cp --from-csv`` of cp_simulate CSVs."""
    for r in rows:
        r["note"] = r.get("note") or ""
        r["status"] = r.get("status") or ""
    filled = fill_model_terms(rows)
    publish(args, rows, [f"The model columns of {filled} rows were computed from their layouts (the CSV predates "
                         "them)."] if filled else [])
    return 0


def is_simulate_csv(rows: Sequence[dict]) -> bool:
    return bool(rows) and "rank" in rows[0] and "fwd_bwd_ms" in rows[0]


__all__ = ["COLUMNS", "estimate_seconds", "fill_model_terms", "fit_constants", "fit_rates", "is_simulate_csv", "main",
           "markdown_report", "model_ms", "plot_balance", "plot_model", "redraw", "run_grid", "step_ms", "summarize"]
