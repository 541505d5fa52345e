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

// kernels/flash_attention.cu (16-bit types only)
extern "C" void attn_tile_map(const float*, uint8_t*, uint8_t*, uint32_t, uint32_t);
#define FLASH_DIMS_DECL uint32_t, uint32_t, uint32_t, uint32_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, \
                        uint64_t, uint64_t, uint64_t, uint64_t, float
#define DECLARE_FLASH(T, S, D)                                                                               \
    extern "C" void flash_fwd_d##D##_##S(const T*, const T*, const T*, const float*, const uint8_t*,         \
                                         const uint8_t*, T*, float*, FLASH_DIMS_DECL);                       \
    extern "C" void flash_dq_d##D##_##S(const T*, const T*, const T*, const float*, const uint8_t*,          \
                                        const uint8_t*, const T*, const float*, const float*, T*,            \
                                        FLASH_DIMS_DECL);                                                    \
    extern "C" void flash_dkv_d##D##_##S(const T*, const T*, const T*, const float*, const uint8_t*,         \
                                         const uint8_t*, const T*, const float*, const float*, T*, T*,       \
                                         FLASH_DIMS_DECL);
DECLARE_FLASH(__nv_bfloat16, bf16, 64)
DECLARE_FLASH(__nv_bfloat16, bf16, 128)
DECLARE_FLASH(__half, f16, 64)
DECLARE_FLASH(__half, f16, 128)
// kernels/adamw.cu (f32 only)
extern "C" void adamw_moments(float*, const float*, uint64_t, float, float, float, float, float);
extern "C" void adamw_update(float*, const float*, uint64_t, float, float, float, float);

extern "C" void attn_delta_bf16(const __nv_bfloat16*, const __nv_bfloat16*, float*, uint32_t, uint32_t);
extern "C" void attn_delta_f16(const __half*, const __half*, float*, uint32_t, uint32_t);

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

