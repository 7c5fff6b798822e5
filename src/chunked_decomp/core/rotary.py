"""Undo and redo rotary position embeddings on cached keys (no transformers import).

Keys reach the cache already rotated: ``k_p = R(p) k`` (Su et al., RoFormer, arXiv:2104.09864). The rotation
spins each pair of channels at its own frequency, which spreads a low-dimensional key subspace across many
dimensions and raises the rank a chunk needs. Factoring ``R(-i) k`` instead, where ``i`` is the token's index
in the cache, and applying ``R(i)`` on reconstruction is exact in exact arithmetic (rotations are orthogonal),
whatever the model's real positions are: with left padding a row's true position is ``i - pad``, so the
factored keys are all turned by the same fixed ``R(-pad)``, which changes no rank.

Convention: the "rotate half" layout of Llama, Qwen2 and Mistral in transformers, over the first
``2 * len(inv_freq)`` channels (partial rotary models leave the rest untouched).
"""

from __future__ import annotations

import torch

_TABLES: list[tuple[tuple, torch.Tensor, torch.Tensor, torch.Tensor]] = []
_TABLES_KEPT = 4


def _cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """cos and sin of ``positions × inv_freq``: two (seq, rot_dim) float32 tensors."""
    freqs = positions.to(device=device, dtype=torch.float32)[:, None]
    freqs = freqs * inv_freq.to(device=device, dtype=torch.float32)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def range_cos_sin(
    start: int, length: int, inv_freq: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """`_cos_sin` of ``start … start + length - 1``; the last few ranges are kept, because every layer of a
    decoding step asks for the same one."""
    key = (start, length, str(device))
    for k, freq, cos, sin in _TABLES:
        if k == key and freq.shape == inv_freq.shape and torch.equal(freq, inv_freq.to(freq.device)):
            return cos, sin
    cos, sin = _cos_sin(torch.arange(start, start + length, device=device), inv_freq, device)
    _TABLES.insert(0, (key, inv_freq.detach().to(device=device, dtype=torch.float32).clone(), cos, sin))
    del _TABLES[_TABLES_KEPT:]
    return cos, sin


def _apply(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    rot_dim = cos.shape[-1]
    half = rot_dim // 2
    k_rot, k_pass = k[..., :rot_dim], k[..., rot_dim:]
    # k·cos + rotate_half(k)·sin, half by half in place (no negated copy, no concatenation): the same floats.
    lo, hi = k_rot[..., :half], k_rot[..., half:]
    out = k_rot * cos
    out[..., :half].addcmul_(hi, sin[..., :half], value=1.0 if inverse else -1.0)
    out[..., half:].addcmul_(lo, sin[..., half:], value=-1.0 if inverse else 1.0)
    if k_pass.shape[-1] == 0:
        return out
    return torch.cat((out, k_pass), dim=-1)


def rotate_range(
    keys: torch.Tensor, start: int, inv_freq: torch.Tensor, inverse: bool = False
) -> torch.Tensor:
    """`rotate` at the consecutive positions ``start … start + seq - 1``, with cached cos/sin tables.

    keys: (batch, heads, seq, head_dim); returns float32.
    """
    k = keys.to(torch.float32)
    cos, sin = range_cos_sin(int(start), k.shape[-2], inv_freq, k.device)
    return _apply(k, cos, sin, inverse)


def rotate(
    keys: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False
) -> torch.Tensor:
    """Apply ``R(positions)`` (or its inverse) to keys.

    keys: (batch, heads, seq, head_dim), any float dtype; positions: (seq,) integer or float;
    inv_freq: (rotary_dim // 2,) float. Computed in float32, returned in float32.
    """
    k = keys.to(torch.float32)
    cos, sin = _cos_sin(positions, inv_freq, k.device)
    return _apply(k, cos, sin, inverse)
