"""flash_attn_varlen_func with a ``block_table`` (flash-attn's paged KV cache for varlen
queries: chunked prefill, speculative decoding): against float64 attention over the keys
gathered from the pages, held to the project's bar (2x PyTorch's own error in the dtype plus
a small epsilon) for out and lse. Odd page sizes, GQA, empty and one-token sequences,
queries longer than their keys, seqused_k, windows, softcap, ALiBi, split-KV; bad block
tables and lengths give NaN for their sequence only, never a read outside the cache."""

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import HAS_CUDA
from ringflash import attention_varlen_ref, flash_attn_varlen_func
from ringflash.testing import assert_close

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
EPS = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}


def _paged(gen, k_lengths, page, hk, d, spare_blocks=3):
    """float64 contiguous keys/values (sum(k_lengths), hk, d) and the same scattered over
    shuffled pages: caches (num_blocks, page, hk, d) and block_table (batch, max_blocks),
    with a few pages no sequence uses."""
    per_seq = max(1, max(-(-n // page) for n in k_lengths))
    batch = len(k_lengths)
    num_blocks = batch * per_seq + spare_blocks
    k_cache = torch.randn(num_blocks, page, hk, d, generator=gen, dtype=torch.float64)
    v_cache = torch.randn(num_blocks, page, hk, d, generator=gen, dtype=torch.float64)
    table = torch.randperm(num_blocks, generator=gen)[:batch * per_seq].view(batch, per_seq).to(torch.int32)
    gather = lambda cache, b, n: cache[table[b].long()].flatten(0, 1)[:n]  # noqa: E731
    k = torch.cat([gather(k_cache, b, n) for b, n in enumerate(k_lengths)])
    v = torch.cat([gather(v_cache, b, n) for b, n in enumerate(k_lengths)])
    return k, v, k_cache, v_cache, table


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


CASES = {
    # name: (q lengths, k lengths, page, h, hk, d, options)
    "gqa_causal_odd_page": ([3, 0, 1, 7], [40, 0, 17, 5], 5, 4, 2, 16, dict(causal=True)),
    "prefill_window_softcap": ([20, 9], [33, 16], 16, 2, 2, 24, dict(causal=True, window_size=(6, 0), softcap=3.0)),
    "full_alibi_seqused": ([2, 5], [31, 12], 8, 6, 3, 32, dict(alibi=True, seqused_k=[25, 12])),
    "mqa_one_page": ([4, 1, 2], [7, 1, 16], 16, 4, 1, 8, dict(window_size=(3, 2))),
}


#: Real sizes for ``pytest -m gpu``: a serving batch of speculative-decoding lengths and a
#: chunked prefill, flash-attn's page size and an odd one.
GPU_CASES = {
    "speculative_gqa": ([1, 4, 2, 3, 1, 4, 0, 2], [8191, 2048, 333, 4000, 1, 7777, 64, 1024], 256, 32, 8, 128,
                        dict(causal=True)),
    "chunked_prefill_window": ([512, 300, 77], [3000, 301, 900], 96, 16, 4, 64,
                               dict(causal=True, window_size=(1024, 0), softcap=20.0)),
}


def _check_case(gen, name, dtype, case, extra_max_q=1):
    lq, lk, page, h, hk, d, opts = case
    opts = dict(opts)
    k, v, k_cache, v_cache, table = _paged(gen, lk, page, hk, d)
    q = torch.randn(sum(lq), h, d, generator=gen, dtype=torch.float64)
    cu_q, cu_k = _cu(lq), _cu(lk)
    used = opts.pop("seqused_k", None)
    used = None if used is None else torch.tensor(used, dtype=torch.int32)
    slopes = torch.rand(h, generator=gen) if opts.pop("alibi", False) else None
    max_q, max_k = max(lq) + extra_max_q, max(lk)  # max_seqlen_q may exceed the longest (an upper bound)

    def ref(q_, k_, v_):
        return attention_varlen_ref(q_, k_, v_, cu_q, cu_k, max_q, max_k, seqused_k=used, alibi_slopes=slopes,
                                    **opts)

    want_out, want_lse = ref(q, k, v)
    base_out, base_lse = ref(q.to(dtype), k.to(dtype), v.to(dtype))
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    out, lse, _ = flash_attn_varlen_func(
        dev(q.to(dtype)), dev(k_cache.to(dtype)), dev(v_cache.to(dtype)), dev(cu_q), dev(cu_k), max_q, max_k,
        block_table=dev(table), seqused_k=dev(used), alibi_slopes=dev(slopes), return_attn_probs=True, **opts,
    )
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (h, sum(lq))
    assert_close(f"{name} out", out, want_out, baseline=base_out, atol=_eps(dtype, want_out))
    assert_close(f"{name} lse", lse, want_lse, baseline=base_lse, atol=_eps(dtype, want_lse))


def _eps(dtype: torch.dtype, want: torch.Tensor) -> float:
    """The small epsilon, scaled by the largest reference entry (at least 1), as the
    property tests' ``relative_eps`` does: lse grows with the scores."""
    finite = want[torch.isfinite(want)]
    return EPS[dtype] * max(1.0, finite.abs().max().item() if finite.numel() else 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_paged_varlen_matches_the_reference(gen, name, dtype):
    _check_case(gen, name, dtype, CASES[name])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_paged_varlen_real_sizes(gen, name, dtype):
    _check_case(gen, name, dtype, GPU_CASES[name])


@st.composite
def paged_cases(draw):
    """Random batches: 1-4 sequences of 0-17 queries and 0-50 keys, pages of 1-17 slots,
    GQA/MQA, awkward head dims, causal/windows/softcap/ALiBi/seqused_k, fp32 or fp16."""
    nseq = draw(st.integers(1, 4))
    lq = [draw(st.sampled_from([0, 1, 2, 3, 5, 16, 17])) for _ in range(nseq)]
    lk = [draw(st.integers(0, 50)) for _ in range(nseq)]
    hk = draw(st.integers(1, 3))
    opts = dict(causal=draw(st.booleans()), window_size=(draw(st.sampled_from([-1, 0, 3, 20])),
                                                           draw(st.sampled_from([-1, 0, 4]))),
                softcap=draw(st.sampled_from([0.0, 0.0, 2.5])), alibi=draw(st.booleans()))
    if draw(st.booleans()):
        opts["seqused_k"] = [draw(st.integers(0, n)) for n in lk]
    case = (lq, lk, draw(st.sampled_from([1, 2, 3, 7, 16, 17])), hk * draw(st.integers(1, 3)), hk,
            draw(st.sampled_from([1, 8, 24, 40, 72, 130, 256])), opts)
    return case, draw(st.sampled_from([torch.float32, torch.float16])), draw(st.integers(0, 2**31)), \
        draw(st.sampled_from([0, 0, 1, 9]))


@settings(max_examples=int(os.environ.get("RINGFLASH_HYPOTHESIS_EXAMPLES", "") or 8), deadline=None,
          database=None, derandomize=False, print_blob=True, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(drawn=paged_cases())
def test_random_paged_batches(drawn):
    case, dtype, seed, extra_max_q = drawn
    _check_case(torch.Generator().manual_seed(seed), "random", dtype, case, extra_max_q)


def test_split_kv_and_many_queries(gen):
    """Long keys (split-KV on a GPU; num_splits chosen) and more packed rows than one tile."""
    lq, lk, page, h, hk, d = [70, 2], [300, 129], 32, 4, 2, 16
    k, v, k_cache, v_cache, table = _paged(gen, lk, page, hk, d)
    q = torch.randn(sum(lq), h, d, generator=gen, dtype=torch.float64)
    cu_q, cu_k = _cu(lq), _cu(lk)
    want, _ = attention_varlen_ref(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=True)
    out = flash_attn_varlen_func(q.float().to(DEVICE), k_cache.float().to(DEVICE), v_cache.float().to(DEVICE),
                                 cu_q.to(DEVICE), cu_k.to(DEVICE), max(lq), max(lk), causal=True,
                                 block_table=table.to(DEVICE))
    assert_close("out", out, want, rel_tol=1e-5)


def _small(gen, lk=(10, 6), page=4):
    k, v, k_cache, v_cache, table = _paged(gen, list(lk), page, 2, 8)
    q = torch.randn(2, 2, 8, generator=gen)
    return q, k_cache.float(), v_cache.float(), table, _cu([1, 1]), _cu(list(lk))


def test_bad_block_table_entries_and_lengths_give_nan_for_their_sequence_only(gen, monkeypatch):
    """Device-side values nobody checked on the host: a block-table entry outside the cache
    (negative or past num_blocks) in a used page, or a length past the sequence's pages.
    That sequence's rows are NaN, the other's are the reference's, and nothing faults."""
    q, k_cache, v_cache, table, cu_q, cu_k = _small(gen)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    good, _ = flash_attn_varlen_func(dev(q), dev(k_cache), dev(v_cache), dev(cu_q), dev(cu_k), 1, 10,
                                     block_table=dev(table), return_attn_probs=True)[:2]
    assert torch.isfinite(good).all()
    for bad_entry in (-1, k_cache.shape[0], 10**6):
        broken = table.clone()
        broken[0, 1] = bad_entry
        out = flash_attn_varlen_func(dev(q), dev(k_cache), dev(v_cache), dev(cu_q), dev(cu_k), 1, 10,
                                     block_table=dev(broken))
        assert torch.isnan(out[0]).all(), bad_entry
        torch.testing.assert_close(out[1], good[1])
    # An unused page's entry may hold anything (serving systems leave stale entries).
    unused = table.clone()
    unused[1, -1] = 10**6  # sequence 1 has 6 keys: pages 0-1 of 3
    out = flash_attn_varlen_func(dev(q), dev(k_cache), dev(v_cache), dev(cu_q), dev(cu_k), 1, 10,
                                 block_table=dev(unused))
    torch.testing.assert_close(out, good)
    # A length past the pages, unchecked on the host (as under torch.compile or CUDA graphs).
    monkeypatch.setenv("RINGFLASH_CHECK_CU_SEQLENS", "0")
    long_cu = _cu([10, 6 + 100])
    out = flash_attn_varlen_func(dev(q), dev(k_cache), dev(v_cache), dev(cu_q), dev(long_cu), 1, 106,
                                 block_table=dev(table))
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()
    used = torch.tensor([10, 999], dtype=torch.int32)
    out = flash_attn_varlen_func(dev(q), dev(k_cache), dev(v_cache), dev(cu_q), dev(cu_k), 1, 10,
                                 block_table=dev(table), seqused_k=dev(used))
    assert torch.isnan(out).all()  # seqused_k past its sequence's keys: invalid metadata, the call is NaN


def test_bad_arguments_raise(gen):
    q, k_cache, v_cache, table, cu_q, cu_k = _small(gen)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    args = (dev(q), dev(k_cache), dev(v_cache), dev(cu_q), dev(cu_k), 1, 10)
    with pytest.raises(ValueError, match="cu_seqlens_k: a sequence has 20 keys but block_table holds 12"):
        flash_attn_varlen_func(*args[:4], dev(_cu([20, 6])), 1, 20, block_table=dev(table))
    with pytest.raises(ValueError, match="block_table: has 1 rows; expected batch=2"):
        flash_attn_varlen_func(*args, block_table=dev(table[:1]))
    with pytest.raises(TypeError, match="block_table: dtype torch.int64"):
        flash_attn_varlen_func(*args, block_table=dev(table.long()))
    with pytest.raises(ValueError, match="k: expected a 4-D tensor \\(num_blocks, page_size"):
        flash_attn_varlen_func(args[0], args[1][0], args[2][0], *args[3:], block_table=dev(table))
    with pytest.raises(ValueError, match="dropout_p: got 0.1 with block_table"):
        flash_attn_varlen_func(*args, dropout_p=0.1, block_table=dev(table))
    for empty in (args[1][:0], args[1][:, :0]):  # no page, or pages of no slot
        with pytest.raises(ValueError, match="k_cache: shape .* has no page or no slot per page"):
            flash_attn_varlen_func(args[0], empty, empty, *args[3:], block_table=dev(table))


def test_backward_raises_instead_of_returning_no_gradient(gen):
    q, k_cache, v_cache, table, cu_q, cu_k = _small(gen)
    q = q.to(DEVICE).requires_grad_()
    out = flash_attn_varlen_func(q, k_cache.to(DEVICE), v_cache.to(DEVICE), cu_q.to(DEVICE), cu_k.to(DEVICE), 1, 10,
                                 block_table=table.to(DEVICE))
    assert out.requires_grad  # the forward runs with inputs that require grad (flash-attn's tests do)
    with pytest.raises(NotImplementedError, match="block_table .* is forward-only"):
        out.sum().backward()


def test_compiled_call_matches_eager(gen):
    """flash_attn_varlen_func with block_table under torch.compile(fullgraph=True)."""
    torch._dynamo.reset()
    q, k_cache, v_cache, table, cu_q, cu_k = _small(gen)
    args = [t.to(DEVICE) for t in (q, k_cache, v_cache, cu_q, cu_k)]

    def call(q, kc, vc, cu_q, cu_k):
        return flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, 1, 10, causal=True, block_table=table.to(DEVICE))

    torch.testing.assert_close(torch.compile(call, backend="aot_eager", fullgraph=True)(*args), call(*args))


def test_inference_calls_skip_the_autograd_function(monkeypatch):
    """Without a gradient to track, a paged call runs the op alone (the Function's
    bookkeeping is host time per serving step); with one, the Function, whose backward
    refuses."""
    from ringflash import autograd as A

    entered = []
    real = A.PagedKVAttnFunc.forward

    def spy(ctx, *args):
        entered.append(True)
        return real(ctx, *args)
    monkeypatch.setattr(A.PagedKVAttnFunc, "forward", staticmethod(spy))
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(3, 2, 16, generator=gen).half().to(DEVICE)
    k_cache = torch.randn(4, 16, 1, 16, generator=gen).half().to(DEVICE)
    v_cache = torch.randn(4, 16, 1, 16, generator=gen).half().to(DEVICE)
    block_table = torch.tensor([[0, 1], [2, 3], [1, 0]], dtype=torch.int32, device=DEVICE)
    cu_q = torch.tensor([0, 1, 2, 3], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 20, 25, 57], dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        plain = flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 1, 32, block_table=block_table)
    assert not entered
    tracked = flash_attn_varlen_func(q.clone().requires_grad_(), k_cache, v_cache, cu_q, cu_k, 1, 32,
                                     block_table=block_table)
    assert entered and tracked.requires_grad
    torch.testing.assert_close(tracked.detach(), plain, rtol=0, atol=0)
