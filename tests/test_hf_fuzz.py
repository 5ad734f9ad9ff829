"""More checks of the transformers integration ("ringattn") against transformers' eager
attention, on tiny float32 models: static-cache generation, cross-attention, torch.compile
with an all-ones mask (each once a silent wrong result), and properties (the dropout mask
is one mask, scaled, in forward and backward; Gemma2 softcapping with alternating sliding
windows; ModernBERT's bidirectional windows; chunked prefill through a hybrid cache)."""

import copy
import types

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="4.53")

from ringflash.integrations import hf as rf_hf  # noqa: E402

#: Where the models and inputs live: on a GPU machine ringflash's kernels refuse CPU tensors
#: (Triton's interpreter runs them only where there is no GPU). Inputs are drawn on the CPU
#: and moved, so a case is the same on both.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VOCAB = 50
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(autouse=True)
def _exact_fp32(monkeypatch):
    monkeypatch.setenv("RINGFLASH_FP32_PRECISION", "ieee")


def _model(arch: str, attn: str, **overrides):
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    if arch == "llama":
        config, cls = LlamaConfig(**SIZES, **overrides), LlamaForCausalLM
    elif arch == "gemma2":  # softcapping, layer 0 sliding (window 5), layer 1 full
        config = Gemma2Config(**{"head_dim": 16, "sliding_window": 5, "attn_logit_softcapping": 2.0,
                                 "final_logit_softcapping": None, "query_pre_attn_scalar": 9, **SIZES, **overrides})
        cls = Gemma2ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(0)
    model = cls(copy.deepcopy(config)).eval().to(DEVICE)
    model.set_attn_implementation(attn)
    return model


def _dev(*tensors: torch.Tensor):
    """The tensors on DEVICE (one tensor alone, or a tuple)."""
    moved = tuple(t.to(DEVICE) for t in tensors)
    return moved[0] if len(moved) == 1 else moved


def _close(got, want, what, tol=1e-4):
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= tol * max(scale, 1.0), f"{what}: max |diff| {err:.3e} (scale {scale:.3e})"


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(model_ref, model_ours, out_ref, out_ours, weight, what):
    _close(out_ours * (weight != 0).any(-1, keepdim=True), out_ref * (weight != 0).any(-1, keepdim=True),
           f"{what} logits")
    ref_grads, our_grads = _grads(model_ref, (out_ref * weight).sum()), _grads(model_ours, (out_ours * weight).sum())
    assert ref_grads.keys() == our_grads.keys()
    for name in ref_grads:
        _close(our_grads[name], ref_grads[name], f"{what} grad {name}")


# ---------------------------------------------------------------- regressions (real bugs)

@pytest.mark.parametrize("arch,batch", [("llama", 1), ("llama", 2), ("gemma2", 2)])
def test_static_cache_generation_matches_eager(arch, batch):
    """generate(cache_implementation="static"): transformers drops an all-ones attention
    mask unless the implementation's name contains "flash" (generation/utils.py keeps it
    only for is_flash_attention_requested), so ringattn got mask=None with keys of the
    whole static cache, unfilled (zero) slots included, and attended to them. The mask
    builder now marks the filled slots. With padding (batch 2) the mask is kept and
    narrower than the keys; Gemma2 mixes a static sliding-window layer in."""
    ref, ours = _model(arch, "eager"), _model(arch, rf_hf.register())
    ids = torch.randint(1, VOCAB, (batch, 6), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(batch, 6, dtype=torch.long)
    mask[1:, :2] = 0
    ids, mask = _dev(ids, mask)
    # disable_compile: on a GPU, generate compiles the forward for a static cache by itself
    # (CUDA graphs); this test is of the eager mask builder on every device, and the mask a
    # compiled graph gets is test_unfilled_slots_marked_in_the_mask's.
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, output_logits=True, attention_mask=mask,
                  return_dict_in_generate=True, cache_implementation="static", disable_compile=True)
    with torch.no_grad():
        want = torch.stack(ref.generate(ids, **kwargs).logits)
        got = torch.stack(ours.generate(ids, **kwargs).logits)
    _close(got, want, "static-cache step logits")


