// Fused CPU kernels for the small steps of decode: one call where torch needs several ops.
//
// Why: at batch 1 a SmolLM2 step runs ~20 torch ops per layer outside the matmuls, each costing a
// few microseconds of dispatch and, in bf16, dtype round trips. These loops do the same arithmetic
// in fp32 registers and round once. Built at first use by llmaas/kernels/build.py with
// -O3 -march=native, -fopenmp and -fno-trapping-math (lets min/max selects vectorise); loaded with
// ctypes; plain C ABI, no torch headers.
//
// Batch invariance: every loop here computes a row (a token) on its own, in an order that depends
// only on the row's width, never on how many rows came in or which thread took them. Norms, the
// activation and rotary take steps of any size (prefills too): rows are split over OpenMP threads
// from kRowsPerThread rows up (docs/batch_invariance.md).
//
// dtype codes: 0 = float32, 1 = bfloat16. Strides are in elements.

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <type_traits>
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif
#include <thread>
#include <vector>

namespace {

using bf16 = uint16_t;  // raw bits: a plain integer type lets the compiler vectorise the loads

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) { return __builtin_bit_cast(float, static_cast<uint32_t>(v) << 16); }

template <typename T> inline T from_float(float f);
template <> inline float from_float<float>(float f) { return f; }
template <> inline bf16 from_float<bf16>(float f) {
    const uint32_t u = __builtin_bit_cast(uint32_t, f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // to nearest even, as torch does
    const uint32_t quiet_nan = (u >> 16) | 0x40u;
    return static_cast<bf16>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);  // a select, no branch
}

// e^x to ~2 ulp, written so that loops over it vectorise (std::exp stays a scalar call): x = n ln2 + r
// with |r| <= ln2/2, e^r by a degree-6 polynomial, 2^n put straight into the exponent bits.
inline float exp_approx(float x) {
    x = std::max(-87.f, std::min(88.f, x));
    // floor(x log2e + 1/2) by truncating a positive number: no branch, so loops over it vectorise
    const int32_t n = static_cast<int32_t>(x * 1.44269504f + 128.5f) - 128;
    const float nf = static_cast<float>(n);
    const float r = x - nf * 0.693145752f - nf * 1.42860677e-6f;
    float p = 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    return p * __builtin_bit_cast(float, (n + 127) << 23);
}

// y = x / rms(x) * w, row by row. x, out: [rows, dim] with row strides.
constexpr int64_t kRowsPerThread = 64;  // below this a call stays on one thread (waking one costs more)

inline int64_t row_threads(int64_t rows, int64_t threads) {
    return std::max<int64_t>(1, std::min(threads, rows / kRowsPerThread));
}

template <typename T>
void rms_norm(const T* x, int64_t x_stride, const T* w, T* out, int64_t out_stride, int64_t rows,
              int64_t dim, float eps, int64_t threads) {
#pragma omp parallel for schedule(static) num_threads(row_threads(rows, threads)) if (row_threads(rows, threads) > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const T* xr = x + r * x_stride;
        T* yr = out + r * out_stride;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < dim; ++i) sum += to_float(xr[i]) * to_float(xr[i]);
        float inv = 1.f / std::sqrt(sum / static_cast<float>(dim) + eps);
        for (int64_t i = 0; i < dim; ++i) yr[i] = from_float<T>(to_float(xr[i]) * inv * to_float(w[i]));
    }
}

// out = silu(gate) * up, where each row of gate_up is [gate (inter) | up (inter)].
template <typename T>
void silu_mul(const T* gate_up, int64_t gu_stride, T* out, int64_t out_stride, int64_t rows, int64_t inter,
              int64_t threads) {
#pragma omp parallel for schedule(static) num_threads(row_threads(rows, threads)) if (row_threads(rows, threads) > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const T* g = gate_up + r * gu_stride;
        const T* u = g + inter;
        T* o = out + r * out_stride;
#pragma omp simd
        for (int64_t i = 0; i < inter; ++i) {
            float gv = to_float(g[i]);
            o[i] = from_float<T>(gv / (1.f + exp_approx(-gv)) * to_float(u[i]));
        }
    }
}

// Rotate-half rotary embedding, in place, on `heads` heads of `dim` each per token.
template <typename T>
inline void rotate(T* x, const T* cos, const T* sin, int64_t heads, int64_t dim) {
    const int64_t half = dim / 2;
    for (int64_t h = 0; h < heads; ++h) {
        T* xh = x + h * dim;
        for (int64_t i = 0; i < half; ++i) {
            float a = to_float(xh[i]), b = to_float(xh[i + half]);
            xh[i] = from_float<T>(a * to_float(cos[i]) - b * to_float(sin[i]));
            xh[i + half] = from_float<T>(b * to_float(cos[i + half]) + a * to_float(sin[i + half]));
        }
    }
}

