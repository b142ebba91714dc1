// Hidden states in: the fused lm_head path against the logits path of the oracle fed with the
// logits the test computes itself (z = transform(h·Wᵀ + b)), its gradients against finite
// differences, its properties and its bad inputs, on every backend that can multiply matrices.

#include <catch2/catch.hpp>
#include <rapidcheck/catch.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "support/agreement.hpp"
#include "support/batch.hpp"
#include "support/hidden.hpp"
#include "support/tested_backend.hpp"

namespace {

using tpo::index_t;
using tpo_test::tested_backend;
using namespace tpo_test::hidden;

/// The transform of the options, written out here: z = c·tanh(s·u/c)/τ (or s·u/τ), and dz/du.
struct transform_of {
    double scale, softcap, temperature;
    explicit transform_of(const tpo::objective_options& o)
        : scale(o.logit_scale), softcap(o.logit_softcap.value_or(0.0)), temperature(o.temperature) {}
    double z(double u) const {
        const double x = scale * u;
        return (softcap > 0 ? softcap * std::tanh(x / softcap) : x) / temperature;
    }
    double dz(double u) const {
        const double d = scale / temperature;
        if (softcap <= 0) return d;
        const double t = std::tanh(scale * u / softcap);
        return d * (1 - t * t);
    }
};

/// u = h·Wᵀ + b of every row of a (P, L, H) tensor, in double.
std::vector<double> pre_logits(const std::vector<double>& h, index_t rows, const hidden_data<double>& d,
                               const std::vector<double>& weight, const std::vector<double>& bias) {
    std::vector<double> u(static_cast<std::size_t>(rows * d.vocab));
    for (index_t r = 0; r < rows; ++r)
        for (index_t v = 0; v < d.vocab; ++v) {
            double sum = d.with_bias ? bias[v] : 0.0;
            for (index_t k = 0; k < d.hidden; ++k) sum += h[r * d.hidden + k] * weight[v * d.hidden + k];
            u[r * d.vocab + v] = sum;
        }
    return u;
}

/// The logits batch the fused path must agree with, built from the hidden states in double.
tpo_test::batch_data<double> logits_of(const hidden_data<double>& d, const transform_of& f) {
    tpo_test::batch_data<double> out;
    for (auto [src, dst] : {std::pair{&d.chosen, &out.chosen}, std::pair{&d.rejected, &out.rejected}}) {
        dst->pairs = src->pairs;
        dst->length = src->length;
        dst->vocab = d.vocab;
        for (int k = 0; k < 4; ++k) {
            const bool reference = k >= 2;
            auto u = pre_logits(const_cast<hidden_side<double>*>(src)->tensor(k), src->pairs * src->length, d,
                                reference ? d.reference_weight : d.weight, reference ? d.reference_bias : d.bias);
            for (auto& x : u) x = f.z(x);
            dst->tensor(k) = u;
        }
        dst->labels = src->labels;
        dst->weights = src->weights;
    }
    return out;
}

/// ∂L/∂h, ∂L/∂W and ∂L/∂b from the logits path's ∂L/∂z, chained here through the transform.
struct chained_gradients {
    std::vector<double> hidden[4];  // chosen, chosen noisy, rejected, rejected noisy
    std::vector<double> weight, bias;
};

chained_gradients chain(const hidden_data<double>& d, const transform_of& f, tpo_test::gradient_data<double>& g,
                        bool noisy) {
    chained_gradients c;
    c.weight.assign(d.weight.size(), 0.0);
    c.bias.assign(d.bias.size(), 0.0);
    const hidden_side<double>* sides[2] = {&d.chosen, &d.rejected};
    for (int k = 0; k < 4; ++k) {
        const hidden_side<double>& s = *sides[k / 2];
        const auto& h = const_cast<hidden_side<double>&>(s).tensor(k % 2);
        const index_t rows = s.pairs * s.length;
        c.hidden[k].assign(h.size(), 0.0);
        if (k % 2 == 1 && !noisy) continue;
        const auto u = pre_logits(h, rows, d, d.weight, d.bias);
        const auto& gz = g.tensor(k);
        for (index_t r = 0; r < rows; ++r)
            for (index_t v = 0; v < d.vocab; ++v) {
                const double gu = gz[r * d.vocab + v] * f.dz(u[r * d.vocab + v]);
                for (index_t j = 0; j < d.hidden; ++j) {
                    c.hidden[k][r * d.hidden + j] += gu * d.weight[v * d.hidden + j];
                    c.weight[v * d.hidden + j] += gu * h[r * d.hidden + j];
                }
                c.bias[v] += gu;
            }
    }
    return c;
}

/// The options of tpo_test::option_cases() with every transform the fused path must chain through.
std::vector<std::pair<std::string, tpo::objective_options>> fused_cases() {
    std::vector<std::pair<std::string, tpo::objective_options>> cases;
    int i = 0;
    for (auto [name, o] : tpo_test::option_cases()) {
        switch (i++ % 3) {
        case 0: break;
        case 1:
            o.logit_scale = 0.7;
            o.temperature = 1.3;
            break;
        default:
            o.logit_scale = 1.2;
            o.logit_softcap = 2.5;
            o.temperature = 0.8;
            break;
        }
        cases.emplace_back(name, o);
    }
    tpo::objective_options o;
    o.logit_softcap = 3.0;
    o.chunk_tokens = 2;
    cases.emplace_back("tpo softcap, chunks of two rows", o);
    o = {};
    o.weighting = tpo::token_weighting::none;
    for (auto t : {tpo::loss_type::hinge, tpo::loss_type::ipo, tpo::loss_type::exo_pair, tpo::loss_type::nca_pair,
                   tpo::loss_type::robust, tpo::loss_type::bco_pair, tpo::loss_type::sppo_hard})
        o.losses.push_back({t, 0.3});
    o.hyper.label_smoothing = 0.1;
    o.chunk_tokens = 3;
    cases.emplace_back("dpo, eight losses combined", o);
    o.losses = {{tpo::loss_type::apo_down, 0.5}, {tpo::loss_type::discopop, 0.7}, {tpo::loss_type::sigmoid_norm, 1.1},
                {tpo::loss_type::aot_unpaired, 0.4}};
    o.chunk_tokens = 4;
    cases.emplace_back("dpo, four more losses combined", o);
    return cases;
}

}  // namespace

