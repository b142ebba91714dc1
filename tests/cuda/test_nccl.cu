// The vocabulary-sharded objective on a CUDA GPU through the Thrust CUDA backend (row statistics,
// exchange buffers and coefficients stay in device memory):
//   - one rank through the real NCCL communicator (ncclCommInitAll on device 0), logits and hidden
//     states in, against the unsharded objective on the same device, and an input error that goes
//     through NCCL's agreement (all-reduce and broadcast);
//   - 2 to 4 ranks as threads on the one GPU, each with its own stream and backend, through a
//     test communicator that reduces device buffers through the host: NCCL itself refuses two
//     ranks of one communicator on one device, so its multi-rank collectives need as many GPUs;
//   - the data-parallel objective the same way, each rank's pairs on the device against the
//     single process on all of them.
// Needs a GPU to run (scripts/device-check); CI compiles and links it.

#include <catch2/catch.hpp>

#include <cuda_runtime.h>
#include <nccl.h>
#include <thrust/device_vector.h>

#include <barrier>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <tpo/backend/thrust.hpp>
#include <tpo/dist/data_parallel.hpp>
#include <tpo/dist/nccl.hpp>
#include <tpo/dist/sharded.hpp>
#include <tpo/tpo.hpp>

#include "support/agreement.hpp"
#include "support/batch.hpp"
#include "support/hidden.hpp"

using cuda_backend = tpo::backend::thrust<thrust::cuda::tag>;
using tpo::index_t;

namespace {

void cuda_check(cudaError_t e) { REQUIRE(e == cudaSuccess); }

/// A side's tensors (the columns [offset, offset + size) of each) on the device.
template <class T>
struct device_side {
    thrust::device_vector<T> z[4];
    thrust::device_vector<std::int64_t> labels;
    thrust::device_vector<float> weights;
    thrust::device_vector<T> grad[2];
    index_t pairs, length, width;

