"""The balanced layout (strategy="balanced") as host-side arithmetic: every token placed once,
long documents cut into zigzag pairs no shorter than min_piece, short ones whole, and the
predicted cost and the token counts balanced across ranks on random packed batches (the
distributed correctness of the strategy is in test_cp.py)."""

import random

import pytest

from ringflash.cp.layout import CostModel, balanced_layout


def _random_pack(rng: random.Random, tokens: int) -> list[int]:
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(min(tokens - sum(lengths), rng.choice(
            [tokens // 2, tokens // 4, tokens // 8, tokens // 16, tokens // 32, 777, 100, rng.randint(1, 4000)])))
    return lengths


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_every_token_once_and_pieces_no_shorter_than_min_piece(world_size):
    rng = random.Random(world_size)
    for _ in range(50):
        lengths = _random_pack(rng, 8192 * world_size) + [0, 1]
        layout = balanced_layout(lengths, world_size, min_piece=256)
        seen = {i: [0] * n for i, n in enumerate(lengths)}
        for pieces in layout:
            assert pieces == sorted(pieces, key=lambda p: (p.seq, p.start))  # document order
            for p in pieces:
                for pos in p.positions():
                    seen[p.seq][pos] += 1
                whole = p.start == 0 and p.length == lengths[p.seq]
                assert whole or p.length >= 256, p
        assert all(count == 1 for counts in seen.values() for count in counts)


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_balanced_cost_and_tokens(world_size):
    """Predicted causal cost within 5% of the mean on every random pack (the issue's bar for
    the measured time), tokens within 12%."""
    model = CostModel()
    rng = random.Random(100 + world_size)
    for _ in range(100):
        lengths = _random_pack(rng, 8192 * world_size)
        layout = balanced_layout(lengths, world_size, min_piece=256, model=model)
        costs = [sum(model.cost(p.start, p.length) for p in ps) for ps in layout]
        tokens = [sum(p.length for p in ps) for ps in layout]
        assert max(costs) <= 1.05 * sum(costs) / world_size, (lengths, costs)
        assert max(tokens) <= 1.12 * sum(tokens) / world_size, (lengths, tokens)


def test_one_document_is_zigzag_and_short_documents_stay_whole():
    layout = balanced_layout([4096], 2, min_piece=256)
    assert [[(p.start, p.length) for p in ps] for ps in layout] == [[(0, 1024), (3072, 1024)],
                                                                      [(1024, 1024), (2048, 1024)]]
    layout = balanced_layout([300] * 8, 4, min_piece=256)
    assert all(p.start == 0 and p.length == 300 for ps in layout for p in ps)
    assert [len(ps) for ps in layout] == [2, 2, 2, 2]


def test_deterministic():
    lengths = _random_pack(random.Random(5), 32768)
    assert balanced_layout(lengths, 4) == balanced_layout(list(lengths), 4)


def test_auto_choice_and_its_reasons():
    """auto picks the least predicted time; the reasons name every candidate's figure."""
    from ringflash.cp.cost import Heads, choose, predict

    mixed = [8192] + [512] * 16  # llama3: one rank gets the long document, the other the short ones
    choice = choose(mixed, 2)
    assert choice.strategy == "balanced", choice.why
    assert "zigzag_llama3" in choice.why and "llama3" in choice.why and "ulysses not considered" in choice.why
    # llama3's contiguous slices give the rank holding the later tokens of long documents
    # far more causal work: its predicted balance is the worst.
    by_name = {p.strategy: p for p in choice.predictions}
    assert by_name["llama3"].balance > by_name["zigzag_llama3"].balance >= by_name["balanced"].balance
    # With heads that split over the ranks, ulysses is a candidate, evenly balanced.
    with_heads = choose(mixed, 4, Heads(nheads=32, nheads_k=8))
    assert "ulysses" in {p.strategy for p in with_heads.predictions}
    assert predict("ulysses", mixed, 4, Heads()).balance == 1.0
    # Heads that do not split: not a candidate, and the reason says so.
    odd = choose(mixed, 4, Heads(nheads=6, nheads_k=3))
    assert odd.strategy != "ulysses" and "not possible: ulysses" in odd.why
    assert choose(mixed, 1).strategy == "llama3"


def test_auto_ranks_the_training_step_by_the_fitted_model():
    """Runs 33 to 35 (every rank simulated on an H200): on many short documents ulysses's
    slowest rank ran fastest, fwd+bwd, 1.3-2.5x faster than zigzag_llama3's and balanced's,
    which a pairs-only model could not see (it predicted the same compute for all three).
    The step model (fitted to run 35) ranks ulysses's compute first at every W, and auto
    picks it at W=4 and 8. At W=2 llama3's slowest rank measured 1.42 ms against ulysses'
    1.29 ms, and the all-gather's smaller modelled communication (0.67 against 0.84 ms; not
    yet measured on several GPUs, issue 17) makes llama3 the faster step by 1.6%: auto
    picks it (the previous model over-predicted llama3's compute by 4-15% and picked
    ulysses)."""
    from ringflash.bench.cp import batch_lengths
    from ringflash.cp.cost import AUTO_CANDIDATES, Heads, choose, predict

    for w in (2, 4, 8):
        short = batch_lengths("short", w)
        by_name = {s: predict(s, short, w, Heads()) for s in AUTO_CANDIDATES}
        assert by_name["ulysses"].compute_ms == min(p.compute_ms for p in by_name.values())
        assert choose(short, w, Heads()).strategy == ("llama3" if w == 2 else "ulysses")


def test_balanced_keeps_query_groups_to_two():
    """Plan gives each piece of a document on a rank its own query group, and the grouped
    kernels' time grows with groups x documents: in run 33 (H200 simulation, short
    documents) balanced's ranks with 4 groups ran 4.6 ms against 3.1 ms for those with 2 at
    W=8 (2.2 against 3.0 ms at W=4, 64 against 128 group entries). So a rank gets a second
    pair of one document only when no rank without it has room; on bench cp's batches no
    rank holds more than one pair (two pieces) of a document."""
    from ringflash.bench.cp import batch_lengths

    for w in (2, 4, 8):
        for case in ("single", "mixed", "short"):
            for ps in balanced_layout(batch_lengths(case, w), w, 256):
                per_doc: dict[int, int] = {}
                for p in ps:
                    per_doc[p.seq] = per_doc.get(p.seq, 0) + 1
                assert max(per_doc.values()) <= 2, (case, w, per_doc)


def test_zigzag_mode_names_the_setting_it_read(monkeypatch):
    """A bad mode from the environment names the variable, not the keyword."""
    from ringflash.cp.plan import zigzag_mode

    monkeypatch.setenv("RINGFLASH_ZIGZAG_MODE", "bogus")
    with pytest.raises(ValueError, match="RINGFLASH_ZIGZAG_MODE: got 'bogus'"):
        zigzag_mode(None)
    with pytest.raises(ValueError, match="mode: got 'fused'"):
        zigzag_mode("fused")
    assert zigzag_mode("two_kernels") == "two_kernels"


def test_verify_compares_a_rank_without_tokens():
    """Documents totalling fewer tokens than the ranks leave a rank with none: verify's
    comparison of its empty out used to raise (the max of an empty tensor) on that rank
    alone, after the forward's collectives, while the other ranks went on to the
    backward's re-gather (a collective mismatch: a hang, or gloo aborting)."""
    import torch

    from ringflash.cp.plan import _check_modes_agree

    out, lse = torch.empty(0, 2, 8), torch.empty(2, 0)
    _check_modes_agree(out, lse, out.clone(), lse.clone(), "grouped", "two_kernels")
    with pytest.raises(RuntimeError, match="disagree"):  # still catches a real mismatch
        _check_modes_agree(torch.ones(1, 2, 8), torch.zeros(2, 1), torch.zeros(1, 2, 8), torch.zeros(2, 1),
                           "grouped", "two_kernels")


# -- every layout's kernel metadata against the global mask, host-side ----------------------

_PACKS = [(1,), (0, 1), (1, 2, 1), (7, 1), (5, 0, 3), (13, 1, 1, 2)]


def _placed(pieces):
    return [(p.seq, pos) for p in pieces for pos in p.positions()]


def _wanted(queries, keys, causal, left, right):
    """The global mask: same document, causal, within the window."""
    return [[qs == ks and not (causal and kp > qp) and not (left >= 0 and kp < qp - left)
             and not (right >= 0 and kp > qp + right) for ks, kp in keys] for qs, qp in queries]


def _meta_mask(meta, num_q, num_k, causal, left, right):
    """What the kernels compute from ``meta`` (``kernels.problem``'s contract); rows in two entries fail."""
    starts, ends, cu = meta.q_starts.tolist(), meta.q_ends.tolist(), meta.cu_seqlens_k.tolist()
    used = meta.seqused_k.tolist() if meta.seqused_k is not None else None
    diag = meta.diag.tolist() if meta.diag is not None else None  # None: bottom-right alignment
    mask, owner = [[False] * num_k for _ in range(num_q)], [None] * num_q
    for g in range(len(starts)):
        for b in range(len(cu) - 1):
            u = used[g][b] if used is not None else cu[b + 1] - cu[b]
            num = ends[g][b] - starts[g][b]
            for i in range(num):
                row, d = starts[g][b] + i, (diag[g][b] if diag is not None else cu[b + 1] - cu[b] - num) + i
                assert owner[row] is None, ("row in two entries", row)
                owner[row] = (g, b)
                for j in range(u):
                    mask[row][cu[b] + j] = (not (causal and j > d) and not (left >= 0 and j < d - left)
                                            and not (right >= 0 and not causal and j > d + right))
    return mask


@pytest.mark.parametrize("strategy", ["llama3", "zigzag_llama3", "balanced", "ring", "zigzag_ring", "stripe"])
def test_metadata_gives_the_global_mask(strategy):
    """Short documents, documents shorter than W, empty ones, totals not divisible by W or
    2W, windows crossing shard boundaries: every rank's metadata (the all-gather spec, with
    and without the local-first split, or every ring step, summed) gives exactly its rows
    of the single-process mask, and every token is held by exactly one rank."""
    from ringflash.cp.simulate import _RankPlan

    for lengths in _PACKS:
        everything = [(i, pos) for i, n in enumerate(lengths) for pos in range(n)]
        for w in (2, 3, 4):
            plans = [_RankPlan(list(lengths), w, r, strategy, min_piece=1 if strategy == "balanced" else None)
                     for r in range(w)]
            assert sorted(sum((_placed(plans[0].pieces[r]) for r in range(w)), [])) == everything
            for causal in (True, False):
                windows = [(-1, -1)]
                if strategy not in ("zigzag_ring", "stripe"):
                    windows += [(1, -1), (0, -1)] if causal else [(2, 1), (-1, 0)]
                for left, right in windows:
                    right = 0 if causal else right
                    for r, plan in enumerate(plans):
                        queries = _placed(plan.pieces[r])
                        if strategy in ("ring", "zigzag_ring", "stripe"):
                            seen = [[0] * len(everything) for _ in queries]
                            for s, step in enumerate(plan._ring_steps(causal, left, right)):
                                keys = _placed(plan.pieces[(r - s) % w])
                                mask = _meta_mask(step.meta, len(queries), len(keys), causal, left, right)
                                assert not step.skip or not any(map(any, mask))
                                for a, row in enumerate(mask):
                                    for b, hit in enumerate(row):
                                        seen[a][everything.index(keys[b])] += hit
                            want = _wanted(queries, everything, causal, left, right)
                            assert seen == [[int(x) for x in row] for row in want], (lengths, w, r, causal, left)
                            continue
                        buffer = {s * plan.n_max + t: key for s in range(w)
                                  for t, key in enumerate(_placed(plan.pieces[s]))}
                        spec = plan._allgather_spec()
                        keys = [buffer[i] for i in spec.key_index.tolist()]
                        assert keys == everything
                        assert (_meta_mask(spec.meta, len(queries), len(keys), causal, left, right)
                                == _wanted(queries, keys, causal, left, right)), (lengths, w, r, causal, left)
                        if (left, right) in ((-1, -1), (-1, 0)):  # the local-first split
                            split = plan._allgather_spec(True, causal)
                            assert (_meta_mask(split.local.meta, len(queries), len(queries), causal, -1, -1)
                                    == _wanted(queries, queries, causal, -1, -1))
                            others = [buffer[i] for i in split.key_index.tolist()]
                            assert (_meta_mask(split.meta, len(queries), len(others), causal, -1, -1)
                                    == _wanted(queries, others, causal, -1, -1)), (lengths, w, r, causal)


@pytest.mark.parametrize("w, u", [(4, 2), (3, 3), (4, 1)])
def test_hybrid_and_ulysses_slices_rebuild_their_streams(w, u):
    """hybrid: the ranks of a Ulysses group hold, in rank order, exactly their group's
    zigzag_llama3 stream (the all-to-all rebuilds it); ulysses: llama3's slices."""
    from ringflash.cp.layout import rank_pieces

    for lengths in _PACKS:
        for g in range(w // u):
            stream = _placed(rank_pieces("zigzag_llama3", list(lengths), g, w // u))
            group = sum((_placed(rank_pieces("hybrid", list(lengths), g * u + j, w, u)) for j in range(u)), [])
            assert group == stream, (lengths, w, u, g)
        ulysses = [rank_pieces("ulysses", list(lengths), r, w) for r in range(w)]
        assert ulysses == [rank_pieces("llama3", list(lengths), r, w) for r in range(w)]
        assert sum(map(_placed, ulysses), []) == [(i, p) for i, n in enumerate(lengths) for p in range(n)]
