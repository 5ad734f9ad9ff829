"""``ringflash bench cp --simulate`` (issue 18's balance measurement) on the CPU, and the
simulation's accounting: each rank's simulated work (the metadata its kernel calls get) is
the work ``cost.layout_work`` / ``Plan.describe()`` count for the same pieces, and the
metadata is the real ``Plan``'s (built on a gloo group)."""

import csv
import math
import os

import pytest
import torch

from conftest import cu_seqlens_from_lengths, run_cpu_cli
from ringflash.bench import cp_simulate
from ringflash.bench.common import CPU_TIMER, read_csv_rows
from ringflash.bench.cp import CASES, batch_lengths
from ringflash.cli import main as cli_main
from ringflash.cp import simulate as sim
from ringflash.cp.cost import AUTO_CANDIDATES, Heads, Machine, call_shape, layout_work, predict
from ringflash.cp.launch import run_local
from ringflash.cp.layout import STRATEGIES, CostModel, balanced_layout, rank_pieces

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN35_CSV = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "measurements",
                         "2026-12-03-h200-bench-cp-simulate-run35.csv")
HEADS = Heads(nheads=4, nheads_k=2, headdim=16)
#: Batches with uneven splits, one-token and empty documents, and one long document.
BATCHES = [[37], [20, 9, 5, 1, 3], [7] * 9 + [30], [0, 11, 1, 0, 6]]


