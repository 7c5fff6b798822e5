"""A fused CPU kernel for attention over quantised factors (no transformers import).

`attention.attend` computes a query's scores over a compressed chunk as ``(q Vᵀ) U`` and its share of the output
as ``(p Uᵀ) V``. In PyTorch that needs U dequantised to float32 first (unpack, convert, scale, pad), and that pass,
not the arithmetic, bounded decoding. The two C++ functions here read the packed codes of every chunk of a layer
directly from `PackedFactors`' flat buffers, one quantisation group at a time, so nothing of the size of the
compressed cache is materialised:

- ``scores(q, …)``: (batch, kv_heads, rows, d) query rows → (batch, kv_heads, rows, C) scores over the C
  compressed tokens;
- ``values(p, …)``: (batch, kv_heads, rows, C) attention weights → (batch, kv_heads, rows, d) output share;
- ``dequant_into(out, dest, …)``: quantised rows dequantised straight into their rows of a padded buffer, for the
  rebuild of chunks (one pass instead of unpack, convert, scale and copy), once the kernel is built;
- ``rope_scores(q, k, cos, sin)``: scores over keys rebuilt before the rotary embedding, rotated on the fly, for
  pre-rotary keys (which cannot be scored in factor form: the rotation depends on each token's position).

The extension is compiled on first use with ``torch.utils.cpp_extension.load_inline`` (a C++ compiler and
ninja are needed; about a minute once, then cached by torch). When it cannot be built, or with
``CHUNKED_DECOMP_KERNELS=0``, :func:`available` is False and the attention keeps its PyTorch path.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("chunked_decomp")

_SOURCE = r"""
#include <torch/extension.h>
#include <vector>
#include <algorithm>

// Codes of one row, elements t0 .. t0 + n - 1, at 2, 4 or 8 bits (element 0 in the low bits of byte 0). Groups
// start at multiples of the group size, so t0 is a whole number of bytes in; 2-bit codes go through a table of
// the values of each byte.
struct Tables {
    float two[256][4];
    Tables() {
        for (int b = 0; b < 256; ++b)
            for (int k = 0; k < 4; ++k) two[b][k] = (b >> (2 * k)) & 3;
    }
};
static const Tables tables;

static inline void decode(const uint8_t* row, int64_t t0, int64_t n, int bits, float* out) {
    if (bits == 8) {
        for (int64_t t = 0; t < n; ++t) out[t] = row[t0 + t];
        return;
    }
    const int per = 8 / bits;
    const uint8_t* p = row + t0 / per;
    const int64_t whole = n / per;
    if (bits == 4) {
        for (int64_t k = 0; k < whole; ++k) {
            const int v = p[k];
            out[2 * k] = static_cast<float>(v & 15);
            out[2 * k + 1] = static_cast<float>(v >> 4);
        }
    } else {
        for (int64_t k = 0; k < whole; ++k)
            for (int e = 0; e < 4; ++e) out[4 * k + e] = tables.two[p[k]][e];
    }
    for (int64_t t = whole * per; t < n; ++t) out[t] = (p[t / per] >> ((t % per) * bits)) & ((1 << bits) - 1);
}

// One dequantised channel row (d values).
static inline void channel_row(const uint8_t* codes, const float* scale, const float* minimum, int64_t d,
                               int bits, int64_t gs, float* out) {
    decode(codes, 0, d, bits, out);
    for (int64_t g = 0, k0 = 0; k0 < d; ++g, k0 += gs) {  // group by group: no division per element
        const float a = scale[g], c = minimum[g];
        for (int64_t k = k0; k < std::min(d, k0 + gs); ++k) out[k] = out[k] * a + c;
    }
}

