// Every backend against the reference backend (the oracle) on the same random inputs, for every
// input element type: forward values, metrics and gradients.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>

#include "support/agreement.hpp"
#include "support/batch.hpp"
#include "support/tested_backend.hpp"

using namespace tpo_test;

namespace {

// Agreement bound for an input element type: both backends read identical inputs, so only the
// accumulation differs (double in the oracle, float or wider elsewhere).
template <class T>
constexpr double tolerance() {
    return std::is_same_v<T, double> ? 1e-12 : 2e-5;
}

template <class G>
void check_gradient_close(const std::vector<G>& a, const std::vector<G>& b, double tol, const char* what) {
    REQUIRE(a.size() == b.size());
    double scale = 0;
    for (const G& x : b) scale = std::max(scale, std::abs(tpo::widen<double>(x)));
    double worst = 0;
    std::size_t at = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        const double d = std::abs(tpo::widen<double>(a[i]) - tpo::widen<double>(b[i]));
        if (d > worst) {
            worst = d;
            at = i;
        }
    }
    INFO(what << ": worst difference " << worst << " at " << at << ", gradient scale " << scale);
    CHECK(worst <= tol * std::max(scale, 1e-30));
}

template <class T, class G>
void agree_on(std::mt19937_64& rng, tpo_test::index_t vocab) {
    tested_backend backend;
    tpo::backend::reference oracle;
    const auto data64 = random_batch<double>(rng, 3, 7, 5, vocab, 3.0, 0.3);
    const batch_data<T> data = convert<T>(data64);
    for (const auto& [name, options] : option_cases()) {
        INFO("element " << tpo::element_name<T>() << ", V = " << vocab << ", " << name);
        auto [a, ours] = evaluate_with_gradients<G>(backend, options, data);
        auto [b, theirs] = evaluate_with_gradients<G>(oracle, options, data);
        const double tol = tolerance<T>();
        check_close({a.loss, a.reward_accuracy, a.reward_margin}, {b.loss, b.reward_accuracy, b.reward_margin}, tol,
                    "loss, accuracy, margin");
        check_close(a.losses, b.losses, tol, "losses");
        check_close(a.policy_chosen_scores, b.policy_chosen_scores, tol, "policy chosen scores");
        check_close(a.policy_rejected_scores, b.policy_rejected_scores, tol, "policy rejected scores");
        check_close(a.mean_visual_score_chosen, b.mean_visual_score_chosen, tol, "mean visual score chosen");
        check_close(a.mean_visual_score_rejected, b.mean_visual_score_rejected, tol, "mean visual score rejected");
        const double gtol = std::is_same_v<G, double> ? 1e-12 : 1e-5;
        for (int k = 0; k < 4; ++k) check_gradient_close(ours.tensor(k), theirs.tensor(k), gtol, "gradient");
    }
}

}  // namespace

TEST_CASE("backend agrees with the reference backend for every input element type", "[backend][agreement]") {
    std::mt19937_64 rng(42);
    for (tpo_test::index_t vocab : {1, 7, 37, 1000}) {
        agree_on<double, double>(rng, vocab);
        agree_on<float, float>(rng, vocab);
        agree_on<tpo::bfloat16, float>(rng, vocab);
        agree_on<tpo::float16, float>(rng, vocab);
    }
}

TEST_CASE("row statistics agree with the reference backend for every row reduction", "[backend][agreement]") {
    tested_backend backend;
    tpo::backend::reference oracle;
    std::mt19937_64 rng(17);
    const auto data64 = random_batch<double>(rng, 3, 6, 6, 300, 3.0, 0.3);
    auto check = [&](const auto& data) {
        using T = typename std::decay_t<decltype(data.chosen.policy)>::value_type;
        auto z = data.chosen.batch().policy;
        auto y = data.chosen.batch().labels;
        for (const bool shift : {true, false}) {
            tpo::row_alignment align;
            align.shift = shift;
            const auto rows = static_cast<std::size_t>(z.sequences * align.scored_rows(z.length));
            for (auto reduction : {tpo::row_reduction::label, tpo::row_reduction::finiteness,
                                   tpo::row_reduction::logsumexp, tpo::row_reduction::logsumexp_and_doubled}) {
                INFO("element " << tpo::element_name<T>() << ", reduction " << static_cast<int>(reduction)
                                << ", shift " << shift);
                auto a = backend.template allocate<tpo::row_stats>(static_cast<tpo::index_t>(rows));
                std::vector<tpo::row_stats> b(rows);
                backend.row_statistics(z, y, align, reduction, backend.raw(a));
                oracle.row_statistics(z, y, align, reduction, b.data());
                const std::vector<tpo::row_stats> ours = backend.to_host(a);
                for (std::size_t r = 0; r < rows; ++r) {
                    INFO("row " << r);
                    CHECK(ours[r].status == b[r].status);
                    CHECK(ours[r].label == b[r].label);
                    if (b[r].status != tpo::row_status::ok) continue;  // the other fields are not defined
                    CHECK(ours[r].label_logit == b[r].label_logit);
                    const double tol = std::is_same_v<T, double> ? 1e-12 : 2e-6;
                    if (tpo::needs_logsumexp(reduction))
                        CHECK(std::abs(ours[r].lse - b[r].lse) <= tol * std::max(1.0, std::abs(b[r].lse)));
                    if (reduction == tpo::row_reduction::logsumexp_and_doubled)
                        CHECK(std::abs(ours[r].lse_doubled - b[r].lse_doubled) <=
                              tol * std::max(1.0, std::abs(b[r].lse_doubled)));
                }
            }
        }
    };
    check(data64);
    check(convert<float>(data64));
    check(convert<tpo::bfloat16>(data64));
    // +Inf, −Inf and NaN in turn, in every element type: the 16-bit scans test bits, not floats.
    auto poisoned = [](auto data) {
        using T = typename std::decay_t<decltype(data.chosen.policy)>::value_type;
        const float bad[] = {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                             std::numeric_limits<float>::quiet_NaN()};
        std::size_t k = 0;
        for (std::size_t i = 5; i < data.chosen.policy.size(); i += 977) data.chosen.policy[i] = T(bad[k++ % 3]);
        return data;
    };
    check(poisoned(convert<float>(data64)));
    check(poisoned(convert<tpo::bfloat16>(data64)));
    check(poisoned(convert<tpo::float16>(data64)));
}

