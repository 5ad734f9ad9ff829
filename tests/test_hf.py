"""ringflash as a Hugging Face transformers attention implementation: a tiny Llama (GQA)
with attn_implementation="ringflash" against the same weights with "eager", for logits
and every parameter's gradient, on dense, padded and packed batches (float32 on the
CPU under Triton's interpreter; bf16 on the GPU)."""

import copy

import pytest
import torch

from conftest import HAS_CUDA

transformers = pytest.importorskip("transformers", minversion="4.53")

from ringflash.integrations import hf as rf_hf  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"


def _models(sliding_window=None):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    sizes = dict(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if sliding_window is None:
        config, model_class = LlamaConfig(**sizes), LlamaForCausalLM
    else:
        config, model_class = MistralConfig(sliding_window=sliding_window, **sizes), MistralForCausalLM
    torch.manual_seed(0)
    # Each model its own config: the attention implementation is a config attribute.
    ref = model_class(copy.deepcopy(config)).to(DEVICE).eval()
    ours = model_class(copy.deepcopy(config)).to(DEVICE).eval()
    ours.load_state_dict(ref.state_dict())
    ref.set_attn_implementation("eager")
    ours.set_attn_implementation(rf_hf.register())
    assert ref.config._attn_implementation == "eager"
    return ref, ours


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _close(a, b, what):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= 1e-4 * max(scale, 1.0), f"{what}: max |diff| {err:.3e} (scale {scale:.3e})"


def _compare(ref_logits, our_logits, ref_grads, our_grads):
    _close(our_logits, ref_logits, "logits")
    for name in ref_grads:
        _close(our_grads[name], ref_grads[name], f"grad {name}")


@pytest.mark.parametrize("sliding_window", [None, 7], ids=["llama", "mistral-window-7"])
def test_dense_batch_matches_eager(sliding_window):
    ref, ours = _models(sliding_window)
    ids = torch.randint(0, 50, (2, 37), device=DEVICE)
    weight = torch.randn(2, 37, 50, device=DEVICE)
    out_ref = ref(ids).logits
    out = ours(ids).logits
    _compare(out_ref, out, _grads(ref, (out_ref * weight).sum()), _grads(ours, (out * weight).sum()))


def test_left_padded_batch_matches_eager():
    ref, ours = _models()
    ids = torch.randint(0, 50, (3, 29), device=DEVICE)
    mask = torch.ones(3, 29, dtype=torch.long, device=DEVICE)
    mask[1, :11] = 0  # left padding
    mask[2, :28] = 0  # a single real token
    keep = mask.bool()[..., None]
    weight = torch.randn(3, 29, 50, device=DEVICE) * keep  # padded positions carry no loss
    out_ref = ref(ids, attention_mask=mask).logits
    out = ours(ids, attention_mask=mask).logits
    _compare(out_ref * keep, out * keep, _grads(ref, (out_ref * weight).sum()), _grads(ours, (out * weight).sum()))


@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens"])
def test_packed_documents_match_separate_eager_runs(how):
    ref, ours = _models()
    lengths = [13, 1, 23]
    docs = [torch.randint(0, 50, (1, n), device=DEVICE) for n in lengths]
    weights = [torch.randn(1, n, 50, device=DEVICE) for n in lengths]
    outs_ref = [ref(d).logits for d in docs]
    loss_ref = sum((o * w).sum() for o, w in zip(outs_ref, weights))
    ids = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(n, device=DEVICE) for n in lengths])[None]
    kwargs = {}
    if how == "cu_seq_lens":
        cu = torch.tensor([0, 13, 14, 37], dtype=torch.int32, device=DEVICE)
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=23, max_length_k=23)
    out = ours(ids, position_ids=position_ids, **kwargs).logits
    loss = (out * torch.cat(weights, dim=1)).sum()
    _compare(torch.cat(outs_ref, dim=1), out, _grads(ref, loss_ref), _grads(ours, loss))


def test_generation_with_cache_matches_eager():
    ref, ours = _models()
    ids = torch.randint(0, 50, (2, 9), device=DEVICE)
    mask = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    mask[0, :3] = 0
    with torch.no_grad():
        a = ref.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        b = ours.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_unsupported_options_raise():
    ref, ours = _models()
    ids = torch.randint(0, 50, (1, 8), device=DEVICE)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        ours(ids, output_attentions=True)
    layer = ours.model.layers[0].self_attn
    q = torch.randn(1, 4, 8, 16, device=DEVICE)
    k = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="attention_mask: got a 4D mask"):
        rf_hf.attention_forward(layer, q, k, k, torch.zeros(1, 1, 8, 8, device=DEVICE))
    with pytest.raises(NotImplementedError, match="s_aux"):
        rf_hf.attention_forward(layer, q, k, k, None, s_aux=torch.zeros(4, device=DEVICE))
    with pytest.raises(NotImplementedError, match="dropout"):
        rf_hf.attention_forward(layer, q, k, k, None, dropout=0.1)