    device_side(const tpo_test::side_data<T>& s, index_t offset, index_t size)
        : pairs(s.pairs), length(s.length), width(size) {
        for (int k = 0; k < 4; ++k) {
            const auto& full = const_cast<tpo_test::side_data<T>&>(s).tensor(k);
            std::vector<T> part;
            for (index_t r = 0; r < s.pairs * s.length; ++r)
                part.insert(part.end(), full.begin() + r * s.vocab + offset, full.begin() + r * s.vocab + offset + size);
            z[k] = part;
        }
        labels = s.labels;
        weights = s.weights;
        for (auto& g : grad) g.resize(static_cast<std::size_t>(pairs * length * width));
    }
    tpo::side_batch<T, std::int64_t> batch() {
        auto v = [&](int k) { return tpo::logits_view<const T>(tpo::logits_of(z[k], pairs, length, width)); };
        return {v(0), v(1), v(2), v(3), tpo::labels_of(labels, pairs, length), tpo::token_values_of(weights, pairs, length)};
    }
    tpo::side_gradients<T> grads() {
        return {tpo::logits_of(grad[0], pairs, length, width), tpo::logits_of(grad[1], pairs, length, width)};
    }
    std::vector<T> host(int k) const {
        std::vector<T> h(grad[k].size());
        thrust::copy(grad[k].begin(), grad[k].end(), h.begin());
        return h;
    }
};

template <class T>
struct device_batch {
    device_side<T> chosen, rejected;
    device_batch(const tpo_test::batch_data<T>& d, index_t offset, index_t size)
        : chosen(d.chosen, offset, size), rejected(d.rejected, offset, size) {}
    tpo::preference_batch<T, std::int64_t> batch() { return {chosen.batch(), rejected.batch()}; }
    tpo::preference_gradients<T> grads() { return {chosen.grads(), rejected.grads()}; }
};

/// Everything one rank's run reports, checked on the main thread (Catch2 is not thread-safe).
template <class T>
struct rank_outcome {
    tpo::objective_result result;
    std::vector<T> grads[4];
    std::string error;
};

template <class T>
rank_outcome<T> run_rank(cuda_backend& backend, auto& comm, const tpo::objective_options& options,
                         const tpo_test::batch_data<T>& data, tpo::dist::vocab_shard shard) {
    rank_outcome<T> out;
    try {
        device_batch<T> dev(data, shard.offset, shard.size);
        const auto g = dev.grads();
        out.result = tpo::dist::evaluate(backend, comm, options, shard, dev.batch(), &g);
        out.grads[0] = dev.chosen.host(0);
        out.grads[1] = dev.chosen.host(1);
        out.grads[2] = dev.rejected.host(0);
        out.grads[3] = dev.rejected.host(1);
    } catch (const std::exception& e) {
        out.error = e.what();
    }
    return out;
}

/// The unsharded objective on the same device: what every sharded run must give.
template <class T>
rank_outcome<T> run_single(cuda_backend& backend, const tpo::objective_options& options,
                           const tpo_test::batch_data<T>& data) {
    rank_outcome<T> out;
    try {
        device_batch<T> dev(data, 0, data.chosen.vocab);
        const auto g = dev.grads();
        out.result = tpo::evaluate(backend, options, dev.batch(), &g);
        out.grads[0] = dev.chosen.host(0);
        out.grads[1] = dev.chosen.host(1);
        out.grads[2] = dev.rejected.host(0);
        out.grads[3] = dev.rejected.host(1);
    } catch (const std::exception& e) {
        out.error = e.what();
    }
    return out;
}

template <class T>
void check_rank(const rank_outcome<T>& got, const rank_outcome<T>& want, tpo::dist::vocab_shard shard, index_t vocab,
                double tol, bool noisy) {
    REQUIRE(got.error == want.error);
    if (!want.error.empty()) return;
    tpo_test::check_close(std::vector<double>{got.result.loss}, std::vector<double>{want.result.loss}, tol, "loss");
    tpo_test::check_close(got.result.chosen_rewards, want.result.chosen_rewards, tol, "chosen rewards");
    tpo_test::check_close(got.result.rejected_rewards, want.result.rejected_rewards, tol, "rejected rewards");
    tpo_test::check_close(got.result.policy_chosen_scores, want.result.policy_chosen_scores, tol, "scores");
    for (int k = 0; k < 4; ++k) {
        if (!noisy && (k == 1 || k == 3)) continue;
        const auto& full = want.grads[k];
        std::vector<double> a, b;
        const index_t rows = static_cast<index_t>(full.size()) / vocab;
        for (index_t r = 0; r < rows; ++r)
            for (index_t v = 0; v < shard.size; ++v) {
                a.push_back(static_cast<double>(got.grads[k][r * shard.size + v]));
                b.push_back(static_cast<double>(full[r * vocab + shard.offset + v]));
            }
        tpo_test::check_close(a, b, tol, "gradient slice");
    }
}

/// Ranks as threads on one GPU: device buffers reduced through the host, in rank order on every
/// rank (so every rank gets the same bits).
struct thread_world {
    int ranks;
    std::barrier<> sync;
    std::vector<std::vector<double>> slots;
    std::vector<std::vector<float>> float_slots;
    std::string message;
    explicit thread_world(int r) : ranks(r), sync(r), slots(r), float_slots(r) {}
};

class thread_communicator {
public:
    thread_communicator(thread_world& w, int rank, cudaStream_t stream) : w_(w), rank_(rank), stream_(stream) {}
    int rank() const { return rank_; }
    int size() const { return w_.ranks; }
    void all_reduce_max(double* d, index_t n) { device(d, n, w_.slots, true); }
    void all_reduce_sum(double* d, index_t n) { device(d, n, w_.slots, false); }
    void all_reduce_sum(float* d, index_t n) { device(d, n, w_.float_slots, false); }
    void host_all_reduce_max(double* d, index_t n) { host(d, n, w_.slots, true); }
    void host_broadcast(std::string& s, int root) {
        if (rank_ == root) w_.message = s;
        w_.sync.arrive_and_wait();
        s = w_.message;
        w_.sync.arrive_and_wait();
    }

private:
    template <class V>
    void host(V* d, index_t n, std::vector<std::vector<V>>& slots, bool max) {
        slots[rank_].assign(d, d + n);
        w_.sync.arrive_and_wait();
        for (index_t i = 0; i < n; ++i) {
            V r = slots[0][i];
            for (int k = 1; k < w_.ranks; ++k) r = max ? std::max(r, slots[k][i]) : r + slots[k][i];
            d[i] = r;
        }
        w_.sync.arrive_and_wait();
    }
    template <class V>
    void device(V* d, index_t n, std::vector<std::vector<V>>& slots, bool max) {
        std::vector<V> h(static_cast<std::size_t>(n));
        cudaMemcpyAsync(h.data(), d, sizeof(V) * n, cudaMemcpyDeviceToHost, stream_);
        cudaStreamSynchronize(stream_);
        host(h.data(), n, slots, max);
        cudaMemcpyAsync(d, h.data(), sizeof(V) * n, cudaMemcpyHostToDevice, stream_);
        cudaStreamSynchronize(stream_);
    }
    thread_world& w_;
    int rank_;
    cudaStream_t stream_;
};
static_assert(tpo::dist::communicator<thread_communicator>);

struct nccl_world {
    ncclComm_t comm{};
    cudaStream_t stream{};
    nccl_world() {
        int device = 0;
        REQUIRE(ncclCommInitAll(&comm, 1, &device) == ncclSuccess);
        cuda_check(cudaStreamCreate(&stream));
    }
    ~nccl_world() {
        cudaStreamDestroy(stream);
        ncclCommDestroy(comm);
    }
};

template <class T>
tpo_test::batch_data<T> make_batch(std::uint64_t seed, index_t vocab) {
    std::mt19937_64 rng(seed);
    return tpo_test::convert<T>(tpo_test::random_batch<double>(rng, 3, 9, 7, vocab));
}

}  // namespace