template <class B>
void fused_agreement() {
    if constexpr (!tpo::head_backend<B>) {
        SUCCEED("this backend has no matrix product: the fused path is not available");
    } else {
        std::mt19937_64 rng(20261204);
        B backend;
        tpo::backend::reference oracle;
        for (const auto& [name, options] : fused_cases()) {
            for (bool with_bias : {true, false}) {
                INFO(name << (with_bias ? ", with bias" : ", no bias"));
                const hidden_data<double> d = random_hidden(rng, 2, 6, 5, 7, 11, with_bias);
                const transform_of f(options);
                tpo::objective_options plain = options;
                plain.logit_scale = 1.0;
                plain.logit_softcap.reset();
                plain.temperature = 1.0;
                const tpo_test::batch_data<double> logits = logits_of(d, f);
                auto expected = tpo_test::evaluate_with_gradients<double>(oracle, plain, logits);
                const bool noisy = options.weighting == tpo::token_weighting::self_calibrated;
                const chained_gradients want = chain(d, f, expected.gradients, noisy);

                hidden_gradient_data<double> got(d);
                auto views = got.views(d, with_bias);
                const tpo::objective_result r = tpo::evaluate(backend, options, d.batch(), &views);

                const double tol = 1e-12;
                const auto& e = expected.result;
                tpo_test::check_close({r.loss, r.reward_accuracy, r.reward_margin},
                                      {e.loss, e.reward_accuracy, e.reward_margin}, tol, "loss, accuracy, margin");
                tpo_test::check_close(r.chosen_rewards, e.chosen_rewards, tol, "chosen rewards");
                tpo_test::check_close(r.rejected_rewards, e.rejected_rewards, tol, "rejected rewards");
                tpo_test::check_close(r.policy_chosen_scores, e.policy_chosen_scores, tol, "policy chosen scores");
                tpo_test::check_close(r.reference_rejected_scores, e.reference_rejected_scores, tol,
                                      "reference rejected scores");
                tpo_test::check_close(r.mean_visual_score_chosen, e.mean_visual_score_chosen, tol, "visual scores");
                for (int k = 0; k < 4; ++k) {
                    INFO("hidden-state gradient " << k);
                    tpo_test::check_close(got.hidden[k], want.hidden[k], tol, "dL/dh");
                }
                tpo_test::check_close(got.weight, want.weight, tol, "dL/dW");
                if (with_bias) tpo_test::check_close(got.bias, want.bias, tol, "dL/db");
            }
        }
    }
}