// Four AdamW steps on n elements: bit for bit the f32 sequence src/ops/adamw.rs runs on the CPU (each
// operation rounded on its own), and within rounding of the same update in double precision.
static void adamw(size_t n, unsigned max_grid, float wd) {
    auto p = randn<float>(n), mv = std::vector<float>(2 * n, 0.f);
    std::vector<float> cp = p, cm(n, 0.f), cv(n, 0.f);      // the CPU's f32 sequence
    std::vector<double> dp(p.begin(), p.end()), dm(n), dv(n);  // double precision
    dim3 grid = elementwise_grid(n);
    grid.x = std::min(grid.x, max_grid);
    const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
    for (int t = 1; t <= 4; ++t) {
        const double lr = 1e-3 * t, bias1 = 1 - std::pow(b1, t), bias2_sqrt = std::sqrt(1 - std::pow(b2, t));
        const float fb1 = (float)b1, fc1 = (float)(1 - b1), fb2 = (float)b2, fc2 = (float)(1 - b2);
        const float inv_b2 = (float)(1 / bias2_sqrt), feps = (float)eps, step = (float)(lr / bias1),
                    decay = (float)(1 - lr * wd);
        auto g = randn<float>(n);
        const float scale = t == 3 ? 0.37f : 1.f;  // a clipped step
        cuda_emu::launch(adamw_moments, grid, THREADS_256, mv.data(), g.data(), (uint64_t)n, scale, fb1, fc1, fb2, fc2);
        for (auto& gi : g) gi *= scale;
        cuda_emu::launch(adamw_update, grid, THREADS_256, p.data(), mv.data(), (uint64_t)n, inv_b2, feps, step, decay);
        for (size_t i = 0; i < n; ++i) {
            cm[i] = cm[i] * fb1 + g[i] * fc1;
            cv[i] = cv[i] * fb2 + (g[i] * g[i]) * fc2;
            cp[i] = cp[i] * decay - (cm[i] / (std::sqrt(cv[i]) * inv_b2 + feps)) * step;
            dm[i] = dm[i] * b1 + g[i] * (1 - b1);
            dv[i] = dv[i] * b2 + (double)g[i] * g[i] * (1 - b2);
            dp[i] = dp[i] * (1 - lr * wd) - lr / bias1 * dm[i] / (std::sqrt(dv[i]) / bias2_sqrt + eps);
        }
    }
    const std::string tag = " n=" + std::to_string(n) + " grid=" + std::to_string(grid.x) + " wd=" + std::to_string(wd);
    std::vector<double> want_m(cm.begin(), cm.end()), want_v(cv.begin(), cv.end()), want_p(cp.begin(), cp.end());
    want_m.insert(want_m.end(), want_v.begin(), want_v.end());
    check("adamw_moments" + tag, mv, want_m, 0, 0);
    check("adamw_update" + tag, p, want_p, 0, 0);
    dm.insert(dm.end(), dv.begin(), dv.end());
    // m sums gradients of either sign, so it can cancel far below its terms (|g| ≤ 1): an absolute bound
    check("adamw_moments (double)" + tag, mv, dm, 1e-5, 1e-6);
    check("adamw_update (double)" + tag, p, dp, 1e-5, 1e-7);
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

template <typename T, int D> struct Flash;
#define FLASH(T, S, D)                                                                                       \
    template <> struct Flash<T, D> {                                                                         \
        static constexpr const char* name = #S;                                                              \
        static constexpr auto fwd = flash_fwd_d##D##_##S;                                                    \
        static constexpr auto dq = flash_dq_d##D##_##S;                                                      \
        static constexpr auto dkv = flash_dkv_d##D##_##S;                                                    \
        static constexpr auto delta = attn_delta_##S;                                                        \
    };
FLASH(__nv_bfloat16, bf16, 64)
FLASH(__nv_bfloat16, bf16, 128)
FLASH(__half, f16, 64)
FLASH(__half, f16, 128)

// ‖got − want‖ / ‖want‖
template <typename T> static double normwise(const std::vector<T>& got, const std::vector<double>& want) {
    double e = 0, w = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        const double d = f32_of(got[i]) - want[i];
        e += d * d;
        w += want[i] * want[i];
    }
    return std::sqrt(e / std::max(w, 1e-300));
}

static double rms(const std::vector<double>& v) {
    double s = 0;
    for (double x : v) s += x * x;
    return std::sqrt(s / std::max<size_t>(v.size(), 1));
}

enum class Mask { None, Causal };

