// Property-based tests (RapidCheck): invariances, symmetries and limits of the objective that
// hold for every input, on the tested backend.

#include <catch2/catch.hpp>
#include <rapidcheck/catch.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <utility>

#include "support/batch.hpp"
#include "support/tested_backend.hpp"

using namespace tpo_test;

namespace {

struct random_case {
    index_t pairs, length_chosen, length_rejected, vocab;
    std::uint64_t seed;
    double mask_rate;
};

rc::Gen<random_case> gen_case() {
    return rc::gen::build<random_case>(
        rc::gen::set(&random_case::pairs, rc::gen::inRange<index_t>(1, 5)),
        rc::gen::set(&random_case::length_chosen, rc::gen::inRange<index_t>(1, 7)),
        rc::gen::set(&random_case::length_rejected, rc::gen::inRange<index_t>(1, 7)),
        rc::gen::set(&random_case::vocab, rc::gen::inRange<index_t>(1, 40)),
        rc::gen::set(&random_case::seed, rc::gen::arbitrary<std::uint64_t>()),
        rc::gen::set(&random_case::mask_rate, rc::gen::element(0.0, 0.3, 1.0)));
}

batch_data<double> make(const random_case& c, double scale = 2.0) {
    std::mt19937_64 rng(c.seed);
    return random_batch<double>(rng, c.pairs, c.length_chosen, c.length_rejected, c.vocab, scale, c.mask_rate);
}

tpo::objective_options gen_options() {
    tpo::objective_options o;
    o.score = *rc::gen::element(tpo::score_kind::logit, tpo::score_kind::prob, tpo::score_kind::logprob);
    o.form = *rc::gen::element(tpo::sequence_form::additive, tpo::sequence_form::multiplicative);
    o.average = *rc::gen::arbitrary<bool>();
    o.detach_weights = *rc::gen::arbitrary<bool>();
    o.alignment.shift = *rc::gen::arbitrary<bool>();
    o.a = *rc::gen::element(0.0, 0.5, 1.0);
    return o;
}

bool close(double a, double b, double tol = 1e-10) { return std::abs(a - b) <= tol * std::max(1.0, std::abs(b)); }

}  // namespace

TEST_CASE("swapping chosen and rejected maps h to −h", "[property]") {
    rc::prop("DPO, caller weights, and TPO with symmetric weights", [] {
        const random_case c = *gen_case();
        auto data = make(c);
        RC_PRE(c.length_chosen == c.length_rejected);
        tpo::objective_options o = gen_options();
        o.weighting = *rc::gen::element(tpo::token_weighting::none, tpo::token_weighting::caller,
                                        tpo::token_weighting::self_calibrated);
        if (o.weighting == tpo::token_weighting::self_calibrated) {
            // s = 0 everywhere: chosen and rejected calibration then agree (c = 0.5 + a).
            for (auto* side : {&data.chosen, &data.rejected}) {
                side->policy_noisy = side->policy;
                side->reference_noisy = side->reference;
            }
        }
        tested_backend backend;
        const auto forward = tpo::evaluate(backend, o, data.batch());
        batch_data<double> swapped{data.rejected, data.chosen};
        const auto backward = tpo::evaluate(backend, o, swapped.batch());
        for (std::size_t i = 0; i < forward.losses.size(); ++i) {
            const double h = forward.chosen_rewards[i] - forward.rejected_rewards[i];
            const double h_swapped = backward.chosen_rewards[i] - backward.rejected_rewards[i];
            RC_ASSERT(close(h_swapped, -h));
        }
    });
}

TEST_CASE("noisy logits equal to clean ones: weights 0.5 + a, TPO = DPO plus a constant", "[property]") {
    rc::prop("additive TPO reduces to DPO", [] {
        const random_case c = *gen_case();
        auto data = make(c);
        for (auto* side : {&data.chosen, &data.rejected}) {
            side->policy_noisy = side->policy;
            side->reference_noisy = side->reference;
        }
        tpo::objective_options tpo_options;
        tpo_options.score = *rc::gen::element(tpo::score_kind::logit, tpo::score_kind::prob, tpo::score_kind::logprob);
        tpo_options.a = *rc::gen::element(0.0, 0.25, 0.5, 1.0);
        tpo_options.alignment.shift = *rc::gen::arbitrary<bool>();
        tpo::objective_options dpo = tpo_options;
        dpo.weighting = tpo::token_weighting::none;
        tested_backend backend;
        const auto t = tpo::evaluate(backend, tpo_options, data.batch());
        const auto d = tpo::evaluate(backend, dpo, data.batch());
        const double log_weight = std::log(0.5 + tpo_options.a);
        for (std::size_t i = 0; i < t.losses.size(); ++i) {
            RC_ASSERT(close(t.policy_chosen_scores[i], d.policy_chosen_scores[i] + t.chosen_tokens[i] * log_weight));
            RC_ASSERT(close(t.policy_rejected_scores[i],
                            d.policy_rejected_scores[i] + t.rejected_tokens[i] * log_weight));
            RC_ASSERT(t.mean_visual_score_chosen[i] == 0.0);
        }
        RC_ASSERT(close(t.loss, d.loss));
    });
}

