"""One prefill forward for several methods whose prefill is exact.

Prefilling a long context is most of what a long-context evaluation costs (16,384 tokens of a 0.5B model take
minutes on a CPU), and for most methods it computes the same thing: their cache hands the attention back
exactly the keys and values it was given on the first update (transformers' ``DynamicCache`` and
``QuantizedCache``, and :class:`~chunked_decomp.ChunkedSVDCache`, which compresses only after the update
returns). For those methods the prefill's logits and the states offered to the cache do not depend on the
method, so one forward can offer each layer's states to every method's cache in turn
(:class:`_Broadcast`); each cache then holds what its own prefill would have left, bit for bit
(``tests/evaluation/test_shared_prefill.py`` checks it). A method that acts during the forward (kvpress's
hooks) sets :attr:`~chunked_decomp.evaluation.methods.KVMethod.exact_prefill` false and prefills on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache

from chunked_decomp.evaluation.methods import KVMethod, PrefilledContext
from chunked_decomp.hf.models import cache_kwarg_name

__all__ = ["prefill_together"]


class _Broadcast(DynamicCache):
    """The cache the shared forward runs on: exact states for the attention, and every update offered to
    ``caches`` as well."""

    def __init__(self, config: Any, caches: Sequence[Cache]):
        super().__init__(config=config)
        self.caches = list(caches)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for cache in self.caches:
            cache.update(key_states, value_states, layer_idx, *args, **kwargs)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@torch.no_grad()
def prefill_together(
    model: torch.nn.Module, methods: Sequence[KVMethod], input_ids: torch.Tensor
) -> list[PrefilledContext]:
    """``[method.prefill(model, input_ids) for method in methods]``, with one forward for all the methods whose
    prefill is exact (the others run their own)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
    shared = [m for m in methods if m.exact_prefill]
    contexts: dict[int, PrefilledContext] = {}
    if len(shared) > 1:
        caches = [m.new_cache(model) for m in shared]
        broadcast = _Broadcast(model.config, caches)
        out = model(
            input_ids=input_ids, use_cache=True, logits_to_keep=1, **{cache_kwarg_name(model): broadcast}
        )
        last_logits = out.logits[:, -1].float()
        del out, broadcast  # the exact copy is not kept
        n_tokens, batch = input_ids.shape[1], input_ids.shape[0]
        for method, cache in zip(shared, caches):
            method.after_prefill(cache)
            storage = method.storage(model, cache, n_tokens, batch)
            contexts[id(method)] = PrefilledContext(cache, last_logits.clone(), n_tokens, storage)
    for method in methods:
        if id(method) not in contexts:
            contexts[id(method)] = method.prefill(model, input_ids)
    return [contexts[id(m)] for m in methods]
