// The vocabulary-sharded objective on MPI (run by ctest under mpirun with 1 to 4 ranks): every
// rank's results and gradient slices against the single-process objective on the whole
// vocabulary, finite differences of the sharded loss, a property over random shapes, and errors
// that one rank sees alone, which must become the same error on every rank within seconds. The
// data-parallel objective the same way: each rank its own pairs, against the single-process
// objective on every rank's pairs concatenated.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <mpi.h>
#include <rapidcheck/catch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <tpo/backend/cpu.hpp>
#include <tpo/backend/reference.hpp>
#include <tpo/dist/data_parallel.hpp>
#include <tpo/dist/mpi.hpp>
#include <tpo/dist/sharded.hpp>

#include "support/agreement.hpp"
#include "support/batch.hpp"
#include "support/hidden.hpp"
#include "support/shards.hpp"

namespace {

using tpo::index_t;
using tpo_test::batch_data;
using tpo_test::gradient_data;
using tpo_test::hidden::hidden_data;
using namespace tpo_test::shards;

tpo::dist::mpi_communicator& world() {
    static tpo::dist::mpi_communicator comm(MPI_COMM_WORLD);
    return comm;
}

tpo::dist::vocab_shard my_shard(index_t vocab) { return tpo::dist::vocab_shard::even(vocab, world().size(), world().rank()); }

/// |a − b| ≤ tol·(|b| + max|full|): the error of each entry of a rank's slice, relative to the
/// entry plus the largest entry of the whole single-process tensor (norm-wise relative, as for any
/// tensor whose entries are sums with cancellation). ∂L/∂W, ∂L/∂b and ∂L/∂H add many rows' terms,
/// and R ranks merge each row's log-sum-exp from R partial ones, so in float an entry whose terms
/// cancel to a small result keeps the rounding of its terms, whose scale is the tensor's, not its
/// own (entry-wise, fp32 head-bias entries near 2e-4 differ by 1.4e-5 of themselves).
template <class A, class B>
void check_tensor(const std::vector<A>& a, const std::vector<B>& b, const std::vector<B>& full, double tol,
                  const char* what) {
    REQUIRE(a.size() == b.size());
    double scale = 0;
    for (const B& x : full) scale = std::max(scale, std::abs(tpo::widen<double>(x)));
    int bad = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        const double x = tpo::widen<double>(a[i]), y = tpo::widen<double>(b[i]);
        if (!(std::abs(x - y) <= tol * (std::abs(y) + scale))) {
            if (bad++ < 3) FAIL_CHECK(what << "[" << i << "] on rank " << world().rank() << ": " << x << " vs " << y);
        }
    }
    CHECK(bad == 0);
}

void check_results(const tpo::objective_result& a, const tpo::objective_result& b, double tol) {
    using tpo_test::check_close;
    check_close({a.loss, a.reward_accuracy, a.reward_margin}, {b.loss, b.reward_accuracy, b.reward_margin}, tol,
                "loss, accuracy, margin");
    check_close(a.losses, b.losses, tol, "losses");
    check_close(a.chosen_rewards, b.chosen_rewards, tol, "chosen rewards");
    check_close(a.rejected_rewards, b.rejected_rewards, tol, "rejected rewards");
    check_close(a.policy_chosen_scores, b.policy_chosen_scores, tol, "policy chosen scores");
    check_close(a.policy_rejected_scores, b.policy_rejected_scores, tol, "policy rejected scores");
    check_close(a.reference_chosen_scores, b.reference_chosen_scores, tol, "reference chosen scores");
    check_close(a.reference_rejected_scores, b.reference_rejected_scores, tol, "reference rejected scores");
    check_close(a.mean_visual_score_chosen, b.mean_visual_score_chosen, tol, "visual chosen");
    check_close(a.mean_visual_score_rejected, b.mean_visual_score_rejected, tol, "visual rejected");
    check_close(a.chosen_tokens, b.chosen_tokens, 0, "chosen tokens");
    check_close(a.rejected_tokens, b.rejected_tokens, 0, "rejected tokens");
    check_close(a.grad_policy_chosen_scores, b.grad_policy_chosen_scores, tol, "grad chosen scores");
    check_close(a.grad_policy_rejected_scores, b.grad_policy_rejected_scores, tol, "grad rejected scores");
}

/// The option cases of the backend tests, and the logit transform on logits inputs.
std::vector<std::pair<std::string, tpo::objective_options>> cases() {
    std::vector<std::pair<std::string, tpo::objective_options>> out;
    for (auto& [name, o] : tpo_test::option_cases()) out.emplace_back(name, o);
    tpo::objective_options o;
    o.logit_scale = 0.7;
    o.logit_softcap = 3.0;
    o.temperature = 1.3;
    o.use_weighting = true;
    out.emplace_back("tpo under a soft-capped logit transform, wpo", o);
    return out;
}

