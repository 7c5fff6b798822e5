"""A fused Triton kernel for attention over quantised factors, for GPUs (no transformers import).

The GPU counterpart of the C++ kernel in `chunked_decomp.backends.cpu_kernel`, reading the same flat buffers of
`PackedFactors` (2/4/8-bit codes packed along the last dimension, a scale and a minimum per group). One program
handles one (batch row, KV head) and a run of chunks, flash-decoding style (Dao et al., "Flash-Decoding for
long-context inference", 2023): per chunk it dequantises the factors into on-chip tiles, computes the scores of
every query row of the head's group, keeps a running softmax (maximum, sum, weighted values) and writes one partial
result; a small PyTorch step merges the partials with the exact sinks and residual window. Nothing the size of the
compressed cache is materialised: the kernel reads each packed byte once.

Keys factored after the rotary embedding are scored as ``(q Vᵀ) U`` (the query projected into the chunk's basis).
Keys factored before it (the default) are rebuilt tile by tile on chip, ``K = Uᵀ V`` and ``Uᵀ rot(V)``, and
rotated to their positions there, so the default needs no rebuild in memory either. Values are summed as
``(p Uᵀ) V``.

Triton is optional: :func:`usable` says whether this path runs for a device (CUDA with ``triton`` importable; on
the CPU only through Triton's interpreter, ``TRITON_INTERPRET=1`` with ``CHUNKED_DECOMP_TRITON=1``, which the
tests use).
"""

from __future__ import annotations

import logging
import os

import torch

try:  # optional dependency
    import triton
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

if triton is not None:
    from chunked_decomp.backends.triton_kernels import _dense_partials_kernel, _merge_kernel, _partials_kernel

_LOG2E = 1.4426950408889634
logger = logging.getLogger(__name__)


def usable(device: torch.device) -> bool:
    """Whether the Triton kernel serves tensors on ``device``: CUDA with triton installed, or the CPU under
    Triton's interpreter when asked for (``TRITON_INTERPRET=1`` and ``CHUNKED_DECOMP_TRITON=1``).
    ``CHUNKED_DECOMP_TRITON=0`` turns it off."""
    flag = os.environ.get("CHUNKED_DECOMP_TRITON")
    if triton is None or flag == "0":
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and flag == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


_FAST_FAILED: list[str] = []  # the folded-scale route failed to compile here once: use the general one


def _launch_partials(grid: tuple, buffers: tuple, launch: dict) -> None:
    """Launch `_partials_kernel`. If the folded-scale route for 4-bit post-RoPE keys fails to compile on this GPU
    and triton version (it was checked on one GPU and one triton only), warn once and use the general route, which
    computes the same attention, from then on."""
    if not _FAST_FAILED:
        try:
            _partials_kernel[grid](*buffers, **launch, ALLOW_FAST=True)
            return
        except Exception as err:  # triton.CompilationError and kin, raised before anything runs
            _FAST_FAILED.append(repr(err)[-500:])
            logger.warning(
                "chunked_decomp: Triton fast route failed to compile, using the general one: %s", err
            )
    _partials_kernel[grid](*buffers, **launch, ALLOW_FAST=False)


def _index_dtype(*packed) -> torch.dtype:
    """int32 when every buffer of the `PackedFactors` has fewer than 2**31 elements (so are all offsets into them),
    else int64."""
    largest = max(
        t.numel() for p in packed for f in (p.token, p.kernel_channel) for t in (f.codes, f.scale, f.minimum)
    )
    return torch.int32 if largest < 2**31 else torch.int64


