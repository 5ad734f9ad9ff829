"""Grouped attention: G query groups against prefixes of one K/V buffer.

Checked against the float64 reference per group (the project's bar, through
check_attention on the concatenated groups) and against separate flash_attn_varlen_func
calls with the same ranges."""

import numpy as np
import pytest
import torch

from attn_check import check_attention
from conftest import HAS_CUDA, cu_seqlens_from_lengths
from ringflash import (
    attention_varlen_ref,
    flash_attn_varlen_func,
    grouped_flash_attn_varlen_func,
    zigzag_group_ranges,
)
from ringflash.kernels import configs
from ringflash.kernels.problem import AttnProblem

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


class GroupedCase:
    """Groups described by per-sequence query lengths and key-prefix lengths."""

    def __init__(self, gen, k_lengths, q_lengths_per_group, used_per_group, h=4, hk=2, d=16):
        self.cu_k = cu_seqlens_from_lengths(k_lengths, DEVICE)
        self.max_k = max(k_lengths)
        self.cu_q = [cu_seqlens_from_lengths(ls, DEVICE) for ls in q_lengths_per_group]
        self.max_q = [max(ls) for ls in q_lengths_per_group]
        self.used = [None if u is None else torch.tensor(u, dtype=torch.int32, device=DEVICE) for u in used_per_group]
        self.sizes = [sum(ls) for ls in q_lengths_per_group]
        total_q = sum(self.sizes)
        self.q64 = torch.randn(total_q, h, d, generator=gen, dtype=torch.float64).to(DEVICE)
        self.k64 = torch.randn(sum(k_lengths), hk, d, generator=gen, dtype=torch.float64).to(DEVICE)
        self.v64 = torch.randn(sum(k_lengths), hk, d, generator=gen, dtype=torch.float64).to(DEVICE)

    def split(self, q):
        return list(q.split(self.sizes))

    def grouped(self, q, k, v, causal=True, window=(-1, -1), softcap=0.0):
        outs, lses = grouped_flash_attn_varlen_func(
            self.split(q), k, v, self.cu_q, self.cu_k, self.used, self.max_q, self.max_k,
            causal=causal, window_size=window, softcap=softcap,
        )
        return torch.cat(outs), torch.cat(lses, dim=1)

    def separate(self, fn, q, k, v, causal=True, window=(-1, -1), softcap=0.0):
        outs, lses = [], []
        for g, qg in enumerate(self.split(q)):
            kwargs = dict(causal=causal, window_size=window, softcap=softcap, seqused_k=self.used[g])
            if fn is flash_attn_varlen_func:
                out, lse, _ = fn(qg, k, v, self.cu_q[g], self.cu_k, self.max_q[g], self.max_k,
                                 return_attn_probs=True, **kwargs)
            else:
                out, lse = fn(qg, k, v, self.cu_q[g], self.cu_k, self.max_q[g], self.max_k, **kwargs)
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses, dim=1)

    def reference(self, q, k, v, causal=True, window=(-1, -1), softcap=0.0):
        return self.separate(attention_varlen_ref, q, k, v, causal, window, softcap)

    def inputs(self):
        return self.q64, self.k64, self.v64


ZIGZAG_W2 = dict(  # world size 2, rank 0: chunks 0 and 3 of 4, three sequences
    k_lengths=[32, 12, 20], q_lengths=[[8, 3, 5], [8, 3, 5]], used=[[8, 3, 5], [32, 12, 20]],
)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "k_lengths,q_lengths,used",
    [
        ([40, 17], [[9, 17]], [[20, 17]]),  # G = 1
        (ZIGZAG_W2["k_lengths"], ZIGZAG_W2["q_lengths"], ZIGZAG_W2["used"]),  # G = 2, zigzag-shaped
        ([33, 5, 21], [[4, 0, 7], [11, 5, 2], [6, 1, 0]], [[10, 0, 21], [33, 5, 2], [6, 3, 0]]),  # G = 3, empties
    ],
    ids=["G1", "G2-zigzag", "G3-empty"],
)
def test_grouped_matches_reference(gen, dtype, k_lengths, q_lengths, used):
    case = GroupedCase(gen, k_lengths, q_lengths, used)
    check_attention(case.grouped, case.reference, case.inputs(), dtype, extra=(True,))


@pytest.mark.parametrize("causal,window,softcap", [(False, (-1, -1), 0.0), (False, (5, 3), 0.0), (True, (-1, -1), 2.0)])
def test_grouped_options(gen, causal, window, softcap):
    # Group 0's first sequence: 37 queries (more than a block) against a 25-key prefix of
    # 40 keys, so a key block straddles the prefix end with whole query blocks around it.
    case = GroupedCase(gen, [40, 19], [[37, 19], [6, 4]], [[25, 19], [7, 0]], h=2, hk=1)
    check_attention(case.grouped, case.reference, case.inputs(), torch.float32, extra=(causal, window, softcap))


