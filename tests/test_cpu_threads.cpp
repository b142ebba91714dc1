// The CPU backend at realistic sizes, at every instruction-set level this CPU has: results
// bit-identical for 1, 2 and 4 threads, agreement with the oracle on long rows (where a float
// accumulation would drift), the streaming-store path, the vectorised 16-bit conversions against
// the scalar ones of core/element.hpp, and each level's exponentials and noise generator.

#include <algorithm>
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <utility>

#include <tpo/backend/cpu.hpp>
#include <tpo/backend/reference.hpp>
#include <tpo/corrupt/diffusion.hpp>

#include "support/batch.hpp"
#include "support/hidden.hpp"

using namespace tpo_test;
using tpo::backend::cpu_level;

namespace {

namespace kernels = tpo::backend::cpu_detail::kernels;

/// Every level this CPU (and build) supports, lowest first.
std::vector<cpu_level> supported_levels() {
    std::vector<cpu_level> levels;
    for (cpu_level l : {cpu_level::baseline, cpu_level::avx2, cpu_level::avx512})
        if (l <= tpo::backend::supported_cpu_level()) levels.push_back(l);
    return levels;
}

// One level's pieces, called by name (each level is its own namespace).
#define TPO_TEST_LEVEL(name)                                                                                     \
    struct name##_pieces {                                                                                       \
        static constexpr cpu_level level = cpu_level::name;                                                      \
        template <class T>                                                                                       \
        static void widen(const T* src, index_t n, float* dst) { kernels::name::widen_array(src, n, dst); }       \
        static void narrow(const float* src, index_t n, tpo::bfloat16* dst) { kernels::name::narrow_array(src, n, dst); } \
        static void exp(const float* x, index_t n, float* y, bool shift = false, float m = 0.0f) {               \
            kernels::name::exp_array(x, n, y, shift, m);                                                          \
        }                                                                                                        \
        static void blocks(const tpo::math::philox_stream& s, std::uint64_t first,                               \
                           std::uint32_t (&x)[4][tpo::backend::cpu_detail::philox_lanes]) {                      \
            kernels::name::philox_blocks(s, first, x);                                                            \
        }                                                                                                        \
        static void normals(const tpo::math::philox_stream& s, std::uint64_t first, index_t count, float* out) { \
            kernels::name::philox_normals(s, first, count, out);                                                  \
        }                                                                                                        \
    };
TPO_TEST_LEVEL(baseline)
#if TPO_CPU_DISPATCH
TPO_TEST_LEVEL(avx2)
TPO_TEST_LEVEL(avx512)
#endif

/// f(pieces) for each supported level's pieces.
template <class F>
void at_every_level(F&& f) {
    auto run = [&](auto pieces) {
        if (decltype(pieces)::level > tpo::backend::supported_cpu_level()) return;
        INFO("level " << tpo::backend::to_string(decltype(pieces)::level));
        f(pieces);
    };
    run(baseline_pieces{});
#if TPO_CPU_DISPATCH
    run(avx2_pieces{});
    run(avx512_pieces{});
#endif
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Field by field: row_stats has padding bytes that need not match.
bool same_bits(const std::vector<tpo::row_stats>& a, const std::vector<tpo::row_stats>& b) {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i) {
        const double x[] = {a[i].lse, a[i].label_logit, a[i].lse_doubled};
        const double y[] = {b[i].lse, b[i].label_logit, b[i].lse_doubled};
        if (std::memcmp(x, y, sizeof x) != 0 || a[i].label != b[i].label || a[i].status != b[i].status) return false;
    }
    return true;
}

bool same_bits(const tpo::objective_result& a, const tpo::objective_result& b) {
    const double x[] = {a.loss, a.reward_accuracy, a.reward_margin};
    const double y[] = {b.loss, b.reward_accuracy, b.reward_margin};
    return std::memcmp(x, y, sizeof x) == 0 && same_bits(a.losses, b.losses) &&
           same_bits(a.policy_chosen_scores, b.policy_chosen_scores) &&
           same_bits(a.policy_rejected_scores, b.policy_rejected_scores) &&
           same_bits(a.reference_chosen_scores, b.reference_chosen_scores) &&
           same_bits(a.mean_visual_score_chosen, b.mean_visual_score_chosen);
}

template <class T, class G = T>
void thread_count_does_not_change_a_bit(index_t vocab, const tpo::objective_options& options, cpu_level level) {
    INFO("level " << tpo::backend::to_string(level));
    std::mt19937_64 rng(4242);
    const auto data = convert<T>(random_batch<double>(rng, 2, 5, 4, vocab, 3.0, 0.25));
    std::vector<tpo::objective_result> results;
    std::vector<gradient_data<G>> grads;
    for (int threads : {1, 2, 4}) {
        tpo::backend::cpu backend(threads, level);
        REQUIRE(backend.threads() == threads);
        REQUIRE(backend.level() == level);
        gradient_data<G> g(data);
        const auto views = g.views();
        results.push_back(tpo::evaluate(backend, options, data.batch(), &views));
        grads.push_back(std::move(g));
    }
    for (std::size_t k = 1; k < results.size(); ++k) {
        INFO("threads " << (1 << k) << " vs 1");
        CHECK(same_bits(results[k], results[0]));
        for (int tensor = 0; tensor < 4; ++tensor) CHECK(same_bits(grads[k].tensor(tensor), grads[0].tensor(tensor)));
    }
    CHECK(std::isfinite(results[0].loss));
}

/// max |a − b| / max |b| over a gradient tensor.
template <class G>
double relative_difference(const std::vector<G>& a, const std::vector<G>& b) {
    double worst = 0, scale = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        worst = std::max(worst, std::abs(tpo::widen<double>(a[i]) - tpo::widen<double>(b[i])));
        scale = std::max(scale, std::abs(tpo::widen<double>(b[i])));
    }
    return worst / std::max(scale, 1e-300);
}

