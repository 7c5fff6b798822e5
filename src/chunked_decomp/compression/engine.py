"""The compression step: exact tokens that aged out of the windows of one or more layers become chunks.

``age`` decides what each layer compresses now (`Chunking`) after filling its sinks, and hands batches of
layers to ``compress``, whose pipeline is:

1. ``prepare``: each layer's tokens as float32, keys with their rotary embedding undone when so planned (a *job*);
2. factor: chunks of equal length and layout, of all the layers of a batch, in one call per stack
   (`factorizer.factor_chunks`; keys and values of equal head size as one stack);
3. allocate: ranks per layer (`allocation.allocate`) or pooled across the batch (`allocation.allocate_pooled`);
4. encode: each stack once, at the largest rank any of its chunks keeps (`factorizer.encode`);
5. finish: each chunk's factors gathered from the stacks (`assembly.build_chunks`), corrections to a shared
   basis added, and the chunks appended to their layer's store.

This module knows nothing of transformers: a layer is its `LayerStore` and the exact tokens it hands in.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from chunked_decomp.compression.allocation import allocate, allocate_pooled
from chunked_decomp.compression.assembly import build_chunks
from chunked_decomp.compression.codec_choice import choose_codecs
from chunked_decomp.compression.factorizer import encode, factor_chunks
from chunked_decomp.core.decomposition import relative_error, single_thread_lapack
from chunked_decomp.core.rotary import rotate_range

logger = logging.getLogger("chunked_decomp")

# Float32 bytes of tokens that one batched compression call gathers (its transient copy), and that a cache lets
# wait exact for it: batches of 4-8 MB compressed fastest on a CPU (larger ones outgrow the caches), so a long
# prefill of a large model is compressed a few layers at a time.
BATCH_BYTES = 8 << 20


@dataclass
class Request:
    """Compress ``keys`` / ``values`` (batch, kv_heads, sum(sizes), d), the oldest exact tokens of ``store``'s
    layer after its sinks, into chunks of ``sizes``."""

    store: object
    keys: torch.Tensor
    values: torch.Tensor
    sizes: list[int]


def tail_length(keys: torch.Tensor | None) -> int:
    """Tokens in a layer's exact window ``keys`` (batch, kv_heads, L, d); 0 before its first update."""
    return 0 if keys is None or keys.numel() == 0 else keys.shape[-2]


def age(layers: list[tuple], final: bool) -> list[int]:
    """Compress what has aged out of each layer's window. ``layers``: (store, keys, values) with the layer's exact
    window tokens, oldest first; with ``final`` every exact token but the sinks is compressed.

    Returns, per layer, the number of its oldest window tokens now held by the store (moved to the sinks or
    compressed): the caller drops them from its window. With the plan's ``batched`` the chunks of all the layers
    are compressed in batched calls of up to ``BATCH_BYTES``; otherwise one chunk at a time.
    """
    consumed = [0] * len(layers)
    requests = []
    for n, (store, keys, values) in enumerate(layers):
        if not store.initialized:
            continue
        taken = consumed[n] = store.fill_sinks(keys, values)
        if not store.sinks_full:
            continue
        tail = tail_length(keys) - taken
        sizes = store.plan.chunking.sizes(tail, store.sink_length + store.compressed_length + tail, final)
        if sizes:
            total = sum(sizes)
            requests.append(
                (store, keys[..., taken : taken + total, :], values[..., taken : taken + total, :], sizes)
            )
            consumed[n] += total
    if not requests:
        return consumed
    # Small tensors: one thread is faster, and immune to the collapse of threaded kernels on busy cores.
    with single_thread_lapack():
        if not requests[0][0].plan.batched:
            for store, keys, values, sizes in requests:
                at = 0
                for size in sizes:
                    compress(
                        [Request(store, keys[..., at : at + size, :], values[..., at : at + size, :], [size])]
                    )
                    at += size
            return consumed
        batch, held = [], 0
        for store, keys, values, sizes in requests:
            need = sum(sizes) * store.token_bytes(4)
            if batch and held + need > BATCH_BYTES:
                compress(batch)
                batch, held = [], 0
            batch.append(Request(store, keys, values, sizes))
            held += need
        compress(batch)
    return consumed


