"""flash_attn_with_kvcache against float64 attention over the updated cache: contiguous and
paged caches, new keys appended in place, cache_batch_idx, cache_leftpad, rotary
(interleaved or not), GQA, causal / windows / softcap / ALiBi, split-KV, seqlen_q 1 and
more, and the cache contents after the call."""

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import HAS_CUDA
from ringflash import attention_ref, flash_attn_with_kvcache
from ringflash.reference import _attention

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def _rotate64(x, cos, sin, positions, interleaved):
    """float64 rotary of x (b, n, h, d) at positions (b, n), written independently of ringflash."""
    rot = 2 * cos.shape[1]
    out = x.clone()
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            c, s = cos[positions[b][t]].double(), sin[positions[b][t]].double()
            for i in range(rot // 2):
                a, bb = (2 * i, 2 * i + 1) if interleaved else (i, i + rot // 2)
                x1, x2 = x[b, t, :, a], x[b, t, :, bb]
                out[b, t, :, a], out[b, t, :, bb] = x1 * c[i] - x2 * s[i], x1 * s[i] + x2 * c[i]
    return out


def _case(gen, *, batch=3, seqlen_q=1, nheads=4, nheads_k=2, d=16, capacity=40, seqlen_new=0, paged=None,
          batch_idx=False, leftpad=False, rotary=None, causal=True, window=(-1, -1), softcap=0.0, alibi=False,
          num_splits=0, dtype=torch.float32):
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    rows = batch + 2 if batch_idx else batch
    k_full, v_full = mk(rows, capacity, nheads_k, d), mk(rows, capacity, nheads_k, d)
    q = mk(batch, seqlen_q, nheads, d)
    lengths = torch.randint(0, capacity - seqlen_new + 1, (batch,), generator=gen)
    lengths[0] = capacity - seqlen_new  # one full cache
    pad = torch.randint(0, 5, (batch,), generator=gen) if leftpad else torch.zeros(batch, dtype=torch.long)
    pad = torch.minimum(pad, lengths)
    cache_rows = torch.randperm(rows, generator=gen)[:batch] if batch_idx else torch.arange(batch)
    new_k, new_v = (mk(batch, seqlen_new, nheads_k, d) for _ in range(2)) if seqlen_new else (None, None)
    cos = sin = None
    if rotary is not None:
        angles = torch.rand(capacity, d // 4, generator=gen, dtype=torch.float64) * 6
        cos, sin = angles.cos(), angles.sin()
    slopes = torch.rand(nheads, generator=gen) if alibi else None

    # float64 ground truth: append (rotated) new keys, rotate q, attend to slots [pad, len + new).
    want_k, want_v = k_full.clone(), v_full.clone()
    # Rotary positions are cache slots, left padding included (flash-attn's convention).
    positions_new = [[int(lengths[b]) + t for t in range(seqlen_new)] for b in range(batch)]
    if seqlen_new:
        rk = _rotate64(new_k, cos, sin, positions_new, rotary) if rotary is not None else new_k
        for b in range(batch):
            n = int(lengths[b])
            want_k[cache_rows[b], n:n + seqlen_new] = rk[b]
            want_v[cache_rows[b], n:n + seqlen_new] = new_v[b]
    q_ref = q
    if rotary is not None:
        local = causal or window != (-1, -1)
        pos_q = [[int(lengths[b]) + (t if local else 0) for t in range(seqlen_q)] for b in range(batch)]
        q_ref = _rotate64(q, cos, sin, pos_q, rotary)
    outs = []
    for b in range(batch):
        lo, hi = int(pad[b]), int(lengths[b]) + seqlen_new
        # A window side is unbounded where it spans the cache's slots (flash-attn's rule for
        # the cache call), not this sequence's keys: a side of 2 over one key with five
        # queries still hides that key from the first queries (a failed random case).
        out_b, _ = _attention(q_ref[b:b + 1], want_k[cache_rows[b]:cache_rows[b] + 1, lo:hi],
                              want_v[cache_rows[b]:cache_rows[b] + 1, lo:hi], causal, None, window, softcap,
                              None if slopes is None else slopes.double().float(), window_keys=capacity)
        outs.append(out_b)
    want = torch.cat(outs)

    # ringflash, in dtype on the device.
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    k_cache, v_cache = k_full.to(dtype), v_full.to(dtype)
    block_table = None
    if paged is not None:  # scatter each cache row over shuffled blocks of `paged` slots
        per_row = capacity // paged
        perm = torch.randperm(rows * per_row, generator=gen)
        kb = torch.empty(rows * per_row, paged, nheads_k, d, dtype=dtype)
        vb = torch.empty_like(kb)
        for r in range(rows):
            for j in range(per_row):
                kb[perm[r * per_row + j]] = k_cache[r, j * paged:(j + 1) * paged]
                vb[perm[r * per_row + j]] = v_cache[r, j * paged:(j + 1) * paged]
        block_table = perm.view(rows, per_row)[cache_rows].to(torch.int32)
        k_cache, v_cache = kb, vb
    k_cache, v_cache = dev(k_cache), dev(v_cache)
    out = flash_attn_with_kvcache(
        dev(q.to(dtype)), k_cache, v_cache, dev(None if new_k is None else new_k.to(dtype)),
        dev(None if new_v is None else new_v.to(dtype)),
        rotary_cos=dev(None if cos is None else cos.float()), rotary_sin=dev(None if sin is None else sin.float()),
        cache_seqlens=dev(lengths.to(torch.int32)), cache_batch_idx=dev(cache_rows.to(torch.int32)) if batch_idx else None,
        cache_leftpad=dev(pad.to(torch.int32)) if leftpad else None, block_table=dev(block_table), causal=causal,
        window_size=window, softcap=softcap, rotary_interleaved=bool(rotary), alibi_slopes=dev(slopes),
        num_splits=num_splits,
    )
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double().cpu(), want, atol=tol * 4, rtol=tol)
    if seqlen_new:  # the new keys landed in the cache, rotated
        for b in range(batch):
            n, row = int(lengths[b]), int(cache_rows[b])
            for t in range(seqlen_new):
                if paged is not None:
                    slot = n + t
                    got_k = k_cache[block_table[b, slot // paged], slot % paged]
                else:
                    got_k = k_cache[row, n + t]
                torch.testing.assert_close(got_k.double().cpu(), want_k[row, n + t], atol=tol * 4, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("seqlen_q", [1, 3])
def test_decode_contiguous(gen, dtype, seqlen_q):
    _case(gen, seqlen_q=seqlen_q, dtype=dtype)


@pytest.mark.parametrize("paged", [None, 8, 16], ids=["contiguous", "paged", "paged-aligned"])
def test_append_rotary_and_cache_rows(gen, paged):
    """Pages of 16 slots are a multiple of the interpreter's key block (the kernel's
    one-page-per-block path); 8 are not."""
    _case(gen, seqlen_q=2, seqlen_new=2, paged=paged, batch_idx=paged is None, rotary="interleaved",
          capacity=48)


def test_non_interleaved_rotary_non_causal_leftpad(gen):
    _case(gen, seqlen_q=3, seqlen_new=3, rotary="", causal=False, leftpad=True)


@pytest.mark.parametrize("options", [dict(window=(6, 0)), dict(softcap=1.5), dict(alibi=True),
                                     dict(num_splits=3), dict(num_splits=40), dict(nheads=6, nheads_k=1, d=40)],
                         ids=["window", "softcap", "alibi", "splits", "splits40", "mqa-d40"])
def test_decode_options(gen, options):
    _case(gen, seqlen_q=2, seqlen_new=1, **options)


def test_window_is_bounded_by_the_cache_not_the_sequence():
    """A random case that failed in CI (stop 39): a sequence whose left padding leaves one
    key, five queries and a window of (0, 2). flash-attn bounds window sides against the
    cache's slots (8 here), so the right side of 2 stays a window and the first two queries
    see no key (output 0); the test's reference had bounded it against the sequence's one
    key, made it unbounded, and expected that key's value there."""
    _case(torch.Generator().manual_seed(1624690), batch=3, seqlen_q=5, nheads_k=1, nheads=1, d=64, capacity=8,
          seqlen_new=1, paged=8, leftpad=True, causal=False, window=(0, 2), softcap=1.5, num_splits=3)


@settings(max_examples=int(os.environ.get("RINGFLASH_HYPOTHESIS_EXAMPLES", "") or 6), deadline=None,
          database=None, derandomize=False, print_blob=True, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_cache_calls(data):
    """Random combinations of the options above (hypothesis), each against float64."""
    paged = data.draw(st.sampled_from([None, None, 1, 4, 8, 16]), "paged")
    nheads_k = data.draw(st.integers(1, 3), "nheads_k")
    options = dict(
        batch=data.draw(st.integers(1, 4), "batch"), seqlen_q=data.draw(st.integers(1, 5), "seqlen_q"),
        nheads_k=nheads_k, nheads=nheads_k * data.draw(st.integers(1, 3), "group"),
        d=data.draw(st.sampled_from([8, 16, 40, 64]), "d"),
        capacity=data.draw(st.sampled_from([8, 24, 40] if paged != 16 else [16, 32, 48]), "capacity"),
        seqlen_new=data.draw(st.integers(0, 4), "seqlen_new"), paged=paged,
        batch_idx=paged is None and data.draw(st.booleans(), "batch_idx"),
        leftpad=data.draw(st.booleans(), "leftpad"),
        rotary=data.draw(st.sampled_from([None, "interleaved", ""]), "rotary"),
        causal=data.draw(st.booleans(), "causal"),
        window=(data.draw(st.sampled_from([-1, 0, 5]), "left"), data.draw(st.sampled_from([-1, 0, 2]), "right")),
        softcap=data.draw(st.sampled_from([0.0, 1.5]), "softcap"), alibi=data.draw(st.booleans(), "alibi"),
        num_splits=data.draw(st.sampled_from([0, 1, 3]), "num_splits"),
        dtype=data.draw(st.sampled_from([torch.float32, torch.float16]), "dtype"),
    )
    if options["seqlen_q"] > options["seqlen_new"]:
        # Rotary positions of queries past the new keys would leave the table (it covers the
        # cache's slots); flash-attn's tests append as many keys as queries.
        options["rotary"] = None
    _case(torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), "seed")), **options)


def test_bad_arguments():
    q = torch.randn(2, 1, 4, 16, device=DEVICE)
    cache = torch.randn(2, 8, 2, 16, device=DEVICE)
    table = torch.zeros(2, 1, dtype=torch.int32, device=DEVICE)
    for empty in (cache[:0], cache[:, :0]):  # a paged cache with no page, or pages of no slot
        with pytest.raises(ValueError, match="k_cache: shape .* has no page or no slot per page"):
            flash_attn_with_kvcache(q, empty, empty, cache_seqlens=1, block_table=table)
    rows = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="k_cache: shape .* has no row; expected at least one with cache_batch_idx"):
        flash_attn_with_kvcache(q, cache[:0], cache[:0], cache_seqlens=0, cache_batch_idx=rows)
    with pytest.raises(ValueError, match="cache_seqlens: 8 cached keys plus 1 new ones exceed the cache's 8 slots; "
                       "expected at most 7"):
        new = torch.randn(2, 1, 2, 16, device=DEVICE)
        flash_attn_with_kvcache(q, cache.clone(), cache.clone(), new, new, cache_seqlens=8)
    with pytest.raises(ValueError, match="cache_seqlens: 9 cached keys"):
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=9)
    with pytest.raises(ValueError, match="k, v: give both"):
        flash_attn_with_kvcache(q, cache, cache, k=torch.randn(2, 1, 2, 16, device=DEVICE))
    with pytest.raises(TypeError, match="cache_seqlens: dtype torch.int64 is not supported; expected int32"):
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=torch.tensor([1, 2], device=DEVICE))
    with pytest.raises(ValueError, match="cache_batch_idx: not supported with a paged cache"):
        flash_attn_with_kvcache(q, cache, cache, block_table=torch.zeros(2, 1, dtype=torch.int32, device=DEVICE),
                                cache_batch_idx=torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="no backward"):
        flash_attn_with_kvcache(q.requires_grad_(), cache, cache)


