"""ringflash as a Hugging Face transformers attention implementation: a tiny Llama (GQA)
with attn_implementation="ringattn" against the same weights with "eager", for logits
and every parameter's gradient, on dense, padded and packed batches: float32 everywhere
(under Triton's interpreter on the CPU; exact fp32 matmuls on a GPU), and bf16 on a GPU
against float32 eager at the project's bar (test_bf16_on_gpu_within_twice_eager_error)."""

import pytest
import torch

from conftest import HAS_CUDA

transformers = pytest.importorskip("transformers", minversion="4.53")

from hf_cases import VOCAB, hf_cp_worker, hf_cp_wrong_row_worker, packed_batch, tiny_model  # noqa: E402
from ringflash.integrations import hf as rf_hf  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _exact_fp32_on_gpu(monkeypatch):
    """The float32 comparisons with eager below hold our kernels to exact fp32 whatever a
    float32 matmul precision setting says (bf16 has its own test)."""
    monkeypatch.setenv("RINGFLASH_FP32_PRECISION", "ieee")


def _models(sliding_window=None):
    return (tiny_model("eager", sliding_window, DEVICE),
            tiny_model(rf_hf.register(), sliding_window, DEVICE))


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
    ids = torch.randint(0, VOCAB, (2, 37), device=DEVICE)
    weight = torch.randn(2, 37, VOCAB, device=DEVICE)
    out_ref = ref(ids).logits
    out = ours(ids).logits
    _compare(out_ref, out, _grads(ref, (out_ref * weight).sum()), _grads(ours, (out * weight).sum()))


def test_left_padded_batch_matches_eager():
    ref, ours = _models()
    ids = torch.randint(0, VOCAB, (3, 29), device=DEVICE)
    mask = torch.ones(3, 29, dtype=torch.long, device=DEVICE)
    mask[1, :11] = 0  # left padding
    mask[2, :28] = 0  # a single real token
    keep = mask.bool()[..., None]
    weight = torch.randn(3, 29, VOCAB, device=DEVICE) * keep  # padded positions carry no loss
    out_ref = ref(ids, attention_mask=mask).logits
    out = ours(ids, attention_mask=mask).logits
    _compare(out_ref * keep, out * keep, _grads(ref, (out_ref * weight).sum()), _grads(ours, (out * weight).sum()))


@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens"])
def test_packed_documents_match_separate_eager_runs(how):
    ref, ours = _models()
    lengths = [13, 1, 23]
    docs = [torch.randint(0, VOCAB, (1, n), device=DEVICE) for n in lengths]
    weights = [torch.randn(1, n, VOCAB, device=DEVICE) for n in lengths]
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
    ids = torch.randint(0, VOCAB, (2, 9), device=DEVICE)
    mask = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    mask[0, :3] = 0
    with torch.no_grad():
        a = ref.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        b = ours.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_unsupported_options_raise():
    ref, ours = _models()
    ids = torch.randint(0, VOCAB, (1, 8), device=DEVICE)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        ours(ids, output_attentions=True)
    layer = ours.model.layers[0].self_attn
    q = torch.randn(1, 4, 8, 16, device=DEVICE)
    k = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="attention_mask: got a 4D mask"):
        rf_hf.attention_forward(layer, q, k, k, torch.zeros(1, 1, 8, 8, device=DEVICE))
    with pytest.raises(NotImplementedError, match="s_aux"):
        rf_hf.attention_forward(layer, q, k, k, None, s_aux=torch.zeros(4, device=DEVICE))