@dataclass
class Job:
    """One layer's share of a compression step: its chunks' tokens, then their factors, ranks and codes.

    keys / values: (batch, kv_heads, sum(sizes), d) float32, keys as factored (rotary embedding undone when
    ``pre_rope``). ``factored`` / ``encoded`` map a chunk length to the (key, value) factors of this job's chunks
    of that length within a stack that may hold other layers' chunks too (each entry carries its offset there).
    """

    store: object
    sizes: list[int]
    start: int
    keys: torch.Tensor
    values: torch.Tensor
    pre_rope: bool
    factored: dict = field(default_factory=dict)
    ranks: list = field(default_factory=list)
    encoded: dict = field(default_factory=dict)
    # With pooled ranks: the bytes the pooled allocation left, shared by the jobs of the call ([bytes]), which
    # bounds their corrections to a shared basis (each layer's own slack would overspend the pooled budget).
    correction_pool: list | None = None
    # Per-layer allocation with a shared basis: the bytes the job's chunks may take (counted before the basis
    # they store is counted) and the bytes of that basis.
    budget: float | None = None
    basis_bytes: int = 0

    def __post_init__(self):
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.by_length: dict[int, list[int]] = {}
        for i, s in enumerate(self.sizes):
            self.by_length.setdefault(s, []).append(i)
        # Chunk i is chunk number j of its length group (within this job).
        self.slot = {i: j for idxs in self.by_length.values() for j, i in enumerate(idxs)}

    def stack(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of this job's chunks of ``length``, each (n_chunks, batch, kv_heads, length, d)."""
        idxs = self.by_length[length]
        k = torch.stack([self.keys[..., self.offsets[i] : self.offsets[i] + length, :] for i in idxs])
        v = torch.stack([self.values[..., self.offsets[i] : self.offsets[i] + length, :] for i in idxs])
        return k, v


def prepare(request: Request) -> Job:
    """The request as a job: float32, keys with their rotary embedding undone when the store plans it."""
    store = request.store
    total = sum(request.sizes)
    start = store.sink_length + store.compressed_length
    keys = request.keys.to(torch.float32)
    values = request.values.to(torch.float32)
    # A NaN or inf anywhere makes the sum non-finite: one cheap reduction first, the exact test only then
    # (a sum of huge finite values may overflow).
    if not bool(torch.isfinite(keys.sum() + values.sum())) and not (
        torch.isfinite(keys).all() and torch.isfinite(values).all()
    ):
        raise ValueError(
            f"layer {store.layer_idx}: keys or values contain NaN or inf at cache positions "
            f"{start}..{start + total - 1}; they cannot be compressed (check the model's dtype/inputs)"
        )
    if store.pre_rope:
        keys = rotate_range(keys, start, store.inv_freq, inverse=True)
    return Job(store, request.sizes, start, keys, values, store.pre_rope)


@torch.no_grad()
def compress(requests: list[Request]) -> None:
    """Compress each request into chunks of its layer (see the module docstring). Chunks of equal length and
    layout are factored and encoded in one call across all the layers, while ranks are chosen against each
    layer's own budget unless pooled."""
    t0 = time.perf_counter()
    jobs = [prepare(r) for r in requests]
    groups: dict[tuple, list[tuple[Job, int]]] = {}
    for job in jobs:
        for length in job.by_length:
            groups.setdefault(job.store.signature(length), []).append((job, length))
    stacked = {sig: _factor_group(members) for sig, members in groups.items()}
    for job in jobs:
        if job.store.chooses_codecs:
            choose_codecs(job)
    if jobs[0].store.plan.pooled:
        allocate_pooled(jobs)
    else:
        for job in jobs:
            allocate(job)
    for sig, members in groups.items():
        _encode_group(members, stacked[sig])
    for job in jobs:
        _finish(job)
    # Batched work has no per-layer time: each layer is charged an equal share.
    share = (time.perf_counter() - t0) / len(jobs)
    for job in jobs:
        job.store.compression_seconds += share


def _factor_group(members: list[tuple[Job, int]]) -> tuple:
    """Factor the chunks of one signature (``(job, length)`` members) as whole key and value stacks (one object
    when keys and values were factored as one stack); returns them with where each member starts in them."""
    lead = members[0][0].store
    counts = [len(job.by_length[length]) for job, length in members]
    stacks = [job.stack(length) for job, length in members]
    if lead.joint:
        # Chunk j of a member's keys is entry k_at + j of the stack, its values entry v_at + j.
        fk = fv = factor_chunks(torch.cat([t for kv in stacks for t in kv]), "kv", lead.plan, lead.basis)
        starts = [2 * sum(counts[:m]) for m in range(len(members))]
        at = [(s0, s0 + n) for s0, n in zip(starts, counts)]
    else:
        fk = factor_chunks(torch.cat([k for k, _ in stacks]), "k", lead.plan, lead.basis)
        fv = factor_chunks(torch.cat([v for _, v in stacks]), "v", lead.plan, lead.basis)
        at = [(sum(counts[:m]),) * 2 for m in range(len(members))]
    for (job, length), n, (k_at, v_at) in zip(members, counts, at):
        job.factored[length] = (fk.part(k_at, k_at + n), fv.part(v_at, v_at + n))
    return fk, fv, at


def _encode_group(members: list[tuple[Job, int]], stacked: tuple) -> None:
    """Encode a signature's stacks once, cut to the largest rank any of its chunks keeps (components are
    encoded one by one, so a prefix of a longer encoding equals a shorter one)."""
    fk, fv, at = stacked
    g = fk.groups
    codecs = {(job.store.codec("k"), job.store.codec("v")) for job, _ in members}
    if len(codecs) > 1 or (fk is fv and len({c for pair in codecs for c in pair}) > 1):
        # Layers that chose their formats in this very step (``basis_bits="auto"``) may differ: each member's
        # part of the stacks is encoded in its own formats (later steps group layers by format).
        for job, length in members:
            part_k, part_v = job.factored[length]
            idxs = job.by_length[length]
            ek = encode(part_k, max(max(job.ranks[i][:g]) for i in idxs), job.store.codec("k"))
            ev = encode(part_v, max(max(job.ranks[i][g:]) for i in idxs), job.store.codec("v"))
            job.encoded[length] = ((*ek, 0), (*ev, 0))
        return
    codec_k, codec_v = next(iter(codecs))
    top_k = max(max(job.ranks[i][:g]) for job, length in members for i in job.by_length[length])
    top_v = max(max(job.ranks[i][g:]) for job, length in members for i in job.by_length[length])
    if fk is fv:
        ek = ev = encode(fk, max(top_k, top_v), codec_k)
    else:
        ek, ev = encode(fk, top_k, codec_k), encode(fv, top_v, codec_v)
    for (job, length), (k_at, v_at) in zip(members, at):
        job.encoded[length] = ((*ek, k_at), (*ev, v_at))


def _finish(job: Job) -> None:
    """Append the job's chunks, built from its encoded factors, to its store."""
    store = job.store
    built = {}
    for s, idxs in job.by_length.items():
        built.update(zip(idxs, build_chunks(job, s, idxs)))
    if store.basis is not None and store.basis.corrections:
        store.basis.add_corrections(job, built, store)
    chunks = [built[i] for i in range(len(job.sizes))]
    if store.plan.debug:
        for i, chunk in enumerate(chunks):
            _log_chunk(job, i, chunk)
    store.append(chunks)


def _log_chunk(job: Job, i: int, chunk) -> None:
    s = job.sizes[i]
    k_orig = job.keys[..., job.offsets[i] : job.offsets[i] + s, :]
    v_orig = job.values[..., job.offsets[i] : job.offsets[i] + s, :]
    err_k = relative_error(k_orig, chunk.keys.reconstruct())
    err_v = relative_error(v_orig, chunk.values.reconstruct())
    chunk.info.update(key_error=err_k, value_error=err_v)
    logger.info(
        "layer %d chunk @%d len %d: key ranks %s value ranks %s, %d bytes, rel. error K %.4f V %.4f",
        job.store.layer_idx, chunk.start, s, chunk.keys.ranks, chunk.values.ranks, chunk.nbytes, err_k, err_v,
    )  # fmt: skip
