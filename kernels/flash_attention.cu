// FlashAttention-style attention for bf16/f16 on tensor cores (wmma m16n16k16, f32 accumulators): the
// scores and probabilities live in shared memory one tile at a time and are never written to global
// memory. CPU reference and launch code: src/ops/attention.rs (the op) and src/ops/flash_attention.rs.
//
// Shapes: q [b, heads, t, D], k and v [b, kv_heads, tk, D] read through strides (last dimension
// contiguous; query head h reads KV head h / (heads / kv_heads)); bias f32 [b, t, tk] or null, added to
// the scaled scores (f32::MIN or −∞ masks a key); out, dq [b, t, heads, D]; dk, dv [b, tk, kv_heads, D];
// stats f32 [b, t, heads, 2] = (row max m, Σ exp(x − m)), from the forward, for the backward; delta f32
// [b, t, heads] = rowsum(dO ⊙ O).
//
//   attn_tile_map:  which 16 × 16 tiles of the bias have a visible key, and which 16-row groups hold a
//                   row that sees no key. A tile with no visible key is skipped (causal masks halve the
//                   work) unless one of its rows is blind: such a row attends uniformly to every key, as
//                   the composed softmax does (all its scores are f32::MIN), so nothing can be skipped.
//   flash_fwd_dD:   one block of 4 warps per 64 query rows of one head; online softmax over key tiles.
//   attn_delta:     one warp per (token, head).
//   flash_dq_dD:    one block per 64 query rows of one head, over key tiles: dQ = scale·dS·K.
//   flash_dkv_dD:   one block per 64 keys of one KV head, over its query heads and 32-row query tiles:
//                   dV = Pᵀ·dO, dK = scale·dSᵀ·Q. Two kernels instead of atomics into dQ: deterministic,
//                   for two more products per tile.
// with P = exp(x − m) / l recomputed from the stats, dS = P ⊙ (dP − delta), dP = dO·Vᵀ.
//
// Fragments are only loaded, stored, filled, multiplied and scaled element by element (their layout across
// lanes is unspecified); the per-row factors of the output accumulators come from a fragment loaded from
// a matrix of row indices, which has the same layout as any accumulator. Row-wise softmax work runs on
// scores stored to shared memory. D is 64 or 128 (others use the composed path); static shared memory
// stays under 48 KB, so no launch attribute is needed.
#include <mma.h>

#include "common.cuh"

using namespace nvcuda;

namespace flash {
constexpr float MASKED = -3.40282347e38f;  // f32::MIN: a bias at or below it masks its key
constexpr unsigned FULL = 0xffffffffu;
constexpr int WARPS = 4, THREADS = 32 * WARPS;
constexpr int BQ = 16 * WARPS;   // query rows per forward / dQ block
constexpr int BKV = 16 * WARPS;  // keys per dK/dV block
constexpr int BQ_KV = 32;        // query rows per step of the dK/dV block

using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
template <typename T> using RowA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T> using RowB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
template <typename T> using ColB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;

// A block's shared memory, aligned for wmma's 256-bit loads and stores.
template <int N> struct alignas(32) Bytes {
    unsigned char b[N];
};

__device__ __forceinline__ uint32_t umin(uint32_t a, uint32_t b) { return a < b ? a : b; }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL, v, offset));
    return v;
}

__device__ __forceinline__ int warp_or(int v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v |= __shfl_xor_sync(FULL, v, offset);
    return v;
}

// Rows [r0, r0 + rows) of a [len, D] matrix with row stride `stride` into a [rows][D + 8] shared tile,
// zeros past `len` (so padded rows add nothing, not NaN, to the products). 16 bytes per load where every
// row starts 16-byte aligned (the usual case), 2 where a view's offset breaks that.
template <typename T, int D>
__device__ void stage(T* dst, const T* src, uint64_t stride, uint32_t r0, uint32_t rows, uint32_t len) {
    constexpr uint32_t V = 16 / sizeof(T), PER_ROW = D / V;
    if ((uintptr_t)src % 16 == 0 && stride % V == 0) {
        for (uint32_t i = threadIdx.x; i < rows * PER_ROW; i += blockDim.x) {
            const uint32_t r = i / PER_ROW, c = (i % PER_ROW) * V;
            uint4 chunk = make_uint4(0, 0, 0, 0);  // zero bits: 0.0 in bf16 and f16
            if (r0 + r < len) chunk = *reinterpret_cast<const uint4*>(src + (uint64_t)(r0 + r) * stride + c);
            *reinterpret_cast<uint4*>(dst + r * (D + 8) + c) = chunk;
        }
        return;
    }
    for (uint32_t i = threadIdx.x; i < rows * D; i += blockDim.x) {
        const uint32_t r = i / D, c = i % D;
        dst[r * (D + 8) + c] = r0 + r < len ? src[(uint64_t)(r0 + r) * stride + c] : from_f32<T>(0.f);
    }
}

