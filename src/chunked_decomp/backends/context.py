"""`FactoredContext`: one layer's cached states as the factored attention reads them (no transformers import).

The exact sinks and window as tensors, the compressed chunks in whichever form the chosen backend reads
(`chunked_decomp.backends.dispatch` chooses): packed quantised factors for a fused kernel, zero-padded float
factors per run of equal-length chunks for the PyTorch reference, or rebuilt keys where they cannot be scored
in factor form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# The attribute of the stand-in tensors (:meth:`FactoredContext.handles`) that carries the context.
CONTEXT_ATTR = "chunked_decomp_context"


@dataclass
class FactoredContext:
    """One layer's cached states at one update (taken before any chunk ages out of the window).

    sink_*: (batch, kv_heads, S, d) exact; tail_*: (batch, kv_heads, L, d) exact, the new tokens last;
    key_runs / value_runs: per run of equal-length chunks, (token (batch, kv_heads, n, w, T), channel
    (batch, kv_heads, n, w, d)) float32; keys: the compressed keys rebuilt, (batch, kv_heads, C, d), when they
    are not factored (pre-rotary keys); values likewise when the layout has no runs. key_packed / value_packed:
    the quantised `PackedFactors` themselves, read by the fused kernel (`chunked_decomp.backends.cpu_kernel`)
    instead of runs. triton: both packed kinds are read by the Triton kernel (`chunked_decomp.backends.triton`),
    with rope = (inv_freq, position of the first compressed token) when the keys were factored before the rotary
    embedding (rotated on chip), else None. keys_rope: (cos, sin), each (C, rotary_dim), when ``keys`` are
    rebuilt as factored, before the rotary embedding, for the fused kernel to rotate while it scores them
    (`chunked_decomp.backends.cpu_kernel.rope_scores`); None when ``keys`` are in the model's rotary frame.
    key_basis: pre-rotary keys on a basis shared by the layer, as their quantised `PackedFactors`, scored by the
    fused kernel from the codes (`chunked_decomp.backends.cpu_kernel.basis_rope_scores`) with ``keys_rope``,
    instead of ``keys`` rebuilt.
    """

    sink_keys: torch.Tensor
    sink_values: torch.Tensor
    tail_keys: torch.Tensor
    tail_values: torch.Tensor
    key_runs: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    value_runs: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    key_packed: Any = None
    value_packed: Any = None
    triton: bool = False
    rope: tuple[torch.Tensor, int] | None = None
    keys_rope: tuple[torch.Tensor, torch.Tensor] | None = None
    key_basis: Any = None

    @property
    def length(self) -> int:
        """Tokens covered: sinks + compressed + tail."""
        if self.keys is not None:
            compressed = self.keys.shape[-2]
        elif self.key_packed is not None or self.key_basis is not None:
            compressed = (self.key_packed or self.key_basis).length
        else:
            compressed = sum(u.shape[2] * u.shape[4] for u, _ in self.key_runs)
        return self.sink_keys.shape[-2] + compressed + self.tail_keys.shape[-2]

    def handles(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stand-ins for the keys and values a cache's ``update`` returns: meta tensors of the full shape that
        carry this context; any use other than by the factored attention fails loudly instead of attending
        to part of the sequence."""
        b, h, _, d = self.tail_keys.shape
        dv = self.tail_values.shape[-1]
        keys = torch.empty(b, h, self.length, d, device="meta", dtype=self.tail_keys.dtype)
        values = torch.empty(b, h, self.length, dv, device="meta", dtype=self.tail_values.dtype)
        setattr(keys, CONTEXT_ATTR, self)
        setattr(values, CONTEXT_ATTR, self)
        return keys, values
