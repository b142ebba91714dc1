// tpo::libtorch::process_group_communicator (tpo/torch_dist.hpp) on c10d's Gloo process group:
// R = 1, 2, 3 ranks as threads of this process, each with its own ProcessGroupGloo over one shared
// c10d::HashStore and the loopback interface. The collectives on values whose results follow from
// the ranks alone; tpo::dist::evaluate on each rank's vocabulary slice against the single-process
// tpo::evaluate on the whole vocabulary (logits and hidden states in, fp64 on the reference backend
// and fp32 on the CPU backend); tpo::dist::data_parallel_evaluate on each rank's pairs against the
// single process on all of them; a NaN in one rank's slice, which must become the same error on
// every rank within seconds; and a failure of c10d itself (a rank that leaves a collective
// unanswered), which must become a tpo::error.
#include <tpo/torch_dist.hpp>

#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <functional>
#include <limits>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <tpo/backend/cpu.hpp>
#include <tpo/backend/reference.hpp>
#include <tpo/dist/data_parallel.hpp>
#include <tpo/dist/sharded.hpp>

#include "support/batch.hpp"
#include "support/hidden.hpp"
#include "support/shards.hpp"

namespace {

using tpo::index_t;
using tpo_test::batch_data;
using tpo_test::gradient_data;
using tpo_test::hidden::hidden_data;
using namespace tpo_test::shards;
using communicator = tpo::libtorch::process_group_communicator;

int failures = 0;

/// What one rank found: its failed checks, and how many it made.
struct rank_checks {
    int rank = 0;
    int checks = 0;
    std::vector<std::string> failed;

    void expect(bool ok, const std::string& what) {
        ++checks;
        if (!ok && failed.size() < 8) failed.push_back(what);
    }
};

std::string describe(double x) {
    std::ostringstream s;
    s.precision(17);
    s << x;
    return s.str();
}

/// The loopback interface: the ranks are threads of this process.
c10::intrusive_ptr<c10d::ProcessGroupGloo> gloo_group(const c10::intrusive_ptr<c10d::Store>& store, int rank, int ranks,
                                                      std::chrono::milliseconds timeout) {
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, ranks, options);
}

/// Runs `body` on R ranks (threads, each with its Gloo process group over one fresh store) and
/// reports what every rank found; an exception out of `body` is a failure of that rank.
void on_ranks(int R, const std::string& name, const std::function<void(communicator&, rank_checks&)>& body,
              std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
    auto store = c10::make_intrusive<c10d::HashStore>();
    std::vector<rank_checks> found(static_cast<std::size_t>(R));
    std::vector<std::thread> threads;
    for (int r = 0; r < R; ++r)
        threads.emplace_back([&, r] {
            rank_checks& mine = found[static_cast<std::size_t>(r)];
            mine.rank = r;
            try {
                communicator comm(gloo_group(store, r, R, timeout));
                mine.expect(comm.rank() == r && comm.size() == R, "rank() and size() are the group's");
                body(comm, mine);
            } catch (const std::exception& e) {
                mine.expect(false, std::string("threw: ") + e.what());
            }
        });
    for (auto& t : threads) t.join();
    int checks = 0;
    bool ok = true;
    for (const rank_checks& f : found) {
        checks += f.checks;
        for (const std::string& what : f.failed) {
            std::printf("FAILED %s, %d ranks, rank %d: %s\n", name.c_str(), R, f.rank, what.c_str());
            ok = false;
        }
    }
    if (ok) std::printf("ok     %s, %d ranks (%d checks)\n", name.c_str(), R, checks);
    else ++failures;
    std::fflush(stdout);
}

// ---- the collectives themselves