@pytest.mark.parametrize("sq,causal,alibi", [(1, True, False), (5, False, True), (2, True, True)])
def test_flash_attn_func_with_few_queries_runs_the_decode_kernels(monkeypatch, gen, sq, causal, alibi):
    """flash_attn_func with a few query rows per KV head against many keys dispatches to the
    decode family (forward; the backward is the training one): same bar as every kernel."""
    from attn_check import check_attention, dense64
    from ringflash import flash_attn_func
    from ringflash.kernels import dispatch
    from ringflash.kernels.problem import make_problem

    monkeypatch.setenv("RINGFLASH_DECODE", "1")
    inputs = dense64(gen, DEVICE, 2, sq, 300, 8, 2, 32)
    slopes = torch.rand(8, generator=gen).to(DEVICE) if alibi else None
    prob = make_problem(inputs[0], inputs[1], None, sq, 300, 0.1, causal, -1, -1, 0.0)
    assert dispatch.use_decode(inputs[0], inputs[1], prob, None, None)

    def impl(q, k, v):
        out, lse, _ = flash_attn_func(q, k, v, causal=causal, alibi_slopes=slopes, return_attn_probs=True)
        return out, lse

    def ref(q, k, v):
        return attention_ref(q, k, v, causal=causal, alibi_slopes=slopes)

    check_attention(impl, ref, inputs, torch.float32)


