// Matmuls for decode-sized steps (1 to a few dozen rows) on CPUs with AVX-512 BF16: x @ W.T with W
// either int4 in groups of 32 (llmaas_int4_matmul) or bf16 (llmaas_bf16_matmul), pre-packed.
//
// Why: at 5-64 rows oneDNN's bf16 GEMM reaches well under half of what the cores can do, at one row
// it streams weights at a third of the memory's bandwidth, and torch's int4 kernel only wins up to 4
// rows. Both kernels here keep a block of rows x 32 output columns in fp32 registers and multiply with
// `vdpbf16ps` (32 multiply-adds an instruction), each weight vector loaded once per block of rows.
//
// bf16 weights are packed per tile of 16 output columns as [k / 2][16 columns][2]: one 64-byte vector
// per pair of inputs, the (k, k+1) pairs vdpbf16ps wants (see pack_bf16_for_matmul in cpu_ops.py).
//
// int4: the int4 weights are widened to bf16 in registers, once per tile and shared by up to 6 rows.
// The weights are groups of 32 input weights with a scale and a zero each (llmaas/models/quantize.py):
// w = (q - 8) * scale + zero, q in 0..15. The trick that makes widening cheap: the bf16 number with bits
// 0x4300 | q is exactly 128 + q, so a nibble becomes a bf16 with one AND and one OR (one vpternlog).
// Per group and output column, A = sum_k x_k (128 + q_k) is accumulated, and then
//     sum_k x_k w_k = scale * A + (zero - 136 * scale) * sum_k x_k,
// with sum_k x_k per row and group computed once per call. Results equal x @ dequantized.T up to fp32
// accumulation order.
//
// Packed layout (see pack_int4_for_matmul in llmaas/kernels/cpu_ops.py): one 320-byte block per tile
// of 16 output columns and group, tile by tile, so that each tile is one stream of memory. A block is
// 8 chunks of 32 bytes, then the 16 columns' bf16 scales, then their bf16 zeros. Byte 2j + s of chunk c
// holds, for column j of the tile, the nibble of input 2c + s (low) and of input 16 + 2c + s (high), so
// that a chunk widened to 16-bit lanes gives the (k, k+1) pairs vdpbf16ps wants for inputs 2c.. and,
// shifted by 4, 16 + 2c...
//
// Batch invariance (docs/batch_invariance.md): every output is reduced by one thread in an order set by
// K alone; rows share weight loads but never accumulators, and the arithmetic of a row is the same
// whatever block of rows it falls into, so a row's result does not depend on how many rows came in.
//
// Threads: the column tiles are split over OpenMP threads. The library is linked against the libgomp
// that torch has already loaded (same soname), so these loops run on torch's own thread pool.

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>