void collectives(communicator& comm, rank_checks& c) {
    const int r = comm.rank(), R = comm.size();
    double max[3] = {static_cast<double>(r), -static_cast<double>(r), r == R - 1 ? 7.5 : -1.0};
    comm.all_reduce_max(max, 3);
    c.expect(max[0] == R - 1 && max[1] == 0 && max[2] == 7.5, "all_reduce_max of (r, -r, 7.5 on the last rank)");
    double sum[2] = {static_cast<double>(r), 0.25};
    comm.all_reduce_sum(sum, 2);
    c.expect(sum[0] == R * (R - 1) / 2.0 && sum[1] == 0.25 * R, "all_reduce_sum of (r, 1/4) in double");
    float sum_f[2] = {static_cast<float>(r) + 0.5f, -1.0f};
    comm.all_reduce_sum(sum_f, 2);
    c.expect(sum_f[0] == static_cast<float>(R * (R - 1) / 2.0 + 0.5 * R) && sum_f[1] == static_cast<float>(-R),
             "all_reduce_sum of (r + 1/2, -1) in float");
    double host[2] = {-static_cast<double>(r), std::numeric_limits<double>::infinity() * (r == 0 ? 1 : -1)};
    comm.host_all_reduce_max(host, 2);
    c.expect(host[0] == 0 && host[1] == std::numeric_limits<double>::infinity(), "host_all_reduce_max with an infinity");
    comm.all_reduce_max(max, 0);  // nothing to reduce: no collective on any rank
    for (int root = 0; root < R; ++root) {
        std::string s = r == root ? "from rank " + std::to_string(root) + std::string(1, '\0') + " with a NUL" : "x";
        comm.host_broadcast(s, root);
        c.expect(s == "from rank " + std::to_string(root) + std::string(1, '\0') + " with a NUL",
                 "host_broadcast from rank " + std::to_string(root));
    }
    std::string empty = r == 0 ? "" : "not empty on this rank";
    comm.host_broadcast(empty, 0);
    c.expect(empty.empty(), "host_broadcast of an empty string");
    try {
        std::string s;
        comm.host_broadcast(s, R);
        c.expect(false, "a broadcast from rank R throws");
    } catch (const tpo::error& e) {
        c.expect(std::string(e.what()).find("broadcast from rank " + std::to_string(R) + ", expected 0 <= root < " +
                                            std::to_string(R)) != std::string::npos,
                 std::string("a broadcast from rank R: ") + e.what());
    }
}

// ---- the vocabulary split

/// |a − b| ≤ tol·max(1, |b|) element-wise, b the single process's value.
void check_values(rank_checks& c, const std::vector<double>& a, const std::vector<double>& b, double tol,
                  const std::string& what) {
    bool ok = a.size() == b.size();
    std::string first;
    for (std::size_t i = 0; ok && i < a.size(); ++i)
        if (!(std::abs(a[i] - b[i]) <= tol * std::max(1.0, std::abs(b[i])))) {
            ok = false;
            first = "[" + std::to_string(i) + "]: " + describe(a[i]) + " vs " + describe(b[i]);
        }
    c.expect(ok, what + (a.size() == b.size() ? first : " has another size"));
}

/// |a − b| ≤ tol·(|b| + max|full|) per entry of a rank's part of a tensor: norm-wise relative, as the
/// MPI tests check gradients (R partial log-sum-exps merged, many rows' terms summed).
template <class A, class B>
void check_tensor(rank_checks& c, const std::vector<A>& a, const std::vector<B>& b, const std::vector<B>& full,
                  double tol, const std::string& what) {
    double scale = 0;
    for (const B& x : full) scale = std::max(scale, std::abs(tpo::widen<double>(x)));
    bool ok = a.size() == b.size();
    std::string first;
    for (std::size_t i = 0; ok && i < a.size(); ++i) {
        const double x = tpo::widen<double>(a[i]), y = tpo::widen<double>(b[i]);
        if (!(std::abs(x - y) <= tol * (std::abs(y) + scale))) {
            ok = false;
            first = "[" + std::to_string(i) + "]: " + describe(x) + " vs " + describe(y);
        }
    }
    c.expect(ok, what + (a.size() == b.size() ? first : " has another size"));
}

