"""The flash-attn import shim (tests/flash_attn_shim) that runs flash-attn's own tests against
ringflash: its own helpers (bert_padding, rotary, the S_dmask restatement) and that
``import flash_attn`` on its path gives ringflash's functions. CPU only, fast."""

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

import ringflash

SHIM = Path(__file__).resolve().parent / "flash_attn_shim"


@pytest.fixture(scope="module")
def fa():
    """The shim's modules, imported with the shim first on sys.path, then removed again (so
    nothing else in this process, e.g. transformers' flash-attn probe, sees a flash_attn)."""
    saved = {name: mod for name, mod in sys.modules.items() if name == "flash_attn" or name.startswith("flash_attn.")}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(SHIM))
    try:
        mods = {name: importlib.import_module(f"flash_attn{name}") for name in
                ("", ".bert_padding", ".flash_attn_interface", ".layers.rotary")}
        yield mods
    finally:
        sys.path.remove(str(SHIM))
        for name in [n for n in sys.modules if n == "flash_attn" or n.startswith("flash_attn.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_import_flash_attn_gives_ringflash(fa):
    root = fa[""]
    assert Path(root.__file__).resolve().is_relative_to(SHIM)
    assert root.flash_attn_with_kvcache is ringflash.flash_attn_with_kvcache
    for name in ("flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
                 "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func"):
        assert getattr(root, name).__wrapped__ is getattr(ringflash, name), name
        assert getattr(root, name) is getattr(fa[".flash_attn_interface"], name)
    assert fa[".flash_attn_interface"].USE_TRITON_ROCM is False
    assert callable(fa[".bert_padding"].index_first_axis) and callable(fa[".layers.rotary"].apply_rotary_emb)


def test_pad_unpad_round_trip_with_an_empty_sequence(fa):
    bp = fa[".bert_padding"]
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    x = torch.randn(4, 5, 3, 2, requires_grad=True)
    packed, indices, cu, max_seqlen, seqused = bp.unpad_input(x, mask)
    assert packed.shape == (9, 3, 2) and indices.tolist() == [0, 1, 2, 10, 11, 12, 13, 14, 15]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 3, 8, 9]
    assert max_seqlen == 5 and isinstance(max_seqlen, int)
    assert seqused.dtype == torch.int32 and seqused.tolist() == [3, 0, 5, 1]
    assert torch.equal(bp.index_first_axis(x.reshape(20, 3, 2), indices), packed)
    back = bp.pad_input(packed, indices, 4, 5)
    assert torch.equal(back, x * mask[:, :, None, None])
    back.sum().backward()
    assert torch.equal(x.grad, mask[:, :, None, None].float().expand_as(x))
    # unused_mask: packed as well, but not counted in seqused.
    unused = torch.zeros_like(mask)
    unused[1, :2] = True
    _, indices2, cu2, max2, seqused2 = bp.unpad_input(x, mask, unused)
    assert cu2.tolist() == [0, 3, 5, 10, 11] and seqused2.tolist() == [3, 0, 5, 1] and 5 in indices2.tolist()
    # A batch of empty sequences.
    none = bp.unpad_input(x, torch.zeros_like(mask))
    assert none[0].shape == (0, 3, 2) and none[2].tolist() == [0] * 5 and none[3] == 0
    assert torch.equal(bp.pad_input(none[0], none[1], 4, 5), torch.zeros_like(x))


def _rotary_f64(x, angle, positions, rotary_dim, interleaved):
    """float64 reference: each rotated pair as a complex number times exp(i * angle[position]),
    positions past the table unrotated. x (..., n, heads, d), positions (..., n)."""
    x = x.double()
    head, tail = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        z = torch.complex(head[..., 0::2], head[..., 1::2])
    else:
        z = torch.complex(head[..., :rotary_dim // 2], head[..., rotary_dim // 2:])
    inside = positions < angle.shape[0]
    theta = torch.where(inside[..., None], angle[positions.clamp_max(angle.shape[0] - 1)], 0.0)
    z = z * torch.polar(torch.ones_like(theta), theta)[..., None, :]
    if interleaved:
        rotated = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    else:
        rotated = torch.cat((z.real, z.imag), dim=-1)
    return torch.cat((rotated, tail), dim=-1)


@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rotary_emb_against_float64(fa, interleaved):
    apply_rotary_emb = fa[".layers.rotary"].apply_rotary_emb
    torch.manual_seed(0)
    batch, seqlen, heads, d, rotary_dim, seqlen_ro = 3, 7, 2, 20, 12, 12
    angle = torch.rand(seqlen_ro, rotary_dim // 2, dtype=torch.float64) * 2 * math.pi
    cos, sin = torch.cos(angle).float(), torch.sin(angle).float()
    x = torch.randn(batch, seqlen, heads, d)
    steps = torch.arange(seqlen)
    # int offset; tensor offsets (the last sequence runs past the table: those stay unrotated).
    for offsets in (2, torch.tensor([0, 3, 9], dtype=torch.int32)):
        positions = steps[None, :] + (offsets.long()[:, None] if isinstance(offsets, torch.Tensor) else offsets)
        ref = _rotary_f64(x, angle, positions.expand(batch, seqlen), rotary_dim, interleaved)
        out = apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)
        assert out.dtype == x.dtype and out.shape == x.shape
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])
    # Packed sequences (one empty) with cu_seqlens equal the padded call on each sequence.
    lengths = [4, 0, 7, 2]
    cu = torch.tensor([0, 4, 4, 11, 13], dtype=torch.int32)
    packed = torch.randn(13, heads, d)
    offsets = torch.tensor([1, 5, 0, 3], dtype=torch.int32)
    out = apply_rotary_emb(packed, cos, sin, interleaved=interleaved, seqlen_offsets=offsets, cu_seqlens=cu,
                           max_seqlen=7)
    for b, n in enumerate(lengths):
        seq = packed[cu[b]:cu[b] + n][None]
        ref = _rotary_f64(seq, angle, (torch.arange(n) + offsets[b])[None], rotary_dim, interleaved)[0]
        torch.testing.assert_close(out[cu[b]:cu[b] + n].double(), ref, atol=1e-5, rtol=1e-5)
    # In place: the same tensor comes back, rotated.
    y = x.clone()
    assert apply_rotary_emb(y, cos, sin, interleaved=interleaved, inplace=True) is y
    torch.testing.assert_close(y, apply_rotary_emb(x, cos, sin, interleaved=interleaved))


def test_s_dmask_restated_for_one_key_block(fa):
    """flash-attn's tests turn S_dmask into probabilities with S * exp(m_j - lse) over key
    blocks of _get_block_size_n() keys; the shim's one-block restatement makes that give back
    ringflash's probabilities (signs, i.e. the dropout mask, kept)."""
    iface = fa[".flash_attn_interface"]
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 5, 40, dtype=torch.float64) * 3
    scores[0, 0, 1] = float("-inf")  # a row that sees no key
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    keep = torch.rand(probs.shape) > 0.2
    s_dmask = torch.where(keep, probs, -probs)
    restated = iface._as_one_block_s_dmask(s_dmask)
    block = iface._get_block_size_n(torch.device("cpu"), 64, True, False)
    assert block >= scores.shape[-1]
    (only,) = scores.split(block, dim=-1)  # the tests' per-block bookkeeping, one block
    lse = torch.logsumexp(only, dim=-1, keepdim=True)
    lse[lse == float("-inf")] = float("inf")
    recovered = restated * torch.exp(only.amax(dim=-1, keepdim=True) - lse)
    torch.testing.assert_close(recovered, s_dmask)
    assert torch.equal(restated >= 0, s_dmask >= 0) and torch.all(restated[0, 0, 1] == 0)
