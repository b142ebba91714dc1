// Bad input raises a tpo::error naming the offending shape or value, on every backend; legitimate
// edges are not errors.

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>

#include "support/batch.hpp"
#include "support/tested_backend.hpp"

using namespace tpo_test;
using Catch::Matchers::Contains;

namespace {

batch_data<double> good_batch() {
    std::mt19937_64 rng(1);
    auto d = random_batch<double>(rng, 2, 4, 3, 5, 1.0, 0.0);
    return d;
}

template <class Edit>
void expect_error(Edit&& edit, const std::string& needle, const tpo::objective_options& options = {}) {
    tested_backend backend;
    auto data = good_batch();
    auto batch = data.batch();
    edit(data, batch);
    gradient_data<double> g(data);
    auto views = g.views();
    INFO("expected an error mentioning: " << needle);
    try {
        tpo::evaluate(backend, options, batch, &views);
        FAIL("no error was raised");
    } catch (const tpo::error& e) {
        CHECK_THAT(e.what(), Contains(needle));
    }
}

}  // namespace

TEST_CASE("shape mismatches name both shapes", "[bad-input]") {
    expect_error([](auto&, auto& b) { b.chosen.reference.vocab = 4; b.chosen.reference.length = 5; },
                 "chosen reference logits: shape (2, 5, 4) differs from policy logits shape (2, 4, 5)");
    expect_error([](auto&, auto& b) { b.rejected.policy_noisy.length = 2; },
                 "rejected policy noisy logits: shape (2, 2, 5)");
    expect_error([](auto&, auto& b) { b.chosen.labels.length = 3; },
                 "chosen labels: shape (2, 3), expected (2, 4)");
    expect_error([](auto&, auto& b) {
        b.rejected.policy.sequences = b.rejected.reference.sequences = b.rejected.policy_noisy.sequences =
            b.rejected.reference_noisy.sequences = b.rejected.labels.sequences = 1;
    }, "rejected policy logits: 1 sequences, expected one per chosen sequence (2)");
    expect_error([](auto&, auto& b) {
        for (auto* z : {&b.rejected.policy, &b.rejected.reference, &b.rejected.policy_noisy, &b.rejected.reference_noisy})
            z->vocab = 4;
    }, "vocabulary 4 differs from the chosen one (5)");
    expect_error([](auto&, auto& b) { b.chosen.policy_noisy.data = nullptr; }, "chosen policy noisy logits: null");
}

TEST_CASE("an empty batch is an error, not a NaN", "[bad-input]") {
    expect_error([](auto&, auto& b) {
        for (auto* s : {&b.chosen, &b.rejected}) {
            for (auto* z : {&s->policy, &s->reference, &s->policy_noisy, &s->reference_noisy}) z->sequences = 0;
            s->labels.sequences = 0;
        }
    }, "has no sequence (empty batch)");
    expect_error([](auto&, auto& b) {
        for (auto* z : {&b.chosen.policy, &b.chosen.reference, &b.chosen.policy_noisy, &b.chosen.reference_noisy})
            z->vocab = 0;
    }, "expected L >= 1 and V >= 1");
}

TEST_CASE("labels outside [0, V) that are not the ignore index", "[bad-input]") {
    expect_error([](auto& d, auto&) { d.chosen.labels[1 * 4 + 2] = 5; },
                 "chosen labels: label 5 at sequence 1, position 2 is outside [0, 5) and is not the ignore index -100");
    expect_error([](auto& d, auto&) { d.rejected.labels[1] = -7; }, "label -7 at sequence 0, position 1");
    // Position 0 is never scored with the causal shift, so a bad label there is not read.
    tested_backend backend;
    auto data = good_batch();
    data.chosen.labels[0] = 99;
    CHECK_NOTHROW(tpo::evaluate(backend, tpo::objective_options{}, data.batch()));
}

TEST_CASE("NaN or Inf in any logits tensor", "[bad-input]") {
    const double bad[] = {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
                          -std::numeric_limits<double>::infinity()};
    for (double value : bad)
        for (int k = 0; k < 4; ++k) {
            const char* role[] = {"policy logits", "policy noisy logits", "reference logits", "reference noisy logits"};
            expect_error([&](auto& d, auto&) { d.rejected.tensor(k)[(1 * 3 + 1) * 5 + 3] = value; },
                         std::string("rejected ") + role[k] + " at sequence 1, position 2: the row holds a NaN or an "
                                                               "infinite logit");
        }
}