TEST_CASE("backend writes 16-bit gradients that round the reference's", "[backend][agreement]") {
    tested_backend backend;
    tpo::backend::reference oracle;
    std::mt19937_64 rng(5);
    const auto data = convert<tpo::bfloat16>(random_batch<double>(rng, 2, 6, 6, 50, 2.0, 0.2));
    gradient_data<tpo::bfloat16> ours(data);
    gradient_data<double> exact(data);
    auto ov = ours.views();
    auto ev = exact.views();
    tpo::evaluate(backend, tpo::objective_options{}, data.batch(), &ov);
    tpo::evaluate(oracle, tpo::objective_options{}, data.batch(), &ev);
    for (int k = 0; k < 4; ++k) {
        double scale = 0;
        for (double x : exact.tensor(k)) scale = std::max(scale, std::abs(x));
        for (std::size_t i = 0; i < exact.tensor(k).size(); ++i) {
            const double e = exact.tensor(k)[i], o = tpo::widen<double>(ours.tensor(k)[i]);
            // bf16 keeps 8 significant bits: half an ulp of the value, plus float accumulation noise.
            CHECK(std::abs(o - e) <= std::abs(e) * (1.0 / 256) + 1e-6 * scale);
        }
    }
}

TEST_CASE("−∞ logits add nothing to a row's log-sum-exp, even a whole leading block",
          "[backend][agreement][edge]") {
    // A −∞ is still bad input (the row's status says so, and evaluate() reports it unless input
    // checks are off), but the statistics stay those of the finite entries, not NaN.
    tested_backend backend;
    tpo::backend::reference oracle;
    std::mt19937_64 rng(29);
    const tpo_test::index_t rows = 3, vocab = 2500, masked = 1100;  // the CPU backend's first block is all −∞
    std::normal_distribution<double> normal(0.0, 3.0);
    std::vector<double> z64(static_cast<std::size_t>(rows * vocab));
    for (std::size_t i = 0; i < z64.size(); ++i)
        z64[i] = static_cast<tpo_test::index_t>(i) % vocab < masked ? -std::numeric_limits<double>::infinity()
                                                                     : normal(rng);
    const std::vector<std::int64_t> labels = {masked, vocab - 1, 2000};
    auto check = [&](const auto& z) {
        using T = typename std::decay_t<decltype(z)>::value_type;
        INFO("element " << tpo::element_name<T>());
        const tpo::logits_view<const T> view{z.data(), 1, rows, vocab};
        const tpo::labels_view<const std::int64_t> y{labels.data(), 1, rows};
        tpo::row_alignment align;
        align.shift = false;
        for (auto reduction : {tpo::row_reduction::logsumexp, tpo::row_reduction::logsumexp_and_doubled}) {
            auto a = backend.template allocate<tpo::row_stats>(rows);
            std::vector<tpo::row_stats> b(rows);
            backend.row_statistics(view, y, align, reduction, backend.raw(a));
            oracle.row_statistics(view, y, align, reduction, b.data());
            const std::vector<tpo::row_stats> ours = backend.to_host(a);
            for (tpo_test::index_t r = 0; r < rows; ++r) {
                auto at = [&](tpo_test::index_t v) { return tpo::widen<double>(z[r * vocab + v]); };
                double top = -std::numeric_limits<double>::infinity(), sum = 0;
                for (tpo_test::index_t v = masked; v < vocab; ++v) top = std::max(top, at(v));
                for (tpo_test::index_t v = masked; v < vocab; ++v) sum += std::exp(at(v) - top);
                const double expected = top + std::log(sum);
                CHECK(b[r].status == tpo::row_status::non_finite);
                CHECK(ours[r].status == tpo::row_status::non_finite);
                CHECK(b[r].lse == Approx(expected).epsilon(1e-12));
                CHECK(ours[r].lse == Approx(expected).epsilon(tolerance<T>()));
            }
        }
    };
    check(z64);
    std::vector<float> z32(z64.begin(), z64.end());
    check(z32);
    std::vector<tpo::bfloat16> z16(z64.size());
    for (std::size_t i = 0; i < z64.size(); ++i) z16[i] = tpo::narrow<tpo::bfloat16>(z64[i]);
    check(z16);
}