def test_decode_dispatch_default_and_switch(monkeypatch):
    """Unset, RINGFLASH_DECODE sends dense few-query calls to the decode kernels (measured
    faster on an H100) and leaves varlen calls on the training forward; 1 sends both, 0
    neither, and any other value is an error naming the variable."""
    from conftest import cu_seqlens_from_lengths
    from ringflash.kernels import dispatch
    from ringflash.kernels.problem import SeqMeta, make_problem

    q, k = torch.randn(2, 1, 8, 32), torch.randn(2, 300, 2, 32)
    dense = make_problem(q, k, None, 1, 300, 0.1, True, -1, -1, 0.0)
    cu_q, cu_k = cu_seqlens_from_lengths([1, 1]), cu_seqlens_from_lengths([300, 300])
    meta = SeqMeta.from_cu_seqlens(cu_q, cu_k, None)
    qv, kv = q.reshape(2, 8, 32), k.reshape(600, 2, 32)
    varlen = make_problem(qv, kv, meta, 1, 300, 0.1, True, -1, -1, 0.0)
    for value, want_dense, want_varlen in ((None, True, False), ("1", True, True), ("0", False, False)):
        if value is None:
            monkeypatch.delenv("RINGFLASH_DECODE", raising=False)
        else:
            monkeypatch.setenv("RINGFLASH_DECODE", value)
        assert dispatch.use_decode(q, k, dense, None, None) is want_dense, value
        assert dispatch.use_decode(qv, kv, varlen, meta, None) is want_varlen, value
        assert not dispatch.use_decode(q, k, dense, None, (0.1, 0)), "dropout stays on the training forward"
    monkeypatch.setenv("RINGFLASH_DECODE", "yes")
    with pytest.raises(ValueError, match="RINGFLASH_DECODE: got 'yes'"):
        dispatch.use_decode(q, k, dense, None, None)


