// The O(S·L) passes over groups of lanes (backend/lanes.hpp) against the same passes one lane per
// pair. A GPU runs them a block of lanes per pair; here a group is that many std::threads meeting
// at a barrier for every reduction, so the rounds, the ranks LD-DPO reads and the "first problem"
// reductions are exercised on the CPU with the lane counts a device uses and with awkward ones.

#include <catch2/catch.hpp>

#include <barrier>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <tpo/backend/reference.hpp>
#include <tpo/tpo.hpp>

#include "support/agreement.hpp"
#include "support/batch.hpp"
#include "support/hidden.hpp"

using namespace tpo_test;

namespace {

/// The reference backend whose groups are `lanes` threads.
struct threaded_lanes_backend : tpo::backend::reference {
    index_t lanes = 4;

    /// What the threads of one group share.
    struct shared_state {
        explicit shared_state(index_t n) : meet(static_cast<std::ptrdiff_t>(n)), values(static_cast<std::size_t>(n)), flags(static_cast<std::size_t>(n)) {}
        std::barrier<> meet;
        std::vector<std::array<unsigned char, tpo::backend::max_lane_value>> values;
        std::vector<char> flags;
    };

    struct lanes_of_thread {
        index_t item, me, count;
        shared_state* shared;

        index_t group() const { return item; }
        index_t lane() const { return me; }
        index_t size() const { return count; }

        template <class T, class Op>
        T reduce(const T& value, Op op) const {
            static_assert(sizeof(T) <= tpo::backend::max_lane_value);
            shared->meet.arrive_and_wait();
            std::memcpy(shared->values[static_cast<std::size_t>(me)].data(), &value, sizeof(T));
            shared->meet.arrive_and_wait();
            // The device's tree: lane k takes lane k + half, halving until one is left.
            std::vector<T> v(static_cast<std::size_t>(count));
            for (index_t k = 0; k < count; ++k) std::memcpy(&v[static_cast<std::size_t>(k)], shared->values[static_cast<std::size_t>(k)].data(), sizeof(T));
            for (index_t half = count / 2; half > 0; half /= 2)
                for (index_t k = 0; k < half; ++k) v[static_cast<std::size_t>(k)] = op(v[static_cast<std::size_t>(k)], v[static_cast<std::size_t>(k + half)]);
            return v[0];
        }

        index_t exclusive_count(bool flag, index_t& all) const {
            shared->meet.arrive_and_wait();
            shared->flags[static_cast<std::size_t>(me)] = flag;
            shared->meet.arrive_and_wait();
            index_t before = 0;
            all = 0;
            for (index_t k = 0; k < count; ++k) {
                if (k < me) before += shared->flags[static_cast<std::size_t>(k)];
                all += shared->flags[static_cast<std::size_t>(k)];
            }
            return before;
        }
    };

    template <class F>
    void for_each_group(index_t n, const F& f) const {
        for (index_t g = 0; g < n; ++g) {
            shared_state shared(lanes);
            std::vector<std::thread> threads;
            for (index_t k = 0; k < lanes; ++k) threads.emplace_back([&, k] { f(lanes_of_thread{g, k, lanes, &shared}); });
            for (auto& t : threads) t.join();
        }
    }
};

static_assert(tpo::backend::grouped_for_each<threaded_lanes_backend, tpo::loss::sequence_pass>);

/// The lane counts: one (the host's), a device block, a power of two below the rows of a
/// sequence and one above them (every lane owns one row or none).
const std::vector<index_t> lane_counts = {1, 2, 8, 64};

std::string error_of(auto& backend, const tpo::objective_options& options, const batch_data<double>& data) {
    gradient_data<double> g(data);
    auto views = g.views();
    try {
        tpo::evaluate(backend, options, data.batch(), &views);
    } catch (const tpo::error& e) {
        return e.what();
    }
    return "";
}

}  // namespace