// Whether rows [q0, q0 + rows) × keys [k0, k0 + keys) can be skipped (see attn_tile_map).
__device__ bool skippable(const uint8_t* map, const uint8_t* blind, uint32_t n, uint32_t t, uint32_t tk,
                          uint32_t q0, uint32_t rows, uint32_t k0, uint32_t keys) {
    if (!map) return false;
    const uint32_t gq = (t + 15) / 16, gk = (tk + 15) / 16;
    const uint32_t q_end = umin((q0 + rows + 15) / 16, gq), k_end = umin((k0 + keys + 15) / 16, gk);
    for (uint32_t a = q0 / 16; a < q_end; ++a) {
        if (blind[(uint64_t)n * gq + a]) return false;
        for (uint32_t c = k0 / 16; c < k_end; ++c)
            if (map[((uint64_t)n * gq + a) * gk + c]) return false;
    }
    return true;
}

// An accumulator fragment whose every element holds its own row (0..15), via `scratch` (16 × ld f32).
__device__ void row_index(Acc& rows, float* scratch, unsigned ld) {
    const unsigned lane = threadIdx.x % 32;
    for (unsigned e = lane; e < 256; e += 32) scratch[(e / 16) * ld + e % 16] = (float)(e / 16);
    __syncwarp();
    wmma::load_matrix_sync(rows, scratch, ld, wmma::mem_row_major);
    __syncwarp();
}

// Writes a warp's 16 × 16 f32 tile (already in `scratch`, 16 × ld) as T rows: row r to dst + r·stride,
// for rows r < valid.
template <typename T>
__device__ void write_tile(T* dst, uint64_t stride, uint32_t valid, const float* scratch, unsigned ld) {
    const unsigned lane = threadIdx.x % 32;
    for (unsigned e = lane; e < 256; e += 32) {
        const unsigned r = e / 16, c = e % 16;
        if (r < valid) dst[r * stride + c] = from_f32<T>(scratch[r * ld + c]);
    }
}

// This warp's 16 rows of a staged [rows][D + 8] tile as D/16 fragments.
template <typename T, int D>
__device__ void load_rows(RowA<T>* f, const T* tile) {
    const unsigned warp = threadIdx.x / 32;
#pragma unroll
    for (int c = 0; c < D / 16; ++c) wmma::load_matrix_sync(f[c], tile + warp * 16 * (D + 8) + c * 16, D + 8);
}

// out (16 × N f32, leading dimension ld) = A·Bᵀ for this warp's 16 rows: A as D/16 fragments, B the
// first N rows of a staged [rows][D + 8] tile.
template <typename T, int D, int N>
__device__ void products_bt(const RowA<T>* a, const T* b, float* out, unsigned ld) {
#pragma unroll
    for (int nb = 0; nb < N / 16; ++nb) {
        Acc s;
        wmma::fill_fragment(s, 0.f);
#pragma unroll
        for (int c = 0; c < D / 16; ++c) {
            ColB<T> bf;
            wmma::load_matrix_sync(bf, b + nb * 16 * (D + 8) + c * 16, D + 8);
            wmma::mma_sync(s, a[c], bf, s);
        }
        wmma::store_matrix_sync(out + nb * 16, s, ld, wmma::mem_row_major);
    }
}

// acc (D/16 fragments, 16 × D) += A·B: A this warp's 16 × K in shared memory (leading dimension lda), B the
// first K rows of a staged [rows][D + 8] tile.
template <typename T, int D, int K>
__device__ void accumulate(Acc* acc, const T* a, unsigned lda, const T* b) {
#pragma unroll
    for (int kb = 0; kb < K / 16; ++kb) {
        RowA<T> af;
        wmma::load_matrix_sync(af, a + kb * 16, lda);
#pragma unroll
        for (int c = 0; c < D / 16; ++c) {
            RowB<T> bf;
            wmma::load_matrix_sync(bf, b + kb * 16 * (D + 8) + c * 16, D + 8);
            wmma::mma_sync(acc[c], af, bf, acc[c]);
        }
    }
}

