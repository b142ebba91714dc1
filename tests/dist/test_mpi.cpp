// The vocabulary-sharded objective on MPI (run by ctest under mpirun with 1 to 4 ranks): every
// rank's results and gradient slices against the single-process objective on the whole
// vocabulary, finite differences of the sharded loss, a property over random shapes, and errors
// that one rank sees alone, which must become the same error on every rank within seconds.
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
#include <tpo/dist/mpi.hpp>
#include <tpo/dist/sharded.hpp>

#include "support/agreement.hpp"
#include "support/batch.hpp"
#include "support/hidden.hpp"

namespace {

using tpo::index_t;
using tpo_test::batch_data;
using tpo_test::gradient_data;
using tpo_test::hidden::hidden_data;

tpo::dist::mpi_communicator& world() {
    static tpo::dist::mpi_communicator comm(MPI_COMM_WORLD);
    return comm;
}

tpo::dist::vocab_shard my_shard(index_t vocab) { return tpo::dist::vocab_shard::even(vocab, world().size(), world().rank()); }

/// Columns [offset, offset + size) of every row of a (rows × vocab) tensor.
template <class T>
std::vector<T> columns(const std::vector<T>& full, index_t vocab, index_t offset, index_t size) {
    std::vector<T> out;
    if (full.empty()) return out;
    const index_t rows = static_cast<index_t>(full.size()) / vocab;
    for (index_t r = 0; r < rows; ++r)
        out.insert(out.end(), full.begin() + r * vocab + offset, full.begin() + r * vocab + offset + size);
    return out;
}

/// Rows [first, first + count) of a (rows × width) tensor.
template <class T>
std::vector<T> row_block(const std::vector<T>& full, index_t width, index_t first, index_t count) {
    if (full.empty()) return {};
    return std::vector<T>(full.begin() + first * width, full.begin() + (first + count) * width);
}

template <class T>
batch_data<T> slice(const batch_data<T>& d, const tpo::dist::vocab_shard& s) {
    batch_data<T> out = d;
    for (auto* side : {&out.chosen, &out.rejected}) {
        for (int k = 0; k < 4; ++k) side->tensor(k) = columns(side->tensor(k), d.chosen.vocab, s.offset, s.size);
        side->vocab = s.size;
    }
    return out;
}

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

template <class T>
batch_data<T> make_batch(std::uint64_t seed, index_t pairs, index_t lw, index_t ll, index_t vocab) {
    std::mt19937_64 rng(seed);
    return tpo_test::convert<T>(tpo_test::random_batch<double>(rng, pairs, lw, ll, vocab));
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

template <class T>
hidden_data<T> hidden_slice(const hidden_data<T>& d, const tpo::dist::vocab_shard& s) {
    hidden_data<T> out = d;
    out.vocab = s.size;
    out.weight = row_block(d.weight, d.hidden, s.offset, s.size);
    out.reference_weight = row_block(d.reference_weight, d.hidden, s.offset, s.size);
    out.bias = row_block(d.bias, 1, s.offset, s.size);
    out.reference_bias = row_block(d.reference_bias, 1, s.offset, s.size);
    return out;
}

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
    // Whatever failed above, the ranks still talk to each other.
    const auto good = run(slice(data, shard), shard);
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