namespace {

using bf16 = uint16_t;
constexpr int kGroup = 32;              // inputs per scale
constexpr int kTile = 16;               // output columns per packed tile (one fp32 vector)
constexpr int kNibbleBytes = 256;       // 16 columns x 32 inputs x 4 bits
constexpr int kBlockBytes = kNibbleBytes + 2 * kTile * 2;  // + 16 bf16 scales + 16 bf16 zeros
constexpr int kPrefetchGroups = 8;      // blocks ahead to prefetch
// int4 from 3 rows up: work items of 2 tiles, 4 rows a pass (3 x 4 x 2 accumulators fill the registers)
constexpr int kInt4Tiles = 2, kInt4RowsPerPass = 4;

// 16 fp32 lanes from 16 bf16 values.
inline __m512 widen_bf16(const bf16* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// The block of group g of a tile, when weights hold one `BlockBytes` block per tile and group, tile by
// tile (the int4 and int8 layouts).
template <int BlockBytes>
inline const uint8_t* tile_block(const uint8_t* weights, int64_t tile, int64_t groups, int64_t g) {
    return weights + (tile * groups + g) * BlockBytes;
}

// Ask for the blocks kPrefetchGroups groups ahead of g in NT tiles: the hardware prefetcher alone
// reads ~10% slower (measured). Past a tile's end it fetches the next tile's: harmless.
template <int BlockBytes, int NT>
inline void prefetch_ahead(const uint8_t* weights, int64_t tile, int64_t groups, int64_t g) {
    for (int t = 0; t < NT; ++t) {
        const char* ahead = (const char*)tile_block<BlockBytes>(weights, tile + t, groups, g + kPrefetchGroups);
        for (int line = 0; line < BlockBytes; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
    }
}

// The fp32 results of R rows x NT tiles into bf16 `out`, rounded to nearest even as torch rounds.
template <int R, int NT>
inline void store_rows(const __m512 (&total)[R][NT], int64_t tile, bf16* out, int64_t out_stride) {
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < NT; ++t)
            _mm256_storeu_si256((__m256i*)(out + r * out_stride + (tile + t) * kTile),
                                (__m256i)_mm512_cvtneps_pbh(total[r][t]));
}

// Rows [0, R) of x against NT consecutive tiles: out[r, tile columns] for those tiles.
// x: bf16 rows (stride x_stride); sums: fp32 [R, groups] of each row's group sums.
template <int R, int NT>
inline void tiles_times_rows(const bf16* x, int64_t x_stride, const float* sums, int64_t groups,
                             const uint8_t* weights, int64_t tile, bf16* out, int64_t out_stride) {
    __m512 total[R][NT];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < NT; ++t) total[r][t] = _mm512_setzero_ps();
    const __m512i nibble = _mm512_set1_epi16(0x000F), bf16_128 = _mm512_set1_epi16(0x4300);
    for (int64_t g = 0; g < groups; ++g) {
        // the low and the high nibbles in two accumulators (twice as many vdpbf16ps chains to hide its
        // latency at few rows), summed at the group's end: the same order at every row count
        __m512 acc[R][NT], acc_hi[R][NT];
        for (int r = 0; r < R; ++r)
            for (int t = 0; t < NT; ++t) acc[r][t] = acc_hi[r][t] = _mm512_setzero_ps();
        prefetch_ahead<kBlockBytes, NT>(weights, tile, groups, g);
        for (int c = 0; c < 8; ++c) {
            __m512bh w_lo[NT], w_hi[NT];
            for (int t = 0; t < NT; ++t) {
                const uint8_t* chunk = tile_block<kBlockBytes>(weights, tile + t, groups, g) + c * 32;
                const __m512i raw = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)chunk));
                // (raw & 0xF) | 0x4300: truth table 0xEA is (A & B) | C
                w_lo[t] = (__m512bh)_mm512_ternarylogic_epi32(raw, nibble, bf16_128, 0xEA);
                w_hi[t] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(raw, 4), nibble, bf16_128, 0xEA);
            }
            for (int r = 0; r < R; ++r) {
                const bf16* xr = x + r * x_stride + g * kGroup + 2 * c;
                int32_t pair_lo, pair_hi;
                std::memcpy(&pair_lo, xr, 4);
                std::memcpy(&pair_hi, xr + 16, 4);
                const __m512bh x_lo = (__m512bh)_mm512_set1_epi32(pair_lo);
                const __m512bh x_hi = (__m512bh)_mm512_set1_epi32(pair_hi);
                for (int t = 0; t < NT; ++t) {
                    acc[r][t] = _mm512_dpbf16_ps(acc[r][t], x_lo, w_lo[t]);
                    acc_hi[r][t] = _mm512_dpbf16_ps(acc_hi[r][t], x_hi, w_hi[t]);
                }
            }
        }
        for (int t = 0; t < NT; ++t) {
            const bf16* scale_zero = (const bf16*)(tile_block<kBlockBytes>(weights, tile + t, groups, g) + kNibbleBytes);
            const __m512 scale = widen_bf16(scale_zero);
            const __m512 offset = _mm512_fmadd_ps(scale, _mm512_set1_ps(-136.f), widen_bf16(scale_zero + kTile));
            for (int r = 0; r < R; ++r) {
                total[r][t] = _mm512_fmadd_ps(scale, _mm512_add_ps(acc[r][t], acc_hi[r][t]), total[r][t]);
                total[r][t] = _mm512_fmadd_ps(offset, _mm512_set1_ps(sums[r * groups + g]), total[r][t]);
            }
        }
    }
    store_rows<R, NT>(total, tile, out, out_stride);
}

