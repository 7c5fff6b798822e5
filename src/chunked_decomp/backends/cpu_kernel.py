"""A fused CPU kernel for attention over quantised factors (no transformers import).

`attention.attend` computes a query's scores over a compressed chunk as ``(q Vᵀ) U`` and its share of the output
as ``(p Uᵀ) V``. In PyTorch that needs U dequantised to float32 first (unpack, convert, scale, pad), and that pass,
not the arithmetic, bounded decoding. The two C++ functions here read the packed codes of every chunk of a layer
directly from `PackedFactors`' flat buffers, one quantisation group at a time, so nothing of the size of the
compressed cache is materialised:

- ``scores(q, …)``: (batch, kv_heads, rows, d) query rows → (batch, kv_heads, rows, C) scores over the C
  compressed tokens;
- ``values(p, …)``: (batch, kv_heads, rows, C) attention weights → (batch, kv_heads, rows, d) output share;
- ``dequant_into(out, dest, …)``: quantised rows dequantised straight into their rows of a padded buffer, for the
  rebuild of chunks (one pass instead of unpack, convert, scale and copy), once the kernel is built;
- ``rope_scores(q, k, cos, sin)``: scores over keys rebuilt before the rotary embedding, rotated on the fly, for
  pre-rotary keys (which cannot be scored in factor form: the rotation depends on each token's position).

Each function splits its work over torch's intra-op threads (``torch.set_num_threads``): the scores and value sums
by factor and batch row, ``rope_scores`` by key, ``dequant_into`` by row. Within a factor a quantisation group of
every component is decoded once into floats, then the query rows are summed over the components in register
tiles (3 rows × 32 tokens, 12 accumulators of 8 floats), and the scales and minima are read as stored (float32,
float16 or bfloat16), with no float32 copy per call.

The extension is compiled on first use with ``torch.utils.cpp_extension.load_inline`` (a C++ compiler and
ninja are needed; about a minute once, then cached by torch). When it cannot be built, or with
``CHUNKED_DECOMP_KERNELS=0``, :func:`available` is False and the attention keeps its PyTorch path.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger("chunked_decomp")

# The C++ source lives beside this module (package data), read once at import.
_SOURCE = (Path(__file__).resolve().parent / "kernels" / "factored_attention.cpp").read_text(encoding="utf-8")

_MODULE = None
_TRIED = False


def available() -> bool:
    """Whether the fused kernel is built (building it on first call) and not disabled."""
    return _load() is not None


def built() -> bool:
    """Whether the kernel is already built in this process (never starts a build). The rebuild path uses it only
    then, so that decoding that rebuilds never waits for, nor writes, a compilation; the factored attention (the
    default on a CPU), which asks for :func:`available`, builds it."""
    return _MODULE is not None and os.environ.get("CHUNKED_DECOMP_KERNELS", "1") != "0"


# OpenMP: at::parallel_for runs on torch's intra-op threads (torch.set_num_threads); the process's OpenMP runtime
# is torch's, already loaded. A compiler without OpenMP (Apple's clang) builds the same source without the flag,
# under another name, and at::parallel_for runs serially: (module name, OpenMP flags), tried in order.
_BUILDS = (
    ("chunked_decomp_factored_attention", ("-fopenmp",)),
    ("chunked_decomp_factored_attention_serial", ()),
)


def _build(name: str, openmp: tuple[str, ...]):
    """Compile (or load from torch's extension cache) the kernel source as module ``name``."""
    from torch.utils.cpp_extension import load_inline  # imports setuptools, which a venv may lack

    return load_inline(
        name=name,
        cpp_sources=_SOURCE,
        functions=["scores", "values", "dequant_into", "rope_scores", "basis_rope_scores"],
        extra_cflags=["-O3", "-ffast-math", "-march=native", *openmp],
        extra_ldflags=list(openmp),
        verbose=False,
    )


def _load():
    global _MODULE, _TRIED
    if os.environ.get("CHUNKED_DECOMP_KERNELS", "1") == "0":
        return None
    if not _TRIED:
        _TRIED = True
        logger.info("loading the fused factored-attention kernel (compiled once per machine: about a minute)")
        for name, openmp in _BUILDS:
            try:
                _MODULE = _build(name, openmp)
                break
            except Exception as err:  # no compiler, no ninja, no setuptools, a failed build
                logger.warning(
                    "fused factored-attention kernel unavailable%s (%s); %s",
                    " with OpenMP" if openmp else "",
                    err,
                    "building it without" if openmp else "using the PyTorch path",
                )
    return _MODULE


def _exact(states: torch.Tensor | None, like: torch.Tensor, d: int) -> torch.Tensor:
    """Exact sink or tail states (batch, kv_heads, n, d) as the kernel reads them (float32, contiguous); none:
    n = 0 (batch and heads those of ``like``)."""
    if states is None:
        return like.new_empty(*like.shape[:2], 0, d)
    return states.float().contiguous()


def scores(
    query: torch.Tensor,
    packed,
    sink_keys: torch.Tensor | None = None,
    tail_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """query: (batch, kv_heads, rows, d) float32 → (batch, kv_heads, rows, S + C + L): the scores over the S exact
    sink keys, the C compressed tokens of ``packed`` (a quantised `PackedFactors` of keys) and the L exact tail
    keys, each (batch, kv_heads, S or L, d) (none: 0 tokens), in one call."""
    q = query.contiguous()
    return _load().scores(
        q,
        _exact(sink_keys, q, q.shape[-1]),
        _exact(tail_keys, q, q.shape[-1]),
        *packed.kernel_inputs(),
        packed.length,
    )


def rope_scores(
    query: torch.Tensor,
    keys: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    sink_keys: torch.Tensor | None = None,
    tail_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """query: (batch, kv_heads, rows, d) float32, keys: (batch, kv_heads, C, d) factored before the rotary
    embedding, cos / sin: (C, rotary_dim) of the keys' positions → (batch, kv_heads, rows, S + C + L) scores of
    the exact sink keys, the rotated keys (rotated on the fly: never written) and the exact tail keys, as
    :func:`scores`."""
    q = query.contiguous()
    d = q.shape[-1]
    return _load().rope_scores(q, _exact(sink_keys, q, d), _exact(tail_keys, q, d), keys.float().contiguous(),
                               cos.float().contiguous(), sin.float().contiguous())  # fmt: skip


def basis_rope_scores(
    query: torch.Tensor,
    packed,
    cos: torch.Tensor,
    sin: torch.Tensor,
    sink_keys: torch.Tensor | None = None,
    tail_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """As :func:`rope_scores`, for pre-rotary keys held as ``packed`` (a `PackedFactors` of quantised token
    coefficients on a basis shared by the layer, ``basis_fusable``, with any correction rows of their own):
    rebuilt from the codes a group of tokens at a time inside the kernel, never as a (C, d) tensor."""
    q = query.contiguous()
    d = q.shape[-1]
    return _load().basis_rope_scores(
        q, _exact(sink_keys, q, d), _exact(tail_keys, q, d), *packed.basis_kernel_inputs(),
        cos.float().contiguous(), sin.float().contiguous(), packed.length,
    )  # fmt: skip


def dequant_into(
    out: torch.Tensor,
    dest: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    bits: int,
    group_size: int,
    n: int,
) -> None:
    """``out[dest[i], :n]`` = quantised row i dequantised, in one pass. out: (N, ≥ n) float32 contiguous;
    codes: (rows, ceil(n·bits/8)) uint8; scale / minimum: (rows, ceil(n / group_size)) float32, float16 or
    bfloat16."""
    _load().dequant_into(
        out, dest, codes.contiguous(), scale.contiguous(), minimum.contiguous(), bits, group_size, n
    )


def values(
    probs: torch.Tensor,
    packed,
    sink_values: torch.Tensor | None = None,
    tail_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """probs: (batch, kv_heads, rows, S + C + L) attention weights, laid out as :func:`scores` returns them →
    (batch, kv_heads, rows, d): the weighted sum of the exact sink values, the values of ``packed`` (a quantised
    `PackedFactors`, C tokens) and the exact tail values, each (batch, kv_heads, S or L, d) (none: 0 tokens)."""
    p = probs.contiguous()
    d = packed.head_dim
    sink, tail = _exact(sink_values, p, d), _exact(tail_values, p, d)
    if p.shape[-1] != sink.shape[-2] + packed.length + tail.shape[-2]:
        raise ValueError(
            f"probs cover {p.shape[-1]} tokens, but the sinks, compressed chunks and tail hold "
            f"{sink.shape[-2]} + {packed.length} + {tail.shape[-2]}"
        )
    return _load().values(p, sink, tail, *packed.kernel_inputs(), d)