TEST_CASE("with check_unused_logits off, the noisy logits are checked where the result reads them",
          "[bad-input]") {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const char* role[] = {"", "policy noisy logits", "", "reference noisy logits"};
    tpo::objective_options lean;
    lean.check_unused_logits = false;
    for (int k : {1, 3}) {
        const auto clean = good_batch();
        // Rejected row (sequence 1, t = 1) is scored against the label at position 2.
        const std::int64_t label = clean.rejected.labels[1 * 3 + 2];
        const std::size_t row = (1 * 3 + 1) * 5;
        const std::size_t elsewhere = row + static_cast<std::size_t>((label + 1) % 5);
        INFO("rejected " << role[k] << ", label " << label);

        // The logit score reads z~[y] only: a NaN elsewhere changes no bit of the result...
        tested_backend backend;
        auto dirty = clean;
        dirty.rejected.tensor(k)[elsewhere] = nan;
        auto [a, g_clean] = evaluate_with_gradients(backend, lean, clean);
        auto [b, g_dirty] = evaluate_with_gradients(backend, lean, dirty);
        CHECK(a.loss == b.loss);
        CHECK(a.losses == b.losses);
        for (int t = 0; t < 4; ++t) CHECK(g_clean.tensor(t) == g_dirty.tensor(t));
        // ...but the default still reports it,
        expect_error([&](auto& d, auto&) { d.rejected.tensor(k)[elsewhere] = nan; },
                     std::string("rejected ") + role[k] + " at sequence 1, position 2: the row holds a NaN");
        // a NaN the result reads is an error either way,
        expect_error([&](auto& d, auto&) { d.rejected.tensor(k)[row + static_cast<std::size_t>(label)] = nan; },
                     std::string("rejected ") + role[k] + " at sequence 1, position 2: the row holds a NaN", lean);
        // and scores that use probabilities read the whole row.
        tpo::objective_options lean_prob = lean;
        lean_prob.score = tpo::score_kind::prob;
        expect_error([&](auto& d, auto&) { d.rejected.tensor(k)[elsewhere] = nan; },
                     std::string("rejected ") + role[k] + " at sequence 1, position 2: the row holds a NaN",
                     lean_prob);
    }
}

TEST_CASE("hyperparameters out of range", "[bad-input]") {
    auto with = [](auto&& edit) {
        tpo::objective_options o;
        edit(o);
        return o;
    };
    auto none = [](auto&, auto&) {};
    expect_error(none, "beta = 0", with([](auto& o) { o.hyper.beta = 0; }));
    expect_error(none, "beta = -1", with([](auto& o) { o.hyper.beta = -1; }));
    expect_error(none, "beta = nan", with([](auto& o) { o.hyper.beta = std::nan(""); }));
    expect_error(none, "label_smoothing = 0.6 for loss sigmoid", with([](auto& o) { o.hyper.label_smoothing = 0.6; }));
    expect_error(none, "label_smoothing = -0.1", with([](auto& o) { o.hyper.label_smoothing = -0.1; }));
    expect_error(none, "label_smoothing = 0.5 for loss robust", with([](auto& o) {
                     o.losses = {{tpo::loss_type::robust, 1}};
                     o.hyper.label_smoothing = 0.5;
                 }));
    expect_error(none, "label_smoothing = 0 for loss exo_pair",
                 with([](auto& o) { o.losses = {{tpo::loss_type::exo_pair, 1}}; }));
    expect_error(none, "a = -0.5", with([](auto& o) { o.a = -0.5; }));
    expect_error(none, "ld_alpha = 1.5", with([](auto& o) { o.ld_alpha = 1.5; }));
    expect_error(none, "discopop_tau = 0", with([](auto& o) {
                     o.losses = {{tpo::loss_type::discopop, 1}};
                     o.hyper.discopop_tau = 0;
                 }));
    expect_error(none, "WPO weighting is not defined for loss aot", with([](auto& o) {
                     o.losses = {{tpo::loss_type::aot, 1}};
                     o.use_weighting = true;
                 }));
    for (tpo::loss_type t : {tpo::loss_type::nca_pair, tpo::loss_type::bco_pair, tpo::loss_type::sppo_hard,
                             tpo::loss_type::aot, tpo::loss_type::aot_unpaired, tpo::loss_type::apo_zero,
                             tpo::loss_type::apo_down})
        expect_error(none, std::string("f_divergence_type = js_divergence for loss ") + tpo::name(t) +
                               ", expected reverse_kl",
                     with([t](auto& o) {
                         o.losses = {{tpo::loss_type::sigmoid, 1}, {t, 0.5}};
                         o.hyper.divergence = tpo::f_divergence::js_divergence;
                     }));
    expect_error(none, "empty list", with([](auto& o) { o.losses.clear(); }));
    expect_error(none, "weight of sft is inf",
                 with([](auto& o) { o.losses = {{tpo::loss_type::sft, std::numeric_limits<double>::infinity()}}; }));
    CHECK_THROWS_WITH(tpo::parse_loss_terms("sigmoid,bogus"), Contains("unknown loss_type 'bogus'"));
    CHECK_THROWS_WITH(tpo::parse_loss_terms("sigmoid,sft", "1"), Contains("1 weights for 2 losses"));
    CHECK_THROWS_WITH(tpo::parse_loss_terms("sigmoid", "x"), Contains("'x' is not a decimal number"));
    CHECK_THROWS_WITH(tpo::parse_loss_terms("sigmoid", "0x1"), Contains("'0x1' is not a decimal number"));
    CHECK_THROWS_WITH(tpo::parse_loss_terms("sigmoid", " 1"), Contains("' 1' is not a decimal number"));
    CHECK(tpo::parse_loss_terms("sigmoid,sft", "+1_0,.5")[0].weight == 10.0);
    expect_error(none, "weight of sft is -1, expected a finite value >= 0",
                 with([](auto& o) { o.losses = {{tpo::loss_type::sigmoid, 1}, {tpo::loss_type::sft, -1}}; }));
    expect_error(none, "f_alpha_divergence_coef = -0.5, expected a finite value >= 0",
                 with([](auto& o) { o.hyper.f_alpha_divergence_coef = -0.5; }));
    CHECK(tpo::parse_loss_terms("aot_pair")[0].type == tpo::loss_type::aot_unpaired);
}