TEST_CASE("hidden states in agree with the logits they make, fed to the oracle", "[fused]") {
    fused_agreement<tested_backend>();
}

template <class B>
void fused_head_only() {
    if constexpr (!tpo::head_backend<B>) {
        SUCCEED("this backend has no matrix product: the fused path is not available");
    } else {
        // A trainer whose hidden states are constants (only the head trains) asks for the head's
        // gradients alone: the same values as when every gradient is asked for.
        std::mt19937_64 rng(41);
        B backend;
        for (const auto& [name, options] : fused_cases()) {
            INFO(name);
            const hidden_data<double> d = random_hidden(rng, 2, 5, 4, 6, 9, true);
            hidden_gradient_data<double> all(d), head(d);
            const auto all_views = all.views(d, true);
            tpo::hidden_gradients<double> head_views = head.views(d, true);
            head_views.chosen = {};
            head_views.rejected = {};
            tpo::evaluate(backend, options, d.batch(), &all_views);
            tpo::evaluate(backend, options, d.batch(), &head_views);
            CHECK(head.weight == all.weight);
            CHECK(head.bias == all.bias);
        }
    }
}

TEST_CASE("hidden states in: the head's gradients alone", "[fused]") {
    fused_head_only<tested_backend>();
}

/// A backend that counts its logits products: op(A)·op(B) with B transposed, the chunks' h·Wᵀ.
template <class B>
struct counting_backend : B {
    using B::B;
    mutable int logits_products = 0;
    template <class X, class Y, class Acc>
    void matmul(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, const X* a, index_t lda, const Y* b,
                index_t ldb, Acc* c, index_t ldc, Acc beta) const {
        if (!trans_a && trans_b) ++logits_products;
        B::matmul(trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, beta);
    }
};