template <class T>
void agrees_with_the_oracle_on_long_rows(index_t pairs, index_t length, index_t vocab, double tolerance) {
    for (cpu_level level : supported_levels()) {
    INFO("level " << tpo::backend::to_string(level));
    std::mt19937_64 rng(7);
    const auto data = convert<T>(random_batch<double>(rng, pairs, length, length, vocab, 4.0, 0.2));
    tpo::objective_options options;
    options.use_weighting = true;  // exercises LSE(2z) as well
    tpo::backend::cpu fast(2, level);
    tpo::backend::reference oracle;
    gradient_data<T> g_fast(data), g_oracle(data);
    const auto v_fast = g_fast.views();
    const auto v_oracle = g_oracle.views();
    const auto a = tpo::evaluate(fast, options, data.batch(), &v_fast);
    const auto b = tpo::evaluate(oracle, options, data.batch(), &v_oracle);
    INFO(tpo::element_name<T>() << " V=" << vocab);
    CHECK(a.loss == Approx(b.loss).epsilon(tolerance).margin(tolerance));
    for (std::size_t i = 0; i < a.policy_chosen_scores.size(); ++i) {
        // Sequence scores are sums of ~L log-probabilities of magnitude log V: compare relatively.
        CHECK(a.policy_chosen_scores[i] == Approx(b.policy_chosen_scores[i]).epsilon(tolerance));
        CHECK(a.policy_rejected_scores[i] == Approx(b.policy_rejected_scores[i]).epsilon(tolerance));
    }
    for (int k = 0; k < 4; ++k) {
        INFO("gradient tensor " << k);
        CHECK(relative_difference(g_fast.tensor(k), g_oracle.tensor(k)) <= tolerance);
    }
    }
}

}  // namespace

TEST_CASE("cpu backend: 1, 2 and 4 threads give bit-identical results and gradients", "[cpu][threads]") {
    tpo::objective_options tpo_default;
    tpo::objective_options wpo;
    wpo.use_weighting = true;
    wpo.score = tpo::score_kind::prob;
    for (cpu_level level : supported_levels()) {
        thread_count_does_not_change_a_bit<float>(32000, tpo_default, level);
        thread_count_does_not_change_a_bit<tpo::bfloat16>(32000, wpo, level);
        thread_count_does_not_change_a_bit<double>(32000, wpo, level);
        thread_count_does_not_change_a_bit<tpo::float16, float>(32003, tpo_default, level);  // odd V
    }
}

TEST_CASE("cpu backend: the row primitives are bit-identical across thread counts on a large tensor",
          "[cpu][threads]") {
    // 2·132·32003 floats: past the streaming threshold, rows not 64-byte aligned.
    const index_t S = 2, L = 132, V = 32003;
    std::mt19937_64 rng(11);
    std::normal_distribution<float> normal(0.0f, 3.0f);
    std::vector<float> z(static_cast<std::size_t>(S * L * V));
    for (auto& x : z) x = normal(rng);
    std::vector<std::int64_t> labels(static_cast<std::size_t>(S * L));
    for (auto& y : labels) y = static_cast<std::int64_t>(rng() % V);
    labels[5] = -100;
    const tpo::logits_view<const float> zv{z.data(), S, L, V};
    const tpo::labels_view<const std::int64_t> yv{labels.data(), S, L};
    const tpo::row_alignment align{};
    const index_t scored = align.scored_rows(L);

    tpo::backend::reference oracle;
    std::vector<tpo::row_stats> expected(static_cast<std::size_t>(S * scored));
    oracle.row_statistics(zv, yv, align, tpo::row_reduction::logsumexp_and_doubled, expected.data());
    std::vector<tpo::row_coefficients> coefficients(expected.size());
    for (std::size_t r = 0; r < expected.size(); ++r) {
        const bool ok = expected[r].status == tpo::row_status::ok;
        coefficients[r] = {0.3 + 0.01 * static_cast<double>(r % 7), r % 5 == 0 ? 0.0 : 0.7, expected[r].lse,
                           ok ? expected[r].label : -1};
    }
    std::vector<float> g_expected(z.size());
    oracle.row_gradient(zv, coefficients.data(), scored, tpo::logits_view<float>{g_expected.data(), S, L, V});

    for (cpu_level level : supported_levels()) {
    INFO("level " << tpo::backend::to_string(level));
    std::vector<std::vector<float>> grads;
    std::vector<std::vector<tpo::row_stats>> stats;
    for (int threads : {1, 2, 4}) {
        tpo::backend::cpu backend(threads, level);
        std::vector<tpo::row_stats> s(expected.size());
        backend.row_statistics(zv, yv, align, tpo::row_reduction::logsumexp_and_doubled, s.data());
        std::vector<float> g(z.size(), 123.0f);
        backend.row_gradient(zv, coefficients.data(), scored, tpo::logits_view<float>{g.data(), S, L, V});
        stats.push_back(std::move(s));
        grads.push_back(std::move(g));
    }
    for (std::size_t k = 1; k < grads.size(); ++k) {
        CHECK(same_bits(stats[k], stats[0]));
        CHECK(same_bits(grads[k], grads[0]));
    }
    double worst = 0;
    for (std::size_t r = 0; r < expected.size(); ++r) {
        REQUIRE(stats[0][r].status == expected[r].status);
        if (expected[r].status != tpo::row_status::ok) continue;
        worst = std::max({worst, std::abs(stats[0][r].lse - expected[r].lse),
                          std::abs(stats[0][r].lse_doubled - expected[r].lse_doubled)});
        CHECK(stats[0][r].label_logit == expected[r].label_logit);
    }
    INFO("worst log-sum-exp difference " << worst);
    CHECK(worst <= 1e-5);  // |lse| ≈ 20 here: a few float epsilons relative
    CHECK(relative_difference(grads[0], g_expected) <= 1e-6);
    // The row of the masked label and the unscored last position of each sequence are all zero.
    for (index_t v = 0; v < V; ++v) {
        REQUIRE(grads[0][static_cast<std::size_t>(4 * V + v)] == 0.0f);
        REQUIRE(grads[0][static_cast<std::size_t>((L - 1) * V + v)] == 0.0f);
    }
    }
}

