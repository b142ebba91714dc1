// Two translation units built with different instruction-set flags in one program
// (mixed_default.cpp: the compiler's defaults; mixed_native.cpp: -march=native where the compiler
// has it): each runs its own kernels, under names of their own, at every level this CPU has. Both
// see the same level chosen, and at each level both compute the same numbers.

#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <random>

#include "cpu_mixed/mixed.hpp"

using tpo::backend::cpu_level;

namespace {

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

bool same_bits(const std::vector<tpo::row_stats>& a, const std::vector<tpo::row_stats>& b) {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i) {
        const double x[] = {a[i].lse, a[i].label_logit, a[i].lse_doubled};
        const double y[] = {b[i].lse, b[i].label_logit, b[i].lse_doubled};
        if (std::memcmp(x, y, sizeof x) != 0 || a[i].label != b[i].label || a[i].status != b[i].status) return false;
    }
    return true;
}

/// max |a − b| / max(|b|, floor) elementwise, as doubles.
template <class T>
double worst_relative(const std::vector<T>& a, const std::vector<T>& b, double floor) {
    REQUIRE(a.size() == b.size());
    double worst = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        const double x = tpo::widen<double>(a[i]), y = tpo::widen<double>(b[i]);
        worst = std::max(worst, std::abs(x - y) / std::max(std::abs(y), floor));
    }
    return worst;
}

double worst_lse(const std::vector<tpo::row_stats>& a, const std::vector<tpo::row_stats>& b) {
    double worst = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        REQUIRE(a[i].status == b[i].status);
        if (a[i].status != tpo::row_status::ok) continue;
        worst = std::max({worst, std::abs(a[i].lse - b[i].lse) / std::abs(b[i].lse),
                          std::abs(a[i].lse_doubled - b[i].lse_doubled) / std::abs(b[i].lse_doubled)});
    }
    return worst;
}

mixed::inputs make_inputs() {
    mixed::inputs in;
    in.rows = 6;
    in.vocab = 3001;  // blocks of 1024 and a partial one
    std::mt19937_64 rng(5);
    std::normal_distribution<float> normal(0.0f, 3.0f);
    in.logits.resize(static_cast<std::size_t>(in.rows * in.vocab));
    for (auto& x : in.logits) x = normal(rng);
    in.batch = tpo_test::random_batch<float>(rng, 2, 5, 4, 700, 3.0, 0.25);
    return in;
}

std::vector<cpu_level> supported_levels() {
    std::vector<cpu_level> levels;
    for (cpu_level l : {cpu_level::baseline, cpu_level::avx2, cpu_level::avx512})
        if (l <= tpo::backend::supported_cpu_level()) levels.push_back(l);
    return levels;
}

}  // namespace

TEST_CASE("translation units built with different flags choose the same level and keep their own kernels",
          "[cpu][dispatch]") {
    const mixed::inputs in = make_inputs();
    const mixed::tu_result a = mixed::run_default(cpu_level::baseline, in), b = mixed::run_native(cpu_level::baseline, in);
    INFO("default-flags unit: " << a.kernels_namespace << ", native unit: " << b.kernels_namespace);
    CHECK(a.default_level == b.default_level);
    CHECK(a.default_level == tpo::backend::default_cpu_level());
    if (std::getenv("TPO_CPU_LEVEL") == nullptr) CHECK(a.default_level == tpo::backend::supported_cpu_level());
#if MIXED_NATIVE_FLAGS
    // -march=native adds instruction sets on any x86-64 this runs on: the kernels' names differ.
    CHECK(a.kernels_namespace != b.kernels_namespace);
#endif
}

TEST_CASE("at every level both translation units compute the same numbers", "[cpu][dispatch]") {
    const mixed::inputs in = make_inputs();
    for (cpu_level level : supported_levels()) {
        INFO("level " << tpo::backend::to_string(level));
        const mixed::tu_result a = mixed::run_default(level, in), b = mixed::run_native(level, in);
        const double lse = worst_lse(a.stats, b.stats), grad = worst_relative(a.gradient, b.gradient, 1e-30),
                     grad16 = worst_relative(a.gradient_bf16, b.gradient_bf16, 1e-30),
                     normals = worst_relative(a.normals, b.normals, 1.0);
        INFO("lse " << lse << ", gradient " << grad << ", bf16 gradient " << grad16 << ", normals " << normals
                    << ", loss " << a.loss << " / " << b.loss);
        if (level == cpu_level::baseline) {
            // The native unit's baseline kernels may fuse multiply-adds the default unit's cannot:
            // within the tolerance between levels.
            CHECK(lse <= 1e-7);
            CHECK(grad <= 1e-6);
            CHECK(grad16 <= 8e-3);
            CHECK(normals <= 4 * 1.2e-7);
            CHECK(a.loss == Approx(b.loss).epsilon(1e-6));
        } else {
            CHECK(same_bits(a.stats, b.stats));
            CHECK(same_bits(a.gradient, b.gradient));
            CHECK(same_bits(a.gradient_bf16, b.gradient_bf16));
            CHECK(same_bits(a.normals, b.normals));
            CHECK(a.loss == b.loss);
        }
    }
}

TEST_CASE("levels agree with each other to the last bits", "[cpu][dispatch]") {
    const mixed::inputs in = make_inputs();
    const mixed::tu_result base = mixed::run_default(cpu_level::baseline, in);
    for (cpu_level level : supported_levels()) {
        INFO("level " << tpo::backend::to_string(level) << " against baseline");
        const mixed::tu_result r = mixed::run_default(level, in);
        const double lse = worst_lse(r.stats, base.stats), grad = worst_relative(r.gradient, base.gradient, 1e-30),
                     normals = worst_relative(r.normals, base.normals, 1.0);
        INFO("lse " << lse << ", gradient " << grad << ", normals " << normals << ", loss " << r.loss - base.loss);
        // The tolerances docs/design.md documents between levels.
        CHECK(lse <= 1e-7);
        CHECK(grad <= 1e-6);
        CHECK(worst_relative(r.gradient_bf16, base.gradient_bf16, 1e-30) <= 8e-3);  // one bf16 rounding
        CHECK(normals <= 4 * 1.2e-7);
        CHECK(r.loss == Approx(base.loss).epsilon(1e-6));
    }
}
