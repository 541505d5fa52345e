// A CPU emulation of the slice of CUDA that kernels/*.cu use, so their logic (index arithmetic,
// reductions, barriers, warp shuffles, dtype conversions) runs in CI on machines without a GPU.
//
// Every thread of a block is a real std::thread, so __syncthreads and warp shuffles are real barriers;
// blocks run one after another, so `__shared__` (here: `static`) is the block's shared memory. A thread
// that returns leaves the block's and its warp's barriers (as an exited GPU thread stops counting).
// What this cannot catch: the memory model (coalescing, bank conflicts), register and shared-memory
// limits, PTX/driver issues, and the Rust launch code; `candor selftest --device cuda` covers those.
#pragma once
#include <barrier>
#include <cmath>
#include <math.h>  // expf, logf, fmaxf in the global namespace, as in device code
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct uint3 {
    unsigned x = 0, y = 0, z = 0;
};

namespace cuda_emu {
struct Block {
    dim3 dim;
    std::unique_ptr<std::barrier<>> all;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<uint64_t> lanes;  // one exchange slot per thread, for the shuffles
};
inline Block* block = nullptr;
inline dim3 grid_dim;
inline thread_local uint3 thread_idx, block_idx;
inline thread_local unsigned linear_tid = 0;
}  // namespace cuda_emu

#define threadIdx (cuda_emu::thread_idx)
#define blockIdx (cuda_emu::block_idx)
#define blockDim (cuda_emu::block->dim)
#define gridDim (cuda_emu::grid_dim)

inline void __syncthreads() { cuda_emu::block->all->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { cuda_emu::block->warps[cuda_emu::linear_tid / 32]->arrive_and_wait(); }

// The value `v` of the lane `src_lane(lane)` of this thread's warp (its own where that lane does not exist).
template <typename T, typename F>
inline T cuda_emu_shuffle(T v, F src_lane) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 64 bits");
    auto* b = cuda_emu::block;
    const unsigned t = cuda_emu::linear_tid, warp = t / 32, lane = t % 32;
    std::memcpy(&b->lanes[t], &v, sizeof(T));
    b->warps[warp]->arrive_and_wait();
    const unsigned src = warp * 32 + src_lane(lane);
    T out = v;
    if (src_lane(lane) < 32 && src < b->lanes.size()) std::memcpy(&out, &b->lanes[src], sizeof(T));
    b->warps[warp]->arrive_and_wait();
    return out;
}
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int mask) {
    return cuda_emu_shuffle(v, [=](unsigned lane) { return lane ^ (unsigned)mask; });
}
template <typename T> inline T __shfl_down_sync(unsigned, T v, unsigned delta) {
    return cuda_emu_shuffle(v, [=](unsigned lane) { return lane + delta; });
}
template <typename T> inline T __shfl_sync(unsigned, T v, int src) {
    return cuda_emu_shuffle(v, [=](unsigned) { return (unsigned)src; });
}

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
// IEEE round-to-nearest single operations (on the GPU: never fused into an FMA; here, built without FMA
// contraction, every float operation already is one)
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}

// bf16 and f16 as the CUDA headers define them for device code: storage types with
// round-to-nearest-even conversions.
struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 v) {
    const uint32_t u = uint32_t(v.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) return {uint16_t((u >> 16) | 0x40)};
    u += 0x7fff + ((u >> 16) & 1);
    return {uint16_t(u >> 16)};
}
struct __half {
    _Float16 v;
};
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half(float f) { return {(_Float16)f}; }

namespace cuda_emu {
// Runs `kernel(args...)` on a grid of blocks, each block's threads concurrently.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block_dim, A... args) {
    grid_dim = grid;
    const unsigned n = block_dim.x * block_dim.y * block_dim.z;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                Block b;
                b.dim = block_dim;
                b.all = std::make_unique<std::barrier<>>(n);
                for (unsigned w = 0; w * 32 < n; ++w)
                    b.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - w * 32)));
                b.lanes.assign(n, 0);
                block = &b;
                std::vector<std::thread> threads;
                threads.reserve(n);
                for (unsigned t = 0; t < n; ++t)
                    threads.emplace_back([&, t] {
                        linear_tid = t;
                        thread_idx = {t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y)};
                        block_idx = {bx, by, bz};
                        kernel(args...);
                        b.warps[t / 32]->arrive_and_drop();
                        b.all->arrive_and_drop();
                    });
                for (auto& th : threads) th.join();
                block = nullptr;
            }
}
}  // namespace cuda_emu