// The flat buffers of one kind of a layer's chunks (`PackedFactors.kernel_inputs`), and a walk over their factors.
// meta: (F, 8) int64 per factor: token code offset, token group offset, channel code offset, channel group offset,
// rank, length T, start (first compressed position), kv head. Each factor holds every batch row.
struct Packed {
    const uint8_t *tcp, *ccp;
    const float *tsp, *tmp, *csp, *cmp;
    const int64_t* mp;
    int64_t F, tbits, tgs, cbits, cgs;
    Packed(torch::Tensor tc, torch::Tensor ts, torch::Tensor tm, torch::Tensor cc, torch::Tensor cs, torch::Tensor cm,
           torch::Tensor meta, int64_t tbits, int64_t tgs, int64_t cbits, int64_t cgs)
        : tcp(tc.data_ptr<uint8_t>()), ccp(cc.data_ptr<uint8_t>()), tsp(ts.data_ptr<float>()),
          tmp(tm.data_ptr<float>()), csp(cs.data_ptr<float>()), cmp(cm.data_ptr<float>()),
          mp(meta.data_ptr<int64_t>()), F(meta.size(0)), tbits(tbits), tgs(tgs), cbits(cbits), cgs(cgs) {}

    // body(h, start, r, T, G, b, channel, group) for every factor and batch row b: head h, first position start,
    // rank r, length T, G groups; channel(i, out) dequantises component i's channel row; group(i, g, codes) gives
    // the g-th group of component i's token row: its first byte, and its scale and minimum through the return.
    template <class Body>
    void each(int64_t B, int64_t D, Body body) const {
        const int64_t Wc = (D * cbits + 7) / 8, Gc = (D + cgs - 1) / cgs;
        for (int64_t f = 0; f < F; ++f) {
            const int64_t* m = mp + f * 8;
            const int64_t r = m[4], T = m[5], start = m[6], h = m[7];
            const int64_t W = (T * tbits + 7) / 8, G = (T + tgs - 1) / tgs;
            for (int64_t b = 0; b < B; ++b) {
                auto channel = [&](int64_t i, float* out) {
                    const int64_t row = b * r + i;
                    channel_row(ccp + m[2] + row * Wc, csp + m[3] + row * Gc, cmp + m[3] + row * Gc, D, cbits,
                                cgs, out);
                };
                auto group = [&](int64_t i, int64_t g, const uint8_t*& codes) {
                    const int64_t row = b * r + i;
                    codes = tcp + m[0] + row * W;
                    return std::make_pair(tsp[m[1] + row * G + g], tmp[m[1] + row * G + g]);
                };
                body(h, start, r, T, G, b, channel, group);
            }
        }
    }
};

// One group of a token row as floats: 4-bit codes of a group of even length split into the even and odd elements
// (lo, hi: n / 2 each, two separate runs that vectorise), any other case into buf (n values). Returns whether split.
static inline bool group_codes(const uint8_t* row, int64_t t0, int64_t n, int bits, float* buf, float* lo,
                               float* hi) {
    if (bits == 4 && n % 2 == 0) {
        const uint8_t* p = row + t0 / 2;
        for (int64_t k = 0; k < n / 2; ++k) {
            lo[k] = static_cast<float>(p[k] & 15);
            hi[k] = static_cast<float>(p[k] >> 4);
        }
        return true;
    }
    decode(row, t0, n, bits, buf);
    return false;
}

