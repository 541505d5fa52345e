// Runs every kernel in kernels/*.cu under the CPU emulation (cuda_emu.h) with the launch shapes the Rust
// wrappers use (plus smaller grids, to exercise the grid-stride loops), on awkward sizes, with outputs
// poisoned with NaN first, and checks each against a plain double-precision loop written from the formula.
// Prints "ok NAME" per kernel and dtype, or "FAIL NAME ..." lines; exits 1 on any failure.
// Built and run by tests/cuda_kernels.rs.
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cuda_emu.h"

#define DECLARE(T, S)                                                                                        \
    extern "C" void rms_norm_fwd_##S(const T*, const T*, T*, uint32_t, uint32_t, float);                     \
    extern "C" void rms_norm_bwd_##S(const T*, const T*, const T*, T*, uint32_t, uint32_t, float);           \
    extern "C" void rope_##S(const T*, const float*, const float*, const uint32_t*, T*, uint64_t, uint32_t,   \
                             uint32_t, uint32_t, float);                                                     \
    extern "C" void swiglu_fwd_##S(const T*, const T*, T*, uint64_t);                                        \
    extern "C" void swiglu_bwd_##S(const T*, const T*, const T*, T*, uint64_t);                              \
    extern "C" void row_xent_##S(const T*, const uint32_t*, float*, uint32_t, uint32_t);                     \
    extern "C" void softmax_grad_##S(T*, const float*, const uint32_t*, uint32_t, uint32_t);
DECLARE(float, f32)
DECLARE(__nv_bfloat16, bf16)
DECLARE(__half, f16)

template <typename T> struct Kernels;
#define KERNELS(T, S, ULP)                                                                                   \
    template <> struct Kernels<T> {                                                                          \
        static constexpr const char* name = #S;                                                              \
        static constexpr double ulp = ULP; /* relative spacing of the storage type */                       \
        static constexpr auto rms_fwd = rms_norm_fwd_##S;                                                    \
        static constexpr auto rms_bwd = rms_norm_bwd_##S;                                                    \
        static constexpr auto rope = rope_##S;                                                               \
        static constexpr auto swiglu_fwd = swiglu_fwd_##S;                                                   \
        static constexpr auto swiglu_bwd = swiglu_bwd_##S;                                                   \
        static constexpr auto row_xent = row_xent_##S;                                                       \
        static constexpr auto softmax_grad = softmax_grad_##S;                                               \
    };
KERNELS(float, f32, 1.2e-7)
KERNELS(__nv_bfloat16, bf16, 7.8e-3)
KERNELS(__half, f16, 9.8e-4)

static float f32_of(float v) { return v; }
static float f32_of(__nv_bfloat16 v) { return __bfloat162float(v); }
static float f32_of(__half v) { return __half2float(v); }
template <typename T> static T of_f32(float v);
template <> float of_f32<float>(float v) { return v; }
template <> __nv_bfloat16 of_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __half of_f32<__half>(float v) { return __float2half(v); }
// what storing in T and loading back gives
template <typename T> static double rt(double v) { return f32_of(of_f32<T>((float)v)); }

static std::mt19937 rng(20261128);
template <typename T> static std::vector<T> randn(size_t n, float scale = 1.f) {
    std::normal_distribution<float> d(0.f, scale);
    std::vector<T> v(n);
    for (auto& x : v) x = of_f32<T>(d(rng));
    return v;
}
template <typename T> static std::vector<T> poisoned(size_t n) { return std::vector<T>(n, of_f32<T>(NAN)); }
template <typename T> static double at(const std::vector<T>& v, size_t i) { return f32_of(v[i]); }

static int failures = 0;

// got vs want elementwise: |got − want| ≤ rel·|want| + abs, NaN exactly where want is NaN.
template <typename T>
static void check(const std::string& what, const std::vector<T>& got, const std::vector<double>& want, double rel,
                  double abs) {
    size_t bad = 0, first = 0;
    double worst = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        const double g = f32_of(got[i]), w = want[i];
        const bool ok = std::isnan(w) ? std::isnan(g) : (!std::isnan(g) && std::fabs(g - w) <= rel * std::fabs(w) + abs);
        if (!std::isnan(w) && !std::isnan(g)) worst = std::max(worst, std::fabs(g - w) / (std::fabs(w) + abs / rel));
        if (!ok && bad++ == 0) first = i;
    }
    if (bad) {
        ++failures;
        std::printf("FAIL %s: %zu of %zu elements off; first at %zu: got %g, want %g\n", what.c_str(), bad, want.size(),
                    first, (double)f32_of(got[first]), want[first]);
    } else {
        std::printf("ok %s (%zu elements, worst relative error %.2e)\n", what.c_str(), want.size(), worst);
    }
}

