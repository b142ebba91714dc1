// Every gradient against central finite differences in double (docs/math.md), for every
// loss type × score × form × detach × shift, on shapes that include V = 1, L = 1 and fully
// masked sequences.

#include <catch2/catch.hpp>

#include "support/finite_difference.hpp"
#include "support/tested_backend.hpp"

using namespace tpo_test;

namespace {

tpo::objective_options options_for(tpo::loss_type type) {
    tpo::objective_options o;
    o.losses = {{type, 1.0}};
    o.hyper.beta = 0.7;  // large enough that every loss is far from flat on these inputs
    if (type == tpo::loss_type::exo_pair || type == tpo::loss_type::robust || type == tpo::loss_type::sigmoid)
        o.hyper.label_smoothing = 0.1;
    return o;
}

struct shape_case {
    index_t pairs, length_chosen, length_rejected, vocab;
    double mask_rate;
};

const shape_case shapes[] = {
    {3, 4, 3, 5, 0.25},  // ordinary, chosen and rejected of different lengths
    {2, 1, 2, 3, 0.0},   // L = 1: with the shift on, the chosen side has no scored row
    {2, 3, 3, 1, 0.2},   // V = 1: every log-prob is 0
    {2, 3, 4, 4, 1.0},   // every sequence fully masked
};

}  // namespace

TEST_CASE("gradients match finite differences for every option combination", "[gradient][fd]") {
    tested_backend backend;
    std::mt19937_64 rng(20261126);
    int combinations = 0;
    for (tpo::loss_type type : tpo::all_loss_types)
        for (auto score : {tpo::score_kind::logit, tpo::score_kind::prob, tpo::score_kind::logprob})
            for (auto form : {tpo::sequence_form::additive, tpo::sequence_form::multiplicative})
                for (bool detach : {false, true})
                    for (bool shift : {true, false}) {
                        tpo::objective_options o = options_for(type);
                        o.score = score;
                        o.form = form;
                        o.detach_weights = detach;
                        o.alignment.shift = shift;
                        const shape_case& sc = shapes[combinations % std::size(shapes)];
                        auto data = random_batch<double>(rng, sc.pairs, sc.length_chosen, sc.length_rejected,
                                                         sc.vocab, 1.5, sc.mask_rate);
                        const gradient_check c = check_gradients(backend, o, data);
                        INFO(tpo::name(type) << " score " << int(score) << " form " << int(form) << " detach "
                                             << detach << " shift " << shift << ": " << describe(c));
                        CHECK(c.worst_excess <= 0);
                        ++combinations;
                    }
    CHECK(combinations == 15 * 3 * 2 * 2 * 2);
}