// For each token: rotate q and k in place (cos/sin: [tokens, dim] rows), then write k and v
// to their cache slot. Caches are head-major [kv_heads, num_slots, dim].
template <typename T>
void rope_write_kv(T* q, T* k, const T* v, int64_t token_stride, const T* cos, const T* sin,
                   int64_t tokens, int64_t q_heads, int64_t kv_heads, int64_t dim, const int64_t* slots,
                   T* k_cache, T* v_cache, int64_t num_slots, int64_t threads) {
#pragma omp parallel for schedule(static) num_threads(row_threads(tokens, threads)) if (row_threads(tokens, threads) > 1)
    for (int64_t t = 0; t < tokens; ++t) {
        const T* c = cos + t * dim;
        const T* s = sin + t * dim;
        T* kt = k + t * token_stride;
        const T* vt = v + t * token_stride;
        rotate(q + t * token_stride, c, s, q_heads, dim);
        rotate(kt, c, s, kv_heads, dim);
        for (int64_t h = 0; h < kv_heads; ++h) {
            int64_t at = (h * num_slots + slots[t]) * dim;
            std::memcpy(k_cache + at, kt + h * dim, dim * sizeof(T));
            std::memcpy(v_cache + at, vt + h * dim, dim * sizeof(T));
        }
    }
}

// fn(lo, hi) over [0, n) in `threads` chunks: this thread takes the first, threads - 1 others are
// started for the rest. A start (waking an idle core) costs tens of microseconds: worth it for the
// milliseconds of an output head, not for decode attention (split, it only matched torch's).
template <typename F>
void split_over_threads(int64_t n, int64_t threads, F fn) {
    threads = std::max<int64_t>(1, std::min(threads, n));
    const int64_t chunk = (n + threads - 1) / threads;
    std::vector<std::thread> helpers;
    for (int64_t lo = chunk; lo < n; lo += chunk) helpers.emplace_back(fn, lo, std::min(n, lo + chunk));
    fn(0, std::min(n, chunk));
    for (auto& h : helpers) h.join();
}

// The query heads of one kv head (`G` of them, `D` wide) against that head's cached keys [first, len).
// G and D fixed at compile time let the compiler keep the queries and the accumulators in registers.
// scores: scratch of at least G * (len - first) floats; out: G rows of D.
template <typename T, int G, int D>
void head_group_attention(const T* qh, float scale, const T* kh, const T* vh, const int64_t* table,
                          int64_t block_size, int64_t first, int64_t len, float* scores, T* out) {
    const int64_t keys = len - first;
    float qf[G][D], acc[G][D] = {}, kf[D], best[G], total[G];
    for (int g = 0; g < G; ++g) {
        best[g] = -INFINITY;
        for (int i = 0; i < D; ++i) qf[g][i] = to_float(qh[g * D + i]) * scale;
    }
    for (int64_t p = first; p < len;) {  // block by block: no division per key
        const int64_t in_block = p % block_size, run = std::min(block_size - in_block, len - p);
        const T* key = kh + (table[p / block_size] * block_size + in_block) * D;
        for (int64_t j = 0; j < run; ++j, ++p, key += D) {
#pragma omp simd
            for (int i = 0; i < D; ++i) kf[i] = to_float(key[i]);  // widen once per key
            for (int g = 0; g < G; ++g) {
                float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                for (int i = 0; i < D; ++i) dot += qf[g][i] * kf[i];
                scores[g * keys + p - first] = dot;
                best[g] = std::max(best[g], dot);
            }
        }
    }
    for (int g = 0; g < G; ++g) {
        float sum = 0.f;
        float* row = scores + g * keys;
        const float top = best[g];
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < keys; ++j) {
            row[j] = exp_approx(row[j] - top);
            sum += row[j];
        }
        total[g] = sum;
    }
    for (int64_t p = first; p < len;) {
        const int64_t in_block = p % block_size, run = std::min(block_size - in_block, len - p);
        const T* value = vh + (table[p / block_size] * block_size + in_block) * D;
        for (int64_t j = 0; j < run; ++j, ++p, value += D) {
#pragma omp simd
            for (int i = 0; i < D; ++i) kf[i] = to_float(value[i]);
            for (int g = 0; g < G; ++g) {
                const float w = scores[g * keys + p - first];
#pragma omp simd
                for (int i = 0; i < D; ++i) acc[g][i] += w * kf[i];
            }
        }
    }
    for (int g = 0; g < G; ++g) {
        const float inv = 1.f / total[g];
        for (int i = 0; i < D; ++i) out[g * D + i] = from_float<T>(acc[g][i] * inv);
    }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// The same attention for bf16 caches with vdpbf16ps (bf16 pairs multiplied into fp32):
