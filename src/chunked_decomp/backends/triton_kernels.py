"""The Triton kernels of the factored attention (device code only; the host side is `chunked_decomp.backends.triton`).

`_partials_kernel`: one program per (batch row, KV head, split) walks its run of chunks: dequantises each
chunk's factors into on-chip tiles, scores the query rows of the head's group, keeps a running softmax (maximum,
sum, weighted values) and writes one partial result. `_dense_partials_kernel` does the same over the exact
tokens, and `_merge_kernel` merges the partials (flash-decoding, Dao et al. 2023).
"""

from __future__ import annotations

try:  # optional dependency
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

if triton is not None:

    @triton.jit
    def _dequant(codes, scale, minimum, code_off, group_off, row0, rank, n, cols, col_ok, BITS: tl.constexpr,
                 GS: tl.constexpr, RP: tl.constexpr):  # fmt: skip
        """Rows row0 … row0 + rank - 1 of a factor (each of n values) at columns ``cols``: (RP, len(cols))
        float32, zero outside ``rank`` and ``col_ok``."""
        PER: tl.constexpr = 8 // BITS
        width = (n * BITS + 7) // 8
        groups = (n + GS - 1) // GS
        i = tl.arange(0, RP)[:, None]
        c = cols[None, :]
        ok = (i < rank) & col_ok[None, :]
        row = row0 + i  # int32 or int64, as the meta table (see _layout)
        byte = tl.load(codes + code_off + row * width + c // PER, mask=ok, other=0).to(tl.int32)
        code = (byte >> ((c % PER) * BITS)) & ((1 << BITS) - 1)
        g = group_off + row * groups + c // GS
        s = tl.load(scale + g, mask=ok, other=0.0).to(tl.float32)
        m = tl.load(minimum + g, mask=ok, other=0.0).to(tl.float32)
        return tl.where(ok, code.to(tl.float32) * s + m, 0.0)

    @triton.jit
    def _dequant_block(codes, scale, minimum, code_off, group_off, row0, rank, n, t0, BITS: tl.constexpr,
                       GS: tl.constexpr, RP: tl.constexpr, TB: tl.constexpr):  # fmt: skip
        """`_dequant` of the columns t0 … t0 + TB - 1 (t0 a multiple of TB) of the rows, in whole-tile loads when
        the codes are 4 or 8 bits and the block lies in one group (TB divides GS: a scale and a minimum per row)
        or covers whole groups (GS divides TB: TB / GS of them per row)."""
        if ((BITS == 4) or (BITS == 8)) and ((GS % TB == 0) or (TB % GS == 0)):
            width = (n * BITS + 7) // 8
            groups = (n + GS - 1) // GS
            i = tl.arange(0, RP)
            row = row0 + i  # int32 or int64, as the meta table (see _layout)
            row_ok = i < rank
            if BITS == 4:
                k = tl.arange(0, TB // 2)
                byte_ok = row_ok[:, None] & (t0 // 2 + k < width)[None, :]
                byte = tl.load(
                    codes + code_off + row[:, None] * width + t0 // 2 + k[None, :], mask=byte_ok, other=0
                )
                byte = byte.to(tl.int32)
                # (RP, TB), element 0 in the low bits
                code = tl.interleave(byte & 15, byte >> 4).to(tl.float32)
            else:
                k = tl.arange(0, TB)
                byte_ok = row_ok[:, None] & (t0 + k < width)[None, :]
                at = codes + code_off + row[:, None] * width + t0 + k[None, :]
                code = tl.load(at, mask=byte_ok, other=0).to(tl.float32)
            t = t0 + tl.arange(0, TB)
            ok = row_ok[:, None] & (t < n)[None, :]
            if GS % TB == 0:
                g = group_off + row * groups + t0 // GS
                g_ok = row_ok & (t0 < n)  # a block past the end has no group
                sc = tl.load(scale + g, mask=g_ok, other=0.0).to(tl.float32)
                mn = tl.load(minimum + g, mask=g_ok, other=0.0).to(tl.float32)
                return tl.where(ok, code * sc[:, None] + mn[:, None], 0.0)
            else:
                NG: tl.constexpr = TB // GS
                gi = tl.arange(0, NG)
                g = group_off + row[:, None] * groups + t0 // GS + gi[None, :]
                g_ok = row_ok[:, None] & (t0 // GS + gi < groups)[None, :]
                sc = tl.load(scale + g, mask=g_ok, other=0.0).to(tl.float32)
                mn = tl.load(minimum + g, mask=g_ok, other=0.0).to(tl.float32)
                x = tl.reshape(code, (RP, NG, GS)) * sc[:, :, None] + mn[:, :, None]
                return tl.where(ok, tl.reshape(x, (RP, TB)), 0.0)
        else:
            t = t0 + tl.arange(0, TB)
            return _dequant(codes, scale, minimum, code_off, group_off, row0, rank, n, t, t < n, BITS, GS, RP)

    @triton.jit
    def _codes4(codes, scale, minimum, code_off, group_off, row0, rank, n, t0, GS: tl.constexpr, RP: tl.constexpr,
                TB: tl.constexpr):  # fmt: skip
        """The 4-bit codes of columns t0 … t0 + TB - 1 of the rows (a block within one group) without dequantising
        them: (even, odd, scale, minimum), even / odd the codes of columns t0, t0 + 2, … and t0 + 1, t0 + 3, …
        as (RP, TB / 2) float32, scale / minimum (RP,) per row; all 0 past ``rank`` and codes 0 past n. A row's
        values are ``code * scale + minimum``, which callers fold into their products instead."""
        width = (n * 4 + 7) // 8
        groups = (n + GS - 1) // GS
        i = tl.arange(0, RP)
        row = row0 + i  # int32 or int64, as the meta table (see _layout)
        row_ok = i < rank
        k = tl.arange(0, TB // 2)
        byte_ok = row_ok[:, None] & (t0 // 2 + k < width)[None, :]
        byte = tl.load(codes + code_off + row[:, None] * width + t0 // 2 + k[None, :], mask=byte_ok, other=0)
        byte = byte.to(tl.int32)
        # A block past the end (a shorter chunk's) has no group: its scales stay 0, never another row's.
        g = group_off + row * groups + t0 // GS
        g_ok = row_ok & (t0 < n)
        sc = tl.load(scale + g, mask=g_ok, other=0.0).to(tl.float32)
        mn = tl.load(minimum + g, mask=g_ok, other=0.0).to(tl.float32)
        return (byte & 15).to(tl.float32), (byte >> 4).to(tl.float32), sc, mn

    @triton.jit
    def _bias(BIAS, b, QLEN, width, rows, row_ok, cols, col_ok):
        """The mask bias of query rows ``rows`` (row = (repeat, query position)) at columns ``cols`` of a
        (batch, QLEN, width) bias, in log2 units: (len(rows), len(cols))."""
        qi = rows % QLEN
        bias = tl.load(BIAS + (b * QLEN + qi[:, None]) * width + cols[None, :],
                       mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
        return bias * 1.4426950408889634

    @triton.jit
    def _online(s, col_ok, m_i, l_i):
        """One step of the running softmax over scores s (rows, n) in log2 units, masked columns hidden: returns
        the weights p, the factor alpha that rescales what was summed before, the new maximum and sum."""
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)

    @triton.jit
    def _start(Q, bh, R, RP: tl.constexpr, D: tl.constexpr):
        """A program's query rows (RP, D), zero past R, and its empty running softmax (maximum, sum, output)."""
        rows = tl.arange(0, RP)
        d = tl.arange(0, D)
        q = tl.load(Q + (bh * R + rows[:, None]) * D + d[None, :], mask=(rows < R)[:, None], other=0.0)
        return (
            q,
            tl.full([RP], float("-inf"), tl.float32),
            tl.zeros([RP], tl.float32),
            tl.zeros([RP, D], tl.float32),
        )

    @triton.jit
    def _store(M_OUT, L_OUT, ACC_OUT, slot, rows, R, d, m_i, l_i, acc, D: tl.constexpr, RP: tl.constexpr):
        """Write one program's partial result (maximum, sum, unnormalised output) to its slot, rows < R only."""
        out = slot * RP + rows
        ok = rows < R
        tl.store(M_OUT + out, m_i, mask=ok)
        tl.store(L_OUT + out, l_i, mask=ok)
        tl.store(ACC_OUT + out[:, None] * D + d[None, :], acc, mask=ok[:, None])

    @triton.jit
    def _mm(a, b, LOWP: tl.constexpr):
        """a @ b, with float16 operands on the GPU (the precision of tf32, half the on-chip memory) and float32
        accumulation; float32 operands in the interpreter."""
        if LOWP:
            return tl.dot(a.to(tl.float16), b.to(tl.float16))
        return tl.dot(a, b)

    # One function on purpose (150 lines): a Triton program is one kernel, and its tiles live in registers that a
    # call boundary would spill; the helpers above (_mm and the dequantisers) are inlined by the compiler anyway.
    @triton.jit
    def _partials_kernel(
        Q, BIAS, INV_FREQ, PAIRS, CSTART, CLEN,
        KTC, KTS, KTM, KCC, KCS, KCM, KMETA,
        VTC, VTS, VTM, VCC, VCS, VCM, VMETA,
        M_OUT, L_OUT, ACC_OUT,
        H, NC, C, R, QLEN, SPLITS, rope_offset, scale_log2,
        PER_SPLIT: tl.constexpr,
        KTB: tl.constexpr, KTG: tl.constexpr, KCB: tl.constexpr, KCG: tl.constexpr,
        VTB: tl.constexpr, VTG: tl.constexpr, VCB: tl.constexpr, VCG: tl.constexpr,
        D: tl.constexpr, RP: tl.constexpr, WP: tl.constexpr, TP: tl.constexpr, TB: tl.constexpr,
        HAS_BIAS: tl.constexpr, PRE_ROPE: tl.constexpr, HALF: tl.constexpr, LOWP: tl.constexpr,
        KCSH: tl.constexpr, VCSH: tl.constexpr, ALLOW_FAST: tl.constexpr,
    ):  # fmt: skip
        # One function on purpose: the whole walk over a program's chunks (scores, running softmax, value sums)
        # stays in one jit scope, so its tiles stay on chip between the steps.
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = tl.arange(0, RP)
        d = tl.arange(0, D)
        tb = tl.arange(0, TB)
        row_ok = rows < R
        q, m_i, l_i, acc = _start(Q, bh, R, RP, D)
        d_ok = d < D
        # Keys rotated over every channel (2·HALF = D, as in Llama, Qwen, Mistral) are rebuilt in two halves,
        # which needs no permutation of channels and half the products; partial rotary takes the general route.
        HALVES: tl.constexpr = PRE_ROPE and (2 * HALF == D) and (HALF >= 16)
        # Post-RoPE keys with 4-bit token factors read a block within one group at a time: codes kept, the rows'
        # scales folded into the products. (Not for pre-RoPE keys: there it doubles the rebuild products, and was
        # slower.)
        FAST: tl.constexpr = (ALLOW_FAST and (KTB == 4) and (VTB == 4) and (KTG % TB == 0) and (VTG % TB == 0)
                              and (TB >= 32) and not PRE_ROPE)  # fmt: skip
        th = tl.arange(0, TB // 2)
        if HALVES:
            dh = tl.arange(0, HALF)
            q_at = Q + (bh * R + rows[:, None]) * D + dh[None, :]
            q1 = tl.load(q_at, mask=row_ok[:, None], other=0.0)
            q2 = tl.load(q_at + HALF, mask=row_ok[:, None], other=0.0)
            freq_h = tl.load(INV_FREQ + dh)
        elif PRE_ROPE:
            # rotate_half over the first 2·HALF channels: partner channel and sign; the rest pass through.
            rot = d < 2 * HALF
            partner = tl.where(d < HALF, d + HALF, d - HALF)
            sign = tl.where(d < HALF, -1.0, 1.0)
            freq = tl.load(INV_FREQ + (d % HALF), mask=rot, other=0.0)
        for j in range(PER_SPLIT):
            # A fixed trip count (the last split's surplus steps are empty: no rows, no tokens).
            live = split * PER_SPLIT + j < NC
            c = tl.minimum(split * PER_SPLIT + j, NC - 1)
            fk = tl.where(live, tl.load(PAIRS + (h * NC + c) * 2), -1)
            fv = tl.where(live, tl.load(PAIRS + (h * NC + c) * 2 + 1), -1)
            start = tl.load(CSTART + c)
            T = tl.where(live, tl.load(CLEN + c), 0)
            # Meta rows: token code, token group, channel code, channel group offsets, rank, T, start, head.
            km = KMETA + tl.maximum(fk, 0) * 8
            rk = tl.where(fk >= 0, tl.load(km + 4), 0)
            vm = VMETA + tl.maximum(fv, 0) * 8
            rv = tl.where(fv >= 0, tl.load(vm + 4), 0)
            kcode, kgroup = tl.load(km), tl.load(km + 1)
            vcode, vgroup = tl.load(vm), tl.load(vm + 1)
            kc_code, kc_group = tl.load(km + 2), tl.load(km + 3)
            # A chunk's own basis holds a block of rows per batch row; a basis shared by the layer one for all.
            kc_row0 = rk * 0 if KCSH else b * rk
            if HALVES:
                v1 = _dequant_block(KCC, KCS, KCM, kc_code, kc_group, kc_row0, rk, D, 0, KCB, KCG, WP, HALF)
                v2 = _dequant_block(
                    KCC, KCS, KCM, kc_code, kc_group, kc_row0, rk, D, HALF, KCB, KCG, WP, HALF
                )
            elif PRE_ROPE:
                v = _dequant(KCC, KCS, KCM, kc_code, kc_group, kc_row0, rk, D, d, d_ok, KCB, KCG, WP)
                vr = _dequant(KCC, KCS, KCM, kc_code, kc_group, kc_row0, rk, D, partner, rot,
                              KCB, KCG, WP) * sign[None, :]  # fmt: skip
            else:
                v = _dequant_block(KCC, KCS, KCM, kc_code, kc_group, kc_row0, rk, D, 0, KCB, KCG, WP, D)
                qv = _mm(q, tl.trans(v), LOWP)  # (RP, WP): the query in the chunk's basis
            pu = tl.zeros([RP, WP], tl.float32)  # Σ_t p_t u_t, on the same running scale as acc
            if FAST:
                # Even and odd tokens apart (no interleave); (q Vᵀ)(diag(s) C + m 1ᵀ) = ((q Vᵀ) ⊙ s) C + (q Vᵀ) m for
                # token codes C with the rows' scale s and minimum m, and likewise for the values' coefficients.
                for blk in range(TP // TB):
                    t0 = blk * TB
                    t_lo = t0 + 2 * th
                    t_hi = t_lo + 1
                    lo, hi, sc, mn = _codes4(KTC, KTS, KTM, kcode, kgroup, b * rk, rk, T, t0, KTG, WP, TB)
                    qvs = qv * sc[None, :]
                    qm = tl.sum(qv * mn[None, :], 1)[:, None]
                    s_lo = _mm(qvs, lo, LOWP) + qm
                    s_hi = _mm(qvs, hi, LOWP) + qm
                    s_lo = s_lo * scale_log2
                    s_hi = s_hi * scale_log2
                    if HAS_BIAS:
                        s_lo += _bias(BIAS, b, QLEN, C, rows, row_ok, start + t_lo, t_lo < T)
                        s_hi += _bias(BIAS, b, QLEN, C, rows, row_ok, start + t_hi, t_hi < T)
                    s_lo = tl.where((t_lo < T)[None, :], s_lo, float("-inf"))
                    s_hi = tl.where((t_hi < T)[None, :], s_hi, float("-inf"))
                    m_new = tl.maximum(m_i, tl.maximum(tl.max(s_lo, 1), tl.max(s_hi, 1)))
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    alpha = tl.exp2(m_i - m_safe)
                    p_lo = tl.exp2(s_lo - m_safe[:, None])
                    p_hi = tl.exp2(s_hi - m_safe[:, None])
                    p_sum = tl.sum(p_lo, 1) + tl.sum(p_hi, 1)
                    l_i = l_i * alpha + p_sum
                    vlo, vhi, vsc, vmn = _codes4(VTC, VTS, VTM, vcode, vgroup, b * rv, rv, T, t0, VTG, WP, TB)
                    pc = _mm(p_lo, tl.trans(vlo), LOWP) + _mm(p_hi, tl.trans(vhi), LOWP)
                    pu = pu * alpha[:, None] + pc * vsc[None, :] + p_sum[:, None] * vmn[None, :]
                    acc = acc * alpha[:, None]
                    m_i = m_new
            if not FAST:
                for blk in range(TP // TB):
                    # Tokens of the chunk in blocks of TB, so that tiles stay small.
                    t = blk * TB + tb
                    t_ok = t < T
                    u = _dequant_block(
                        KTC, KTS, KTM, kcode, kgroup, b * rk, rk, T, blk * TB, KTB, KTG, WP, TB
                    )  # (WP, TB)
                    if HALVES:
                        ut = tl.trans(u)
                        # The keys' halves (TB, HALF) before the rotation, rebuilt on chip, then rotated.
                        k1 = _mm(ut, v1, LOWP)
                        k2 = _mm(ut, v2, LOWP)
                        angle = (rope_offset + start + t).to(tl.float32)[:, None] * freq_h[None, :]
                        cos, sin = tl.cos(angle), tl.sin(angle)
                        s = _mm(q1, tl.trans(k1 * cos - k2 * sin), LOWP)
                        s += _mm(q2, tl.trans(k2 * cos + k1 * sin), LOWP)
                    elif PRE_ROPE:
                        ut = tl.trans(u)
                        k = _mm(ut, v, LOWP)  # (TB, D) keys before the rotation, rebuilt on chip
                        kr = _mm(ut, vr, LOWP)  # rotate_half of them
                        angle = (rope_offset + start + t).to(tl.float32)[:, None] * freq[None, :]
                        k = tl.where(rot[None, :], k * tl.cos(angle) + kr * tl.sin(angle), k)
                        s = _mm(q, tl.trans(k), LOWP)  # (RP, TB)
                    else:
                        s = _mm(qv, u, LOWP)  # (q Vᵀ) U
                    s = s * scale_log2
                    if HAS_BIAS:
                        s += _bias(BIAS, b, QLEN, C, rows, row_ok, start + t, t_ok)
                    p, alpha, m_new, l_i = _online(s, t_ok, m_i, l_i)
                    uv = _dequant_block(
                        VTC, VTS, VTM, vcode, vgroup, b * rv, rv, T, blk * TB, VTB, VTG, WP, TB
                    )
                    pu = pu * alpha[:, None] + _mm(p, tl.trans(uv), LOWP)
                    acc = acc * alpha[:, None]
                    m_i = m_new
            # The value basis is read only now, so that it does not occupy registers during the token loop.
            vc_code, vc_group = tl.load(vm + 2), tl.load(vm + 3)
            vc_row0 = rv * 0 if VCSH else b * rv
            vv = _dequant_block(VCC, VCS, VCM, vc_code, vc_group, vc_row0, rv, D, 0, VCB, VCG, WP, D)
            acc += _mm(pu, vv, LOWP)  # (p Uᵀ) V
        _store(M_OUT, L_OUT, ACC_OUT, bh * SPLITS + split, rows, R, d, m_i, l_i, acc, D, RP)

    @triton.jit
    def _dense_partials_kernel(
        Q, K, V, BIAS, M_OUT, L_OUT, ACC_OUT, H, E, R, QLEN, SPLITS, slot, scale_log2,
        D: tl.constexpr, RP: tl.constexpr, EB: tl.constexpr, BLOCKS: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):  # fmt: skip
        """The exact tokens (sinks and residual window) of one (batch row, KV head): K, V (batch·heads, E, D);
        BIAS (batch, QLEN, E). Loops are over constexpr counts (powers of two), as Triton's interpreter needs."""
        bh = tl.program_id(0)
        b = bh // H
        rows = tl.arange(0, RP)
        d = tl.arange(0, D)
        row_ok = rows < R
        q, m_i, l_i, acc = _start(Q, bh, R, RP, D)
        e = tl.arange(0, EB)
        for blk in range(BLOCKS):
            e0 = blk * EB
            ok = e0 + e < E
            k = tl.load(K + (bh * E + e0 + e[:, None]) * D + d[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(V + (bh * E + e0 + e[:, None]) * D + d[None, :], mask=ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k.to(tl.float32))) * scale_log2
            if HAS_BIAS:
                s += _bias(BIAS, b, QLEN, E, rows, row_ok, e0 + e, ok)
            p, alpha, m_new, l_i = _online(s, ok, m_i, l_i)
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
            m_i = m_new
        _store(M_OUT, L_OUT, ACC_OUT, bh * SPLITS + slot, rows, R, d, m_i, l_i, acc, D, RP)

    @triton.jit
    def _merge_kernel(M, L, ACC, OUT, R, SPLITS, D: tl.constexpr, RP: tl.constexpr, SP: tl.constexpr):
        """out (batch·heads, R, D) = Σ_s 2^(m_s - m) acc_s / Σ_s 2^(m_s - m) l_s; 0 where every score was masked."""
        bh = tl.program_id(0)
        rows = tl.arange(0, RP)
        d = tl.arange(0, D)
        top = tl.full([RP], float("-inf"), tl.float32)
        row_ok = rows < R
        for sp in range(SP):
            ok = ((rows * 0 + sp) < SPLITS) & row_ok
            top = tl.maximum(top, tl.load(M + (bh * SPLITS + sp) * RP + rows, mask=ok, other=float("-inf")))
        top = tl.where(top == float("-inf"), 0.0, top)
        total = tl.zeros([RP], tl.float32)
        acc = tl.zeros([RP, D], tl.float32)
        for sp in range(SP):
            ok = ((rows * 0 + sp) < SPLITS) & row_ok
            at = (bh * SPLITS + sp) * RP + rows
            w = tl.where(ok, tl.exp2(tl.load(M + at, mask=ok, other=0.0) - top), 0.0)
            total += w * tl.load(L + at, mask=ok, other=0.0)
            acc += w[:, None] * tl.load(ACC + at[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        out = tl.where(total[:, None] > 0, acc / total[:, None], 0.0)
        tl.store(OUT + (bh * R + rows[:, None]) * D + d[None, :], out, mask=(rows < R)[:, None])
