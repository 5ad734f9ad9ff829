"""Every bad input raises a ValueError/TypeError naming the argument, the value and what was expected.

The public entry points are listed once in DENSE_FUNCS / VARLEN_FUNCS; each bad case runs
against all of them."""

import pytest
import torch

from conftest import HAS_CUDA, cu_seqlens_from_lengths
from ringflash import (
    FlashAttentionPyTorchFunc,
    attention_ref,
    attention_varlen_ref,
    flash_attn_func,
    flash_attn_varlen_func,
)

DENSE_FUNCS = {
    "attention_ref": lambda q, k, v, **kw: attention_ref(q, k, v, **kw),
    "flash_attn_func": lambda q, k, v, **kw: flash_attn_func(q, k, v, **kw),
}
VARLEN_FUNCS = {"attention_varlen_ref": attention_varlen_ref, "flash_attn_varlen_func": flash_attn_varlen_func}


def _dense(b=2, sq=5, sk=7, h=4, hk=2, d=16, dtype=torch.float32):
    return torch.randn(b, sq, h, d, dtype=dtype), torch.randn(b, sk, hk, d, dtype=dtype), torch.randn(b, sk, hk, d, dtype=dtype)


DENSE_CASES = {
    "q rank": (lambda: (torch.randn(2, 5, 16), *_dense()[1:]), ValueError, r"q: expected a 4-D tensor .*got a 3-D tensor of shape \(2, 5, 16\)"),
    "k rank": (lambda: (_dense()[0], torch.randn(7, 2, 16), _dense()[2]), ValueError, r"k: expected a 4-D tensor"),
    "batch": (lambda: (_dense(b=3)[0], *_dense()[1:]), ValueError, r"k: batch 2 differs from q's batch 3"),
    "v shape": (lambda: (*_dense()[:2], torch.randn(2, 6, 2, 16)), ValueError, r"v: shape \(2, 6, 2, 16\) does not match k's"),
    "headdim k": (lambda: (_dense(d=8)[0], *_dense()[1:]), ValueError, r"k: head dim 16 differs from q's head dim 8; expected 8"),
    "headdim v": (lambda: (*_dense()[:2], torch.randn(2, 7, 2, 8)), ValueError, r"v: head dim 8 differs from q's head dim 16"),
    "heads": (lambda: (_dense(h=3)[0], *_dense()[1:]), ValueError, r"k: nheads_k=2 must divide q's nheads=3"),
    "dtype": (lambda: tuple(t.to(torch.int64) for t in _dense()), TypeError, r"q: dtype torch.int64 is not supported; expected one of"),
    "mixed dtype": (lambda: (_dense()[0], *(t.double() for t in _dense()[1:])), TypeError, r"k: dtype torch.float64 differs from q's dtype torch.float32"),
    "device": (lambda: (_dense()[0], _dense()[1].to("meta"), _dense()[2]), ValueError, r"k: is on device meta but q is on cpu"),
    "headdim 0": (lambda: _dense(d=0), ValueError, r"q: head dim 0 is not supported"),
}


@pytest.mark.parametrize("func", list(DENSE_FUNCS), ids=list(DENSE_FUNCS))
@pytest.mark.parametrize("case", list(DENSE_CASES), ids=list(DENSE_CASES))
def test_dense_bad_inputs(func, case):
    make, exc, pattern = DENSE_CASES[case]
    with pytest.raises(exc, match=pattern):
        DENSE_FUNCS[func](*make())