// - scores: 16 keys at a time; their rows, seen as (d, d+1) pairs, are transposed so that one vector
//   holds a pair of 16 keys, then each query head takes D/2 vdpbf16ps with its own pair broadcast;
// - values: two keys at a time; their rows are interleaved into (key j, key j+1) pairs per d, and each
//   head multiplies them by its two probabilities, rounded to bf16 as flash attention does before its
//   second matmul (the weights are normalised by the sum of the rounded values).
// About half the instructions of the generic loop, which reduces every dot product horizontally.
inline void transpose_16x16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    // rows now hold 4x4 blocks in 128-bit lanes: gather the lanes
    for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 2; ++j) {
            t[i * 4 + j * 2] = _mm512_shuffle_i32x4(r[i + j * 8], r[i + 4 + j * 8], 0x88);
            t[i * 4 + j * 2 + 1] = _mm512_shuffle_i32x4(r[i + j * 8], r[i + 4 + j * 8], 0xdd);
        }
    }
    for (int i = 0; i < 4; ++i) {
        r[i] = _mm512_shuffle_i32x4(t[i * 4], t[i * 4 + 2], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i * 4], t[i * 4 + 2], 0xdd);
        r[i + 4] = _mm512_shuffle_i32x4(t[i * 4 + 1], t[i * 4 + 3], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[i * 4 + 1], t[i * 4 + 3], 0xdd);
    }
}

alignas(64) const bf16 kZeroRow[128] = {};

