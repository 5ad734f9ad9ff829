"""Hugging Face transformers: ringflash as a model's attention implementation.

    import ringflash.integrations.hf as rf_hf
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation=rf_hf.register())
    # or, on a loaded model: model.set_attn_implementation(rf_hf.register())

``register()`` adds the implementation "ringattn" to transformers' attention registry
(transformers treats any name containing "flash" as the flash-attn package, hence not
"ringflash"),
together with the padding-mask builder of its flash-attention path, so the attention
function receives either no mask or the 2D padding mask. It handles, like transformers'
own flash-attention integration:

* dense batches (causal or not, bottom-right aligned when queries are fewer than keys, as
  during generation with a KV cache);
* padded batches (a 2D ``attention_mask``): tokens are unpadded into a varlen batch and the
  output padded back. The lengths are read on the host once per mask (cached across the
  layers of one forward), not once per layer;
* packed batches without padding: ``cu_seq_lens_q``/``cu_seq_lens_k`` and
  ``max_length_q``/``max_length_k`` keyword arguments (``DataCollatorWithFlattening(
  return_flash_attn_kwargs=True)``), or, with batch size 1, ``position_ids`` that restart
  at 0 at each document (read once per ``position_ids`` tensor);
* GQA/MQA (no repeat of K/V), sliding windows (``sliding_window`` tokens including the
  current one), softcapping, and float32 inputs (no down-cast).

Attention dropout, attention sinks (``s_aux``), ``output_attentions`` and custom 4D masks
raise an error naming the argument.

Context parallelism: inside ``with context_parallel(plan):`` every attention call of the
model runs ``plan.attention`` on this rank's tokens (see ``ringflash.cp.Plan``)::

    plan = Plan(cu_seqlens, group, strategy="zigzag_llama3")
    with rf_hf.context_parallel(plan):
        logits = model(plan.shard(input_ids)[None], position_ids=plan.position_ids[None]).logits

The input is the batch of one packed row that the plan shards; ``position_ids`` are the
local tokens' global positions, for the rotary embeddings. Parameter gradients are then
per-rank partial sums: all-reduce them over the group, as data parallelism does.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from typing import Iterator, Optional

import torch

from ..interface import flash_attn_func, flash_attn_varlen_func
from ..validation import tensor_version

NAME = "ringattn"


def register(name: str = NAME) -> str:
    """Register the attention function and its mask builder under ``name``; returns it."""
    if "flash" in name:
        raise ValueError(f"name: got {name!r}; transformers routes any name containing 'flash' to the "
                         "flash-attn package, so expected a name without it")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    except ImportError as exc:  # transformers missing, or older than 4.53 (no mask registry)
        raise ImportError(
            "ringflash.integrations.hf: needs transformers >= 4.53 (AttentionInterface and "
            f"AttentionMaskInterface); install ringflash[hf] ({exc})"
        ) from exc
    AttentionInterface.register(name, attention_forward)
    # The flash-attention mask builder gives None or the 2D padding mask, never a 4D mask.
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name


#: (plan, options for plan.attention) while a ``context_parallel`` block is active.
_active_plan: contextvars.ContextVar = contextvars.ContextVar("ringflash_hf_plan", default=None)


@contextlib.contextmanager
def context_parallel(plan, heads_k_stride: Optional[int] = None, mode: Optional[str] = None) -> Iterator[None]:
    """Route the attention of models using the registered implementation through ``plan``
    (a ``ringflash.cp.Plan``) inside the block. ``heads_k_stride`` and ``mode`` are passed
    to ``plan.attention``."""
    token = _active_plan.set((plan, dict(heads_k_stride=heads_k_stride, mode=mode)))
    try:
        yield
    finally:
        _active_plan.reset(token)


def _context_parallel_attention(plan, cp_options: dict, q, k, v, attention_mask, options: dict) -> torch.Tensor:
    if attention_mask is not None:
        raise ValueError("attention_mask: padding masks are not supported under context_parallel; expected None "
                         "(pack the documents into the plan's cu_seqlens instead of padding)")
    if q.shape[0] != 1 or q.shape[1] != plan.num_local_tokens:
        raise ValueError(f"query: got batch {q.shape[0]} of {q.shape[1]} tokens under context_parallel; expected one "
                         f"row of this rank's {plan.num_local_tokens} tokens (plan.shard of the packed batch)")
    if options["dropout_p"]:
        raise NotImplementedError(f"dropout: got {options['dropout_p']}; context-parallel attention has no dropout, "
                                  "expected 0.0")
    out = plan.attention(q[0], k[0], v[0], causal=options["causal"], softmax_scale=options["softmax_scale"],
                         window_size=options["window_size"], softcap=options["softcap"], **cp_options)
    return out.unsqueeze(0)


class _LastLayout:
    """Unpadding or packing metadata of the most recent mask or position_ids tensor: every
    layer of a forward passes the same tensor object, so the host reads its lengths once.
    The tensor is held by a weak reference (a new tensor at a recycled address is a miss)
    and its version counter (an in-place change is a miss)."""

    def __init__(self) -> None:
        self.ref: Optional[weakref.ref] = None
        self.key: Optional[tuple] = None
        self.value: Optional[tuple] = None

    def get(self, tensor: torch.Tensor, build, extra: object = None):
        version = tensor_version(tensor)
        if version is None:  # an inference tensor has no version counter: never reuse
            return build(tensor)
        key = (version, tensor.data_ptr(), extra)
        if self.ref is None or self.ref() is not tensor or key != self.key:
            self.ref, self.key, self.value = weakref.ref(tensor), key, build(tensor)
        return self.value


_mask_layout = _LastLayout()
_position_layout = _LastLayout()
_cu_q_int32 = _LastLayout()
_cu_k_int32 = _LastLayout()


def _as_int32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.int32)


def _cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def _unpad_layout(mask: torch.Tensor) -> tuple:
    """(token indices, cu_seqlens, max_seqlen) of the kept tokens of a (batch, n) bool mask."""
    lengths = mask.sum(1, dtype=torch.int32)
    indices = mask.flatten().nonzero().flatten()
    return indices, _cu_seqlens(lengths), int(lengths.max().item()) if lengths.numel() else 0


def _packed_layout(position_ids: torch.Tensor) -> Optional[tuple]:
    """(cu_seqlens, max_seqlen) of documents starting where position_ids is 0, or None if
    the single row holds one document (positions 0, 1, 2, ...)."""
    pos = position_ids.reshape(-1)
    starts = (pos == 0).nonzero().flatten().tolist()  # the one host read, cached per tensor
    if starts in ([], [0]):
        return None  # one document (or a continuation that never restarts)
    if starts[0] != 0:
        raise ValueError("position_ids: a packed row must start a document at position 0; "
                         f"got first position {pos[0].item()}")
    bounds = starts + [pos.numel()]  # the document starts, then the end: cu_seqlens
    max_len = max(b - a for a, b in zip(bounds, bounds[1:]))
    return torch.tensor(bounds, dtype=torch.int32, device=pos.device), max_len


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    is_causal: Optional[bool] = None,
    s_aux: Optional[torch.Tensor] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (batch, nheads, q_len, headdim),
    key/value (batch, nheads_k, kv_len, headdim); returns ((batch, q_len, nheads,
    headdim), None)."""
    if s_aux is not None:
        raise NotImplementedError("s_aux: attention sinks are not supported by ringflash; expected None")
    if kwargs.get("output_attentions", False):
        raise NotImplementedError("output_attentions: ringflash never materializes attention weights; "
                                  "expected False (use attn_implementation='eager' to inspect them)")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attention_mask: got a {attention_mask.dim()}D mask; expected None or the 2D padding "
                         f"mask (register() installs the matching mask builder)")
    causal = bool(module.is_causal if is_causal is None else is_causal)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (batch, len, heads, headdim)
    batch, q_len = q.shape[:2]
    kv_len = k.shape[1]
    options = dict(
        dropout_p=dropout, softmax_scale=scaling, causal=causal,
        window_size=(sliding_window - 1, sliding_window - 1 if not causal else 0) if sliding_window else (-1, -1),
        softcap=softcap or 0.0,
    )

    active = _active_plan.get()
    if active is not None:
        return _context_parallel_attention(*active, q, k, v, attention_mask, options), None

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if attention_mask is None and cu_q is not None and cu_k is not None:
        # Packed documents described by the data collator.
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        if max_q is None or max_k is None:
            raise ValueError("max_length_q, max_length_k: required with cu_seq_lens_q/cu_seq_lens_k")
        out = flash_attn_varlen_func(q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]),
                                     v.reshape(-1, *v.shape[2:]),
                                     # One int32 tensor per collator tensor, shared by every layer, so
                                     # that its values are checked once (a new tensor per layer
                                     # would cost one host sync per layer on a GPU).
                                     _cu_q_int32.get(cu_q, _as_int32), _cu_k_int32.get(cu_k, _as_int32),
                                     int(max_q), int(max_k), **options)
        return out.view(batch, q_len, *out.shape[1:]), None

    position_ids = kwargs.get("position_ids")
    if attention_mask is None and position_ids is not None and batch == 1 and q_len == kv_len and q_len > 1:
        packed = _position_layout.get(position_ids, _packed_layout)
        if packed is not None:
            cu, max_len = packed
            out = flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, max_len, max_len, **options)
            return out.unsqueeze(0), None

    if attention_mask is None:
        return flash_attn_func(q, k, v, **options), None

    # Padded batch: unpad keys with the whole mask and queries with its last q_len columns
    # (the newest tokens, when a KV cache makes q_len < kv_len).
    def layouts(mask: torch.Tensor) -> tuple:
        mask = mask[:, -kv_len:].to(torch.bool)
        keys = _unpad_layout(mask)
        return keys, keys if q_len == kv_len else _unpad_layout(mask[:, -q_len:].contiguous())

    (k_index, cu_k, max_k), (q_index, cu_q, max_q) = _mask_layout.get(attention_mask, layouts, (q_len, kv_len))
    flat = lambda t: t.reshape(-1, *t.shape[2:])  # noqa: E731
    out = flash_attn_varlen_func(flat(q).index_select(0, q_index), flat(k).index_select(0, k_index),
                                 flat(v).index_select(0, k_index), cu_q, cu_k, max_q, max_k, **options)
    padded = out.new_zeros((batch * q_len,) + tuple(out.shape[1:]))
    padded = padded.index_copy(0, q_index, out)
    return padded.view(batch, q_len, *out.shape[1:]), None