template <class B>
void fused_kept_chunk() {
    if constexpr (!tpo::head_backend<B>) {
        SUCCEED("this backend has no matrix product: the fused path is not available");
    } else {
        // The forward takes both policies' rows in one pass (a chunk holds rows of both where they
        // meet) and leaves its last chunk of logits in scratch; the backward starts from it. Given
        // the same values in other buffers, the backward cannot know them for the forward's and
        // computes that chunk again: one logits product more, the same bits; so does a backward
        // after release_kept_chunk(). Chunk sizes around both policies' rows: the boundary where
        // the kept chunk holds every row.
        std::mt19937_64 rng(53);
        counting_backend<B> backend;
        for (const auto& [name, base] : fused_cases()) {
            // Two pairs, lengths 6 and 5 (random_hidden below): the scored rows of both policies.
            const index_t both = 2 * (base.alignment.scored_rows(6) + base.alignment.scored_rows(5));
            for (const index_t chunk : {index_t{0}, index_t{3}, both - 1, both}) {
                tpo::objective_options options = base;
                if (chunk > 0) options.chunk_tokens = chunk;
                INFO(name << ", chunk_tokens " << options.chunk_tokens.value_or(0));
                const hidden_data<double> d = random_hidden(rng, 2, 6, 5, 7, 11, true);
                const hidden_data<double> same = d;  // the same values in other buffers
                auto step = [&](const hidden_data<double>& backward_data, hidden_gradient_data<double>& g,
                                bool release) {
                    tpo::objective<counting_backend<B>> obj(backend, options);
                    backend.logits_products = 0;
                    const tpo::objective_result r = obj.forward(d.batch());
                    if (release) obj.release_kept_chunk();
                    obj.backward(backward_data.batch(), g.views(backward_data, true));
                    return std::pair{r.loss, backend.logits_products};
                };
                hidden_gradient_data<double> kept(d), again(same), released(d);
                const auto [loss_kept, products_kept] = step(d, kept, false);
                const auto [loss_again, products_again] = step(same, again, false);
                const auto [loss_released, products_released] = step(d, released, true);
                CHECK(loss_kept == loss_again);
                CHECK(products_kept == products_again - 1);
                CHECK(products_released == products_again);
                for (const auto* g : {&again, &released}) {
                    for (int k = 0; k < 4; ++k) CHECK(kept.hidden[k] == g->hidden[k]);
                    CHECK(kept.weight == g->weight);
                    CHECK(kept.bias == g->bias);
                }
            }
        }
    }
}

TEST_CASE("hidden states in: the backward starts from the forward's last chunk", "[fused]") {
    fused_kept_chunk<tested_backend>();
}

template <class B>
void fused_precision() {
    if constexpr (!tpo::head_backend<B>) {
        SUCCEED("this backend has no matrix product");
    } else {
        std::mt19937_64 rng(77);
        B backend;
        tpo::backend::reference oracle;
        tpo::objective_options options;
        options.logit_softcap = 4.0;
        options.chunk_tokens = 3;
        const hidden_data<double> d = random_hidden(rng, 2, 9, 7, 16, 40);
        hidden_gradient_data<double> exact(d);
        auto exact_views = exact.views(d, true);
        const tpo::objective_result e = tpo::evaluate(oracle, options, d.batch(), &exact_views);

        const hidden_data<float> f = convert<float>(convert<double>(d));
        hidden_gradient_data<float> got(f);
        auto views = got.views(f, true);
        const tpo::objective_result r = tpo::evaluate(backend, options, f.batch(), &views);
        tpo_test::check_close({r.loss}, {e.loss}, 1e-5, "float loss");
        tpo_test::check_close(r.chosen_rewards, e.chosen_rewards, 1e-5, "float chosen rewards");
        for (int k = 0; k < 4; ++k) tpo_test::check_close(as_double(got.hidden[k]), exact.hidden[k], 1e-5, "float dL/dh");
        tpo_test::check_close(as_double(got.weight), exact.weight, 1e-5, "float dL/dW");
        tpo_test::check_close(as_double(got.bias), exact.bias, 1e-5, "float dL/db");

        // bf16 inputs: the oracle on the same rounded inputs, in double; gradients written in bf16.
        // With the soft-cap (its chain rule on a float ∂L/∂u) and with a linear transform, where a
        // backend whose products round ∂L/∂u to bf16 has the gradient rows written in bf16
        // (rounds_gradient_to).
        const hidden_data<tpo::bfloat16> h = convert<tpo::bfloat16>(d);
        const hidden_data<double> rounded = convert<double>(h);
        tpo::objective_options linear = options;
        linear.logit_softcap.reset();
        linear.logit_scale = 1.5;
        linear.temperature = 0.8;
        for (const tpo::objective_options& o : {options, linear}) {
            INFO("soft-cap " << o.logit_softcap.has_value());
            hidden_gradient_data<double> exact16(rounded);
            auto exact16_views = exact16.views(rounded, true);
            const tpo::objective_result e16 = tpo::evaluate(oracle, o, rounded.batch(), &exact16_views);
            hidden_gradient_data<tpo::bfloat16> got16(h);
            auto views16 = got16.views(h, true);
            const tpo::objective_result r16 = tpo::evaluate(backend, o, h.batch(), &views16);
            tpo_test::check_close({r16.loss}, {e16.loss}, 1e-5, "bf16 loss");
            tpo_test::check_close(as_double(got16.weight), exact16.weight, 1.0 / 128, "bf16 dL/dW");
            tpo_test::check_close(as_double(got16.bias), exact16.bias, 1.0 / 128, "bf16 dL/db");
            for (int k = 0; k < 4; ++k)
                tpo_test::check_close(as_double(got16.hidden[k]), exact16.hidden[k], 1.0 / 128, "bf16 dL/dh");
        }
    }
}

