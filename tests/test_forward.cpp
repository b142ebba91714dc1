// The forward against an independent plain implementation of docs/formulas.md (support/naive.hpp):
// every loss type, score, form, modifier and weighting, on the tested backend.

#include <catch2/catch.hpp>

#include <cmath>

#include "support/naive.hpp"
#include "support/tested_backend.hpp"

using namespace tpo_test;

namespace {

void check_against_naive(const tpo::objective_options& o, const batch_data<double>& data, const std::string& what) {
    tested_backend backend;
    const auto ours = tpo::evaluate(backend, o, data.batch());
    const auto theirs = naive::evaluate(data, o);
    INFO(what);
    CHECK(ours.loss == Approx(theirs.loss).epsilon(1e-10).margin(1e-12));
    REQUIRE(ours.losses.size() == theirs.losses.size());
    for (std::size_t i = 0; i < ours.losses.size(); ++i) {
        CHECK(ours.losses[i] == Approx(theirs.losses[i]).epsilon(1e-10).margin(1e-12));
        CHECK(ours.chosen_rewards[i] == Approx(theirs.chosen_rewards[i]).epsilon(1e-10).margin(1e-12));
        CHECK(ours.rejected_rewards[i] == Approx(theirs.rejected_rewards[i]).epsilon(1e-10).margin(1e-12));
    }
}

}  // namespace

TEST_CASE("forward equals the plain implementation for every loss and option", "[forward]") {
    std::mt19937_64 rng(99);
    int cases = 0;
    for (tpo::loss_type type : tpo::all_loss_types)
        for (auto score : {tpo::score_kind::logit, tpo::score_kind::prob, tpo::score_kind::logprob})
            for (auto form : {tpo::sequence_form::additive, tpo::sequence_form::multiplicative})
                for (auto weighting :
                     {tpo::token_weighting::self_calibrated, tpo::token_weighting::none, tpo::token_weighting::caller})
                    for (bool shift : {true, false}) {
                        tpo::objective_options o;
                        o.losses = {{type, 1.0}};
                        o.score = score;
                        o.form = form;
                        o.weighting = weighting;
                        o.alignment.shift = shift;
                        o.hyper.beta = 0.3;
                        if (type == tpo::loss_type::exo_pair) o.hyper.label_smoothing = 0.05;
                        o.average = (cases % 3) == 0;
                        o.use_weighting = (cases % 4) == 1 && type != tpo::loss_type::aot &&
                                          type != tpo::loss_type::aot_unpaired;
                        if (cases % 5 == 2) o.ld_alpha = 0.25;
                        if (tpo::takes_f_divergence(type)) o.hyper.divergence = static_cast<tpo::f_divergence>(cases % 4);
                        o.a = (cases % 7) * 0.25;
                        const auto data = random_batch<double>(rng, 4, 6, 5, 9, 2.0, 0.3);
                        check_against_naive(o, data, std::string(tpo::name(type)) + " case " + std::to_string(cases));
                        ++cases;
                    }
    CHECK(cases == 15 * 3 * 2 * 3 * 2);
}

TEST_CASE("combined losses add their weighted batch means", "[forward]") {
    std::mt19937_64 rng(5);
    const auto data = random_batch<double>(rng, 5, 6, 7, 11);
    tpo::objective_options o;
    o.losses = tpo::parse_loss_terms("sigmoid,bco_pair,sft", "0.8,0.2,1.0");
    check_against_naive(o, data, "mpo");
    tested_backend backend;
    double expected = 0;
    for (const auto& term : o.losses) {
        tpo::objective_options single = o;
        single.losses = {{term.type, 1.0}};
        expected += term.weight * tpo::evaluate(backend, single, data.batch()).loss;
    }
    CHECK(tpo::evaluate(backend, o, data.batch()).loss == Approx(expected).epsilon(1e-12));
}

TEST_CASE("a sequence with no valid token scores 0 and nothing is NaN", "[forward][edge]") {
    tested_backend backend;
    std::mt19937_64 rng(8);
    for (auto type : tpo::all_loss_types) {
        auto data = random_batch<double>(rng, 2, 3, 3, 4, 2.0, 1.0);  // everything masked
        tpo::objective_options o;
        o.losses = {{type, 1.0}};
        o.average = true;
        if (type == tpo::loss_type::exo_pair) o.hyper.label_smoothing = 0.1;
        gradient_data<double> g(data);
        auto views = g.views();
        const auto r = tpo::evaluate(backend, o, data.batch(), &views);
        INFO(tpo::name(type));
        CHECK(std::isfinite(r.loss));
        for (std::size_t i = 0; i < r.losses.size(); ++i) {
            CHECK(r.policy_chosen_scores[i] == 0.0);
            CHECK(r.policy_rejected_scores[i] == 0.0);
            CHECK(r.mean_visual_score_chosen[i] == 0.0);
        }
        for (int k = 0; k < 4; ++k)
            for (double x : g.tensor(k)) CHECK(x == 0.0);
    }
}

TEST_CASE("the mean visual score metric follows the official formula", "[forward][metric]") {
    tested_backend backend;
    std::mt19937_64 rng(12);
    const auto data = random_batch<double>(rng, 3, 5, 5, 6);
    for (auto score : {tpo::score_kind::logit, tpo::score_kind::prob, tpo::score_kind::logprob}) {
        tpo::objective_options o;
        o.score = score;
        const auto r = tpo::evaluate(backend, o, data.batch());
        for (index_t s = 0; s < 3; ++s) {
            double sum = 0, n = 0;
            for (index_t t = 0; t + 1 < 5; ++t) {
                const auto y = data.chosen.labels[s * 5 + t + 1];
                if (y == -100) continue;
                sum += naive::score_of(score, data.chosen.policy.data() + (s * 5 + t) * 6,
                                       data.chosen.policy_noisy.data() + (s * 5 + t) * 6, 6, y);
                n += 1;
            }
            CHECK(r.mean_visual_score_chosen[s] == Approx(sum / (n + 1e-8)).epsilon(1e-12).margin(1e-14));
        }
    }
}