@pytest.mark.parametrize("positions", [[37], [20, 17]], ids=["one document", "two documents"])
def test_position_ids_of_one_document_take_the_dense_kernels(monkeypatch, positions):
    """transformers hands position_ids to every attention call, so an unpacked batch-1 row
    arrives with them: one document runs the dense kernels (the Gluon ones on Hopper; the
    varlen path measured 1.3x slower there in an HF step), bit for bit flash_attn_func's
    output and gradients; two documents run varlen."""
    from ringflash import flash_attn_func
    from ringflash.integrations.hf_layout import layout_attention
    from ringflash.kernels import dispatch

    layer = tiny_model(rf_hf.register(), device=DEVICE).model.layers[0].self_attn
    gen = torch.Generator(device="cpu").manual_seed(0)
    n = sum(positions)
    q, k, v = (torch.randn(1, h, n, 16, generator=gen).to(DEVICE).requires_grad_() for h in (4, 2, 2))
    pos = torch.cat([torch.arange(p) for p in positions]).to(DEVICE)[None]
    dout = torch.randn(1, n, 4, 16, generator=gen).to(DEVICE)
    seen = []
    real_forward = dispatch.forward

    def forward(q_, k_, v_, prob, meta=None, **kwargs):
        seen.append(meta)
        return real_forward(q_, k_, v_, prob, meta, **kwargs)

    monkeypatch.setattr(dispatch, "forward", forward)
    out, _ = rf_hf.attention_forward(layer, q, k, v, None, position_ids=pos)
    out.backward(dout)
    assert (seen[0] is None) == (len(positions) == 1), seen
    if len(positions) == 1:
        expected = flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), causal=True)
        expected_grads = torch.autograd.grad(expected, (q, k, v), dout)
        assert torch.equal(out, expected)
        for got, want, name in zip((q.grad, k.grad, v.grad), expected_grads, "qkv"):
            assert torch.equal(got, want), f"d{name}"
        # The custom ops (what a compiled model calls) take the same dense route.
        seen.clear()
        via_op = layout_attention(*(t.transpose(1, 2) for t in (q, k, v)), pos, "positions", 16**-0.5, True,
                                  -1, 0, 0.0)
        assert seen == [None] and torch.equal(via_op, expected)
        for got, want, name in zip(torch.autograd.grad(via_op, (q, k, v), dout), expected_grads, "qkv"):
            assert torch.equal(got, want), f"custom op d{name}"


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed position_ids"])
def test_autocast_with_float32_parameters(packed):
    """float32 parameters under bf16 autocast (the training example's GPU setting): the
    rotary embedding hands attention float32 queries and keys and bfloat16 values, which
    ringattn casts to autocast's dtype as SDPA does (it used to raise a dtype mismatch).
    Against eager attention under the same autocast, at bf16's tolerance."""
    ref, ours = _models()
    ids = torch.randint(0, VOCAB, (1, 40), device=DEVICE)
    kwargs = {}
    if packed:  # two documents, positions restarting at 0
        kwargs["position_ids"] = torch.cat([torch.arange(25), torch.arange(15)]).to(DEVICE)[None]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out_ref = ref(ids, **kwargs).logits.float()
        out = ours(ids, **kwargs).logits.float()
    if packed:  # eager sees one sequence: compare with the documents run separately
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out_ref = torch.cat([ref(ids[:, :25]).logits, ref(ids[:, 25:]).logits], 1).float()
    err, scale = (out - out_ref).abs().max().item(), out_ref.abs().max().item()
    assert err <= 5e-2 * max(scale, 1.0), f"logits: max |diff| {err:.3e} (scale {scale:.3e})"


@pytest.mark.parametrize("strategy,world_size", [("zigzag_llama3", 2), ("llama3", 3), ("zigzag_ring", 2)])
def test_context_parallel_matches_single_process_eager(strategy, world_size):
    """The model under rf_hf.context_parallel(plan) on gloo ranks: gathered logits and
    all-reduced parameter gradients equal one process running eager attention per document."""
    from ringflash.cp.launch import run_local

    lengths = (13, 3, 21)
    result = run_local(hf_cp_worker, world_size, (lengths, strategy), timeout=600)[0]
    ref = tiny_model("eager")
    ids, weight = packed_batch(lengths)
    logits, loss = [], 0.0
    for doc_ids, doc_weight in zip(ids.split(lengths), weight.split(lengths)):
        out = ref(doc_ids[None]).logits[0]
        logits.append(out)
        loss = loss + (out * doc_weight).sum()
    grads = _grads(ref, loss)
    _close(torch.from_numpy(result["logits"]), torch.cat(logits).detach(), "logits")
    for name, g in grads.items():
        _close(torch.from_numpy(result["grads"][name]), g, f"grad {name}")


def test_context_parallel_rejects_padding_and_wrong_rows():
    import torch.distributed as dist

    class FakePlan:
        num_local_tokens = 8

        def attention(self, q, k, v, _caller_error=None, **options):
            raise _caller_error  # as a one-rank plan's collective check does

    layer = tiny_model(rf_hf.register(), device=DEVICE).model.layers[0].self_attn
    q = torch.randn(1, 4, 8, 16, device=DEVICE)
    k = torch.randn(1, 2, 8, 16, device=DEVICE)
    assert not dist.is_initialized()
    with rf_hf.context_parallel(FakePlan()):
        with pytest.raises(ValueError, match="attention_mask: padding masks are not supported under context_parallel"):
            rf_hf.attention_forward(layer, q, k, k, torch.ones(1, 8, dtype=torch.bool, device=DEVICE))
        with pytest.raises(ValueError, match="query: got batch 2 of 8 tokens under context_parallel"):
            rf_hf.attention_forward(layer, q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1),
                                    k.expand(2, -1, -1, -1), None)
        with pytest.raises(NotImplementedError, match="dropout: got 0.1"):
            rf_hf.attention_forward(layer, q, k, k, None, dropout=0.1)


