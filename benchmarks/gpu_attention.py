"""GPU benchmark: decode attention over quantised factors (Triton) against SDPA over the full cache, and the cost of
factorising a prefill, at Llama-3.1-8B layer shapes (32 query heads, 8 KV heads, head_dim 128, batch 4).

Needs a CUDA GPU and triton. One layer, bfloat16 cache, for each context and budget:

- ``sdpa``: ``F.scaled_dot_product_attention`` (GQA) of one query token over the full bf16 keys and values;
- ``ours``: `triton_attention.attention` over the same context stored as 4 sinks + 256-token chunks of 4-bit
  factors (rank chosen for the budget of a 16-bit cache, basis 4-bit, groups of 64) + an exact residual window,
  keys factored before the rotary embedding (rotated on chip, the default) and after it, and pre-rotary keys on one
  basis per head shared by every chunk (``basis_sharing="keys"``, ``balanced``'s layout: the budget buys a higher
  rank; ``keys: "pre-RoPE, shared key basis"``).

Factors are random (the kernel's cost does not depend on their values); correctness is checked on every setting
against attention over the rebuilt states in float64 (relative error; tf32 dot products give about 1e-3).
Times are medians of `triton.testing.do_bench` (CUDA events), the ratio is sdpa ÷ ours (above 1 = ours faster).

The factorisation table times one layer's prefill (batch 4, 8 KV heads, 32k tokens, keys and values, 256-token
chunks): the ``subspace`` factoriser (the cache's default on CUDA) at 1-3 iterations with its error against the
optimal one, the Gram + eigh basis used on CPU (on a slice, scaled), the cache's whole compression of the layer,
and one pass over the bytes (a device copy), the floor. Two more checks: a tiny Llama generating with the Triton
path against the rebuild path, and one dispatched by accelerate across the GPU and the CPU.

    python benchmarks/gpu_attention.py                       # contexts 8192 32768, budgets 0.25 0.125
    python benchmarks/gpu_attention.py --out results.json

Prints tables; writes JSON (``--out``, default benchmarks/results/gpu/gpu_attention.json).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from common import run_metadata, timed

from chunked_decomp.backends import triton as triton_attention
from chunked_decomp.core.decomposition import factorize_subspace, gram_basis
from chunked_decomp.core.factors import FactorSet, SharedRows
from chunked_decomp.core.packed import PackedFactors
from chunked_decomp.core.quantization import quantize, quantized_nbytes
from chunked_decomp.core.rotary import rotate_range
from chunked_decomp.io import atomic_write_json

SINKS, WINDOW = 4, 256


def rank_for_budget(budget: float, chunk: int, head_dim: int, bits: int, group: int) -> int:
    """Rank whose 4-bit token and channel factors (with fp16 scales and minima) fill ``budget`` of a 16-bit chunk."""
    per = quantized_nbytes((1, chunk), bits, group, -1) + quantized_nbytes((1, head_dim), bits, group, -1)
    return max(1, int(budget * chunk * head_dim * 2 // per))


def synthetic_packed(batch, heads, head_dim, n_chunks, chunk, rank, bits, group, device, gen):
    """PackedFactors of random quantised factors: token (batch, rank, chunk), channel (batch, rank, head_dim)."""
    sets = []
    for _ in range(n_chunks):
        pairs = []
        for _ in range(heads):
            u = torch.randn(batch, rank, chunk, device=device, generator=gen)
            v = torch.randn(batch, rank, head_dim, device=device, generator=gen) / math.sqrt(rank)
            pairs.append((quantize(u, bits, group), quantize(v, bits, group)))
        sets.append(FactorSet(pairs, batch, chunk, heads, head_dim, False))
    return PackedFactors(sets)


def stored_bytes(*parts) -> int:
    """Bytes of quantised parts (flat roles of `PackedFactors` or `QuantizedTensor`s): codes, scales, minima."""
    return sum(t.nbytes for f in parts for t in (f.codes, f.scale, f.minimum))


def shared_key_packed(batch, heads, head_dim, n_chunks, chunk, budget, bits, group, device, gen):
    """Keys on one basis per head shared by every chunk (``basis_sharing="keys"``, ``balanced``'s layout): a chunk
    stores token factors only, so the budget buys a higher rank (capped at head_dim). Returns (PackedFactors, rank,
    bytes stored: every chunk's token factors and each head's basis once)."""
    row = quantized_nbytes((1, chunk), bits, group, -1)
    rank = max(1, min(head_dim, int(budget * chunk * head_dim * 2 // row)))
    bases = [
        quantize(torch.randn(rank, head_dim, device=device, generator=gen) / math.sqrt(rank), bits, group)
        for _ in range(heads)
    ]
    sets = []
    for _ in range(n_chunks):
        pairs = [
            (
                quantize(torch.randn(batch, rank, chunk, device=device, generator=gen), bits, group),
                SharedRows(b, rank),
            )
            for b in bases
        ]
        sets.append(FactorSet(pairs, batch, chunk, heads, head_dim, False))
    packed = PackedFactors(sets)
    return packed, rank, stored_bytes(packed.token, *bases)


def bench(fn, reps: int = 3) -> float:
    import triton

    return statistics.median(
        triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") for _ in range(reps)
    )


# Launch settings tried by --sweep: warps and token block. Software-pipelining stages (1 or 2) and the programs per
# (batch row, KV head) (a few per multiprocessor by default, or one per 4 or per 1 chunk) changed nothing or lost
# in a launch sweep (results/gpu/gpu_attention_launch_sweep.json), so they are left out.
CONFIGS = [dict(num_warps=w, block_tokens=t) for w in (4, 8) for t in (32, 64)]


def setting(args, device, context, budget, gen):
    """One layer's context at ``budget``: (query rows (b, kv, rows, d), key / value PackedFactors, exact keys and
    values, full bf16 keys and values, query (b, q_heads, 1, d), rank, stored-bytes ratio)."""
    b, hq, hkv, d = args.batch, args.q_heads, args.kv_heads, args.head_dim
    n_chunks = (context - SINKS - WINDOW) // args.chunk
    window = context - SINKS - n_chunks * args.chunk
    kfull = torch.randn(b, hkv, context, d, device=device, dtype=torch.bfloat16, generator=gen)
    vfull = torch.randn(b, hkv, context, d, device=device, dtype=torch.bfloat16, generator=gen)
    q = torch.randn(b, hq, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
    rank = rank_for_budget(budget, args.chunk, d, 4, 64)
    kp = synthetic_packed(b, hkv, d, n_chunks, args.chunk, rank, 4, 64, device, gen)
    vp = synthetic_packed(b, hkv, d, n_chunks, args.chunk, rank, 4, 64, device, gen)
    ex_k = torch.cat([kfull[:, :, :SINKS], kfull[:, :, context - window :]], dim=-2)
    ex_v = torch.cat([vfull[:, :, :SINKS], vfull[:, :, context - window :]], dim=-2)
    stored = stored_bytes(kp.token, kp.channel, vp.token, vp.channel) + 2 * ex_k.numel() * 2
    qg = q.float().reshape(b, hkv, hq // hkv, d)
    return qg, kp, vp, ex_k, ex_v, kfull, vfull, q, rank, stored / (2 * kfull.numel() * 2)


def sweep(args, device) -> dict:
    """Launch settings at the longest context and lowest budget (the issue's main case), per key mode: the
    fastest is used for every row of the table."""
    gen = torch.Generator(device=device).manual_seed(0)
    d = args.head_dim
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    qg, kp, vp, ex_k, ex_v, *_ = setting(args, device, max(args.contexts), min(args.budgets), gen)
    best = {}
    for pre_rope in (True, False):
        times = []
        for cfg in CONFIGS:
            fn = lambda cfg=cfg, pre_rope=pre_rope: triton_attention.attention(  # noqa: E731
                qg,
                kp,
                vp,
                ex_k,
                ex_v,
                d**-0.5,
                inv_freq=inv_freq if pre_rope else None,
                rope_offset=SINKS,
                **cfg,
            )
            try:
                times.append((bench(fn, reps=1), cfg))
            except Exception as err:  # e.g. out of on-chip memory for a setting
                print(json.dumps(dict(sweep=cfg, pre_rope=pre_rope, error=repr(err)[:200])), flush=True)
                continue
            print(json.dumps(dict(sweep=cfg, pre_rope=pre_rope, ms=times[-1][0])), flush=True)
        best["pre-RoPE" if pre_rope else "post-RoPE"] = min(times, key=lambda x: x[0])[1]
    print(json.dumps(dict(best=best)), flush=True)
    return best


def relative_error(got, qg, kp, vp, ex_k, ex_v, scale: float, inv_freq) -> float:
    """‖got − want‖ / ‖want‖, ``want`` the attention over the rebuilt states in float64 (keys rotated from
    position ``SINKS`` on when ``inv_freq`` is given: factored before the rotary embedding)."""
    keys = kp.reconstruct()
    if inv_freq is not None:
        keys = rotate_range(keys, SINKS, inv_freq)
    k_all = torch.cat([ex_k[:, :, :SINKS].float(), keys, ex_k[:, :, SINKS:].float()], dim=-2).double()
    v_all = torch.cat([ex_v[:, :, :SINKS].float(), vp.reconstruct(), ex_v[:, :, SINKS:].float()], -2)
    p = torch.softmax((qg.double() @ k_all.transpose(-1, -2)) * scale, dim=-1)
    want = p @ v_all.double()
    return float((got.double() - want).norm() / want.norm())


def attention_rows(args, device, best: dict) -> list[dict]:
    """Per context, budget and key mode: SDPA and ours timed, ours checked against the float64 reference."""
    gen = torch.Generator(device=device).manual_seed(0)
    d = args.head_dim
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    scale = d**-0.5
    rows = []
    for context in args.contexts:
        for budget in args.budgets:
            qg, kp_own, vp, ex_k, ex_v, kfull, vfull, q, rank, ratio = setting(
                args, device, context, budget, gen
            )
            t_sdpa = bench(
                lambda q=q, k=kfull, v=vfull: F.scaled_dot_product_attention(
                    q, k, v, scale=scale, enable_gqa=True
                )
            )
            full_bytes = 2 * kfull.numel() * 2
            # The shared key basis of balanced / long_context: its keys in place of the per-chunk ones.
            n_chunks = sum(run["chunks"] for run in kp_own.runs)
            kp_shared, rank_shared, shared_bytes = shared_key_packed(
                args.batch, args.kv_heads, d, n_chunks, args.chunk, budget, 4, 64, device, gen
            )
            key_bytes = stored_bytes(kp_own.token, kp_own.channel)
            ratio_shared = ratio + (shared_bytes - key_bytes) / full_bytes
            for pre_rope, shared in ((True, False), (False, False), (True, True)):
                freq = inv_freq if pre_rope else None
                keys_mode = "pre-RoPE" if pre_rope else "post-RoPE"
                cfg = best.get(keys_mode, {})
                kp = kp_shared if shared else kp_own
                if shared:
                    keys_mode = "pre-RoPE, shared key basis"

                def ours(freq=freq, kp=kp, vp=vp, ex_k=ex_k, ex_v=ex_v, qg=qg, cfg=cfg):
                    return triton_attention.attention(
                        qg, kp, vp, ex_k, ex_v, scale, inv_freq=freq, rope_offset=SINKS, **cfg
                    )

                err = relative_error(ours(), qg, kp, vp, ex_k, ex_v, scale, freq)
                t_ours = bench(ours)
                stored_ratio = ratio_shared if shared else ratio
                row = dict(
                    context=context, budget=budget, rank=rank_shared if shared else rank, keys=keys_mode,
                    launch=cfg, sdpa_ms=t_sdpa, ours_ms=t_ours, speedup=t_sdpa / t_ours, rel_err=err,
                    stored_ratio=stored_ratio, sdpa_TBps=full_bytes / t_sdpa / 1e9,
                    ours_TBps=stored_ratio * full_bytes / t_ours / 1e9,
                )  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
            del kp, kp_own, kp_shared, vp, kfull, vfull
            torch.cuda.empty_cache()
    return rows


def factorisation_rows(args, device) -> list[dict]:
    """One layer's prefill (batch, KV heads, ``--prefill`` tokens, keys and values) in chunks: the factorisers
    timed against one pass over the bytes; the matrix-product ones also checked for accuracy against the exact
    basis (relative error at the rank of the 0.25 budget ÷ the optimal one, on a slice); and the cache's whole
    compression of that layer (factorise, choose ranks, quantise, store), bf16 states on the GPU."""
    b, h, d, length, chunk = args.batch, args.kv_heads, args.head_dim, args.prefill, args.chunk
    gen = torch.Generator(device=device).manual_seed(1)
    # Channels of decaying scale, so chunks have a skewed spectrum like real keys and values.
    scale = torch.logspace(0, -2, d, device=device)
    kv = (torch.randn(2, b, h, length, d, device=device, generator=gen) * scale).to(torch.bfloat16)
    copy = torch.empty_like(kv)
    t_copy = bench(lambda: copy.copy_(kv))
    x = kv.view(-1, chunk, d)  # (2·b·h·chunks, chunk, d)
    rows = [dict(method="device copy (read + write)", ms=t_copy, matrices=x.shape[0])]
    floor = t_copy / 2  # one read of the bytes
    rank = rank_for_budget(0.25, chunk, d, 4, 64)
    rows.append(dict(method="Gram only (bf16 bmm)", ms=bench(lambda: x.transpose(-1, -2) @ x)))
    part = max(1, x.shape[0] // args.eigh_fraction)
    xs = x[:part].float()
    exact = gram_basis(xs)
    best = (xs - exact.tokens(rank) @ exact.channels(rank)).flatten(1).norm(dim=-1)
    for iters in (1, 2, 3):
        for label, r in (("full basis", None), (f"rank {rank}+8", rank)):
            t = bench(lambda r=r, iters=iters: factorize_subspace(x, r, iters=iters), reps=1)
            f = factorize_subspace(xs, r, iters=iters)
            err = (xs - f.reconstruct(rank)).flatten(1).norm(dim=-1) / best
            rows.append(dict(method=f"subspace, {iters} iterations, {label}", ms=t,
                             err_vs_optimal_median=float(err.median()), err_vs_optimal_max=float(err.max())))  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    with timed("cuda") as eigh:
        gram_basis(xs)
    rows.append(dict(method=f"Gram + eigh (cache's CPU default), 1/{args.eigh_fraction} timed, scaled",
                     ms=eigh.seconds * 1e3 * x.shape[0] / part))  # fmt: skip
    rows += cache_compression_rows(args, device, kv)
    for row in rows:
        row["x_floor"] = row["ms"] / floor
        print(json.dumps(row), flush=True)
    return rows


def cache_compression_rows(args, device, kv) -> list[dict]:
    """The cache taking one layer's prefill and compressing all of it but the sinks (``update`` then
    ``compress_all``: factorise, choose ranks, quantise, store), default settings at ρ 0.25 (factoriser
    ``subspace`` on CUDA), keys after and before the rotary embedding: median of 3. ``ratio``: stored ÷ 16-bit
    bytes of the compressed tokens."""
    from chunked_decomp import CompressionConfig
    from chunked_decomp.hf.cache import ChunkedSVDCache

    d = args.head_dim
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    rows = []
    for pre_rope in (False, True):
        config = CompressionConfig(
            compression_ratio=0.25, reference_dtype="float16", compress_keys_pre_rope=pre_rope
        )
        times, ratio = [], None
        for _ in range(3):
            cache = ChunkedSVDCache(config, inv_freq=inv_freq, layer_types=["full_attention"])
            with timed("cuda") as compression:
                cache.update(kv[0], kv[1], 0)  # the prefill; compresses what leaves the residual window
                cache.compress_all()  # and the rest but the sinks
            times.append(compression.seconds * 1e3)
            stats = cache.layers[0].memory_stats()
            ratio = stats.aged_stored_bytes / stats.aged_reference_bytes
            del cache
        rows.append(dict(method=f"cache.compress_all, one layer, {'pre' if pre_rope else 'post'}-RoPE keys",
                         ms=statistics.median(times), runs_ms=times, ratio=ratio))  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def device_map_check(device) -> dict:
    """A tiny random Llama dispatched by accelerate with layers 0-1 on cuda:0 and 2-3 mapped to the CPU (which
    accelerate treats as offloaded weights, executed on cuda:0): greedy tokens must equal the one-device run's;
    ``layer_devices`` lists where each cache layer's tensors are."""
    from accelerate import dispatch_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from chunked_decomp import ChunkedDecomp

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=None,
                      pad_token_id=0)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    model.eval()
    ids = torch.randint(1, 512, (2, 200), generator=torch.Generator().manual_seed(3))
    options = dict(chunk_size=64, residual_length=32, num_sink_tokens=4, compression_ratio=0.25)
    with ChunkedDecomp(**options).applied(model), torch.no_grad():
        ref = model.generate(ids, max_new_tokens=24, do_sample=False)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                  "model.layers.2": "cpu", "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cpu"}  # fmt: skip
    model = dispatch_model(model, device_map=device_map)
    compressor = ChunkedDecomp(**options)
    with compressor.applied(model), torch.no_grad():
        out = model.generate(ids.to(device), max_new_tokens=24, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    placed = []
    for layer in cache.layers:
        tensors = [layer.keys, layer.values]
        for chunk in layer.chunks:
            for factors in (chunk.keys, chunk.values):
                for pair in factors.pairs:
                    tensors += [getattr(f, "codes", f) for f in pair if f is not None]
        placed.append(sorted({str(t.device) for t in tensors}))
    result = dict(tokens_equal=bool(torch.equal(out.sequences.cpu(), ref)), layer_devices=placed,
                  compressed_chunks=[len(getattr(layer, "chunks", [])) for layer in cache.layers])  # fmt: skip
    print(json.dumps(dict(device_map_check=result)), flush=True)
    return result


def model_check(device) -> dict:
    """A small random Llama (4 layers, 8/2 heads of 64) on the GPU: greedy generation with the Triton attention
    (pre- and post-RoPE keys) against the rebuild path; the tokens must agree and the logits nearly so."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from chunked_decomp import ChunkedDecomp

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, bos_token_id=0, eos_token_id=None,
                      pad_token_id=0)  # fmt: skip
    model = LlamaForCausalLM(cfg).to(device)
    model.eval()
    ids = torch.randint(
        1, 512, (2, 300), device=device, generator=torch.Generator(device=device).manual_seed(3)
    )
    out = {}
    for pre_rope in (True, False):
        base = dict(chunk_size=64, residual_length=32, num_sink_tokens=4, compression_ratio=0.25,
                    compress_keys_pre_rope=pre_rope)  # fmt: skip
        runs = {}
        for mode in ("rebuild", "factored"):
            with ChunkedDecomp(**base, decode_attention=mode).applied(model), torch.no_grad():
                g = model.generate(ids, max_new_tokens=40, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)  # fmt: skip
            runs[mode] = (g.sequences, torch.stack(g.logits, 1))
        same = bool(torch.equal(runs["rebuild"][0], runs["factored"][0]))
        diff = float((runs["rebuild"][1] - runs["factored"][1]).abs().max())
        out["pre-RoPE" if pre_rope else "post-RoPE"] = dict(tokens_equal=same, max_logit_diff=diff)
    print(json.dumps(dict(model_check=out)), flush=True)
    return out


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    """The layer shapes (Llama-3.1-8B's by default), shared with gpu_profile.py."""
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--prefill", type=int, default=32768)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.125])
    add_shape_args(parser)
    parser.add_argument("--eigh-fraction", type=int, default=64)
    parser.add_argument("--skip-factorisation", action="store_true")
    parser.add_argument("--skip-model-check", action="store_true")
    parser.add_argument(
        "--skip-device-map", action="store_true", help="no GPU + CPU device_map generation check"
    )
    parser.add_argument("--sweep", action="store_true", help="try launch settings first and use the fastest")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu/gpu_attention.json"))
    return parser.parse_args()


def model_checks(args: argparse.Namespace, device: torch.device) -> tuple[dict, dict]:
    """`model_check` and `device_map_check` (unless skipped); a failing one is reported, and the kernel still
    timed."""
    try:
        check = {} if args.skip_model_check else model_check(device)
    except Exception as err:  # report, and still time the kernel
        check = dict(error=repr(err))
        print(json.dumps(dict(model_check=check)), flush=True)
    try:
        placement = {} if args.skip_device_map else device_map_check(device)
    except Exception as err:
        placement = dict(error=repr(err)[:300])
        print(json.dumps(dict(device_map_check=placement)), flush=True)
    return check, placement


def print_tables(args: argparse.Namespace, info: dict, attn: list[dict], fact: list[dict]) -> None:
    print(f"\nDecode attention, one layer, batch {args.batch}, {args.q_heads}/{args.kv_heads} heads x {args.head_dim}"
          f" ({info['gpu']}):")  # fmt: skip
    print(f"{'context':>8} {'budget':>6} {'rank':>4} {'keys':>9} {'SDPA ms':>8} {'ours ms':>8} {'SDPA/ours':>9} "
          f"{'stored':>6} {'rel err':>8}")  # fmt: skip
    for r in attn:
        print(f"{r['context']:>8} {r['budget']:>6} {r['rank']:>4} {r['keys']:>9} {r['sdpa_ms']:>8.4f} "
              f"{r['ours_ms']:>8.4f} {r['speedup']:>9.2f} {r['stored_ratio']:>6.3f} {r['rel_err']:>8.1e}")  # fmt: skip
    if fact:
        print(f"\nFactorising one layer's {args.prefill}-token prefill at batch {args.batch} (K and V, chunks of "
              f"{args.chunk}); floor = one read of the bytes:")  # fmt: skip
        for r in fact:
            print(f"  {r['method']:<50} {r['ms']:>10.3f} ms  {r['x_floor']:>8.1f}x floor")


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available() or triton_attention.triton is None:
        raise SystemExit("gpu_attention.py needs a CUDA GPU and triton")
    device = torch.device("cuda")
    info = run_metadata("gpu", "torch", "triton")
    print(json.dumps(info), flush=True)
    check, placement = model_checks(args, device)
    best = sweep(args, device) if args.sweep else {}
    attn = attention_rows(args, device, best)
    fact = [] if args.skip_factorisation else factorisation_rows(args, device)
    print_tables(args, info, attn, fact)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"\nTiny Llama on the GPU, Triton attention vs rebuild: {json.dumps(check)}")
    print(f"Tiny Llama split across the GPU and the CPU (device_map): {json.dumps(placement)}")
    atomic_write_json(
        args.out,
        dict(
            info=info,
            model_check=check,
            device_map_check=placement,
            sweep=best,
            attention=attn,
            factorisation=fact,
        ),
    )


if __name__ == "__main__":
    main()
