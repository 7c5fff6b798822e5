"""What the library needs to know about a transformers model: its decoder config, layer types, rotary
embedding, cache geometry, and the name of its cache argument.

transformers renamed the cache argument of ``forward``/``generate`` from ``past_key_values`` to ``cache`` (the old
name is deprecated until 5.40). kvpress pins transformers < 5.3, where only ``past_key_values`` exists, so the
library speaks both (:func:`cache_kwarg_name`, :func:`output_cache`).
"""

from __future__ import annotations

import inspect
import logging
import weakref

import torch

logger = logging.getLogger("chunked_decomp")


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


def rotary_inv_freq(model: torch.nn.Module, layer_type: str = "full_attention") -> torch.Tensor | None:
    """Inverse frequencies of the model's rotary embedding for layers of ``layer_type`` (per-layer-type
    frequencies, as Gemma-3 keeps them, else the model's one set), float32 on the CPU; ``None`` without a rotary
    embedding (GPT-2). The frequencies before any dynamic rescaling are taken (``original_inv_freq``): the ones
    the keys of the first positions were rotated with."""
    for name, module in model.named_modules():
        if not name.endswith("rotary_emb"):
            continue
        for attr in (
            f"{layer_type}_original_inv_freq",
            f"{layer_type}_inv_freq",
            "original_inv_freq",
            "inv_freq",
        ):
            inv = getattr(module, attr, None)
            if isinstance(inv, torch.Tensor):
                return inv.detach().to(torch.float32).cpu().clone()
    return None


def has_rotary_embedding(model: torch.nn.Module) -> bool:
    """Whether the model has a module that looks like a rotary embedding (found or not)."""
    return any("rotary" in name.lower() for name, _ in model.named_modules())


_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def rotary_matches(model: torch.nn.Module, layer_idx: int, inv_freq: torch.Tensor) -> bool:
    """Whether the keys layer ``layer_idx`` caches are rotated as the library rotates them (the "rotate half"
    layout over the first ``2 * len(inv_freq)`` channels, at these frequencies): the same four tokens are run at
    positions 0-3 and 7-10, and the second keys must be the first rotated by 7 positions. Checked once per model
    and layer (two forward passes of four tokens)."""
    from transformers import DynamicCache

    from chunked_decomp.core.rotary import rotate

    seen = _VERIFIED.setdefault(model, {})
    if layer_idx in seen:
        return seen[layer_idx]
    device = next(model.parameters()).device
    ids = torch.tensor([[5, 6, 7, 8]], device=device) % max(
        int(getattr(text_config(model), "vocab_size", 9)), 9
    )
    keys = []
    for offset in (0, 7):
        cache = DynamicCache(config=model.config)
        positions = torch.arange(offset, offset + 4, device=device)[None]
        model(input_ids=ids, position_ids=positions, **{cache_kwarg_name(model): cache}, use_cache=True)
        keys.append(cache.layers[layer_idx].keys.float())
    moved = rotate(keys[0], torch.full((4,), 7, device=device), inv_freq)
    error = float((moved - keys[1]).norm() / keys[1].norm().clamp_min(1e-30))
    seen[layer_idx] = error < 1e-2
    return seen[layer_idx]


def layer_inv_freqs(model: torch.nn.Module, layer_types: list[str]) -> list[torch.Tensor | None]:
    """The rotary frequencies of each decoder layer, each checked against the model (:func:`rotary_matches`) on
    the first layer of its type. A rotary embedding the library cannot follow (another layout, keys changed
    after the rotation) gives ``None`` with a warning: those layers' keys are factored as the model caches them
    (after the rotary embedding) instead of silently being turned the wrong way."""
    out: list[torch.Tensor | None] = []
    checked: dict[str, torch.Tensor | None] = {}
    for i, kind in enumerate(layer_types):
        if kind not in checked:
            inv = rotary_inv_freq(model, kind)
            if inv is None and has_rotary_embedding(model):
                logger.warning(
                    "%s: no rotary frequencies found for %s layers; their keys are compressed after the rotary "
                    "embedding", type(model).__name__, kind,
                )  # fmt: skip
            elif inv is not None and not rotary_matches(model, i, inv):
                logger.warning(
                    "%s: the keys of %s layers are not rotated as the library expects (rotate-half layout at "
                    "the model's frequencies); they are compressed after the rotary embedding",
                    type(model).__name__, kind,
                )  # fmt: skip
                inv = None
            checked[kind] = inv
        out.append(checked[kind])
    return out


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
