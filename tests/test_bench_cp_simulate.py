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
from ringflash.cp.cost import AUTO_CANDIDATES, Heads, layout_work, predict
from ringflash.cp.launch import run_local
from ringflash.cp.layout import STRATEGIES, balanced_layout, rank_pieces

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
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
            for r in range(w):
                s = sim.simulate_rank(strategy, seqlens, w, r, HEADS, torch.float32, "cpu", ulysses_degree=u,
                                      min_piece=2)
                assert s.tokens == sum(p.length for p in pieces[r])
                assert s.kernel_pairs == pytest.approx(work[r], abs=1e-9), (strategy, seqlens, w, r)
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
        for key in ("balance_fwd", "balance_fwd+bwd", "model_balance", "err_fwd", "err_fit_fwd", "err_fit_fwd+bwd"):
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
    """Rank times made from known constants come back from the fit, and cost.py's step
    model predicts a rank's fwd+bwd time from the same terms."""
    rows = []
    for case in CASES:
        for strategy in ("balanced", "zigzag_llama3", "llama3", "ulysses"):
            for w in (2, 4):
                seqlens = batch_lengths(case, w, 256)
                work = {k: sim.model_work(strategy, seqlens, w, Heads(), 8, 2, cp_simulate.CostModel(*c))
                        for k, c in cp_simulate.MODEL_TERMS.items()}
                for r in range(w):
                    x = {k: v[r] for k, v in work.items()}
                    flops = 4 * 128 * 32
                    fwd = (x["pairs"] + 40 * x["model_rows"] + 3000 * x["model_pieces"]
                           + 7 * x["model_key_rows"]) * flops / 300 / 1e9
                    rows.append(dict(batch=case, strategy=strategy, world=w, rank=r, status="ok", fwd_ms=fwd,
                                     fwd_bwd_ms=4 * fwd, nheads=32, headdim=128, **x))
    fits = cp_simulate.fit_constants(rows)
    assert fits["fwd"]["tflops"] == pytest.approx(300) and fits["fwd+bwd"]["tflops"] == pytest.approx(75)
    assert fits["fwd"]["row"] == pytest.approx(40) and fits["fwd"]["piece"] == pytest.approx(3000)
    assert fits["fwd"]["key_row"] == pytest.approx(7)
    assert fits["fwd"]["max_err"] < 1e-9
    rate = cp_simulate.fit_rates(rows)["fwd"]
    assert 100 < rate < 300  # the rows' and pieces' time, folded into one rate
    assert "CostModel(pair=1.0, row=40, piece=3000, key_row=7)" in "\n".join(cp_simulate.fit_report(rows))
    # The step model's prediction is its coefficients over these terms.
    machine = cp_simulate.Machine(step_tflops=75, step_model=cp_simulate.CostModel(1, 40, 3000, 7))
    assert cp_simulate.step_ms(rows[5], machine) == pytest.approx(rows[5]["fwd_bwd_ms"])
    summary = cp_simulate.summarize([dict(r, fwd_bwd_ms=cp_simulate.step_ms(r)) for r in rows])
    assert max(s["err_step"] for s in summary) < 1e-9


def test_estimate(capsys):
    assert cli_main(["bench", "cp", "--simulate", "2", "4", "8", "--estimate"]) == 0
    text = capsys.readouterr().out
    assert "estimated GPU time" in text and "per W: 2:" in text
    est = cp_simulate.estimate_seconds([2, 4, 8], CASES, list(STRATEGIES) + ["auto"], Heads(), 8192)
    assert 60 < est["total"] < 240 and est["per W"][8] > est["per W"][2]