// Writes a warp's 16 × D accumulators times `scale` as T rows (row r to dst + r·stride, rows r < valid),
// through `scratch` (16 × ld f32).
template <typename T, int D>
__device__ void write_rows(T* dst, uint64_t stride, uint32_t valid, Acc* acc, float scale, float* scratch,
                           unsigned ld) {
#pragma unroll
    for (int c = 0; c < D / 16; ++c) {
        for (int e = 0; e < acc[c].num_elements; ++e) acc[c].x[e] *= scale;
        wmma::store_matrix_sync(scratch, acc[c], ld, wmma::mem_row_major);
        __syncwarp();
        write_tile(dst + c * 16, stride, valid, scratch, ld);
        __syncwarp();
    }
}

template <typename T, int D, int BK>
__device__ void forward(const T* q, const T* k, const T* v, const float* bias, const uint8_t* map,
                        const uint8_t* blind, T* out, float* stats, uint32_t nh, uint32_t nkv, uint32_t t,
                        uint32_t tk, uint64_t qb, uint64_t qh, uint64_t qt, uint64_t kb, uint64_t kh, uint64_t kt,
                        uint64_t vb, uint64_t vh, uint64_t vt, float scale) {
    constexpr int DP = D + 8, SP = BK + 4, PP = BK + 8;
    constexpr int KV = 2 * BK * DP * sizeof(T), S = WARPS * 16 * SP * 4, P = WARPS * 16 * PP * sizeof(T);
    static_assert(KV >= BQ * DP * (int)sizeof(T), "the Q tile is staged where K and V go");
    static_assert(KV + S + P + 2 * WARPS * 16 * 4 <= 48 * 1024, "static shared memory");
    __shared__ Bytes<KV + S + P + 2 * WARPS * 16 * 4> shared;
    unsigned char* smem = shared.b;
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    T* ks = (T*)smem;
    T* vs = ks + BK * DP;
    float* sw = (float*)(smem + KV) + warp * 16 * SP;
    T* pw = (T*)(smem + KV + S) + warp * 16 * PP;
    float* row_factor = (float*)(smem + KV + S + P) + warp * 16;  // alpha per tile, then 1 / l

    const uint32_t q0 = blockIdx.x * BQ, h = blockIdx.y, n = blockIdx.z, g = h / (nh / nkv);
    const uint32_t my_rows = t > q0 + warp * 16 ? umin(16, t - q0 - warp * 16) : 0;
    const T* kp = k + n * kb + g * kh;
    const T* vp = v + n * vb + g * vh;

    stage<T, D>(ks, q + n * qb + h * qh, qt, q0, BQ, t);
    __syncthreads();
    RowA<T> qf[D / 16];
load_rows<T, D>(qf, ks);
    Acc rows;
    row_index(rows, sw, SP);
    Acc o[D / 16];
#pragma unroll
    for (int c = 0; c < D / 16; ++c) wmma::fill_fragment(o[c], 0.f);
    float m_run[16], l_run[16];
#pragma unroll
    for (int r = 0; r < 16; ++r) m_run[r] = -INFINITY, l_run[r] = 0.f;

    for (uint32_t k0 = 0; k0 < tk; k0 += BK) {
        if (skippable(map, blind, n, t, tk, q0, BQ, k0, BK)) continue;
        __syncthreads();  // every warp is done with the previous tile (and with the staged Q)
        stage<T, D>(ks, kp, kt, k0, BK, tk);
        stage<T, D>(vs, vp, vt, k0, BK, tk);
        __syncthreads();
        products_bt<T, D, BK>(qf, ks, sw, SP);
        __syncwarp();
#pragma unroll
        for (int r = 0; r < 16; ++r) {
            const uint32_t row = q0 + warp * 16 + r;
            const float* brow = bias && row < t ? bias + ((uint64_t)n * t + row) * tk : nullptr;
            float x[BK / 32], mx = -INFINITY;
#pragma unroll
            for (int i = 0; i < BK / 32; ++i) {
                const uint32_t j = lane + 32 * i, key = k0 + j;
                x[i] = key < tk ? sw[r * SP + j] * scale + (brow ? brow[key] : 0.f) : -INFINITY;
                mx = fmaxf(mx, x[i]);
            }
            const float m_new = fmaxf(m_run[r], warp_max(mx));
            // m_new is −∞ only while every key so far is masked with −∞ (a bias of f32::MIN stays finite)
            const bool none = m_new == -INFINITY;
            const float alpha = none ? 1.f : expf(m_run[r] - m_new);
            float sum = 0.f;
#pragma unroll
            for (int i = 0; i < BK / 32; ++i) {
                const float p = none ? 0.f : expf(x[i] - m_new);
                pw[r * PP + lane + 32 * i] = from_f32<T>(p);
                sum += p;
            }
            l_run[r] = l_run[r] * alpha + warp_sum(sum);
            m_run[r] = m_new;
            if (lane == 0) row_factor[r] = alpha;
        }
        __syncwarp();
#pragma unroll
        for (int c = 0; c < D / 16; ++c)
            for (int e = 0; e < o[c].num_elements; ++e) o[c].x[e] *= row_factor[(int)rows.x[e]];
        accumulate<T, D, BK>(o, pw, PP, vs);
        __syncwarp();
    }

#pragma unroll
    for (int r = 0; r < 16; ++r) {
        if (lane == 0) row_factor[r] = 1.f / l_run[r];
        if (lane == (unsigned)r && r < (int)my_rows) {
            float* st = stats + (((uint64_t)n * t + q0 + warp * 16 + r) * nh + h) * 2;
            st[0] = m_run[r];
            st[1] = l_run[r];
        }
    }
    __syncwarp();
#pragma unroll
    for (int c = 0; c < D / 16; ++c)
        for (int e = 0; e < o[c].num_elements; ++e) o[c].x[e] *= row_factor[(int)rows.x[e]];
    write_rows<T, D>(out + (((uint64_t)n * t + q0 + warp * 16) * nh + h) * D, (uint64_t)nh * D, my_rows, o, 1.f,
                     sw, SP);
}