def test_grouped_equals_separate_varlen_calls(gen):
    """Same ranges through flash_attn_varlen_func, one call per group: out, lse and every
    gradient agree (dk/dv of the separate calls summed over groups)."""
    case = GroupedCase(gen, [29, 14, 40], [[9, 4, 13], [10, 5, 14], [7, 2, 0]], [[9, 4, 13], [29, 14, 40], [20, 2, 0]])
    q, k, v = (t.float().requires_grad_() for t in case.inputs())
    dout = torch.randn(q.shape, generator=gen, dtype=torch.float32).to(DEVICE)
    got = case.grouped(q, k, v)
    got_grads = torch.autograd.grad(got[0], (q, k, v), dout)
    want = case.separate(flash_attn_varlen_func, q, k, v)
    want_grads = torch.autograd.grad(want[0], (q, k, v), dout)
    for a, b in zip((*got, *got_grads), (*want, *want_grads)):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_zigzag_group_ranges(gen, world_size):
    total = 2 * world_size
    lengths = [total * n for n in (3, 1, 5)]
    cu_k = cu_seqlens_from_lengths(lengths, DEVICE)
    for rank in range(world_size):
        chunks = [rank, total - 1 - rank]
        cu_q, used, max_q = zigzag_group_ranges(cu_k, max(lengths), chunks, total)
        for c, cu, u, m in zip(chunks, cu_q, used, max_q):
            chunk = [n // total for n in lengths]
            assert cu.tolist() == cu_seqlens_from_lengths(chunk).tolist()
            assert u.tolist() == [(c + 1) * n for n in chunk]
            assert m == max(lengths) // total
    # The whole zigzag local step: grouped attention of the two chunks equals causal
    # attention of the full sequences restricted to those rows.
    q = torch.randn(sum(lengths), 2, 16, generator=gen, dtype=torch.float64).to(DEVICE)
    k = torch.randn(sum(lengths), 1, 16, generator=gen, dtype=torch.float64).to(DEVICE)
    v = torch.randn(sum(lengths), 1, 16, generator=gen, dtype=torch.float64).to(DEVICE)
    full, _ = attention_varlen_ref(q, k, v, cu_k, cu_k, max(lengths), max(lengths), causal=True)
    rank = world_size - 1
    chunks = [rank, total - 1 - rank]
    cu_q, used, max_q = zigzag_group_ranges(cu_k, max(lengths), chunks, total)
    starts = cu_k[:-1].tolist()
    rows = [[s + c * (n // total) + j for s, n in zip(starts, lengths) for j in range(n // total)] for c in chunks]
    outs, _ = grouped_flash_attn_varlen_func([q[r].float() for r in rows], k.float(), v.float(), cu_q, cu_k, used,
                                             max_q, max(lengths))
    for out, r in zip(outs, rows):
        torch.testing.assert_close(out.double(), full[r], rtol=1e-5, atol=1e-5)


def test_zigzag_group_ranges_rejects_indivisible_lengths():
    cu_k = cu_seqlens_from_lengths([8, 6])
    with pytest.raises(ValueError, match=r"cu_seqlens_k: 1 sequence length\(s\) are not multiples of 4 \(e.g. 6\)"):
        zigzag_group_ranges(cu_k, 8, [0, 3], 4)
    with pytest.raises(ValueError, match=r"chunk_indices: got 4; expected ints in \[0, 4\)"):
        zigzag_group_ranges(cu_seqlens_from_lengths([8, 4]), 8, [0, 4], 4)


@pytest.mark.parametrize(
    "args,exc,pattern",
    [
        ((8, [0], True), ValueError, r"total_chunks: got True; expected a positive int"),
        ((8, [True], 4), ValueError, r"chunk_indices: got True; expected ints in \[0, 4\)"),
        ((None, [0, 3], 4), TypeError, r"max_seqlen_k: expected an int, got None"),
        ((4, [0, 3], 4), ValueError, r"max_seqlen_k: got 4 but the longest sequence in cu_seqlens_k has 8 tokens"),
    ],
)
def test_zigzag_group_ranges_names_bad_arguments(args, exc, pattern):
    """Each bad argument is refused by name: a bool chunk count or index was read as 1, a
    None max_seqlen_k failed in arithmetic, and one too small surfaced only later as a
    group's max_seqlen_q."""
    with pytest.raises(exc, match=pattern):
        zigzag_group_ranges(cu_seqlens_from_lengths([8, 4], DEVICE), *args)
    cu_q, used, max_q = zigzag_group_ranges(cu_seqlens_from_lengths([8, 4], DEVICE), 8, [np.int64(3)], np.int64(4))
    assert used[0].tolist() == [8, 4] and max_q == [2]


@pytest.mark.parametrize("group_order", configs.GROUP_ORDERS)
def test_grouped_split_kv_block_shapes_and_order(gen, group_order):
    case = GroupedCase(gen, [70, 9], [[5, 9], [35, 2]], [[70, 9], [40, 0]], h=2, hk=1)
    fwd = configs.KernelConfig(16, 32, 4, 1, group_order=group_order)
    dq = configs.KernelConfig(16, 32, 4, 1, group_order=group_order)
    with configs.override(num_splits=3, fwd=fwd, dq=dq, dkdv=configs.KernelConfig(32, 16, 4, 1)):
        check_attention(case.grouped, case.reference, case.inputs(), torch.float32, extra=(True,))


@pytest.mark.parametrize(
    "change,exc,pattern",
    [
        (dict(q_list="x"), TypeError, r"q_list: expected a non-empty list of tensors, got str"),
        (dict(seqused_k_list=[None]), ValueError, r"seqused_k_list: expected a list of 2 entries .*got 1"),
        (dict(max_seqlen_q_list=[8, 2]), ValueError, r"group 1: max_seqlen_q: got 2 but the longest sequence in cu_seqlens_q has 8 tokens"),
        (dict(cu_seqlens_q_list="bad-group-1"), ValueError, r"group 1: cu_seqlens_q: last entry is 11; expected the token count 16"),
        (dict(seqused_k_list="too-long"), ValueError, r"group 0: seqused_k: an entry exceeds its sequence's key count by 1"),
        (dict(q_list="heads"), ValueError, r"group 1: k: nheads_k=2 must divide q's nheads=3"),
        # Refused by name before the device check read .device (an AttributeError before).
        (dict(q_list="not-a-tensor"), TypeError, r"group 1: q: expected a torch.Tensor, got str"),
        (dict(v=[0.0]), TypeError, r"group 0: v: expected a torch.Tensor, got list"),
    ],
)
def test_grouped_bad_inputs(gen, change, exc, pattern):
    case = GroupedCase(gen, ZIGZAG_W2["k_lengths"], ZIGZAG_W2["q_lengths"], ZIGZAG_W2["used"])
    args = dict(
        q_list=case.split(case.q64.half()), k=case.k64.half(), v=case.v64.half(), cu_seqlens_q_list=case.cu_q,
        cu_seqlens_k=case.cu_k, seqused_k_list=case.used, max_seqlen_q_list=case.max_q, max_seqlen_k=case.max_k,
    )
    for key, value in change.items():
        if value == "bad-group-1":
            value = [case.cu_q[0], cu_seqlens_from_lengths([8, 3, 0], DEVICE)]
        elif value == "too-long":
            value = [torch.tensor([33, 3, 5], dtype=torch.int32, device=DEVICE), case.used[1]]
        elif value == "heads":
            value = [args["q_list"][0], torch.randn(16, 3, 16, device=DEVICE).half()]
        elif value == "not-a-tensor":
            value = [args["q_list"][0], "q"]
        args[key] = value
    with pytest.raises(exc, match=pattern):
        grouped_flash_attn_varlen_func(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_grouped_zigzag_real_size_gpu(gen, dtype):
    """The zigzag local step at a real size: world size 4, rank 1, Llama-3 heads, mixed lengths."""
    world, rank = 4, 1
    lengths = [4096, 1024, 2048, 512]
    cu_k = cu_seqlens_from_lengths(lengths, DEVICE)
    cu_q, used, max_q = zigzag_group_ranges(cu_k, max(lengths), [rank, 2 * world - 1 - rank], 2 * world)
    chunk = [n // (2 * world) for n in lengths]
    case = GroupedCase(gen, lengths, [chunk, chunk], [u.tolist() for u in used], h=32, hk=8, d=128)
    check_attention(case.grouped, case.reference, case.inputs(), dtype, extra=(True,))


def test_global_order_falls_back_where_the_grid_would_pass_cuda_limits():
    from dataclasses import replace

    prob = AttnProblem(batch=40000, nheads=4, nheads_k=2, headdim=64, max_seqlen_q=8, max_seqlen_k=8,
                       is_varlen=True, softmax_scale=1.0, causal=True, window_left=-1, window_right=0,
                       softcap=0.0, num_groups=2)
    cfg = configs.KernelConfig(16, 32, 4, 1)
    assert configs.fit_grid(cfg, prob).group_order == "head"  # 80000 > 65535 on axis 2
    assert max(configs.program_grid(configs.fit_grid(cfg, prob), 3, prob)[1:]) <= configs.MAX_GRID_YZ
    assert configs.fit_grid(cfg, replace(prob, num_groups=1)).group_order == "global"
    with pytest.raises(ValueError, match=r"batch \(sequences per call\): got 70000; the kernels take at most 65535"):
        configs.fit_grid(cfg, replace(prob, batch=70000))
