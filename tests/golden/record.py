"""Golden outputs of the compressed cache: stored bytes, ranks per chunk, logits and greedy tokens.

Captured once (``python -m tests.golden.record`` from the repository root) and compared bit for bit by ``tests/test_golden.py``, so that a
change of structure that is meant to change no behaviour can be shown to change none. Only the public surface
is used (``ChunkedSVDCache.from_model``, ``ChunkedDecomp``, ``memory_stats``, a layer's ``chunks``), so the same
recorder runs before and after a move. Logits are compared through the SHA-256 of their float32 bytes.

Those bits, and a rank choice at a near-tie, depend on the CPU's matrix kernels: the same code gives other bits
on another machine. So each case also holds ``recorded_again``, its outputs recorded on a second kind of CPU
(from the same code, once its first outputs had been checked there: every byte count, rank and token the same,
except at such ties), with a sample of each forward's logits (`logit_sample`) compared to float tolerance.

Regenerate only when a change is meant to alter the outputs, and say why in the commit.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden.json"
sys.path.insert(0, str(HERE.parents[1]))  # the repository root, for tests.helpers

from chunked_decomp import ChunkedDecomp, ChunkedSVDCache, CompressionConfig, load_presets  # noqa: E402
from tests.helpers.models import make_tiny_model, random_ids  # noqa: E402

PREFILL, EXTEND, STEPS, GENERATE = 400, 30, 8, 6
MODELS = ("llama", "qwen2", "mistral", "gpt2", "qwen2_hybrid")
SMALL = dict(chunk_size=32, residual_length=16, num_sink_tokens=4, quant_group_size=16)
# Variants of SMALL that walk the engine's branches (run on llama; a few on every model).
VARIANTS: dict[str, dict] = {
    "small": {},
    "joined": {"head_mode": "joined"},
    "joined_fixed": {"head_mode": "joined", "adaptive_rank": False},
    "unquantised_fp32": {"use_quantization": False, "factor_dtype": "float32"},
    "unquantised_bf16": {"use_quantization": False, "factor_dtype": "bfloat16"},
    "fixed_split": {"adaptive_rank": False, "key_budget_share": 0.3},
    "target_rank": {"target_rank": 5},
    "dynamic": {"dynamic_chunking": True},
    "sequential": {"parallel_processing": False},
    "post_rope": {"compress_keys_pre_rope": False},
    "randomized": {"factorizer": "randomized"},
    "subspace": {"factorizer": "subspace"},
    "exact": {"use_fast_svd": False},
    "quant_only": {"use_low_rank_approximation": False},
    "two_bit": {"quantization_bits": 2},
    "eight_bit": {"quantization_bits": 8, "basis_bits": 8},
    "min_rank": {"min_rank_ratio": 0.25},
    "fp16_reference": {"reference_dtype": "float16"},
    "low_ratio": {"compression_ratio": 0.1, "reference_dtype": "float16"},
    "no_sinks": {"num_sink_tokens": 0},
    "many_sinks": {"num_sink_tokens": 24},
    "pooled": {"rank_allocation": "pooled"},
    "pooled_seq": {"rank_allocation": "pooled", "parallel_processing": False},
    "factored": {"decode_attention": "factored"},
    "factored_post_rope": {"decode_attention": "factored", "compress_keys_pre_rope": False},
    "factored_unquantised": {"decode_attention": "factored", "use_quantization": False},
    "shared_layer": {"basis_sharing": "layer"},
    "shared_keys": {"basis_sharing": "keys"},
    "shared_keys_no_corr": {"basis_sharing": "keys", "basis_corrections": False},
    "shared_keys_fixed": {"basis_sharing": "keys", "adaptive_rank": False},
    "shared_keys_target": {"basis_sharing": "keys", "target_rank": 4},
    "shared_keys_pooled": {"basis_sharing": "keys", "rank_allocation": "pooled"},
    "shared_layer_pooled": {"basis_sharing": "layer", "rank_allocation": "pooled"},
    "shared_keys_8bit": {"basis_sharing": "keys", "shared_basis_bits": 8},
    "shared_keys_factored": {"basis_sharing": "keys", "decode_attention": "factored"},
    "shared_keys_factored_post_rope": {
        "basis_sharing": "keys",
        "decode_attention": "factored",
        "compress_keys_pre_rope": False,
    },
    "shared_keys_unquantised": {"basis_sharing": "keys", "use_quantization": False},
    "shared_keys_many_sinks": {"basis_sharing": "keys", "num_sink_tokens": 24},
    "head_weights": {"head_weights": [[[1.0, 3.0], [2.0, 0.5]], [[0.5, 1.0], [1.0, 4.0]]]},
    "head_weights_pooled": {
        "head_weights": [[[1.0, 3.0], [2.0, 0.5]], [[0.5, 1.0], [1.0, 4.0]]],
        "head_weights_power": 0.5,
        "rank_allocation": "pooled",
    },
    "key_weight": {"key_weight": 1.0},
}
EVERY_MODEL = ("small", "shared_keys", "pooled", "factored", "joined")


def peaked_llama():
    """The tiny Llama with its query and key weights scaled up, so its attention is peaked (a sensitive model)."""
    model = make_tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


def make_model(name: str):
    return peaked_llama() if name == "llama_peaked" else make_tiny_model(name)


def cases() -> list[tuple[str, str, dict]]:
    """(case id, model, options): every preset on every model, the variants on llama (and the peaked llama), a
    few variants on every model."""
    out = []
    for preset, options in load_presets().items():
        for model in MODELS:
            out.append((f"{model}/preset:{preset}", model, dict(options)))
    for name, extra in VARIANTS.items():
        models = MODELS + ("llama_peaked",) if name in EVERY_MODEL else ("llama", "llama_peaked")
        for model in models:
            out.append((f"{model}/{name}", model, {**SMALL, **extra}))
    return out


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()[:32]


SAMPLES = 16


def logit_sample(t: torch.Tensor) -> list[float]:
    """``SAMPLES`` evenly spaced values of ``t`` (flattened), then its mean and mean magnitude, to 7 digits."""
    flat = t.detach().double().flatten()
    picked = flat[torch.linspace(0, flat.numel() - 1, SAMPLES).round().long()].tolist()
    return [float(f"{x:.7g}") for x in [*picked, flat.mean().item(), flat.abs().mean().item()]]


def _state(cache) -> dict:
    stats = cache.memory_stats()
    layers = []
    for layer in cache.layers:
        chunks = getattr(layer, "chunks", None)
        if chunks is None:
            layers.append(None)
            continue
        layers.append(
            [[c.start, c.length, list(c.keys.ranks), list(c.values.ranks), int(c.nbytes)] for c in chunks]
        )
    return {
        "stored_bytes": [int(s.stored_bytes) for s in stats.per_layer],
        "seq_length": int(stats.seq_length),
        "chunks": layers,
    }


def _forward(model, ids, cache):
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return model(input_ids=ids, use_cache=True, **{name: cache}).logits


@torch.no_grad()
def run_case(model_name: str, options: dict) -> dict:
    """The outputs of one case (see the module docstring for what is compared)."""
    torch.set_num_threads(1)
    model = make_model(model_name)
    # The cases were recorded when decoding rebuilt chunks unless told otherwise; "auto" (now the default) picks
    # the factored attention, which the "factored" cases record.
    config = CompressionConfig.from_dict({"decode_attention": "rebuild", **options})
    cache = ChunkedSVDCache.from_model(model, config)
    ids = random_ids(PREFILL + EXTEND, batch=2, seed=1)
    logits = [_forward(model, ids[:, :PREFILL], cache)]
    after_prefill = _state(cache)
    logits.append(_forward(model, ids[:, PREFILL:], cache))
    tokens = []
    for _ in range(STEPS):
        nxt = logits[-1][:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt[:, 0].tolist())
        logits.append(_forward(model, nxt, cache))
    after_decode = _state(cache)
    cache.reorder_cache(torch.tensor([1, 0]))
    logits.append(_forward(model, ids[:, :1], cache))
    if all(hasattr(layer, "chunks") for layer in cache.layers):  # sliding-window layers cannot crop
        cache.crop(-40)
    logits.append(_forward(model, ids[:, 5:9], cache))
    cache.compress_all()
    after_compress_all = _state(cache)
    logits.append(_forward(model, ids[:, 9:10], cache))
    cache.batch_select_indices(torch.tensor([1]))
    logits.append(_forward(model, ids[1:, 10:11], cache))
    # generate() through the wired model: greedy tokens.
    cd = ChunkedDecomp(config=config)
    wired = make_model(model_name)
    with cd.applied(wired):
        out = wired.generate(ids[:1, :PREFILL], max_new_tokens=GENERATE, do_sample=False)
    report = cd.memory_report()
    return {
        "states": [after_prefill, after_decode, after_compress_all],
        "tokens": tokens,
        "logits": [_digest(x) for x in logits],
        "logit_samples": [logit_sample(x) for x in logits],
        "generated": out[0, PREFILL:].tolist(),
        "generate_stored_bytes": int(report["stored_bytes"]),
    }


def prepare_backends() -> None:
    """Build the fused CPU kernel first, so every case takes the same backends whatever ran before it."""
    try:
        from chunked_decomp.backends import cpu_kernel as kernels
    except ImportError:  # the layout before the redesign
        from chunked_decomp import kernels
    if not kernels.available():
        raise RuntimeError("the golden outputs are recorded with the fused CPU kernel built")


def main() -> None:
    prepare_backends()
    results = {}
    all_cases = cases()
    for i, (case, model, options) in enumerate(all_cases):
        results[case] = {"model": model, "options": options, **run_case(model, options)}
        print(f"[{i + 1}/{len(all_cases)}] {case}", flush=True)
    # One case a line: a diff names the cases that changed.
    lines = [f"  {json.dumps(case)}: {json.dumps(results[case], sort_keys=True)}" for case in sorted(results)]
    GOLDEN.write_text("{\n" + ",\n".join(lines) + "\n}\n")


if __name__ == "__main__":
    main()
