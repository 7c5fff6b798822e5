"""Tiny in-process transformers models and inputs for the tests (no downloads).

Every factory builds its model from a config under a fixed seed, so two calls give identical weights. The
models cover the layouts the cache must handle:

- ``llama``: grouped-query attention (4 query heads, 2 KV heads, head_dim 16) with rotary embeddings;
- ``qwen2``: the same geometry with q/k/v biases;
- ``qwen2_hybrid``: Qwen2 whose last two of four layers use a sliding window of 16 (mixed layer types);
- ``mistral``: every layer a sliding-window layer (window 32; Mistral in transformers 5.x sets no
  ``layer_types``, so a ``sliding_window`` makes every layer sliding);
- ``gpt2``: no rotary embedding, learned absolute positions, 4 KV heads of 16;
- ``bert``: encoder-only (refused by ChunkedDecomp).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128
HEAD_DIM = 16
# No end-of-sequence token, so generate() always runs for max_new_tokens and outputs compare position by position.
COMMON = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=None, pad_token_id=0)
DECODER = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def build(model_cls: type, config) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_cls(config)
    return model.eval()


def tiny_llama(**extra) -> LlamaForCausalLM:
    return build(LlamaForCausalLM, LlamaConfig(**DECODER, **COMMON, **extra))


def tiny_qwen2(**extra) -> Qwen2ForCausalLM:
    return build(Qwen2ForCausalLM, Qwen2Config(**DECODER, **COMMON, **extra))


def tiny_qwen2_hybrid(**extra) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        **{**DECODER, "num_hidden_layers": 4},
        **COMMON,
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=2,
        **extra,
    )
    return build(Qwen2ForCausalLM, config)


def tiny_mistral(**extra) -> MistralForCausalLM:
    return build(MistralForCausalLM, MistralConfig(**DECODER, **COMMON, sliding_window=32, **extra))


def tiny_gpt2(**extra) -> GPT2LMHeadModel:
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **COMMON, **extra)
    return build(GPT2LMHeadModel, config)


def tiny_bert(**extra) -> BertForMaskedLM:
    config = BertConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        **extra,
    )
    return build(BertForMaskedLM, config)


TINY_MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "qwen2_hybrid": tiny_qwen2_hybrid,
    "mistral": tiny_mistral,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
}


# With the default initialisation (0.02) a tiny model's attention is nearly uniform (normalised entropy 1.00), so
# even garbage keys barely move its logits; at 0.2 the attention is peaked (entropy about 0.6 on the tiny Llama)
# and a rank-2 cache moves the logits by about half their norm, so the tests can tell a defect from rounding.
PEAKED_INIT = 0.2


def make_tiny_model(name: str, dtype: torch.dtype | None = None, peaked: bool = False) -> torch.nn.Module:
    """A fresh tiny model by name (see ``TINY_MODELS``), optionally cast to ``dtype``; ``peaked``: initialised
    at ``PEAKED_INIT``, so that its attention, and so its logits, react to errors in the cache."""
    model = TINY_MODELS[name](**({"initializer_range": PEAKED_INIT} if peaked else {}))
    return model.to(dtype) if dtype is not None else model


def random_ids(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """(batch, length) token ids in [3, VOCAB), reproducible by seed (ids 0-2 stay free for special tokens)."""
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def make_bpe_tokenizer(text: str):
    """A small byte-pair tokenizer (128 tokens, Metaspace pre-tokenizer) trained offline on ``text``'s paragraphs,
    with ``<pad>``, ``</s>`` and ``<unk>`` special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<pad>", "</s>", "<unk>"])
    tok.train_from_iterator(text.split("\n\n"), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@torch.no_grad()
def stepwise_logits(model, config, ids: torch.Tensor, steps: list[int], mask=None) -> torch.Tensor:
    """Feed ``ids`` in pieces of the given lengths through one compressed cache (``config``); all logits
    (batch, seq, vocab)."""
    from chunked_decomp import ChunkedSVDCache
    from chunked_decomp.hf.models import cache_kwarg_name

    cache = ChunkedSVDCache.from_model(model, config)
    name = cache_kwarg_name(model)
    out, at = [], 0
    for n in steps:
        kwargs = {name: cache, "use_cache": True}
        if mask is not None:
            kwargs["attention_mask"] = mask[:, : at + n]
        out.append(model(input_ids=ids[:, at : at + n], **kwargs).logits)
        at += n
    return torch.cat(out, dim=1)
