"""flash_attn_with_kvcache: a seeded fuzz against an independent float64 reference (out, lse and
every cache entry after the call), and regressions for what that fuzz found:

* the queries' rotary positions past the rotary tables were clamped to their last row (a
  plausible wrong answer): now an error for host lengths, NaN for device-side ones;
* windows at least as wide as the cache were applied literally, where flash-attn 2.8 turns
  that side off (``mha_fwd_kvcache``: ``if (window_size_left >= seqlen_k) window_size_left =
  -1``, the same for the right), which moved the queries' rotary positions and the mask;
* appending through a block table of 0 columns read its (absent) first entry: a segfault
  under the interpreter, an illegal address on a GPU;
* host numbers no cache_seqlens could satisfy (more new keys than slots, an int
  cache_leftpad past the cached keys) gave every sequence NaN instead of an error.
"""

import random

import pytest
import torch

from conftest import HAS_CUDA
from ringflash import flash_attn_with_kvcache

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def _rotate(x, c, s, interleaved):
    """float64 rotary of x (..., d) by one position's c, s (rotary_dim / 2,)."""
    out = x.clone()
    half = c.shape[0]
    for i in range(half):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
        out[..., a] = x[..., a] * c[i] - x[..., b] * s[i]
        out[..., b] = x[..., a] * s[i] + x[..., b] * c[i]
    return out