torch::Tensor scores(torch::Tensor q, torch::Tensor tc, torch::Tensor ts, torch::Tensor tm, torch::Tensor cc,
                     torch::Tensor cs, torch::Tensor cm, torch::Tensor meta, int64_t tbits, int64_t tgs,
                     int64_t cbits, int64_t cgs, int64_t C) {
    const int64_t B = q.size(0), H = q.size(1), R = q.size(2), D = q.size(3);
    auto out = torch::zeros({B, H, R, C}, q.options());
    const float* qp = q.data_ptr<float>();
    float* op = out.data_ptr<float>();
    std::vector<float> v(D), qv, bias(R), acc(R * tgs), buf(tgs), lo(tgs), hi(tgs);
    const Packed k(tc, ts, tm, cc, cs, cm, meta, tbits, tgs, cbits, cgs);
    k.each(B, D, [&](int64_t h, int64_t start, int64_t r, int64_t T, int64_t G, int64_t b, auto channel,
                     auto group) {
        const float* qb = qp + ((b * H + h) * R) * D;
        qv.assign(R * r, 0.f);
        for (int64_t i = 0; i < r; ++i) {
            channel(i, v.data());
            for (int64_t j = 0; j < R; ++j) {
                float s = 0.f;
                for (int64_t d = 0; d < D; ++d) s += qb[j * D + d] * v[d];
                qv[j * r + i] = s;
            }
        }
        // score[t] = Σ_i qv_i (code_it scale_ig + min_ig), one group at a time: the sums stay in a small buffer and
        // the minima add one constant per group. With split 4-bit codes acc holds the even then the odd tokens.
        float* ob = op + ((b * H + h) * R) * C + start;
        for (int64_t g = 0; g < G; ++g) {
            const int64_t t0 = g * tgs, n = std::min(tgs, T - t0), half = n / 2;
            std::fill(acc.begin(), acc.begin() + R * n, 0.f);
            std::fill(bias.begin(), bias.end(), 0.f);
            bool split = false;
            for (int64_t i = 0; i < r; ++i) {
                const uint8_t* row;
                const auto [scale, minimum] = group(i, g, row);
                split = group_codes(row, t0, n, tbits, buf.data(), lo.data(), hi.data());
                for (int64_t j = 0; j < R; ++j) {
                    const float a = qv[j * r + i] * scale;
                    bias[j] += qv[j * r + i] * minimum;
                    float* aj = acc.data() + j * n;
                    if (split) {
                        for (int64_t t = 0; t < half; ++t) {
                            aj[t] += a * lo[t];
                            aj[half + t] += a * hi[t];
                        }
                    } else {
                        for (int64_t t = 0; t < n; ++t) aj[t] += a * buf[t];
                    }
                }
            }
            for (int64_t j = 0; j < R; ++j) {
                float* o = ob + j * C + t0;
                const float* aj = acc.data() + j * n;
                if (split) {
                    for (int64_t t = 0; t < half; ++t) {
                        o[2 * t] = aj[t] + bias[j];
                        o[2 * t + 1] = aj[half + t] + bias[j];
                    }
                } else {
                    for (int64_t t = 0; t < n; ++t) o[t] = aj[t] + bias[j];
                }
            }
        }
    });
    return out;
}