TEST_CASE("cpu backend agrees with the oracle on long rows", "[cpu][agreement]") {
    SECTION("float32, V = 152064") { agrees_with_the_oracle_on_long_rows<float>(1, 4, 152064, 2e-5); }
    SECTION("bfloat16, V = 32000") { agrees_with_the_oracle_on_long_rows<tpo::bfloat16>(2, 4, 32000, 2e-5); }
    SECTION("float64, V = 32000") { agrees_with_the_oracle_on_long_rows<double>(2, 4, 32000, 1e-12); }
}

TEST_CASE("cpu backend: vectorised 16-bit conversions equal the scalar ones", "[cpu][element]") {
    std::vector<tpo::bfloat16> b(65536);
    std::vector<tpo::float16> h(65536);
    for (std::uint32_t i = 0; i < 65536; ++i) {
        b[i] = tpo::bfloat16::from_bits(static_cast<std::uint16_t>(i));
        h[i] = tpo::float16::from_bits(static_cast<std::uint16_t>(i));
    }
    at_every_level([&](auto level) {
        std::vector<float> wb(65536), wh(65536);
        // In full blocks and in a short one, which take different loops.
        level.widen(b.data(), 65536, wb.data());
        level.widen(h.data(), 1024, wh.data());
        level.widen(h.data() + 1024, 65536 - 1024, wh.data() + 1024);
        std::size_t bad_b = 0, bad_h = 0;
        for (std::size_t i = 0; i < 65536; ++i) {
            const float sb = static_cast<float>(b[i]), sh = static_cast<float>(h[i]);
            bad_b += std::memcmp(&wb[i], &sb, sizeof sb) != 0;
            bad_h += std::memcmp(&wh[i], &sh, sizeof sh) != 0;
        }
        CHECK(bad_b == 0);
        CHECK(bad_h == 0);
    });

    std::mt19937 rng(3);
    std::vector<float> f;
    for (float x : {0.0f, -0.0f, 1.0f, -1.0f, 3.0e38f, -3.4028235e38f, 1e-45f, std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()})
        f.push_back(x);
    for (int i = 0; i < 200000; ++i) {
        const std::uint32_t u = rng();
        float x;
        std::memcpy(&x, &u, sizeof x);
        f.push_back(x);
    }
    // Ties either way, signalling and quiet NaNs, and the subnormal boundary, both in groups of 32
    // values that hold a subnormal and in groups that do not (where AVX-512 BF16 converts them).
    for (std::uint32_t high : {0x3f80u, 0x3f81u, 0xbf81u, 0x0080u, 0x8080u, 0x7f7fu, 0x7f80u, 0xff80u, 0x0000u,
                               0x007fu, 0x807fu})
        for (std::uint32_t low : {0x0000u, 0x0001u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu}) {
            const std::uint32_t u = high << 16 | low;
            float x;
            std::memcpy(&x, &u, sizeof x);
            f.push_back(x);
        }
    at_every_level([&](auto level) {
        std::vector<tpo::bfloat16> nb(f.size());
        level.narrow(f.data(), static_cast<index_t>(f.size()), nb.data());
        std::size_t bad_n = 0;
        for (std::size_t i = 0; i < f.size(); ++i) bad_n += nb[i].bits != tpo::bfloat16(f[i]).bits;
        CHECK(bad_n == 0);
    });
}

TEST_CASE("cpu backend: vectorised Philox equals the scalar generator", "[cpu][noise]") {
    at_every_level([&](auto level) {
    std::mt19937_64 rng(17);
    for (int trial = 0; trial < 50; ++trial) {
        const tpo::math::philox_stream stream{rng(), trial % 3 == 0 ? rng() : static_cast<std::uint64_t>(trial)};
        // Near 2^32 the block counter carries into its high word.
        const std::uint64_t first = trial % 2 == 0 ? rng() >> 20 : 0xFFFFFFF8ull;
        std::uint32_t x[4][tpo::backend::cpu_detail::philox_lanes];
        level.blocks(stream, first, x);
        const index_t count = 37;
        std::vector<float> normals(4 * count);
        level.normals(stream, first, count, normals.data());
        for (int l = 0; l < tpo::backend::cpu_detail::philox_lanes; ++l) {
            const tpo::math::philox_block expected = stream.block(first + static_cast<std::uint64_t>(l));
            for (int k = 0; k < 4; ++k) REQUIRE(x[k][l] == expected.x[k]);
        }
        for (index_t b = 0; b < count; ++b) {
            float expected[4];
            stream.normals(first + static_cast<std::uint64_t>(b), expected);
            for (int k = 0; k < 4; ++k) {
                // Vector log/sin/cos may differ from libm in the last bits (docs/formulas.md#reproducible-noise).
                INFO("block " << first + static_cast<std::uint64_t>(b) << " normal " << k);
                REQUIRE(std::abs(normals[static_cast<std::size_t>(4 * b + k)] - expected[k]) <=
                        4 * 1.2e-7f * std::max(1.0f, std::abs(expected[k])));
            }
        }
    }
    });
}

TEST_CASE("cpu backend: diffusion noise is bit-identical for 1, 2 and 4 threads", "[cpu][noise][threads]") {
    const index_t n = 2, c = 3, h = 97, w = 101;  // blocks not a multiple of the chunk or the lanes
    std::vector<float> image(static_cast<std::size_t>(n * c * h * w));
    for (std::size_t i = 0; i < image.size(); ++i) image[i] = static_cast<float>(i % 251) / 250.0f;
    const auto in = tpo::image_view<const float>::nchw(image.data(), n, c, h, w);
    tpo::diffusion_options o;
    o.seed = 20261127;
    o.stream = 3;
    for (cpu_level level : supported_levels()) {
    INFO("level " << tpo::backend::to_string(level));
    std::vector<std::vector<float>> outs;
    for (int threads : {1, 2, 4}) {
        tpo::backend::cpu backend(threads, level);
        std::vector<float> out(image.size());
        tpo::add_diffusion_noise(backend, in, tpo::image_view<float>::nchw(out.data(), n, c, h, w), o);
        outs.push_back(std::move(out));
    }
    CHECK(same_bits(outs[1], outs[0]));
    CHECK(same_bits(outs[2], outs[0]));
    // And within a few ulps of the oracle's scalar draws.
    tpo::backend::reference oracle;
    std::vector<float> expected(image.size());
    tpo::add_diffusion_noise(oracle, in, tpo::image_view<float>::nchw(expected.data(), n, c, h, w), o);
    float worst = 0;
    for (std::size_t i = 0; i < expected.size(); ++i)
        worst = std::max(worst, std::abs(outs[0][i] - expected[i]) / std::max(1.0f, std::abs(expected[i])));
    INFO("largest relative difference " << worst);
    CHECK(worst <= 4 * 1.2e-7f);
    }
}