TEST_CASE("hidden states in: float and bf16 agree with the double oracle", "[fused]") {
    fused_precision<tested_backend>();
}

template <class B>
void fused_finite_differences() {
    if constexpr (!tpo::head_backend<B>) {
        SUCCEED("this backend has no matrix product");
    } else {
        std::mt19937_64 rng(5);
        B backend;
        std::vector<tpo::objective_options> cases(3);
        cases[0].logit_softcap = 2.0;
        cases[0].logit_scale = 1.3;
        cases[0].temperature = 0.9;
        cases[1].score = tpo::score_kind::logprob;
        cases[1].ld_alpha = 0.5;  // (WPO's pair weight is a constant of the gradient: not for differences)
        cases[1].chunk_tokens = 2;
        cases[2].weighting = tpo::token_weighting::none;
        cases[2].losses = {{tpo::loss_type::ipo, 1.0}, {tpo::loss_type::sft, 0.5}};
        for (std::size_t c = 0; c < cases.size(); ++c) {
            INFO("case " << c);
            const tpo::objective_options& options = cases[c];
            hidden_data<double> d = random_hidden(rng, 2, 4, 3, 3, 6);
            hidden_gradient_data<double> g(d);
            auto views = g.views(d, true);
            tpo::evaluate(backend, options, d.batch(), &views);
            const bool noisy = options.weighting == tpo::token_weighting::self_calibrated;
            auto loss = [&] { return tpo::evaluate(backend, options, d.batch()).loss; };
            auto check = [&](std::vector<double>& x, const std::vector<double>& analytic, const char* what) {
                for (std::size_t i = 0; i < x.size(); ++i) {
                    const double eps = 1e-6, saved = x[i];
                    x[i] = saved + eps;
                    const double up = loss();
                    x[i] = saved - eps;
                    const double down = loss();
                    x[i] = saved;
                    const double numeric = (up - down) / (2 * eps);
                    INFO(what << "[" << i << "]: analytic " << analytic[i] << ", numeric " << numeric);
                    CHECK(std::abs(analytic[i] - numeric) <= 1e-6 + 1e-5 * std::abs(numeric));
                }
            };
            check(d.chosen.policy, g.hidden[0], "dL/dh chosen");
            check(d.rejected.policy, g.hidden[2], "dL/dh rejected");
            if (noisy) check(d.chosen.policy_noisy, g.hidden[1], "dL/dh chosen noisy");
            check(d.weight, g.weight, "dL/dW");
            check(d.bias, g.bias, "dL/db");
        }
    }
}

TEST_CASE("hidden-state gradients match finite differences", "[fused][fd]") {
    fused_finite_differences<tested_backend>();
}