TEST_CASE("prob and logprob scores are invariant to adding a constant to a logits row", "[property]") {
    rc::prop("row shift invariance", [] {
        const random_case c = *gen_case();
        auto data = make(c);
        tpo::objective_options o = gen_options();
        o.score = *rc::gen::element(tpo::score_kind::prob, tpo::score_kind::logprob);
        tested_backend backend;
        const auto before = tpo::evaluate(backend, o, data.batch());
        std::mt19937_64 rng(c.seed ^ 0x5eed);
        std::uniform_real_distribution<double> shift(-50, 50);
        for (auto* side : {&data.chosen, &data.rejected})
            for (int k = 0; k < 4; ++k) {
                auto& z = side->tensor(k);
                for (std::size_t row = 0; row < z.size() / side->vocab; ++row) {
                    const double add = shift(rng);
                    for (index_t v = 0; v < side->vocab; ++v) z[row * side->vocab + v] += add;
                }
            }
        const auto after = tpo::evaluate(backend, o, data.batch());
        RC_ASSERT(close(after.loss, before.loss, 1e-9));
        for (std::size_t i = 0; i < before.losses.size(); ++i) {
            RC_ASSERT(close(after.mean_visual_score_chosen[i], before.mean_visual_score_chosen[i], 1e-9));
            RC_ASSERT(close(after.mean_visual_score_rejected[i], before.mean_visual_score_rejected[i], 1e-9));
        }
    });
}

TEST_CASE("each gradient row sums to what docs/math.md predicts", "[property][gradient]") {
    // ∂L/∂z[v] = alpha·δ − beta·p[v] sums to alpha − beta. The loss is unchanged by a constant added
    // to a clean row (logprob/prob/DPO: ℓ and s are softmax-based) or, for the logit score, to the
    // clean and noisy rows together (s = z_y − z̃_y keeps): so those sums are 0.
    rc::prop("row sums", [] {
        const random_case c = *gen_case();
        auto data = make(c);
        tpo::objective_options o = gen_options();
        o.losses = {{*rc::gen::element(tpo::loss_type::sigmoid, tpo::loss_type::ipo, tpo::loss_type::sft,
                                       tpo::loss_type::bco_pair),
                     1.0}};
        tested_backend backend;
        gradient_data<double> g(data);
        auto views = g.views();
        tpo::evaluate(backend, o, data.batch(), &views);
        for (int side = 0; side < 2; ++side) {
            const auto& clean = g.tensor(2 * side);
            const auto& noisy = g.tensor(2 * side + 1);
            const index_t vocab = data.chosen.vocab;
            for (std::size_t row = 0; row < clean.size() / vocab; ++row) {
                double clean_sum = 0, noisy_sum = 0, scale = 0;
                for (index_t v = 0; v < vocab; ++v) {
                    clean_sum += clean[row * vocab + v];
                    noisy_sum += noisy[row * vocab + v];
                    scale = std::max({scale, std::abs(clean[row * vocab + v]), std::abs(noisy[row * vocab + v])});
                }
                const double tol = 1e-12 * std::max(scale, 1e-300) * vocab;
                if (o.score == tpo::score_kind::logit) {
                    RC_ASSERT(std::abs(clean_sum + noisy_sum) <= tol);
                } else {
                    RC_ASSERT(std::abs(clean_sum) <= tol);
                    RC_ASSERT(std::abs(noisy_sum) <= tol);
                }
            }
        }
    });
}

