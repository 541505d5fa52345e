// RMSNorm over the last dimension, forward and backward. CPU reference: src/ops/rms_norm.rs.
//
// One warp per row (blocks of 8 warps, blockDim = (32, 8)): rows are 64..8192 elements in the models
// we train (q/k-norm rows are head_dim long), so a warp's lanes stride the row with coalesced loads and
// a shuffle reduction finishes it without shared memory or block barriers. Sums are f32.
#include "common.cuh"

// y = round(round(x * r) * w), r = 1 / sqrt(mean(x^2) + eps)
template <typename T>
__device__ void rms_norm_fwd(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                             uint32_t rows, uint32_t d, float eps) {
    const uint32_t row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;
    const T* xr = x + (size_t)row * d;
    T* yr = y + (size_t)row * d;
    float ss = 0.f;
    for (uint32_t i = threadIdx.x; i < d; i += 32) {
        const float v = to_f32(xr[i]);
        ss += v * v;
    }
    ss = warp_sum(ss);
    const float r = rsqrtf(ss / (float)d + eps);
    for (uint32_t i = threadIdx.x; i < d; i += 32) {
        const float normed = round_to<T>(to_f32(xr[i]) * r);
        yr[i] = from_f32<T>(normed * to_f32(w[i]));
    }
}

// dx = r * w * dy - x * r^3 / d * sum(w * dy * x)
template <typename T>
__device__ void rms_norm_bwd(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ dy,
                             T* __restrict__ dx, uint32_t rows, uint32_t d, float eps) {
    const uint32_t row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;
    const size_t base = (size_t)row * d;
    float ss = 0.f, gx = 0.f;
    for (uint32_t i = threadIdx.x; i < d; i += 32) {
        const float v = to_f32(x[base + i]);
        ss += v * v;
        gx += to_f32(w[i]) * to_f32(dy[base + i]) * v;
    }
    ss = warp_sum(ss);
    gx = warp_sum(gx);
    const float r = rsqrtf(ss / (float)d + eps);
    const float c = gx * r * r * r / (float)d;
    for (uint32_t i = threadIdx.x; i < d; i += 32) {
        dx[base + i] = from_f32<T>(r * to_f32(w[i]) * to_f32(dy[base + i]) - c * to_f32(x[base + i]));
    }
}

#define FWD(NAME, T)                                                                                  \
    extern "C" __global__ void NAME(const T* x, const T* w, T* y, uint32_t rows, uint32_t d, float eps) { \
        rms_norm_fwd<T>(x, w, y, rows, d, eps);                                                        \
    }
#define BWD(NAME, T)                                                                                  \
    extern "C" __global__ void NAME(const T* x, const T* w, const T* dy, T* dx, uint32_t rows, uint32_t d, \
                                    float eps) {                                                      \
        rms_norm_bwd<T>(x, w, dy, dx, rows, d, eps);                                                   \
    }
CANDOR_FOR_EACH_DTYPE(FWD, rms_norm_fwd)
CANDOR_FOR_EACH_DTYPE(BWD, rms_norm_bwd)