def test_context_parallel_error_on_one_rank_stops_every_rank():
    """A wrong row on rank 1 alone: the wrapper raised there before plan.attention, and rank 0
    waited in the plan's collective check for it (on NCCL, a hang). The error now goes
    through that check, so rank 0 raises too, naming rank 1."""
    from ringflash.cp.launch import run_local

    errors = run_local(hf_cp_wrong_row_worker, 2, None, timeout=120)
    assert errors[1].startswith("query: got batch 1 of 7 tokens under context_parallel"), errors
    assert "rank(s) [1] rejected their inputs" in errors[0], errors


def test_layout_cache_never_serves_a_stale_mask():
    """The per-forward cache of unpadding metadata: the same tensor hits; a new tensor (even
    at a recycled address) or an in-place change recomputes."""
    calls = []

    def build(t):
        calls.append(1)
        return int(t.sum())

    cache = rf_hf.LastLayout()
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert cache.get(mask, build) == 10 and cache.get(mask, build) == 10 and len(calls) == 1
    mask[0, 0] = False
    assert cache.get(mask, build) == 9 and len(calls) == 2
    fresh = torch.ones(2, 5, dtype=torch.bool)  # version 0, like the next one
    assert cache.get(fresh, build) == 10 and len(calls) == 3
    del fresh, mask
    other = torch.zeros(2, 5, dtype=torch.bool)  # maybe at the same address, same version
    assert cache.get(other, build) == 0 and len(calls) == 4


def _bf16_within_twice_eager_error(sliding_window, device: str, lengths: list[int]) -> None:
    """bf16 models, one dense sequence and packed documents: ours is within 2x eager bf16's
    error (both against eager float32 with the same weights) plus a small epsilon, for the
    logits and every parameter's gradient."""
    truth = tiny_model("eager", sliding_window, device)
    base = tiny_model("eager", sliding_window, device).to(torch.bfloat16)
    ours = tiny_model(rf_hf.register(), sliding_window, device).to(torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(3)
    ids = torch.randint(0, VOCAB, (1, sum(lengths)), device=device, generator=gen)
    weight = torch.randn(1, sum(lengths), VOCAB, device=device, generator=gen)
    position_ids = torch.cat([torch.arange(n, device=device) for n in lengths])[None]

    def run(model, packed: bool):
        """Logits (float32) and parameter gradients; packed: eager runs each document alone
        (its mask would not separate them), ours takes the packed batch with position_ids."""
        if packed and model is not ours:
            logits = torch.cat([model(doc).logits for doc in ids.split(lengths, dim=1)], dim=1).float()
        else:
            logits = model(ids, **({"position_ids": position_ids} if packed else {})).logits.float()
        grads = _grads(model, (logits * weight).sum())
        return logits, {n: g.float() for n, g in grads.items()}

    for packed in (False, True):
        (t_logits, t_grads), (b_logits, b_grads), (o_logits, o_grads) = (run(m, packed) for m in (truth, base, ours))
        pairs = [("logits", t_logits, b_logits, o_logits)]
        pairs += [(f"grad {n}", t_grads[n], b_grads[n], o_grads[n]) for n in t_grads]
        for what, want, baseline, got in pairs:
            scale = max(want.abs().max().item(), 1.0)
            base_err = (baseline - want).abs().max().item()
            err = (got - want).abs().max().item()
            assert err <= 2 * base_err + 4e-3 * scale, (
                f"{'packed' if packed else 'dense'} {what}: ours {err:.3e} vs eager bf16 {base_err:.3e} "
                f"(scale {scale:.3e})")


@pytest.mark.parametrize("sliding_window", [None, 7], ids=["llama", "mistral-window-7"])
def test_bf16_within_twice_eager_error(sliding_window):
    """On the CPU too: the interpreter used to return garbage for bf16 (its bf16 dot is
    wrong), so a bf16 HF model on the CPU gave garbage logits with no error."""
    _bf16_within_twice_eager_error(sliding_window, DEVICE, [30, 1, 17, 13])


@pytest.mark.gpu
@pytest.mark.parametrize("sliding_window", [None, 7], ids=["llama", "mistral-window-7"])
def test_bf16_on_gpu_within_twice_eager_error(sliding_window):
    _bf16_within_twice_eager_error(sliding_window, "cuda", [300, 1, 77, 135])


@pytest.mark.parametrize("path", ["dense", "padded", "packed position_ids", "packed cu_seq_lens"])
def test_inference_mode_matches_no_grad(path):
    """Every path used to crash under torch.inference_mode ("Inference tensors do not track
    version counter") in its metadata caches."""
    ours = _models()[1]
    ids = torch.randint(0, VOCAB, (1, 21), device=DEVICE)
    kwargs = {}
    if path == "padded":
        ids = ids.expand(2, -1).clone()
        mask = torch.ones(2, 21, dtype=torch.long, device=DEVICE)
        mask[1, :6] = 0
        kwargs = dict(attention_mask=mask)
    elif path.startswith("packed"):
        kwargs = dict(position_ids=torch.cat([torch.arange(n, device=DEVICE) for n in (8, 13)])[None])
        if path.endswith("cu_seq_lens"):
            cu = torch.tensor([0, 8, 21], device=DEVICE)  # int64, as collators produce
            kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=13, max_length_k=13)
    with torch.no_grad():
        want = ours(ids, **kwargs).logits
    with torch.inference_mode():
        inference_kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        got = ours(ids.clone(), **inference_kwargs).logits
        again = ours(ids.clone(), **inference_kwargs).logits  # the same inference tensors: nothing stale
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(again, want)