TEST_CASE("logits up to ±1e4 give a finite loss and gradients without NaN", "[property][edge]") {
    rc::prop("extreme logits", [] {
        const random_case c = *gen_case();
        auto data = make(c, 1.0);
        std::mt19937_64 rng(c.seed);
        std::uniform_real_distribution<double> extreme(-1e4, 1e4);
        for (auto* side : {&data.chosen, &data.rejected})
            for (int k = 0; k < 4; ++k)
                for (auto& x : side->tensor(k)) x = extreme(rng);
        tpo::objective_options o = gen_options();
        o.losses = {{*rc::gen::elementOf(std::vector<tpo::loss_type>(std::begin(tpo::all_loss_types),
                                                                     std::end(tpo::all_loss_types))),
                     1.0}};
        if (o.losses[0].type == tpo::loss_type::exo_pair) o.hyper.label_smoothing = 0.01;
        if (tpo::takes_f_divergence(o.losses[0].type))
            o.hyper.divergence = *rc::gen::element(tpo::f_divergence::reverse_kl, tpo::f_divergence::forward_kl,
                                                   tpo::f_divergence::js_divergence,
                                                   tpo::f_divergence::alpha_divergence);
        tested_backend backend;
        gradient_data<double> g(data);
        auto views = g.views();
        const auto r = tpo::evaluate(backend, o, data.batch(), &views);
        RC_ASSERT(std::isfinite(r.loss));
        for (int k = 0; k < 4; ++k)
            for (double x : g.tensor(k)) RC_ASSERT(!std::isnan(x));
    });
}

TEST_CASE("results do not depend on the batch order", "[property]") {
    rc::prop("permuting pairs permutes the per-pair results", [] {
        const random_case c = *gen_case();
        const auto data = make(c);
        tpo::objective_options o = gen_options();
        o.losses = {{*rc::gen::element(tpo::loss_type::sigmoid, tpo::loss_type::aot, tpo::loss_type::aot_unpaired,
                                       tpo::loss_type::sft, tpo::loss_type::ipo),
                     1.0}};
        std::vector<index_t> order(static_cast<std::size_t>(c.pairs));
        std::iota(order.begin(), order.end(), 0);
        std::mt19937_64 rng(c.seed);
        std::shuffle(order.begin(), order.end(), rng);
        auto permute = [&](const side_data<double>& s) {
            side_data<double> out = s;
            const std::size_t row = static_cast<std::size_t>(s.length * s.vocab), lab = static_cast<std::size_t>(s.length);
            for (std::size_t i = 0; i < order.size(); ++i) {
                const auto from = static_cast<std::size_t>(order[i]);
                for (int k = 0; k < 4; ++k)
                    std::copy_n(const_cast<side_data<double>&>(s).tensor(k).begin() + from * row, row,
                                out.tensor(k).begin() + i * row);
                std::copy_n(s.labels.begin() + from * lab, lab, out.labels.begin() + i * lab);
                std::copy_n(s.weights.begin() + from * lab, lab, out.weights.begin() + i * lab);
            }
            return out;
        };
        const batch_data<double> shuffled{permute(data.chosen), permute(data.rejected)};
        tested_backend backend;
        const auto a = tpo::evaluate(backend, o, data.batch());
        const auto b = tpo::evaluate(backend, o, shuffled.batch());
        RC_ASSERT(close(a.loss, b.loss));
        for (std::size_t i = 0; i < order.size(); ++i) {
            RC_ASSERT(close(b.chosen_rewards[i], a.chosen_rewards[order[i]]));
            RC_ASSERT(close(b.policy_rejected_scores[i], a.policy_rejected_scores[order[i]]));
        }
    });
}

TEST_CASE("precomputed reference scores change no bit of a result", "[property]") {
    rc::prop("a batch with the reference logits and one with the A_ref a forward reported agree exactly", [] {
        const random_case c = *gen_case();
        const auto data = make(c);
        tpo::objective_options o = gen_options();
        o.ld_alpha = *rc::gen::element(std::optional<double>{}, std::optional<double>{0.5});
        o.use_weighting = *rc::gen::arbitrary<bool>();
        tested_backend backend;
        auto [a, g_logits] = evaluate_with_gradients(backend, o, data);
        auto scores = [](const std::vector<double>& v) {
            return tpo::sequence_values_view<const double>{v.data(), static_cast<index_t>(v.size())};
        };
        const auto batch =
            with_reference_scores(data.batch(), scores(a.reference_chosen_scores), scores(a.reference_rejected_scores));
        auto [b, g_scores] = evaluate_with_gradients(backend, o, data, batch);
        RC_ASSERT(a.loss == b.loss);
        RC_ASSERT(a.losses == b.losses);
        RC_ASSERT(a.chosen_rewards == b.chosen_rewards);
        RC_ASSERT(a.rejected_rewards == b.rejected_rewards);
        RC_ASSERT(a.reference_chosen_scores == b.reference_chosen_scores);
        RC_ASSERT(a.mean_visual_score_chosen == b.mean_visual_score_chosen);
        RC_ASSERT(a.grad_policy_chosen_scores == b.grad_policy_chosen_scores);
        for (int k = 0; k < 4; ++k) RC_ASSERT(g_logits.tensor(k) == g_scores.tensor(k));
    });
}