/// One logits batch through both paths on `backend`, in T, gradients in G.
template <class T, class G, class Backend>
void compare_logits(Backend& backend, const tpo::objective_options& options, const batch_data<T>& data, double tol,
                    bool reference_scores = false) {
    const auto shard = my_shard(data.chosen.vocab);
    auto single = tpo_test::evaluate_with_gradients<G>(backend, options, data);
    batch_data<T> local = slice(data, shard);
    gradient_data<G> grads(local);
    auto views = grads.views();
    auto batch = local.batch();
    std::vector<double> scores_w = single.result.reference_chosen_scores,
                        scores_l = single.result.reference_rejected_scores;
    if (reference_scores)
        batch = tpo_test::with_reference_scores(batch, {scores_w.data(), data.chosen.pairs},
                                                {scores_l.data(), data.chosen.pairs});
    tpo::dist::sharded_objective<Backend, tpo::dist::mpi_communicator> obj(backend, world(), options, shard);
    const tpo::objective_result r = obj.forward(batch);
    obj.backward(batch, views);
    check_results(r, single.result, tol);
    const bool noisy = options.weighting == tpo::token_weighting::self_calibrated;
    for (int k = 0; k < 4; ++k) {
        if (!noisy && (k == 1 || k == 3)) continue;
        INFO("gradient tensor " << k);
        check_tensor(grads.tensor(k), columns(single.gradients.tensor(k), data.chosen.vocab, shard.offset, shard.size),
                     single.gradients.tensor(k), tol, "gradient");
    }
}

}  // namespace

TEST_CASE("sharded logits equal the single process in fp64 (reference backend), every option", "[logits]") {
    tpo::backend::reference backend;
    const index_t R = world().size();
    for (auto [pairs, lw, ll, vocab] : {std::tuple<index_t, index_t, index_t, index_t>{3, 6, 5, 13}, {2, 4, 1, R},
                                        {1, 3, 4, 2 * R + 1}}) {
        for (auto& [name, options] : cases()) {
            INFO(name << ", P = " << pairs << ", V = " << vocab << ", ranks " << R);
            const auto data = make_batch<double>(7 + static_cast<std::uint64_t>(vocab), pairs, lw, ll, vocab);
            compare_logits<double, double>(backend, options, data, 1e-12);
            if (options.weighting != tpo::token_weighting::caller)
                compare_logits<double, double>(backend, options, data, 1e-12, true);
        }
    }
}

TEST_CASE("sharded logits equal the single process in fp32 (CPU backend), every option", "[logits]") {
    tpo::backend::cpu backend;
    for (auto& [name, options] : cases()) {
        INFO(name);
        const auto data = make_batch<float>(11, 3, 7, 6, 37);
        compare_logits<float, float>(backend, options, data, 1e-5);
    }
}

TEST_CASE("sharded logits: bf16 gradients of fp32 logits on the CPU backend", "[logits]") {
    tpo::backend::cpu backend;
    const auto data = make_batch<float>(12, 2, 6, 6, 29);
    compare_logits<float, tpo::bfloat16>(backend, tpo::objective_options{}, data, 1e-2);
}

namespace {

template <class T, class G, class Backend>
void compare_hidden(Backend& backend, const tpo::objective_options& options, const hidden_data<T>& data, double tol) {
    using tpo_test::hidden::hidden_gradient_data;
    const auto shard = my_shard(data.vocab);
    hidden_gradient_data<G> single_grads(data);
    auto single_views = single_grads.views(data, data.with_bias);
    const tpo::objective_result single = tpo::evaluate(backend, options, data.batch(), &single_views);

    const hidden_data<T> local = hidden_slice(data, shard);
    hidden_gradient_data<G> grads(local);
    auto views = grads.views(local, local.with_bias);
    const tpo::objective_result r = tpo::dist::evaluate(backend, world(), options, shard, local.batch(), &views);
    check_results(r, single, tol);
    const bool noisy = options.weighting == tpo::token_weighting::self_calibrated;
    for (int k = 0; k < 4; ++k) {
        if (!noisy && (k == 1 || k == 3)) continue;
        INFO("hidden-state gradient " << k);
        check_tensor(grads.hidden[k], single_grads.hidden[k], single_grads.hidden[k], tol, "gradient of the hidden states");
    }
    check_tensor(grads.weight, row_block(single_grads.weight, data.hidden, shard.offset, shard.size), single_grads.weight, tol,
                 "gradient of the head weight");
    if (data.with_bias)
        check_tensor(grads.bias, row_block(single_grads.bias, 1, shard.offset, shard.size), single_grads.bias, tol,
                     "gradient of the head bias");
}

}  // namespace

TEST_CASE("sharded lm_head (hidden states in) equals the single process, every option", "[hidden]") {
    tpo::backend::reference reference;
    tpo::backend::cpu cpu;
    std::mt19937_64 rng(23);
    const auto data = tpo_test::hidden::random_hidden(rng, 2, 5, 4, 6, 11);
    const auto data_f = tpo_test::hidden::convert<float>(data);
    auto all = cases();
    tpo::objective_options chunked;
    chunked.chunk_tokens = 2;
    chunked.score = tpo::score_kind::prob;
    all.emplace_back("tpo prob, two-token chunks", chunked);
    for (auto& [name, options] : all) {
        INFO(name);
        compare_hidden<double, double>(reference, options, data, 1e-12);
        compare_hidden<float, float>(cpu, options, data_f, 1e-5);
    }
    INFO("float gradients of double states (summed in double, then rounded)");
    compare_hidden<double, float>(reference, tpo::objective_options{}, data, 1e-6);
    hidden_data<double> no_bias = data;
    no_bias.with_bias = false;
    compare_hidden<double, double>(reference, tpo::objective_options{}, no_bias, 1e-12);
}