void check_results(rank_checks& c, const tpo::objective_result& a, const tpo::objective_result& b, double tol) {
    check_values(c, {a.loss, a.reward_accuracy, a.reward_margin}, {b.loss, b.reward_accuracy, b.reward_margin}, tol,
                 "loss, accuracy, margin");
    check_values(c, a.losses, b.losses, tol, "losses");
    check_values(c, a.chosen_rewards, b.chosen_rewards, tol, "chosen rewards");
    check_values(c, a.rejected_rewards, b.rejected_rewards, tol, "rejected rewards");
    check_values(c, a.policy_chosen_scores, b.policy_chosen_scores, tol, "policy chosen scores");
    check_values(c, a.policy_rejected_scores, b.policy_rejected_scores, tol, "policy rejected scores");
    check_values(c, a.reference_chosen_scores, b.reference_chosen_scores, tol, "reference chosen scores");
    check_values(c, a.reference_rejected_scores, b.reference_rejected_scores, tol, "reference rejected scores");
    check_values(c, a.mean_visual_score_chosen, b.mean_visual_score_chosen, tol, "visual chosen");
    check_values(c, a.mean_visual_score_rejected, b.mean_visual_score_rejected, tol, "visual rejected");
    check_values(c, a.chosen_tokens, b.chosen_tokens, 0, "chosen tokens");
    check_values(c, a.rejected_tokens, b.rejected_tokens, 0, "rejected tokens");
    check_values(c, a.grad_policy_chosen_scores, b.grad_policy_chosen_scores, tol, "grad chosen scores");
    check_values(c, a.grad_policy_rejected_scores, b.grad_policy_rejected_scores, tol, "grad rejected scores");
}

/// TPO as it comes, plain DPO (sigmoid), WPO's pair weights, and the `prob` visual score.
std::vector<std::pair<std::string, tpo::objective_options>> option_cases() {
    std::vector<std::pair<std::string, tpo::objective_options>> out;
    tpo::objective_options o;
    out.emplace_back("tpo default", o);
    o.weighting = tpo::token_weighting::none;
    o.losses = {{tpo::loss_type::sigmoid, 1.0}};
    out.emplace_back("dpo sigmoid", o);
    o = {};
    o.use_weighting = true;
    out.emplace_back("tpo wpo", o);
    o = {};
    o.score = tpo::score_kind::prob;
    out.emplace_back("tpo prob score", o);
    return out;
}

/// Every rank's slice of a logits batch through dist::evaluate against the single process.
template <class T, class Backend>
void sharded_logits(int R, const std::string& name, const tpo::objective_options& options, const batch_data<T>& data,
                    double tol) {
    Backend single_backend = Backend();
    auto single = tpo_test::evaluate_with_gradients<T>(single_backend, options, data);
    const index_t vocab = data.chosen.vocab;
    on_ranks(R, name, [&](communicator& comm, rank_checks& c) {
        Backend backend = Backend();
        const auto shard = tpo::dist::vocab_shard::even(vocab, comm.size(), comm.rank());
        const batch_data<T> local = slice(data, shard);
        gradient_data<T> grads(local);
        auto views = grads.views();
        const tpo::objective_result r = tpo::dist::evaluate(backend, comm, options, shard, local.batch(), &views);
        check_results(c, r, single.result, tol);
        const bool noisy = options.weighting == tpo::token_weighting::self_calibrated;
        for (int k = 0; k < 4; ++k) {
            if (!noisy && (k == 1 || k == 3)) continue;
            check_tensor(c, grads.tensor(k), columns(single.gradients.tensor(k), vocab, shard.offset, shard.size),
                         single.gradients.tensor(k), tol, "gradient of policy tensor " + std::to_string(k));
        }
    });
}

