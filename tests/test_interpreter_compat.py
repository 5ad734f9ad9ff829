"""ringflash.kernels.interpreter_compat's speed change to Triton's interpreter: helpers
called from inside a running kernel are not re-patched. Results must be bit-identical to
the interpreter's own behaviour, and triton.language must be restored after a launch."""

import pytest
import torch

from ringflash.kernels import common as kernels_common  # importing the kernels installs the change
from conftest import INTERPRETING

pytestmark = pytest.mark.skipif(not INTERPRETING, reason="about Triton's interpreter (CPU runs)")


def _run(gen_seed: int):
    from ringflash import flash_attn_varlen_func

    g = torch.Generator().manual_seed(gen_seed)
    q, k, v = (torch.randn(37, 4, 24, generator=g, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 17, 18, 37], dtype=torch.int32)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu, cu, 19, 19, causal=True, window_size=(5, 0), softcap=2.0,
                                         return_attn_probs=True)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, generator=g))
    return (out, lse, *grads)


def test_same_results_with_and_without_the_change_and_the_language_is_restored(monkeypatch):
    import triton.language as tl
    from triton.runtime import interpreter

    assert kernels_common.interpreting()
    fast = interpreter._patch_lang
    assert getattr(fast, "_ringflash_fast", False), "the speed change is not installed"
    builtins_before = (tl.load, tl.dot, tl.core.load, tl.tensor.__add__)
    with_change = _run(0)
    assert (tl.load, tl.dot, tl.core.load, tl.tensor.__add__) == builtins_before
    monkeypatch.setattr(interpreter, "_patch_lang", fast._ringflash_original)
    without = _run(0)
    for a, b in zip(with_change, without):
        assert torch.equal(a, b)


def test_results_do_not_depend_on_the_skipped_overflow_checks(monkeypatch):
    """tests/interpreter_options.py turns the interpreter's (dead) int32 overflow checks off
    for CI time; the kernels' results are the same bit for bit with them on."""
    import dataclasses

    from triton.runtime import interpreter

    import interpreter_options

    builder = interpreter.interpreter_builder
    if not interpreter_options.skip_dead_overflow_checks():
        pytest.skip("this Triton's interpreter keeps its overflow checks (they can fail a run)")
    assert not builder.options.sanitize_overflow
    without = _run(1)
    monkeypatch.setattr(builder, "options", dataclasses.replace(builder.options, sanitize_overflow=True))
    with_checks = _run(1)
    for a, b in zip(with_checks, without):
        assert torch.equal(a, b)