TEST_CASE("NCCL, one rank: the sharded objective equals the unsharded one on the device", "[nccl]") {
    nccl_world world;
    cuda_backend backend(world.stream);
    tpo::dist::nccl_communicator comm(world.comm, world.stream);
    REQUIRE(comm.size() == 1);
    for (auto& [name, options] : tpo_test::option_cases()) {
        INFO(name);
        const bool noisy = options.weighting == tpo::token_weighting::self_calibrated;
        const auto d = make_batch<double>(3, 600);
        const tpo::dist::vocab_shard whole{0, 600, 600};
        check_rank(run_rank(backend, comm, options, d, whole), run_single(backend, options, d), whole, 600, 1e-12, noisy);
        const auto f = make_batch<float>(4, 1500);
        const tpo::dist::vocab_shard whole_f{0, 1500, 1500};
        check_rank(run_rank(backend, comm, options, f, whole_f), run_single(backend, options, f), whole_f, 1500, 1e-5,
                   noisy);
    }
    SECTION("an input error goes through NCCL's agreement") {
        auto d = make_batch<double>(5, 300);
        d.chosen.labels[1] = 4;
        d.chosen.policy[300 * 0 + 7] = std::numeric_limits<double>::quiet_NaN();
        const tpo::dist::vocab_shard whole{0, 300, 300};
        const auto got = run_rank(backend, comm, tpo::objective_options{}, d, whole);
        CHECK(got.error.find("chosen policy logits at sequence 0, position 1: the row holds a NaN") != std::string::npos);
    }
}

TEST_CASE("NCCL, one rank: hidden states in, through cuBLAS", "[nccl]") {
    using namespace tpo_test::hidden;
    nccl_world world;
    cuda_backend backend(world.stream);
    tpo::dist::nccl_communicator comm(world.comm, world.stream);
    std::mt19937_64 rng(9);
    const hidden_data<double> d = random_hidden(rng, 2, 20, 15, 64, 700);
    auto upload = [](const std::vector<double>& v) { return thrust::device_vector<double>(v.begin(), v.end()); };
    thrust::device_vector<double> w = upload(d.weight), b = upload(d.bias), rw = upload(d.reference_weight),
                                   rb = upload(d.reference_bias);
    std::vector<thrust::device_vector<double>> states;
    for (const auto* s : {&d.chosen, &d.rejected})
        for (int k = 0; k < 4; ++k) states.push_back(upload(const_cast<hidden_side<double>*>(s)->tensor(k)));
    thrust::device_vector<std::int64_t> yw(d.chosen.labels.begin(), d.chosen.labels.end()),
        yl(d.rejected.labels.begin(), d.rejected.labels.end());
    auto side = [&](int s, const hidden_side<double>& h, thrust::device_vector<std::int64_t>& y) {
        auto v = [&](int k) {
            return tpo::hidden_view<const double>{thrust::raw_pointer_cast(states[4 * s + k].data()), h.pairs, h.length,
                                                  h.hidden};
        };
        return tpo::hidden_side_batch<double, std::int64_t>{v(0), v(1), v(2), v(3), tpo::labels_of(y, h.pairs, h.length)};
    };
    const tpo::hidden_preference_batch<double, std::int64_t> batch{
        {thrust::raw_pointer_cast(w.data()), thrust::raw_pointer_cast(b.data()), d.vocab, d.hidden},
        {thrust::raw_pointer_cast(rw.data()), thrust::raw_pointer_cast(rb.data()), d.vocab, d.hidden},
        side(0, d.chosen, yw),
        side(1, d.rejected, yl)};
    auto run = [&](bool sharded) {
        std::vector<thrust::device_vector<double>> g;
        for (int k = 0; k < 4; ++k) g.emplace_back(states[k < 2 ? k : 2 + k].size());
        thrust::device_vector<double> gw(d.weight.size()), gb(d.bias.size());
        auto gv = [&](int k, const hidden_side<double>& h) {
            return tpo::hidden_view<double>{thrust::raw_pointer_cast(g[k].data()), h.pairs, h.length, h.hidden};
        };
        const tpo::hidden_gradients<double> grads{{gv(0, d.chosen), gv(1, d.chosen)},
                                                  {gv(2, d.rejected), gv(3, d.rejected)},
                                                  thrust::raw_pointer_cast(gw.data()),
                                                  thrust::raw_pointer_cast(gb.data())};
        const tpo::objective_options options;
        const tpo::objective_result r =
            sharded ? tpo::dist::evaluate(backend, comm, options, {0, d.vocab, d.vocab}, batch, &grads)
                    : tpo::evaluate(backend, options, batch, &grads);
        std::vector<double> all{r.loss};
        for (auto* v : {&g[0], &g[2], &gw, &gb})
            for (double x : std::vector<double>(v->begin(), v->end())) all.push_back(x);
        return all;
    };
    const std::vector<double> want = run(false), got = run(true);
    tpo_test::check_close(got, want, 1e-12, "loss, ∂L/∂H, ∂L/∂W, ∂L/∂b");
}