TEST_CASE("reading the noisy logits at the label only changes no bit of a result", "[property]") {
    rc::prop("check_unused_logits on and off agree exactly on finite inputs", [] {
        const random_case c = *gen_case();
        const auto data = make(c, *rc::gen::element(1.0, 30.0));
        tpo::objective_options strict = gen_options();
        tpo::objective_options lean = strict;
        lean.check_unused_logits = false;
        tested_backend backend;
        auto [a, gs] = evaluate_with_gradients(backend, strict, data);
        auto [b, gl] = evaluate_with_gradients(backend, lean, data);
        RC_ASSERT(a.loss == b.loss);
        RC_ASSERT(a.losses == b.losses);
        RC_ASSERT(a.mean_visual_score_chosen == b.mean_visual_score_chosen);
        RC_ASSERT(a.mean_visual_score_rejected == b.mean_visual_score_rejected);
        for (int k = 0; k < 4; ++k) RC_ASSERT(gs.tensor(k) == gl.tensor(k));
    });
}

TEST_CASE("policy logits equal to the reference's give f(0) = 0 under every f-divergence", "[property]") {
    // Δ_w = Δ_l = 0 exactly (the policy and the reference go through the same arithmetic), and every
    // f-divergence score vanishes at 0 with its constant: ipo is (1/(2β))² and sigmoid_norm ln 2 for
    // any pair of lengths, which a score without its constant (f(0) ≠ 0) would break as soon as the
    // chosen and rejected token counts differ.
    rc::prop("ipo, sigmoid_norm, sigmoid and hinge at initialisation", [] {
        const random_case c = *gen_case();
        auto data = make(c);
        for (auto* side : {&data.chosen, &data.rejected}) {
            side->reference = side->policy;
            side->reference_noisy = side->policy_noisy;
        }
        tpo::objective_options o = gen_options();
        o.weighting = *rc::gen::element(tpo::token_weighting::self_calibrated, tpo::token_weighting::none);
        o.hyper.beta = *rc::gen::element(0.05, 0.1, 0.5);
        o.hyper.divergence = *rc::gen::element(tpo::f_divergence::reverse_kl, tpo::f_divergence::forward_kl,
                                               tpo::f_divergence::js_divergence, tpo::f_divergence::alpha_divergence);
        o.hyper.f_alpha_divergence_coef = *rc::gen::element(0.3, 0.5, 2.0);
        const double beta = o.hyper.beta;
        const std::pair<tpo::loss_type, double> expected[] = {{tpo::loss_type::ipo, 1.0 / (4 * beta * beta)},
                                                              {tpo::loss_type::sigmoid_norm, std::log(2.0)},
                                                              {tpo::loss_type::sigmoid, std::log(2.0)},
                                                              {tpo::loss_type::hinge, 1.0}};
        tested_backend backend;
        for (const auto& [type, value] : expected) {
            o.losses = {{type, 1.0}};
            const auto r = tpo::evaluate(backend, o, data.batch());
            for (double loss : r.losses) RC_ASSERT(close(loss, value, 1e-13));
        }
    });
}

