#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>
#include <algorithm>
#include <cstring>
#include <type_traits>

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

// Quantisation scales and minima as stored (float32, float16 or bfloat16: the factors' dtype), read as float, so
// that no float32 copy of them is made per call.
struct Floats {
    const void* p;
    c10::ScalarType type;
    explicit Floats(const torch::Tensor& t) : p(t.data_ptr()), type(t.scalar_type()) {
        TORCH_CHECK(type == torch::kFloat || type == torch::kHalf || type == torch::kBFloat16,
                    "scales must be float32, float16 or bfloat16, got ", type);
    }
    Floats(const void* p, c10::ScalarType type) : p(p), type(type) {}
    float operator[](int64_t i) const {
        switch (type) {
            case torch::kHalf: return static_cast<float>(static_cast<const at::Half*>(p)[i]);
            case torch::kBFloat16: return static_cast<float>(static_cast<const at::BFloat16*>(p)[i]);
            default: return static_cast<const float*>(p)[i];
        }
    }
    Floats operator+(int64_t i) const {
        const int64_t size = type == torch::kFloat ? 4 : 2;
        return Floats(static_cast<const char*>(p) + i * size, type);
    }
};

// One dequantised channel row (d values).
static inline void channel_row(const uint8_t* codes, Floats scale, Floats minimum, int64_t d,
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
    Floats tsp, tmp, csp, cmp;
    const int64_t* mp;
    int64_t F, tbits, tgs, cbits, cgs;
    Packed(torch::Tensor tc, torch::Tensor ts, torch::Tensor tm, torch::Tensor cc, torch::Tensor cs, torch::Tensor cm,
           torch::Tensor meta, int64_t tbits, int64_t tgs, int64_t cbits, int64_t cgs)
        : tcp(tc.data_ptr<uint8_t>()), ccp(cc.data_ptr<uint8_t>()), tsp(ts), tmp(tm), csp(cs), cmp(cm),
          mp(meta.data_ptr<int64_t>()), F(meta.size(0)), tbits(tbits), tgs(tgs), cbits(cbits), cgs(cgs) {}

    // body(h, start, r, T, G, b, channel, group) for factor f and batch row b: head h, first position start,
    // rank r, length T, G groups; channel(i, out) dequantises component i's channel row; group(i, g, codes) gives
    // the g-th group of component i's token row: its first byte, and its scale and minimum through the return.
    template <class Body>
    void one(int64_t f, int64_t b, int64_t D, Body body) const {
        const int64_t Wc = (D * cbits + 7) / 8, Gc = (D + cgs - 1) / cgs;
        const int64_t* m = mp + f * 8;
        const int64_t r = m[4], T = m[5], start = m[6], h = m[7];
        const int64_t W = (T * tbits + 7) / 8, G = (T + tgs - 1) / tgs;
        auto channel = [&](int64_t i, float* out) {
            const int64_t row = b * r + i;
            channel_row(ccp + m[2] + row * Wc, csp + m[3] + row * Gc, cmp + m[3] + row * Gc, D, cbits, cgs, out);
        };
        auto group = [&](int64_t i, int64_t g, const uint8_t*& codes) {
            const int64_t row = b * r + i;
            codes = tcp + m[0] + row * W;
            return std::make_pair(tsp[m[1] + row * G + g], tmp[m[1] + row * G + g]);
        };
        body(h, start, r, T, G, b, channel, group);
    }

    // Units u = f * B + b (factor f, batch row b) in contiguous runs of about equal work (rank × (length + head
    // size)), one run per intra-op thread: bounds (runs + 1). Runs of equal unit counts were unequal in work (the
    // ranks differ between heads), and the longest run is the call's time.
    std::vector<int64_t> runs(int64_t B, int64_t D) const {
        const int64_t U = F * B, n = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), U));
        double total = 0.0;
        for (int64_t f = 0; f < F; ++f) total += static_cast<double>(mp[f * 8 + 4] * (mp[f * 8 + 5] + D)) * B;
        std::vector<int64_t> bounds(n + 1, U);
        bounds[0] = 0;
        double done = 0.0;
        for (int64_t u = 0, s = 1; u < U && s < n; ++u) {
            done += static_cast<double>(mp[(u / B) * 8 + 4] * (mp[(u / B) * 8 + 5] + D));
            while (s < n && done >= total * s / n) bounds[s++] = u + 1;
        }
        return bounds;
    }

    // work(u0, u1, run) for each run of `runs`, the runs on torch's intra-op threads.
    template <class Work>
    void parallel(const std::vector<int64_t>& bounds, Work work) const {
        at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t s0, int64_t s1) {
            for (int64_t s = s0; s < s1; ++s) work(bounds[s], bounds[s + 1], s);
        });
    }
};

