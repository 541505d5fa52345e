// The row-wise half of the chunked LM head + cross-entropy. CPU reference: src/ops/linear_cross_entropy.rs.
//
// For one chunk of logits [rows, vocab] in the model dtype (cuBLAS wrote them):
//   row_xent_*:     out[0, r] = lse_r = log Σ_j exp(logits[r, j]),  out[1, r] = lse_r − logits[r, label_r]
//                   (f32; one read of the row with an online max and sum; label ≥ vocab gives NaN)
//   softmax_grad_*: logits[r, j] = exp(logits[r, j] − lse_r) − [j == label_r], in place, rounded once to
//                   the storage type: the gradient of the summed loss with respect to the logits, which
//                   the next cuBLAS product turns into the hidden states' gradient.
// row_xent: one block per row (grid-stride over rows), any multiple of 32 threads up to 1024, a shuffle
// reduction per warp and one through shared memory across warps. softmax_grad: elementwise, grid-stride.
#include "common.cuh"

struct MaxSum {
    float m, s;  // running max, and Σ exp(x − m)
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return {m, 0.f};  // both empty (exp(−inf − −inf) would be NaN)
    return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

__device__ __forceinline__ MaxSum warp_max_sum(MaxSum v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const MaxSum o = {__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)};
        v = combine(v, o);
    }
    return v;
}

// Every thread of the block gets the combination of all threads' values.
__device__ MaxSum block_max_sum(MaxSum v) {
    __shared__ float ms[32], ss[32];
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    v = warp_max_sum(v);
    if (lane == 0) {
        ms[warp] = v.m;
        ss[warp] = v.s;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < warps ? MaxSum{ms[lane], ss[lane]} : MaxSum{-INFINITY, 0.f};
        v = warp_max_sum(v);
        if (lane == 0) {
            ms[0] = v.m;
            ss[0] = v.s;
        }
    }
    __syncthreads();
    const MaxSum out = {ms[0], ss[0]};
    __syncthreads();  // everyone has read before the next row overwrites
    return out;
}

template <typename T>
__device__ void row_xent(const T* __restrict__ logits, const uint32_t* __restrict__ labels, float* __restrict__ out,
                         uint32_t rows, uint32_t vocab) {
    for (uint32_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* r = logits + (size_t)row * vocab;
        MaxSum v = {-INFINITY, 0.f};
        for (uint32_t j = threadIdx.x; j < vocab; j += blockDim.x) {
            const float x = to_f32(r[j]);
            if (x > v.m) {
                v.s = v.s * expf(v.m - x) + 1.f;
                v.m = x;
            } else {
                v.s += expf(x - v.m);  // a NaN logit lands here and makes the sum NaN
            }
        }
        v = block_max_sum(v);
        if (threadIdx.x == 0) {
            const float lse = v.m + logf(v.s);
            const uint32_t label = labels[row];
            out[row] = lse;
            out[rows + row] = label < vocab ? lse - to_f32(r[label]) : __int_as_float(0x7fc00000);
        }
    }
}

template <typename T>
__device__ void softmax_grad(T* logits, const float* __restrict__ lse, const uint32_t* __restrict__ labels,
                             uint32_t rows, uint32_t vocab) {
    const uint64_t n = (uint64_t)rows * vocab;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        const uint64_t row = i / vocab, j = i % vocab;
        const float p = expf(to_f32(logits[i]) - lse[row]);
        logits[i] = from_f32<T>(j == labels[row] ? p - 1.f : p);
    }
}

#define XENT(NAME, T)                                                                                    \
    extern "C" __global__ void NAME(const T* logits, const uint32_t* labels, float* out, uint32_t rows,  \
                                    uint32_t vocab) {                                                    \
        row_xent<T>(logits, labels, out, rows, vocab);                                                   \
    }
#define GRAD(NAME, T)                                                                                    \
    extern "C" __global__ void NAME(T* logits, const float* lse, const uint32_t* labels, uint32_t rows,   \
                                    uint32_t vocab) {                                                    \
        softmax_grad<T>(logits, lse, labels, rows, vocab);                                               \
    }
CANDOR_FOR_EACH_DTYPE(XENT, row_xent)
CANDOR_FOR_EACH_DTYPE(GRAD, softmax_grad)