TEST_CASE("passes over groups of lanes agree with one lane per pair", "[lanes]") {
    std::mt19937_64 rng(20261204);
    // Sequences of 19 and 11 label positions: several rounds of 2 and 8 lanes, part of a round at
    // the end, masked rows (LD-DPO's ranks skip them) in every round.
    const auto data = random_batch<double>(rng, 3, 19, 11, 6, 2.0, 0.3);
    tpo::backend::reference serial;
    for (const index_t lanes : lane_counts) {
        threaded_lanes_backend grouped;
        grouped.lanes = lanes;
        for (auto [name, options] : option_cases()) {
            for (const double ld : {0.0, 0.3}) {
                if (ld > 0) options.ld_alpha = ld;
                INFO(lanes << " lanes, " << name << (ld > 0 ? ", LD-DPO" : ""));
                auto [a, ga] = evaluate_with_gradients<double>(grouped, options, data);
                auto [b, gb] = evaluate_with_gradients<double>(serial, options, data);
                check_close({a.loss, a.reward_accuracy, a.reward_margin}, {b.loss, b.reward_accuracy, b.reward_margin},
                            1e-13, "loss, accuracy, margin");
                check_close(a.losses, b.losses, 1e-13, "losses");
                check_close(a.policy_chosen_scores, b.policy_chosen_scores, 1e-13, "policy chosen scores");
                check_close(a.policy_rejected_scores, b.policy_rejected_scores, 1e-13, "policy rejected scores");
                check_close(a.mean_visual_score_chosen, b.mean_visual_score_chosen, 1e-13, "visual scores chosen");
                for (int k = 0; k < 4; ++k) check_close(ga.tensor(k), gb.tensor(k), 1e-13, "gradient");
                if (lanes == 1) {  // one lane is the serial loop: the same sums in the same order
                    CHECK(a.loss == b.loss);
                    CHECK(ga.chosen == gb.chosen);
                }
            }
        }
    }
}

TEST_CASE("groups of lanes report the same first problem as one lane per pair", "[lanes][bad-input]") {
    std::mt19937_64 rng(7);
    auto base = random_batch<double>(rng, 2, 19, 11, 5, 1.0, 0.0);
    const double nan = std::numeric_limits<double>::quiet_NaN();
    auto at = [](side_data<double>& d, index_t pair, index_t row, index_t v) -> double& {
        return d.tensor(0)[static_cast<std::size_t>((pair * d.length + row) * d.vocab + v)];
    };
    struct problem_case {
        const char* what;
        std::function<void(batch_data<double>&)> edit;
        tpo::objective_options options;
    };
    tpo::objective_options caller;
    caller.weighting = tpo::token_weighting::caller;
    std::vector<problem_case> cases;
    // Problems in rows owned by different lanes: the lowest row must win whichever lane saw it.
    cases.push_back({"NaN in rows 13 and 4 of the chosen policy", [&](auto& d) {
                         at(d.chosen, 1, 13, 0) = nan;
                         at(d.chosen, 1, 4, 2) = nan;
                     }, {}});
    cases.push_back({"label out of range in row 9 after a NaN in row 15 of another tensor", [&](auto& d) {
                         d.chosen.labels[static_cast<std::size_t>(0 * d.chosen.length + 10)] = 99;
                         d.chosen.tensor(1)[static_cast<std::size_t>((0 * d.chosen.length + 15) * d.chosen.vocab)] = nan;
                     }, {}});
    cases.push_back({"bad caller weights at positions 12 and 6", [&](auto& d) {
                         d.rejected.weights[static_cast<std::size_t>(1 * d.rejected.length + 12 - 11)] = -1.0f;
                         d.chosen.weights[static_cast<std::size_t>(0 * d.chosen.length + 12)] = nan;
                         d.chosen.weights[static_cast<std::size_t>(0 * d.chosen.length + 6)] = -1.0f;
                     }, caller});
    cases.push_back({"NaN logits at row 8 before a bad weight at position 12", [&](auto& d) {
                         d.chosen.weights[static_cast<std::size_t>(1 * d.chosen.length + 12)] = nan;
                         at(d.chosen, 1, 8, 1) = nan;
                     }, caller});
    tpo::objective_options ipo;
    ipo.losses = {{tpo::loss_type::ipo, 1.0}};
    ipo.hyper.beta = 1e-300;
    cases.push_back({"a loss that overflows", [](auto&) {}, ipo});
    tpo::backend::reference serial;
    for (const auto& c : cases) {
        auto data = base;
        c.edit(data);
        const std::string expected = error_of(serial, c.options, data);
        INFO(c.what << ": " << expected);
        REQUIRE(!expected.empty());
        for (const index_t lanes : lane_counts) {
            threaded_lanes_backend grouped;
            grouped.lanes = lanes;
            INFO(lanes << " lanes");
            CHECK(error_of(grouped, c.options, data) == expected);
        }
    }
}

