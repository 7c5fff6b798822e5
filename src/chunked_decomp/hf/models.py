"""What the library needs to know about a transformers model: its decoder config, layer types, rotary
embedding, cache geometry, and the name of its cache argument.

transformers renamed the cache argument of ``forward``/``generate`` from ``past_key_values`` to ``cache`` (the old
name is deprecated until 5.40). kvpress pins transformers < 5.3, where only ``past_key_values`` exists, so the
library speaks both (:func:`cache_kwarg_name`, :func:`output_cache`).
"""

from __future__ import annotations

import inspect

import torch


def text_config(model: torch.nn.Module):
    """The decoder's text config of a transformers model."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(
            f"expected a transformers PreTrainedModel, got {type(model).__name__} without a .config"
        )
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


# Bidirectional encoders: transformers can still build a "causal LM head" for some of them (BertLMHeadModel),
# which generates only when the config is explicitly switched to decoder mode. The command line also reads this
# list, to refuse such a model from its config before loading the weights.
ENCODER_ONLY_TYPES = frozenset(
    {"albert", "bert", "big_bird", "camembert", "convbert", "data2vec-text", "deberta", "deberta-v2", "distilbert",
     "electra", "ernie", "esm", "flaubert", "funnel", "ibert", "layoutlm", "longformer", "megatron-bert",
     "mobilebert", "modernbert", "mpnet", "nezha", "nystromformer", "rembert", "roberta", "roberta-prelayernorm",
     "roc_bert", "roformer", "squeezebert", "xlm", "xlm-roberta", "xlm-roberta-xl", "xmod", "yoso"}
)  # fmt: skip


def check_decoder_only(model: torch.nn.Module) -> None:
    """Refuse models that keep no self-attention KV cache (encoder-only) or that are encoder-decoders."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    name = type(model).__name__
    if getattr(config, "model_type", None) in ENCODER_ONLY_TYPES and not getattr(config, "is_decoder", False):
        raise ValueError(
            f"{name} ({config.model_type}) is an encoder-only model: it attends to the whole input at once and keeps "
            "no key-value cache, so there is nothing to compress. Use a decoder-only causal LM (AutoModelForCausalLM)."
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{name} is an encoder-decoder model; ChunkedDecomp compresses the self-attention KV cache of "
            "decoder-only causal language models (Llama, Qwen2, Mistral, GPT-2 families)"
        )
    if not hasattr(model, "generate") or not getattr(model, "can_generate", lambda: False)():
        raise ValueError(
            f"{name} ({getattr(config, 'model_type', '?')}) cannot generate text: it is an encoder-only model, which "
            "attends to the whole input at once and keeps no key-value cache, so there is nothing to compress. "
            "Use a decoder-only causal LM (AutoModelForCausalLM)."
        )


def decoder_layout(model: torch.nn.Module) -> tuple[list[str], list[int | None]]:
    """Per decoder layer: its attention type and sliding window (``None`` for full attention)."""
    cfg = text_config(model)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    if n is None:
        raise ValueError(f"cannot find the number of layers in {type(cfg).__name__}")
    types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if types is None:
        kind = "sliding_attention" if window is not None else "full_attention"
        types = [kind] * n
    types = list(types)
    windows = [window if t in ("sliding_attention", "chunked_attention") else None for t in types]
    if any(t == "chunked_attention" for t in types):
        chunk = getattr(cfg, "attention_chunk_size", None)
        windows = [chunk if t == "chunked_attention" else w for t, w in zip(types, windows)]
    return types, windows


def rotary_inv_freq(model: torch.nn.Module) -> torch.Tensor | None:
    """Inverse frequencies of the model's (global) rotary embedding, or ``None`` without one (GPT-2)."""
    for name, module in model.named_modules():
        if name.endswith("rotary_emb") and hasattr(module, "inv_freq"):
            inv = getattr(module, "original_inv_freq", None)
            if inv is None:
                inv = module.inv_freq
            return inv.detach().to(torch.float32).cpu().clone()
    return None


def cache_geometry(model: torch.nn.Module) -> tuple[int, int, int]:
    """(num_layers, kv_heads, head_dim) of a decoder."""
    cfg = text_config(model)
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return int(layers), int(kv), int(head_dim)


def cache_kwarg_name(model: torch.nn.Module) -> str:
    """Name of the keyword under which ``model.forward`` takes its KV cache: ``"cache"`` or ``"past_key_values"``."""
    params = inspect.signature(model.forward).parameters
    if "cache" in params:
        return "cache"
    return "past_key_values"


def output_cache(outputs) -> object | None:
    """The cache object returned by a model forward, whichever attribute name this transformers uses."""
    for name in ("cache", "past_key_values"):
        value = getattr(outputs, name, None)
        if value is not None:
            return value
    return None
