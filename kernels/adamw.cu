// AdamW, one parameter tensor per launch pair, in place. CPU version and the composed reference:
// src/ops/adamw.rs. Both kernels round each operation separately (__fmul_rn and friends: no fused
// multiply-adds), in the order the composed candle ops do, so the update is bit for bit the CPU's.
//   adamw_moments: mv = [m; v] (2n floats), g = grad·scale (clipping):  m = m·b1 + g·c1,  v = v·b2 + (g·g)·c2
//   adamw_update:  p = p·decay − (m / (sqrt(v)·inv_b2 + eps))·step
// with c1 = 1 − β1, c2 = 1 − β2, inv_b2 = 1/sqrt(1 − β2^t), step = lr/(1 − β1^t), decay = 1 − lr·wd.
#include <stdint.h>

extern "C" __global__ void adamw_moments(float* __restrict__ mv, const float* __restrict__ g, uint64_t n, float scale,
                                         float b1, float c1, float b2, float c2) {
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        const float gi = __fmul_rn(g[i], scale);
        mv[i] = __fadd_rn(__fmul_rn(mv[i], b1), __fmul_rn(gi, c1));
        mv[n + i] = __fadd_rn(__fmul_rn(mv[n + i], b2), __fmul_rn(__fmul_rn(gi, gi), c2));
    }
}

extern "C" __global__ void adamw_update(float* __restrict__ p, const float* __restrict__ mv, uint64_t n, float inv_b2,
                                        float eps, float step, float decay) {
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(mv[n + i]), inv_b2), eps);
        p[i] = __fsub_rn(__fmul_rn(p[i], decay), __fmul_rn(__fdiv_rn(mv[i], denom), step));
    }
}
