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