def _layout(key_packed, value_packed) -> dict:
    """What the kernel needs besides the buffers, built once per `PackedFactors` pair (they are rebuilt whenever the
    chunks change): pairs (heads, chunks, 2) int32, the key and value factor of each (head, chunk) or -1 for a
    rank-0 pair; cstart / clen (chunks,) int32, each chunk's first compressed position and length; both per-factor
    tables on the device; the padded rank and chunk length."""
    cached = getattr(value_packed, "_triton_layout", None)
    if cached is not None and cached[0] is key_packed:
        return cached[1]
    starts, lengths = [], []
    at = 0
    for run in value_packed.runs:
        for _ in range(run["chunks"]):
            starts.append(at)
            lengths.append(run["length"])
            at += run["length"]
    index = {s: i for i, s in enumerate(starts)}
    pairs = torch.full((value_packed.heads, len(starts), 2), -1, dtype=torch.int32)
    kmeta, vmeta = key_packed.triton_table(), value_packed.triton_table()
    for role, meta in enumerate((kmeta, vmeta)):
        for f, row in enumerate(meta.tolist()):
            pairs[row[7], index[row[6]], role] = f
    device = value_packed.token.codes.device
    ranks = torch.cat([kmeta[:, 4], vmeta[:, 4]])
    layout = dict(
        pairs=pairs.to(device),
        cstart=torch.tensor(starts, dtype=torch.int32, device=device),
        clen=torch.tensor(lengths, dtype=torch.int32, device=device),
        # Offsets in 32 bits (cheaper address arithmetic, which bounds the kernel) unless a buffer is too large.
        kmeta=kmeta.to(device, _index_dtype(key_packed, value_packed)),
        vmeta=vmeta.to(device, _index_dtype(key_packed, value_packed)),
        chunks=len(starts),
        wp=_pow2(int(ranks.max()) if ranks.numel() else 1),
        tp=_pow2(max(lengths)),
    )
    value_packed._triton_layout = (key_packed, layout)
    return layout


