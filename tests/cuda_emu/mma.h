// The warp matrix API (`nvcuda::wmma`, CUDA's <mma.h>) for the CPU emulation in cuda_emu.h: m16n16k16
// tiles, bf16/f16 inputs, f32 accumulators.
//
// A fragment's layout across the lanes of a warp is unspecified in CUDA; a kernel may only move whole
// tiles (load, store, fill, mma) and apply one operation to every element (`x[i]`, `num_elements`).
// Here every lane holds the whole tile (element i is (i / 16, i % 16)), which is one layout a kernel that
// keeps to those rules cannot tell apart from the GPU's. A kernel that assumed the GPU's layout would see
// different elements here and fail its test.
//
// The GPU's rules on pointers and leading dimensions are checked: 256-bit aligned pointers, `ldm` a
// multiple of 16 bytes. Stores are done by lane 0 alone, so a lane that reads what its warp stored without
// `__syncwarp()` first can see stale data, as on the GPU.
#pragma once
#include <cstdio>
#include <cstdlib>

#include "cuda_emu.h"

namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "the emulation has m16n16k16 tiles only");
    static constexpr int num_elements = 256;
    T x[256];
};

inline void check_tile(const void* p, unsigned ldm, size_t elem) {
    if ((uintptr_t)p % 32 != 0 || (ldm * elem) % 16 != 0) {
        std::fprintf(stderr, "wmma: pointer %p not 256-bit aligned or ldm %u not a multiple of 16 bytes\n", p, ldm);
        std::abort();
    }
}

inline float as_f32(float v) { return v; }
inline float as_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float as_f32(__half v) { return __half2float(v); }

// (r, c) of a row-major tile at `p` with leading dimension `ldm`, or of a column-major one
template <typename L> inline size_t at(unsigned r, unsigned c, unsigned ldm) {
    if constexpr (std::is_same_v<L, row_major>) return (size_t)r * ldm + c;
    else return (size_t)c * ldm + r;
}

template <typename Use, typename T, typename L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
    check_tile(p, ldm, sizeof(T));
    for (unsigned r = 0; r < 16; ++r)
        for (unsigned c = 0; c < 16; ++c) f.x[r * 16 + c] = p[at<L>(r, c, ldm)];
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t l) {
    check_tile(p, ldm, sizeof(float));
    for (unsigned r = 0; r < 16; ++r)
        for (unsigned c = 0; c < 16; ++c)
            f.x[r * 16 + c] = p[l == mem_row_major ? (size_t)r * ldm + c : (size_t)c * ldm + r];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
    check_tile(p, ldm, sizeof(float));
    if (cuda_emu::linear_tid % 32 == 0)
        for (unsigned r = 0; r < 16; ++r)
            for (unsigned c = 0; c < 16; ++c)
                p[l == mem_row_major ? (size_t)r * ldm + c : (size_t)c * ldm + r] = f.x[r * 16 + c];
}

template <typename T> inline void fill_fragment(T& f, float v) {
    for (auto& e : f.x) e = v;
}

// d = a·b + c: exact products, f32 sums (the GPU's summation order is unspecified too)
template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
    float out[256];
    for (unsigned r = 0; r < 16; ++r)
        for (unsigned n = 0; n < 16; ++n) {
            float s = c.x[r * 16 + n];
            for (unsigned k = 0; k < 16; ++k) s += as_f32(a.x[r * 16 + k]) * as_f32(b.x[k * 16 + n]);
            out[r * 16 + n] = s;
        }
    for (unsigned i = 0; i < 256; ++i) d.x[i] = out[i];
}
}  // namespace wmma
}  // namespace nvcuda