def test_entry_pairs_counts_every_visible_key():
    for nq in range(7):
        for diag in range(-9, 12):
            for used in range(8):
                brute = sum(min(used, max(0, i + diag + 1)) for i in range(nq))
                assert sim.entry_pairs(nq, diag, used) == brute, (nq, diag, used)
    assert sim.entry_pairs(5, 1 << 29, 3) == 15  # ALL_VISIBLE: every used key


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_simulated_work_is_the_layouts_work(strategy):
    """The kernels' metadata of every rank holds exactly the causal pairs that
    ``layout_work`` counts for its pieces (``cost.predict``'s work for the strategies it
    models), and the rank holds ``describe()``'s token count."""
    for seqlens in BATCHES:
        for w in (1, 2, 3, 4):
            u = 2
            if strategy == "hybrid" and w % u:
                with pytest.raises(sim.Unsupported):
                    sim.simulate_rank(strategy, seqlens, w, 0, HEADS, torch.float32, "cpu", ulysses_degree=u)
                continue
            if strategy == "ulysses" and HEADS.nheads % w:
                with pytest.raises(sim.Unsupported, match="nheads=4 is not divisible by world_size=3"):
                    sim.simulate_rank(strategy, seqlens, w, 0, HEADS, torch.float32, "cpu")
                continue
            if strategy == "balanced":
                pieces = balanced_layout(seqlens, w, 2)
            else:
                pieces = [rank_pieces(strategy, seqlens, r, w, u if strategy == "hybrid" else None) for r in range(w)]
            work = sim.model_work(strategy, seqlens, w, HEADS, 2, u)
            if strategy in AUTO_CANDIDATES or strategy in sim.RING_STRATEGIES:
                assert work == predict(strategy, seqlens, w, HEADS, min_piece=2).work
            if strategy not in ("ulysses", "hybrid"):
                assert work == layout_work(pieces)
            # The model's query groups are the kernel calls' (the entries term counts groups x documents).
            entries = sim.model_work(strategy, seqlens, w, HEADS, 2, u, CostModel(0, 0, 0, 0, 1))
            if strategy == "hybrid":
                groups = [2] * w
            elif strategy == "ulysses":
                groups = [1] * w
            else:
                groups = call_shape(strategy, pieces, len(seqlens))[0]
            for r in range(w):
                s = sim.simulate_rank(strategy, seqlens, w, r, HEADS, torch.float32, "cpu", ulysses_degree=u,
                                      min_piece=2)
                assert s.tokens == sum(p.length for p in pieces[r])
                assert s.kernel_pairs == pytest.approx(work[r], abs=1e-9), (strategy, seqlens, w, r)
                assert s.query_groups == groups[r], (strategy, seqlens, w, r)
                calls = w if strategy in sim.RING_STRATEGIES else 1
                heads_share = s.q_heads / HEADS.nheads
                assert entries[r] == pytest.approx(s.query_groups * len(seqlens) * calls * heads_share)
    # Summed over ranks, every strategy does the whole batch's causal work once.
    seqlens = [20, 9, 5, 1, 3]
    whole = sum(n * (n + 1) // 2 for n in seqlens)
    w = 2
    total = sum(sim.simulate_rank(strategy, seqlens, w, r, HEADS, torch.float32, "cpu", ulysses_degree=2,
                                  min_piece=2).kernel_pairs for r in range(w))
    assert total == pytest.approx(whole)


def _plan_worker(rank, world_size, payload):
    """Each strategy's real Plan on a gloo group: its layout, describe(), and the metadata
    the engines get (as lists)."""
    from ringflash.cp import Plan

    out = {}
    for strategy, seqlens in payload:
        kwargs = {"ulysses_degree": 2} if strategy == "hybrid" else {}
        plan = Plan(cu_seqlens_from_lengths(seqlens), None, strategy, min_piece=2 if strategy == "balanced" else None,
                    **kwargs)
        d = plan.describe()
        item = dict(pieces=plan.pieces, tokens=d["rank_tokens"], work=d["rank_work"])
        if strategy in ("llama3", "zigzag_llama3", "balanced"):
            item["spec"] = _spec_lists(plan._allgather_spec())
        elif strategy in sim.RING_STRATEGIES:
            item["steps"] = [_step_lists(s) for s in plan._ring_steps(True, -1, 0)]
        out[(strategy, tuple(seqlens))] = item
    return out


def _meta_lists(meta):
    return [None if t is None else t.tolist() for t in (meta.q_starts, meta.q_ends, meta.cu_seqlens_k,
                                                         meta.seqused_k, meta.diag)]


def _spec_lists(spec):
    return (_meta_lists(spec.meta), spec.n_max, spec.max_q, spec.max_k, spec.key_index.tolist())


def _step_lists(step):
    return (_meta_lists(step.meta), step.max_q, step.max_k, step.skip, step.covers_all)


def test_simulation_builds_the_real_plans_metadata():
    """``_RankPlan`` (no process group) gives every rank the pieces, describe() numbers and
    engine metadata of the real Plan, for every strategy."""
    payload = [(s, seqlens) for s in STRATEGIES for seqlens in ([20, 9, 5, 1, 3], [33])]
    reports = run_local(_plan_worker, 2, payload, timeout=300)
    for rank, report in enumerate(reports):
        for strategy, seqlens in payload:
            real = report[(strategy, tuple(seqlens))]
            mine = sim._RankPlan(seqlens, 2, rank, strategy, ulysses_degree=2 if strategy == "hybrid" else None,
                                 min_piece=2 if strategy == "balanced" else None)
            assert mine.pieces == real["pieces"], (strategy, rank)
            assert mine.num_local == real["tokens"]
            if strategy not in ("ulysses", "hybrid"):  # their describe() counts the token layout's pairs
                assert sim.model_work(strategy, seqlens, 2, HEADS, 2, 2) == real["work"]
            if "spec" in real:
                assert _spec_lists(mine._allgather_spec()) == real["spec"], (strategy, rank)
            if "steps" in real:
                assert [_step_lists(s) for s in mine._ring_steps(True, -1, 0)] == real["steps"], (strategy, rank)


def test_batches():
    for w in (1, 2, 8):
        for case in CASES:
            lengths = batch_lengths(case, w)
            assert sum(lengths) == 8192 * w and min(lengths) >= 1
        assert batch_lengths("mixed", w) == [4096 * w, 2048 * w, 1024 * w, 512 * w, 256 * w, 256 * w]
        short = batch_lengths("short", w)
        assert len(short) > 6 * w and max(short) <= 2048
    assert batch_lengths("short", 4, 16) == batch_lengths("short", 4, 16)  # a fixed draw


@pytest.fixture(scope="module")
def sim_out(tmp_path_factory):
    """One run of the command as a user types it; the tests below read what it wrote."""
    out = tmp_path_factory.mktemp("simulate")
    assert run_cpu_cli(["bench", "cp", "--simulate", "2", "--device", "cpu", "--quick", "--out", str(out),
                        "--fit"]) == 0
    return out


def test_simulate_csv(sim_out):
    with open(sim_out / "cp_simulate.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == cp_simulate.COLUMNS
        rows = list(reader)
    strategies = cp_simulate.CPU_QUICK_STRATEGIES
    keys = [(r["batch"], r["strategy"], r["rank"]) for r in rows]
    assert sorted(keys) == sorted((c, s, str(r)) for c in cp_simulate.CPU_QUICK_CASES for s in strategies
                                  for r in range(2))
    for r in rows:
        assert r["status"] == "ok", r
        assert r["timer"] == CPU_TIMER and r["device"].startswith("CPU") and r["world"] == "2"
        for key in ("fwd_ms", "fwd_bwd_ms", "pred_fwd_ms", "pairs", "kernel_pairs"):
            assert math.isfinite(float(r[key])) and float(r[key]) >= 0, (key, r)
        assert float(r["kernel_pairs"]) == pytest.approx(float(r["pairs"]))
        assert r["chosen"] in STRATEGIES and (r["strategy"] == "auto" or r["chosen"] == r["strategy"])
    summary = cp_simulate.summarize(read_csv_rows([str(sim_out / "cp_simulate.csv")]))
    assert len(summary) == len(cp_simulate.CPU_QUICK_CASES) * len(strategies)
    for s in summary:
        for key in ("balance_fwd", "balance_fwd+bwd", "model_balance", "err_fwd", "err_fit_fwd", "err_fit_fwd+bwd",
                    "err_model_fwd", "err_model_fwd+bwd"):
            assert math.isfinite(s[key]), (key, s)
        assert s["balance_fwd"] >= 1.0 and s["balance_fwd+bwd"] >= 1.0 and s["model_balance"] >= 1.0


def test_simulate_report_and_plots(sim_out):
    md = (sim_out / "cp_simulate.md").read_text()
    for text in ("## Balance and model accuracy", "Communication is not simulated", "balance <= 1.05",
                 "model <= 10%", "## auto's choices", "## Calibration", "CPU run"):
        assert text in md, text
    for name in ("cp_simulate_balance.png", "cp_simulate_model.png"):
        data = (sim_out / name).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), name


def test_simulate_redraws_from_csv(sim_out, tmp_path):
    assert cli_main(["bench", "cp", "--from-csv", str(sim_out / "cp_simulate.csv"), "--out", str(tmp_path),
                     "--no-plots", "--fit"]) == 0

    def tables(path):
        return [line for line in path.read_text().splitlines() if line.startswith("|")]

    assert tables(tmp_path / "cp_simulate.md") == tables(sim_out / "cp_simulate.md")
    assert sorted(os.listdir(tmp_path)) == ["cp_simulate.csv", "cp_simulate.md"]


def test_fit_recovers_the_constants():
    """Rank times made from known constants come back from the fit (each pass with its own
    terms), and cost.py's models predict a rank's time from the same terms."""
    rows = []
    for case in CASES:
        for strategy in cp_simulate.FIT_STRATEGIES:
            for w in (2, 4):
                seqlens = batch_lengths(case, w, 256)
                work = {k: sim.model_work(strategy, seqlens, w, Heads(), 8, 2, CostModel(*c))
                        for k, c in cp_simulate.MODEL_TERMS.items()}
                for r in range(w):
                    x = {k: v[r] for k, v in work.items()}
                    flops = 4 * 128 * 32
                    fwd = (x["pairs"] + 40 * x["model_rows"] + 3000 * x["model_pieces"]
                           + 900 * x["model_entries"]) * flops / 300 / 1e9
                    step = (x["pairs"] + 50 * x["model_rows"] + 2000 * x["model_pieces"]
                            + 7 * x["model_group_key_rows"]) * flops / 75 / 1e9
                    rows.append(dict(batch=case, strategy=strategy, world=w, rank=r, status="ok", fwd_ms=fwd,
                                     fwd_bwd_ms=step, nheads=32, headdim=128, **x))
    fits = cp_simulate.fit_constants(rows)
    assert fits["fwd"]["tflops"] == pytest.approx(300) and fits["fwd+bwd"]["tflops"] == pytest.approx(75)
    fwd, step = fits["fwd"]["model"], fits["fwd+bwd"]["model"]
    assert (fwd.row, fwd.piece, fwd.group_key_row, fwd.entry) == pytest.approx((40, 3000, 0, 900))
    assert (step.row, step.piece, step.group_key_row, step.entry) == pytest.approx((50, 2000, 7, 0))
    assert fits["fwd"]["max_err"] < 1e-9 and fits["fwd+bwd"]["max_err"] < 1e-9
    assert set(fits["fwd"]["by_strategy"]) == set(cp_simulate.FIT_STRATEGIES)
    rate = cp_simulate.fit_rates(rows)["fwd"]
    assert 100 < rate < 300  # the rows' and pieces' time, folded into one rate
    report = "\n".join(cp_simulate.fit_report(rows))
    assert "fwd_model=CostModel(pair=1, row=40, piece=3000, entry=900)" in report
    assert "step_model=CostModel(pair=1, row=50, piece=2000, group_key_row=7)" in report
    assert "per strategy: balanced 0.0%, zigzag_llama3 0.0%, llama3 0.0%, ulysses 0.0%, hybrid 0.0%" in report
    # cost.py's models predict a rank from its coefficients over these terms.
    machine = Machine(fwd_tflops=300, fwd_model=fwd, step_tflops=75, step_model=step)
    assert cp_simulate.model_ms(rows[5], "fwd", machine) == pytest.approx(rows[5]["fwd_ms"])
    assert cp_simulate.step_ms(rows[5], machine) == pytest.approx(rows[5]["fwd_bwd_ms"])
    made = [dict(r, fwd_ms=cp_simulate.model_ms(r, "fwd"), fwd_bwd_ms=cp_simulate.step_ms(r)) for r in rows]
    summary = cp_simulate.summarize(made)
    assert max(max(s["err_model_fwd"], s["err_model_fwd+bwd"], s["err_step"]) for s in summary) < 1e-9


@pytest.fixture(scope="module")
def run35():
    """Run 35's simulation on an H200 (every rank of five strategies, W = 2, 4, 8), with the
    model columns its CSV predates computed from the same layouts."""
    rows = read_csv_rows([RUN35_CSV])
    assert cp_simulate.fill_model_terms(rows) == len(rows) == 210
    return rows


def _worst(rows, p, machine=Machine()):
    key = cp_simulate.PASSES[p]
    by = {}
    for r in rows:
        e = abs(cp_simulate.model_ms(r, p, machine) - float(r[key])) / float(r[key])
        by[r["strategy"]] = max(by.get(r["strategy"], 0.0), e)
    return by


def test_cost_model_predicts_run35_within_issue_18s_bar(run35):
    """Issue 18: cost.py's models (its defaults, fitted to this run) predict every rank's
    time within 10%, forward (fwd_model) and forward+backward (step_model), for each of the
    five strategies (held here to 7%: the fit gives 6.2% and 6.3%); and the fit from the
    CSV gives the defaults back."""
    assert {r["strategy"] for r in run35} == set(cp_simulate.FIT_STRATEGIES)
    for p in cp_simulate.PASSES:
        worst = _worst(run35, p)
        assert max(worst.values()) < 0.07, (p, worst)
    fits = cp_simulate.fit_constants(run35)
    m = Machine()
    assert fits["fwd"]["tflops"] == pytest.approx(m.fwd_tflops, rel=1e-3)
    assert fits["fwd+bwd"]["tflops"] == pytest.approx(m.step_tflops, rel=1e-3)
    for p, name in (("fwd", "fwd_model"), ("fwd+bwd", "step_model")):
        got, want = fits[p]["model"], getattr(m, name)
        for field in ("row", "piece", "group_key_row", "entry"):
            assert getattr(got, field) == pytest.approx(getattr(want, field), rel=2e-3, abs=1e-9), (p, field)
        assert fits[p]["max_err"] < 0.07


def test_run35_needs_the_query_group_terms(run35):
    """Without the query groups the run is not within the bar: the previous step model (the
    K/V rows once per rank) refitted to run 35 missed balanced's short-document ranks by
    20%; the forward without its entries term (documents once per rank) by 13%. Balanced and
    zigzag_llama3 have two query groups, llama3 and ulysses one."""
    plain = []
    for r in run35:
        g = 2 if r["strategy"] in ("balanced", "zigzag_llama3", "hybrid") else 1
        if r["strategy"] in ("balanced", "zigzag_llama3", "llama3"):  # all the keys, g query groups
            assert r["model_group_key_rows"] == g * r["total_tokens"]
        plain.append(dict(r, model_group_key_rows=r["model_group_key_rows"] / g, model_entries=r["model_entries"] / g))
    fits = cp_simulate.fit_constants(plain)
    assert fits["fwd+bwd"]["max_err"] > 0.15 and fits["fwd"]["max_err"] > 0.10, fits
def test_estimate(capsys):
    assert cli_main(["bench", "cp", "--simulate", "2", "4", "8", "--estimate"]) == 0
    text = capsys.readouterr().out
    assert "estimated GPU time" in text and "per W: 2:" in text
    est = cp_simulate.estimate_seconds([2, 4, 8], CASES, list(STRATEGIES) + ["auto"], Heads(), 8192)
    assert 60 < est["total"] < 240 and est["per W"][8] > est["per W"][2]


def test_auto_picks_what_run35_measured(run35):
    """On bench cp's batches at W = 2, 4, 8, with and without heads, auto's pick is the
    candidate whose run-35 slowest rank (measured, fwd+bwd) plus the same modelled
    communication is least, or within 2.5% of it (balanced and zigzag_llama3 have the same
    layout for one document: a tie). The previous step model missed twice by more (one
    document at W=2 with heads: balanced, 2.8% slower than ulysses; short documents at W=2:
    ulysses, 1.7% slower than llama3)."""
    from ringflash.cp.cost import choose

    slowest: dict[tuple, float] = {}
    for r in run35:
        key = (r["batch"], int(r["world"]), r["strategy"])
        slowest[key] = max(slowest.get(key, 0.0), float(r["fwd_bwd_ms"]))
    for heads in (None, Heads()):
        for case in CASES:
            for w in (2, 4, 8):
                seqlens = batch_lengths(case, w)
                choice = choose(seqlens, w, heads)
                step = {p.strategy: slowest[(case, w, p.strategy)] + p.comm_ms for p in choice.predictions}
                assert step[choice.strategy] <= 1.025 * min(step.values()), (case, w, heads, step, choice.why)