TEST_CASE("a combined loss is the weighted sum of its terms, for any number of terms", "[property]") {
    rc::prop("loss, per-pair losses and gradients add up over 1 to 24 terms, repeats allowed", [] {
        const random_case c = *gen_case();
        const auto data = make(c);
        tpo::objective_options o = gen_options();
        o.hyper.label_smoothing = 0.1;  // valid for every loss type
        const auto count = *rc::gen::inRange<std::size_t>(1, 25);
        const std::vector<tpo::loss_type> types(std::begin(tpo::all_loss_types), std::end(tpo::all_loss_types));
        bool batch_sorting = false, f_everywhere = true;
        for (std::size_t k = 0; k < count; ++k) {
            const tpo::loss_type t = *rc::gen::elementOf(types);
            o.losses.push_back({t, *rc::gen::element(0.0, 0.25, 0.5, 1.0, 3.0)});
            batch_sorting = batch_sorting || t == tpo::loss_type::aot || t == tpo::loss_type::aot_unpaired;
            f_everywhere = f_everywhere && tpo::takes_f_divergence(t);
        }
        o.losses.erase(o.losses.begin());  // the default sigmoid term
        if (!batch_sorting) o.use_weighting = *rc::gen::arbitrary<bool>();
        if (f_everywhere)
            o.hyper.divergence = *rc::gen::element(tpo::f_divergence::reverse_kl, tpo::f_divergence::forward_kl,
                                                   tpo::f_divergence::js_divergence);
        tested_backend backend;
        auto [all, g_all] = evaluate_with_gradients(backend, o, data);
        double loss = 0;
        std::vector<double> losses(all.losses.size(), 0.0);
        std::vector<std::vector<double>> grads(4);
        for (int k = 0; k < 4; ++k) grads[k].assign(g_all.tensor(k).size(), 0.0);
        for (const tpo::loss_term& term : o.losses) {
            tpo::objective_options single = o;
            single.losses = {{term.type, 1.0}};
            auto [r, g] = evaluate_with_gradients(backend, single, data);
            loss += term.weight * r.loss;
            for (std::size_t i = 0; i < losses.size(); ++i) losses[i] += term.weight * r.losses[i];
            for (int k = 0; k < 4; ++k)
                for (std::size_t i = 0; i < grads[k].size(); ++i) grads[k][i] += term.weight * g.tensor(k)[i];
        }
        RC_ASSERT(close(all.loss, loss, 1e-10));
        for (std::size_t i = 0; i < losses.size(); ++i) RC_ASSERT(close(all.losses[i], losses[i], 1e-10));
        for (int k = 0; k < 4; ++k) {
            double scale = 0;
            for (double x : grads[k]) scale = std::max(scale, std::abs(x));
            for (std::size_t i = 0; i < grads[k].size(); ++i)
                RC_ASSERT(std::abs(g_all.tensor(k)[i] - grads[k][i]) <= 1e-10 * std::max(scale, 1e-300));
        }
    });
}

TEST_CASE("WPO multiplies every term of a pair by one uncapped weight, sft included", "[property]") {
    rc::prop("per-pair loss ratios with and without WPO agree across loss types, and exceed 1 on-policy", [] {
        const random_case c = *gen_case();
        auto data = make(c);
        const bool on_policy = *rc::gen::arbitrary<bool>();
        tpo::objective_options o = gen_options();
        if (on_policy) {
            label_the_likeliest(data.chosen, o.alignment.shift);
            label_the_likeliest(data.rejected, o.alignment.shift);
        }
        o.hyper.label_smoothing = 0.1;
        const std::vector<tpo::loss_type> types = {tpo::loss_type::sft, tpo::loss_type::sigmoid,
                                                   tpo::loss_type::ipo, tpo::loss_type::bco_pair,
                                                   tpo::loss_type::apo_zero, tpo::loss_type::exo_pair};
        tested_backend backend;
        std::vector<double> ratio;  // of the first type whose per-pair losses are not 0
        for (int k = 0; k < 3; ++k) {
            o.losses = {{*rc::gen::elementOf(types), 1.0}};
            o.use_weighting = false;
            const auto plain = tpo::evaluate(backend, o, data.batch());
            o.use_weighting = true;
            const auto weighted = tpo::evaluate(backend, o, data.batch());
            for (std::size_t i = 0; i < plain.losses.size(); ++i) {
                if (std::abs(plain.losses[i]) < 1e-200) {
                    RC_ASSERT(weighted.losses[i] == 0.0);
                    continue;
                }
                const double r = weighted.losses[i] / plain.losses[i];
                if (ratio.size() <= i) ratio.resize(i + 1, 0.0);
                if (ratio[i] == 0.0) ratio[i] = r;
                RC_ASSERT(close(r, ratio[i], 1e-12));
                // With no valid token a side weighs 1; on-policy labels weigh more than 1 (p_y > Σ p²).
                if (on_policy && c.vocab > 1 && plain.chosen_tokens[i] + plain.rejected_tokens[i] > 0)
                    RC_ASSERT(r > 1.0);
                if (o.losses[0].type != tpo::loss_type::sft)
                    RC_ASSERT(close(weighted.grad_policy_chosen_scores[i], r * plain.grad_policy_chosen_scores[i],
                                    1e-12));
            }
        }
    });
}