def attention(
    query: torch.Tensor,
    key_packed,
    value_packed,
    exact_keys: torch.Tensor,
    exact_values: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    exact_bias: torch.Tensor | None = None,
    inv_freq: torch.Tensor | None = None,
    rope_offset: int = 0,
    splits: int | None = None,
    num_warps: int | None = None,
    block_tokens: int = 32,
) -> torch.Tensor:
    """Softmax attention over a layer's compressed chunks and its exact tokens, in three launches: the chunks in
    ``splits`` programs per (batch row, KV head), the exact tokens in one, and a merge.

    query: (batch, kv_heads, rows, d), rows = (group repeat, query position) as in `attention.attend`;
    key_packed / value_packed: quantised `PackedFactors` of the C compressed tokens; exact_keys / exact_values:
    (batch, kv_heads, E, d) the exact tokens (sinks, then the residual window); bias (batch, q_len, C) and
    exact_bias (batch, q_len, E): float32 added to the scores (masks; -inf hides), or None; inv_freq:
    (rot_dim // 2,) when the keys were factored before the rotary embedding (rotated on chip to positions
    ``rope_offset + i``), else None. splits, num_warps, block_tokens: launch settings (programs per (batch row,
    KV head), warps per program (default 8 with pre-rotary keys, else 4), tokens per on-chip tile; the defaults
    were the fastest of a sweep (`benchmarks/gpu_attention.py --sweep`). Returns (batch, kv_heads, rows, d) float32; a row that
    sees nothing is 0.
    """
    b, h, r, d = query.shape
    if d & (d - 1) or d < 16:
        raise ValueError(f"the Triton kernel needs a power-of-two head_dim of at least 16, got {d}")
    if block_tokens < 16 or block_tokens & (block_tokens - 1):
        raise ValueError(f"block_tokens must be a power of two of at least 16, got {block_tokens}")
    if num_warps is None:
        num_warps = 8 if inv_freq is not None else 4
    lay = _layout(key_packed, value_packed)
    n_chunks = lay["chunks"]
    rp = _pow2(r)
    per_split, splits = _splits(query, b * h, n_chunks, splits)
    slots = splits + 1  # the last slot holds the exact tokens
    dev = query.device
    m = torch.empty(b * h, slots, rp, device=dev, dtype=torch.float32)
    lsum = torch.empty_like(m)
    acc = torch.empty(b * h, slots, rp, d, device=dev, dtype=torch.float32)
    q = query.float().contiguous()
    pre_rope = inv_freq is not None
    freq = inv_freq.float().contiguous().to(dev) if pre_rope else q
    q_len = bias.shape[1] if bias is not None else 1
    launch = _launch_settings(key_packed, value_packed, lay, d, rp, per_split, block_tokens, num_warps, freq,
                              pre_rope, bias is not None, query.is_cuda)  # fmt: skip
    kt, kc = key_packed.token, key_packed.kernel_channel
    vt, vc = value_packed.token, value_packed.kernel_channel
    buffers = (
        q, bias if bias is not None else q, freq, lay["pairs"], lay["cstart"], lay["clen"],
        kt.codes, kt.scale, kt.minimum, kc.codes, kc.scale, kc.minimum, lay["kmeta"],
        vt.codes, vt.scale, vt.minimum, vc.codes, vc.scale, vc.minimum, lay["vmeta"],
        m, lsum, acc,
        h, n_chunks, key_packed.length, r, q_len, slots, int(rope_offset), scaling * _LOG2E,
    )  # fmt: skip
    _launch_partials((b * h, splits), buffers, launch)
    e = exact_keys.shape[-2]
    eb = 64
    _dense_partials_kernel[(b * h,)](
        q, exact_keys.contiguous(), exact_values.contiguous(), exact_bias if exact_bias is not None else q,
        m, lsum, acc, h, e, r, exact_bias.shape[1] if exact_bias is not None else 1, slots, splits,
        scaling * _LOG2E, D=d, RP=rp, EB=eb, BLOCKS=_pow2(-(-e // eb), floor=1), HAS_BIAS=exact_bias is not None,
    )  # fmt: skip
    out = torch.empty(b, h, r, d, device=dev, dtype=torch.float32)
    _merge_kernel[(b * h,)](m, lsum, acc, out, r, slots, D=d, RP=rp, SP=_pow2(slots, floor=1))
    return out


def _splits(query: torch.Tensor, programs: int, n_chunks: int, splits: int | None) -> tuple[int, int]:
    """(chunks per split, splits): by default enough programs to fill the GPU (a few per multiprocessor), a few
    chunks each; chunks per split a power of two, so that a growing cache compiles the kernel for a few values
    only."""
    if splits is None:
        sms = torch.cuda.get_device_properties(query.device).multi_processor_count if query.is_cuda else 4
        splits = max(1, min(n_chunks, -(-4 * sms // programs)))
    per_split = _pow2(-(-n_chunks // splits), floor=1)
    return per_split, -(-n_chunks // per_split)


def _launch_settings(
    key_packed, value_packed, lay: dict, d: int, rp: int, per_split: int, block_tokens: int, num_warps: int,
    freq: torch.Tensor, pre_rope: bool, has_bias: bool, lowp: bool,
) -> dict:  # fmt: skip
    """The compile-time settings of `_partials_kernel`: bits and group sizes of the four factor roles, tile sizes,
    and the layout flags."""
    kt, kc = key_packed.token, key_packed.kernel_channel
    vt, vc = value_packed.token, value_packed.kernel_channel
    # One software-pipelining stage: two were no faster.
    return dict(
        PER_SPLIT=per_split,
        KTB=kt.bits, KTG=kt.group_size, KCB=kc.bits, KCG=kc.group_size,
        VTB=vt.bits, VTG=vt.group_size, VCB=vc.bits, VCG=vc.group_size,
        D=d, RP=rp, WP=lay["wp"], TP=lay["tp"], TB=min(lay["tp"], block_tokens),
        HAS_BIAS=has_bias, PRE_ROPE=pre_rope, LOWP=lowp, num_stages=1, num_warps=num_warps,
        HALF=freq.numel() if pre_rope else 1,
        KCSH=key_packed.channel_shared, VCSH=value_packed.channel_shared,
    )  # fmt: skip
