"""The ``"chunked_decomp"`` attention function: attention over a compressed cache layer's factors without
rebuilding them (``decode_attention="factored"``), registered with transformers' ``AttentionInterface``.

A factored cache layer hands the attention, instead of rebuilt keys and values, stand-in tensors that carry a
`~chunked_decomp.backends.context.FactoredContext`; this function attends over it through the path
`chunked_decomp.backends.dispatch` chooses. For anything else (a prefill without compressed chunks, another
cache) it is transformers' SDPA attention. Masks come from transformers' SDPA mask function, registered under the
same name. :func:`use_factored_attention` switches a model to it, :func:`restore_attention` back.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from chunked_decomp.backends import dispatch
from chunked_decomp.backends.context import CONTEXT_ATTR

ATTENTION_NAME = "chunked_decomp"
_PREVIOUS_ATTR = "_chunked_decomp_previous_attn"


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
    """The ``AttentionInterface`` function: attention over a :class:`FactoredContext` when ``key`` carries one,
    transformers' SDPA attention otherwise. Returns (batch, q_len, q_heads, d_v) and no weights."""
    ctx = getattr(key, CONTEXT_ATTR, None)
    if ctx is None:
        if key.device.type == "meta":
            raise ValueError(
                "the attention received stand-in keys without their compressed context: this model's attention "
                "changes the keys between the cache update and the attention call, which "
                "decode_attention='factored' cannot follow; use decode_attention='rebuild'"
            )
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout and module.training:
        raise ValueError("decode_attention='factored' is for inference: dropout must be 0")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return dispatch.attend(query, ctx, attention_mask, scale), None


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