TEST_CASE("caller-supplied weights are checked", "[bad-input]") {
    tpo::objective_options o;
    o.weighting = tpo::token_weighting::caller;
    expect_error([](auto& d, auto&) { d.chosen.weights[1 * 4 + 3] = 0.0f; },
                 "chosen token weights at sequence 1, position 3: weight 0, expected a finite value > 0", o);
    expect_error([](auto& d, auto&) { d.rejected.weights[2] = std::nanf(""); }, "weight nan", o);
    expect_error([](auto&, auto& b) { b.chosen.weights.data = nullptr; }, "chosen token weights: missing", o);
    expect_error([](auto&, auto& b) { b.rejected.weights.length = 7; }, "rejected token weights: shape (2, 7)", o);
}

TEST_CASE("precomputed reference scores are checked", "[bad-input]") {
    const double scores[2] = {-3.0, -4.0};
    const double bad[2] = {-3.0, std::numeric_limits<double>::quiet_NaN()};
    auto given = [](const double* values, tpo::index_t n) {
        return [values, n](auto&, auto& b) {
            b.rejected.reference = {};
            b.rejected.reference_noisy = {};
            b.rejected.reference_scores = {values, n};
        };
    };
    expect_error(given(scores, 3), "rejected reference scores: 3 values, expected one per sequence (2)");
    expect_error(given(bad, 2), "rejected reference scores: nan at sequence 1 is not finite");
    expect_error([&](auto&, auto& b) { b.chosen.reference_scores = {scores, 2}; },
                 "chosen reference: both logits and precomputed scores given; give one");
    // Without the scores, the reference logits are required as before.
    expect_error([](auto&, auto& b) { b.chosen.reference = {}; }, "chosen reference logits: shape (0, 0, 0)");
}

TEST_CASE("gradient outputs must match their inputs", "[bad-input]") {
    tested_backend backend;
    auto data = good_batch();
    gradient_data<double> g(data);
    auto views = g.views();
    views.rejected.policy_noisy.vocab = 3;
    CHECK_THROWS_WITH(tpo::evaluate(backend, tpo::objective_options{}, data.batch(), &views),
                      Contains("rejected gradient of policy noisy logits: shape (2, 3, 3), expected (2, 3, 5)"));
    tpo::objective<tested_backend> obj(backend, tpo::objective_options{});
    CHECK_THROWS_WITH(obj.backward(data.batch(), g.views()), Contains("forward() must run first"));
}

