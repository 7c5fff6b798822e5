"""GPU profile of the decode attention over factors and of the cache's compression (needs CUDA and triton).

Where `benchmarks/gpu_attention.py` gives end-to-end medians, this splits them, to say what to work on next:

- attention at the issue's sizes (Llama-3.1-8B layer, batch 4): `triton.testing.do_bench` (CUDA events around the
  Python call, so launch overhead counts) against `do_bench_cudagraph` (the same calls replayed from a CUDA graph:
  kernel time only), for SDPA and for ours, and the CUDA time of each kernel of ours (torch.profiler);
- ``factorize_subspace`` on one layer's 32k-token prefill and the cache's ``compress_all`` of it: CUDA time per
  kernel and CPU time per operator (torch.profiler), top entries.

    python benchmarks/gpu_profile.py --out benchmarks/results/gpu/gpu_profile.json

Prints tables; writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from common import run_metadata
from gpu_attention import SINKS, add_shape_args, setting

from chunked_decomp.backends import triton as triton_attention
from chunked_decomp.core.decomposition import factorize_subspace
from chunked_decomp.io import atomic_write_json


def top_kernels(prof, n: int = 8, key: str = "device_time_total") -> list[dict]:
    """The n entries of a torch.profiler run with the most ``key`` (µs): name, calls, total µs."""
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)[:n]
    return [dict(name=e.key[:90], calls=e.count, us=round(getattr(e, key, 0.0), 1)) for e in rows]


def profiled(fn, reps: int = 5):
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return prof


def attention_profile(args, device) -> list[dict]:
    import triton

    gen = torch.Generator(device=device).manual_seed(0)
    d = args.head_dim
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    rows = []
    for context, budget in ((8192, 0.125), (32768, 0.25), (32768, 0.125)):
        qg, kp, vp, ex_k, ex_v, kfull, vfull, q, rank, ratio = setting(args, device, context, budget, gen)

        def sdpa(q=q, k=kfull, v=vfull):
            return F.scaled_dot_product_attention(q, k, v, scale=d**-0.5, enable_gqa=True)

        row = dict(context=context, budget=budget, rank=rank)
        row["sdpa_ms"] = triton.testing.do_bench(sdpa, return_mode="median")
        row["sdpa_graph_ms"] = triton.testing.do_bench_cudagraph(sdpa, return_mode="median")
        for pre_rope, cfg in (
            (False, dict(num_warps=4, block_tokens=64)),
            (True, dict(num_warps=4, block_tokens=32)),
        ):
            key = "pre" if pre_rope else "post"

            def ours(pre_rope=pre_rope, cfg=cfg, qg=qg, kp=kp, vp=vp, ex_k=ex_k, ex_v=ex_v):
                return triton_attention.attention(qg, kp, vp, ex_k, ex_v, d**-0.5,
                                                  inv_freq=inv_freq if pre_rope else None, rope_offset=SINKS,
                                                  **cfg)  # fmt: skip

            row[f"{key}_ms"] = triton.testing.do_bench(ours, return_mode="median")
            row[f"{key}_graph_ms"] = triton.testing.do_bench_cudagraph(ours, return_mode="median")
            row[f"{key}_kernels"] = top_kernels(profiled(ours), n=6)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del kp, vp, kfull, vfull
        torch.cuda.empty_cache()
    return rows


def compression_profile(args, device) -> dict:
    from chunked_decomp import CompressionConfig
    from chunked_decomp.hf.cache import ChunkedSVDCache

    b, h, d, length, chunk = args.batch, args.kv_heads, args.head_dim, args.prefill, 256
    gen = torch.Generator(device=device).manual_seed(1)
    scale = torch.logspace(0, -2, d, device=device)
    kv = (torch.randn(2, b, h, length, d, device=device, generator=gen) * scale).to(torch.bfloat16)
    x = kv.view(-1, chunk, d)
    out = {}
    prof = profiled(lambda: factorize_subspace(x, iters=3), reps=1)
    out["subspace_cuda"] = top_kernels(prof, n=10)
    out["subspace_cpu"] = top_kernels(prof, n=10, key="self_cpu_time_total")
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    config = CompressionConfig(compression_ratio=0.25, reference_dtype="float16")

    def compress():
        cache = ChunkedSVDCache(config, inv_freq=inv_freq, layer_types=["full_attention"])
        cache.update(kv[0], kv[1], 0)
        cache.compress_all()

    prof = profiled(compress, reps=1)
    out["compress_cuda"] = top_kernels(prof, n=12)
    out["compress_cpu"] = top_kernels(prof, n=16, key="self_cpu_time_total")
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(parser)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu/gpu_profile.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available() or triton_attention.triton is None:
        raise SystemExit("gpu_profile.py needs a CUDA GPU and triton")
    device = torch.device("cuda")
    info = run_metadata("gpu", "torch")
    attention = attention_profile(args, device)
    compression = compression_profile(args, device)
    print("\ncontext budget  SDPA (graph)   post-RoPE (graph)   pre-RoPE (graph)   ms")
    for r in attention:
        print(f"{r['context']:>7} {r['budget']:>6}  {r['sdpa_ms']:.3f} ({r['sdpa_graph_ms']:.3f})   "
              f"{r['post_ms']:.3f} ({r['post_graph_ms']:.3f})   {r['pre_ms']:.3f} ({r['pre_graph_ms']:.3f})")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, dict(info=info, attention=attention, compression=compression))


if __name__ == "__main__":
    main()