template <class B>
void fused_properties() {
    if constexpr (!tpo::head_backend<B>) {
        SUCCEED("this backend has no matrix product");
    } else {
        rc::prop("any chunk size gives the same result; the policy as its own reference gives ln 2", [] {
            const auto pairs = *rc::gen::inRange<index_t>(1, 3);
            const auto length = *rc::gen::inRange<index_t>(1, 6);
            const auto hidden = *rc::gen::inRange<index_t>(1, 5);
            const auto vocab = *rc::gen::inRange<index_t>(1, 9);
            const auto chunk = *rc::gen::inRange<index_t>(1, 7);
            const auto seed = *rc::gen::inRange<std::uint64_t>(0, 1000000);
            std::mt19937_64 rng(seed);
            hidden_data<double> d = random_hidden(rng, pairs, length, length, hidden, vocab, true, 0.4);
            B backend;
            tpo::objective_options options;
            options.logit_softcap = 3.0;
            hidden_gradient_data<double> whole(d), chunked(d);
            auto v1 = whole.views(d, true);
            auto v2 = chunked.views(d, true);
            const auto a = tpo::evaluate(backend, options, d.batch(), &v1);
            options.chunk_tokens = chunk;
            const auto b = tpo::evaluate(backend, options, d.batch(), &v2);
            RC_ASSERT(std::isfinite(a.loss));
            RC_ASSERT(std::abs(a.loss - b.loss) <= 1e-12 * std::max(1.0, std::abs(a.loss)));
            for (std::size_t i = 0; i < whole.weight.size(); ++i)
                RC_ASSERT(std::abs(whole.weight[i] - chunked.weight[i]) <= 1e-12 * std::max(1.0, std::abs(whole.weight[i])));
            // The reference is the policy (same states, same head): every h is 0, the loss ln 2.
            d.reference_weight = d.weight;
            d.reference_bias = d.bias;
            for (auto* s : {&d.chosen, &d.rejected}) {
                s->reference = s->policy;
                s->reference_noisy = s->policy_noisy;
            }
            const auto same = tpo::evaluate(backend, options, d.batch());
            RC_ASSERT(same.loss == std::log(2.0));
        });
    }
}

TEST_CASE("hidden states in: properties", "[fused][property]") {
    fused_properties<tested_backend>();
}

template <class B>
void fused_bad_input() {
    if constexpr (!tpo::head_backend<B>) {
        SUCCEED("this backend has no matrix product");
    } else {
        std::mt19937_64 rng(9);
        B backend;
        const hidden_data<double> good = random_hidden(rng, 2, 4, 3, 5, 7);
        tpo::objective_options options;
        auto fails = [&](const hidden_data<double>& d, const tpo::objective_options& o, const char* needle) {
            hidden_gradient_data<double> g(d);
            auto views = g.views(d, d.with_bias);
            REQUIRE_THROWS_WITH(tpo::evaluate(backend, o, d.batch(), &views), Catch::Contains(needle));
        };
        hidden_data<double> d = good;
        d.chosen.hidden = 4;  // hidden states of H = 4 against a head of H = 5
        fails(d, options, "differs from the lm_head's H = 5");
        d = good;
        d.chosen.labels[1] = 0;  // row 0 is scored
        d.chosen.policy[3] = std::nan("");
        fails(d, options, "hidden state holds a NaN");
        d = good;
        d.weight[2 * 5 + 1] = INFINITY;
        fails(d, options, "lm_head: row 2 of the weight");
        d = good;
        d.bias[6] = std::nan("");
        fails(d, options, "lm_head: entry 6 of the bias");
        d = good;
        d.chosen.labels[1] = 7;
        fails(d, options, "label 7");
        for (auto [field, value, needle] : {std::tuple{0, 0.0, "temperature"}, std::tuple{0, -1.0, "temperature"},
                                            std::tuple{1, 0.0, "logit_softcap"}, std::tuple{1, -2.0, "logit_softcap"},
                                            std::tuple{2, 0.0, "chunk_tokens"}}) {
            tpo::objective_options o;
            if (field == 0) o.temperature = value;
            if (field == 1) o.logit_softcap = value;
            if (field == 2) o.chunk_tokens = static_cast<index_t>(value);
            fails(good, o, needle);
        }
        // A bias gradient asked of a head without bias.
        d = good;
        d.with_bias = false;
        hidden_gradient_data<double> g(d);
        auto views = g.views(d, true);
        REQUIRE_THROWS_WITH(tpo::evaluate(backend, options, d.batch(), &views), Catch::Contains("has no bias"));
    }
}