/// Every rank's rows of the lm_head (the hidden states whole) against the single process.
template <class T, class Backend>
void sharded_hidden(int R, const std::string& name, const tpo::objective_options& options, const hidden_data<T>& data,
                    double tol) {
    using tpo_test::hidden::hidden_gradient_data;
    Backend single_backend = Backend();
    hidden_gradient_data<T> single_grads(data);
    auto single_views = single_grads.views(data, data.with_bias);
    const tpo::objective_result single = tpo::evaluate(single_backend, options, data.batch(), &single_views);
    on_ranks(R, name, [&](communicator& comm, rank_checks& c) {
        Backend backend = Backend();
        const auto shard = tpo::dist::vocab_shard::even(data.vocab, comm.size(), comm.rank());
        const hidden_data<T> local = hidden_slice(data, shard);
        hidden_gradient_data<T> grads(local);
        auto views = grads.views(local, local.with_bias);
        const tpo::objective_result r = tpo::dist::evaluate(backend, comm, options, shard, local.batch(), &views);
        check_results(c, r, single, tol);
        for (int k = 0; k < 4; ++k)
            check_tensor(c, grads.hidden[k], single_grads.hidden[k], single_grads.hidden[k], tol,
                         "gradient of hidden states " + std::to_string(k) + " (summed over the ranks)");
        check_tensor(c, grads.weight, row_block(single_grads.weight, data.hidden, shard.offset, shard.size),
                     single_grads.weight, tol, "gradient of the head weight");
        check_tensor(c, grads.bias, row_block(single_grads.bias, 1, shard.offset, shard.size), single_grads.bias, tol,
                     "gradient of the head bias");
    });
}

// ---- data parallelism

/// Rank k's pairs: pairs[k] pairs drawn from seed + k, of one shape, so that they concatenate.
template <class T>
struct dp_batches {
    std::vector<batch_data<T>> parts;
    batch_data<T> whole;

    dp_batches(std::uint64_t seed, const std::vector<index_t>& pairs, index_t lw, index_t ll, index_t vocab) {
        for (std::size_t k = 0; k < pairs.size(); ++k) parts.push_back(make_batch<T>(seed + k, pairs[k], lw, ll, vocab));
        whole = parts[0];
        for (std::size_t k = 1; k < parts.size(); ++k)
            for (auto [to, from] : {std::pair{&whole.chosen, &parts[k].chosen}, std::pair{&whole.rejected, &parts[k].rejected}}) {
                for (int t = 0; t < 4; ++t) to->tensor(t).insert(to->tensor(t).end(), from->tensor(t).begin(), from->tensor(t).end());
                to->labels.insert(to->labels.end(), from->labels.begin(), from->labels.end());
                to->weights.insert(to->weights.end(), from->weights.begin(), from->weights.end());
                to->pairs += from->pairs;
            }
    }
};