namespace {

/// Expects an overflow_error mentioning `needle` from a forward and backward into gradients of
/// type G, and the gradient buffers left exactly as they were (no Inf reaches the caller).
template <class G>
void expect_overflow(const batch_data<double>& data, const tpo::objective_options& o, const std::string& needle) {
    tested_backend backend;
    gradient_data<G> g(data);
    for (int k = 0; k < 4; ++k)
        for (G& x : g.tensor(k)) x = G(7.0f);
    auto views = g.views();
    INFO("expected an overflow mentioning: " << needle);
    try {
        tpo::evaluate(backend, o, data.batch(), &views);
        FAIL("no error was raised");
    } catch (const tpo::overflow_error& e) {
        CHECK_THAT(e.what(), Contains(needle));
    }
    for (int k = 0; k < 4; ++k)
        for (G x : g.tensor(k)) CHECK(static_cast<float>(x) == 7.0f);
}

template <class G>
bool all_finite(gradient_data<G>& g) {
    for (int k = 0; k < 4; ++k)
        for (G x : g.tensor(k)) {
            double wide = 0;
            if constexpr (std::is_floating_point_v<G>) wide = x;
            else wide = static_cast<float>(x);
            if (!std::isfinite(wide)) return false;
        }
    return true;
}

}  // namespace

TEST_CASE("a result that overflows is an error naming what overflowed, never a NaN or an Inf", "[bad-input]") {
    SECTION("finite float64 logits near the limit: the token log-probability overflows") {
        auto data = good_batch();
        // Row t = 0 of chosen sequence 0, scored against the label at position 1.
        const std::int64_t label = data.chosen.labels[1];
        for (int v = 0; v < 5; ++v) data.chosen.policy[static_cast<std::size_t>(v)] = v == label ? -1e308 : 1e308;
        expect_overflow<double>(data, {}, "result: chosen policy sequence score of pair 0 is -inf");
    }
    SECTION("beta = 1e-300 with ipo: the loss overflows") {
        tpo::objective_options o;
        o.losses = {{tpo::loss_type::ipo, 1.0}};
        o.hyper.beta = 1e-300;
        expect_overflow<double>(good_batch(), o, "result: loss of pair 0 is inf, expected a finite value: it "
                                                 "overflowed (loss ipo, beta = 1e-300)");
    }
    SECTION("finite coefficients whose gradient overflows float32 or float16 outputs") {
        // ipo's slope is 2u/n with u ≈ −1/(2β): β = 1e-40 gives coefficients near 1e40, finite in
        // double and beyond float's 3.4e38; β = 1e-6 gives ~1e5, beyond float16's 65504.
        tpo::objective_options o;
        o.losses = {{tpo::loss_type::ipo, 1.0}};
        o.hyper.beta = 1e-40;
        tested_backend backend;
        auto wide = evaluate_with_gradients<double>(backend, o, good_batch());
        CHECK(all_finite(wide.gradients));
        expect_overflow<float>(good_batch(), o, "exceed what float32 gradients of float64 logits hold");
        o.hyper.beta = 1e-6;
        auto narrow = evaluate_with_gradients<float>(backend, o, good_batch());
        CHECK(all_finite(narrow.gradients));
        expect_overflow<tpo::float16>(good_batch(), o, "float16 gradients of float64 logits hold");
        expect_overflow<tpo::float16>(good_batch(), o, "gradient of the chosen policy logits at sequence 0");
        // Well inside float16's range the same loss writes finite gradients.
        o.hyper.beta = 1e-3;
        auto half = evaluate_with_gradients<tpo::float16>(backend, o, good_batch());
        CHECK(all_finite(half.gradients));
    }
    SECTION("float logits: beta is held in float while the row is written") {
        tpo::objective_options o;
        o.losses = {{tpo::loss_type::ipo, 1.0}};
        o.hyper.beta = 1e-40;
        tested_backend backend;
        const auto data = convert<float>(good_batch());
        gradient_data<double> g(data);
        auto views = g.views();
        CHECK_THROWS_AS(tpo::evaluate(backend, o, data.batch(), &views), tpo::overflow_error);
        CHECK_THROWS_WITH(tpo::evaluate(backend, o, data.batch(), &views), Contains("float32 logits"));
    }
    SECTION("a failed forward leaves nothing for backward") {
        tpo::objective_options o;
        o.losses = {{tpo::loss_type::ipo, 1.0}};
        o.hyper.beta = 1e-300;
        tested_backend backend;
        const auto data = good_batch();
        tpo::objective<tested_backend> obj(backend, o);
        CHECK_THROWS_AS(obj.forward(data.batch()), tpo::overflow_error);
        gradient_data<double> g(data);
        CHECK_THROWS_WITH(obj.backward(data.batch(), g.views()), Contains("forward() must run first"));
    }
}

