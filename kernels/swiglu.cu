// SwiGLU y = silu(gate) * up, forward and backward. CPU reference: src/ops/swiglu.rs.
// Elementwise with a grid-stride loop. silu(gate) is rounded to the storage type before the product
// (as transformers does); everything else is f32. The backward writes d_gate to out[0..n) and d_up to
// out[n..2n).
#include "common.cuh"

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

template <typename T>
__device__ void swiglu_fwd(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ y, uint64_t n) {
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        const float g = to_f32(gate[i]);
        const float silu = round_to<T>(g * sigmoid(g));
        y[i] = from_f32<T>(silu * to_f32(up[i]));
    }
}

template <typename T>
__device__ void swiglu_bwd(const T* __restrict__ gate, const T* __restrict__ up, const T* __restrict__ dy,
                           T* __restrict__ out, uint64_t n) {
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        const float g = to_f32(gate[i]);
        const float u = to_f32(up[i]);
        const float d = to_f32(dy[i]);
        const float s = sigmoid(g);
        out[i] = from_f32<T>(d * u * s * (1.f + g * (1.f - s)));
        out[n + i] = from_f32<T>(d * g * s);
    }
}

#define FWD(NAME, T)                                                                       \
    extern "C" __global__ void NAME(const T* gate, const T* up, T* y, uint64_t n) {        \
        swiglu_fwd<T>(gate, up, y, n);                                                      \
    }
#define BWD(NAME, T)                                                                       \
    extern "C" __global__ void NAME(const T* gate, const T* up, const T* dy, T* out, uint64_t n) { \
        swiglu_bwd<T>(gate, up, dy, out, n);                                                \
    }
CANDOR_FOR_EACH_DTYPE(FWD, swiglu_fwd)
CANDOR_FOR_EACH_DTYPE(BWD, swiglu_bwd)