template <int G, int D>
void head_group_attention_bf16(const bf16* qh, float scale, const bf16* kh, const bf16* vh, const int64_t* table,
                               int64_t block_size, int64_t first, int64_t len, float* scores, bf16* out) {
    constexpr int kBlocks = D / 32;  // 32-wide vectors per row
    const int64_t keys = len - first, stride = (keys + 31) / 32 * 32;  // scores row per head
    float* probs_f = scores;                                  // [G][stride] fp32 scores, then exps
    bf16* probs = reinterpret_cast<bf16*>(scores + G * stride);  // [G][stride] rounded probabilities
    auto row = [&](int64_t i, const bf16* cache) -> const bf16* {  // key i of [0, keys), else zeros
        if (i >= keys) return kZeroRow;
        const int64_t p = first + i;
        return cache + (table[p / block_size] * block_size + p % block_size) * D;
    };
    __m512 best[G];
    for (int g = 0; g < G; ++g) best[g] = _mm512_set1_ps(-INFINITY);
    // Blocks lie anywhere in the cache, so the hardware prefetcher loses the thread at each block's
    // end: fetch the next 16 keys, and these 16 keys' values for the second pass, ahead of use.
    auto prefetch_rows = [&](int64_t i, const bf16* cache) {
        for (int j = 0; j < 16 && i + j < keys; ++j)
            for (int line = 0; line < D * 2; line += 64) _mm_prefetch((const char*)row(i + j, cache) + line, _MM_HINT_T0);
    };
    prefetch_rows(0, kh);
    for (int64_t i0 = 0; i0 < keys; i0 += 16) {
        prefetch_rows(i0 + 16, kh);
        prefetch_rows(i0, vh);
        const bf16* rows[16];
        for (int j = 0; j < 16; ++j) rows[j] = row(i0 + j, kh);
        __m512 acc[G];
        for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
        for (int b = 0; b < kBlocks; ++b) {
            __m512i t[16];  // t[j] = 16 pairs of key j; transposed: t[e] = pair b*16+e of the 16 keys
            for (int j = 0; j < 16; ++j) t[j] = _mm512_loadu_si512(rows[j] + b * 32);
            transpose_16x16(t);
            for (int e = 0; e < 16; ++e) {
                for (int g = 0; g < G; ++g) {
                    int32_t pair;
                    std::memcpy(&pair, qh + g * D + (b * 16 + e) * 2, 4);
                    acc[g] = _mm512_dpbf16_ps(acc[g], (__m512bh)t[e], (__m512bh)_mm512_set1_epi32(pair));
                }
            }
        }
        const __mmask16 valid = keys - i0 >= 16 ? 0xffff : static_cast<__mmask16>((1u << (keys - i0)) - 1);
        for (int g = 0; g < G; ++g) {
            const __m512 s = _mm512_mul_ps(acc[g], _mm512_set1_ps(scale));
            _mm512_storeu_ps(probs_f + g * stride + i0, s);
            best[g] = _mm512_mask_max_ps(best[g], valid, best[g], s);
        }
    }
    float total[G];
    for (int g = 0; g < G; ++g) {
        const float top = _mm512_reduce_max_ps(best[g]);
        float* srow = probs_f + g * stride;
        bf16* prow = probs + g * stride;
#pragma omp simd
        for (int64_t j = 0; j < keys; ++j) srow[j] = exp_approx(srow[j] - top);
        for (int64_t j = keys; j < stride; ++j) srow[j] = 0.f;  // past the last key: probability 0
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < stride; j += 16) {  // round to bf16, and sum what was rounded
            const __m256i rounded = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(srow + j));
            _mm256_storeu_si256((__m256i*)(prow + j), rounded);
            sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rounded), 16)));
        }
        total[g] = _mm512_reduce_add_ps(sum);
    }
    __m512 acc[G][kBlocks][2];
    for (int g = 0; g < G; ++g)
        for (int b = 0; b < kBlocks; ++b) acc[g][b][0] = acc[g][b][1] = _mm512_setzero_ps();
    for (int64_t i = 0; i < keys; i += 2) {
        const bf16* v0 = row(i, vh);
        const bf16* v1 = row(i + 1, vh);
        for (int b = 0; b < kBlocks; ++b) {
            const __m512i a = _mm512_loadu_si512(v0 + b * 32), c = _mm512_loadu_si512(v1 + b * 32);
            const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(a, c), hi = (__m512bh)_mm512_unpackhi_epi16(a, c);
            for (int g = 0; g < G; ++g) {
                int32_t pair;
                std::memcpy(&pair, probs + g * stride + i, 4);
                const __m512bh w = (__m512bh)_mm512_set1_epi32(pair);
                acc[g][b][0] = _mm512_dpbf16_ps(acc[g][b][0], lo, w);
                acc[g][b][1] = _mm512_dpbf16_ps(acc[g][b][1], hi, w);
            }
        }
    }
    // unpack{lo,hi} interleave within 128-bit lanes: lo lane 4L+i holds d = 8L+i, hi lane 4L+i d = 8L+4+i
    const __m512i first_half = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second_half = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int g = 0; g < G; ++g) {
        const __m512 inv = _mm512_set1_ps(1.f / total[g]);
        for (int b = 0; b < kBlocks; ++b) {
            const __m512 d0 = _mm512_mul_ps(_mm512_permutex2var_ps(acc[g][b][0], first_half, acc[g][b][1]), inv);
            const __m512 d1 = _mm512_mul_ps(_mm512_permutex2var_ps(acc[g][b][0], second_half, acc[g][b][1]), inv);
            _mm256_storeu_si256((__m256i*)(out + g * D + b * 32), (__m256i)_mm512_cvtneps_pbh(d0));
            _mm256_storeu_si256((__m256i*)(out + g * D + b * 32 + 16), (__m256i)_mm512_cvtneps_pbh(d1));
        }
    }
}
#endif

// Scratch floats a head-group kernel needs for `keys` keys and `group` heads (either kernel).
inline int64_t attention_scratch_floats(int64_t group, int64_t keys) { return group * ((keys + 31) / 32 * 32) * 2; }

template <typename T>
using HeadGroupFn = void (*)(const T*, float, const T*, const T*, const int64_t*, int64_t, int64_t, int64_t,
                             float*, T*);

template <typename T, int D>
HeadGroupFn<T> head_group_for(int64_t group) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    if constexpr (std::is_same_v<T, bf16>) {
        switch (group) {
            case 1: return head_group_attention_bf16<1, D>;
            case 2: return head_group_attention_bf16<2, D>;
            case 3: return head_group_attention_bf16<3, D>;
            case 4: return head_group_attention_bf16<4, D>;
            case 5: return head_group_attention_bf16<5, D>;
            case 6: return head_group_attention_bf16<6, D>;
            case 7: return head_group_attention_bf16<7, D>;
            case 8: return head_group_attention_bf16<8, D>;
            default: return nullptr;
        }
    }
