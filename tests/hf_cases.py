"""Tiny transformers models for test_hf.py, and the context-parallel worker it spawns."""

from __future__ import annotations

import copy

from interpreter_options import skip_dead_overflow_checks

skip_dead_overflow_checks()  # in the spawned gloo ranks too (CI time; see interpreter_options)

VOCAB = 50


def tiny_model(attn: str, sliding_window=None, device="cpu"):
    """A 2-layer GQA Llama (or Mistral with a sliding window), the same weights on every call."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    sizes = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if sliding_window is None:
        config, model_class = LlamaConfig(**sizes), LlamaForCausalLM
    else:
        config, model_class = MistralConfig(sliding_window=sliding_window, **sizes), MistralForCausalLM
    torch.manual_seed(0)
    # Each model its own config: the attention implementation is a config attribute.
    model = model_class(copy.deepcopy(config)).to(device).eval()
    model.set_attn_implementation(attn)
    assert model.config._attn_implementation == attn
    return model


def packed_batch(lengths: tuple, seed: int = 1):
    """Token ids (total,) and loss weights (total, VOCAB) of a packed batch."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    return torch.randint(0, VOCAB, (total,), generator=gen), torch.randn(total, VOCAB, generator=gen)


def hf_cp_worker(rank: int, world_size: int, payload) -> dict | None:
    """The model over a context-parallel plan; rank 0 returns the gathered logits and the
    all-reduced parameter gradients (numpy, so that they cross the process boundary)."""
    import torch
    import torch.distributed as dist

    import ringflash.integrations.hf as rf_hf
    from ringflash.cp import Plan

    lengths, strategy = payload
    model = tiny_model(rf_hf.register())
    ids, weight = packed_batch(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    plan = Plan(cu, strategy=strategy)
    with rf_hf.context_parallel(plan):
        logits = model(plan.shard(ids)[None], position_ids=plan.position_ids[None]).logits[0]
    (logits * plan.shard(weight)).sum().backward()
    grads = {}
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad)  # per-rank partial sums, as in data parallelism
        grads[name] = p.grad.numpy().copy()
    full = plan.gather(logits.detach()).numpy().copy()
    return {"logits": full, "grads": grads} if rank == 0 else None


def hf_cp_wrong_row_worker(rank: int, world_size: int, payload) -> str:
    """rf_hf.attention_forward under context_parallel where rank 1 alone passes a row one
    token short: returns the ValueError each rank raised (every rank must raise one)."""
    import torch

    import ringflash.integrations.hf as rf_hf
    from ringflash.cp import Plan

    plan = Plan(torch.tensor([0, 16], dtype=torch.int32), strategy="zigzag_llama3")
    layer = tiny_model(rf_hf.register()).model.layers[0].self_attn
    n = plan.num_local_tokens - (1 if rank == 1 else 0)
    q, k = torch.randn(1, 4, n, 16), torch.randn(1, 2, n, 16)
    try:
        with rf_hf.context_parallel(plan):
            rf_hf.attention_forward(layer, q, k, k, None)
    except ValueError as exc:
        return str(exc)
    return "no error"