TEST_CASE("2 to 4 ranks as threads on one GPU: every rank's slice equals the unsharded objective", "[threads]") {
    const tpo::index_t V = 1001;  // no rank count divides it
    for (int ranks = 2; ranks <= 4; ++ranks) {
        for (auto& [name, options] : tpo_test::option_cases()) {
            INFO(ranks << " ranks, " << name);
            const bool noisy = options.weighting == tpo::token_weighting::self_calibrated;
            const auto d = make_batch<double>(11, V);
            cudaStream_t main_stream;
            cuda_check(cudaStreamCreate(&main_stream));
            cuda_backend single_backend(main_stream);
            const auto want = run_single(single_backend, options, d);
            thread_world world(ranks);
            std::vector<rank_outcome<double>> got(ranks);
            std::vector<std::thread> threads;
            for (int r = 0; r < ranks; ++r)
                threads.emplace_back([&, r] {
                    cudaStream_t stream;
                    cudaStreamCreate(&stream);
                    cuda_backend backend(stream);
                    thread_communicator comm(world, r, stream);
                    got[r] = run_rank(backend, comm, options, d, tpo::dist::vocab_shard::even(V, ranks, r));
                    cudaStreamDestroy(stream);
                });
            for (auto& t : threads) t.join();
            cudaStreamDestroy(main_stream);
            for (int r = 0; r < ranks; ++r) {
                INFO("rank " << r);
                check_rank(got[r], want, tpo::dist::vocab_shard::even(V, ranks, r), V, 1e-12, noisy);
            }
        }
    }
}

TEST_CASE("ranks as threads on one GPU: a NaN in one rank's slice is every rank's error", "[threads]") {
    const tpo::index_t V = 257;
    const int ranks = 3;
    auto d = make_batch<double>(13, V);
    d.rejected.labels[2] = 5;
    d.rejected.policy[1 * V + V - 1] = std::numeric_limits<double>::quiet_NaN();  // the last rank's columns
    thread_world world(ranks);
    std::vector<rank_outcome<double>> got(ranks);
    std::vector<std::thread> threads;
    for (int r = 0; r < ranks; ++r)
        threads.emplace_back([&, r] {
            cudaStream_t stream;
            cudaStreamCreate(&stream);
            cuda_backend backend(stream);
            thread_communicator comm(world, r, stream);
            got[r] = run_rank(backend, comm, tpo::objective_options{}, d, tpo::dist::vocab_shard::even(V, ranks, r));
            cudaStreamDestroy(stream);
        });
    for (auto& t : threads) t.join();
    for (int r = 0; r < ranks; ++r) {
        INFO("rank " << r << ": " << got[r].error);
        CHECK(got[r].error.find("rejected policy logits at sequence 0, position 2: the row holds a NaN") !=
              std::string::npos);
    }
}

