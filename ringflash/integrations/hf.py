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
  during generation with a KV cache). A static cache's keys are all of its slots: the mask
  builder marks the filled ones (``_mark_unfilled_slots``);
* padded batches (a 2D ``attention_mask``): tokens are unpadded into a varlen batch and the
  output padded back. The lengths are read on the host once per mask (cached across the
  layers of one forward), not once per layer. In cross-attention (not causal, and queries
  other than the keys, or a module whose ``is_cross_attention`` is set) the mask is the
  keys' and every query is kept;
* packed batches without padding: ``cu_seq_lens_q``/``cu_seq_lens_k`` and
  ``max_length_q``/``max_length_k`` keyword arguments (``DataCollatorWithFlattening(
  return_flash_attn_kwargs=True)``), or, with batch size 1, ``position_ids`` that restart
  at 0 at each document (read once per ``position_ids`` tensor);
* ``torch.compile(model)`` without graph breaks for dense, padded and packed batches: the
  host reads of padded and packed layouts happen inside custom ops
  (``ringflash.integrations.hf_layout``), and ``context_parallel`` is read from a plain
  global. Under ``context_parallel`` each attention call stays eager (``Plan.attention``
  communicates across ranks), one graph break per layer;
* GQA/MQA (no repeat of K/V), sliding windows (``sliding_window`` tokens including the
  current one), softcapping, and float32 inputs (no down-cast).

Attention dropout (``attention_dropout`` in training) runs in the kernels. Attention sinks
(``s_aux``), ``output_attentions`` and custom 4D masks raise an error naming the argument,
and so does dropout under ``context_parallel``.

Context parallelism: inside ``with context_parallel(plan):`` every attention call of the
model runs ``plan.attention`` on this rank's tokens (see ``ringflash.cp.Plan``)::

    plan = Plan(cu_seqlens, group, strategy="zigzag_llama3")
    with rf_hf.context_parallel(plan):
        logits = model(plan.shard(input_ids)[None], position_ids=plan.position_ids[None]).logits

The input is the batch of one packed row that the plan shards; ``position_ids`` are the
local tokens' positions inside their documents (restarting at 0 at each), for the rotary
embeddings. Parameter gradients are then per-rank partial sums: all-reduce them over the
group, as data parallelism does.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from .. import validation as V
from ..interface import flash_attn_func, flash_attn_varlen_func
from .hf_layout import UNFILLED, LastLayout, layout_attention, one_document_row

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
    AttentionMaskInterface.register(name, _padding_mask_builder(flash_attention_mask))
    return name