TEST_CASE("legitimate edges are not errors", "[bad-input][edge]") {
    tested_backend backend;
    std::mt19937_64 rng(4);
    // V = 1, L = 1 with the shift on, fully masked sequences, both sides of different lengths.
    for (auto [length, vocab, mask] : {std::tuple{1, 1, 0.0}, std::tuple{1, 6, 0.0}, std::tuple{5, 1, 0.0},
                                       std::tuple{4, 6, 1.0}}) {
        auto data = random_batch<double>(rng, 3, length, length + 1, vocab, 2.0, mask);
        gradient_data<double> g(data);
        auto views = g.views();
        const auto r = tpo::evaluate(backend, tpo::objective_options{}, data.batch(), &views);
        CHECK(std::isfinite(r.loss));
        for (int k = 0; k < 4; ++k)
            for (double x : g.tensor(k)) CHECK(std::isfinite(x));
    }
}

TEST_CASE("corruptions reject bad images and settings", "[bad-input][corrupt]") {
    tested_backend backend;
    std::vector<float> a(3 * 4 * 4), b(3 * 4 * 5);
    auto in = tpo::image_view<const float>::chw(a.data(), 3, 4, 4);
    auto wrong = tpo::image_view<float>::chw(b.data(), 3, 4, 5);
    CHECK_THROWS_WITH(tpo::add_diffusion_noise(backend, in, wrong, {}),
                      Contains("diffusion noise: output axis W has extent 5"));
    CHECK_THROWS_WITH(tpo::image_view<float>::chw(a.data(), 0, 4, 4), Contains("extent of axis C is 0"));
    CHECK_THROWS_WITH(tpo::image_view<float>::strided(a.data(), {1, 3, 4, 4}, {48, 16, 4, 2}),
                      Contains("stride of axis W is 2, expected 1"));
    auto out = tpo::image_view<float>::chw(b.data(), 3, 4, 4);
    tpo::diffusion_options d;
    d.step = 1000;
    CHECK_THROWS_WITH(tpo::add_diffusion_noise(backend, in, out, d), Contains("step k = 1000"));
    tpo::blur_options blur;
    blur.kernel_size = 4;
    CHECK_THROWS_WITH(tpo::gaussian_blur(backend, in, out, blur), Contains("kernel_size = 4"));
    tpo::patch_mask_options mask;
    mask.ratio = 1.5;
    CHECK_THROWS_WITH(tpo::mask_patches(backend, in, out, mask), Contains("ratio = 1.5"));
    tpo::crop_options crop;
    crop.min_area = 0;
    CHECK_THROWS_WITH(tpo::random_resized_crop(backend, in, out, crop), Contains("area range [0"));
}

TEST_CASE("an output scanned for overflow is read to its last value", "[bad-input]") {
    // require_finite_output reads rows of 2^16 values and one shorter row: a non-finite value in
    // the first row, the last whole row or the short row is found, and so is one at the very end.
    tested_backend backend;
    const tpo::objective_options o;
    const auto size = static_cast<std::size_t>(2 * 65536 + 5);
    for (const std::size_t at : {std::size_t{0}, std::size_t{65535}, std::size_t{65536 + 777}, size - 5, size - 1}) {
        for (const double bad : {std::numeric_limits<double>::quiet_NaN(), -std::numeric_limits<double>::infinity()}) {
            std::vector<float> values(size, 1.5f);
            values[at] = static_cast<float>(bad);
            INFO("value " << bad << " at " << at);
            CHECK_THROWS_WITH(tpo::loss::require_finite_output(backend, values.data(), static_cast<tpo::index_t>(size),
                                                               "scanned output", o),
                              Contains("scanned output: a value is not finite"));
        }
    }
    std::vector<tpo::bfloat16> finite(size, tpo::bfloat16(-3.0f));
    CHECK_NOTHROW(tpo::loss::require_finite_output(backend, finite.data(), static_cast<tpo::index_t>(size), "x", o));
    std::vector<double> small(3, 2.0);
    CHECK_NOTHROW(tpo::loss::require_finite_output(backend, small.data(), 3, "x", o));
    small[2] = std::numeric_limits<double>::infinity();
    CHECK_THROWS_WITH(tpo::loss::require_finite_output(backend, small.data(), 3, "x", o), Contains("x: a value is not"));
}