// pass(rows_c, r0) over blocks of up to MaxR rows starting at r0, with rows_c a compile-time row count
// (std::integral_constant), so that each block's accumulators are sized at compile time.
template <int MaxR, typename Pass>
void for_row_blocks(int64_t rows, Pass pass) {
    static_assert(MaxR >= 1 && MaxR <= 8);
    for (int64_t r0 = 0; r0 < rows; r0 += MaxR) {
        const int64_t left = rows - r0 < MaxR ? rows - r0 : MaxR;
        switch (left) {
            case 1: pass(std::integral_constant<int, 1>{}, r0); break;
            case 2: if constexpr (MaxR >= 2) pass(std::integral_constant<int, 2>{}, r0); break;
            case 3: if constexpr (MaxR >= 3) pass(std::integral_constant<int, 3>{}, r0); break;
            case 4: if constexpr (MaxR >= 4) pass(std::integral_constant<int, 4>{}, r0); break;
            case 5: if constexpr (MaxR >= 5) pass(std::integral_constant<int, 5>{}, r0); break;
            case 6: if constexpr (MaxR >= 6) pass(std::integral_constant<int, 6>{}, r0); break;
            case 7: if constexpr (MaxR >= 7) pass(std::integral_constant<int, 7>{}, r0); break;
            default: if constexpr (MaxR >= 8) pass(std::integral_constant<int, 8>{}, r0); break;
        }
    }
}

// MaxR: rows whose accumulators (3 x MaxR x NT vectors) stay in registers together
template <int NT, int MaxR>
void tiles_times_all_rows(const bf16* x, int64_t x_stride, const float* sums, int64_t rows, int64_t groups,
                          const uint8_t* weights, int64_t tile, bf16* out, int64_t out_stride) {
    for_row_blocks<MaxR>(rows, [&](auto r, int64_t r0) {
        tiles_times_rows<decltype(r)::value, NT>(x + r0 * x_stride, x_stride, sums + r0 * groups, groups, weights,
                                                 tile, out + r0 * out_stride, out_stride);
    });
}

// bf16 weights: rows [0, R) of x against NT consecutive tiles of the packed weight ([tiles, k/2, 32]).
template <int R, int NT>
inline void bf16_tiles_times_rows(const bf16* x, int64_t x_stride, int64_t pairs, const bf16* weights,
                                  int64_t tile, bf16* out, int64_t out_stride) {
    __m512 acc[R][NT];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
    const bf16* w = weights + tile * pairs * 32;
    for (int64_t p = 0; p < pairs; ++p) {
        __m512bh wv[NT];
        for (int t = 0; t < NT; ++t) wv[t] = (__m512bh)_mm512_loadu_si512(w + (t * pairs + p) * 32);
        for (int r = 0; r < R; ++r) {
            int32_t pair;
            std::memcpy(&pair, x + r * x_stride + 2 * p, 4);
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
            for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], xv, wv[t]);
        }
    }
    store_rows<R, NT>(acc, tile, out, out_stride);
}

constexpr int kBf16RowsPerPass = 8;

template <int NT>
void bf16_tiles_times_all_rows(const bf16* x, int64_t x_stride, int64_t rows, int64_t pairs, const bf16* weights,
                               int64_t tile, bf16* out, int64_t out_stride) {
    for_row_blocks<kBf16RowsPerPass>(rows, [&](auto r, int64_t r0) {
        bf16_tiles_times_rows<decltype(r)::value, NT>(x + r0 * x_stride, x_stride, pairs, weights, tile,
                                                      out + r0 * out_stride, out_stride);
    });
}

// fn(tiles_c, tile) over `tiles` tiles in work items of Wide tiles, the tiles left over one by one
// (tiles_c: the item's tile count at compile time), split over `threads` OpenMP threads.
template <int Wide, typename Fn>
void for_tile_items(int64_t tiles, int64_t threads, Fn fn) {
    const int64_t full = tiles / Wide, items = full + tiles % Wide;
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1 && items > 1)
    for (int64_t item = 0; item < items; ++item) {
        if (item < full)
            fn(std::integral_constant<int, Wide>{}, Wide * item);
        else
            fn(std::integral_constant<int, 1>{}, full * Wide + item - full);
    }
}