namespace {

// x on a 1/4096 grid over [lowest, highest] plus random points inside the polynomials' interval.
std::vector<float> exp_test_points(float lowest, float highest) {
    std::vector<float> x;
    for (double v = lowest; v <= highest; v += 1.0 / 4096) x.push_back(static_cast<float>(v));
    std::mt19937 rng(3);
    std::uniform_real_distribution<float> inside(-0.35f, 0.35f);
    for (int k = 0; k < 200000; ++k) x.push_back(inside(rng));
    return x;
}

// The largest error(x[i], y[i], exp(x[i]) in double) and the x where it occurs.
template <class Error>
std::pair<double, float> worst_error(const std::vector<float>& x, const std::vector<float>& y, Error error) {
    std::pair<double, float> worst{-1.0, 0.0f};
    for (std::size_t i = 0; i < x.size(); ++i) {
        const double e = error(x[i], static_cast<double>(y[i]), std::exp(static_cast<double>(x[i])));
        if (e > worst.first) worst = {e, x[i]};
    }
    return worst;
}

}  // namespace

TEST_CASE("the row kernels' float exponential is within two ulps of exp", "[cpu][exp]") {
    at_every_level([&](auto level) {
        auto exp_of = [&](std::vector<float> x) {
            std::vector<float> y(x.size());
            level.exp(x.data(), static_cast<index_t>(x.size()), y.data());
            return y;
        };
        // Subnormal results are rounded, not clamped, at every level.
        const std::vector<float> x = exp_test_points(-104.0f, 88.0f);
        const auto [worst_ulps, worst_at] = worst_error(x, exp_of(x), [](float, double y, double exact) {
            const float e = static_cast<float>(exact);
            // One ulp of the correctly rounded result; at the bottom of the subnormals, their spacing.
            const double ulp = std::max(static_cast<double>(std::nextafter(e, INFINITY) - e), 0x1p-149);
            return std::abs(y - exact) / ulp;
        });
        INFO("worst: " << worst_ulps << " ulps at x = " << worst_at);
        CHECK(worst_ulps <= 2.0);
        CHECK(exp_of({0.0f})[0] == 1.0f);
        CHECK(std::isnan(exp_of({std::nanf("")})[0]));
        CHECK(exp_of({-INFINITY})[0] == 0.0f);
        CHECK(exp_of({-120.0f})[0] == 0.0f);
        CHECK(exp_of({89.0f})[0] == INFINITY);
    });
}

TEST_CASE("the log-sum-exp terms' exponential is within its error bound", "[cpu][exp]") {
    // shifted_exp(m)(x) = exp(x − m). The bound (cpu/kernels.inl): the degree-5 polynomial's 1.39 eps
    // (scripts/fit-exp-polynomial 5 exp2, Horner rounding included); ln 2·eps/4 from rounding
    // f = t + 1 where t ∈ (−1, 0); |x − m|·eps/2 each from rounding x − m and t = (x − m)·log2 e
    // in float, and |x − m|·|1 − float(log2 e)/log2 e|. The baseline level has no fused
    // multiply-add: five more roundings in Horner's scheme, eps/2 each.
    // Down to x − m = −87, where results stop being normal.
    const double eps = std::numeric_limits<float>::epsilon();
    const double log2e = 1.0 / std::log(2.0);
    const double log2e_error = std::abs(1.0 - static_cast<double>(static_cast<float>(log2e)) / log2e);
    at_every_level([&](auto level) {
        const double horner = decltype(level)::level == cpu_level::baseline ? 1.39 + 2.5 : 1.39;
        for (const float m : {0.0f, 3.7f, -2.5f, 25.3f, -1000.1f, 12345.6f}) {
            INFO("m = " << m);
            auto exp_of = [&](std::vector<float> x) {
                std::vector<float> y(x.size());
                level.exp(x.data(), static_cast<index_t>(x.size()), y.data(), true, m);
                return y;
            };
            std::vector<float> x = exp_test_points(-87.0f, 0.0f);
            for (float& v : x) v = std::min(v, 0.0f) + m;  // x − m ≤ 0, rounded as the kernels' inputs are
            const std::vector<float> y = exp_of(x);
            double worst = 0;
            float worst_at = 0;
            for (std::size_t i = 0; i < x.size(); ++i) {
                const double d = static_cast<double>(x[i]) - static_cast<double>(m);
                if (d < -87.0) continue;
                const double exact = std::exp(d);
                const double bound = (horner + std::log(2.0) / 4) * eps + std::abs(d) * (eps + log2e_error);
                const double e = std::abs(static_cast<double>(y[i]) - exact) / exact / bound;  // fraction of the bound
                if (e > worst) {
                    worst = e;
                    worst_at = x[i];
                }
            }
            INFO("worst: " << worst << " of the bound at x = " << worst_at);
            CHECK(worst <= 1.0);
            CHECK(exp_of({m})[0] == 1.0f);
            CHECK(std::isnan(exp_of({std::nanf("")})[0]));
            CHECK(exp_of({-INFINITY})[0] == 0.0f);
            CHECK(exp_of({m - 200.0f})[0] == 0.0f);
        }
    });
}

