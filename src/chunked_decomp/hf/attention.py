"""The ``"chunked_decomp"`` attention function: attention over a compressed cache layer's factors without
rebuilding them (``decode_attention="factored"``), registered with transformers' ``AttentionInterface``.

A factored cache layer hands the attention, instead of rebuilt keys and values, stand-in tensors that carry a
`~chunked_decomp.backends.context.FactoredContext`; this function attends over it through the path
`chunked_decomp.backends.dispatch` chooses. For anything else (a prefill without compressed chunks, another
cache) it is transformers' SDPA attention. Masks come from transformers' SDPA mask function, registered under the
same name. :func:`use_factored_attention` switches a model to it, :func:`restore_attention` back, and
:func:`factored_attention_blocker` says, from the model, whether it can serve it (``decode_attention="auto"``).
"""

from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from chunked_decomp.backends import dispatch
from chunked_decomp.backends.context import CONTEXT_ATTR

ATTENTION_NAME = "chunked_decomp"
_PREVIOUS_ATTR = "_chunked_decomp_previous_attn"


# Arguments transformers' models pass to an attention function that do not change what a factored layer computes
# (masks come as attention_mask; positions are already in the cached keys; weights are never returned).
_IGNORED = frozenset(
    {
        "position_ids",
        "num_items_in_batch",
        "output_hidden_states",
        "output_attentions",
        "output_router_logits",
        "use_cache",
    }
)
# Arguments SDPA cannot honour: the model's own eager attention serves them while no chunk is compressed.
_EAGER_ONLY = ("softcap", "s_aux")


def factored_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function: attention over a `FactoredContext` when ``key`` carries one, the model's
    attention otherwise (SDPA, or its own eager attention for arguments SDPA cannot honour, such as Gemma-2's
    ``softcap``). Returns (batch, q_len, q_heads, d_v) and no weights.

    Over a factored context ``softcap`` is applied as transformers' eager attention does (``tanh(s / c) * c`` on the
    scaled scores, before the mask); any other argument that would change the result (packed sequences, attention
    sinks, a sliding window, non-causal attention) is refused with a ValueError naming it, never dropped.
    """
    ctx = getattr(key, CONTEXT_ATTR, None)
    if ctx is None:
        if key.device.type == "meta":
            raise ValueError(
                "the attention received stand-in keys without their compressed context: this model's attention "
                "changes the keys between the cache update and the attention call, which "
                "decode_attention='factored' cannot follow; use decode_attention='rebuild'"
            )
        if any(kwargs.get(k) is not None for k in _EAGER_ONLY):
            mask = _additive_mask(attention_mask, query, key)
            return _eager(module)(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout and module.training:
        raise ValueError("decode_attention='factored' is for inference: dropout must be 0")
    softcap = _checked(kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return dispatch.attend(query, ctx, attention_mask, scale, softcap=softcap), None


def _checked(kwargs: dict) -> float | None:
    """The softcap among the extra attention arguments, after refusing those a factored layer cannot honour."""
    for name, value in kwargs.items():
        if value is None or name in _IGNORED or name == "softcap" or (name == "is_causal" and value):
            continue
        raise ValueError(
            f"decode_attention='factored' cannot honour the attention argument {name}={value!r} of this model "
            "(it would change the scores the factors give); use decode_attention='rebuild'"
        )
    return kwargs.get("softcap")


def _additive_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The SDPA-style mask this attention is given (None for plain causal attention, or boolean with True =
    attend) as the additive float mask eager attention adds to its scores."""
    if mask is None:
        q, k = query.shape[-2], key.shape[-2]
        mask = (
            torch.arange(k, device=query.device)[None, :]
            <= torch.arange(k - q, k, device=query.device)[:, None]
        )
        mask = mask[None, None]
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
        ~mask, torch.finfo(query.dtype).min
    )


def _eager(module: torch.nn.Module):
    """The eager attention function of ``module``'s modeling file (where transformers keeps each model's own)."""
    forward = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if forward is None:
        raise ValueError(
            f"{type(module).__name__} asks for attention arguments SDPA cannot honour ({', '.join(_EAGER_ONLY)}) and "
            "its modeling file has no eager_attention_forward; use decode_attention='rebuild'"
        )
    return forward


def factored_attention_blocker(model: torch.nn.Module) -> str | None:
    """Why ``model``'s attention cannot run over a factored cache (``decode_attention="auto"`` then rebuilds), or
    ``None`` when it can. Read from the model, before any forward:

    * no ``set_attn_implementation`` or no config: the attention function cannot be switched;
    * latent attention (a ``kv_lora_rank`` in the config, DeepSeek-V2/V3): the attention derives its keys from
      what the cache returns, so stand-ins cannot pass through;
    * attention sinks (an attention module with a ``sinks`` parameter, gpt-oss): a logit the factored path does
      not add.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        return "the model cannot switch its attention function"
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(text, "kv_lora_rank", None):
        return "latent attention derives its keys from what the cache returns"
    if any(isinstance(getattr(m, "sinks", None), torch.nn.Parameter) for m in model.modules()):
        return "its attention adds learned sink logits"
    return None


def register() -> None:
    """Register the attention and mask functions under ``"chunked_decomp"`` (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, factored_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def use_factored_attention(model: torch.nn.Module) -> None:
    """Switch ``model`` to the ``"chunked_decomp"`` attention (SDPA for everything but a factored cache);
    :func:`restore_attention` switches back."""
    register()
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) == ATTENTION_NAME:
        return
    model.__dict__[_PREVIOUS_ATTR] = config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)


def restore_attention(model: torch.nn.Module) -> None:
    """Undo :func:`use_factored_attention` (nothing when it was not used)."""
    previous = model.__dict__.pop(_PREVIOUS_ATTR, None)
    if previous is not None:
        model.set_attn_implementation(previous)