/// Each rank's pairs through dist::data_parallel_evaluate: the loss and metrics are the whole
/// batch's, the per-pair values the rank's rows of the single process's, and the rank's gradient
/// times 1/R (what a DDP average takes from it) the single process's gradient of its pairs.
template <class T, class Backend>
void data_parallel(int R, const std::string& name, const tpo::objective_options& options, double tol) {
    std::vector<index_t> pairs;
    for (int k = 0; k < R; ++k) pairs.push_back(1 + (2 * k + 1) % 3);  // 2, 1, 3
    const dp_batches<T> data(61, pairs, 5, 4, 11);
    Backend single_backend = Backend();
    auto single = tpo_test::evaluate_with_gradients<T>(single_backend, options, data.whole);
    const tpo::objective_result& s = single.result;
    const index_t N = data.whole.chosen.pairs;
    on_ranks(R, name, [&](communicator& comm, rank_checks& c) {
        Backend backend = Backend();
        const int me = comm.rank();
        const batch_data<T>& mine = data.parts[static_cast<std::size_t>(me)];
        index_t first = 0;
        for (int k = 0; k < me; ++k) first += pairs[static_cast<std::size_t>(k)];
        const index_t P = mine.chosen.pairs;
        gradient_data<T> grads(mine);
        auto views = grads.views();
        const tpo::objective_result r = tpo::dist::data_parallel_evaluate(backend, comm, options, mine.batch(), &views);
        const double inv = 1.0 / R;
        check_values(c, {r.loss, r.reward_accuracy, r.reward_margin}, {s.loss, s.reward_accuracy, s.reward_margin}, tol,
                     "loss, accuracy, margin of the whole batch");
        check_values(c, r.losses, scaled_rows(s.losses, 1, first, P), tol, "losses");
        check_values(c, r.chosen_rewards, scaled_rows(s.chosen_rewards, 1, first, P), tol, "chosen rewards");
        check_values(c, r.rejected_rewards, scaled_rows(s.rejected_rewards, 1, first, P), tol, "rejected rewards");
        check_values(c, r.policy_chosen_scores, scaled_rows(s.policy_chosen_scores, 1, first, P), tol, "policy chosen");
        check_values(c, r.policy_rejected_scores, scaled_rows(s.policy_rejected_scores, 1, first, P), tol,
                     "policy rejected");
        check_values(c, r.chosen_tokens, scaled_rows(s.chosen_tokens, 1, first, P), 0, "chosen tokens");
        check_values(c, scaled_rows(r.grad_policy_chosen_scores, 1, 0, P, inv),
                     scaled_rows(s.grad_policy_chosen_scores, 1, first, P), tol, "grad chosen scores / R");
        check_values(c, scaled_rows(r.grad_policy_rejected_scores, 1, 0, P, inv),
                     scaled_rows(s.grad_policy_rejected_scores, 1, first, P), tol, "grad rejected scores / R");
        const bool noisy = options.weighting == tpo::token_weighting::self_calibrated;
        for (int k = 0; k < 4; ++k) {
            if (!noisy && (k == 1 || k == 3)) continue;
            const index_t width = (k < 2 ? mine.chosen.length : mine.rejected.length) * mine.chosen.vocab;
            check_tensor(c, scaled_rows(grads.tensor(k), width, 0, P, inv),
                         scaled_rows(single.gradients.tensor(k), width, first, P),
                         scaled_rows(single.gradients.tensor(k), width, 0, N), tol,
                         "gradient of policy tensor " + std::to_string(k) + " times 1/R");
        }
    });
}

// ---- errors

/// A NaN in the last rank's slice only: every rank throws the same tpo::value_error, in seconds.
void nan_on_one_rank(int R) {
    const auto data = make_batch<double>(3, 2, 5, 4, 10);
    std::vector<std::string> messages(static_cast<std::size_t>(R));
    on_ranks(R, "a NaN in the last rank's slice: the same error on every rank", [&](communicator& comm, rank_checks& c) {
        tpo::backend::reference backend;
        const auto shard = tpo::dist::vocab_shard::even(10, comm.size(), comm.rank());
        batch_data<double> local = slice(data, shard);
        local.rejected.labels[2] = 3;  // row 1 is scored (it predicts position 2)
        if (comm.rank() == comm.size() - 1)
            local.rejected.policy[1 * static_cast<std::size_t>(local.rejected.vocab)] = std::numeric_limits<double>::quiet_NaN();
        gradient_data<double> grads(local);
        auto views = grads.views();
        const auto start = std::chrono::steady_clock::now();
        std::string& message = messages[static_cast<std::size_t>(comm.rank())];
        try {
            tpo::dist::evaluate(backend, comm, tpo::objective_options{}, shard, local.batch(), &views);
            c.expect(false, "no error");
        } catch (const tpo::value_error& e) {
            message = e.what();
        }
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        c.expect(message.find("rejected policy logits at sequence 0, position 2: the row holds a NaN") != std::string::npos,
                 "the message names the row: " + message);
        c.expect(seconds < 10.0, "thrown within 10 s (" + describe(seconds) + " s)");
    });
    bool same = true;
    for (const std::string& m : messages) same = same && m == messages[0];
    std::printf("%s every rank's message is rank 0's: %s\n", same ? "ok    " : "FAILED", messages[0].c_str());
    if (!same) ++failures;
}