TEST_CASE("the fused pass over a clean and a noisy tensor equals two separate passes, bit for bit", "[cpu][pair]") {
    std::mt19937_64 rng(21);
    const index_t S = 3, L = 9, V = 2500;  // V spans three blocks, the last one partial
    auto check = [&](const auto& clean, const auto& noisy, const std::vector<std::int64_t>& labels) {
        using T = typename std::decay_t<decltype(clean)>::value_type;
        const tpo::logits_view<const T> zc{clean.data(), S, L, V}, zn{noisy.data(), S, L, V};
        const tpo::labels_view<const std::int64_t> y{labels.data(), S, L};
        using R = tpo::row_reduction;
        for (cpu_level level : supported_levels())
        for (int threads : {1, 2}) {
            tpo::backend::cpu backend(threads, level);
            for (R first : {R::label, R::finiteness, R::logsumexp, R::logsumexp_and_doubled})
                for (R second : {R::label, R::finiteness, R::logsumexp, R::logsumexp_and_doubled}) {
                    INFO("reductions " << static_cast<int>(first) << ", " << static_cast<int>(second) << ", threads "
                                       << threads << ", element " << tpo::element_name<T>() << ", level "
                                       << tpo::backend::to_string(level));
                    const tpo::row_alignment align{};
                    const auto rows = static_cast<std::size_t>(S * align.scored_rows(L));
                    std::vector<tpo::row_stats> a(rows), b(rows), c(rows), d(rows);
                    backend.row_statistics_pair(zc, first, a.data(), zn, second, b.data(), y, align);
                    backend.row_statistics(zc, y, align, first, c.data());
                    backend.row_statistics(zn, y, align, second, d.data());
                    CHECK(same_bits(a, c));
                    CHECK(same_bits(b, d));
                }
        }
    };
    std::normal_distribution<float> normal(0.0f, 4.0f);
    std::vector<float> clean(static_cast<std::size_t>(S * L * V)), noisy(clean.size());
    for (auto& x : clean) x = normal(rng);
    for (auto& x : noisy) x = normal(rng);
    std::vector<std::int64_t> labels(static_cast<std::size_t>(S * L));
    for (auto& y : labels) y = static_cast<std::int64_t>(rng() % V);
    labels[4] = -100;
    labels[7] = V + 3;  // out of range: a status, not a read
    noisy[(0 * L + 2) * V + 1700] = std::numeric_limits<float>::quiet_NaN();
    clean[(1 * L + 5) * V + 10] = std::numeric_limits<float>::infinity();
    check(clean, noisy, labels);
    std::vector<tpo::bfloat16> clean16(clean.size()), noisy16(noisy.size());
    for (std::size_t i = 0; i < clean.size(); ++i) {
        clean16[i] = tpo::narrow<tpo::bfloat16>(clean[i]);
        noisy16[i] = tpo::narrow<tpo::bfloat16>(noisy[i]);
    }
    check(clean16, noisy16, labels);
}

/// The float products' forms this build has: its own, and oneDNN's where it links oneDNN.
std::vector<tpo::backend::cpu_products> product_forms() {
    std::vector<tpo::backend::cpu_products> forms{tpo::backend::cpu_products::own};
    if (tpo::backend::onednn_linked) forms.push_back(tpo::backend::cpu_products::onednn);
    return forms;
}

TEST_CASE("cpu backend: hidden states in give bit-identical results for 1, 2 and 4 threads", "[cpu][fused][threads]") {
    // Several chunks, float and bf16 operands; the products' tiling has its own test below.
    using namespace tpo_test::hidden;
    std::mt19937_64 rng(31);
    const hidden_data<double> d = random_hidden(rng, 2, 150, 110, 96, 700);
    tpo::objective_options options;
    options.logit_softcap = 6.0;
    options.chunk_tokens = 100;
    auto run = [&](const auto& data, int threads, cpu_level level, tpo::backend::cpu_products products) {
        using T = typename std::decay_t<decltype(data.weight)>::value_type;
        tpo::backend::cpu backend(threads, level, products);
        hidden_gradient_data<T> g(data);
        auto views = g.views(data, true);
        const tpo::objective_result r = tpo::evaluate(backend, options, data.batch(), &views);
        return std::pair{r, g};
    };
    auto check = [&](const auto& data) {
        for (cpu_level level : supported_levels())
        for (const auto products : product_forms()) {
        const auto [r1, g1] = run(data, 1, level, products);
        for (int threads : {2, 4}) {
            INFO(threads << " threads, level " << tpo::backend::to_string(level) << ", products "
                         << tpo::backend::to_string(products));
            const auto [r, g] = run(data, threads, level, products);
            CHECK(same_bits(r, r1));
            for (int k = 0; k < 4; ++k) CHECK(same_bits(g.hidden[k], g1.hidden[k]));
            CHECK(same_bits(g.weight, g1.weight));
            CHECK(same_bits(g.bias, g1.bias));
        }
        }
    };
    check(convert<float>(d));
    check(convert<tpo::bfloat16>(d));
}

TEST_CASE("cpu backend: oneDNN's products are the default where the build links oneDNN, and asked for without it "
          "an error",
          "[cpu][fused][matmul]") {
    using tpo::backend::cpu_products;
    const tpo::backend::cpu backend(1);
    CHECK(backend.products() == (tpo::backend::onednn_linked ? cpu_products::onednn : cpu_products::own));
    CHECK(tpo::backend::cpu(1, backend.level(), cpu_products::own).products() == cpu_products::own);
    if (tpo::backend::onednn_linked)
        CHECK(tpo::backend::cpu(1, backend.level(), cpu_products::onednn).products() == cpu_products::onednn);
    else
        CHECK_THROWS_WITH(tpo::backend::cpu(1, backend.level(), cpu_products::onednn),
                          Catch::Contains("this build does not link oneDNN"));
}