def test_unfilled_slots_marked_in_the_mask():
    """The mask a compiled graph gets for a static cache without padding: kv_length columns,
    the unfilled slots ``UNFILLED``. The queries are the q_len positions before the first
    unfilled slot (not the mask's last columns); a marker that does not end every row is
    refused."""
    from ringflash.integrations.hf_layout import UNFILLED

    layer = types.SimpleNamespace(is_causal=True)
    gen = torch.Generator().manual_seed(2)
    filled, cache_len = 6, 10
    q = torch.randn(2, 4, 2, 16, generator=gen)
    k, v = (torch.randn(2, 2, cache_len, 16, generator=gen) for _ in range(2))
    mask = torch.full((2, cache_len), UNFILLED, dtype=torch.int8)
    mask[:, :filled] = 1
    mask[1, :3] = 0
    q, k, v, mask = _dev(q, k, v, mask)
    want = torch.cat([rf_hf.attention_forward(layer, q[i:i + 1], k[i:i + 1, :, start:filled],
                                              v[i:i + 1, :, start:filled], None)[0] for i, start in ((0, 0), (1, 3))])
    got, _ = rf_hf.attention_forward(layer, q, k, v, mask)
    _close(got, want, "out")
    mask[0, 8] = 1
    with pytest.raises(ValueError, match="unfilled key slots"):
        rf_hf.attention_forward(layer, q, k, v, mask)


def test_padding_mask_shorter_than_keys_ignores_trailing_slots():
    """A static cache hands attention keys of max_cache_len with a 2D mask of the tokens
    seen so far (shorter): transformers' flash path slices the keys to the mask's width
    (_upad_input). hf_layout unpads a (batch, L) mask into indices of a (batch * L) layout
    but gathers keys from (batch * kv_len) rows, so every row after the first reads
    another row's keys."""
    layer = types.SimpleNamespace(is_causal=True)
    gen = torch.Generator().manual_seed(0)
    seen, cache_len = 5, 8
    q = torch.randn(2, 4, seen, 16, generator=gen)
    k, v = (torch.randn(2, 2, cache_len, 16, generator=gen) for _ in range(2))
    mask = torch.ones(2, seen, dtype=torch.bool)
    mask[0, :2] = False
    q, k, v, mask = _dev(q, k, v, mask)
    want, _ = rf_hf.attention_forward(layer, q, k[:, :, :seen], v[:, :, :seen], mask)
    got, _ = rf_hf.attention_forward(layer, q, k, v, mask)
    keep = mask[..., None, None]
    _close(got * keep, want * keep, "out")


@pytest.mark.parametrize("q_len", [1, 3, 5, 7])
def test_cross_attention_keeps_every_query_with_a_padded_encoder_mask(q_len):
    """Cross-attention (is_causal False; BERT/BART-style decoders): the 2D mask is the
    encoder's, over the keys. hf_layout takes the queries' padding from its last q_len
    columns, so a decoder token is dropped (out = 0) wherever the encoder row ends in
    padding, and q_len > kv_len indexes queries with a mask of the wrong width.
    transformers' flash path keeps every query when q_len == 1."""
    # Queries as many as keys: the module must say it is cross-attention (BERT's does).
    layer = types.SimpleNamespace(is_causal=False, is_cross_attention=q_len == 5)
    gen = torch.Generator().manual_seed(1)
    enc_len = 5
    q = torch.randn(2, 4, q_len, 16, generator=gen)
    k, v = (torch.randn(2, 2, enc_len, 16, generator=gen) for _ in range(2))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    q, k, v, mask = _dev(q, k, v, mask)
    got, _ = rf_hf.attention_forward(layer, q, k, v, mask)
    for row in range(2):
        n = int(mask[row].sum())
        want, _ = rf_hf.attention_forward(layer, q[row:row + 1], k[row:row + 1, :, :n], v[row:row + 1, :, :n], None)
        _close(got[row:row + 1], want, f"row {row}")
    with pytest.raises(NotImplementedError, match="sliding_window: got 3 for cross-attention"):
        rf_hf.attention_forward(layer, q, k, v, mask, sliding_window=3)


def test_compiled_packed_batch_with_all_ones_mask_matches_uncompiled():
    """Packed documents (position_ids restarting at 0) with an all-ones attention_mask:
    uncompiled, transformers' flash mask builder turns the mask into None and ringattn
    separates the documents; compiled, _padding_mask_builder always returns the 2D mask,
    the mask path ignores position_ids (and cu_seq_lens), and documents attend to each
    other."""
    ours = _model("llama", rf_hf.register())
    ids = _dev(torch.randint(1, VOCAB, (1, 21), generator=torch.Generator().manual_seed(2)))
    kwargs = dict(position_ids=_dev(torch.cat([torch.arange(8), torch.arange(13)])[None]),
                  attention_mask=_dev(torch.ones(1, 21, dtype=torch.long)), use_cache=False)
    with torch.no_grad():
        want = ours(ids, **kwargs).logits
        torch._dynamo.reset()
        got = torch.compile(ours, backend="aot_eager")(ids, **kwargs).logits
    torch._dynamo.reset()
    _close(got, want, "compiled vs uncompiled logits")