template <typename T>
__device__ void delta(const T* o, const T* dout, float* out, uint32_t rows, uint32_t d) {
    const uint32_t row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;
    float s = 0.f;
    for (uint32_t i = threadIdx.x; i < d; i += 32) s += to_f32(o[(uint64_t)row * d + i]) * to_f32(dout[(uint64_t)row * d + i]);
    s = warp_sum(s);
    if (threadIdx.x == 0) out[row] = s;
}

template <typename T, int D>
__device__ void grad_q(const T* q, const T* k, const T* v, const float* bias, const uint8_t* map,
                       const uint8_t* blind, const T* dout, const float* stats, const float* deltas, T* dq,
                       uint32_t nh, uint32_t nkv, uint32_t t, uint32_t tk, uint64_t qb, uint64_t qh, uint64_t qt,
                       uint64_t kb, uint64_t kh, uint64_t kt, uint64_t vb, uint64_t vh, uint64_t vt, float scale) {
    constexpr int BK = 32, DP = D + 8, SP = BK + 4, PP = BK + 8;
    constexpr int KV = 2 * BK * DP * sizeof(T), S = WARPS * 16 * SP * 4, P = WARPS * 16 * PP * sizeof(T);
    static_assert(KV >= BQ * DP * (int)sizeof(T), "the Q and dO tiles are staged where K and V go");
    static_assert(KV + 2 * S + P <= 48 * 1024, "static shared memory");
    __shared__ Bytes<KV + 2 * S + P> shared;
    unsigned char* smem = shared.b;
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    T* ks = (T*)smem;
    T* vs = ks + BK * DP;
    float* sw = (float*)(smem + KV) + warp * 16 * SP;
    float* dpw = (float*)(smem + KV + S) + warp * 16 * SP;
    T* dsw = (T*)(smem + KV + 2 * S) + warp * 16 * PP;

    const uint32_t q0 = blockIdx.x * BQ, h = blockIdx.y, n = blockIdx.z, g = h / (nh / nkv);
    const uint32_t first = q0 + warp * 16;
    const uint32_t my_rows = t > first ? umin(16, t - first) : 0;
    const T* kp = k + n * kb + g * kh;
    const T* vp = v + n * vb + g * vh;
    const uint64_t row_stride = (uint64_t)nh * D;  // of dO and dQ

    RowA<T> qf[D / 16], df[D / 16];
    stage<T, D>(ks, q + n * qb + h * qh, qt, q0, BQ, t);
    __syncthreads();
load_rows<T, D>(qf, ks);
    __syncthreads();
    stage<T, D>(ks, dout + (uint64_t)n * t * row_stride + h * D, row_stride, q0, BQ, t);
    __syncthreads();
load_rows<T, D>(df, ks);
    // this warp's rows: max, 1 / sum, delta (zeros past t, where nothing is written)
    float m[16], inv_l[16], dl[16];
#pragma unroll
    for (int r = 0; r < 16; ++r) {
        const uint64_t at = ((uint64_t)n * t + first + r) * nh + h;
        const bool in = r < (int)my_rows;
        m[r] = in ? stats[2 * at] : 0.f;
        inv_l[r] = in ? 1.f / stats[2 * at + 1] : 0.f;
        dl[r] = in ? deltas[at] : 0.f;
    }
    Acc acc[D / 16];
#pragma unroll
    for (int c = 0; c < D / 16; ++c) wmma::fill_fragment(acc[c], 0.f);

    for (uint32_t k0 = 0; k0 < tk; k0 += BK) {
        if (skippable(map, blind, n, t, tk, q0, BQ, k0, BK)) continue;
        __syncthreads();
        stage<T, D>(ks, kp, kt, k0, BK, tk);
        stage<T, D>(vs, vp, vt, k0, BK, tk);
        __syncthreads();
        products_bt<T, D, BK>(qf, ks, sw, SP);   // S = Q·Kᵀ
        products_bt<T, D, BK>(df, vs, dpw, SP);  // dP = dO·Vᵀ
        __syncwarp();
        const uint32_t key = k0 + lane;  // BK == 32: one key per lane
#pragma unroll
        for (int r = 0; r < 16; ++r) {
            float ds = 0.f;
            if (r < (int)my_rows && key < tk) {
                const float b = bias ? bias[((uint64_t)n * t + first + r) * tk + key] : 0.f;
                const float p = expf(sw[r * SP + lane] * scale + b - m[r]) * inv_l[r];
                ds = p * (dpw[r * SP + lane] - dl[r]);
            }
            dsw[r * PP + lane] = from_f32<T>(ds);
        }
        __syncwarp();
        accumulate<T, D, BK>(acc, dsw, PP, ks);  // dQ += dS·K
        __syncwarp();
    }
    write_rows<T, D>(dq + ((uint64_t)n * t + first) * row_stride + h * D, row_stride, my_rows, acc, scale, sw, SP);
}