TEST_CASE("cpu backend: the fused head's matrix product is bit-identical across thread counts and exact",
          "[cpu][fused][threads][matmul]") {
    // 2×2 tiles of 256×256 and k long enough to be cut into spans (fewer than 16 tiles, k ≥ 4096),
    // in the three forms the fused head uses: H·Wᵀ (logits), G·W (hidden states' gradient), Gᵀ·H
    // (head's gradient, accumulated: beta = 1). Compared with a product in double, and between
    // 1, 2 and 4 threads bit for bit.
    const index_t m = 300, n = 270, k = 4101;
    std::mt19937_64 rng(57);
    std::normal_distribution<double> normal(0.0, 1.0);
    auto random_matrix = [&](index_t count) {
        std::vector<double> v(static_cast<std::size_t>(count));
        for (auto& x : v) x = normal(rng);
        return v;
    };
    // Rows one value longer than the product reads: odd and even row strides (the AMX path packs
    // even ones with gathers).
    const std::vector<double> a = random_matrix((m + 1) * (k + 1)), b = random_matrix((k + 1) * (n + 1)),
                              start = random_matrix(m * n);
    struct form {
        bool trans_a, trans_b;
        double beta;
    };
    for (const form f : {form{false, true, 0.0}, form{false, false, 0.0}, form{true, false, 1.0}}) {
        // A is m×k (k×m stored when transposed), B is k×n (n×k stored when transposed).
        const index_t lda = (f.trans_a ? m : k) + 1, ldb = (f.trans_b ? k : n) + 1;
        auto a_at = [&](index_t i, index_t p) { return f.trans_a ? a[p * lda + i] : a[i * lda + p]; };
        auto b_at = [&](index_t p, index_t j) { return f.trans_b ? b[j * ldb + p] : b[p * ldb + j]; };
        auto run = [&](auto a_operand, auto b_operand, auto acc, int threads, cpu_level level,
                       tpo::backend::cpu_products products) {
            using TA = decltype(a_operand);
            using TB = decltype(b_operand);
            using Acc = decltype(acc);
            std::vector<TA> ta(a.size());
            std::vector<TB> tb(b.size());
            for (std::size_t i = 0; i < a.size(); ++i) ta[i] = tpo::narrow<TA>(a[i]);
            for (std::size_t i = 0; i < b.size(); ++i) tb[i] = tpo::narrow<TB>(b[i]);
            std::vector<Acc> c(start.size());
            for (std::size_t i = 0; i < c.size(); ++i) c[i] = static_cast<Acc>(start[i]);
            tpo::backend::cpu(threads, level, products)
                .matmul(f.trans_a, f.trans_b, m, n, k, ta.data(), lda, tb.data(), ldb, c.data(), n,
                        static_cast<Acc>(f.beta));
            return c;
        };
        auto check = [&](auto a_operand, auto b_operand, auto acc, double tolerance) {
            // Every level: at avx512 the products with a bf16 B run on the AMX tile unit where the
            // CPU has one (a float A as two bf16 parts), two bf16 operands on AVX512-BF16's dot
            // products where it has those but no tile unit; the float tiles take the others at
            // avx2 and avx512 (16-bit operands widened), Eigen's product at baseline. Float
            // products also through oneDNN where the build links it.
            for (cpu_level level : supported_levels())
            for (const auto products : product_forms()) {
            using TA = decltype(a_operand);
            using TB = decltype(b_operand);
            INFO("trans_a " << f.trans_a << ", trans_b " << f.trans_b << ", operand bytes " << sizeof(TA) << " and "
                            << sizeof(TB) << ", level " << tpo::backend::to_string(level)
                            << ", AMX " << tpo::backend::cpu_detail::amx_bf16_usable() << ", products "
                            << tpo::backend::to_string(products));
            const auto c1 = run(a_operand, b_operand, acc, 1, level, products);
            for (int threads : {2, 4})
                CHECK(same_bits(run(a_operand, b_operand, acc, threads, level, products), c1));
            // Against the product of the operands as the backend saw them, in double: the error
            // of a float sum of k products is below k·eps·Σ|a·b| (a loose bound, per entry).
            // oneDNN's bf16 matmul multiplies a float A rounded to bf16 once (what a 16-bit trainer's
            // backward does): those are the operands it saw.
            const bool rounds_a = std::is_same_v<TA, float> && std::is_same_v<TB, tpo::bfloat16> &&
                                  tpo::backend::cpu_detail::onednn_bf16_products(level, products);
            auto a_seen = [&](double x) {
                const TA value = tpo::narrow<TA>(x);
                if constexpr (std::is_same_v<TA, float>)
                    if (rounds_a) return tpo::widen<double>(tpo::narrow<tpo::bfloat16>(value));
                return tpo::widen<double>(value);
            };
            std::vector<double> rows(static_cast<std::size_t>(m * k)), cols(static_cast<std::size_t>(n * k));
            for (index_t p = 0; p < k; ++p) {
                for (index_t i = 0; i < m; ++i) rows[i * k + p] = a_seen(a_at(i, p));
                for (index_t j = 0; j < n; ++j) cols[j * k + p] = tpo::widen<double>(tpo::narrow<TB>(b_at(p, j)));
            }
            double worst = 0;
            for (index_t i = 0; i < m; ++i)
                for (index_t j = 0; j < n; ++j) {
                    const double* x = rows.data() + i * k;
                    const double* y = cols.data() + j * k;
                    double exact = f.beta * start[i * n + j], magnitude = std::abs(exact);
                    for (index_t p = 0; p < k; ++p) {
                        exact += x[p] * y[p];
                        magnitude += std::abs(x[p] * y[p]);
                    }
                    worst = std::max(worst, std::abs(static_cast<double>(c1[i * n + j]) - exact) / magnitude);
                }
            CHECK(worst < (rounds_a ? 1e-5 : tolerance));
            }
        };
        check(float{}, float{}, float{}, 1e-5);
        check(tpo::bfloat16{}, tpo::bfloat16{}, float{}, 1e-5);
        // A float A against a bf16 B (∂L/∂u against a bf16 head or states): on the tile unit as
        // two bf16 parts, 16 significant bits of each value (a single bf16 rounding gives 2e-4
        // here); through oneDNN, rounded to bf16 once and checked against the rounded operand.
        check(float{}, tpo::bfloat16{}, float{}, 1e-6);
        check(tpo::float16{}, tpo::float16{}, float{}, 1e-5);
        check(double{}, double{}, double{}, 1e-13);
    }
}


