"""`CompressionConfig`: every option of ChunkedDecomp in one validated dataclass.

Command-line flags, YAML presets and code all land here, so defaults live in one place.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from chunked_decomp.config.checks import choice, integer, number

_DTYPES = ("float16", "bfloat16", "float32")
_QUANT_BITS = (2, 4, 8)
_HEAD_MODES = ("per_head", "joined")
_FACTORIZERS = ("gram", "randomized", "exact", "subspace")
_BASIS_SHARING = ("none", "layer", "keys")
_DECODE_ATTENTION = ("auto", "rebuild", "factored")
_RANK_ALLOCATION = ("per_layer", "pooled")
_FLAGS = (
    "dynamic_chunking",
    "use_low_rank_approximation",
    "adaptive_rank",
    "compress_keys_pre_rope",
    "basis_corrections",
    "use_fast_svd",
    "use_quantization",
    "parallel_processing",
    "enable_gradient_checkpointing",
    "debug",
)


@dataclass
class CompressionConfig:
    """Options of the chunked low-rank KV cache.

    Budget
        compression_ratio: stored bytes ÷ bytes of the same tokens in an uncompressed cache of
            ``reference_dtype`` (the model's cache dtype when ``None``). It counts everything the cache keeps for
            the tokens that have left the residual window: factors, quantisation scales and the exact sink tokens.
            In (0, 1].
        reference_dtype: dtype of the uncompressed cache the ratio refers to; ``"float16"`` gives the literature's
            convention for a model that runs in float32 on CPU. ``None`` = the model's own cache dtype.

    Chunking
        chunk_size: tokens per compressed chunk (≥ 4).
        residual_length: most recent tokens kept exact (≥ 0). A chunk is compressed when it ages out of this
            window, so between ``residual_length`` and ``residual_length + chunk_size - 1`` recent tokens are exact.
        num_sink_tokens: first tokens of the sequence kept exact forever (attention sinks, Xiao et al. 2023).
        dynamic_chunking: at prefill, split the span to compress into near-equal chunks between ``chunk_size``
            and ``2 * chunk_size`` tokens instead of leaving a short remainder in the exact window, and size
            chunks up to ``2 * chunk_size`` when the sequence is long (``>= 32 * chunk_size`` tokens), which
            spreads the fixed cost of each chunk's basis over more tokens.

    Rank
        use_low_rank_approximation: factor chunks into low rank (False = keep full rank and only quantise the
            per-chunk basis coefficients, which needs ``use_quantization``).
        adaptive_rank: choose ranks per chunk, layer, key/value and head from the singular-value energy within
            the byte budget; otherwise one rank per chunk from the budget.
        target_rank: fix the rank instead of deriving it from the budget (then the budget is a result).
        min_rank_ratio: no rank below ``ceil(min_rank_ratio * full_rank)``; in [0, 1].
        basis_sharing: ``"none"`` gives every chunk its own basis (channel factor). ``"layer"`` computes one
            basis per layer, kind and head from the first span compressed (its principal directions) and projects
            every chunk on it, so a chunk stores only its token coefficients; the basis is stored once, at
            ``basis_bits``, cut to the rank that span keeps (its rows are paid in that span's budget; later chunks
            keep at most that many). ``"keys"`` shares the keys' basis only, values keep a basis per chunk
            (pre-rotary keys keep one subspace across a layer's chunks, values do not). With a shared basis a
            compression step chooses one rank per layer, kind and head for all its chunks.
        basis_corrections: with a shared basis, chunks spend the bytes the shared rows leave (later chunks keep
            at most the rows the first span kept) on their own components of what those rows miss: the residual's
            leading singular vectors, stored as extra rows of the chunk's channel factor.
        head_mode: ``"per_head"`` factors each KV head alone; ``"joined"`` factors the heads of a layer together
            (one basis over ``kv_heads * head_dim`` columns).
        compress_keys_pre_rope: undo the rotary embedding before factoring keys and redo it on reconstruction
            (rotary models only; ignored for models without rotary embeddings).
        decode_attention: ``"rebuild"`` rebuilds a layer's compressed keys and values each step and runs the
            model's own attention; ``"factored"`` attends over the factors without rebuilding them (values always;
            keys when ``compress_keys_pre_rope`` is off, else keys are rebuilt), through the ``"chunked_decomp"``
            attention function, which the cache switches the model to (SDPA for everything else); ``"auto"``
            (default) is ``"factored"`` for a model on a CPU whose attention can be served that way
            (:func:`~chunked_decomp.hf.attention.factored_attention_blocker`: not latent attention, not attention
            sinks) once the fused CPU kernel builds, and ``"rebuild"`` elsewhere (without the kernel, or on a GPU
            with Triton, attending over the factors is no faster), decided when the cache meets the model
            (``ChunkedSVDCache.from_model``; a cache built without the model rebuilds).
        key_budget_share: fraction of a chunk's byte budget given to keys (the rest to values) when
            ``adaptive_rank`` is off; in (0, 1).
        key_weight: with ``adaptive_rank``, the energy share of key components is multiplied by this before
            components are ranked by energy per byte (> 1 favours keys, whose errors pass through the softmax);
            > 0.
        rank_allocation: with ``adaptive_rank``, ``"per_layer"`` chooses each chunk's ranks against that layer's
            own share of the budget; ``"pooled"`` chooses the ranks of all chunks compressed in the same step (all
            layers, keys and values, every head) against their summed budget, by one energy-share-per-byte
            ranking, so a layer whose spectrum is flatter gets more rank and one whose energy sits in a few
            components less. Stored bytes still meet the budget in total, not layer by layer. The pool is the
            chunks of one batched compression call (``parallel_processing``: up to 8 MB of tokens, i.e. all layers
            of a decoding step, or several layers of a long prefill at a time; one chunk of one layer without it).
        head_weights: with ``adaptive_rank``, a weight per layer, key/value and KV head multiplying the energy
            shares of that head's components (on top of ``key_weight``): ``[[key_weights, value_weights], ...]``,
            one pair of lists per decoder layer, ``kv_heads`` positive numbers each; ``None`` = all 1;
            ``"auto"`` = the weights shipped with the package for the model (SmolLM2-135M-Instruct), all 1 with a
            warning for other models; or the path of a JSON file written by ``chunked-decomp calibrate``. Strings
            are kept as given (the config round-trips) and resolved when the cache meets the model
            (:mod:`chunked_decomp.config.head_weights`). Needs ``head_mode="per_head"`` (``"auto"`` gives joined heads
            no weights). Measured with
            :func:`chunked_decomp.evaluation.calibration.head_sensitivity` (how much the loss reacts to each head's error).
        head_weights_power: exponent applied to ``head_weights`` where they are used (> 0): 0.5 takes the square
            root and damps them (the shipped weights are calibrated at power 0.5, so 0.5 here gives power 0.25);
            1 uses them as given.

    Factoriser and quantiser
        use_fast_svd: factor with batched matrix products (Gram matrix + small symmetric eigensolver, or a
            randomized range finder) instead of ``torch.linalg.svd``.
        factorizer: ``"gram"``, ``"randomized"``, ``"subspace"`` or ``"exact"``; ``None`` picks ``"gram"`` when
            ``use_fast_svd`` (``"subspace"`` for chunks on a GPU, where batched eigensolvers are orders of magnitude
            slower than matrix products) else ``"exact"``.
        use_quantization: store factors as packed integers with per-group min/max scales.
        quantization_bits: bits of the token coefficients (2, 4 or 8).
        basis_bits: bits of the basis vectors (2, 4 or 8), or ``"auto"``: each layer chooses, for keys and for
            values, at its first compression, among 4 bits in groups of ``basis_group_size``, 4 bits in groups of
            16 and 8 bits, the format whose measured quantisation error leaves the most weighted energy within the
            budget (a basis with a few large channels needs finer steps; one without spends the bytes on rank);
            a basis shared by the layer is then stored at 8 bits (it is stored once).
        shared_basis_bits: bits of a basis shared by a layer's chunks (``basis_sharing``), which is stored once
            per layer rather than once per chunk; ``None`` = ``basis_bits``.
        quant_group_size: values per quantisation group (≥ 8).
        basis_group_size: values per quantisation group of the basis vectors (channel factors and shared bases;
            ≥ 8); ``None`` = ``quant_group_size``. Smaller groups give a basis row with a few large channels
            (outliers) its own scales where they are, instead of stretching one scale over the whole row.
        factor_dtype: dtype of unquantised factors and of quantisation scales.

    Execution
        parallel_processing: the chunks that age out during a forward pass wait exact until the last layer has
            been updated, then the chunks of all layers are factored and encoded in batched calls of up to 8 MB
            (float32) each, instead of one call per chunk. Ranks are still chosen per layer and chunk; the
            result equals compressing one chunk at a time up to float rounding.
        enable_gradient_checkpointing: refused — the cache is an inference structure (see ``__post_init__``).
        debug: log every compression with its ranks, bytes and relative error (also ``CHUNKED_DECOMP_DEBUG=1``).
    """

    compression_ratio: float = 0.25
    reference_dtype: str | None = None
    chunk_size: int = 256
    residual_length: int = 64
    num_sink_tokens: int = 4
    dynamic_chunking: bool = False
    use_low_rank_approximation: bool = True
    adaptive_rank: bool = True
    target_rank: int | None = None
    min_rank_ratio: float = 0.0
    head_mode: str = "per_head"
    basis_sharing: str = "none"
    basis_corrections: bool = True
    compress_keys_pre_rope: bool = True
    decode_attention: str = "auto"
    key_budget_share: float = 0.5
    key_weight: float = 4.0
    rank_allocation: str = "per_layer"
    head_weights: list[list[list[float]]] | str | None = None
    head_weights_power: float = 1.0
    use_fast_svd: bool = True
    factorizer: str | None = None
    use_quantization: bool = True
    quantization_bits: int = 4
    basis_bits: int | str = 4
    shared_basis_bits: int | None = None
    quant_group_size: int = 64
    basis_group_size: int | None = None
    factor_dtype: str = "float16"
    parallel_processing: bool = True
    enable_gradient_checkpointing: bool = False
    debug: bool = False

    def __post_init__(self) -> None:
        self._check_numbers()
        self._check_choices()
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self._check_combinations()
        self._check_head_weights()
        if os.environ.get("CHUNKED_DECOMP_DEBUG", "") not in ("", "0", "false", "False"):
            self.debug = True

    def _check_numbers(self) -> None:
        self.compression_ratio = number("compression_ratio", self.compression_ratio)
        if not (0.0 < self.compression_ratio <= 1.0):
            raise ValueError(f"compression_ratio must be in (0, 1], got {self.compression_ratio}")
        choice("reference_dtype", self.reference_dtype, _DTYPES, optional=True)
        integer("chunk_size", self.chunk_size, minimum=4)
        integer("residual_length", self.residual_length, minimum=0)
        integer("num_sink_tokens", self.num_sink_tokens, minimum=0)
        if self.target_rank is not None:
            integer("target_rank", self.target_rank, minimum=1)
        self.min_rank_ratio = number("min_rank_ratio", self.min_rank_ratio)
        if not (0.0 <= self.min_rank_ratio <= 1.0):
            raise ValueError(f"min_rank_ratio must be in [0, 1], got {self.min_rank_ratio}")
        self.key_budget_share = number("key_budget_share", self.key_budget_share)
        if not (0.0 < self.key_budget_share < 1.0):
            raise ValueError(f"key_budget_share must be in (0, 1), got {self.key_budget_share}")
        self.key_weight = number("key_weight", self.key_weight)
        if not self.key_weight > 0:
            raise ValueError(f"key_weight must be > 0, got {self.key_weight}")

    def _check_choices(self) -> None:
        choice("rank_allocation", self.rank_allocation, _RANK_ALLOCATION)
        choice("head_mode", self.head_mode, _HEAD_MODES)
        choice("decode_attention", self.decode_attention, _DECODE_ATTENTION)
        choice("basis_sharing", self.basis_sharing, _BASIS_SHARING)
        choice("factorizer", self.factorizer, _FACTORIZERS, optional=True)
        for name in ("quantization_bits", "basis_bits", "shared_basis_bits"):
            value = getattr(self, name)
            if (name == "shared_basis_bits" and value is None) or (name == "basis_bits" and value == "auto"):
                continue
            if value not in _QUANT_BITS or isinstance(value, bool):
                allowed = f"one of {_QUANT_BITS}" + (" or 'auto'" if name == "basis_bits" else "")
                raise ValueError(f"{name} must be {allowed}, got {value!r}")
        integer("quant_group_size", self.quant_group_size, minimum=8)
        if self.basis_group_size is not None:
            integer("basis_group_size", self.basis_group_size, minimum=8)
        choice("factor_dtype", self.factor_dtype, _DTYPES)

    def _check_combinations(self) -> None:
        if self.enable_gradient_checkpointing:
            raise ValueError(
                "enable_gradient_checkpointing does not apply: ChunkedDecomp compresses the KV cache at inference "
                "time and changes no weight, so there is no backward pass to checkpoint. Enable it on the model "
                "(model.gradient_checkpointing_enable()) for training, which uses no KV cache."
            )
        if not self.use_low_rank_approximation and not self.use_quantization:
            raise ValueError(
                "use_low_rank_approximation=False stores full-rank factors, which are larger than the chunk itself "
                "unless use_quantization=True; enable one of them"
            )
        if not self.use_low_rank_approximation and self.target_rank is not None:
            raise ValueError(
                "target_rank does not apply when use_low_rank_approximation=False (full rank is kept)"
            )
        if self.rank_allocation == "pooled" and not (
            self.adaptive_rank and self.use_low_rank_approximation and self.target_rank is None
        ):
            raise ValueError(
                "rank_allocation='pooled' shares the budget by energy per byte, which needs adaptive_rank=True, "
                "use_low_rank_approximation=True and target_rank=None"
            )

    def _check_head_weights(self) -> None:
        self.head_weights_power = number("head_weights_power", self.head_weights_power)
        if not self.head_weights_power > 0:
            raise ValueError(f"head_weights_power must be > 0, got {self.head_weights_power}")
        if self.head_weights is not None:
            self.head_weights = _head_weights_option(self.head_weights)
            # "auto" (as in a preset) stays valid with joined heads, which then get no weights.
            if self.head_mode != "per_head" and self.head_weights != "auto":
                raise ValueError("head_weights needs head_mode='per_head' (one weight per KV head)")

    @property
    def resolved_factorizer(self) -> str:
        """The factoriser used for chunks on the CPU: ``factorizer`` or the one ``use_fast_svd`` implies."""
        return self.factorizer_for("cpu")

    def factorizer_for(self, device_type: str) -> str:
        """The factoriser used for chunks on a device of type ``device_type`` (``"cpu"``, ``"cuda"``, …): ``factorizer`` when set; else, with ``use_fast_svd``,
        ``"gram"`` (an eigensolver on the small Gram matrix: fastest on a CPU) or, on CUDA, ``"subspace"``
        (matrix products and Cholesky factorisations only); else ``"exact"``."""
        if self.factorizer is not None:
            return self.factorizer
        if not self.use_fast_svd:
            return "exact"
        return "subspace" if device_type == "cuda" else "gram"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (round-trips through :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CompressionConfig:
        """Build from a dict, refusing unknown keys with the list of known ones."""
        if not isinstance(values, dict):
            raise ValueError(
                f"a compression config must be a mapping of option names, got {type(values).__name__}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown compression option(s) {unknown}; known options: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, path: str | Path | None = None, **overrides: Any) -> CompressionConfig:
        """Load a named preset from ``configs/compression_configs.yaml`` (or ``path``), then apply overrides."""
        from chunked_decomp.config.presets import load_presets

        presets = load_presets(path)
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; available presets: {sorted(presets)}")
        return cls.from_dict({**presets[name], **overrides})


def _head_weights_option(value: Any) -> list[list[list[float]]] | str:
    """``head_weights`` checked: ``"auto"``, the path of a readable head-weight file (kept as a string), or
    explicit weights (see :func:`~chunked_decomp.config.head_weights.check_head_weights`)."""
    from chunked_decomp.config.head_weights import ALLOWED, AUTO, check_head_weights, load_head_weights_file

    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        if value == AUTO:
            return value
        if not value.strip():
            raise ValueError(f"head_weights must be {ALLOWED}, got an empty string")
        load_head_weights_file(value)  # fails now, naming head_weights, rather than when the cache is built
        return value
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"head_weights must be {ALLOWED}, got {value!r}")
    return check_head_weights(value)