def _padding_mask_builder(flash_attention_mask):
    """transformers' flash-attention mask builder (None or the 2D padding mask, never a 4D
    mask), with two changes:

    * a compiled model always gets the 2D mask: the builder's own test for "no padding at
      all" branches on the mask's values, which breaks the graph. The attention then reads
      the layout inside a custom op (see ``hf_layout``);
    * a static cache's key slots past the tokens seen so far are marked ``UNFILLED``
      (``_mark_unfilled_slots``): its keys are all of its slots, and transformers' generate
      drops an all-ones mask for every implementation but flash-attn's, which would leave
      the attention no way to tell them from real keys."""
    import inspect

    signature = inspect.signature(flash_attention_mask)

    def build(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        if torch.compiler.is_compiling():
            mask = arguments.get("attention_mask")
            mask = None if mask is None else mask[:, -arguments["kv_length"]:]
        else:
            mask = flash_attention_mask(*args, **kwargs)
        return _mark_unfilled_slots(mask, arguments)

    return build


def _mark_unfilled_slots(mask: Optional[torch.Tensor], arguments: dict) -> Optional[torch.Tensor]:
    """A static cache's keys are all of its slots (kv_length), the filled ones first.
    transformers' flash path reads a mask narrower than kv_length as the first slots, and
    so does ``hf_layout``: such a mask is returned as it is. Where there is no mask (generate
    drops an all-ones mask for every implementation but flash-attn's) yet fewer slots are
    filled than kv_length, this returns one: all ones over the filled slots. Inside a
    compiled graph, where the filled count is a tensor, the mask has kv_length columns,
    the unfilled ones marked ``hf_layout.UNFILLED``. (That marker does not survive being fed
    back into transformers' mask creation, which makes a mask boolean: generate builds its
    masks outside the compiled forward, so only a compiled ``generate`` itself would.)
    Dynamic caches fill every slot: no mask."""
    if mask is not None:
        return mask
    kv_length = arguments["kv_length"]
    kv_offset = arguments.get("kv_offset", 0)
    if "q_offset" in arguments:  # transformers >= 5: the queries' first position and their count
        filled = arguments["q_offset"] + arguments["q_length"] - kv_offset
    elif arguments.get("cache_position") is not None:  # transformers 4.5x: the queries' positions
        positions = arguments["cache_position"]
        if kv_length <= positions.shape[0]:  # no cache: the keys are the queries (no read)
            return None
        filled = positions[-1] + 1 - kv_offset
    else:
        return None
    device = arguments.get("kwargs", {}).get("device")
    if device is None and isinstance(filled, torch.Tensor):
        device = filled.device
    if isinstance(filled, torch.Tensor) and not torch.compiler.is_compiling():
        filled = int(filled)  # one read per forward; a compiled graph keeps the tensor
    if not isinstance(filled, torch.Tensor) and filled >= kv_length:
        return None
    batch = arguments["batch_size"]
    if not isinstance(filled, torch.Tensor):
        return torch.ones(batch, filled, dtype=torch.bool, device=device)
    slots = torch.arange(kv_length, device=device)
    return torch.where(slots < filled, 1, UNFILLED).to(torch.int8).expand(batch, kv_length)


#: (plan, options for plan.attention) while a ``context_parallel`` block is active. A plain
#: module global rather than a ContextVar: torch.compile traces reads of globals (and
#: guards on them), while a ContextVar lookup breaks the graph at every layer.
_active_plan: Optional[tuple] = None


@contextlib.contextmanager
def context_parallel(plan, heads_k_stride: Optional[int] = None, mode: Optional[str] = None) -> Iterator[None]:
    """Route the attention of models using the registered implementation through ``plan``
    (a ``ringflash.cp.Plan``) inside the block. ``heads_k_stride`` and ``mode`` are passed
    to ``plan.attention``. The setting is per process (one training loop per process), and
    blocks nest."""
    global _active_plan
    saved, _active_plan = _active_plan, (plan, dict(heads_k_stride=heads_k_stride, mode=mode))
    try:
        yield
    finally:
        _active_plan = saved


# Plan.attention runs collectives and checks across ranks on the host: it stays eager, as
# its own graph break, when the model around it is compiled.
@torch.compiler.disable
def _context_parallel_attention(plan, cp_options: dict, q, k, v, attention_mask, options: dict) -> torch.Tensor:
    error: Optional[Exception] = None
    if attention_mask is not None:
        error = ValueError("attention_mask: padding masks are not supported under context_parallel; expected None "
                           "(pack the documents into the plan's cu_seqlens instead of padding)")
    elif q.shape[0] != 1 or q.shape[1] != plan.num_local_tokens:
        error = ValueError(f"query: got batch {q.shape[0]} of {q.shape[1]} tokens under context_parallel; expected "
                           f"one row of this rank's {plan.num_local_tokens} tokens (plan.shard of the packed batch)")
    elif options["dropout_p"]:
        error = NotImplementedError(f"dropout: got {options['dropout_p']}; context-parallel attention has no "
                                    "dropout, expected 0.0")
    if error is not None:
        # Raised through the plan's collective check, on every rank: raised here on this rank
        # alone, the other ranks waited in that check for it (a hang on NCCL).
        plan.attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), _caller_error=error)
        raise error  # (plan.attention raises it; in case it returned)
    out = plan.attention(q[0], k[0], v[0], causal=options["causal"], softmax_scale=options["softmax_scale"],
                         window_size=options["window_size"], softcap=options["softcap"], **cp_options)
    return out.unsqueeze(0)


_cu_q_int32 = LastLayout()
_cu_k_int32 = LastLayout()


def _as_int32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.int32)