@pytest.mark.parametrize("sq,causal,used", [(1, True, False), (3, False, True)])
def test_varlen_with_few_queries_runs_the_decode_kernels(monkeypatch, gen, sq, causal, used):
    """flash_attn_varlen_func with at most a few queries per sequence (a serving batch,
    speculative decoding) dispatches to the decode family: query segments of different
    lengths (one empty), keys of different lengths (one empty, one shorter than its query
    count), seqused_k; grouped metadata does not."""
    from attn_check import check_attention, varlen_impl, varlen_ref
    from conftest import cu_seqlens_from_lengths
    from ringflash.kernels import dispatch
    from ringflash.kernels.problem import SeqMeta, make_problem

    monkeypatch.setenv("RINGFLASH_DECODE", "1")
    k_lengths = [300, 0, 257, 2]
    h, hk, d = 8, 2, 32
    q_lengths = [sq, 0, sq, 1] if sq > 1 else [1, 0, 1, 1]
    cu_q = cu_seqlens_from_lengths(q_lengths, DEVICE)
    cu_k = cu_seqlens_from_lengths(k_lengths, DEVICE)
    q = torch.randn(sum(q_lengths), h, d, generator=gen, dtype=torch.float64).to(DEVICE)
    k, v = (torch.randn(sum(k_lengths), hk, d, generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(2))
    seqused = torch.tensor([250, 0, 257, 1], dtype=torch.int32, device=DEVICE) if used else None
    meta = SeqMeta.from_cu_seqlens(cu_q, cu_k, seqused)
    prob = make_problem(q, k, meta, sq, max(k_lengths), 0.1, causal, -1, -1, 0.0)
    assert dispatch.use_decode(q, k, prob, meta, None)
    grouped = SeqMeta(torch.stack([meta.q_starts[0]] * 2), torch.stack([meta.q_ends[0]] * 2), cu_k, None)
    assert not dispatch.use_decode(q, k, make_problem(q, k, grouped, sq, 300, 0.1, causal, -1, -1, 0.0), grouped,
                                   None)
    check_attention(varlen_impl, varlen_ref, (q, k, v), torch.float32,
                    extra=(cu_q, cu_k, sq, max(k_lengths), causal, (-1, -1), seqused))


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("append", [False, True])
def test_lengths_past_the_cache_give_nan_and_stay_inside_it(gen, paged, append):
    """cache_seqlens (a device tensor, unchecked on the host) past the cache or the block
    table's pages: that sequence's output is NaN, the others are unaffected, nothing is
    read or written outside the cache (flash-attn's block-table bounds test, without its
    host sync). At exactly the capacity, without new keys, the call is fine."""
    page, blocks_per_seq, batch, h, d = 16, 2, 2, 2, 16
    capacity = page * blocks_per_seq
    if paged:
        k_cache = torch.randn(batch * blocks_per_seq + 1, page, h, d, generator=gen).to(DEVICE)
        table = torch.arange(batch * blocks_per_seq, dtype=torch.int32).view(batch, blocks_per_seq).to(DEVICE)
    else:
        k_cache = torch.randn(batch, capacity, h, d, generator=gen).to(DEVICE)
        table = None
    v_cache = torch.randn(k_cache.shape, generator=gen).to(DEVICE)
    spare = (k_cache[-1].clone(), v_cache[-1].clone())
    q = torch.randn(batch, 1, h, d, generator=gen).to(DEVICE)
    new = (torch.randn(batch, 1, h, d, generator=gen).to(DEVICE),) * 2 if append else (None, None)
    good_len = capacity - 1 if append else capacity
    lengths = torch.tensor([good_len, capacity + 3], dtype=torch.int32, device=DEVICE)
    before = (k_cache.clone(), v_cache.clone())
    out = flash_attn_with_kvcache(q, k_cache, v_cache, *new, cache_seqlens=lengths, block_table=table)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()
    ok = flash_attn_with_kvcache(q[:1], k_cache if paged else k_cache[:1], v_cache if paged else v_cache[:1],
                                 cache_seqlens=lengths[:1] + (1 if append else 0),
                                 block_table=None if table is None else table[:1])
    torch.testing.assert_close(out[0], ok[0])
    if paged:  # the unused block is untouched
        assert torch.equal(k_cache[-1], spare[0]) and torch.equal(v_cache[-1], spare[1])
    else:  # the bad sequence's row is untouched
        assert torch.equal(k_cache[1], before[0][1]) and torch.equal(v_cache[1], before[1][1])


@pytest.mark.parametrize("num_splits", [0, 2])
def test_cache_rows_and_pages_outside_the_cache_give_nan_and_write_nothing(gen, num_splits):
    """Device-side cache_batch_idx entries and block-table entries outside the cache (no
    host check): that sequence's output is NaN, the other's is right, appends to it write
    nothing, and nothing is read or written outside the cache. With split-KV, the NaN of
    the splits that met the bad entry survives the merge."""
    batch, h, d, page = 2, 2, 16, 8
    q = torch.randn(batch, 1, h, d, generator=gen).to(DEVICE)
    new = torch.randn(batch, 2, h, d, generator=gen).to(DEVICE)
    lengths = torch.tensor([5, 9], dtype=torch.int32, device=DEVICE)
    # Contiguous cache, a cache row past the cache for sequence 1.
    k_cache = torch.randn(3, 16, h, d, generator=gen).to(DEVICE)
    v_cache = torch.randn(3, 16, h, d, generator=gen).to(DEVICE)
    before = (k_cache.clone(), v_cache.clone())
    rows = torch.tensor([2, 7], dtype=torch.int32, device=DEVICE)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, new, new, cache_seqlens=lengths, cache_batch_idx=rows,
                                  num_splits=num_splits)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()
    assert torch.equal(k_cache[:2], before[0][:2]) and torch.equal(v_cache[:2], before[1][:2])
    assert torch.equal(k_cache[2, 5:7], new[0]) and torch.equal(k_cache[2, 7:], before[0][2, 7:])
    # Paged, sequence 1's second page entry past the cache (its first is fine).
    k_pages = torch.randn(4, page, h, d, generator=gen).to(DEVICE)
    v_pages = torch.randn(4, page, h, d, generator=gen).to(DEVICE)
    before = (k_pages.clone(), v_pages.clone())
    table = torch.tensor([[0, 1], [2, 99]], dtype=torch.int32, device=DEVICE)
    out = flash_attn_with_kvcache(q, k_pages, v_pages, new, new, cache_seqlens=lengths, block_table=table,
                                  num_splits=num_splits)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()
    assert torch.equal(k_pages[3], before[0][3]) and torch.equal(v_pages[3], before[1][3])
    assert torch.equal(k_pages[2], before[0][2])  # sequence 1's new keys (slots 9, 10) fell on the bad page