#endif
    switch (group) {
        case 1: return head_group_attention<T, 1, D>;
        case 2: return head_group_attention<T, 2, D>;
        case 3: return head_group_attention<T, 3, D>;
        case 4: return head_group_attention<T, 4, D>;
        case 5: return head_group_attention<T, 5, D>;
        case 6: return head_group_attention<T, 6, D>;
        case 7: return head_group_attention<T, 7, D>;
        case 8: return head_group_attention<T, 8, D>;
        default: return nullptr;
    }
}

// The compiled shape for (group, dim), or nullptr: head dims 64 and 128, up to 8 query heads per kv head.
template <typename T>
HeadGroupFn<T> head_group_kernel(int64_t group, int64_t dim) {
    if (dim == 64) return head_group_for<T, 64>(group);
    if (dim == 128) return head_group_for<T, 128>(group);
    return nullptr;
}

// One query token per sequence, attending over its cached keys straight from the paged cache.
// q: [batch, q_heads, dim] (token stride q_stride); block_tables: [batch, *], rows table_stride apart
// (0: every query reads one table, as the queries of one prefill chunk do);
// seq_lens: keys visible to each query; window > 0 keeps only the last `window` keys.
// out: [batch, q_heads, dim] contiguous. The query heads sharing a kv head are done together, so
// each key and value row is read once per kv head. The (sequence, kv head) pairs are split over
// `threads` OpenMP threads (torch's pool: see decode_matmul.cpp). Returns false for a shape not compiled in.
template <typename T>
bool paged_decode_attention(const T* q, int64_t q_stride, const T* k_cache, const T* v_cache,
                            int64_t num_slots, const int64_t* block_tables, int64_t table_stride,
                            const int64_t* seq_lens, int64_t batch, int64_t q_heads, int64_t kv_heads,
                            int64_t dim, int64_t block_size, int64_t window, float scale, T* out,
                            int64_t threads) {
    const int64_t group = q_heads / kv_heads;
    const HeadGroupFn<T> kernel = head_group_kernel<T>(group, dim);
    if (kernel == nullptr) return false;
    const int64_t pairs = batch * kv_heads;
#pragma omp parallel num_threads(threads) if (threads > 1 && pairs > 1)
    {
        std::vector<float> scores;
#pragma omp for schedule(dynamic)
        for (int64_t pair = 0; pair < pairs; ++pair) {
            const int64_t b = pair / kv_heads, hk = pair % kv_heads;
            const int64_t len = seq_lens[b];
            const int64_t first = (window > 0 && len > window) ? len - window : 0;
            scores.resize(attention_scratch_floats(group, len - first));
            kernel(q + b * q_stride + hk * group * dim, scale, k_cache + hk * num_slots * dim,
                   v_cache + hk * num_slots * dim, block_tables + b * table_stride, block_size, first, len,
                   scores.data(), out + (b * q_heads + hk * group) * dim);
        }
    }
    return true;
}

// out[r, j] = sum_k x[r, k] * w[j, k] * scales[j, k / 32]: int8 weights in groups of 32 along k, each
// with an fp32 scale (llama.cpp's Q8_0 layout, unpacked). Rows [j0, j1) of the weight; xf is fp32.
constexpr int64_t kInt8Group = 32;

template <typename T>
void int8_group_gemv_rows(const float* xf, int64_t rows, int64_t k, const int8_t* w, const float* scales,
                          int64_t j0, int64_t j1, T* out, int64_t out_stride) {
    const int64_t groups = k / kInt8Group;
    for (int64_t j = j0; j < j1; ++j) {
        const int8_t* wj = w + j * k;
        const float* sj = scales + j * groups;
        for (int64_t r = 0; r < rows; ++r) {
            const float* xr = xf + r * k;
            float lane[kInt8Group] = {};
            for (int64_t g = 0; g < groups; ++g) {
                const float sc = sj[g];
                const float* xg = xr + g * kInt8Group;
                const int8_t* wg = wj + g * kInt8Group;
#pragma omp simd
                for (int64_t i = 0; i < kInt8Group; ++i) lane[i] += sc * xg[i] * static_cast<float>(wg[i]);
            }
            float total = 0.f;
            for (int64_t i = 0; i < kInt8Group; ++i) total += lane[i];
            out[r * out_stride + j] = from_float<T>(total);
        }
    }
}