inline float bf16_to_float(bf16 v) {
    uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// int8 weights in groups of 32 with an fp32 scale each (llama.cpp's Q8_0; the output head under int4),
// for a few rows. Stored as u = q + 128 in 1..255 and split as u = 128 b + m (b = u >> 7, m = u & 127):
// 0x4300 | m is the bf16 128 + m, and (u & 0x80) << 7 is the bf16 2b, so
//     sum x q = sum x (128 + m) + 64 * sum x (2b) - 256 * sum x.
// Two vdpbf16ps per 32 weights instead of one: a good trade where streaming the bytes is what costs.
// Packed (pack_int8_for_matmul in cpu_ops.py): per tile of 16 columns and group, 16 chunks of 32 bytes
// (byte 2j + s of chunk c: u of column j, input 2c + s), then the 16 columns' fp32 scales.
constexpr int kInt8BlockBytes = 16 * 32 + kTile * 4;

template <int R, int NT>
inline void int8_tiles_times_rows(const bf16* x, int64_t x_stride, const float* sums, int64_t groups,
                                  const uint8_t* weights, int64_t tile, bf16* out, int64_t out_stride) {
    __m512 total[R][NT];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < NT; ++t) total[r][t] = _mm512_setzero_ps();
    const __m512i low7 = _mm512_set1_epi16(0x007F), high1 = _mm512_set1_epi16(0x0080);
    const __m512i bf16_128 = _mm512_set1_epi16(0x4300);
    for (int64_t g = 0; g < groups; ++g) {
        __m512 acc_m[R][NT], acc_b[R][NT];
        for (int r = 0; r < R; ++r)
            for (int t = 0; t < NT; ++t) acc_m[r][t] = acc_b[r][t] = _mm512_setzero_ps();
        prefetch_ahead<kInt8BlockBytes, NT>(weights, tile, groups, g);
        for (int c = 0; c < 16; ++c) {
            __m512bh w_m[NT], w_b[NT];
            for (int t = 0; t < NT; ++t) {
                const uint8_t* chunk = tile_block<kInt8BlockBytes>(weights, tile + t, groups, g) + c * 32;
                const __m512i raw = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)chunk));
                w_m[t] = (__m512bh)_mm512_ternarylogic_epi32(raw, low7, bf16_128, 0xEA);  // (A & B) | C
                w_b[t] = (__m512bh)_mm512_slli_epi16(_mm512_and_si512(raw, high1), 7);
            }
            for (int r = 0; r < R; ++r) {
                int32_t pair;
                std::memcpy(&pair, x + r * x_stride + g * kGroup + 2 * c, 4);
                const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
                for (int t = 0; t < NT; ++t) {
                    acc_m[r][t] = _mm512_dpbf16_ps(acc_m[r][t], xv, w_m[t]);
                    acc_b[r][t] = _mm512_dpbf16_ps(acc_b[r][t], xv, w_b[t]);
                }
            }
        }
        for (int t = 0; t < NT; ++t) {
            const __m512 scale = _mm512_loadu_ps((const float*)(tile_block<kInt8BlockBytes>(weights, tile + t, groups, g) + 512));
            const __m512 minus_256_scale = _mm512_mul_ps(scale, _mm512_set1_ps(-256.f));
            for (int r = 0; r < R; ++r) {
                const __m512 dot = _mm512_fmadd_ps(acc_b[r][t], _mm512_set1_ps(64.f), acc_m[r][t]);
                total[r][t] = _mm512_fmadd_ps(scale, dot, total[r][t]);
                total[r][t] = _mm512_fmadd_ps(minus_256_scale, _mm512_set1_ps(sums[r * groups + g]), total[r][t]);
            }
        }
    }
    store_rows<R, NT>(total, tile, out, out_stride);
}

constexpr int kInt8MaxRows = 4;  // registers: 3 x R x NT accumulators

template <int NT>
void int8_tiles_times_all_rows(const bf16* x, int64_t x_stride, const float* sums, int64_t rows, int64_t groups,
                               const uint8_t* weights, int64_t tile, bf16* out, int64_t out_stride) {
    for_row_blocks<kInt8MaxRows>(rows, [&](auto r, int64_t r0) {
        int8_tiles_times_rows<decltype(r)::value, NT>(x + r0 * x_stride, x_stride, sums + r0 * groups, groups,
                                                      weights, tile, out + r0 * out_stride, out_stride);
    });
}

// sum of each row's groups of 32 inputs, [rows, groups], in fp32 from the bf16 values the products use
inline std::vector<float> group_sums(const bf16* x, int64_t x_stride, int64_t rows, int64_t groups) {
    std::vector<float> sums(rows * groups);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t g = 0; g < groups; ++g) {
            float s = 0.f;
            for (int i = 0; i < kGroup; ++i) s += bf16_to_float(x[r * x_stride + g * kGroup + i]);
            sums[r * groups + g] = s;
        }
    return sums;
}


}  // namespace