// the Rust wrappers' launch shapes (src/ops/mod.rs, `cuda` module)
static dim3 warp_per_row(size_t rows) { return {(unsigned)std::max<size_t>((rows + 7) / 8, 1), 1, 1}; }
static const dim3 WARP_ROWS_BLOCK = {32, 8, 1};
static dim3 elementwise_grid(size_t n) { return {(unsigned)std::clamp<size_t>((n + 255) / 256, 1, 132 * 32), 1, 1}; }
static const dim3 THREADS_256 = {256, 1, 1};

template <typename T> static void rms_norm(uint32_t rows, uint32_t d) {
    using K = Kernels<T>;
    const float eps = 1e-5f;
    auto x = randn<T>((size_t)rows * d, 2.f), w = randn<T>(d), dy = randn<T>((size_t)rows * d);
    auto y = poisoned<T>(x.size()), dx = poisoned<T>(x.size());
    cuda_emu::launch(K::rms_fwd, warp_per_row(rows), WARP_ROWS_BLOCK, x.data(), w.data(), y.data(), rows, d, eps);
    cuda_emu::launch(K::rms_bwd, warp_per_row(rows), WARP_ROWS_BLOCK, x.data(), w.data(), dy.data(), dx.data(), rows,
                     d, eps);
    std::vector<double> wy(x.size()), wdx(x.size());
    for (uint32_t r = 0; r < rows; ++r) {
        double ss = 0, g = 0;
        for (uint32_t i = 0; i < d; ++i) {
            const size_t k = (size_t)r * d + i;
            ss += at(x, k) * at(x, k);
            g += at(w, i) * at(dy, k) * at(x, k);
        }
        const double inv = 1 / std::sqrt(ss / d + eps);
        for (uint32_t i = 0; i < d; ++i) {
            const size_t k = (size_t)r * d + i;
            wy[k] = rt<T>(rt<T>(at(x, k) * inv) * at(w, i));
            wdx[k] = inv * at(w, i) * at(dy, k) - at(x, k) * inv * inv * inv / d * g;
        }
    }
    const std::string tag = std::string("_") + K::name + " rows=" + std::to_string(rows) + " d=" + std::to_string(d);
    check("rms_norm_fwd" + tag, y, wy, 2 * K::ulp + 2e-6, 1e-6);
    check("rms_norm_bwd" + tag, dx, wdx, 2 * K::ulp + 1e-5, 1e-5);
}

template <typename T> static void rope(uint32_t tokens, uint32_t heads, uint32_t half, float sign, unsigned max_grid) {
    using K = Kernels<T>;
    const uint32_t table_len = 17;
    std::vector<float> cos_t((size_t)table_len * half), sin_t(cos_t.size());
    for (uint32_t p = 0; p < table_len; ++p)
        for (uint32_t i = 0; i < half; ++i) {
            const double theta = p * std::pow(10000.0, -2.0 * i / (2.0 * half));
            cos_t[p * half + i] = (float)std::cos(theta);
            sin_t[p * half + i] = (float)std::sin(theta);
        }
    std::vector<uint32_t> pos(tokens);
    for (uint32_t t = 0; t < tokens; ++t) pos[t] = (t * 5 + 3) % table_len;
    pos[tokens - 1] = table_len;  // outside the table: NaN
    const size_t n_pairs = (size_t)tokens * heads * half;
    auto x = randn<T>(2 * n_pairs), y = poisoned<T>(2 * n_pairs);
    dim3 grid = elementwise_grid(n_pairs);
    grid.x = std::min(grid.x, max_grid);
    cuda_emu::launch(K::rope, grid, THREADS_256, x.data(), cos_t.data(), sin_t.data(), pos.data(), y.data(),
                     (uint64_t)n_pairs, heads, half, table_len, sign);
    std::vector<double> want(2 * n_pairs);
    for (uint32_t t = 0; t < tokens; ++t)
        for (uint32_t h = 0; h < heads; ++h)
            for (uint32_t i = 0; i < half; ++i) {
                const size_t base = ((size_t)t * heads + h) * 2 * half;
                const bool in = pos[t] < table_len;
                const double c = in ? cos_t[pos[t] * half + i] : NAN, s = in ? sign * sin_t[pos[t] * half + i] : NAN;
                const double a = at(x, base + i), b = at(x, base + i + half);
                want[base + i] = a * c - b * s;
                want[base + i + half] = b * c + a * s;
            }
    check(std::string("rope_") + K::name + " tokens=" + std::to_string(tokens) + " half=" + std::to_string(half) +
              " sign=" + std::to_string((int)sign) + " grid=" + std::to_string(grid.x),
          y, want, K::ulp + 2e-6, 2e-6);
}