@pytest.mark.parametrize("func", list(DENSE_FUNCS), ids=list(DENSE_FUNCS))
@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        ({"window_size": (3,)}, TypeError, r"window_size: expected a pair of ints"),
        ({"window_size": (-2, 0)}, ValueError, r"window_size: left=-2 is invalid"),
        ({"softcap": -1.0}, ValueError, r"softcap: got -1.0; expected 0"),
        ({"softmax_scale": "x"}, TypeError, r"softmax_scale: expected a float or None, got str"),
    ],
)
def test_dense_bad_options(func, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        DENSE_FUNCS[func](*_dense(), **kwargs)


def _varlen(lengths=(3, 4), k_lengths=(5, 2), h=4, hk=2, d=16):
    q = torch.randn(sum(lengths), h, d)
    k = torch.randn(sum(k_lengths), hk, d)
    v = torch.randn(sum(k_lengths), hk, d)
    return dict(
        q=q, k=k, v=v,
        cu_seqlens_q=cu_seqlens_from_lengths(lengths), cu_seqlens_k=cu_seqlens_from_lengths(k_lengths),
        max_seqlen_q=max(lengths), max_seqlen_k=max(k_lengths),
    )


def _with(**changes):
    def make():
        args = _varlen()
        for key, fn in changes.items():
            args[key] = fn(args)
        return args
    return make


VARLEN_CASES = {
    "q rank": (_with(q=lambda a: a["q"].unsqueeze(0)), ValueError, r"q: expected a 3-D tensor \(total_q, nheads, headdim\)"),
    "cu int64": (_with(cu_seqlens_q=lambda a: a["cu_seqlens_q"].long()), TypeError, r"cu_seqlens_q: dtype torch.int64 is not supported; expected int32"),
    "cu 2-D": (_with(cu_seqlens_k=lambda a: a["cu_seqlens_k"].unsqueeze(0)), ValueError, r"cu_seqlens_k: expected a 1-D tensor \(batch \+ 1,\), got shape \(1, 3\)"),
    "cu decreasing": (_with(cu_seqlens_q=lambda a: torch.tensor([0, 5, 3, 7], dtype=torch.int32), cu_seqlens_k=lambda a: torch.tensor([0, 3, 3, 7], dtype=torch.int32)), ValueError, r"cu_seqlens_q: is not non-decreasing"),
    "cu start": (_with(cu_seqlens_q=lambda a: torch.tensor([1, 3, 7], dtype=torch.int32)), ValueError, r"cu_seqlens_q: starts at 1; expected 0"),
    "cu last": (_with(cu_seqlens_k=lambda a: torch.tensor([0, 5, 6], dtype=torch.int32)), ValueError, r"cu_seqlens_k: last entry is 6; expected the token count 7"),
    "cu batch": (_with(cu_seqlens_k=lambda a: torch.tensor([0, 7], dtype=torch.int32)), ValueError, r"cu_seqlens_k: has 2 entries but cu_seqlens_q has 3"),
    "max_seqlen": (_with(max_seqlen_q=lambda a: 3), ValueError, r"max_seqlen_q: got 3 but the longest sequence in cu_seqlens_q has 4 tokens; expected >= 4"),
    "heads": (_with(q=lambda a: torch.randn(7, 3, 16)), ValueError, r"k: nheads_k=2 must divide q's nheads=3"),
    "headdim": (_with(k=lambda a: torch.randn(7, 2, 8), v=lambda a: torch.randn(7, 2, 8)), ValueError, r"k: head dim 8 differs from q's head dim 16"),
    "dtype": (_with(q=lambda a: a["q"].half()), TypeError, r"k: dtype torch.float32 differs from q's dtype torch.float16"),
    "device": (_with(cu_seqlens_q=lambda a: a["cu_seqlens_q"].to("meta")), ValueError, r"cu_seqlens_q: is on device meta but q is on cpu"),
    "seqused dtype": (_with(seqused_k=lambda a: torch.tensor([1, 1])), TypeError, r"seqused_k: dtype torch.int64 is not supported; expected int32"),
    "seqused too big": (_with(seqused_k=lambda a: torch.tensor([1, 3], dtype=torch.int32)), ValueError, r"seqused_k: an entry exceeds its sequence's key count by 1"),
}


@pytest.mark.parametrize("func", list(VARLEN_FUNCS), ids=list(VARLEN_FUNCS))
@pytest.mark.parametrize("case", list(VARLEN_CASES), ids=list(VARLEN_CASES))
def test_varlen_bad_inputs(func, case):
    make, exc, pattern = VARLEN_CASES[case]
    with pytest.raises(exc, match=pattern):
        VARLEN_FUNCS[func](**make())


def test_varlen_good_inputs_pass():
    device = "cuda" if HAS_CUDA else "cpu"  # compiled kernels take only CUDA tensors
    for func in VARLEN_FUNCS.values():
        func(**{name: x.to(device) if torch.is_tensor(x) else x for name, x in _varlen().items()})


@pytest.mark.parametrize(
    "make,exc,pattern",
    [
        (lambda: (torch.randn(2, 5, 1, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)), ValueError, r"Q: expected a 3-D tensor \(batch, n_queries, d\)"),
        (lambda: (torch.randn(2, 5, 8), torch.randn(3, 5, 8), torch.randn(3, 5, 8)), ValueError, r"K, V: batch 3, 3 differ from Q's batch 2"),
        (lambda: (torch.randn(2, 5, 8), torch.randn(2, 5, 4), torch.randn(2, 5, 8)), ValueError, r"K: head dim 4 differs from Q's head dim 8"),
        (lambda: (torch.randn(2, 5, 8), torch.randn(2, 6, 8), torch.randn(2, 5, 8)), ValueError, r"V: has 5 keys but K has 6"),
        (lambda: (torch.randn(2, 5, 8).int(), torch.randn(2, 5, 8).int(), torch.randn(2, 5, 8).int()), TypeError, r"Q: dtype torch.int32 is not supported"),
    ],
)
def test_pytorch_fa2_bad_inputs(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        FlashAttentionPyTorchFunc.apply(*make(), False)


def test_window_size_as_an_integer_tensor_or_array():
    """flash-attn's tests pass window_size as a 2-element integer tensor."""
    import numpy as np

    from ringflash.validation import check_window

    assert check_window(torch.tensor([3, -1])) == (3, -1)
    assert check_window(np.array([2, 5], dtype=np.int64)) == (2, 5)
    for bad in (torch.tensor([1.0, 2.0]), torch.tensor([1, 2, 3]), torch.tensor([True, False])):
        with pytest.raises(TypeError, match="window_size: expected a pair of ints"):
            check_window(bad)