torch::Tensor values(torch::Tensor p, torch::Tensor tc, torch::Tensor ts, torch::Tensor tm, torch::Tensor cc,
                     torch::Tensor cs, torch::Tensor cm, torch::Tensor meta, int64_t tbits, int64_t tgs,
                     int64_t cbits, int64_t cgs, int64_t D) {
    const int64_t B = p.size(0), H = p.size(1), R = p.size(2), C = p.size(3);
    auto out = torch::zeros({B, H, R, D}, p.options());
    const float* pp = p.data_ptr<float>();
    float* op = out.data_ptr<float>();
    std::vector<float> v(D), w, psum(R), pg(R * tgs), buf(tgs), lo(tgs), hi(tgs);
    const Packed k(tc, ts, tm, cc, cs, cm, meta, tbits, tgs, cbits, cgs);
    k.each(B, D, [&](int64_t h, int64_t start, int64_t r, int64_t T, int64_t G, int64_t b, auto channel,
                     auto group) {
        const float* pb = pp + ((b * H + h) * R) * C + start;
        // w_i = Σ_t p_t (code_it scale_ig + min_ig) = Σ_g scale_ig Σ_t p_t code_it + min_ig Σ_t p_t, one group at
        // a time; with split 4-bit codes the weights of the group are laid out even tokens first, then odd.
        w.assign(R * r, 0.f);
        for (int64_t g = 0; g < G; ++g) {
            const int64_t t0 = g * tgs, n = std::min(tgs, T - t0), half = n / 2;
            const bool even = tbits == 4 && n % 2 == 0;
            for (int64_t j = 0; j < R; ++j) {
                const float* pj = pb + j * C + t0;
                float* gj = pg.data() + j * n;
                float s0 = 0.f;
                for (int64_t t = 0; t < n; ++t) s0 += pj[t];
                psum[j] = s0;
                if (even) {
                    for (int64_t t = 0; t < half; ++t) {
                        gj[t] = pj[2 * t];
                        gj[half + t] = pj[2 * t + 1];
                    }
                } else {
                    for (int64_t t = 0; t < n; ++t) gj[t] = pj[t];
                }
            }
            for (int64_t i = 0; i < r; ++i) {
                const uint8_t* row;
                const auto [scale, minimum] = group(i, g, row);
                const bool split = group_codes(row, t0, n, tbits, buf.data(), lo.data(), hi.data());
                for (int64_t j = 0; j < R; ++j) {
                    const float* gj = pg.data() + j * n;
                    float s1 = 0.f;
                    if (split) {
                        for (int64_t t = 0; t < half; ++t) s1 += gj[t] * lo[t] + gj[half + t] * hi[t];
                    } else {
                        for (int64_t t = 0; t < n; ++t) s1 += gj[t] * buf[t];
                    }
                    w[j * r + i] += scale * s1 + minimum * psum[j];
                }
            }
        }
        float* ob = op + ((b * H + h) * R) * D;
        for (int64_t i = 0; i < r; ++i) {
            channel(i, v.data());
            for (int64_t j = 0; j < R; ++j)
                for (int64_t d = 0; d < D; ++d) ob[j * D + d] += w[j * r + i] * v[d];
        }
    });
    return out;
}

// Scores of query rows over keys rebuilt before the rotary embedding, rotated on the fly: q (B, H, R, D), k (B, H,
// C, D) float32 as factored (pre-rotary), cos / sin (C, rd) the tables of the keys' positions (Llama's layout:
// each half repeats the frequencies; channels past rd are not rotated) → (B, H, R, C). One pass over the keys,
// which are never written rotated.
torch::Tensor rope_scores(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin) {
    const int64_t B = q.size(0), H = q.size(1), R = q.size(2), D = q.size(3), C = k.size(2), rd = cos.size(1);
    const int64_t half = rd / 2;
    auto out = torch::empty({B, H, R, C}, q.options());
    const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *cp = cos.data_ptr<float>(),
                *sp = sin.data_ptr<float>();
    float* op = out.data_ptr<float>();
    std::vector<float> kr(D);
    for (int64_t bh = 0; bh < B * H; ++bh) {
        const float* qb = qp + bh * R * D;
        const float* kb = kp + bh * C * D;
        float* ob = op + bh * R * C;
        for (int64_t t = 0; t < C; ++t) {
            const float *kt = kb + t * D, *ct = cp + t * rd, *st = sp + t * rd;
            for (int64_t d = 0; d < half; ++d) kr[d] = kt[d] * ct[d] - kt[d + half] * st[d];
            for (int64_t d = half; d < rd; ++d) kr[d] = kt[d] * ct[d] + kt[d - half] * st[d];
            for (int64_t d = rd; d < D; ++d) kr[d] = kt[d];
            for (int64_t j = 0; j < R; ++j) {
                const float* qj = qb + j * D;
                float acc = 0.f;
                for (int64_t d = 0; d < D; ++d) acc += qj[d] * kr[d];
                ob[j * C + t] = acc;
            }
        }
    }
    return out;
}