# ---------------------------------------------------------------- properties that hold

@pytest.mark.parametrize("path", ["dense", "padded", "packed position_ids", "packed cu_seq_lens"])
def test_dropout_is_one_scaled_mask_in_forward_and_backward(path):
    """With V the identity (head_dim = seqlen), out is the dropped probability matrix:
    every entry is 0 or P/(1-p), about 1-p of them kept; the gradients equal autograd's
    through softmax(QK^T) * keep / (1-p) with that recovered keep mask."""
    p, n, d = 0.4, 16, 16
    layer = types.SimpleNamespace(is_causal=True)
    gen = torch.Generator().manual_seed(11)
    batch = 2 if path == "padded" else 1
    q = _dev(torch.randn(batch, 4, n, d, generator=gen)).requires_grad_()
    k = _dev(torch.randn(batch, 2, n, d, generator=gen)).requires_grad_()
    v = torch.eye(n, device=DEVICE).expand(batch, 2, n, d).contiguous().requires_grad_()
    allowed = torch.ones(n, n, dtype=torch.bool, device=DEVICE).tril().expand(batch, 1, n, n).clone()
    valid = torch.ones(batch, n, dtype=torch.bool, device=DEVICE)
    mask, kwargs = None, {}
    if path == "padded":
        valid[1, :5] = False
        mask = valid.long()
        allowed &= valid[:, None, None, :] & valid[:, None, :, None]
    elif path.startswith("packed"):
        kwargs["position_ids"] = _dev(torch.cat([torch.arange(6), torch.arange(10)])[None])
        doc = _dev(torch.tensor([0] * 6 + [1] * 10))
        allowed &= doc[:, None] == doc[None, :]
        if path.endswith("cu_seq_lens"):
            cu = _dev(torch.tensor([0, 6, 16]))
            kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=10, max_length_k=10)
    torch.manual_seed(123)
    out, _ = rf_hf.attention_forward(layer, q, k, v, mask, dropout=p, **kwargs)
    out = out.transpose(1, 2)  # (batch, heads, n, n): the dropped probabilities

    def probs(q_, k_):
        s = q_ @ k_.repeat_interleave(2, 1).transpose(-1, -2) * d ** -0.5
        return torch.nan_to_num(torch.softmax(s.masked_fill(~allowed, float("-inf")), -1))

    probs_ref = probs(q, k).detach()
    rows = valid[:, None, :, None].expand_as(probs_ref)
    live = (probs_ref > 1e-6) & rows
    ratio = out.detach()[live] / probs_ref[live]
    kept = (ratio - 1 / (1 - p)).abs() < 1e-3
    assert (kept | (ratio.abs() < 1e-6)).all(), "an entry neither dropped nor scaled by 1/(1-p)"
    assert (out.detach()[~live & rows].abs() < 1e-6).all(), "weight outside the allowed keys"
    assert abs(kept.float().mean().item() - (1 - p)) < 0.12
    keep = torch.zeros_like(live)
    keep[live] = kept
    dout = _dev(torch.randn(out.shape, generator=gen)) * rows
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = (probs(q2, k2) * keep / (1 - p)) @ v2.repeat_interleave(2, 1)
    _close(out.detach() * rows, ref.detach() * rows, "out")
    for got, want, name in zip(grads, torch.autograd.grad(ref, (q2, k2, v2), dout), "qkv"):
        _close(got, want, f"d{name}")


@pytest.mark.parametrize("batch", ["left padded", "packed position_ids"])
def test_gemma2_softcap_and_alternating_windows_match_eager(batch):
    ref, ours = _model("gemma2", "eager"), _model("gemma2", rf_hf.register())
    gen = torch.Generator().manual_seed(5)
    if batch == "left padded":
        ids = torch.randint(1, VOCAB, (3, 19), generator=gen)
        mask = torch.ones(3, 19, dtype=torch.long)
        mask[1, :7] = 0
        mask[2, :18] = 0
        weight = torch.randn(3, 19, VOCAB, generator=gen) * mask[..., None]
        ids, mask, weight = _dev(ids, mask, weight)
        _compare(ref, ours, ref(ids, attention_mask=mask, use_cache=False).logits,
                 ours(ids, attention_mask=mask, use_cache=False).logits, weight, batch)
    else:
        lengths = [9, 1, 12]
        ids = _dev(torch.randint(1, VOCAB, (1, sum(lengths)), generator=gen))
        weight = _dev(torch.randn(1, sum(lengths), VOCAB, generator=gen))
        out_ref = torch.cat([ref(doc, use_cache=False).logits for doc in ids.split(lengths, 1)], 1)
        position_ids = _dev(torch.cat([torch.arange(n) for n in lengths])[None])
        _compare(ref, ours, out_ref, ours(ids, position_ids=position_ids).logits, weight, batch)