def _collator_cu_seqlens(cache: LastLayout, cu: torch.Tensor) -> torch.Tensor:
    """Collators give int64 cu_seq_lens. In eager mode one int32 copy per collator tensor
    is shared by every layer, so that its values are checked once (a new tensor per layer
    would cost one host sync per layer on a GPU); a compiled graph converts in-graph (its
    checks run on the device)."""
    if torch.compiler.is_compiling():
        return cu.to(torch.int32)
    return cache.get(cu, _as_int32)


def _autocast_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v in autocast's dtype when autocast is on for their device, as SDPA (an autocast
    op) and transformers' flash-attention path take them. A model with float32 parameters
    under autocast gives float32 queries and keys (its rotary tables are float32) but
    bfloat16 values. Outside autocast, mixed dtypes reach the kernels' check and its error."""
    device_type = q.device.type
    if not torch.is_autocast_enabled(device_type):
        return q, k, v
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in (q, k, v))


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
    q, k, v = _autocast_inputs(*(t.transpose(1, 2) for t in (query, key, value)))  # (batch, len, heads, headdim)
    batch, q_len = q.shape[:2]
    kv_len = k.shape[1]
    options = dict(
        dropout_p=dropout, softmax_scale=scaling, causal=causal,
        window_size=(sliding_window - 1, sliding_window - 1 if not causal else 0) if sliding_window else (-1, -1),
        softcap=softcap or 0.0,
    )

    if _active_plan is not None:
        return _context_parallel_attention(*_active_plan, q, k, v, attention_mask, options), None

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if attention_mask is None and cu_q is not None and cu_k is not None:
        # Packed documents described by the data collator.
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        if max_q is None or max_k is None:
            raise ValueError("max_length_q, max_length_k: required with cu_seq_lens_q/cu_seq_lens_k")
        out = flash_attn_varlen_func(q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]),
                                     v.reshape(-1, *v.shape[2:]), _collator_cu_seqlens(_cu_q_int32, cu_q),
                                     _collator_cu_seqlens(_cu_k_int32, cu_k), int(max_q), int(max_k), **options)
        return out.view(batch, q_len, *out.shape[1:]), None

    position_ids = kwargs.get("position_ids")
    packed_row = attention_mask is None and position_ids is not None and batch == 1 and q_len == kv_len and q_len > 1
    if attention_mask is None and not packed_row:
        return flash_attn_func(q, k, v, **options), None
    if packed_row and not torch.compiler.is_compiling() and one_document_row(position_ids):
        # transformers passes position_ids to every call: an unpacked row is one document.
        # Eager, its layout is read here (once per forward) and the dense call skips the
        # custom ops; compiled, the custom op reads it and runs the same dense kernels.
        return flash_attn_func(q, k, v, **options), None

    # Packed documents in one row (position_ids restarting at 0), or a padded batch (keys
    # unpadded with the whole mask, queries with its last q_len columns: the newest tokens
    # when a KV cache makes q_len < kv_len). The layout needs the host, so it is read
    # inside a custom op (one read per forward), which keeps a compiled graph whole.
    V.check_dense_qkv(q, k, v)
    left, right = V.check_window(options["window_size"])
    scale = V.resolve_softmax_scale(options["softmax_scale"], q.shape[-1])
    layout, kind = (position_ids, "positions") if packed_row else (attention_mask, "mask")
    # Cross-attention (not causal; queries that are not the keys): the mask is the keys'
    # (the encoder's), and every query is real.
    every_query = kind == "mask" and not causal and (q_len != kv_len or bool(getattr(module, "is_cross_attention",
                                                                                      False)))
    if every_query and (left >= 0 or right >= 0):
        raise NotImplementedError(f"sliding_window: got {sliding_window} for cross-attention (queries are not the "
                                  "keys); expected None")
    # A mask that keeps every token reaches here only where transformers could not drop it
    # (a compiled model): then packed position_ids still separate the documents.
    positions = position_ids if (kind == "mask" and position_ids is not None and batch == 1 and q_len == kv_len
                                 and q_len > 1) else None
    out = layout_attention(q, k, v, layout, kind, scale, causal, left, 0 if causal else right,
                           V.check_softcap(options["softcap"]), V.check_dropout_p(options["dropout_p"]),
                           positions=positions, every_query=every_query)
    return out, None
