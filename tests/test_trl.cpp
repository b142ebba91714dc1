// TRL 1.16's DPO family where it differs from older TRL and from what this library once did: f-divergence
// scores with their constants under ipo/sigmoid_norm with unequal lengths, WPO pair weights above 1,
// WPO on the sft term, fifteen combined terms. Expected numbers are TRL 1.16.0's own: its
// DPOTrainer._compute_loss in float64 on these inputs (`scripts/compare-trl --pinned` prints them),
// except where TRL 1.16 cannot run (noted at the case). Docs: docs/formulas.md, docs/trl_differences.md.

#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "support/batch.hpp"
#include "support/tested_backend.hpp"

using namespace tpo_test;

namespace {

/// The fixed inputs: quarter-integer logits from a modular pattern (exact in float and double),
/// P = 2, L = 5 (chosen) and 3 (rejected), V = 4, position 0 a prompt token; labels from a pattern
/// or, `on_policy`, the policy's likeliest tokens (first maximum, as numpy.argmax).
batch_data<double> pinned_batch(bool on_policy) {
    const index_t P = 2, V = 4;
    auto q = [](index_t k) { return static_cast<double>(k % 9 - 4) / 2.0; };
    auto logits = [&](index_t L, index_t a, index_t c, index_t e, index_t f) {
        std::vector<double> z;
        for (index_t p = 0; p < P; ++p)
            for (index_t t = 0; t < L; ++t)
                for (index_t v = 0; v < V; ++v) z.push_back(q(a * p + c * t + e * v + f));
        return z;
    };
    auto side = [&](index_t L, std::vector<double> policy, std::vector<double> reference, index_t a, index_t c,
                    index_t f) {
        side_data<double> d;
        d.pairs = P;
        d.length = L;
        d.vocab = V;
        d.policy = policy;
        d.policy_noisy = policy;
        d.reference = reference;
        d.reference_noisy = reference;
        for (index_t p = 0; p < P; ++p)
            for (index_t t = 0; t < L; ++t) d.labels.push_back((a * p + c * t + f) % V);
        d.weights.assign(d.labels.size(), 1.0f);
        if (on_policy) label_the_likeliest(d);
        for (index_t p = 0; p < P; ++p) d.labels[static_cast<std::size_t>(p * L)] = -100;
        return d;
    };
    return {side(5, logits(5, 5, 3, 7, 1), logits(5, 2, 5, 3, 4), 2, 1, 0),
            side(3, logits(3, 3, 7, 2, 2), logits(3, 7, 2, 5, 6), 1, 2, 1)};
}

tpo::objective_options dpo(std::vector<tpo::loss_term> losses) {
    tpo::objective_options o;
    o.weighting = tpo::token_weighting::none;
    o.losses = std::move(losses);
    return o;
}

bool close(double ours, double trl, double tol) { return std::abs(ours - trl) <= tol * std::abs(trl); }

// TRL 1.16's rewards β·Δ on the pinned inputs with pattern labels (float64).
const double chosen_rewards[] = {-0.5719410926244427, -0.23753930422832126};
const double rejected_rewards[] = {0.20403738235625177, -0.011763681954390304};

void check_rewards(const tpo::objective_result& r) {
    for (int i = 0; i < 2; ++i) {
        CHECK(close(r.chosen_rewards[i], chosen_rewards[i], 1e-13));
        CHECK(close(r.rejected_rewards[i], rejected_rewards[i], 1e-13));
    }
}

}  // namespace