/// A collective that one rank never joins: Gloo's timeout on the waiting rank becomes a tpo::error
/// that names the backend, the rank and the collective.
void unanswered_collective() {
    std::mutex m;
    std::condition_variable cv;
    bool waited = false;
    std::string message;
    on_ranks(
        2, "a collective one rank leaves unanswered: tpo::error from c10d's timeout",
        [&](communicator& comm, rank_checks& c) {
            if (comm.rank() == 1) {  // keeps its group alive until rank 0 has given up
                std::unique_lock<std::mutex> lock(m);
                cv.wait(lock, [&] { return waited; });
                return;
            }
            double x = 1;
            const auto start = std::chrono::steady_clock::now();
            try {
                comm.all_reduce_max(&x, 1);
                c.expect(false, "no error");
            } catch (const tpo::error& e) {
                message = e.what();
                c.expect(message.rfind("c10d process group (gloo, rank 0 of 2): allreduce max failed: ", 0) == 0,
                         "the message names the group and the collective: " + message);
            }
            const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            c.expect(seconds < 20.0, "after the group's timeout (" + describe(seconds) + " s)");
            {
                std::lock_guard<std::mutex> lock(m);
                waited = true;
            }
            cv.notify_all();
        },
        std::chrono::seconds(4));
    std::printf("       its message: %s\n", message.c_str());
}

}  // namespace

int main() {
    try {
        tpo::libtorch::process_group_communicator null_group(c10::intrusive_ptr<c10d::ProcessGroup>{});
        std::printf("FAILED a null process group is refused\n");
        ++failures;
    } catch (const tpo::error& e) {
        std::printf("ok     a null process group is refused: %s\n", e.what());
    }

    if (!torch::cuda::is_available()) {
        on_ranks(1, "CUDA buffers refused where libtorch sees no CUDA device", [](communicator& comm, rank_checks& c) {
            try {
                tpo::libtorch::process_group_communicator cuda(comm.native(), torch::kCUDA);
                c.expect(false, "no error");
            } catch (const tpo::error& e) {
                c.expect(std::string(e.what()).find("buffers on CUDA, but this libtorch sees no CUDA device") !=
                             std::string::npos,
                         e.what());
            }
        });
    }

    for (int R : {1, 2, 3}) {
        on_ranks(R, "the collectives", collectives);
        const auto data = make_batch<double>(20, 3, 6, 5, 13);
        const auto data_f = make_batch<float>(11, 3, 7, 6, 37);
        for (const auto& [name, options] : option_cases()) {
            sharded_logits<double, tpo::backend::reference>(R, "vocabulary split, logits, fp64, reference backend: " + name,
                                                            options, data, 1e-12);
            sharded_logits<float, tpo::backend::cpu>(R, "vocabulary split, logits, fp32, CPU backend: " + name, options,
                                                     data_f, 1e-5);
        }
        std::mt19937_64 rng(23);
        const auto hidden = tpo_test::hidden::random_hidden(rng, 2, 5, 4, 6, 11);
        sharded_hidden<double, tpo::backend::reference>(R, "vocabulary split, hidden states, fp64, reference backend",
                                                        tpo::objective_options{}, hidden, 1e-12);
        sharded_hidden<float, tpo::backend::cpu>(R, "vocabulary split, hidden states, fp32, CPU backend",
                                                 tpo::objective_options{}, tpo_test::hidden::convert<float>(hidden), 1e-5);
        tpo::objective_options coupled;
        coupled.losses = {{tpo::loss_type::sigmoid, 1.0}, {tpo::loss_type::aot, 0.5}, {tpo::loss_type::sft, 0.3}};
        data_parallel<double, tpo::backend::reference>(R, "data parallel, fp64, reference backend: tpo sigmoid + aot + sft",
                                                       coupled, 1e-12);
        data_parallel<float, tpo::backend::cpu>(R, "data parallel, fp32, CPU backend: tpo default",
                                                tpo::objective_options{}, 1e-5);
        nan_on_one_rank(R);
    }
    unanswered_collective();

    std::printf(failures ? "%d group(s) FAILED\n" : "all passed\n", failures);
    return failures ? 1 : 0;
}
