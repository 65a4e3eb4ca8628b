// Fused CPU kernels for the small steps of decode: one call where torch needs several ops.
//
// Why: at batch 1 a SmolLM2 step runs ~20 torch ops per layer outside the matmuls, each costing a
// few microseconds of dispatch and, in bf16, dtype round trips. These loops do the same arithmetic
// in fp32 registers and round once. Built at first use by llmaas/kernels/build.py with
// -O3 -march=native, loaded with ctypes; plain C ABI, no torch headers, single-threaded.
//
// dtype codes: 0 = float32, 1 = bfloat16. Strides are in elements.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct bf16 {
    uint16_t bits;
};

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) {
    uint32_t u = static_cast<uint32_t>(v.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

template <typename T> inline T from_float(float f);
template <> inline float from_float<float>(float f) { return f; }
template <> inline bf16 from_float<bf16>(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even, as torch does
    return bf16{static_cast<uint16_t>(u >> 16)};
}

// y = x / rms(x) * w, row by row. x, out: [rows, dim] with row strides.
template <typename T>
void rms_norm(const T* x, int64_t x_stride, const T* w, T* out, int64_t out_stride, int64_t rows,
              int64_t dim, float eps) {
    for (int64_t r = 0; r < rows; ++r) {
        const T* xr = x + r * x_stride;
        T* yr = out + r * out_stride;
        float sum = 0.f;
        for (int64_t i = 0; i < dim; ++i) {
            float v = to_float(xr[i]);
            sum += v * v;
        }
        float inv = 1.f / std::sqrt(sum / static_cast<float>(dim) + eps);
        for (int64_t i = 0; i < dim; ++i) yr[i] = from_float<T>(to_float(xr[i]) * inv * to_float(w[i]));
    }
}

// out = silu(gate) * up, where each row of gate_up is [gate (inter) | up (inter)].
template <typename T>
void silu_mul(const T* gate_up, int64_t gu_stride, T* out, int64_t out_stride, int64_t rows, int64_t inter) {
    for (int64_t r = 0; r < rows; ++r) {
        const T* g = gate_up + r * gu_stride;
        const T* u = g + inter;
        T* o = out + r * out_stride;
        for (int64_t i = 0; i < inter; ++i) {
            float gv = to_float(g[i]);
            o[i] = from_float<T>(gv / (1.f + std::exp(-gv)) * to_float(u[i]));
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
                   T* k_cache, T* v_cache, int64_t num_slots) {
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

// One query token per sequence, attending over its cached keys straight from the paged cache.
// q: [batch, q_heads, dim] (token stride q_stride); block_tables: [batch, table_width];
// seq_lens: keys visible to each query; window > 0 keeps only the last `window` keys.
// out: [batch, q_heads, dim] contiguous.
template <typename T>
void paged_decode_attention(const T* q, int64_t q_stride, const T* k_cache, const T* v_cache,
                            int64_t num_slots, const int64_t* block_tables, int64_t table_width,
                            const int64_t* seq_lens, int64_t batch, int64_t q_heads, int64_t kv_heads,
                            int64_t dim, int64_t block_size, int64_t window, float scale, T* out) {
    const int64_t group = q_heads / kv_heads;
    std::vector<float> scores, qf(dim), acc(dim);
    for (int64_t b = 0; b < batch; ++b) {
        const int64_t len = seq_lens[b];
        const int64_t first = (window > 0 && len > window) ? len - window : 0;
        scores.resize(len - first);
        const int64_t* table = block_tables + b * table_width;
        for (int64_t hq = 0; hq < q_heads; ++hq) {
            const int64_t hk = hq / group;
            const T* qh = q + b * q_stride + hq * dim;
            for (int64_t i = 0; i < dim; ++i) qf[i] = to_float(qh[i]) * scale;
            const T* kh = k_cache + hk * num_slots * dim;
            const T* vh = v_cache + hk * num_slots * dim;
            float best = -INFINITY;
            for (int64_t p = first; p < len; ++p) {
                const T* key = kh + (table[p / block_size] * block_size + p % block_size) * dim;
                float dot = 0.f;
                for (int64_t i = 0; i < dim; ++i) dot += qf[i] * to_float(key[i]);
                scores[p - first] = dot;
                best = dot > best ? dot : best;
            }
            float total = 0.f;
            for (auto& sc : scores) {
                sc = std::exp(sc - best);
                total += sc;
            }
            std::fill(acc.begin(), acc.end(), 0.f);
            for (int64_t p = first; p < len; ++p) {
                const T* value = vh + (table[p / block_size] * block_size + p % block_size) * dim;
                const float wgt = scores[p - first];
                for (int64_t i = 0; i < dim; ++i) acc[i] += wgt * to_float(value[i]);
            }
            T* oh = out + (b * q_heads + hq) * dim;
            const float inv = 1.f / total;
            for (int64_t i = 0; i < dim; ++i) oh[i] = from_float<T>(acc[i] * inv);
        }
    }
}

}  // namespace

extern "C" {

int llmaas_kernels_abi() { return 1; }

void llmaas_rms_norm(int dtype, const void* x, int64_t x_stride, const void* w, void* out, int64_t out_stride,
                     int64_t rows, int64_t dim, float eps) {
    if (dtype == 1)
        rms_norm(static_cast<const bf16*>(x), x_stride, static_cast<const bf16*>(w), static_cast<bf16*>(out),
                 out_stride, rows, dim, eps);
    else
        rms_norm(static_cast<const float*>(x), x_stride, static_cast<const float*>(w),
                 static_cast<float*>(out), out_stride, rows, dim, eps);
}

void llmaas_silu_mul(int dtype, const void* gate_up, int64_t gu_stride, void* out, int64_t out_stride,
                     int64_t rows, int64_t inter) {
    if (dtype == 1)
        silu_mul(static_cast<const bf16*>(gate_up), gu_stride, static_cast<bf16*>(out), out_stride, rows, inter);
    else
        silu_mul(static_cast<const float*>(gate_up), gu_stride, static_cast<float*>(out), out_stride, rows,
                 inter);
}

void llmaas_rope_write_kv(int dtype, void* q, void* k, const void* v, int64_t token_stride, const void* cos,
                          const void* sin, int64_t tokens, int64_t q_heads, int64_t kv_heads, int64_t dim,
                          const int64_t* slots, void* k_cache, void* v_cache, int64_t num_slots) {
    if (dtype == 1)
        rope_write_kv(static_cast<bf16*>(q), static_cast<bf16*>(k), static_cast<const bf16*>(v), token_stride,
                      static_cast<const bf16*>(cos), static_cast<const bf16*>(sin), tokens, q_heads, kv_heads, dim, slots, static_cast<bf16*>(k_cache),
                      static_cast<bf16*>(v_cache), num_slots);
    else
        rope_write_kv(static_cast<float*>(q), static_cast<float*>(k), static_cast<const float*>(v),
                      token_stride, static_cast<const float*>(cos), static_cast<const float*>(sin), tokens, q_heads, kv_heads, dim, slots,
                      static_cast<float*>(k_cache), static_cast<float*>(v_cache), num_slots);
}

void llmaas_paged_decode_attention(int dtype, const void* q, int64_t q_stride, const void* k_cache,
                                   const void* v_cache, int64_t num_slots, const int64_t* block_tables,
                                   int64_t table_width, const int64_t* seq_lens, int64_t batch,
                                   int64_t q_heads, int64_t kv_heads, int64_t dim, int64_t block_size,
                                   int64_t window, float scale, void* out) {
    if (dtype == 1)
        paged_decode_attention(static_cast<const bf16*>(q), q_stride, static_cast<const bf16*>(k_cache),
                               static_cast<const bf16*>(v_cache), num_slots, block_tables, table_width,
                               seq_lens, batch, q_heads, kv_heads, dim, block_size, window, scale,
                               static_cast<bf16*>(out));
    else
        paged_decode_attention(static_cast<const float*>(q), q_stride, static_cast<const float*>(k_cache),
                               static_cast<const float*>(v_cache), num_slots, block_tables, table_width,
                               seq_lens, batch, q_heads, kv_heads, dim, block_size, window, scale,
                               static_cast<float*>(out));
}

}  // extern "C"