TEST_CASE("TRL 1.16: f-divergence constants under ipo and sigmoid_norm with unequal lengths", "[trl]") {
    // n_w = 4 and n_l = 2 scored tokens per pair: the constants 1, log 2 and −1/(α−1) of the
    // scores survive the division by each side's own length.
    tested_backend backend;
    const auto data = pinned_batch(false);
    struct pin {
        tpo::loss_type loss;
        tpo::f_divergence f;
        double trl, tol;
    };
    const pin pins[] = {
        {tpo::loss_type::ipo, tpo::f_divergence::forward_kl, 3337.447120842226, 1e-13},
        {tpo::loss_type::sigmoid_norm, tpo::f_divergence::forward_kl, 4.228063362877556, 1e-13},
        {tpo::loss_type::ipo, tpo::f_divergence::js_divergence, 36.05215505310472, 1e-13},
        {tpo::loss_type::sigmoid_norm, tpo::f_divergence::js_divergence, 0.7436241362101952, 1e-13},
        // TRL 1.16 runs alpha_divergence only in float16/bfloat16/float32 (its exponent cap is a dict
        // without float64): TRL's float32 result, against which a double computation agrees to ~1e-7.
        {tpo::loss_type::ipo, tpo::f_divergence::alpha_divergence, 114.63426208496094, 1e-5},
        {tpo::loss_type::sigmoid_norm, tpo::f_divergence::alpha_divergence, 0.9901623725891113, 1e-5},
    };
    for (const pin& p : pins) {
        tpo::objective_options o = dpo({{p.loss, 1.0}});
        o.hyper.divergence = p.f;
        const auto r = tpo::evaluate(backend, o, data.batch());
        INFO(tpo::name(p.loss) << " " << tpo::name(p.f) << ": " << r.loss << " vs TRL " << p.trl);
        CHECK(close(r.loss, p.trl, p.tol));
        check_rewards(r);
    }
}

TEST_CASE("TRL 1.16: gradients of ipo + forward_kl with unequal lengths", "[trl][gradient]") {
    // TRL's autograd gradients of the policy logits, (P, L, V) row-major; the last row of each
    // sequence predicts nothing and the first label is a prompt token.
    const std::vector<double> chosen = {
        122.06857616528852, -2156.2416717222914, 1487.0996919252996, 547.0734036317033, 1035.7054940183582,
        381.01475835766627, -6058.430245007186, 4641.709992631162, 3991.3654769903196, 1468.3413011861862,
        540.1725773293226, -5999.879355505828, -6076.529165224589, 4042.356069667586, 1487.0996919252996,
        547.0734036317033, 0.0, 0.0, 0.0, 0.0, 12.771212728026658, 4.698266601468059, 1.728395691822521,
        -19.197875021317238, -19.44313219736998, 12.934367846234617, 4.758288015178663, 1.7504763359566982,
        1.0999139057504574, -19.429080549563857, 13.39969451409872, 4.929472129714679, 12.771212728026658,
        4.698266601468059, -18.105320570725514, 0.6358412412307973, 0.0, 0.0, 0.0, 0.0};
    const std::vector<double> rejected = {
        -0.16952601330704728, -0.4608194814236529, -1.2526372225538362, 1.8829827172845361, -0.16952601330704728,
        4.827184235580385, -1.2526372225538362, -3.4050209997195022, 0.0, 0.0, 0.0, 0.0, 3.1175173731595613,
        -2.8028110698152036, -0.0846375605355284, -0.23006874280882925, -0.36614673914444773, -0.9952900275658864,
        1.4431351472534601, -0.08169838054312598, 0.0, 0.0, 0.0, 0.0};
    tested_backend backend;
    const auto data = pinned_batch(false);
    tpo::objective_options o = dpo({{tpo::loss_type::ipo, 1.0}});
    o.hyper.divergence = tpo::f_divergence::forward_kl;
    auto [r, g] = evaluate_with_gradients(backend, o, data);
    CHECK(close(r.loss, 3337.447120842226, 1e-13));
    for (const auto& [ours, trl] : {std::pair{&g.chosen, &chosen}, std::pair{&g.rejected, &rejected}}) {
        REQUIRE(ours->size() == trl->size());
        for (std::size_t i = 0; i < trl->size(); ++i) {
            INFO("entry " << i << ": " << (*ours)[i] << " vs TRL " << (*trl)[i]);
            CHECK(std::abs((*ours)[i] - (*trl)[i]) <= 1e-12 * 6100.0);  // relative to the largest entry
        }
    }
}