def _reference(q, k_cache, v_cache, k, v, cos, sin, lengths, rows, pad, table, causal, window, softcap, alibi,
               interleaved):
    """float64 (out, lse, k_cache, v_cache, written) of flash-attn's semantics, written from its docs."""
    batch, sq, nheads, d = q.shape
    group = nheads // k_cache.shape[2]
    page = k_cache.shape[1]
    sn = 0 if k is None else k.shape[1]
    kc, vc = k_cache.double().clone(), v_cache.double().clone()
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool)

    def where(b, slot):
        return (int(table[b, slot // page]), slot % page) if table is not None else (rows[b], slot)

    for b in range(batch):
        for t in range(sn):
            new = k[b, t].double()
            if cos is not None:
                new = _rotate(new, cos[lengths[b] + t].double(), sin[lengths[b] + t].double(), interleaved)
            kc[where(b, lengths[b] + t)], vc[where(b, lengths[b] + t)] = new, v[b, t].double()
            written[where(b, lengths[b] + t)] = True
    left, right = window
    right = 0 if causal else right
    local = causal or tuple(window) != (-1, -1)
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full((batch, nheads, sq), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        qb = q[b].double()
        if cos is not None:
            qb = torch.stack([_rotate(qb[i], cos[lengths[b] + (i if local else 0)].double(),
                                      sin[lengths[b] + (i if local else 0)].double(), interleaved) for i in range(sq)])
        slots = range(pad[b], lengths[b] + sn)
        sk = len(slots)
        if sk == 0:
            continue
        kb = torch.stack([kc[where(b, s)] for s in slots]).repeat_interleave(group, 1)
        vb = torch.stack([vc[where(b, s)] for s in slots]).repeat_interleave(group, 1)
        scores = torch.einsum("ihd,jhd->hij", qb, kb) * d ** -0.5
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        i, j = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
        diag = i + sk - sq
        if alibi is not None:
            slopes = alibi.double() if alibi.dim() == 1 else alibi[b].double()
            scores = scores - slopes[:, None, None] * (diag - j).abs()
        visible = torch.ones(sq, sk, dtype=torch.bool)
        if right >= 0:
            visible &= j <= diag + right
        if left >= 0:
            visible &= j >= diag - left
        scores = scores.masked_fill(~visible, float("-inf"))
        lse_b = torch.logsumexp(scores, -1)
        probs = torch.exp(scores - torch.where(torch.isinf(lse_b), 0.0, lse_b)[..., None])
        out[b], lse[b] = torch.einsum("hij,jhd->ihd", probs, vb), lse_b
    return out, lse, kc, vc, written


def _random_call(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    dtype = rng.choice([torch.float32, torch.float32, torch.float16])
    batch, sq, sn = rng.randint(1, 3), rng.randint(1, 5), rng.choice([0, 1, 2, 3, 5])
    nheads_k = rng.randint(1, 2)
    nheads, d = nheads_k * rng.choice([1, 2, 4]), rng.choice([16, 32, 40])
    paged = rng.random() < 0.4
    rows = pad = None
    if paged:
        page = rng.choice([5, 16, 32, 256])
        max_blocks = rng.randint(1, max(1, 120 // page))
        capacity = page * max_blocks
        k_cache = torch.randn(batch * max_blocks + 2, page, nheads_k, d, generator=gen).to(dtype)
        table = torch.randperm(k_cache.shape[0], generator=gen)[:batch * max_blocks].view(batch, max_blocks)
        table = table.to(torch.int32)
    else:
        capacity = rng.choice([5, 17, 64, 100])
        spare = 2 if rng.random() < 0.5 else 0
        k_cache = torch.randn(batch + spare, capacity, nheads_k, d, generator=gen).to(dtype)
        table = None
        if spare:
            rows = torch.randperm(batch + spare, generator=gen)[:batch].tolist()
    sn = min(sn, capacity)
    v_cache = torch.randn(k_cache.shape, generator=gen).to(dtype)
    as_int = rng.random() < 0.3
    lengths = [rng.choice([0, capacity - sn, rng.randint(0, capacity - sn)]) for _ in range(batch)]
    if as_int:
        lengths = [lengths[0]] * batch
    if rng.random() < 0.4:
        pad = [rng.choice([0, n, rng.randint(0, n)]) for n in lengths]
    q = torch.randn(batch, sq, nheads, d, generator=gen).to(dtype)
    k = v = None
    if sn:
        k, v = (torch.randn(batch, sn, nheads_k, d, generator=gen).to(dtype) for _ in range(2))
    cos = sin = None
    interleaved = rng.random() < 0.5
    if rng.random() < 0.5:
        rotary_dim = rng.choice([2, 8, d // 2, d])
        angles = torch.rand(capacity + sq, rotary_dim // 2, generator=gen, dtype=torch.float64) * 6
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    alibi = rng.choice([None, torch.rand(nheads, generator=gen), torch.rand(batch, nheads, generator=gen)])
    options = dict(causal=rng.random() < 0.5, window=(rng.choice([-1, 0, 3]), rng.choice([-1, 0, 2])),
                   softcap=rng.choice([0.0, 0.0, 2.0]), alibi=alibi, interleaved=interleaved)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, cos=cos, sin=sin, lengths=lengths, as_int=as_int,
                rows=rows or list(range(batch)), has_rows=rows is not None, pad=pad, table=table,
                num_splits=rng.choice([0, 1, 3]), **options)


@pytest.mark.parametrize("seed", range(60))
def test_random_calls_match_float64_and_touch_only_the_new_slots(seed):
    c = _random_call(seed)
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)  # noqa: E731
    k_cache, v_cache = dev(c["k_cache"]), dev(c["v_cache"])
    out, lse = flash_attn_with_kvcache(
        dev(c["q"]), k_cache, v_cache, dev(c["k"]), dev(c["v"]), dev(c["cos"]), dev(c["sin"]),
        cache_seqlens=c["lengths"][0] if c["as_int"] else i32(c["lengths"]),
        cache_batch_idx=i32(c["rows"]) if c["has_rows"] else None,
        cache_leftpad=None if c["pad"] is None else i32(c["pad"]), block_table=dev(c["table"]),
        causal=c["causal"], window_size=c["window"], softcap=c["softcap"], rotary_interleaved=c["interleaved"],
        alibi_slopes=dev(c["alibi"]), num_splits=c["num_splits"], return_softmax_lse=True)
    pad = c["pad"] or [0] * len(c["lengths"])
    want_out, want_lse, want_k, want_v, written = _reference(
        c["q"], c["k_cache"], c["v_cache"], c["k"], c["v"], c["cos"], c["sin"], c["lengths"], c["rows"], pad,
        c["table"], c["causal"], c["window"], c["softcap"], c["alibi"], c["interleaved"])
    tol = 2e-4 if c["q"].dtype == torch.float32 else 4e-3
    torch.testing.assert_close(out.double().cpu(), want_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double().cpu(), want_lse, atol=2 * tol, rtol=tol)
    for got, before, want in ((k_cache, c["k_cache"], want_k), (v_cache, c["v_cache"], want_v)):
        got = got.cpu()
        assert torch.equal(got[~written], before[~written]), "an entry that is not a new slot changed"
        torch.testing.assert_close(got[written].double(), want[written], atol=tol, rtol=tol)


def _rotary_case(capacity=8, d=16, sq=1):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, sq, 2, d, generator=gen).to(DEVICE)
    k_cache = torch.randn(1, capacity, 2, d, generator=gen).to(DEVICE)
    v_cache = torch.randn(1, capacity, 2, d, generator=gen).to(DEVICE)
    angles = torch.rand(capacity, d // 2, generator=gen) * 6  # exactly the cache's slots, as the check asks
    return q, k_cache, v_cache, angles.cos().to(DEVICE), angles.sin().to(DEVICE)


@pytest.mark.parametrize("lengths", [None, 8], ids=["full-cache", "int"])
def test_rotary_query_position_past_the_table_is_refused(lengths):
    """A full cache and no new keys: the query sits at slot 8 (flash-attn's position
    cache_seqlens), past an 8-row table that ``_check_rotary`` accepts. ringflash reads row 7
    instead (``rotary.rotary_rows`` clamps) and returns a finite answer for position 7. With
    a host-side length the call can say so."""
    q, k_cache, v_cache, cos, sin = _rotary_case()
    with pytest.raises(ValueError, match="rotary_cos"):
        flash_attn_with_kvcache(q, k_cache, v_cache, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lengths)


def test_rotary_query_position_past_the_table_is_not_a_plausible_answer():
    """The same with a device-side cache_seqlens: like every other out-of-range device value,
    NaN (or an error), not the answer of another position."""
    q, k_cache, v_cache, cos, sin = _rotary_case()
    lengths = torch.tensor([8], dtype=torch.int32, device=DEVICE)
    try:
        out = flash_attn_with_kvcache(q, k_cache, v_cache, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lengths)
    except ValueError:
        return
    assert torch.isnan(out).all()


def test_window_wider_than_the_cache_is_off_for_rotary_positions():
    """flash-attn 2.8 turns a window side >= the cache's slots off before choosing the
    query positions, so window_size=(capacity, -1) is (-1, -1): non-causal queries all sit
    at cache_seqlens. ringflash keeps left=8 >= 0 and gives them positions cache_seqlens + i
    (``ops._kvcache_fwd_impl``: ``local = causal or window_left >= 0 or window_right >= 0``)."""
    q, k_cache, v_cache, _, _ = _rotary_case(sq=3)
    angles = torch.rand(12, 8, generator=torch.Generator().manual_seed(1)) * 6
    cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    call = lambda w: flash_attn_with_kvcache(q, k_cache, v_cache, rotary_cos=cos, rotary_sin=sin,  # noqa: E731
                                             cache_seqlens=4, window_size=w)
    torch.testing.assert_close(call((8, -1)), call((-1, -1)))


def test_window_wider_than_the_cache_is_off_for_the_mask():
    """window_size=(-1, 3) against a 3-slot cache is no window in flash-attn 2.8; ringflash
    applies it literally, so with 5 queries the first two see fewer keys (row 0 sees none)."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 5, 2, 16, generator=gen).to(DEVICE)
    k_cache, v_cache = (torch.randn(1, 3, 2, 16, generator=gen).to(DEVICE) for _ in range(2))
    torch.testing.assert_close(flash_attn_with_kvcache(q, k_cache, v_cache, window_size=(-1, 3)),
                               flash_attn_with_kvcache(q, k_cache, v_cache))


def test_append_through_a_block_table_of_no_columns_reads_no_entry():
    """A (batch, 0) block table has no slot: ``_append_kernel`` clamped each slot to
    capacity - 1 = -1 and read ``block_table[b, -1 // page_size]`` unmasked (its data pointer
    is null: a segfault under the interpreter). Every write is dropped, nothing is read."""
    from ringflash.kernels.decode import append_to_cache

    cache = torch.randn(3, 8, 1, 16, device=DEVICE)
    before = cache.clone()
    table = torch.zeros(2, 0, dtype=torch.int32, device=DEVICE)
    slots = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    append_to_cache(cache, torch.randn(2, 2, 1, 16, device=DEVICE), slots, table)
    assert torch.equal(cache, before)


def test_host_numbers_no_cache_seqlens_can_satisfy_are_refused():
    """Known on the host, so an error naming the argument rather than NaN for every
    sequence: more new keys than the cache's slots (with a tensor cache_seqlens, which
    ``_check_room`` does not see), and an int cache_leftpad past the cached keys (or past
    the room a tensor cache_seqlens can have)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 1, 2, 16, generator=gen).to(DEVICE)
    cache = torch.randn(2, 8, 1, 16, generator=gen).to(DEVICE)
    lengths = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    new = torch.randn(2, 9, 1, 16, generator=gen).to(DEVICE)
    with pytest.raises(ValueError, match="k: 9 new keys exceed the cache's 8 slots"):
        flash_attn_with_kvcache(q, cache.clone(), cache.clone(), new, new, cache_seqlens=lengths)
    with pytest.raises(ValueError, match=r"cache_leftpad: got 4; expected at most 3 \(cache_seqlens=3\)"):
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=3, cache_leftpad=4)
    with pytest.raises(ValueError, match="cache_leftpad: got 7; expected at most 6"):
        flash_attn_with_kvcache(q, cache.clone(), cache.clone(), new[:, :2], new[:, :2], cache_seqlens=lengths,
                                cache_leftpad=7)
    # At the limits the calls are fine: a pad equal to the cached keys leaves the new ones.
    out = flash_attn_with_kvcache(q, cache.clone(), cache.clone(), new[:, :2], new[:, :2], cache_seqlens=3,
                                  cache_leftpad=3)
    assert torch.isfinite(out).all()