// The output rows are split over `threads` threads (at least 256 rows each).
template <typename T>
void int8_group_gemv(const T* x, int64_t x_stride, int64_t rows, int64_t k, const int8_t* w,
                     const float* scales, int64_t n, T* out, int64_t out_stride, int64_t threads) {
    std::vector<float> xf(rows * k);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < k; ++i) xf[r * k + i] = to_float(x[r * x_stride + i]);
    split_over_threads(n, std::min<int64_t>(threads, n / 256), [&](int64_t j0, int64_t j1) {
        int8_group_gemv_rows(xf.data(), rows, k, w, scales, j0, j1, out, out_stride);
    });
}

}  // namespace

extern "C" {

int llmaas_kernels_abi() { return 7; }

void llmaas_rms_norm(int dtype, const void* x, int64_t x_stride, const void* w, void* out, int64_t out_stride,
                     int64_t rows, int64_t dim, float eps, int64_t threads) {
    if (dtype == 1)
        rms_norm(static_cast<const bf16*>(x), x_stride, static_cast<const bf16*>(w), static_cast<bf16*>(out),
                 out_stride, rows, dim, eps, threads);
    else
        rms_norm(static_cast<const float*>(x), x_stride, static_cast<const float*>(w),
                 static_cast<float*>(out), out_stride, rows, dim, eps, threads);
}

void llmaas_silu_mul(int dtype, const void* gate_up, int64_t gu_stride, void* out, int64_t out_stride,
                     int64_t rows, int64_t inter, int64_t threads) {
    if (dtype == 1)
        silu_mul(static_cast<const bf16*>(gate_up), gu_stride, static_cast<bf16*>(out), out_stride, rows, inter,
                 threads);
    else
        silu_mul(static_cast<const float*>(gate_up), gu_stride, static_cast<float*>(out), out_stride, rows,
                 inter, threads);
}

void llmaas_rope_write_kv(int dtype, void* q, void* k, const void* v, int64_t token_stride, const void* cos,
                          const void* sin, int64_t tokens, int64_t q_heads, int64_t kv_heads, int64_t dim,
                          const int64_t* slots, void* k_cache, void* v_cache, int64_t num_slots,
                          int64_t threads) {
    if (dtype == 1)
        rope_write_kv(static_cast<bf16*>(q), static_cast<bf16*>(k), static_cast<const bf16*>(v), token_stride,
                      static_cast<const bf16*>(cos), static_cast<const bf16*>(sin), tokens, q_heads, kv_heads, dim, slots, static_cast<bf16*>(k_cache),
                      static_cast<bf16*>(v_cache), num_slots, threads);
    else
        rope_write_kv(static_cast<float*>(q), static_cast<float*>(k), static_cast<const float*>(v),
                      token_stride, static_cast<const float*>(cos), static_cast<const float*>(sin), tokens, q_heads, kv_heads, dim, slots,
                      static_cast<float*>(k_cache), static_cast<float*>(v_cache), num_slots, threads);
}

int llmaas_paged_decode_attention(int dtype, const void* q, int64_t q_stride, const void* k_cache,
                                   const void* v_cache, int64_t num_slots, const int64_t* block_tables,
                                   int64_t table_stride, const int64_t* seq_lens, int64_t batch,
                                   int64_t q_heads, int64_t kv_heads, int64_t dim, int64_t block_size,
                                   int64_t window, float scale, void* out, int64_t threads) {
    if (dtype == 1)
        return paged_decode_attention(static_cast<const bf16*>(q), q_stride, static_cast<const bf16*>(k_cache),
                               static_cast<const bf16*>(v_cache), num_slots, block_tables, table_stride,
                               seq_lens, batch, q_heads, kv_heads, dim, block_size, window, scale,
                               static_cast<bf16*>(out), threads);
    return paged_decode_attention(static_cast<const float*>(q), q_stride, static_cast<const float*>(k_cache),
                               static_cast<const float*>(v_cache), num_slots, block_tables, table_stride,
                               seq_lens, batch, q_heads, kv_heads, dim, block_size, window, scale,
                               static_cast<float*>(out), threads);
}

void llmaas_int8_group_gemv(int dtype, const void* x, int64_t x_stride, int64_t rows, int64_t k,
                            const int8_t* w, const float* scales, int64_t n, void* out, int64_t out_stride,
                            int64_t threads) {
    if (dtype == 1)
        int8_group_gemv(static_cast<const bf16*>(x), x_stride, rows, k, w, scales, n, static_cast<bf16*>(out),
                        out_stride, threads);
    else
        int8_group_gemv(static_cast<const float*>(x), x_stride, rows, k, w, scales, n, static_cast<float*>(out),
                        out_stride, threads);
}

}  // extern "C"