// out[dest[i], :n] = row i of the quantised rows (codes (rows, W), scale / minimum (rows, G) float32).
void dequant_into(torch::Tensor out, torch::Tensor dest, torch::Tensor codes, torch::Tensor scale,
                  torch::Tensor minimum, int64_t bits, int64_t gs, int64_t n) {
    const int64_t rows = dest.size(0), W = (n * bits + 7) / 8, G = (n + gs - 1) / gs, stride = out.size(1);
    float* op = out.data_ptr<float>();
    const int64_t* dp = dest.data_ptr<int64_t>();
    const uint8_t* cp = codes.data_ptr<uint8_t>();
    const float* sp = scale.data_ptr<float>();
    const float* mp = minimum.data_ptr<float>();
    for (int64_t i = 0; i < rows; ++i) {
        float* o = op + dp[i] * stride;
        for (int64_t g = 0; g < G; ++g) {
            const int64_t t0 = g * gs, m = std::min(gs, n - t0);
            decode(cp + i * W, t0, m, bits, o + t0);
            const float a = sp[i * G + g], c = mp[i * G + g];
            for (int64_t t = 0; t < m; ++t) o[t0 + t] = o[t0 + t] * a + c;
        }
    }
}

"""

_MODULE = None
_TRIED = False


def available() -> bool:
    """Whether the fused kernel is built (building it on first call) and not disabled."""
    return _load() is not None


def built() -> bool:
    """Whether the kernel is already built in this process (never starts a build). The rebuild path uses it only
    then, so that the default decoding never waits for, nor writes, a compilation; the factored attention, which
    asks for :func:`available`, builds it."""
    return _MODULE is not None and os.environ.get("CHUNKED_DECOMP_KERNELS", "1") != "0"


def _load():
    global _MODULE, _TRIED
    if os.environ.get("CHUNKED_DECOMP_KERNELS", "1") == "0":
        return None
    if not _TRIED:
        _TRIED = True
        try:
            from torch.utils.cpp_extension import load_inline

            _MODULE = load_inline(
                name="chunked_decomp_factored_attention",
                cpp_sources=_SOURCE,
                functions=["scores", "values", "dequant_into", "rope_scores"],
                extra_cflags=["-O3", "-ffast-math", "-march=native"],
                verbose=False,
            )
        except Exception as err:  # no compiler, no ninja, a failed build: the PyTorch path stays
            logger.warning("fused factored-attention kernel unavailable (%s); using the PyTorch path", err)
            _MODULE = None
    return _MODULE


def scores(query: torch.Tensor, packed) -> torch.Tensor:
    """query: (batch, kv_heads, rows, d) float32 → (batch, kv_heads, rows, C) scores over the compressed tokens
    of ``packed`` (a quantised `PackedFactors` of keys)."""
    k = packed.kernel_inputs()
    return _load().scores(query.contiguous(), *k, packed.length)


def rope_scores(
    query: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """query: (batch, kv_heads, rows, d) float32, keys: (batch, kv_heads, C, d) factored before the rotary
    embedding, cos / sin: (C, rotary_dim) of the keys' positions → (batch, kv_heads, rows, C) scores of the
    rotated keys, rotated on the fly (the rotated keys are never written)."""
    return _load().rope_scores(query.contiguous(), keys.float().contiguous(), cos.float().contiguous(),
                               sin.float().contiguous())  # fmt: skip


def dequant_into(
    out: torch.Tensor,
    dest: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    bits: int,
    group_size: int,
    n: int,
) -> None:
    """``out[dest[i], :n]`` = quantised row i dequantised, in one pass. out: (N, ≥ n) float32 contiguous;
    codes: (rows, ceil(n·bits/8)) uint8; scale / minimum: (rows, ceil(n / group_size)), any float dtype."""
    _load().dequant_into(out, dest, codes.contiguous(), scale.float().contiguous(), minimum.float().contiguous(),
                         bits, group_size, n)  # fmt: skip


def values(probs: torch.Tensor, packed) -> torch.Tensor:
    """probs: (batch, kv_heads, rows, C) weights of the compressed tokens → (batch, kv_heads, rows, d), the
    weighted sum of the values of ``packed`` (a quantised `PackedFactors`)."""
    k = packed.kernel_inputs()
    return _load().values(probs.contiguous(), *k, packed.head_dim)