TEST_CASE("identical policy and reference logits give h = 0 and a loss of exactly ln 2", "[backend][init]") {
    tested_backend backend;
    std::mt19937_64 rng(11);
    auto check = [&](auto data) {
        for (auto* side : {&data.chosen, &data.rejected}) {
            side->reference = side->policy;
            side->reference_noisy = side->policy_noisy;
        }
        const auto r = tpo::evaluate(backend, tpo::objective_options{}, data.batch());
        for (std::size_t i = 0; i < r.losses.size(); ++i) {
            CHECK(r.chosen_rewards[i] == 0.0);
            CHECK(r.rejected_rewards[i] == 0.0);
            CHECK(r.losses[i] == std::log(2.0));
        }
        CHECK(r.loss == std::log(2.0));
    };
    const auto data = random_batch<double>(rng, 4, 9, 6, 300, 4.0, 0.2);
    check(data);
    check(convert<float>(data));
    check(convert<tpo::bfloat16>(data));
    check(convert<tpo::float16>(data));
}

TEST_CASE("corruptions agree with the reference backend", "[backend][corrupt]") {
    tested_backend backend;
    tpo::backend::reference oracle;
    std::mt19937_64 rng(3);
    std::uniform_int_distribution<int> byte(0, 255);
    std::vector<std::uint8_t> image(2 * 3 * 19 * 23);
    for (auto& x : image) x = static_cast<std::uint8_t>(byte(rng));
    auto in = tpo::image_view<const std::uint8_t>::nchw(image.data(), 2, 3, 19, 23);
    auto run = [&](auto& b, auto&& corrupt) {
        std::vector<std::uint8_t> out(image.size());
        corrupt(b, tpo::image_view<std::uint8_t>::nchw(out.data(), 2, 3, 19, 23));
        return out;
    };
    auto agree = [&](const char* what, auto&& corrupt, int max_difference) {
        const auto a = run(backend, corrupt), b = run(oracle, corrupt);
        int worst = 0;
        for (std::size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(int(a[i]) - int(b[i])));
        INFO(what << ": largest 8-bit difference " << worst);
        CHECK(worst <= max_difference);
    };
    tpo::diffusion_options d;
    d.seed = 99;
    d.stream = 4;
    // Host and device transcendental functions may differ in the last bits
    // (docs/formulas.md#reproducible-noise), which can move a value across a rounding boundary of the
    // 8-bit output: at most one level.
    agree("diffusion pixel", [&](auto& b, auto out) { tpo::add_diffusion_noise(b, in, out, d); }, 1);
    d.space = tpo::noise_space::normalized;
    agree("diffusion normalized", [&](auto& b, auto out) { tpo::add_diffusion_noise(b, in, out, d); }, 1);
    agree("crop", [&](auto& b, auto out) { tpo::random_resized_crop(b, in, out, {}); }, 1);
    agree("blur", [&](auto& b, auto out) { tpo::gaussian_blur(b, in, out, {}); }, 1);
    agree("patch mask", [&](auto& b, auto out) { tpo::mask_patches(b, in, out, {}); }, 0);
    agree("noise image", [&](auto& b, auto out) { tpo::fill_noise_image(b, out, 1, 2); }, 1);

    std::vector<float> values(3 * 17 * 5);
    for (auto& x : values) x = static_cast<float>(byte(rng)) / 255.0f;
    auto fin = tpo::image_view<const float>::hwc(values.data(), 17, 5, 3);
    std::vector<float> a(values.size()), b(values.size());
    tpo::diffusion_options f;
    f.seed = 1234567890123ull;
    tpo::add_diffusion_noise(backend, fin, tpo::image_view<float>::hwc(a.data(), 17, 5, 3), f);
    tpo::add_diffusion_noise(oracle, fin, tpo::image_view<float>::hwc(b.data(), 17, 5, 3), f);
    for (std::size_t i = 0; i < a.size(); ++i) CHECK(std::abs(a[i] - b[i]) <= 4 * 1.2e-7f * std::max(1.0f, std::abs(b[i])));
}
