// Shared by candor's kernels: f32 / bf16 / f16 loads and stores (all arithmetic in f32) and a warp sum.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half(v); }

// Rounds through the storage type (what a store followed by a load would give).
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_f32(from_f32<T>(v)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Instantiates KERNEL(NAME_f32, float), KERNEL(NAME_bf16, __nv_bfloat16), KERNEL(NAME_f16, __half).
#define CANDOR_FOR_EACH_DTYPE(KERNEL, NAME) \
    KERNEL(NAME##_f32, float)               \
    KERNEL(NAME##_bf16, __nv_bfloat16)      \
    KERNEL(NAME##_f16, __half)

// The same for the 16-bit types only (kernels on tensor cores): NAME_bf16 and NAME_f16.
#define CANDOR_FOR_EACH_HALF(KERNEL, NAME) \
    KERNEL(NAME##_bf16, __nv_bfloat16)     \
    KERNEL(NAME##_f16, __half)