// Attention forward and backward through the flash kernels against a double-precision loop, with the
// Rust wrapper's launch shapes. q is stored [b, t, heads, D] and read as [b, heads, t, D] (as the model
// does), k as [b, tk, kv_heads, D], v as [b, kv_heads, tk, D]. With `Mask::Causal` the bias is causal
// over the last t of tk keys, the last `pad` keys of batch row 1 are padding, query row 0 of batch row 1
// sees nothing (a blind row: uniform over every key), and visible keys get small random biases.
// With `misaligned_k`, k starts one element into its buffer (as a narrowed view may), so its tiles are
// staged with 2-byte loads and the others with 16-byte ones.
template <typename T, int D>
static void flash_attention(uint32_t b, uint32_t nh, uint32_t nkv, uint32_t t, uint32_t tk, Mask mask,
                            bool misaligned_k = false) {
    using F = Flash<T, D>;
    const uint32_t rep = nh / nkv, pad = 5;
    const float scale = 1.f / std::sqrt((float)D);
    auto q = randn<T>((size_t)b * t * nh * D), k_buf = randn<T>((size_t)b * tk * nkv * D + 1),
         v = randn<T>((size_t)b * nkv * tk * D), dout = randn<T>((size_t)b * t * nh * D);
    const std::vector<T> k(k_buf.begin() + misaligned_k, k_buf.end() - !misaligned_k);
    const T* k_ptr = k_buf.data() + misaligned_k;
    const uint64_t qb = (uint64_t)t * nh * D, qh = D, qt = (uint64_t)nh * D;
    const uint64_t kb = (uint64_t)tk * nkv * D, kh = D, kt = (uint64_t)nkv * D;
    const uint64_t vb = (uint64_t)nkv * tk * D, vh = (uint64_t)tk * D, vt = D;
    std::vector<float> bias;
    if (mask == Mask::Causal) {
        bias.assign((size_t)b * t * tk, 0.f);
        std::normal_distribution<float> small(0.f, 0.5f);
        for (uint32_t n = 0; n < b; ++n)
            for (uint32_t i = 0; i < t; ++i)
                for (uint32_t j = 0; j < tk; ++j) {
                    const bool visible = j <= i + (tk - t) && !(n == 1 && (j + pad >= tk || i == 0));
                    bias[((size_t)n * t + i) * tk + j] = visible ? small(rng) : -3.40282347e38f;
                }
    }
    const float* bp = bias.empty() ? nullptr : bias.data();
    const uint32_t gq = (t + 15) / 16, gk = (tk + 15) / 16;
    std::vector<uint8_t> map((size_t)b * gq * gk, 0xAA), blind((size_t)b * gq, 0xAA);
    if (bp) cuda_emu::launch(attn_tile_map, dim3{gq, b, 1}, dim3{32, 1, 1}, bp, map.data(), blind.data(), t, tk);
    const uint8_t* mp = bp ? map.data() : nullptr;
    const uint8_t* blp = bp ? blind.data() : nullptr;
    auto out = poisoned<T>(q.size()), dq = poisoned<T>(q.size()), dk = poisoned<T>(k.size()),
         dv = poisoned<T>(k.size());
    auto stats = poisoned<float>((size_t)b * t * nh * 2), delta = poisoned<float>((size_t)b * t * nh);
    const dim3 block{128, 1, 1};
    cuda_emu::launch(F::fwd, dim3{(t + 63) / 64, nh, b}, block, q.data(), k_ptr, v.data(), bp, mp, blp,
                     out.data(), stats.data(), nh, nkv, t, tk, qb, qh, qt, kb, kh, kt, vb, vh, vt, scale);
    const uint32_t rows = b * t * nh;
    cuda_emu::launch(F::delta, warp_per_row(rows), WARP_ROWS_BLOCK, out.data(), dout.data(), delta.data(), rows,
                     (uint32_t)D);
    cuda_emu::launch(F::dq, dim3{(t + 63) / 64, nh, b}, block, q.data(), k_ptr, v.data(), bp, mp, blp,
                     dout.data(), stats.data(), delta.data(), dq.data(), nh, nkv, t, tk, qb, qh, qt, kb, kh, kt, vb,
                     vh, vt, scale);
    // dk, dv are [b, tk, kv_heads, D]
    cuda_emu::launch(F::dkv, dim3{(tk + 63) / 64, nkv, b}, block, q.data(), k_ptr, v.data(), bp, mp, blp,
                     dout.data(), stats.data(), delta.data(), dk.data(), dv.data(), nh, nkv, t, tk, qb, qh, qt, kb,
                     kh, kt, vb, vh, vt, scale);

    std::vector<double> w_out(out.size()), w_stats(stats.size()), w_dq(q.size()), w_dk(k.size()), w_dv(k.size());
    // Σ |terms| of each result: what rounding the terms' factors to T can move it by, in ulps
    std::vector<double> a_out(out.size()), a_dq(q.size()), a_dk(k.size()), a_dv(k.size());
    std::vector<double> w_map(map.size()), w_blind(blind.size()), got_map(map.size()), got_blind(blind.size());
    for (uint32_t n = 0; n < b; ++n)
        for (uint32_t h = 0; h < nh; ++h) {
            const uint32_t g = h / rep;
            auto Q = [&](uint32_t i, uint32_t d) { return at(q, n * qb + h * qh + i * qt + d); };
            auto K = [&](uint32_t j, uint32_t d) { return at(k, n * kb + g * kh + j * kt + d); };
            auto V = [&](uint32_t j, uint32_t d) { return at(v, n * vb + g * vh + j * vt + d); };
            auto dO = [&](uint32_t i, uint32_t d) { return at(dout, ((size_t)(n * t + i) * nh + h) * D + d); };
            for (uint32_t i = 0; i < t; ++i) {
                std::vector<double> x(tk), p(tk), dp(tk);
                double m = -INFINITY, l = 0;
                for (uint32_t j = 0; j < tk; ++j) {
                    double s = 0;
                    for (uint32_t d = 0; d < D; ++d) s += Q(i, d) * K(j, d);
                    // the score plus bias in f32, so a masking bias absorbs it as in the kernels and candle
                    x[j] = (float)(s * scale) + (bp ? bias[((size_t)n * t + i) * tk + j] : 0.f);
                    m = std::max(m, x[j]);
                }
                for (uint32_t j = 0; j < tk; ++j) l += p[j] = std::exp(x[j] - m);
                const size_t row = (size_t)(n * t + i) * nh + h;
                w_stats[2 * row] = m;
                w_stats[2 * row + 1] = l;
                double dl = 0;
                for (uint32_t d = 0; d < D; ++d) {
                    double o = 0;
                    for (uint32_t j = 0; j < tk; ++j) {
                        o += p[j] / l * V(j, d);
                        a_out[row * D + d] += std::fabs(p[j] / l * V(j, d));
                    }
                    w_out[row * D + d] = o;
                    // delta from the stored output, as the kernels (and FlashAttention) compute it
                    dl += at(out, row * D + d) * dO(i, d);
                }
                for (uint32_t j = 0; j < tk; ++j) {
                    double s = 0;
                    for (uint32_t d = 0; d < D; ++d) s += dO(i, d) * V(j, d);
                    const double pj = p[j] / l, ds = pj * (s - dl);
                    for (uint32_t d = 0; d < D; ++d) {
                        w_dq[row * D + d] += scale * ds * K(j, d);
                        a_dq[row * D + d] += std::fabs(scale * ds * K(j, d));
                        const size_t kv = ((size_t)(n * tk + j) * nkv + g) * D + d;
                        w_dk[kv] += scale * ds * Q(i, d);
                        a_dk[kv] += std::fabs(scale * ds * Q(i, d));
                        w_dv[kv] += pj * dO(i, d);
                        a_dv[kv] += std::fabs(pj * dO(i, d));
                    }
                }
            }
        }
    if (bp) {
        for (uint32_t n = 0; n < b; ++n)
            for (uint32_t a = 0; a < gq; ++a) {
                bool blind_row = false;
                for (uint32_t i = a * 16; i < std::min(t, a * 16 + 16); ++i) {
                    bool sees = false;
                    for (uint32_t j = 0; j < tk; ++j) sees |= bias[((size_t)n * t + i) * tk + j] > -3.40282347e38f;
                    blind_row |= !sees;
                }
                w_blind[n * gq + a] = blind_row;
                got_blind[n * gq + a] = blind[n * gq + a];
                for (uint32_t c = 0; c < gk; ++c) {
                    bool any = false;
                    for (uint32_t i = a * 16; i < std::min(t, a * 16 + 16); ++i)
                        for (uint32_t j = c * 16; j < std::min(tk, c * 16 + 16); ++j)
                            any |= bias[((size_t)n * t + i) * tk + j] > -3.40282347e38f;
                    w_map[((size_t)n * gq + a) * gk + c] = any;
                    got_map[((size_t)n * gq + a) * gk + c] = map[((size_t)n * gq + a) * gk + c];
                }
            }
        check("attn_tile_map t=" + std::to_string(t) + " tk=" + std::to_string(tk), got_map, w_map, 0, 0);
        check("attn_tile_map blind rows", got_blind, w_blind, 0, 0);
    }
    // Inputs are exact in T; the kernels round P and dS to T before their products (as candle's composed
    // version does) and the results to T. So each result may be off by an ulp of itself plus an ulp of the
    // sum of its terms' magnitudes (a sum that cancels loses what its terms' rounding cost them), and
    // normwise by 0.75 ulp (measured: about 0.3 ulp). A wrong key, row, head or scale costs whole terms.
    const double ulp = Kernels<T>::ulp;
    const std::string tag = std::string("_") + F::name + " b=" + std::to_string(b) + " heads=" + std::to_string(nh) +
                            "/" + std::to_string(nkv) + " t=" + std::to_string(t) + " tk=" + std::to_string(tk) +
                            " bias=" + (bp ? "causal" : "none");
    auto check_grad = [&](const std::string& kernel, const std::string& part, const std::vector<T>& got,
                          const std::vector<double>& want, const std::vector<double>& terms) {
        const std::string what = kernel + tag + part;
        // plus a floor far below any fault, for sums that are exactly zero (a row that sees one key has
        // dS = 0) but come out of f32 arithmetic as 1e-8, and for f16's subnormals
        const double floor = 1e-4 * rms(want);
        size_t bad = 0, first = 0;
        for (size_t i = 0; i < want.size(); ++i) {
            const double g = f32_of(got[i]);
            if (!(std::fabs(g - want[i]) <= ulp * (std::fabs(want[i]) + terms[i]) + floor) && bad++ == 0) first = i;
        }
        const double e = normwise(got, want);
        if (bad || e > 0.75 * ulp) {
            ++failures;
            std::printf("FAIL %s: %zu of %zu elements off (first at %zu: got %g, want %g, terms %g), normwise %.2e\n",
                        what.c_str(), bad, want.size(), first, (double)f32_of(got[first]), want[first],
                        terms[first], e);
        } else {
            std::printf("ok %s (%zu elements, normwise error %.2e)\n", what.c_str(), want.size(), e);
        }
    };
    const std::string d = std::to_string(D);
    check_grad("flash_fwd_d" + d, "", out, w_out, a_out);
    check("flash_fwd_d" + d + tag + " stats", stats, w_stats, 1e-5, 1e-5);
    check_grad("flash_dq_d" + d, "", dq, w_dq, a_dq);
    check_grad("flash_dkv_d" + d, " dk", dk, w_dk, a_dk);
    check_grad("flash_dkv_d" + d, " dv", dv, w_dv, a_dv);
    // the delta kernel is checked through the gradients; a line for the coverage list
    if (D == 64 && t == 75) std::printf("ok attn_delta_%s (through flash_dq and flash_dkv)\n", F::name);
}

template <typename T> static void flash_all() {
    flash_attention<T, 64>(2, 4, 2, 75, 75, Mask::Causal);   // two query tiles, GQA, skipped tiles, a blind row
    flash_attention<T, 64>(2, 2, 2, 33, 75, Mask::Causal, true);  // 42 cached keys; k misaligned
    flash_attention<T, 64>(1, 2, 1, 20, 20, Mask::None);
    flash_attention<T, 64>(1, 4, 1, 130, 130, Mask::Causal);  // three query tiles, 4 query heads per KV head
    flash_attention<T, 128>(2, 2, 1, 70, 70, Mask::Causal);
    flash_attention<T, 128>(1, 1, 1, 17, 45, Mask::None, true);
}

int main() {
    adamw(1000, 1u << 20, 0.f);
    adamw(70001, 3, 0.1f);  // three blocks: every thread loops
    all<float>();
    all<__nv_bfloat16>();
    all<__half>();
    flash_all<__nv_bfloat16>();
    flash_all<__half>();
    std::printf("%d failed\n", failures);
    return failures ? 1 : 0;
}