TEST_CASE("hidden states in: bad input is a clear error", "[fused][bad-input]") {
    fused_bad_input<tested_backend>();
}

template <class B>
void fused_overflow() {
    if constexpr (!tpo::head_backend<B>) {
        SUCCEED("this backend has no fused lm_head path");
    } else {
        // Hidden states of 1e308 against a head of 1e-300: finite logits of order 1e8 and, with the
        // reference equal to the policy, a loss of ln 2 whose coefficients are small; but the head's
        // gradient sums coefficient × hidden state, 1e308 times a few units: beyond float64.
        B backend;
        std::mt19937_64 rng(181);
        hidden_data<double> d = random_hidden(rng, 2, 4, 3, 2, 5, true, 0.0);
        for (double& w : d.weight) w *= 1e-300;
        d.reference_weight = d.weight;
        d.reference_bias = d.bias;
        for (auto* s : {&d.chosen, &d.rejected}) {
            for (double& x : s->policy) x = x > 0 ? 1e308 : -1e308;
            s->reference = s->policy;
        }
        tpo::objective_options o;
        o.weighting = tpo::token_weighting::none;
        o.hyper.beta = 10;
        hidden_gradient_data<double> g(d);
        auto views = g.views(d, true);
        REQUIRE_THROWS_AS(tpo::evaluate(backend, o, d.batch(), &views), tpo::overflow_error);
        REQUIRE_THROWS_WITH(tpo::evaluate(backend, o, d.batch(), &views),
                            Catch::Contains("gradient of the lm_head weight: a value is not finite: it overflowed"));
        // Without the head's gradient the hidden states' gradients are finite and reported.
        views.head_weight = nullptr;
        views.head_bias = nullptr;
        CHECK_NOTHROW(tpo::evaluate(backend, o, d.batch(), &views));
    }
}

TEST_CASE("hidden states in: a gradient that overflows is an error, not an Inf", "[fused][bad-input]") {
    fused_overflow<tested_backend>();
}

TEST_CASE("logits inputs under a logit transform: the transformed logits' results, chained gradients",
          "[transform]") {
    std::mt19937_64 rng(606);
    tested_backend backend;
    for (int with_softcap = 0; with_softcap < 2; ++with_softcap) {
        tpo::objective_options options;
        options.logit_scale = 1.3;
        options.temperature = 0.7;
        if (with_softcap) options.logit_softcap = 2.5;
        const transform_of f(options);
        const tpo_test::batch_data<double> u = tpo_test::random_batch<double>(rng, 2, 6, 4, 9);
        tpo_test::batch_data<double> z = u;
        for (auto* side : {&z.chosen, &z.rejected})
            for (int k = 0; k < 4; ++k)
                for (double& x : side->tensor(k)) x = f.z(x);
        tpo::objective_options plain;
        auto expected = tpo_test::evaluate_with_gradients<double>(backend, plain, z);
        auto got = tpo_test::evaluate_with_gradients<double>(backend, options, u);
        INFO("soft-cap " << with_softcap);
        tpo_test::check_close({got.result.loss}, {expected.result.loss}, 1e-13, "loss");
        tpo_test::check_close(got.result.chosen_rewards, expected.result.chosen_rewards, 1e-13, "chosen rewards");
        const tpo_test::side_data<double>* sides[2] = {&u.chosen, &u.rejected};
        for (int k = 0; k < 4; ++k) {
            const auto& raw = const_cast<tpo_test::side_data<double>*>(sides[k / 2])->tensor(k % 2);
            std::vector<double> chained = expected.gradients.tensor(k);
            for (std::size_t i = 0; i < chained.size(); ++i) chained[i] *= f.dz(raw[i]);
            tpo_test::check_close(got.gradients.tensor(k), chained, 1e-12, "dL/du");
        }
    }
}