template <typename T, int D>
__device__ void grad_kv(const T* q, const T* k, const T* v, const float* bias, const uint8_t* map,
                        const uint8_t* blind, const T* dout, const float* stats, const float* deltas, T* dk, T* dv,
                        uint32_t nh, uint32_t nkv, uint32_t t, uint32_t tk, uint64_t qb, uint64_t qh, uint64_t qt,
                        uint64_t kb, uint64_t kh, uint64_t kt, uint64_t vb, uint64_t vh, uint64_t vt, float scale) {
    constexpr int DP = D + 8, SP = BQ_KV + 4, PP = BQ_KV + 8;
    constexpr int STAGE = BKV * DP * sizeof(T), S = WARPS * 16 * SP * 4, P = WARPS * 16 * PP * sizeof(T);
    static_assert(STAGE >= 2 * BQ_KV * DP * (int)sizeof(T), "the Q and dO tiles are staged where K went");
    static_assert(STAGE + 2 * S + 2 * P + 3 * BQ_KV * 4 <= 48 * 1024, "static shared memory");
    __shared__ Bytes<STAGE + 2 * S + 2 * P + 3 * BQ_KV * 4> shared;
    unsigned char* smem = shared.b;
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    T* qs = (T*)smem;
    T* dos = qs + BQ_KV * DP;
    float* sw = (float*)(smem + STAGE) + warp * 16 * SP;
    float* dpw = (float*)(smem + STAGE + S) + warp * 16 * SP;
    T* pw = (T*)(smem + STAGE + 2 * S) + warp * 16 * PP;
    T* dsw = (T*)(smem + STAGE + 2 * S + P) + warp * 16 * PP;
    float* row_m = (float*)(smem + STAGE + 2 * S + 2 * P);
    float* row_inv_l = row_m + BQ_KV;
    float* row_delta = row_inv_l + BQ_KV;

    const uint32_t k0 = blockIdx.x * BKV, g = blockIdx.y, n = blockIdx.z, rep = nh / nkv;
    const uint32_t first = k0 + warp * 16;
    const uint32_t my_keys = tk > first ? umin(16, tk - first) : 0;
    const uint64_t row_stride = (uint64_t)nh * D;  // of dO

    RowA<T> kf[D / 16], vf[D / 16];
    stage<T, D>(qs, k + n * kb + g * kh, kt, k0, BKV, tk);
    __syncthreads();
load_rows<T, D>(kf, qs);
    __syncthreads();
    stage<T, D>(qs, v + n * vb + g * vh, vt, k0, BKV, tk);
    __syncthreads();
load_rows<T, D>(vf, qs);
    Acc dka[D / 16], dva[D / 16];
#pragma unroll
    for (int c = 0; c < D / 16; ++c) wmma::fill_fragment(dka[c], 0.f), wmma::fill_fragment(dva[c], 0.f);

    for (uint32_t j = 0; j < rep; ++j) {
        const uint32_t h = g * rep + j;
        for (uint32_t q0 = 0; q0 < t; q0 += BQ_KV) {
            if (skippable(map, blind, n, t, tk, q0, BQ_KV, k0, BKV)) continue;
            __syncthreads();
            stage<T, D>(qs, q + n * qb + h * qh, qt, q0, BQ_KV, t);
            stage<T, D>(dos, dout + (uint64_t)n * t * row_stride + h * D, row_stride, q0, BQ_KV, t);
            if (threadIdx.x < BQ_KV) {
                const uint32_t row = q0 + threadIdx.x;
                const uint64_t at = ((uint64_t)n * t + row) * nh + h;
                const bool in = row < t;
                row_m[threadIdx.x] = in ? stats[2 * at] : 0.f;
                row_inv_l[threadIdx.x] = in ? 1.f / stats[2 * at + 1] : 0.f;
                row_delta[threadIdx.x] = in ? deltas[at] : 0.f;
            }
            __syncthreads();
            // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ: this warp's 16 keys × 32 queries
            products_bt<T, D, BQ_KV>(kf, qs, sw, SP);
            products_bt<T, D, BQ_KV>(vf, dos, dpw, SP);
            __syncwarp();
            // lanes 0-15 and 16-31 take two queries at a time, a key each (coalesced bias reads)
            const uint32_t r = lane % 16, key = first + r;
#pragma unroll
            for (int i = 0; i < BQ_KV / 2; ++i) {
                const uint32_t jq = 2 * i + lane / 16, row = q0 + jq;
                float p = 0.f, ds = 0.f;
                if (r < my_keys && row < t) {
                    const float b = bias ? bias[((uint64_t)n * t + row) * tk + key] : 0.f;
                    p = expf(sw[r * SP + jq] * scale + b - row_m[jq]) * row_inv_l[jq];
                    ds = p * (dpw[r * SP + jq] - row_delta[jq]);
                }
                pw[r * PP + jq] = from_f32<T>(p);
                dsw[r * PP + jq] = from_f32<T>(ds);
            }
            __syncwarp();
            accumulate<T, D, BQ_KV>(dva, pw, PP, dos);  // dV += Pᵀ·dO
            accumulate<T, D, BQ_KV>(dka, dsw, PP, qs);  // dK += dSᵀ·Q
            __syncwarp();
        }
    }

    const uint64_t kv_stride = (uint64_t)nkv * D, at = ((uint64_t)n * tk + first) * kv_stride + g * D;
    write_rows<T, D>(dk + at, kv_stride, my_keys, dka, scale, sw, SP);
    write_rows<T, D>(dv + at, kv_stride, my_keys, dva, 1.f, sw, SP);
}
}  // namespace flash