TEST_CASE("gradients match finite differences with every modifier", "[gradient][fd]") {
    tested_backend backend;
    std::mt19937_64 rng(7);
    std::vector<std::pair<std::string, tpo::objective_options>> cases;
    auto add = [&](std::string name, auto&& edit) {
        tpo::objective_options o = options_for(tpo::loss_type::sigmoid);
        edit(o);
        cases.emplace_back(std::move(name), o);
    };
    for (auto f : {tpo::f_divergence::forward_kl, tpo::f_divergence::js_divergence, tpo::f_divergence::alpha_divergence})
        for (tpo::loss_type type : {tpo::loss_type::sigmoid, tpo::loss_type::ipo, tpo::loss_type::sigmoid_norm,
                                    tpo::loss_type::exo_pair, tpo::loss_type::robust, tpo::loss_type::discopop})
            add(std::string(tpo::name(f)) + " " + tpo::name(type), [&](auto& o) {
                o.hyper.divergence = f;
                o.losses = {{type, 1.0}};
                o.hyper.f_alpha_divergence_coef = 0.3;
            });
    add("wpo", [](auto& o) { o.use_weighting = true; });
    add("wpo ipo", [](auto& o) {
        o.use_weighting = true;
        o.losses = {{tpo::loss_type::ipo, 1.0}};
    });
    add("ld-dpo 0.3", [](auto& o) { o.ld_alpha = 0.3; });
    add("ld-dpo 0 multiplicative", [](auto& o) {
        o.ld_alpha = 0.0;
        o.form = tpo::sequence_form::multiplicative;
    });
    add("average", [](auto& o) { o.average = true; });
    add("average prob", [](auto& o) {
        o.average = true;
        o.score = tpo::score_kind::prob;
    });
    add("a = 0", [](auto& o) { o.a = 0.0; });
    add("a = 1 rejected-heavy", [](auto& o) { o.a = 1.0; });
    add("mpo combination", [](auto& o) {
        o.losses = {{tpo::loss_type::sigmoid, 0.8}, {tpo::loss_type::bco_pair, 0.2}, {tpo::loss_type::sft, 1.0}};
    });
    add("plain dpo", [](auto& o) { o.weighting = tpo::token_weighting::none; });
    add("plain dpo aot", [](auto& o) {
        o.weighting = tpo::token_weighting::none;
        o.losses = {{tpo::loss_type::aot, 1.0}};
    });
    add("caller weights additive", [](auto& o) { o.weighting = tpo::token_weighting::caller; });
    add("caller weights multiplicative (DDPO)", [](auto& o) {
        o.weighting = tpo::token_weighting::caller;
        o.form = tpo::sequence_form::multiplicative;
    });
    add("ignore index -1", [](auto& o) { o.alignment.ignore_index = -1; });
    for (auto& [name, o] : cases) {
        auto data = random_batch<double>(rng, 3, 4, 5, 4, 1.5, 0.25);
        for (auto* side : {&data.chosen, &data.rejected})
            for (auto& y : side->labels)
                if (y == -100) y = o.alignment.ignore_index;
        const gradient_check c = check_gradients(backend, o, data);
        INFO(name << ": " << describe(c));
        CHECK(c.worst_excess <= 0);
    }
}

TEST_CASE("gradients match finite differences on TRL 1.16's WPO, sft and combined losses", "[gradient][fd]") {
    tested_backend backend;
    std::mt19937_64 rng(1116);
    std::vector<tpo::loss_term> every_type;
    for (tpo::loss_type t : tpo::all_loss_types)
        every_type.push_back({t, 0.1 * static_cast<double>(every_type.size() + 1)});
    struct fd_case {
        std::string name;
        std::vector<tpo::loss_term> losses;
        bool wpo;
        tpo::token_weighting weighting;
    };
    const std::vector<fd_case> cases = {
        {"wpo, on-policy labels (pair weights above 1)", {{tpo::loss_type::sigmoid, 1.0}}, true,
         tpo::token_weighting::self_calibrated},
        {"wpo mpo: sft weighted per pair", {{tpo::loss_type::sigmoid, 0.8}, {tpo::loss_type::bco_pair, 0.2},
                                            {tpo::loss_type::sft, 1.0}}, true, tpo::token_weighting::none},
        {"wpo sft alone, tpo", {{tpo::loss_type::sft, 1.0}}, true, tpo::token_weighting::self_calibrated},
        {"all 15 loss types combined", every_type, false, tpo::token_weighting::self_calibrated},
    };
    for (const fd_case& c : cases) {
        tpo::objective_options o = options_for(tpo::loss_type::sigmoid);
        o.losses = c.losses;
        o.use_weighting = c.wpo;
        o.weighting = c.weighting;
        auto data = random_batch<double>(rng, 3, 4, 5, 4, 1.5, 0.25);
        label_the_likeliest(data.chosen);
        label_the_likeliest(data.rejected);
        const gradient_check g = check_gradients(backend, o, data);
        INFO(c.name << ": " << describe(g));
        CHECK(g.worst_excess <= 0);
        if (c.wpo) {  // the case is what its name says: every pair weight above 1
            for (double w : naive::evaluate(data, o).pair_weights) CHECK(w > 1.0);
        }
    }
}