TEST_CASE("sharded gradients against central differences of the sharded loss", "[fd]") {
    tpo::backend::reference backend;
    const int R = world().size();
    tpo::objective_options options;
    options.score = tpo::score_kind::prob;
    options.average = true;  // (not WPO: its pair weight is a gradient constant)
    const auto data = make_batch<double>(5, 2, 4, 3, 9);
    const auto shard = my_shard(9);
    batch_data<double> local = slice(data, shard);
    gradient_data<double> grads(local);
    auto views = grads.views();
    tpo::dist::evaluate(backend, world(), options, shard, local.batch(), &views);
    const double h = 1e-6;
    // Each rank in turn perturbs entries of its own slice; every rank evaluates every step.
    for (int owner = 0; owner < R; ++owner)
        for (int tensor : {0, 1, 2}) {
            for (int e = 0; e < 3; ++e) {
                batch_data<double> probe = local;
                auto& z = (tensor < 2 ? probe.chosen : probe.rejected).tensor(tensor == 1 ? 1 : 0);
                const std::size_t at = static_cast<std::size_t>(e * 5 + tensor) % z.size();
                const double original = z[at];
                double loss[2];
                for (int sign = 0; sign < 2; ++sign) {
                    if (world().rank() == owner) z[at] = original + (sign ? h : -h);
                    loss[sign] = tpo::dist::evaluate(backend, world(), options, shard, probe.batch()).loss;
                }
                if (world().rank() == owner) {
                    const double fd = (loss[1] - loss[0]) / (2 * h);
                    const double g = grads.tensor(tensor == 0 ? 0 : tensor == 1 ? 1 : 2)[at];
                    INFO("rank " << owner << ", tensor " << tensor << ", entry " << at);
                    CHECK(std::abs(fd - g) <= 1e-6 * std::max(1.0, std::abs(g)));
                }
            }
        }
}

TEST_CASE("property: the sharded objective is the single-process objective", "[property]") {
    rc::prop("any shape, any option case", [] {
        const auto R = static_cast<index_t>(world().size());
        const index_t pairs = *rc::gen::inRange<index_t>(1, 4);
        const index_t lw = *rc::gen::inRange<index_t>(1, 6);
        const index_t ll = *rc::gen::inRange<index_t>(1, 6);
        const index_t vocab = *rc::gen::inRange<index_t>(R, R + 20);
        const auto all = cases();
        const auto which = *rc::gen::inRange<std::size_t>(0, all.size());
        const auto seed = *rc::gen::arbitrary<std::uint32_t>();
        const auto data = make_batch<double>(seed, pairs, lw, ll, vocab);
        const auto& options = all[which].second;
        tpo::backend::reference backend;
        auto single = tpo_test::evaluate_with_gradients<double>(backend, options, data);
        const auto shard = my_shard(vocab);
        batch_data<double> local = slice(data, shard);
        gradient_data<double> grads(local);
        auto views = grads.views();
        const auto r = tpo::dist::evaluate(backend, world(), options, shard, local.batch(), &views);
        RC_ASSERT(std::abs(r.loss - single.result.loss) <= 1e-12 * std::max(1.0, std::abs(single.result.loss)));
        for (int k = 0; k < 4; ++k) {
            const auto expected = columns(single.gradients.tensor(k), vocab, shard.offset, shard.size);
            for (std::size_t i = 0; i < expected.size(); ++i)
                RC_ASSERT(std::abs(grads.tensor(k)[i] - expected[i]) <= 1e-12 * std::max(1.0, std::abs(expected[i])));
        }
    });
}

// ---- data parallelism: each rank its own pairs, the objective of all of them