TEST_CASE("groups of lanes find the first row whose gradient overflows", "[lanes][bad-input]") {
    // ipo at β = 1e-6 writes coefficients near 1e5 into every valid row: beyond float16's range,
    // so every row of every sequence overflows and the lowest must be the one reported.
    std::mt19937_64 rng(11);
    const auto data = random_batch<double>(rng, 2, 19, 11, 5, 1.0, 0.4);
    tpo::objective_options o;
    o.losses = {{tpo::loss_type::ipo, 1.0}};
    o.hyper.beta = 1e-6;
    auto message = [&](auto& backend) -> std::string {
        gradient_data<tpo::float16> g(data);
        auto views = g.views();
        try {
            tpo::evaluate(backend, o, data.batch(), &views);
        } catch (const tpo::overflow_error& e) {
            return e.what();
        }
        return "";
    };
    tpo::backend::reference serial;
    const std::string expected = message(serial);
    REQUIRE(!expected.empty());
    for (const index_t lanes : lane_counts) {
        threaded_lanes_backend grouped;
        grouped.lanes = lanes;
        INFO(lanes << " lanes");
        CHECK(message(grouped) == expected);
    }
}

TEST_CASE("hidden states in: the label dot products over groups of lanes agree with one lane per row",
          "[lanes][fused]") {
    // Under the logit score the noisy rows' statistics and rank-one gradients are label dot
    // products h·W[y], split over the lanes; H = 37 leaves a partial round for every lane count.
    std::mt19937_64 rng(31);
    const auto data = hidden::random_hidden(rng, 2, 6, 5, 37, 9, true, 0.2);
    tpo::backend::reference serial;
    for (const index_t lanes : lane_counts) {
        threaded_lanes_backend grouped;
        grouped.lanes = lanes;
        for (const double softcap : {0.0, 3.0}) {
            tpo::objective_options o;
            if (softcap > 0) o.logit_softcap = softcap;
            INFO(lanes << " lanes, softcap " << softcap);
            hidden::hidden_gradient_data<double> ga(data), gb(data);
            auto va = ga.views(data, true);
            auto vb = gb.views(data, true);
            const tpo::objective_result a = tpo::evaluate(grouped, o, data.batch(), &va);
            const tpo::objective_result b = tpo::evaluate(serial, o, data.batch(), &vb);
            check_close({a.loss, a.reward_margin}, {b.loss, b.reward_margin}, 1e-13, "loss, margin");
            check_close(a.mean_visual_score_chosen, b.mean_visual_score_chosen, 1e-13, "visual scores");
            check_close(ga.weight, gb.weight, 1e-13, "head gradient");
            check_close(ga.bias, gb.bias, 1e-13, "bias gradient");
            for (int k = 0; k < 4; ++k) check_close(ga.hidden[k], gb.hidden[k], 1e-13, "hidden-state gradient");
        }
    }
}