TEST_CASE("cpu backend: the float tiles give the same bits at the avx2 and avx512 levels", "[cpu][fused][matmul]") {
    // Each value of C is C plus one chain of fused multiply-adds per k block in both register-block shapes
    // (cpu/tiles_f32.hpp), so the levels agree to the bit; edges in every direction (m, n and k
    // past whole blocks, k cut into spans).
    const auto levels = supported_levels();
    if (std::find(levels.begin(), levels.end(), cpu_level::avx512) == levels.end()) return;
    const index_t m = 300, n = 270, k = 4101;
    std::mt19937_64 rng(58);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> a(static_cast<std::size_t>(m * k)), b(static_cast<std::size_t>(k * n));
    for (auto& x : a) x = normal(rng);
    for (auto& x : b) x = normal(rng);
    for (const bool trans_a : {false, true})
        for (const bool trans_b : {false, true}) {
            auto run = [&](cpu_level level) {
                std::vector<float> c(static_cast<std::size_t>(m * n), 0.5f);
                tpo::backend::cpu(2, level, tpo::backend::cpu_products::own)
                    .matmul(trans_a, trans_b, m, n, k, a.data(), trans_a ? m : k, b.data(), trans_b ? k : n, c.data(),
                            n, 1.0f);
                return c;
            };
            INFO("trans_a " << trans_a << ", trans_b " << trans_b);
            CHECK(same_bits(run(cpu_level::avx2), run(cpu_level::avx512)));
        }
}

TEST_CASE("cpu backend: 16-bit operands in the float tiles give the float tiles' bits on the widened values",
          "[cpu][fused][matmul]") {
    // The float tiles widen 16-bit operands a block at a time before packing (f32_block_of), so
    // the product must be the float product of the widened operands to the bit, with edges in
    // every direction and k cut into spans. At avx2 every 16-bit product takes this form; at
    // avx512 only where no bf16 unit (AMX tiles, AVX512-BF16 vectors) takes it.
    const index_t m = 300, n = 270, k = 4101;
    std::mt19937_64 rng(59);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    auto random_matrix = [&](auto element, index_t count) {
        std::vector<decltype(element)> v(static_cast<std::size_t>(count));
        for (auto& x : v) x = tpo::narrow<decltype(element)>(normal(rng));
        return v;
    };
    auto widened = [](const auto& v) {
        std::vector<float> w(v.size());
        for (std::size_t i = 0; i < v.size(); ++i) w[i] = tpo::widen<float>(v[i]);
        return w;
    };
    auto check = [&](const auto& a, const auto& b, cpu_level level) {
        for (const bool trans_a : {false, true})
            for (const bool trans_b : {false, true}) {
                auto run = [&](const auto& x, const auto& y) {
                    std::vector<float> c(static_cast<std::size_t>(m * n), 0.5f);
                    tpo::backend::cpu(2, level, tpo::backend::cpu_products::own)
                        .matmul(trans_a, trans_b, m, n, k, x.data(), trans_a ? m : k, y.data(), trans_b ? k : n,
                                c.data(), n, 1.0f);
                    return c;
                };
                INFO("trans_a " << trans_a << ", trans_b " << trans_b << ", operand bytes " << sizeof(a[0]) << " and "
                                << sizeof(b[0]) << ", level " << tpo::backend::to_string(level));
                CHECK(same_bits(run(a, b), run(widened(a), widened(b))));
            }
    };
    const auto levels = supported_levels();
    const auto a16 = random_matrix(tpo::bfloat16{}, m * k), b16 = random_matrix(tpo::bfloat16{}, k * n);
    const auto ah = random_matrix(tpo::float16{}, m * k), bh = random_matrix(tpo::float16{}, k * n);
    const auto a32 = random_matrix(float{}, m * k);
    for (cpu_level level : levels) {
        if (level == cpu_level::baseline) continue;  // Eigen's product: widened blocks, its own order
        const bool bf16_unit = level == cpu_level::avx512 && (tpo::backend::cpu_detail::amx_bf16_usable() ||
                                                              tpo::backend::cpu_detail::bf16_vectors_usable());
        check(ah, bh, level);
        if (!bf16_unit) check(a16, b16, level);
        if (level != cpu_level::avx512 || !tpo::backend::cpu_detail::amx_bf16_usable()) check(a32, b16, level);
    }
}

TEST_CASE("cpu backend: the fused head's default chunk is 2^25 values, and at least 512 rows", "[cpu][fused]") {
    const tpo::backend::cpu backend(1);
    tpo::rows::fused_settings settings;
    CHECK(tpo::rows::chunk_rows_of(backend, settings, 32000) == (index_t{1} << 25) / 32000);  // 1048
    CHECK(tpo::rows::chunk_rows_of(backend, settings, 152064) == 512);  // 2^25 values would be 220 rows
    CHECK(tpo::rows::chunk_rows_of(backend, settings, 65536) == 512);
    CHECK(tpo::rows::chunk_rows_of(tpo::backend::reference{}, settings, 152064) == (index_t{1} << 24) / 152064);
    settings.chunk_rows = 7;  // the caller's size wins over both
    CHECK(tpo::rows::chunk_rows_of(backend, settings, 152064) == 7);
    CHECK(tpo::rows::chunk_rows_of(backend, settings, 32000) == 7);
}