namespace {

/// Pairs [first, first + count) of a batch.
template <class T>
tpo_test::batch_data<T> pairs_of(const tpo_test::batch_data<T>& d, index_t first, index_t count) {
    tpo_test::batch_data<T> out = d;
    for (auto [to, from] : {std::pair{&out.chosen, &d.chosen}, std::pair{&out.rejected, &d.rejected}}) {
        const index_t width = from->length * from->vocab;
        for (int k = 0; k < 4; ++k) {
            const auto& all = const_cast<tpo_test::side_data<T>*>(from)->tensor(k);
            to->tensor(k).assign(all.begin() + first * width, all.begin() + (first + count) * width);
        }
        to->labels.assign(from->labels.begin() + first * from->length, from->labels.begin() + (first + count) * from->length);
        to->weights.assign(from->weights.begin() + first * from->length,
                           from->weights.begin() + (first + count) * from->length);
        to->pairs = count;
    }
    return out;
}

}  // namespace

TEST_CASE("data parallel, 2 to 4 ranks as threads on one GPU: each rank's pairs, the objective of all of them",
          "[threads]") {
    const tpo::index_t V = 301;
    auto all = tpo_test::option_cases();
    tpo::objective_options o;
    o.losses = {{tpo::loss_type::sigmoid, 1.0}, {tpo::loss_type::aot, 0.5}, {tpo::loss_type::sft, 0.3}};
    all.emplace_back("tpo sigmoid + aot + sft", o);
    for (int ranks = 2; ranks <= 4; ++ranks) {
        // Rank r holds 1 + r % 2 pairs.
        std::vector<index_t> first(ranks + 1, 0);
        for (int r = 0; r < ranks; ++r) first[r + 1] = first[r] + 1 + r % 2;
        std::mt19937_64 rng(19 + ranks);
        const auto whole = tpo_test::random_batch<double>(rng, first[ranks], 9, 7, V);
        for (auto& [name, options] : all) {
            INFO(ranks << " ranks, " << name);
            const bool noisy = options.weighting == tpo::token_weighting::self_calibrated;
            cudaStream_t main_stream;
            cuda_check(cudaStreamCreate(&main_stream));
            cuda_backend single_backend(main_stream);
            const auto want = run_single(single_backend, options, whole);
            cudaStreamDestroy(main_stream);
            REQUIRE(want.error.empty());
            thread_world world(ranks);
            std::vector<rank_outcome<double>> got(ranks);
            std::vector<std::thread> threads;
            for (int r = 0; r < ranks; ++r)
                threads.emplace_back([&, r] {
                    cudaStream_t stream;
                    cudaStreamCreate(&stream);
                    cuda_backend backend(stream);
                    thread_communicator comm(world, r, stream);
                    rank_outcome<double>& out = got[r];
                    try {
                        device_batch<double> dev(pairs_of(whole, first[r], first[r + 1] - first[r]), 0, V);
                        const auto g = dev.grads();
                        out.result = tpo::dist::data_parallel_evaluate(backend, comm, options, dev.batch(), &g);
                        out.grads[0] = dev.chosen.host(0);
                        out.grads[1] = dev.chosen.host(1);
                        out.grads[2] = dev.rejected.host(0);
                        out.grads[3] = dev.rejected.host(1);
                    } catch (const std::exception& e) {
                        out.error = e.what();
                    }
                    cudaStreamDestroy(stream);
                });
            for (auto& t : threads) t.join();
            for (int r = 0; r < ranks; ++r) {
                INFO("rank " << r);
                REQUIRE(got[r].error.empty());
                const index_t P = first[r + 1] - first[r];
                tpo_test::check_close({got[r].result.loss, got[r].result.reward_accuracy, got[r].result.reward_margin},
                                      {want.result.loss, want.result.reward_accuracy, want.result.reward_margin}, 1e-12,
                                      "loss, accuracy, margin: the whole batch's");
                tpo_test::check_close(got[r].result.losses,
                                      std::vector<double>(want.result.losses.begin() + first[r],
                                                          want.result.losses.begin() + first[r] + P),
                                      1e-12, "losses: this rank's rows");
                for (int k = 0; k < 4; ++k) {
                    if (!noisy && (k == 1 || k == 3)) continue;
                    const index_t width = (k < 2 ? whole.chosen.length : whole.rejected.length) * V;
                    std::vector<double> a, b;
                    for (index_t i = 0; i < P * width; ++i) {
                        a.push_back(got[r].grads[k][i] / ranks);
                        b.push_back(want.grads[k][first[r] * width + i]);
                    }
                    tpo_test::check_close(a, b, 1e-12, "gradient / R: the single process's rows of this rank's pairs");
                }
            }
        }
    }
}