@pytest.mark.parametrize("paged", [False, True])
def test_compiled_decode_step_matches_eager(gen, paged):
    """flash_attn_with_kvcache under torch.compile(fullgraph=True) (a registered custom op
    that mutates the caches): the same output and the same appended cache as eager, over
    two steps (the compiled graph is reused with new lengths)."""
    torch._dynamo.reset()
    batch, h, hk, d, page = 2, 4, 2, 16, 8
    cos, sin = (torch.rand(32, 4, generator=gen).to(DEVICE) for _ in range(2))
    if paged:
        k_cache = torch.randn(9, page, hk, d, generator=gen).to(DEVICE)
        table = torch.tensor([[3, 1, 7, 0], [2, 8, 5, 4]], dtype=torch.int32, device=DEVICE)
    else:
        k_cache, table = torch.randn(batch, 32, hk, d, generator=gen).to(DEVICE), None
    v_cache = torch.randn(k_cache.shape, generator=gen).to(DEVICE)
    caches = {"eager": (k_cache.clone(), v_cache.clone()), "compiled": (k_cache.clone(), v_cache.clone())}

    def step(q, kc, vc, k, v, lengths):
        return flash_attn_with_kvcache(q, kc, vc, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lengths,
                                       block_table=table, causal=True, return_softmax_lse=True)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for lengths in ([5, 9], [6, 10]):
        lengths = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
        q = torch.randn(batch, 1, h, d, generator=gen).to(DEVICE)
        k, v = (torch.randn(batch, 1, hk, d, generator=gen).to(DEVICE) for _ in range(2))
        want = step(q, *caches["eager"], k, v, lengths)
        got = compiled(q, *caches["compiled"], k, v, lengths)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        for a, b in zip(caches["compiled"], caches["eager"]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("paged", [False, True])
def test_strided_index_tensors_read_like_contiguous_ones(gen, paged):
    """cache_seqlens, cache_leftpad, cache_batch_idx and block_table given as strided views
    (a column of a bigger tensor): the same result and the same appended cache as with
    contiguous copies (the kernels index them with unit stride, so views are copied)."""
    batch, h, hk, d, page = 3, 4, 2, 16, 8

    def strided(t):  # every other element of a twice-as-wide buffer, junk between
        wide = torch.stack([t, torch.full_like(t, 7)], dim=-1)
        return wide[..., 0]

    q = torch.randn(batch, 1, h, d, generator=gen).to(DEVICE)
    new = torch.randn(batch, 1, hk, d, generator=gen).to(DEVICE)
    lengths = torch.tensor([5, 20, 9], dtype=torch.int32, device=DEVICE)
    pad = torch.tensor([0, 3, 2], dtype=torch.int32, device=DEVICE)
    if paged:
        cache = torch.randn(12, page, hk, d, generator=gen).to(DEVICE)
        extra = dict(block_table=torch.randperm(12, generator=gen)[:9].view(3, 3).to(torch.int32).to(DEVICE))
        views = dict(block_table=strided(extra["block_table"]))
    else:
        cache = torch.randn(4, 24, hk, d, generator=gen).to(DEVICE)
        extra = dict(cache_batch_idx=torch.tensor([3, 0, 2], dtype=torch.int32, device=DEVICE))
        views = dict(cache_batch_idx=strided(extra["cache_batch_idx"]))
    results = []
    for lens, lpad, other in ((lengths, pad, extra), (strided(lengths), strided(pad), views)):
        assert lens.stride(0) == 2 or lens is lengths
        kc, vc = cache.clone(), cache.clone()
        out = flash_attn_with_kvcache(q, kc, vc, new, new, cache_seqlens=lens, cache_leftpad=lpad, causal=True,
                                      **other)
        results.append((out, kc))
    assert torch.isfinite(results[0][0]).all()
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_decode_grids_stay_within_cuda_limits(monkeypatch):
    """CUDA caps grid axes 1 and 2 at 65535. A decode batch of 70000 sequences, or 9000
    sequences x 8 KV heads, must put its batch on axis 0 in the decode kernel and in the
    split merge: the interpreter has no such limit, so the launches' grids are checked."""
    from ringflash.kernels import decode, fwd

    grids = []

    class RecordGrid:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            grids.append((self.name, tuple(grid)))
            return lambda *args, **kwargs: None  # nothing runs: only the grid is under test

    monkeypatch.setattr(decode, "_decode_kernel", RecordGrid("decode"))
    monkeypatch.setattr(fwd, "_combine_splits_kernel", RecordGrid("combine"))
    for batch, nheads_k in ((70000, 1), (9000, 8)):
        q = torch.zeros(batch, 1, nheads_k, 16, dtype=torch.float16, device=DEVICE)
        cache = torch.zeros(batch, 1, nheads_k, 16, dtype=torch.float16, device=DEVICE)
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=1, num_splits=2)
    assert {name for name, _ in grids} == {"decode", "combine"}
    for name, grid in grids:
        assert all(n <= 65535 for n in grid[1:]), (name, grid)