TEST_CASE("cpu backend: the scratch pool reuses blocks that fit and holds at most twice what a step had alive",
          "[cpu][scratch]") {
    tpo::backend::cpu_detail::scratch_pool pool;
    constexpr std::size_t mib = std::size_t(1) << 20;
    void* a = pool.acquire(4 * mib);
    void* b = pool.acquire(4 * mib);  // 8 MiB alive: the most so far, so the pool holds at most 16
    CHECK(pool.kept_bytes() == 0);
    pool.give_back(a);
    CHECK(pool.kept_bytes() == 4 * mib);
    CHECK(pool.acquire(3 * mib) == a);  // 4 MiB fits 3 MiB (at most twice the request)
    pool.give_back(a);
    pool.give_back(b);
    CHECK(pool.kept_bytes() == 8 * mib);
    // 4 MiB is more than twice 1 MiB, so nothing fits: a new block, and 8 kept + 1 is within 16.
    void* c = pool.acquire(mib);
    CHECK(c != a);
    CHECK(c != b);
    CHECK(pool.kept_bytes() == 8 * mib);
    pool.give_back(c);
    void* d = pool.acquire(6 * mib);  // nothing fits; 9 kept + 6 is within 16: nothing goes
    CHECK(pool.kept_bytes() == 9 * mib);
    CHECK(pool.acquire(mib) == c);
    pool.give_back(c);
    pool.give_back(d);  // kept, oldest first: a, b, c, d (15 MiB)
    // Nothing fits 8 MiB, and 15 kept + 8 is over 16: a and b go (7 + 8 ≤ 16), c and d stay.
    void* e = pool.acquire(8 * mib);
    CHECK(pool.kept_bytes() == 7 * mib);
    pool.give_back(e);  // kept: c, d, e (15 MiB)
    CHECK(pool.acquire(mib) == c);
    pool.give_back(c);  // kept: d, e, c
    void* f = pool.acquire(9 * mib);  // nothing fits; d and e go (1 + 9 ≤ 16); 9 alive is the new peak
    CHECK(pool.kept_bytes() == mib);
    pool.give_back(f);
    CHECK(pool.release() == 10 * mib);
    CHECK(pool.kept_bytes() == 0);
}

TEST_CASE("cpu backend: a step whose buffers live one after another keeps its blocks, and so does a call of "
          "another shape in between",
          "[cpu][scratch]") {
    tpo::backend::cpu_detail::scratch_pool pool;
    constexpr std::size_t mib = std::size_t(1) << 20;
    // A small buffer dies before the large one is asked for: never more than 40 MiB alive at once,
    // but the step uses 42 MiB of distinct blocks. `kept` is what the pool still holds while the
    // small buffer is alive: 40 MiB once the large block survives the small request.
    struct seen {
        void* small;
        void* large;
        std::size_t kept;
    };
    auto step = [&] {
        seen s{pool.acquire(2 * mib), nullptr, pool.kept_bytes()};
        pool.give_back(s.small);
        s.large = pool.acquire(40 * mib);
        pool.give_back(s.large);
        return s;
    };
    CHECK(step().kept == 0);
    const seen second = step();
    CHECK(second.kept == 40 * mib);
    const seen third = step();
    CHECK(third.small == second.small);
    CHECK(third.large == second.large);
    CHECK(third.kept == 40 * mib);
    // Another shape takes the small block and gives it back last; the next step still finds both.
    void* other = pool.acquire(3 * mib / 2);
    CHECK(other == second.small);
    pool.give_back(other);
    const seen fourth = step();
    CHECK(fourth.small == second.small);
    CHECK(fourth.large == second.large);
    CHECK(fourth.kept == 40 * mib);
    CHECK(pool.release() == 42 * mib);
}

TEST_CASE("cpu backend: buffers from kept scratch are zeroed, and fused steps that reuse it give the same bits",
          "[cpu][scratch][fused]") {
    using tpo::backend::cpu;
    const cpu backend(2);
    (void)cpu::release_cached_scratch();
    constexpr index_t n = (index_t{3} << 20) / 4 + 16;  // floats, in the pool's range
    const float* first = nullptr;
    {
        auto dirty = backend.allocate<float>(n);
        first = dirty.data();
        std::fill(dirty.begin(), dirty.end(), 7.0f);
    }
    CHECK(cpu::cached_scratch_bytes() >= static_cast<std::size_t>(n) * sizeof(float));
    {
        const auto again = backend.allocate<float>(n);
        CHECK(again.data() == first);
        CHECK(std::all_of(again.begin(), again.end(), [](float x) { return x == 0.0f; }));
    }

    // A 16-bit head accumulates ∂L/∂W in a V×H float scratch (here 6 MiB), and each side's rows
    // make chunks of 64 rows of float logits (1 MiB): the second and third steps run on the blocks
    // the first one left, and before each of them those blocks are filled with NaN. The chunks
    // come from allocate_for_overwrite() and the accumulator is overwritten by the first chunk's
    // product: a value read before it is written would turn up in the results.
    using namespace tpo_test::hidden;
    std::mt19937_64 rng(47);
    const auto data = convert<tpo::bfloat16>(random_hidden(rng, 2, 90, 70, 384, 4096));
    tpo::objective_options options;
    options.chunk_tokens = 64;
    auto poison_kept_blocks = [&] {
        std::vector<cpu::buffer<float>> blocks;
        for (const index_t size : {data.vocab * data.hidden, 64 * data.vocab}) {
            blocks.push_back(backend.allocate_for_overwrite<float>(size));
            std::fill(blocks.back().begin(), blocks.back().end(), std::numeric_limits<float>::quiet_NaN());
        }
    };
    auto step = [&] {
        hidden_gradient_data<tpo::bfloat16> g(data);
        auto views = g.views(data, true);
        const tpo::objective_result r = tpo::evaluate(backend, options, data.batch(), &views);
        return std::pair{r, g};
    };
    (void)cpu::release_cached_scratch();
    const auto [r1, g1] = step();
    const std::size_t kept = cpu::cached_scratch_bytes();
    CHECK(kept > std::size_t{4096} * 384 * sizeof(float));
    for (int repeat = 0; repeat < 2; ++repeat) {
        poison_kept_blocks();
        CHECK(cpu::cached_scratch_bytes() == kept);
        const auto [r, g] = step();
        CHECK(cpu::cached_scratch_bytes() == kept);
        CHECK(same_bits(r, r1));
        for (int k = 0; k < 4; ++k) CHECK(same_bits(g.hidden[k], g1.hidden[k]));
        CHECK(same_bits(g.weight, g1.weight));
        CHECK(same_bits(g.bias, g1.bias));
    }
    CHECK(cpu::release_cached_scratch() == kept);
    CHECK(cpu::cached_scratch_bytes() == 0);
}
