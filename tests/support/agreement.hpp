#pragma once
// What every backend-against-the-reference test shares: the option combinations it runs and the
// element-wise closeness check of forward values.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include <tpo/loss/options.hpp>

namespace tpo_test {

/// One case per path through the objective: TPO's scores and forms, the noisy rows read at the
/// label only, WPO + LD-DPO + averaging, plain DPO with combined losses (with WPO, and all fifteen
/// types at once), f-divergences on the length-normalised losses, caller weights without the
/// shift (additive-multiplicative and a batch-sorting loss).
inline std::vector<std::pair<const char*, tpo::objective_options>> option_cases() {
    std::vector<std::pair<const char*, tpo::objective_options>> cases;
    tpo::objective_options o;
    cases.emplace_back("tpo default", o);
    o.check_unused_logits = false;
    cases.emplace_back("tpo default, noisy rows read at the label only", o);
    o = {};
    o.score = tpo::score_kind::prob;
    o.form = tpo::sequence_form::multiplicative;
    cases.emplace_back("tpo prob multiplicative", o);
    o = {};
    o.score = tpo::score_kind::logprob;
    o.use_weighting = true;
    o.ld_alpha = 0.5;
    o.average = true;
    cases.emplace_back("tpo logprob wpo ld average", o);
    o = {};
    o.weighting = tpo::token_weighting::none;
    o.losses = {{tpo::loss_type::sigmoid, 0.8}, {tpo::loss_type::bco_pair, 0.2}, {tpo::loss_type::sft, 1.0}};
    cases.emplace_back("dpo mpo", o);
    o.use_weighting = true;
    cases.emplace_back("dpo mpo with wpo (sft weighted per pair)", o);
    o = {};
    o.weighting = tpo::token_weighting::none;
    o.hyper.label_smoothing = 0.1;
    for (tpo::loss_type t : tpo::all_loss_types) o.losses.push_back({t, 0.05 * static_cast<double>(o.losses.size() + 1)});
    cases.emplace_back("dpo, all 15 loss types combined", o);
    o = {};
    o.losses = {{tpo::loss_type::ipo, 1.0}, {tpo::loss_type::sigmoid_norm, 0.5}};
    o.hyper.divergence = tpo::f_divergence::forward_kl;
    cases.emplace_back("tpo ipo + sigmoid_norm, forward_kl (unequal lengths)", o);
    o.hyper.divergence = tpo::f_divergence::alpha_divergence;
    o.weighting = tpo::token_weighting::none;
    cases.emplace_back("dpo ipo + sigmoid_norm, alpha_divergence (unequal lengths)", o);
    o = {};
    o.weighting = tpo::token_weighting::caller;
    o.form = tpo::sequence_form::multiplicative;
    o.alignment.shift = false;
    cases.emplace_back("caller weights no shift", o);
    o.form = tpo::sequence_form::additive;
    o.losses = {{tpo::loss_type::aot, 1.0}};
    cases.emplace_back("caller weights no shift aot", o);
    return cases;
}

/// |a − b| ≤ tol·max(1, |b|) element-wise, b being the reference's values.
inline void check_close(const std::vector<double>& a, const std::vector<double>& b, double tol, const char* what) {
    REQUIRE(a.size() == b.size());
    for (std::size_t i = 0; i < a.size(); ++i) {
        INFO(what << "[" << i << "]: " << a[i] << " vs reference " << b[i]);
        CHECK(std::abs(a[i] - b[i]) <= tol * std::max(1.0, std::abs(b[i])));
    }
}

}  // namespace tpo_test