// Eight floats in a register (AVX2; two on 128-bit machines): GCC's and Clang's vector extension, which compiles
// to clean fused multiply-adds where the loops over plain arrays did not vectorise; elsewhere a plain struct.
#if defined(__GNUC__) || defined(__clang__)
typedef float vec8 __attribute__((vector_size(32)));
#else
struct vec8 {
    float e[8];
};
static inline vec8 operator*(float c, const vec8& x) {
    vec8 y;
    for (int k = 0; k < 8; ++k) y.e[k] = c * x.e[k];
    return y;
}
static inline vec8 operator*(const vec8& a, const vec8& x) {
    vec8 y;
    for (int k = 0; k < 8; ++k) y.e[k] = a.e[k] * x.e[k];
    return y;
}
static inline vec8 operator+(const vec8& a, const vec8& x) {
    vec8 y;
    for (int k = 0; k < 8; ++k) y.e[k] = a.e[k] + x.e[k];
    return y;
}
static inline vec8 operator-(const vec8& a, const vec8& x) {
    vec8 y;
    for (int k = 0; k < 8; ++k) y.e[k] = a.e[k] - x.e[k];
    return y;
}
static inline vec8& operator+=(vec8& a, const vec8& x) {
    for (int k = 0; k < 8; ++k) a.e[k] += x.e[k];
    return a;
}
#endif
static inline vec8 load8(const float* p) {
    vec8 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
static inline void store8(float* p, const vec8& v) { std::memcpy(p, &v, sizeof v); }
static inline float sum8(const vec8& v) {
    float e[8], s = 0.f;
    std::memcpy(e, &v, sizeof e);
    for (int k = 0; k < 8; ++k) s += e[k];
    return s;
}

// A group of a token row (tokens t0 .. t0 + n - 1) as floats, laid out in blocks of LANES: 4-bit codes of even n
// split into the even tokens at lanes [0, n/2) and the odd ones at [off, off + n/2), off = pad(n/2) (no
// interleave to undo per element); any other case in order (off = 0). Lanes past the tokens are zero.
constexpr int64_t V = 4, LANES = 8 * V, TILE_ROWS = 3;  // a tile: 3 rows x 32 lanes = 12 accumulator registers
static inline int64_t pad(int64_t n) { return (n + LANES - 1) / LANES * LANES; }

struct Layout {
    bool split;
    int64_t off, width;
    Layout(int64_t n, int bits)
        : split(bits == 4 && n % 2 == 0), off(split ? pad(n / 2) : 0), width(split ? 2 * pad(n / 2) : pad(n)) {}
    // x[the lane of token t] = p[t] for the n tokens; the padding lanes are left as they are.
    void gather(const float* p, int64_t n, float* x) const {
        if (split) {
            for (int64_t k = 0; k < n / 2; ++k) {
                x[k] = p[2 * k];
                x[off + k] = p[2 * k + 1];
            }
        } else {
            std::copy(p, p + n, x);
        }
    }
    // o[t] = x[the lane of token t] + c for the n tokens (the even and odd runs interleaved back).
    void scatter(const float* x, float c, int64_t n, float* o) const {
        if (split) {
            for (int64_t k = 0; k < n / 2; ++k) {
                o[2 * k] = x[k] + c;
                o[2 * k + 1] = x[off + k] + c;
            }
        } else {
            for (int64_t t = 0; t < n; ++t) o[t] = x[t] + c;
        }
    }
};

static inline void group_floats(const uint8_t* row, int64_t t0, int64_t n, int bits, const Layout& L, float* x) {
    if (L.split) {
        const uint8_t* p = row + t0 / 2;
        const int64_t m = n / 2;
        for (int64_t k = 0; k < m; ++k) {
            x[k] = static_cast<float>(p[k] & 15);
            x[L.off + k] = static_cast<float>(p[k] >> 4);
        }
        std::fill(x + m, x + L.off, 0.f);
        std::fill(x + L.off + m, x + L.width, 0.f);
    } else {
        decode(row, t0, n, bits, x);
        std::fill(x + n, x + L.width, 0.f);
    }
}

// Register tiles of RT <= 3 rows by LANES lanes over the r components of a group; X: (r, width) the group's codes
// as floats, from lane l0. tile: out[jj * width + l] = Σ_i A[i, jj] X[i, l] for the tile's lanes (A: (r, R), a
// row's weight of each component); dots: out[i, jj] = Σ_l P[jj, l] X[i, l] (P: (RT, width), the rows' weights of
// the lanes).
template <int RT>
static inline void tile(const float* X, int64_t width, int64_t r, const float* A, int64_t R, float* out) {
    vec8 s[RT][V] = {};
    for (int64_t i = 0; i < r; ++i) {
        vec8 x[V];
        for (int v = 0; v < V; ++v) x[v] = load8(X + i * width + 8 * v);
        for (int jj = 0; jj < RT; ++jj) {
            const float c = A[i * R + jj];
            for (int v = 0; v < V; ++v) s[jj][v] += c * x[v];
        }
    }
    for (int jj = 0; jj < RT; ++jj)
        for (int v = 0; v < V; ++v) store8(out + jj * width + 8 * v, s[jj][v]);
}

// For each component i and row jj of the tile, the 8 lane sums t of P[jj, l] X[i, l] over the lanes: put(i, jj, t).
template <int RT, class Put>
static inline void lane_sums(const float* X, int64_t width, int64_t r, const float* P, Put put) {
    for (int64_t i = 0; i < r; ++i) {
        const float* x = X + i * width;
        vec8 s[RT][V] = {};
        for (int64_t l0 = 0; l0 < width; l0 += LANES)
            for (int v = 0; v < V; ++v) {
                const vec8 xv = load8(x + l0 + 8 * v);
                for (int jj = 0; jj < RT; ++jj) s[jj][v] += load8(P + jj * width + l0 + 8 * v) * xv;
            }
        for (int jj = 0; jj < RT; ++jj) {
            vec8 t = s[jj][0];
            for (int v = 1; v < V; ++v) t += s[jj][v];
            put(i, jj, t);
        }
    }
}

template <int RT>
static inline void dots(const float* X, int64_t width, int64_t r, const float* P, float* out, int64_t R) {
    lane_sums<RT>(X, width, r, P, [&](int64_t i, int jj, const vec8& t) { out[i * R + jj] = sum8(t); });
}

// dots with each component's sums scaled by c[i] and added to out8 (r, R) still as 8 lanes: summed across once
// per factor, not once per group.
template <int RT>
static inline void scaled_dots(const float* X, int64_t width, int64_t r, const float* P, const float* c, vec8* out8,
                               int64_t R) {
    lane_sums<RT>(X, width, r, P, [&](int64_t i, int jj, const vec8& t) { out8[i * R + jj] += c[i] * t; });
}

// Rows j0 .. R - 1 in tiles of at most TILE_ROWS: f(RT, j0) with RT the tile's height as a constant.
template <class F>
static inline void tiles(int64_t R, F f) {
    for (int64_t j0 = 0; j0 < R; j0 += TILE_ROWS) {
        const int64_t rt = std::min(TILE_ROWS, R - j0);
        if (rt == 1) f(std::integral_constant<int, 1>(), j0);
        else if (rt == 2) f(std::integral_constant<int, 2>(), j0);
        else f(std::integral_constant<int, 3>(), j0);
    }
}

// A factor's r channel rows dequantised into Vc: (r, Dp) with Dp = pad(D), zero past D.
template <class Channel>
static inline void channel_rows(int64_t r, int64_t D, Channel channel, std::vector<float>& Vc) {
    const int64_t Dp = pad(D);
    Vc.assign(r * Dp, 0.f);
    for (int64_t i = 0; i < r; ++i) channel(i, Vc.data() + i * Dp);
}

// The exact sinks (S tokens) and tail (L tokens) of a layer, which frame its C compressed tokens in every score
// row: (B, H, S + C + L). exact_scores writes their scores; exact_values adds their share of the output.
struct Exact {
    const float *sp, *tp;
    int64_t S, L;
    Exact(const torch::Tensor& sink, const torch::Tensor& tail)
        : sp(sink.data_ptr<float>()), tp(tail.data_ptr<float>()), S(sink.size(2)), L(tail.size(2)) {}

    // f(row, column) for each exact token of (batch row, head) bh: its key or value row (D floats) and its score
    // column of N, for every query row j of R; the (bh, j) pairs on torch's intra-op threads by bh.
    template <class F>
    void each(int64_t BH, int64_t R, int64_t D, int64_t N, F f) const {
        at::parallel_for(0, BH, 1, [&](int64_t a0, int64_t a1) {
            for (int64_t bh = a0; bh < a1; ++bh)
                for (int64_t j = 0; j < R; ++j) {
                    for (int64_t t = 0; t < S; ++t) f(bh * R + j, sp + (bh * S + t) * D, t);
                    for (int64_t t = 0; t < L; ++t) f(bh * R + j, tp + (bh * L + t) * D, N - L + t);
                }
        });
    }
};

// q (B, H, R, D); out (B, H, R, N): the columns [0, S) and [N - L, N).
static void exact_scores(const float* qp, const Exact& e, int64_t BH, int64_t R, int64_t D, int64_t N, float* op) {
    e.each(BH, R, D, N, [&](int64_t row, const float* k, int64_t col) {
        const float* qj = qp + row * D;
        float s = 0.f;
        for (int64_t d = 0; d < D; ++d) s += qj[d] * k[d];
        op[row * N + col] = s;
    });
}

// p (B, H, R, N) → out (B, H, R, D) = the weighted sums of the exact values.
static void exact_values(const float* pp, const Exact& e, int64_t BH, int64_t R, int64_t D, int64_t N, float* op) {
    e.each(BH, R, D, N, [&](int64_t row, const float* v, int64_t col) {
        const float w = pp[row * N + col];
        float* o = op + row * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * v[d];
    });
}

torch::Tensor scores(torch::Tensor q, torch::Tensor sk, torch::Tensor tk, torch::Tensor tc, torch::Tensor ts,
                     torch::Tensor tm, torch::Tensor cc, torch::Tensor cs, torch::Tensor cm, torch::Tensor meta,
                     int64_t tbits, int64_t tgs, int64_t cbits, int64_t cgs, int64_t C) {
    const int64_t B = q.size(0), H = q.size(1), R = q.size(2), D = q.size(3), Dp = pad(D);
    const Exact e(sk, tk);
    const int64_t N = e.S + C + e.L;
    auto out = torch::empty({B, H, R, N}, q.options());
    const float* qp = q.data_ptr<float>();
    float* op = out.data_ptr<float>();
    exact_scores(qp, e, B * H, R, D, N, op);
    const Packed k(tc, ts, tm, cc, cs, cm, meta, tbits, tgs, cbits, cgs);
    // Factors of a head cover disjoint positions, so the units write disjoint scores (and every score).
    k.parallel(k.runs(B, D), [&](int64_t u0, int64_t u1, int64_t) {
        // Buffers kept by each thread across calls: a decoding step calls this once per layer, and fresh
        // allocations of their size cost more than the arithmetic.
        static thread_local std::vector<float> Vc, Q, qv, A, X, bias, acc;
        Q.assign(R * Dp, 0.f);
        bias.resize(R);
        acc.resize(R * 2 * pad(tgs));
        for (int64_t u = u0; u < u1; ++u)
            k.one(u / B, u % B, D, [&](int64_t h, int64_t start, int64_t r, int64_t T, int64_t G, int64_t b,
                                       auto channel, auto group) {
                // qv[i, j] = q_j · V_i: the query rows on the factor's channel rows.
                const float* qb = qp + ((b * H + h) * R) * D;
                for (int64_t j = 0; j < R; ++j) std::copy(qb + j * D, qb + (j + 1) * D, Q.data() + j * Dp);
                channel_rows(r, D, channel, Vc);
                qv.resize(r * R);
                tiles(R, [&](auto RT, int64_t j0) {
                    dots<RT>(Vc.data(), Dp, r, Q.data() + j0 * Dp, qv.data() + j0, R);
                });
                // score[t] = Σ_i qv_i (code_it scale_ig + min_ig), a group at a time: the codes of all components
                // decoded once into X, the rows summed over them in register tiles, the minima one constant a row.
                float* ob = op + ((b * H + h) * R) * N + e.S + start;
                A.resize(r * R);
                for (int64_t g = 0; g < G; ++g) {
                    const int64_t t0 = g * tgs, n = std::min(tgs, T - t0);
                    const Layout L(n, tbits);
                    X.resize(r * L.width);
                    std::fill(bias.begin(), bias.end(), 0.f);
                    for (int64_t i = 0; i < r; ++i) {
                        const uint8_t* row;
                        const auto [scale, minimum] = group(i, g, row);
                        group_floats(row, t0, n, tbits, L, X.data() + i * L.width);
                        for (int64_t j = 0; j < R; ++j) {
                            A[i * R + j] = qv[i * R + j] * scale;
                            bias[j] += qv[i * R + j] * minimum;
                        }
                    }
                    tiles(R, [&](auto RT, int64_t j0) {
                        for (int64_t l0 = 0; l0 < L.width; l0 += LANES)
                            tile<RT>(X.data() + l0, L.width, r, A.data() + j0, R, acc.data() + j0 * L.width + l0);
                    });
                    for (int64_t j = 0; j < R; ++j) L.scatter(acc.data() + j * L.width, bias[j], n, ob + j * N + t0);
                }
            });
    });
    return out;
}

torch::Tensor values(torch::Tensor p, torch::Tensor sv, torch::Tensor tv, torch::Tensor tc, torch::Tensor ts,
                     torch::Tensor tm, torch::Tensor cc, torch::Tensor cs, torch::Tensor cm, torch::Tensor meta,
                     int64_t tbits, int64_t tgs, int64_t cbits, int64_t cgs, int64_t D) {
    const int64_t B = p.size(0), H = p.size(1), R = p.size(2), N = p.size(3), Dp = pad(D);
    const Exact e(sv, tv);
    // Factors of a head add into the same output rows: each run of units is summed into a copy of its own, and
    // the copies are added in order (the same sums for a given number of threads).
    const Packed k(tc, ts, tm, cc, cs, cm, meta, tbits, tgs, cbits, cgs);
    const auto bounds = k.runs(B, D);
    const int64_t outs = B * H * R * D;
    auto partial = torch::zeros({static_cast<int64_t>(bounds.size()) - 1, outs}, p.options());
    const float* pp = p.data_ptr<float>();
    float* pap = partial.data_ptr<float>();
    k.parallel(bounds, [&](int64_t u0, int64_t u1, int64_t run) {
        float* op = pap + run * outs;
        static thread_local std::vector<float> Vc, w, X, P, sc, psum, acc;  // as in scores
        static thread_local std::vector<vec8> w8;
        psum.resize(R);
        acc.resize(R * Dp);
        for (int64_t u = u0; u < u1; ++u)
            k.one(u / B, u % B, D, [&](int64_t h, int64_t start, int64_t r, int64_t T, int64_t G, int64_t b,
                                       auto channel, auto group) {
                const float* pb = pp + ((b * H + h) * R) * N + e.S + start;
                // w_i = Σ_t p_t (code_it scale_ig + min_ig) = Σ_g scale_ig Σ_t p_t code_it + min_ig Σ_t p_t, a
                // group at a time: the weights laid out as the codes (P), the sums over lanes in register tiles.
                w.assign(r * R, 0.f);
                w8.assign(r * R, vec8{});
                sc.resize(r);
                for (int64_t g = 0; g < G; ++g) {
                    const int64_t t0 = g * tgs, n = std::min(tgs, T - t0);
                    const Layout L(n, tbits);
                    X.resize(r * L.width);
                    P.assign(R * L.width, 0.f);
                    for (int64_t j = 0; j < R; ++j) {
                        const float* pj = pb + j * N + t0;
                        float s0 = 0.f;
                        for (int64_t t = 0; t < n; ++t) s0 += pj[t];
                        psum[j] = s0;
                        L.gather(pj, n, P.data() + j * L.width);
                    }
                    for (int64_t i = 0; i < r; ++i) {
                        const uint8_t* row;
                        const auto [scale, minimum] = group(i, g, row);
                        group_floats(row, t0, n, tbits, L, X.data() + i * L.width);
                        sc[i] = scale;
                        for (int64_t j = 0; j < R; ++j) w[i * R + j] += minimum * psum[j];
                    }
                    tiles(R, [&](auto RT, int64_t j0) {
                        scaled_dots<RT>(X.data(), L.width, r, P.data() + j0 * L.width, sc.data(), w8.data() + j0,
                                        R);
                    });
                }
                for (int64_t x = 0; x < r * R; ++x) w[x] += sum8(w8[x]);
                // out_j += Σ_i w_ij V_i: the channel rows summed in register tiles.
                channel_rows(r, D, channel, Vc);
                tiles(R, [&](auto RT, int64_t j0) {
                    for (int64_t l0 = 0; l0 < Dp; l0 += LANES)
                        tile<RT>(Vc.data() + l0, Dp, r, w.data() + j0, R, acc.data() + j0 * Dp + l0);
                });
                float* ob = op + ((b * H + h) * R) * D;
                for (int64_t j = 0; j < R; ++j)
                    for (int64_t d = 0; d < D; ++d) ob[j * D + d] += acc[j * Dp + d];
            });
    });
    auto out = partial.sum(0).view({B, H, R, D});
    exact_values(pp, e, B * H, R, D, N, out.data_ptr<float>());
    return out;
}

// One pre-rotary key kt (D floats) rotated to its position (cos / sin rows ct / st of rd channels, Llama's layout;
// channels past rd not rotated) and scored against the R query rows of qb: out[j * stride] = q_j · R(t) k. kr: a
// buffer of D floats. Where every channel is rotated in halves of whole registers, and the rows fit in
// registers, the rotation and the sums stay in registers (one partial sum of 8 lanes per row).
constexpr int64_t ROPE_ROWS = 9;
static inline void rope_score(const float* kt, const float* ct, const float* st, const float* qb, int64_t R,
                              int64_t D, int64_t rd, float* kr, float* out, int64_t stride) {
    const int64_t half = rd / 2;
    if (rd == D && half % 8 == 0 && R <= ROPE_ROWS) {
        vec8 acc[ROPE_ROWS] = {};
        for (int64_t d = 0; d < half; d += 8) {
            const vec8 lo = load8(kt + d), hi = load8(kt + d + half);
            const vec8 a = lo * load8(ct + d) - hi * load8(st + d);
            const vec8 c = hi * load8(ct + d + half) + lo * load8(st + d + half);
            for (int64_t j = 0; j < R; ++j) acc[j] += load8(qb + j * D + d) * a + load8(qb + j * D + d + half) * c;
        }
        for (int64_t j = 0; j < R; ++j) out[j * stride] = sum8(acc[j]);
        return;
    }
    for (int64_t d = 0; d < half; ++d) kr[d] = kt[d] * ct[d] - kt[d + half] * st[d];
    for (int64_t d = half; d < rd; ++d) kr[d] = kt[d] * ct[d] + kt[d - half] * st[d];
    for (int64_t d = rd; d < D; ++d) kr[d] = kt[d];
    for (int64_t j = 0; j < R; ++j) {
        const float* qj = qb + j * D;
        float acc = 0.f;
        for (int64_t d = 0; d < D; ++d) acc += qj[d] * kr[d];
        out[j * stride] = acc;
    }
}

// Scores of query rows over keys rebuilt before the rotary embedding, rotated on the fly: q (B, H, R, D), k (B, H,
// C, D) float32 as factored (pre-rotary), cos / sin (C, rd) the tables of the keys' positions (Llama's layout:
// each half repeats the frequencies; channels past rd are not rotated) → (B, H, R, S + C + L) with the exact sink
// and tail keys' scores. One pass over the keys, which are never written rotated.
torch::Tensor rope_scores(torch::Tensor q, torch::Tensor sk, torch::Tensor tk, torch::Tensor k, torch::Tensor cos,
                          torch::Tensor sin) {
    const int64_t B = q.size(0), H = q.size(1), R = q.size(2), D = q.size(3), C = k.size(2), rd = cos.size(1);
    const Exact e(sk, tk);
    const int64_t N = e.S + C + e.L;
    auto out = torch::empty({B, H, R, N}, q.options());
    const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *cp = cos.data_ptr<float>(),
                *sp = sin.data_ptr<float>();
    float* op = out.data_ptr<float>();
    exact_scores(qp, e, B * H, R, D, N, op);
    // Units are (batch row and head, key): each writes its own scores.
    at::parallel_for(0, B * H * C, 256, [&](int64_t u0, int64_t u1) {
        std::vector<float> kr(D);
        for (int64_t u = u0; u < u1; ++u) {
            const int64_t bh = u / C, t = u % C;
            const float *qb = qp + bh * R * D, *kt = kp + (bh * C + t) * D, *ct = cp + t * rd, *st = sp + t * rd;
            rope_score(kt, ct, st, qb, R, D, rd, kr.data(), op + bh * R * N + e.S + t, N);
        }
    });
    return out;
}

// Scores of query rows over pre-rotary keys stored as quantised token coefficients on a basis each KV head shares
// across the layer's chunks (``basis_sharing``), rebuilt a group of tokens at a time in a small buffer, rotated
// and scored there: the keys never reach memory (the rebuild's write and read of (C, D) floats, and the padded
// coefficient buffer, were half its time). q (B, H, R, D); basis (H, Wb, D) float32 (rows past a head's rank
// zero); token codes, scales, minima and meta as `scores` reads them (channel columns unused); a factor's own
// correction rows (``basis_corrections``) follow the shared rows it keeps: emeta (F, 3) its rows' code and group
// offsets in ec / es / em and the shared rows kept (its rank where it has none), each row D values at ebits in
// groups of egs, batch row after batch row; cos / sin (C, rd) as `rope_scores` → (B, H, R, S + C + L).
torch::Tensor basis_rope_scores(torch::Tensor q, torch::Tensor sk, torch::Tensor tk, torch::Tensor tc,
                                torch::Tensor ts, torch::Tensor tm, torch::Tensor meta, int64_t tbits, int64_t tgs,
                                torch::Tensor basis, torch::Tensor ec, torch::Tensor es, torch::Tensor em,
                                torch::Tensor emeta, int64_t ebits, int64_t egs, torch::Tensor cos,
                                torch::Tensor sin, int64_t C) {
    const int64_t B = q.size(0), H = q.size(1), R = q.size(2), D = q.size(3), Dp = pad(D);
    const int64_t Wb = basis.size(1), rd = cos.size(1);
    const Exact e(sk, tk);
    const int64_t N = e.S + C + e.L;
    // Zeros: a head with no factor in a chunk (rank 0) scores 0 there, as its keys rebuilt would.
    auto out = torch::zeros({B, H, R, N}, q.options());
    const float *qp = q.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
    float* op = out.data_ptr<float>();
    exact_scores(qp, e, B * H, R, D, N, op);
    // The basis of each head padded to Dp columns, once per call (Wb x Dp floats a head).
    std::vector<float> Bp(H * Wb * Dp, 0.f);
    const float* bp = basis.data_ptr<float>();
    for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < Wb; ++i)
            std::copy(bp + (h * Wb + i) * D, bp + (h * Wb + i + 1) * D, Bp.data() + (h * Wb + i) * Dp);
    const Packed k(tc, ts, tm, tc, ts, tm, meta, tbits, tgs, tbits, tgs);
    const int64_t* emp = emeta.data_ptr<int64_t>();
    const uint8_t* ecp = ec.data_ptr<uint8_t>();
    const Floats esp(es), emn(em);
    const int64_t We = (D * ebits + 7) / 8, Ge = (D + egs - 1) / egs;
    k.parallel(k.runs(B, D), [&](int64_t u0, int64_t u1, int64_t) {
        static thread_local std::vector<float> X, K, kr, Bf;
        kr.resize(Dp);
        for (int64_t u = u0; u < u1; ++u)
            k.one(u / B, u % B, D, [&](int64_t h, int64_t start, int64_t r, int64_t T, int64_t G, int64_t b,
                                       auto, auto group) {
                const int64_t* em_f = emp + (u / B) * 3;
                const int64_t kept = std::min(em_f[2], r);
                TORCH_CHECK(kept <= Wb, "a factor keeps more shared rows than its basis holds");
                const float* qb = qp + ((b * H + h) * R) * D;
                const float* Bh = Bp.data() + h * Wb * Dp;
                if (kept < r) {
                    // The shared rows kept, then this factor's own rows (row b * (r - kept) + i of its rows).
                    Bf.assign(r * Dp, 0.f);
                    std::copy(Bh, Bh + kept * Dp, Bf.data());
                    for (int64_t i = 0; i < r - kept; ++i) {
                        const int64_t row = b * (r - kept) + i;
                        channel_row(ecp + em_f[0] + row * We, esp + em_f[1] + row * Ge, emn + em_f[1] + row * Ge,
                                    D, ebits, egs, Bf.data() + (kept + i) * Dp);
                    }
                    Bh = Bf.data();
                }
                float* ob = op + ((b * H + h) * R) * N + e.S + start;
                for (int64_t g = 0; g < G; ++g) {
                    const int64_t t0 = g * tgs, n = std::min(tgs, T - t0);
                    // X[i, t]: the group's coefficients, dequantised; K[t, :] = Σ_i X[i, t] basis[i, :].
                    X.resize(r * n);
                    for (int64_t i = 0; i < r; ++i) {
                        const uint8_t* row;
                        const auto [scale, minimum] = group(i, g, row);
                        float* x = X.data() + i * n;
                        decode(row, t0, n, tbits, x);
                        for (int64_t t = 0; t < n; ++t) x[t] = x[t] * scale + minimum;
                    }
                    K.resize(n * Dp);
                    tiles(n, [&](auto RT, int64_t j0) {
                        for (int64_t l0 = 0; l0 < Dp; l0 += LANES)
                            tile<RT>(Bh + l0, Dp, r, X.data() + j0, n, K.data() + j0 * Dp + l0);
                    });
                    for (int64_t t = 0; t < n; ++t) {
                        const float *kt = K.data() + t * Dp, *ct = cp + (start + t0 + t) * rd,
                                    *st = sp + (start + t0 + t) * rd;
                        rope_score(kt, ct, st, qb, R, D, rd, kr.data(), ob + t0 + t, N);
                    }
                }
            });
    });
    return out;
}

// out[dest[i], :n] = row i of the quantised rows (codes (rows, W), scale / minimum (rows, G)).
void dequant_into(torch::Tensor out, torch::Tensor dest, torch::Tensor codes, torch::Tensor scale,
                  torch::Tensor minimum, int64_t bits, int64_t gs, int64_t n) {
    const int64_t rows = dest.size(0), W = (n * bits + 7) / 8, G = (n + gs - 1) / gs, stride = out.size(1);
    float* op = out.data_ptr<float>();
    const int64_t* dp = dest.data_ptr<int64_t>();
    const uint8_t* cp = codes.data_ptr<uint8_t>();
    const Floats sp(scale), mp(minimum);
    // Rows go to distinct destinations.
    at::parallel_for(0, rows, 16, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
            float* o = op + dp[i] * stride;
            for (int64_t g = 0; g < G; ++g) {
                const int64_t t0 = g * gs, m = std::min(gs, n - t0);
                decode(cp + i * W, t0, m, bits, o + t0);
                const float a = sp[i * G + g], c = mp[i * G + g];
                for (int64_t t = 0; t < m; ++t) o[t0 + t] = o[t0 + t] * a + c;
            }
        }
    });
}