// grid (ceil(t / 16), b), one warp per block
extern "C" __global__ void attn_tile_map(const float* bias, uint8_t* map, uint8_t* blind_groups, uint32_t t,
                                         uint32_t tk) {
    using namespace flash;
    const uint32_t grp = blockIdx.x, n = blockIdx.y, lane = threadIdx.x;
    const uint32_t gq = (t + 15) / 16, gk = (tk + 15) / 16;
    const uint32_t row = grp * 16 + lane / 2, half = lane % 2;
    int row_sees = 0;
    for (uint32_t c = 0; c < gk; ++c) {
        int any = 0;
        if (row < t)
            for (uint32_t i = 0; i < 8; ++i) {
                const uint32_t key = c * 16 + half * 8 + i;
                // NaN counts as visible, so it reaches the output as in the composed version
                if (key < tk && !(bias[((uint64_t)n * t + row) * tk + key] <= MASKED)) any = 1;
            }
        row_sees |= any;
        any = warp_or(any);
        if (lane == 0) map[((uint64_t)n * gq + grp) * gk + c] = (uint8_t)any;
    }
    row_sees |= __shfl_xor_sync(FULL, row_sees, 1);
    const int blind = warp_or(row < t && !row_sees);
    if (lane == 0) blind_groups[(uint64_t)n * gq + grp] = (uint8_t)blind;
}