extern "C" int llmaas_decode_matmul_available() { return 1; }

// out [rows, n] (bf16, row stride out_stride) = x [rows, k] (bf16, row stride x_stride) @ W.T, W the
// packed int4 weight of n x k (n a multiple of 16, k of 32). Returns 0 if the shape is not supported.
extern "C" int llmaas_int4_matmul(const bf16* x, int64_t x_stride, int64_t rows, int64_t k,
                                  const uint8_t* weights, int64_t n, bf16* out, int64_t out_stride,
                                  int64_t threads) {
    if (n % kTile || k % kGroup || rows <= 0) return 0;
    const int64_t groups = k / kGroup, tiles = n / kTile;
    const std::vector<float> sums = group_sums(x, x_stride, rows, groups);
    // items of 4 tiles (64 columns) for 1-2 rows: more streams and accumulator chains in flight (10-15%
    // faster there); of kInt4Tiles tiles for more rows, whose accumulators fill the registers
    if (rows <= 2)
        for_tile_items<4>(tiles, threads, [&](auto nt, int64_t tile) {
            tiles_times_all_rows<decltype(nt)::value, 2>(x, x_stride, sums.data(), rows, groups, weights, tile, out,
                                                         out_stride);
        });
    else
        for_tile_items<kInt4Tiles>(tiles, threads, [&](auto nt, int64_t tile) {
            tiles_times_all_rows<decltype(nt)::value, kInt4RowsPerPass>(x, x_stride, sums.data(), rows, groups, weights, tile,
                                                              out, out_stride);
        });
    return 1;
}

// out [rows, n] (bf16) = x [rows, k] (bf16) @ W.T, W the packed bf16 weight of n x k (n a multiple of
// 16, k of 2). Returns 0 if the shape is not supported.
extern "C" int llmaas_bf16_matmul(const bf16* x, int64_t x_stride, int64_t rows, int64_t k, const bf16* weights,
                                  int64_t n, bf16* out, int64_t out_stride, int64_t threads) {
    if (n % kTile || k % 2 || rows <= 0) return 0;
    const int64_t tiles = n / kTile, pairs = k / 2;
    for_tile_items<2>(tiles, threads, [&](auto nt, int64_t tile) {
        bf16_tiles_times_all_rows<decltype(nt)::value>(x, x_stride, rows, pairs, weights, tile, out, out_stride);
    });
    return 1;
}

// out [rows, n] (bf16) = x [rows, k] (bf16) @ W.T, W the packed int8-group weight of n x k (n a multiple
// of 16, k of 32). Returns 0 if the shape is not supported.
extern "C" int llmaas_int8_matmul(const bf16* x, int64_t x_stride, int64_t rows, int64_t k, const uint8_t* weights,
                                  int64_t n, bf16* out, int64_t out_stride, int64_t threads) {
    if (n % kTile || k % kGroup || rows <= 0) return 0;
    const int64_t groups = k / kGroup, tiles = n / kTile;
    const std::vector<float> sums = group_sums(x, x_stride, rows, groups);
    for_tile_items<2>(tiles, threads, [&](auto nt, int64_t tile) {
        int8_tiles_times_all_rows<decltype(nt)::value>(x, x_stride, sums.data(), rows, groups, weights, tile, out,
                                                       out_stride);
    });
    return 1;
}

#else  // no AVX-512 BF16: the caller keeps torch's path

extern "C" int llmaas_int8_matmul(const uint16_t*, int64_t, int64_t, int64_t, const uint8_t*, int64_t, uint16_t*,
                                  int64_t, int64_t) {
    return 0;
}

extern "C" int llmaas_bf16_matmul(const uint16_t*, int64_t, int64_t, int64_t, const uint16_t*, int64_t, uint16_t*,
                                  int64_t, int64_t) {
    return 0;
}

extern "C" int llmaas_decode_matmul_available() { return 0; }
extern "C" int llmaas_int4_matmul(const uint16_t*, int64_t, int64_t, int64_t, const uint8_t*, int64_t, uint16_t*,
                                  int64_t, int64_t) {
    return 0;
}

#endif