TEST_CASE("TRL 1.16: WPO pair weights above 1 on on-policy labels", "[trl]") {
    // Labels the policy's likeliest tokens: every pair weight exceeds 1 (1.77 and 1.74 here), so
    // the weighted loss exceeds the plain one; a cap at 1 would give the plain loss back.
    tested_backend backend;
    const auto data = pinned_batch(true);
    tpo::objective_options o = dpo({{tpo::loss_type::sigmoid, 1.0}});
    const double plain = tpo::evaluate(backend, o, data.batch()).loss;
    CHECK(close(plain, 0.5873514956756136, 1e-13));
    o.use_weighting = true;
    const double weighted = tpo::evaluate(backend, o, data.batch()).loss;
    CHECK(close(weighted, 1.0300344010899907, 1e-13));
}

TEST_CASE("TRL 1.16: WPO weighs the sft term per pair", "[trl]") {
    tested_backend backend;
    const auto data = pinned_batch(true);
    tpo::objective_options o = dpo({{tpo::loss_type::sft, 1.0}});
    o.use_weighting = true;
    SECTION("one pair: TRL's own result") {
        batch_data<double> first = data;
        for (auto* side : {&first.chosen, &first.rejected}) {
            const auto row = static_cast<std::size_t>(side->length * side->vocab);
            const auto labels = static_cast<std::size_t>(side->length);
            side->pairs = 1;
            for (int k = 0; k < 4; ++k) side->tensor(k).resize(row);
            side->labels.resize(labels);
            side->weights.resize(labels);
        }
        CHECK(close(tpo::evaluate(backend, o, first.batch()).loss, 0.6998068654658761, 1e-13));
    }
    SECTION("two pairs: TRL 1.16 raises, the value it means from its own numbers") {
        // TRL multiplies the expanded sft scalar S in place by w_w·w_l, which torch refuses for more
        // than one pair. What it means, (1/P) Σ_i w_i·S, from TRL's numbers: the pair weights w_i
        // (each pair's WPO sigmoid loss over its plain sigmoid loss, that pair alone) and S (sft
        // without WPO on both pairs): w = 1.7667197810814652, 1.7406648829122693, S = 0.4105558683147501.
        const double trl = 0.4105558683147501 * (1.7667197810814652 + 1.7406648829122693) / 2;
        CHECK(close(tpo::evaluate(backend, o, data.batch()).loss, trl, 1e-13));
        o.use_weighting = false;
        CHECK(close(tpo::evaluate(backend, o, data.batch()).loss, 0.4105558683147501, 1e-13));
    }
}

TEST_CASE("TRL 1.16: fifteen combined loss terms", "[trl]") {
    // Every loss type but exo_pair (whose ε > 0 would make sigmoid cDPO here, a documented
    // difference), sigmoid twice, weights 0.1, 0.2, …, 1.5 in this order.
    using tpo::loss_type;
    const loss_type types[] = {loss_type::sigmoid,   loss_type::hinge,        loss_type::ipo,
                               loss_type::sigmoid_norm, loss_type::nca_pair, loss_type::robust,
                               loss_type::bco_pair,  loss_type::sppo_hard,    loss_type::aot,
                               loss_type::aot_unpaired, loss_type::apo_zero, loss_type::apo_down,
                               loss_type::discopop,  loss_type::sft,          loss_type::sigmoid};
    std::vector<tpo::loss_term> terms;
    for (loss_type t : types) terms.push_back({t, 0.1 * static_cast<double>(terms.size() + 1)});
    REQUIRE(terms.size() == 15);
    tested_backend backend;
    const auto r = tpo::evaluate(backend, dpo(terms), pinned_batch(false).batch());
    CHECK(close(r.loss, 124.7420182961497, 1e-13));
    check_rewards(r);
}