#define FLASH_ARGS(T)                                                                                        \
    const T *q, const T *k, const T *v, const float *bias, const uint8_t *map, const uint8_t *blind
#define FLASH_DIMS                                                                                           \
    uint32_t nh, uint32_t nkv, uint32_t t, uint32_t tk, uint64_t qb, uint64_t qh, uint64_t qt, uint64_t kb,    \
        uint64_t kh, uint64_t kt, uint64_t vb, uint64_t vh, uint64_t vt, float scale
#define FLASH_PASS nh, nkv, t, tk, qb, qh, qt, kb, kh, kt, vb, vh, vt, scale

// grid (ceil(t / 64), heads, b), 128 threads
#define FWD(NAME, T, D, BK)                                                                                  \
    extern "C" __global__ void __launch_bounds__(flash::THREADS)                                             \
        NAME(FLASH_ARGS(T), T* out, float* stats, FLASH_DIMS) {                                              \
        flash::forward<T, D, BK>(q, k, v, bias, map, blind, out, stats, FLASH_PASS);                         \
    }
// grid (ceil(t / 64), heads, b), 128 threads
#define DQ(NAME, T, D)                                                                                       \
    extern "C" __global__ void __launch_bounds__(flash::THREADS)                                             \
        NAME(FLASH_ARGS(T), const T* dout, const float* stats, const float* deltas, T* dq, FLASH_DIMS) {       \
        flash::grad_q<T, D>(q, k, v, bias, map, blind, dout, stats, deltas, dq, FLASH_PASS);                 \
    }
// grid (ceil(tk / 64), kv_heads, b), 128 threads
#define DKV(NAME, T, D)                                                                                      \
    extern "C" __global__ void __launch_bounds__(flash::THREADS)                                             \
        NAME(FLASH_ARGS(T), const T* dout, const float* stats, const float* deltas, T* dk, T* dv, FLASH_DIMS) { \
        flash::grad_kv<T, D>(q, k, v, bias, map, blind, dout, stats, deltas, dk, dv, FLASH_PASS);            \
    }
// warp per row: blocks of (32, 8)
#define DELTA(NAME, T)                                                                                       \
    extern "C" __global__ void NAME(const T* o, const T* dout, float* out, uint32_t rows, uint32_t d) {     \
        flash::delta<T>(o, dout, out, rows, d);                                                              \
    }
#define FWD_D64(NAME, T) FWD(NAME, T, 64, 64)
#define FWD_D128(NAME, T) FWD(NAME, T, 128, 32)
#define DQ_D64(NAME, T) DQ(NAME, T, 64)
#define DQ_D128(NAME, T) DQ(NAME, T, 128)
#define DKV_D64(NAME, T) DKV(NAME, T, 64)
#define DKV_D128(NAME, T) DKV(NAME, T, 128)
CANDOR_FOR_EACH_HALF(FWD_D64, flash_fwd_d64)
CANDOR_FOR_EACH_HALF(FWD_D128, flash_fwd_d128)
CANDOR_FOR_EACH_HALF(DQ_D64, flash_dq_d64)
CANDOR_FOR_EACH_HALF(DQ_D128, flash_dq_d128)
CANDOR_FOR_EACH_HALF(DKV_D64, flash_dkv_d64)
CANDOR_FOR_EACH_HALF(DKV_D128, flash_dkv_d128)
CANDOR_FOR_EACH_HALF(DELTA, attn_delta)
