"""`CompressionPlan`: the pieces a layer compresses with, composed once from a `CompressionConfig`.

Every variant the config names by a flag is a piece chosen here (a rank policy, a chunking, a codec, the kinds
with a shared basis, …), so the engine composes them instead of testing flags, and nothing reads the config
after the plan is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from chunked_decomp.compression.budget import Budget
from chunked_decomp.compression.chunking import Chunking
from chunked_decomp.compression.ranks import AdaptiveRank, FixedRank, FullRank, RankPolicy, SplitRank
from chunked_decomp.compression.weights import UnitWeights
from chunked_decomp.config import CompressionConfig
from chunked_decomp.core.factors import FactorCodec

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class CompressionPlan:
    """What a layer's compression is made of.

    budget, chunking: how many bytes and which tokens; sink_tokens: first tokens kept exact; reference_dtype:
    the uncompressed cache the budget refers to (None: the layer's own dtype); codec: how factors are stored;
    policy: how ranks are chosen; pooled: ranks chosen across the layers of a step; weights: how much each unit's
    energy counts; joined: one matrix over every head instead of one per head; factorizer / cuda_factorizer: the
    factoriser for chunks off and on a CUDA device; target_rank: the sketch size a fixed rank asks of a factoriser;
    min_rank_ratio: the rank floor; shared_kinds: the kinds ("k", "v") factored on a basis shared by the layer;
    corrections: chunks spend what a shared basis leaves on their own rows; keys_pre_rope: keys factored before
    the rotary embedding; batched: the layers' chunks compressed together at the end of a forward pass.
    """

    budget: Budget
    chunking: Chunking
    sink_tokens: int
    reference_dtype: torch.dtype | None
    codec: FactorCodec
    codec_choices: tuple[FactorCodec, ...]
    policy: RankPolicy
    pooled: bool
    weights: UnitWeights
    joined: bool
    factorizer: str
    cuda_factorizer: str
    target_rank: int | None
    min_rank_ratio: float
    shared_kinds: frozenset[str]
    corrections: bool
    keys_pre_rope: bool
    batched: bool
    debug: bool

    def factorizer_for(self, device_type: str) -> str:
        """The factoriser for chunks on a device of type ``device_type``."""
        return self.cuda_factorizer if device_type == "cuda" else self.factorizer

    @classmethod
    def from_config(cls, cfg: CompressionConfig) -> CompressionPlan:
        """The plan of ``cfg``; its ``head_weights`` must be resolved (lists or None, not ``"auto"`` or a path)."""
        if isinstance(cfg.head_weights, str):
            raise ValueError(
                f"head_weights={cfg.head_weights!r} is resolved against a model: build the cache with "
                "ChunkedSVDCache.from_model(model, config), or give the weights as lists"
            )
        return cls(
            budget=Budget(cfg.compression_ratio),
            chunking=Chunking(cfg.chunk_size, cfg.residual_length, cfg.dynamic_chunking),
            sink_tokens=cfg.num_sink_tokens,
            reference_dtype=None if cfg.reference_dtype is None else DTYPES[cfg.reference_dtype],
            codec=_codec(cfg),
            codec_choices=_codec_choices(cfg),
            policy=_policy(cfg),
            pooled=cfg.rank_allocation == "pooled",
            weights=UnitWeights(cfg.key_weight, cfg.head_weights, cfg.head_weights_power),
            joined=cfg.head_mode == "joined",
            factorizer=cfg.factorizer_for("cpu"),
            cuda_factorizer=cfg.factorizer_for("cuda"),
            target_rank=cfg.target_rank,
            min_rank_ratio=cfg.min_rank_ratio,
            shared_kinds=frozenset({"none": (), "keys": ("k",), "layer": ("k", "v")}[cfg.basis_sharing]),
            corrections=cfg.basis_corrections,
            keys_pre_rope=cfg.compress_keys_pre_rope,
            batched=cfg.parallel_processing,
            debug=cfg.debug,
        )


def _codec(cfg: CompressionConfig) -> FactorCodec:
    auto = cfg.basis_bits == "auto"
    shared = cfg.shared_basis_bits if cfg.shared_basis_bits is not None or not auto else 8
    return FactorCodec(
        quantize=cfg.use_quantization,
        token_bits=cfg.quantization_bits,
        channel_bits=4 if auto else cfg.basis_bits,
        shared_bits=shared,
        group_size=cfg.quant_group_size,
        channel_group_size=cfg.basis_group_size,
        factor_dtype=DTYPES[cfg.factor_dtype],
    )


def _codec_choices(cfg: CompressionConfig) -> tuple[FactorCodec, ...]:
    """The channel-factor formats a layer chooses among with ``basis_bits="auto"`` (none otherwise): 4 bits in
    groups of ``basis_group_size``, 4 bits in groups of 16, 8 bits."""
    if cfg.basis_bits != "auto" or not cfg.use_quantization:
        return ()
    base = _codec(cfg)
    options = [
        base,
        dataclasses.replace(base, channel_group_size=16),
        dataclasses.replace(base, channel_bits=8),
    ]
    return tuple(dict.fromkeys(options))


def _policy(cfg: CompressionConfig) -> RankPolicy:
    if not cfg.use_low_rank_approximation:
        return FullRank()
    if cfg.target_rank is not None:
        return FixedRank(cfg.target_rank)
    if cfg.adaptive_rank:
        return AdaptiveRank()
    return SplitRank(cfg.key_budget_share)