namespace {

double sum_over_ranks(double x) {
    double sum = 0;
    MPI_Allreduce(&x, &sum, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    return sum;
}

std::vector<double> sum_over_ranks(const std::vector<double>& x) {
    std::vector<double> sum(x.size());
    MPI_Allreduce(x.data(), sum.data(), static_cast<int>(x.size()), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    return sum;
}

bool on_every_rank(bool ok) {
    int mine = ok ? 1 : 0, all = 0;
    MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    return all == 1;
}

/// The ranks' micro-batches: rank k holds pairs[k] pairs drawn from seed + k, every side of one
/// length and vocabulary, so that they concatenate into one batch.
struct dp_shape {
    std::uint64_t seed;
    std::vector<index_t> pairs;  // per rank
    index_t lw, ll, vocab;

    index_t first(int rank) const {
        index_t f = 0;
        for (int k = 0; k < rank; ++k) f += pairs[static_cast<std::size_t>(k)];
        return f;
    }
    template <class T>
    batch_data<T> part(int rank) const {
        return make_batch<T>(seed + static_cast<std::uint64_t>(rank), pairs[static_cast<std::size_t>(rank)], lw, ll,
                             vocab);
    }
    /// Every rank's pairs in rank order: the batch a single process evaluates.
    template <class T>
    batch_data<T> whole() const {
        batch_data<T> out = part<T>(0);
        for (int k = 1; k < static_cast<int>(pairs.size()); ++k) {
            const batch_data<T> p = part<T>(k);
            for (auto [to, from] : {std::pair{&out.chosen, &p.chosen}, std::pair{&out.rejected, &p.rejected}}) {
                for (int t = 0; t < 4; ++t) {
                    const auto& add = const_cast<tpo_test::side_data<T>*>(from)->tensor(t);
                    to->tensor(t).insert(to->tensor(t).end(), add.begin(), add.end());
                }
                to->labels.insert(to->labels.end(), from->labels.begin(), from->labels.end());
                to->weights.insert(to->weights.end(), from->weights.begin(), from->weights.end());
                to->pairs += from->pairs;
            }
        }
        return out;
    }
};

dp_shape equal_pairs(std::uint64_t seed, index_t pairs, index_t lw, index_t ll, index_t vocab) {
    return {seed, std::vector<index_t>(static_cast<std::size_t>(world().size()), pairs), lw, ll, vocab};
}

dp_shape unequal_pairs(std::uint64_t seed, index_t lw, index_t ll, index_t vocab) {
    std::vector<index_t> pairs;
    for (int k = 0; k < world().size(); ++k) pairs.push_back(1 + (2 * k + 1) % 3);  // 2, 1, 3, 2
    return {seed, pairs, lw, ll, vocab};
}

/// The losses that couple the batch, alone and with others, with WPO, and every option case.
std::vector<std::pair<std::string, tpo::objective_options>> dp_cases() {
    std::vector<std::pair<std::string, tpo::objective_options>> out;
    auto with = [&](const char* name, std::vector<tpo::loss_term> terms, bool dpo, bool wpo) {
        tpo::objective_options o;
        if (dpo) o.weighting = tpo::token_weighting::none;
        o.losses = std::move(terms);
        o.use_weighting = wpo;
        o.hyper.label_smoothing = 0.1;
        out.emplace_back(name, o);
    };
    using tpo::loss_type;
    with("dpo sft", {{loss_type::sft, 1.0}}, true, false);
    with("tpo aot", {{loss_type::aot, 1.0}}, false, false);
    with("dpo aot_unpaired", {{loss_type::aot_unpaired, 1.0}}, true, false);
    with("tpo sigmoid + aot + sft", {{loss_type::sigmoid, 1.0}, {loss_type::aot, 0.5}, {loss_type::sft, 0.3}}, false,
         false);
    with("dpo sigmoid + sft, wpo", {{loss_type::sigmoid, 0.8}, {loss_type::sft, 1.0}}, true, true);
    with("tpo sft + ipo, wpo", {{loss_type::sft, 0.7}, {loss_type::ipo, 0.4}}, false, true);
    for (auto& [name, o] : tpo_test::option_cases()) out.emplace_back(name, o);
    return out;
}

/// This rank's micro-batch through the data-parallel objective against the single process on the
/// whole batch: the loss and metrics are the whole batch's, the per-pair values this rank's rows,
/// and each rank's gradient times 1/R (what a DDP trainer's average takes from it) is the single
/// process's gradient of this rank's pairs.
template <class T, class G, class Backend>
void compare_data_parallel(Backend& backend, const tpo::objective_options& options, const dp_shape& shape, double tol,
                           bool reference_scores = false) {
    using tpo_test::check_close;
    const int R = world().size(), me = world().rank();
    const batch_data<T> whole = shape.whole<T>();
    const batch_data<T> mine = shape.part<T>(me);
    const index_t first = shape.first(me), P = mine.chosen.pairs, N = whole.chosen.pairs;
    auto single = tpo_test::evaluate_with_gradients<G>(backend, options, whole);

    auto batch = mine.batch();
    const std::vector<double> scores_w(single.result.reference_chosen_scores.begin() + first,
                                       single.result.reference_chosen_scores.begin() + first + P);
    const std::vector<double> scores_l(single.result.reference_rejected_scores.begin() + first,
                                       single.result.reference_rejected_scores.begin() + first + P);
    if (reference_scores) batch = tpo_test::with_reference_scores(batch, {scores_w.data(), P}, {scores_l.data(), P});
    gradient_data<G> grads(mine);
    auto views = grads.views();
    tpo::dist::data_parallel_objective<Backend, tpo::dist::mpi_communicator> obj(backend, world(), options);
    const tpo::objective_result r = obj.forward(batch);
    obj.backward(batch, views);
    CHECK(obj.first_pair() == first);
    CHECK(obj.total_pairs() == N);
    CHECK(obj.exchanged_values() == 12 * N);

    const tpo::objective_result& s = single.result;
    const double inv = 1.0 / R;
    check_close({r.loss, r.reward_accuracy, r.reward_margin}, {s.loss, s.reward_accuracy, s.reward_margin}, tol,
                "loss, accuracy, margin");
    INFO("the ranks' losses averaged (DDP)");
    check_close({sum_over_ranks(r.loss) / R}, {s.loss}, tol, "averaged loss");
    check_close(r.losses, scaled_rows(s.losses, 1, first, P), tol, "losses");
    check_close(r.chosen_rewards, scaled_rows(s.chosen_rewards, 1, first, P), tol, "chosen rewards");
    check_close(r.rejected_rewards, scaled_rows(s.rejected_rewards, 1, first, P), tol, "rejected rewards");
    check_close(r.policy_chosen_scores, scaled_rows(s.policy_chosen_scores, 1, first, P), tol, "policy chosen");
    check_close(r.policy_rejected_scores, scaled_rows(s.policy_rejected_scores, 1, first, P), tol, "policy rejected");
    check_close(r.reference_chosen_scores, scaled_rows(s.reference_chosen_scores, 1, first, P), tol, "reference chosen");
    check_close(r.reference_rejected_scores, scaled_rows(s.reference_rejected_scores, 1, first, P), tol,
                "reference rejected");
    check_close(r.mean_visual_score_chosen, scaled_rows(s.mean_visual_score_chosen, 1, first, P), tol, "visual chosen");
    check_close(r.mean_visual_score_rejected, scaled_rows(s.mean_visual_score_rejected, 1, first, P), tol,
                "visual rejected");
    check_close(r.chosen_tokens, scaled_rows(s.chosen_tokens, 1, first, P), 0, "chosen tokens");
    check_close(r.rejected_tokens, scaled_rows(s.rejected_tokens, 1, first, P), 0, "rejected tokens");
    check_close(scaled_rows(r.grad_policy_chosen_scores, 1, 0, P, inv), scaled_rows(s.grad_policy_chosen_scores, 1, first, P),
                tol, "grad chosen scores / R");
    check_close(scaled_rows(r.grad_policy_rejected_scores, 1, 0, P, inv),
                scaled_rows(s.grad_policy_rejected_scores, 1, first, P), tol, "grad rejected scores / R");
    const bool noisy = options.weighting == tpo::token_weighting::self_calibrated;
    for (int k = 0; k < 4; ++k) {
        if (!noisy && (k == 1 || k == 3)) continue;
        INFO("gradient tensor " << k << " times 1/R");
        const index_t width = (k < 2 ? whole.chosen.length : whole.rejected.length) * whole.chosen.vocab;
        check_tensor(scaled_rows(grads.tensor(k), width, 0, P, inv), scaled_rows(single.gradients.tensor(k), width, first, P),
                     scaled_rows(single.gradients.tensor(k), width, 0, N), tol, "gradient");
    }
}

}  // namespace

TEST_CASE("data parallel: each rank's pairs, the single process's objective on all of them (fp64, reference)",
          "[data-parallel]") {
    tpo::backend::reference backend;
    for (const dp_shape& shape : {equal_pairs(31, 2, 5, 4, 7), unequal_pairs(37, 4, 5, 6), equal_pairs(41, 1, 1, 3, 5)}) {
        for (auto& [name, options] : dp_cases()) {
            INFO(name << ", " << shape.pairs[static_cast<std::size_t>(world().rank())] << " pairs on rank "
                      << world().rank() << " of " << world().size() << ", L " << shape.lw << "/" << shape.ll);
            compare_data_parallel<double, double>(backend, options, shape, 1e-12);
        }
    }
    INFO("reference given as scores");
    tpo::objective_options o;
    o.losses = {{tpo::loss_type::aot_unpaired, 1.0}, {tpo::loss_type::sft, 0.5}};
    compare_data_parallel<double, double>(backend, o, unequal_pairs(43, 5, 4, 7), 1e-12, true);
}

TEST_CASE("data parallel: fp32 on the CPU backend", "[data-parallel]") {
    tpo::backend::cpu backend;
    for (auto& [name, options] : dp_cases()) {
        INFO(name);
        compare_data_parallel<float, float>(backend, options, equal_pairs(47, 2, 6, 5, 23), 1e-5);
        compare_data_parallel<float, float>(backend, options, unequal_pairs(53, 5, 6, 23), 1e-5);
    }
}

TEST_CASE("data parallel: losses that do not couple the batch give each rank's own objective (equal P)",
          "[data-parallel]") {
    tpo::backend::reference backend;
    tpo::objective_options options;
    options.losses = {{tpo::loss_type::sigmoid, 1.0}, {tpo::loss_type::ipo, 0.5}};
    options.use_weighting = true;
    const dp_shape shape = equal_pairs(59, 3, 5, 4, 9);
    const batch_data<double> mine = shape.part<double>(world().rank());
    auto own = tpo_test::evaluate_with_gradients<double>(backend, options, mine);
    gradient_data<double> grads(mine);
    auto views = grads.views();
    const auto r = tpo::dist::data_parallel_evaluate(backend, world(), options, mine.batch(), &views);
    tpo_test::check_close(r.losses, own.result.losses, 1e-12, "per-pair losses");
    tpo_test::check_close(r.grad_policy_chosen_scores, own.result.grad_policy_chosen_scores, 1e-12, "grad chosen");
    for (int k : {0, 1, 2, 3})
        check_tensor(grads.tensor(k), own.gradients.tensor(k), own.gradients.tensor(k), 1e-12, "gradient");
    INFO("the batch loss is the mean of the ranks' own losses");
    tpo_test::check_close({r.loss}, {sum_over_ranks(own.result.loss) / world().size()}, 1e-12, "loss");
}

namespace {

/// Pairs [first, first + count) of a hidden-state batch (the head is every rank's).
template <class T>
hidden_data<T> hidden_pairs(const hidden_data<T>& d, index_t first, index_t count) {
    hidden_data<T> out = d;
    for (auto [to, from] : {std::pair{&out.chosen, &d.chosen}, std::pair{&out.rejected, &d.rejected}}) {
        const index_t width = from->length * from->hidden;
        for (int k = 0; k < 4; ++k)
            to->tensor(k) = row_block(const_cast<tpo_test::hidden::hidden_side<T>*>(from)->tensor(k), width, first, count);
        to->labels = row_block(from->labels, from->length, first, count);
        to->weights = row_block(from->weights, from->length, first, count);
        to->pairs = count;
    }
    return out;
}

template <class T, class G, class Backend>
void compare_hidden_data_parallel(Backend& backend, const tpo::objective_options& options, const hidden_data<T>& whole,
                                  const dp_shape& shape, double tol) {
    using tpo_test::hidden::hidden_gradient_data;
    const int R = world().size(), me = world().rank();
    const index_t first = shape.first(me), P = shape.pairs[static_cast<std::size_t>(me)];
    hidden_gradient_data<G> single_grads(whole);
    auto single_views = single_grads.views(whole, whole.with_bias);
    const tpo::objective_result single = tpo::evaluate(backend, options, whole.batch(), &single_views);

    const hidden_data<T> mine = hidden_pairs(whole, first, P);
    hidden_gradient_data<G> grads(mine);
    auto views = grads.views(mine, mine.with_bias);
    const tpo::objective_result r = tpo::dist::data_parallel_evaluate(backend, world(), options, mine.batch(), &views);
    tpo_test::check_close({r.loss, r.reward_accuracy, r.reward_margin},
                          {single.loss, single.reward_accuracy, single.reward_margin}, tol, "loss, accuracy, margin");
    tpo_test::check_close(r.losses, scaled_rows(single.losses, 1, first, P), tol, "losses");
    const double inv = 1.0 / R;
    const bool noisy = options.weighting == tpo::token_weighting::self_calibrated;
    for (int k = 0; k < 4; ++k) {
        if (!noisy && (k == 1 || k == 3)) continue;
        INFO("hidden-state gradient " << k << " times 1/R");
        const auto& side = k < 2 ? whole.chosen : whole.rejected;
        const index_t width = side.length * side.hidden;
        check_tensor(scaled_rows(grads.hidden[k], width, 0, P, inv), scaled_rows(single_grads.hidden[k], width, first, P),
                     tpo_test::hidden::as_double(single_grads.hidden[k]), tol, "gradient of the hidden states");
    }
    INFO("the head's gradient averaged over the ranks (DDP)");
    const auto head_weight = sum_over_ranks(scaled_rows(grads.weight, 1, 0, static_cast<index_t>(grads.weight.size()), inv));
    const auto single_weight = tpo_test::hidden::as_double(single_grads.weight);
    check_tensor(head_weight, single_weight, single_weight, tol, "gradient of the head weight");
    if (whole.with_bias) {
        const auto head_bias = sum_over_ranks(scaled_rows(grads.bias, 1, 0, static_cast<index_t>(grads.bias.size()), inv));
        const auto single_bias = tpo_test::hidden::as_double(single_grads.bias);
        check_tensor(head_bias, single_bias, single_bias, tol, "gradient of the head bias");
    }
}

}  // namespace

TEST_CASE("data parallel with hidden states in: every rank's pairs, one head", "[data-parallel]") {
    tpo::backend::reference reference;
    tpo::backend::cpu cpu;
    const dp_shape shape = unequal_pairs(0, 5, 4, 11);
    std::mt19937_64 rng(61);
    const auto whole = tpo_test::hidden::random_hidden(rng, shape.first(world().size()), 5, 4, 6, 11);
    const auto whole_f = tpo_test::hidden::convert<float>(whole);
    for (auto& [name, options] : dp_cases()) {
        INFO(name);
        compare_hidden_data_parallel<double, double>(reference, options, whole, shape, 1e-12);
        compare_hidden_data_parallel<float, float>(cpu, options, whole_f, shape, 1e-5);
    }
}

TEST_CASE("data parallel: gradients against central differences of the cross-rank loss", "[data-parallel][fd]") {
    tpo::backend::reference backend;
    const int R = world().size();
    tpo::objective_options options;
    options.score = tpo::score_kind::prob;
    options.average = true;
    // (not WPO: its pair weight is a gradient constant)
    options.losses = {{tpo::loss_type::sigmoid, 1.0},
                      {tpo::loss_type::aot, 0.5},
                      {tpo::loss_type::aot_unpaired, 0.4},
                      {tpo::loss_type::sft, 0.3}};
    const dp_shape shape = unequal_pairs(67, 4, 3, 6);
    batch_data<double> mine = shape.part<double>(world().rank());
    gradient_data<double> grads(mine);
    auto views = grads.views();
    tpo::dist::data_parallel_evaluate(backend, world(), options, mine.batch(), &views);
    const double h = 1e-6;
    // Each rank in turn perturbs entries of its own pairs; every rank evaluates every step. The
    // rank's gradient is R·∂L/∂z.
    for (int owner = 0; owner < R; ++owner)
        for (int tensor : {0, 1, 2}) {
            for (int e = 0; e < 3; ++e) {
                batch_data<double> probe = mine;
                auto& z = (tensor < 2 ? probe.chosen : probe.rejected).tensor(tensor == 1 ? 1 : 0);
                const std::size_t at = static_cast<std::size_t>(e * 7 + 2 * tensor + 1) % z.size();
                const double original = z[at];
                double loss[2];
                for (int sign = 0; sign < 2; ++sign) {
                    if (world().rank() == owner) z[at] = original + (sign ? h : -h);
                    loss[sign] = tpo::dist::data_parallel_evaluate(backend, world(), options, probe.batch()).loss;
                }
                if (world().rank() == owner) {
                    const double fd = (loss[1] - loss[0]) / (2 * h);
                    const double g = grads.tensor(tensor)[at] / R;
                    INFO("rank " << owner << ", tensor " << tensor << ", entry " << at << ": " << fd << " vs " << g);
                    CHECK(std::abs(fd - g) <= 1e-6 * std::max(1.0, std::abs(g)));
                }
            }
        }
}

TEST_CASE("property: the data-parallel objective is the single-process objective on every rank's pairs",
          "[data-parallel][property]") {
    rc::prop("any pairs per rank, any shape, any loss case", [] {
        const int R = world().size(), me = world().rank();
        dp_shape shape;
        shape.pairs = *rc::gen::container<std::vector<index_t>>(static_cast<std::size_t>(R), rc::gen::inRange<index_t>(1, 4));
        shape.lw = *rc::gen::inRange<index_t>(1, 6);
        shape.ll = *rc::gen::inRange<index_t>(1, 6);
        shape.vocab = *rc::gen::inRange<index_t>(1, 12);
        shape.seed = *rc::gen::arbitrary<std::uint32_t>();
        const auto all = dp_cases();
        const auto& options = all[*rc::gen::inRange<std::size_t>(0, all.size())].second;
        tpo::backend::reference backend;
        const batch_data<double> whole = shape.whole<double>();
        auto single = tpo_test::evaluate_with_gradients<double>(backend, options, whole);
        const batch_data<double> mine = shape.part<double>(me);
        const index_t first = shape.first(me), P = mine.chosen.pairs;
        gradient_data<double> grads(mine);
        auto views = grads.views();
        const auto r = tpo::dist::data_parallel_evaluate(backend, world(), options, mine.batch(), &views);
        auto close = [](double a, double b) { return std::abs(a - b) <= 1e-12 * std::max(1.0, std::abs(b)); };
        bool ok = close(r.loss, single.result.loss);
        for (int k = 0; k < 4; ++k) {
            const index_t width = (k < 2 ? shape.lw : shape.ll) * shape.vocab;
            const auto got = scaled_rows(grads.tensor(k), width, 0, P, 1.0 / R);
            const auto expected = scaled_rows(single.gradients.tensor(k), width, first, P);
            for (std::size_t i = 0; i < expected.size(); ++i) ok = ok && close(got[i], expected[i]);
        }
        // Agreed, so that every rank fails, and shrinks, on the same case.
        RC_ASSERT(on_every_rank(ok));
    });
}

// ---- errors: one rank's bad input is every rank's error, and nothing hangs

namespace {

/// Runs `f` on every rank, expecting every rank to throw E; checks that all messages equal rank
/// 0's, that it contains `needle`, and that it took seconds, not a hang.
template <class E, class F>
void expect_everywhere(F&& f, const std::string& needle) {
    const auto start = std::chrono::steady_clock::now();
    std::string message;
    bool thrown = false;
    try {
        f();
    } catch (const E& e) {
        thrown = true;
        message = e.what();
    } catch (const std::exception& e) {
        message = std::string("wrong exception type: ") + e.what();
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    INFO("rank " << world().rank() << ": " << message);
    CHECK(thrown);
    CHECK(message.find(needle) != std::string::npos);
    CHECK(seconds < 10.0);
    std::string first = message;
    world().host_broadcast(first, 0);
    CHECK(message == first);
}

}  // namespace

TEST_CASE("errors seen by one rank are the same error on every rank", "[errors]") {
    tpo::backend::reference backend;
    const int R = world().size(), last = R - 1;
    const bool me = world().rank() == last;
    const auto data = make_batch<double>(3, 2, 5, 4, 10);
    const auto shard = my_shard(10);
    tpo::objective_options options;
    auto run = [&](const batch_data<double>& d, tpo::dist::vocab_shard s) {
        gradient_data<double> g(d);
        auto views = g.views();
        return tpo::dist::evaluate(backend, world(), options, s, d.batch(), &views);
    };

    SECTION("a NaN in the last rank's slice") {
        batch_data<double> local = slice(data, shard);
        local.rejected.labels[2] = 3;  // row 1 is scored
        if (me) local.rejected.policy[1 * local.rejected.vocab] = std::numeric_limits<double>::quiet_NaN();
        expect_everywhere<tpo::value_error>([&] { run(local, shard); },
                                            "rejected policy logits at sequence 0, position 2: the row holds a NaN");
    }
    SECTION("a label outside [0, V) given to the last rank only") {
        batch_data<double> local = slice(data, shard);
        if (me) local.chosen.labels[3] = 10;
        expect_everywhere<tpo::value_error>([&] { run(local, shard); },
                                            "chosen labels: label 10 at sequence 0, position 3 is outside [0, 10)");
    }
    SECTION("labels that differ between ranks, each in range") {
        batch_data<double> local = slice(data, shard);
        if (me && R > 1) local.chosen.labels[2] = local.chosen.labels[2] == 4 ? 5 : 4;
        if (R > 1)
            expect_everywhere<tpo::shape_error>([&] { run(local, shard); }, "disagree on the chosen labels");
    }
    SECTION("slices that do not add up to V") {
        tpo::dist::vocab_shard s = shard;
        if (me) s.size -= 1;
        batch_data<double> local = slice(data, s);
        expect_everywhere<tpo::shape_error>([&] { run(local, s); }, "vocabulary ids in all, expected V = 10");
    }
    SECTION("a slice whose width is not the rank's shard") {
        tpo::dist::vocab_shard wide = shard;
        if (me) wide.size += shard.offset + shard.size < 10 ? 1 : -1;
        batch_data<double> local = slice(data, wide);
        expect_everywhere<tpo::shape_error>([&] { run(local, shard); }, "policy logits: ");
    }
    SECTION("a batch shape that differs on one rank") {
        const auto longer = make_batch<double>(3, 2, me ? 6 : 5, 4, 10);
        batch_data<double> local = slice(longer, shard);
        if (R > 1) expect_everywhere<tpo::shape_error>([&] { run(local, shard); }, "disagree on the chosen length L");
    }
    SECTION("a NaN in the last rank's rows of the lm_head") {
        std::mt19937_64 rng(4);
        const auto hidden = tpo_test::hidden::random_hidden(rng, 2, 4, 3, 5, 10);
        auto local = hidden_slice(hidden, shard);
        if (me) local.weight[local.hidden + 2] = std::numeric_limits<double>::infinity();
        const std::string row = std::to_string(shard.offset + 1);
        std::string expected_row = row;
        world().host_broadcast(expected_row, last);
        expect_everywhere<tpo::value_error>(
            [&] { tpo::dist::evaluate(backend, world(), options, shard, local.batch()); },
            "lm_head: row " + expected_row + " of the weight holds a NaN");
    }
    // Data parallelism: each rank its own pairs (here the same draw on every rank but the last).
    const auto own = make_batch<double>(3 + static_cast<std::uint64_t>(world().rank()), 2, 5, 4, 10);
    auto run_dp = [&](const batch_data<double>& d, const tpo::objective_options& o) {
        gradient_data<double> g(d);
        auto views = g.views();
        return tpo::dist::data_parallel_evaluate(backend, world(), o, d.batch(), &views);
    };
    const std::string last_rank = "data-parallel rank " + std::to_string(last) + ": ";
    SECTION("data parallel: a NaN in the last rank's pairs") {
        batch_data<double> mine = own;
        mine.rejected.labels[2] = 3;
        if (me) mine.rejected.policy[1 * mine.rejected.vocab] = std::numeric_limits<double>::quiet_NaN();
        expect_everywhere<tpo::value_error>(
            [&] { run_dp(mine, options); },
            last_rank + "rejected policy logits at sequence 0, position 2: the row holds a NaN");
    }
    SECTION("data parallel: a label outside [0, V) in the last rank's pairs") {
        batch_data<double> mine = own;
        if (me) mine.chosen.labels[3] = 10;
        expect_everywhere<tpo::value_error>(
            [&] { run_dp(mine, options); },
            last_rank + "chosen labels: label 10 at sequence 0, position 3 is outside [0, 10)");
    }
    SECTION("data parallel: options that differ on one rank") {
        tpo::objective_options other = options;
        if (me) other.hyper.beta = 0.2;
        if (R > 1)
            expect_everywhere<tpo::shape_error>([&] { run_dp(own, other); },
                                                "data-parallel ranks disagree on the objective options");
    }
    SECTION("data parallel: a gradient of the wrong shape on the last rank (backward)") {
        gradient_data<double> g(own);
        auto views = g.views();
        if (me) views.rejected.policy.length -= 1;
        expect_everywhere<tpo::shape_error>(
            [&] { tpo::dist::data_parallel_evaluate(backend, world(), options, own.batch(), &views); },
            last_rank + "rejected gradient of policy logits");
    }
    SECTION("data parallel: an overflow in the last rank's pairs, named by its pair in the whole batch") {
        batch_data<double> mine = own;
        if (me) {  // log-probabilities of -2e308: the reference score of chosen sequence 0 is -inf
            auto& z = mine.chosen.reference;
            for (std::size_t i = 0; i < z.size(); ++i) z[i] = i % 10 == 0 ? 1e308 : -1e308;
            for (index_t t = 1; t < mine.chosen.length; ++t) mine.chosen.labels[static_cast<std::size_t>(t)] = 3;
        }
        expect_everywhere<tpo::overflow_error>(
            [&] { run_dp(mine, options); },
            "result: chosen reference sequence score of pair " + std::to_string(2 * last) + " is -inf");
    }
    // Whatever failed above, the ranks still talk to each other.
    const auto good = run(slice(data, shard), shard);
    CHECK(std::isfinite(run_dp(own, options).loss));
    CHECK(std::isfinite(good.loss));
}

int main(int argc, char** argv) {
    MPI_Init(&argc, &argv);
    // Every rank must draw the same property cases, or the ranks would evaluate different batches
    // and disagree (an error, by design). RapidCheck seeds itself at random unless RC_PARAMS names
    // a seed, and reads RC_PARAMS on first use: rank 0's parameters, with a seed, go to every rank.
    {
        const char* given = std::getenv("RC_PARAMS");
        std::string params = given ? given : "";
        if (params.find("seed=") == std::string::npos) params += " seed=20261204";
        world().host_broadcast(params, 0);
        setenv("RC_PARAMS", params.c_str(), 1);
    }
    int code = Catch::Session().run(argc, argv);
    int worst = 0;
    MPI_Allreduce(&code, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    MPI_Finalize();
    return worst;
}