def test_modernbert_bidirectional_window_with_padding_matches_eager():
    """Non-causal attention with a symmetric window (ModernBERT passes sliding_window =
    half-window + 1) and right padding."""
    from transformers import ModernBertConfig, ModernBertModel

    config = ModernBertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=96, max_position_embeddings=128, local_attention=8,
                              global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              sep_token_id=2, cls_token_id=1,
                              # transformers 4.x compiles ModernBERT's MLP on a GPU unless told not to
                              reference_compile=False)
    models = []
    for attn in ("eager", rf_hf.register()):
        torch.manual_seed(0)
        models.append(ModernBertModel(copy.deepcopy(config)).eval().to(DEVICE))
        models[-1].set_attn_implementation(attn)
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(3, VOCAB, (2, 30), generator=gen)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, 22:] = 0
    weight = torch.randn(2, 30, 64, generator=gen) * mask[..., None]
    ids, mask, weight = _dev(ids, mask, weight)
    ref, ours = models
    _compare(ref, ours, ref(ids, attention_mask=mask).last_hidden_state,
             ours(ids, attention_mask=mask).last_hidden_state, weight, "modernbert")


def test_chunked_prefill_through_a_hybrid_cache_matches_eager():
    """Gemma2 (sliding and full layers), left padding, the prompt fed in chunks of 12, 5
    and 3 tokens through one DynamicCache: queries fewer than keys, bottom-right aligned
    per row, the sliding layers' cache shorter than the full ones'."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(1, VOCAB, (2, 20), generator=gen)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :3] = 0
    ids, mask = _dev(ids, mask)
    outs = []
    for attn in ("eager", rf_hf.register()):
        model = _model("gemma2", attn)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            outs.append(torch.cat([model(ids[:, a:b], attention_mask=mask[:, :b], past_key_values=cache,
                                         use_cache=True).logits for a, b in ((0, 12), (12, 17), (17, 20))], 1))
    keep = mask.bool()[..., None]
    _close(outs[1] * keep, outs[0] * keep, "chunked prefill logits")


def test_double_backward_through_the_layout_path_raises():
    """create_graph=True through a padded batch's custom op: its gradients have no graph, so
    a second-order use would silently lose this attention's term; it raises instead."""
    layer = types.SimpleNamespace(is_causal=True)
    gen = torch.Generator().manual_seed(3)
    q = _dev(torch.randn(2, 4, 6, 16, generator=gen)).requires_grad_()
    k, v = (_dev(torch.randn(2, 2, 6, 16, generator=gen)).requires_grad_() for _ in range(2))
    mask = _dev(torch.ones(2, 6, dtype=torch.long))
    mask[0, :2] = 0
    out, _ = rf_hf.attention_forward(layer, q, k, v, mask)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), (q, k, v), create_graph=True)


def test_mark_unfilled_slots_for_both_mask_builder_signatures():
    """``_mark_unfilled_slots`` reads the filled slots from transformers >= 5's (q_offset,
    q_length, kv_offset) and from 4.5x's cache_position; no cache or a full one gives no
    mask; a given mask passes through."""
    mark = rf_hf._mark_unfilled_slots
    new = dict(batch_size=2, q_length=3, kv_length=10, kv_offset=0, kwargs={"device": torch.device("cpu")})
    assert mark(None, {**new, "q_offset": 7}) is None  # a dynamic cache: 7 + 3 slots, all filled
    got = mark(None, {**new, "q_offset": 4})  # a static cache of 10 slots, 7 filled
    assert got.dtype == torch.bool and got.shape == (2, 7) and bool(got.all())
    got = mark(None, {**new, "q_offset": torch.tensor(4)})  # eager: the tensor offset is read
    assert got.shape == (2, 7)
    old = dict(batch_size=2, kv_length=10, kv_offset=0, kwargs={})
    assert mark(None, {**old, "cache_position": torch.arange(10)}) is None  # no cache
    got = mark(None, {**old, "cache_position": torch.arange(4, 7)})
    assert got.shape == (2, 7) and bool(got.all())
    given = torch.ones(2, 5, dtype=torch.bool)
    assert mark(given, {**new, "q_offset": 2}) is given