template <typename T> static void swiglu(size_t n, unsigned max_grid) {
    using K = Kernels<T>;
    auto g = randn<T>(n, 3.f), u = randn<T>(n), dy = randn<T>(n);
    auto y = poisoned<T>(n), out = poisoned<T>(2 * n);
    dim3 grid = elementwise_grid(n);
    grid.x = std::min(grid.x, max_grid);
    cuda_emu::launch(K::swiglu_fwd, grid, THREADS_256, g.data(), u.data(), y.data(), (uint64_t)n);
    cuda_emu::launch(K::swiglu_bwd, grid, THREADS_256, g.data(), u.data(), dy.data(), out.data(), (uint64_t)n);
    std::vector<double> wy(n), wout(2 * n);
    for (size_t i = 0; i < n; ++i) {
        const double gi = at(g, i), s = 1 / (1 + std::exp(-gi));
        wy[i] = rt<T>(gi * s) * at(u, i);
        wout[i] = at(dy, i) * at(u, i) * s * (1 + gi * (1 - s));
        wout[n + i] = at(dy, i) * gi * s;
    }
    const std::string tag = std::string("_") + K::name + " n=" + std::to_string(n) + " grid=" + std::to_string(grid.x);
    check("swiglu_fwd" + tag, y, wy, 2 * K::ulp + 2e-6, 1e-6);
    check("swiglu_bwd" + tag, out, wout, K::ulp + 2e-6, 1e-6);
}

template <typename T> static void cross_entropy(uint32_t rows, uint32_t vocab, float scale, unsigned grid_rows) {
    using K = Kernels<T>;
    auto logits = randn<T>((size_t)rows * vocab, scale);
    std::vector<uint32_t> labels(rows);
    for (uint32_t r = 0; r < rows; ++r) labels[r] = (r * 7919u) % vocab;
    labels[rows / 2] = vocab;  // out of range: NaN loss
    auto out = poisoned<float>(2 * (size_t)rows);
    cuda_emu::launch(K::row_xent, dim3{std::min(rows, grid_rows), 1, 1}, THREADS_256, logits.data(), labels.data(),
                     out.data(), rows, vocab);
    std::vector<double> want(2 * rows), grad((size_t)rows * vocab);
    for (uint32_t r = 0; r < rows; ++r) {
        double m = -INFINITY, s = 0;
        for (uint32_t j = 0; j < vocab; ++j) m = std::max(m, at(logits, (size_t)r * vocab + j));
        for (uint32_t j = 0; j < vocab; ++j) s += std::exp(at(logits, (size_t)r * vocab + j) - m);
        const double lse = m + std::log(s);
        want[r] = lse;
        want[rows + r] = labels[r] < vocab ? lse - at(logits, (size_t)r * vocab + labels[r]) : NAN;
        for (uint32_t j = 0; j < vocab; ++j)
            grad[(size_t)r * vocab + j] = std::exp(at(logits, (size_t)r * vocab + j) - lse) - (j == labels[r]);
    }
    const std::string tag = std::string("_") + K::name + " rows=" + std::to_string(rows) +
                            " vocab=" + std::to_string(vocab) + " scale=" + std::to_string((int)scale);
    check("row_xent" + tag + " grid=" + std::to_string(std::min(rows, grid_rows)), out, want, 2e-6, 2e-6);
    // the gradient from the kernel's own lse (checked above), as the Rust wrapper runs it
    std::vector<float> lse(out.begin(), out.begin() + rows);
    const size_t n = (size_t)rows * vocab;
    dim3 grid = elementwise_grid(n);
    grid.x = std::min(grid.x, 3u);
    cuda_emu::launch(K::softmax_grad, grid, THREADS_256, logits.data(), lse.data(), labels.data(), rows, vocab);
    check("softmax_grad" + tag, logits, grad, K::ulp + 1e-5, 1e-6);
}

template <typename T> static void all() {
    for (auto [rows, d] : {std::pair{37u, 64u}, {5u, 77u}, {9u, 576u}, {3u, 1u}}) rms_norm<T>(rows, d);
    rope<T>(13, 3, 32, 1.f, 1u << 20);
    rope<T>(7, 2, 5, -1.f, 1);  // one block: every thread loops
    swiglu<T>(1000, 1u << 20);
    swiglu<T>(70001, 3);
    cross_entropy<T>(5, 1, 1.f, 8);
    cross_entropy<T>(6, 31, 1.f, 8);
    cross_entropy<T>(9, 5000, 4.f, 2);     // fewer blocks than rows: blocks loop over rows
    cross_entropy<T>(3, 50001, 30.f, 8);   // large logits: the online max/sum must rescale
}

int main() {
    all<float>();
    all<__nv_bfloat16>();
    all<__half>();
    std::printf("%d failed\n", failures);
    return failures ? 1 : 0;
}