def test_int64_cu_seq_lens_are_converted_once_per_forward():
    """Collators give int64 cu_seq_lens: converted once, not in every layer (on a GPU each new
    int32 tensor costs a host sync to check its values)."""
    cu = torch.tensor([0, 5, 12], device=DEVICE)
    first = rf_hf._cu_q_int32.get(cu, rf_hf._as_int32)
    assert first.dtype == torch.int32 and rf_hf._cu_q_int32.get(cu, rf_hf._as_int32) is first


def _compile_cases():
    ids = torch.randint(0, VOCAB, (2, 21), device=DEVICE)
    mask = torch.ones(2, 21, dtype=torch.long, device=DEVICE)
    mask[1, :5] = 0
    position_ids = torch.cat([torch.arange(n, device=DEVICE) for n in (8, 13)])[None]
    cu = torch.tensor([0, 8, 21], device=DEVICE)
    return {
        "dense": ((ids,), {}),
        "padded": ((ids,), dict(attention_mask=mask)),
        "packed position_ids": ((ids[:1],), dict(position_ids=position_ids)),
        "packed cu_seq_lens": ((ids[:1],), dict(position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                                max_length_q=13, max_length_k=13)),
    }


@pytest.mark.parametrize("case", list(_compile_cases()))
def test_torch_compile_has_no_graph_breaks_and_matches_eager(case):
    """torch.compile of a transformers model with "ringattn": one graph (Dynamo's explain
    counts 0 breaks, as with "sdpa") and the compiled logits and gradients equal eager's."""
    ours = _models()[1]
    args, kwargs = _compile_cases()[case]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(ours)(*args, **kwargs)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    weight = torch.randn(*args[0].shape, VOCAB, device=DEVICE)
    want = ours(*args, **kwargs).logits
    want_grads = _grads(ours, (want * weight).sum())
    got = compiled(*args, **kwargs).logits
    got_grads = _grads(ours, (got * weight).sum())
    _compare(want, got, want_grads, got_grads)


@pytest.mark.parametrize("batch", ["dense", "padded", "packed"])
def test_attention_dropout_in_training(batch):
    """attention_dropout > 0 in training runs in the kernels (it used to raise): the same
    torch.manual_seed gives the same logits and gradients, another seed other ones, and
    evaluation mode applies no dropout."""
    ours = tiny_model(rf_hf.register(), device=DEVICE)
    ours.config.attention_dropout = 0.3
    for layer in ours.model.layers:
        layer.self_attn.attention_dropout = 0.3
    ids = torch.randint(0, VOCAB, (2 if batch == "padded" else 1, 19), device=DEVICE)
    kwargs = {}
    if batch == "padded":
        mask = torch.ones(2, 19, dtype=torch.long, device=DEVICE)
        mask[1, :4] = 0
        kwargs = dict(attention_mask=mask)
    elif batch == "packed":
        kwargs = dict(position_ids=torch.cat([torch.arange(n, device=DEVICE) for n in (7, 12)])[None])
    with torch.no_grad():
        eval_logits = ours.eval()(ids, **kwargs).logits
    ours.train()

    def run(seed):
        torch.manual_seed(seed)
        logits = ours(ids, **kwargs).logits
        return logits, _grads(ours, logits.square().sum())

    (a, grads_a), (b, grads_b), (c, _) = run(1), run(1), run(2)
    assert torch.equal(a, b) and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    assert not torch.allclose(a, c) and not torch.allclose(a, eval_logits)
