"""Group-wise min/max integer quantisation with real bit packing (no transformers import).

A tensor is split into groups of ``group_size`` consecutive values along ``group_dim``; each group stores its
minimum and step (``scale``) in ``scale_dtype`` and each value a ``bits``-bit code, packed ``8 // bits`` codes to a
byte along the last dimension. Asymmetric min/max quantisation as in KIVI (Liu et al., 2024,
arXiv:2402.02750). Bytes stored = packed codes + 2 × groups × bytes of ``scale_dtype``.

Slicing a prefix along ``group_dim`` keeps every surviving group's scale valid, which is how a cache crops
compressed chunks without re-quantising them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 4, 8)


@dataclass
class QuantizedTensor:
    """A packed, group-quantised tensor.

    Attributes:
        codes: ``uint8``, the original shape with the last dimension packed to ``ceil(n_last * bits / 8)``.
        scale: step per group, ``scale_dtype``; the original shape with ``group_dim`` replaced by the group count.
        minimum: minimum per group, same shape and dtype as ``scale``.
        shape: original shape.
        bits: bits per code.
        group_size: values per group along ``group_dim``.
        group_dim: dimension the groups run along (negative index).
        dtype: dtype to dequantise to.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    shape: tuple[int, ...]
    bits: int
    group_size: int
    group_dim: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes really held: packed codes plus scales and minima."""
        return _nbytes(self.codes) + _nbytes(self.scale) + _nbytes(self.minimum)

    def dequantize(self) -> torch.Tensor:
        """Rebuild the tensor in ``dtype`` with ``shape``."""
        n = self.shape[-1]
        if self.group_dim % len(self.shape) == len(self.shape) - 1 and n % self.group_size == 0:
            # Fast path (every factor the cache stores): groups tile the last dim, so scales broadcast.
            codes = unpack_codes(self.codes, self.bits, n)
            codes = codes.reshape(*codes.shape[:-1], n // self.group_size, self.group_size).to(torch.float32)
            out = torch.addcmul(
                self.minimum.to(torch.float32).unsqueeze(-1),
                codes,
                self.scale.to(torch.float32).unsqueeze(-1),
            )
            return out.reshape(self.shape).to(self.dtype)
        codes = unpack_codes(self.codes, self.bits, self.shape[-1]).to(torch.float32)
        scale = _expand_groups(self.scale.to(torch.float32), self.group_dim, self.group_size, self.shape)
        minimum = _expand_groups(self.minimum.to(torch.float32), self.group_dim, self.group_size, self.shape)
        return (codes * scale + minimum).to(self.dtype)

    def slice_prefix(self, length: int) -> QuantizedTensor:
        """Keep the first ``length`` entries along ``group_dim`` (which must not be the last, packed dim)."""
        dim = self.group_dim % len(self.shape)
        if dim == len(self.shape) - 1:
            raise ValueError(
                "slice_prefix needs the groups to run along a dimension other than the packed one"
            )
        n_groups = -(-length // self.group_size)
        shape = list(self.shape)
        shape[dim] = length
        return QuantizedTensor(
            codes=self.codes.narrow(dim, 0, length).clone(),
            scale=self.scale.narrow(dim, 0, n_groups).clone(),
            minimum=self.minimum.narrow(dim, 0, n_groups).clone(),
            shape=tuple(shape),
            bits=self.bits,
            group_size=self.group_size,
            group_dim=self.group_dim,
            dtype=self.dtype,
        )

    def narrow_prefix(self, dim: int, length: int) -> QuantizedTensor:
        """Keep the first ``length`` entries along any ``dim`` (packed, grouped or plain); copies, so the result
        holds only its own bytes."""
        nd = len(self.shape)
        dim = dim % nd
        shape = list(self.shape)
        shape[dim] = length
        gdim = self.group_dim % nd
        if dim == nd - 1:
            codes = self.codes[..., : -(-length * self.bits // 8)]
        else:
            codes = self.codes.narrow(dim, 0, length)
        n_par = -(-length // self.group_size) if dim == gdim else length
        return QuantizedTensor(
            codes=codes.clone(),
            scale=self.scale.narrow(dim, 0, n_par).clone(),
            minimum=self.minimum.narrow(dim, 0, n_par).clone(),
            shape=tuple(shape),
            bits=self.bits,
            group_size=self.group_size,
            group_dim=self.group_dim,
            dtype=self.dtype,
        )

    def index_select(self, dim: int, index: torch.Tensor) -> QuantizedTensor:
        """Select entries of a leading (batch-like) dimension that is neither packed nor grouped."""
        dim = dim % len(self.shape)
        if dim in (len(self.shape) - 1, self.group_dim % len(self.shape)):
            raise ValueError("index_select works on dimensions that are neither packed nor grouped")
        shape = list(self.shape)
        shape[dim] = index.numel()
        return QuantizedTensor(
            codes=self.codes.index_select(dim, index.to(self.codes.device)),
            scale=self.scale.index_select(dim, index.to(self.scale.device)),
            minimum=self.minimum.index_select(dim, index.to(self.minimum.device)),
            shape=tuple(shape),
            bits=self.bits,
            group_size=self.group_size,
            group_dim=self.group_dim,
            dtype=self.dtype,
        )

    def __getitem__(self, index: int | tuple[int, ...]) -> QuantizedTensor:
        """Index leading dimensions (neither packed nor grouped) with integers: ``q[i, j]``."""
        index = index if isinstance(index, tuple) else (index,)
        if len(index) >= len(self.shape) - 1 or (self.group_dim % len(self.shape)) < len(index):
            raise IndexError("only leading dimensions that are neither packed nor grouped can be indexed")
        return QuantizedTensor(
            self.codes[index],
            self.scale[index],
            self.minimum[index],
            tuple(self.shape[len(index) :]),
            self.bits,
            self.group_size,
            self.group_dim,
            self.dtype,
        )

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """Move codes and scales to ``device``."""
        return QuantizedTensor(
            self.codes.to(device),
            self.scale.to(device),
            self.minimum.to(device),
            self.shape,
            self.bits,
            self.group_size,
            self.group_dim,
            self.dtype,
        )


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    group_dim: int = -1,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedTensor:
    """Quantise ``x`` (any shape, ≥ 1 dim) to ``bits`` bits in groups of ``group_size`` along ``group_dim``.

    Computation is in float32 whatever ``x.dtype``; a group whose values are all equal gets a zero step and
    reconstructs exactly. The last group along ``group_dim`` may be shorter.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if x.dim() == 0:
        raise ValueError("quantize needs a tensor with at least one dimension")
    shape = tuple(x.shape)
    dim = group_dim % x.dim()
    xf = x.to(torch.float32)
    n = shape[dim]
    n_groups = -(-n // group_size)
    pad = n_groups * group_size - n
    moved = xf.movedim(dim, -1)
    if pad:
        # Repeat the edge value so the padding changes no group's min or max.
        moved = torch.cat([moved, moved[..., -1:].expand(*moved.shape[:-1], pad)], dim=-1)
    grouped = moved.reshape(*moved.shape[:-1], n_groups, group_size)
    gmin = grouped.amin(dim=-1)
    gmax = grouped.amax(dim=-1)
    levels = (1 << bits) - 1
    # Round the group parameters to their storage dtype first, so the codes are computed against exactly
    # what dequantisation will use.
    minimum = gmin.to(scale_dtype)
    scale = ((gmax - minimum.float()) / levels).to(scale_dtype)
    scale_f = scale.float()
    safe = torch.where(scale_f > 0, scale_f, torch.ones_like(scale_f))
    # In place after the subtraction: one temporary of the input's size instead of three.
    codes = (grouped - minimum.float().unsqueeze(-1)).div_(safe.unsqueeze(-1)).round_().clamp_(0, levels)
    codes = codes.reshape(*moved.shape[:-1], n_groups * group_size)[..., :n].movedim(-1, dim)
    return QuantizedTensor(
        codes=pack_codes(codes.to(torch.uint8), bits),
        scale=scale.movedim(-1, dim).contiguous(),
        minimum=minimum.movedim(-1, dim).contiguous(),
        shape=shape,
        bits=bits,
        group_size=group_size,
        group_dim=dim - x.dim(),
        dtype=x.dtype,
    )


def _expand_groups(p: torch.Tensor, group_dim: int, group_size: int, shape: tuple[int, ...]) -> torch.Tensor:
    dim = group_dim % len(shape)
    return p.repeat_interleave(group_size, dim=dim).narrow(dim, 0, shape[dim])


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``uint8`` codes below ``2**bits`` along the last dim, ``8 // bits`` to a byte.

    codes: (..., n) uint8 → (..., ceil(n * bits / 8)) uint8.
    """
    if bits == 8:
        return codes.contiguous()
    per_byte = 8 // bits
    n = codes.shape[-1]
    pad = (-n) % per_byte
    if pad:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], pad)], dim=-1)
    codes = codes.reshape(*codes.shape[:-1], -1, per_byte)
    # OR-ing shifted slices is several times faster than a uint8 sum over a broadcast shift.
    packed = codes[..., 0] | (codes[..., 1] << bits)
    for i in range(2, per_byte):
        packed |= codes[..., i] << (i * bits)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: (..., ceil(n * bits / 8)) uint8 → (..., n) uint8."""
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    per_byte = 8 // bits
    # One shift-and-mask per code position, stacked: a few times faster than broadcasting a shift tensor.
    parts = (
        [packed & mask]
        + [(packed >> (i * bits)) & mask for i in range(1, per_byte - 1)]
        + [packed >> (8 - bits)]
    )
    codes = torch.stack(parts, dim=-1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n]


def quantized_nbytes(
    shape: tuple[int, ...], bits: int, group_size: int, group_dim: int, scale_bytes: int = 2
) -> int:
    """Bytes :func:`quantize` stores for a tensor of ``shape`` (without building it)."""
    dim = group_dim % len(shape)
    lead = 1
    for s in shape[:-1]:
        lead *= s
    code_bytes = lead * (-(-shape[-1] * bits // 8))
    groups = 1
    for i, s in enumerate(shape):
        groups *= -(-s // group_size) if i == dim else s
    return code_bytes + 2 * groups * scale_bytes
