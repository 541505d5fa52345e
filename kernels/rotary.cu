// Rotary embedding, Hugging Face half-rotation layout, per-token positions. CPU reference:
// src/ops/rotary.rs. The backward is the same kernel with sign = -1 (the inverse rotation).
//
// x, y: [tokens, heads, 2 * half]; positions: [tokens]; cos, sin: [table_len, half] f32.
// One thread per (token, head, pair i): reads x[i] and x[i + half], writes y[i] and y[i + half].
// A position outside the table writes NaN (the CPU path reports an error instead).
#include "common.cuh"

template <typename T>
__device__ void rope(const T* __restrict__ x, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                     const uint32_t* __restrict__ positions, T* __restrict__ y, uint64_t n_pairs, uint32_t heads,
                     uint32_t half, uint32_t table_len, float sign) {
    for (uint64_t idx = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n_pairs;
         idx += (uint64_t)gridDim.x * blockDim.x) {
        const uint64_t i = idx % half;
        const uint64_t token_head = idx / half;
        const uint64_t token = token_head / heads;
        const uint64_t base = token_head * 2 * half;
        const uint32_t p = positions[token];
        float c = __int_as_float(0x7fc00000), s = c;  // NaN
        if (p < table_len) {
            c = cos_t[(uint64_t)p * half + i];
            s = sign * sin_t[(uint64_t)p * half + i];
        }
        const float a = to_f32(x[base + i]);
        const float b = to_f32(x[base + i + half]);
        y[base + i] = from_f32<T>(a * c - b * s);
        y[base + i + half] = from_f32<T>(b * c + a * s);
    }
}

#define ROPE(NAME, T)                                                                                  \
    extern "C" __global__ void NAME(const T* x, const float* cos_t, const float* sin_t,                \
                                    const uint32_t* positions, T* y, uint64_t n_pairs, uint32_t heads,  \
                                    uint32_t half, uint32_t table_len, float sign) {                    \
        rope<T>(x, cos_t, sin_t, positions, y, n_pairs, heads, half, table_len, sign);                  \
    }
CANDOR_FOR_EACH_DTYPE(ROPE, rope)
