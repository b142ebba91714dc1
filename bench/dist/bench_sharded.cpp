// The vocabulary-sharded objective on MPI: one line per run (run it under mpirun -np R) with the
// step time (forward + backward, median over repetitions, slowest rank), the bytes each rank put
// into collectives per step (counted at the communicator, split into the row exchange, ∂L/∂H and
// the agreements), the collectives per step, and the peak RSS of every rank.
//
//   mpirun -np R tpo_bench_sharded [--shape logits|fused|fused-small|fused-qwen] [--reps N] [--threads T]
//     logits       TPO (self-calibrated weights, logit score) on (P, L, V) = (2, 512, 32000) float logits
//     fused        TPO on hidden states (P, L, H, V) = (2, 256, 1024, 32000) float, head + reference head
//     fused-small  the same on bench/compare_fused's shapes: (2, 256, 512, 32000)
//     fused-qwen   and (1, 256, 1024, 152064)
// Each rank generates only its own slice; the data are random (the row exchange does not depend
// on the values).
#include <mpi.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <omp.h>

#include <tpo/backend/cpu.hpp>
#include <tpo/dist/mpi.hpp>
#include <tpo/dist/sharded.hpp>

namespace {

using tpo::index_t;

/// A communicator that counts what passes through it.
struct counting {
    tpo::dist::mpi_communicator inner;
    long long collectives = 0, row_bytes = 0, hidden_bytes = 0, host_bytes = 0;

    int rank() const { return inner.rank(); }
    int size() const { return inner.size(); }
    void all_reduce_max(double* d, index_t n) {
        ++collectives;
        row_bytes += n * 8;
        inner.all_reduce_max(d, n);
    }
    void all_reduce_sum(double* d, index_t n) {
        ++collectives;
        row_bytes += n * 8;
        inner.all_reduce_sum(d, n);
    }
    void all_reduce_sum(float* d, index_t n) {
        ++collectives;
        hidden_bytes += n * 4;
        inner.all_reduce_sum(d, n);
    }
    void host_all_reduce_max(double* d, index_t n) {
        ++collectives;
        host_bytes += n * 8;
        inner.host_all_reduce_max(d, n);
    }
    void host_broadcast(std::string& s, int root) {
        ++collectives;
        host_bytes += static_cast<long long>(s.size());
        inner.host_broadcast(s, root);
    }
    void reset() { collectives = row_bytes = hidden_bytes = host_bytes = 0; }
};
static_assert(tpo::dist::communicator<counting>);

std::vector<float> random(std::mt19937_64& rng, std::size_t n, float scale) {
    std::normal_distribution<float> d(0, scale);
    std::vector<float> v(n);
    for (float& x : v) x = d(rng);
    return v;
}

std::vector<std::int64_t> labels(std::mt19937_64& rng, index_t n, index_t vocab) {
    std::uniform_int_distribution<std::int64_t> y(0, vocab - 1);
    std::vector<std::int64_t> v(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) v[i] = i % 4 == 0 ? -100 : y(rng);  // a quarter masked, as a prompt
    return v;
}

double peak_rss_mib() {
    rusage u{};
    getrusage(RUSAGE_SELF, &u);
    return static_cast<double>(u.ru_maxrss) / 1024.0;
}

}  // namespace

int main(int argc, char** argv) {
    MPI_Init(&argc, &argv);
    std::string shape = "logits";
    int reps = 5, threads = 1;
    for (int i = 1; i + 1 < argc; i += 2) {
        const std::string a = argv[i];
        if (a == "--shape") shape = argv[i + 1];
        else if (a == "--reps") reps = std::atoi(argv[i + 1]);
        else if (a == "--threads") threads = std::atoi(argv[i + 1]);
    }
    omp_set_num_threads(threads);
    counting comm{tpo::dist::mpi_communicator(MPI_COMM_WORLD)};
    const int R = comm.size(), rank = comm.rank();
    tpo::backend::cpu backend;
    tpo::objective_options options;  // TPO, sigmoid, logit score
    std::vector<double> times;
    std::mt19937_64 rng(1000 + rank), shared(7);  // slices per rank; labels the same everywhere
    index_t P = 2, L = 0, V = 32000, H = 0;
    const auto step = [&](auto&& run) {
        for (int r = 0; r < reps + 1; ++r) {
            MPI_Barrier(MPI_COMM_WORLD);
            comm.reset();
            const auto t0 = std::chrono::steady_clock::now();
            run();
            double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            MPI_Allreduce(MPI_IN_PLACE, &t, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
            if (r > 0) times.push_back(t);  // the first step warms the allocator and the pages
        }
    };
    if (shape == "logits") {
        L = 512;
        const auto shard = tpo::dist::vocab_shard::even(V, R, rank);
        const std::size_t n = static_cast<std::size_t>(P * L * shard.size);
        std::vector<std::vector<float>> z;
        for (int k = 0; k < 8; ++k) z.push_back(random(rng, n, 2.0f));
        const auto yw = labels(shared, P * L, V), yl = labels(shared, P * L, V);
        auto view = [&](int k) { return tpo::logits_view<const float>{z[k].data(), P, L, shard.size}; };
        const tpo::preference_batch<float, std::int64_t> batch{
            {view(0), view(1), view(2), view(3), {yw.data(), P, L}},
            {view(4), view(5), view(6), view(7), {yl.data(), P, L}}};
        std::vector<std::vector<float>> g(4, std::vector<float>(n));
        auto gv = [&](int k) { return tpo::logits_view<float>{g[k].data(), P, L, shard.size}; };
        const tpo::preference_gradients<float> grads{{gv(0), gv(1)}, {gv(2), gv(3)}};
        step([&] { tpo::dist::evaluate(backend, comm, options, shard, batch, &grads); });
    } else if (shape == "fused" || shape == "fused-small" || shape == "fused-qwen") {
        L = 256;
        H = shape == "fused-small" ? 512 : 1024;
        if (shape == "fused-qwen") {
            P = 1;
            V = 152064;
        }
        const auto shard = tpo::dist::vocab_shard::even(V, R, rank);
        const float head_scale = 1.5f / std::sqrt(static_cast<float>(H));  // logits of unit scale
        const auto w = random(rng, static_cast<std::size_t>(shard.size * H), head_scale);
        const auto w_ref = random(rng, static_cast<std::size_t>(shard.size * H), head_scale);
        const auto b = random(rng, static_cast<std::size_t>(shard.size), 0.5f);
        std::vector<std::vector<float>> h;
        for (int k = 0; k < 8; ++k) h.push_back(random(shared, static_cast<std::size_t>(P * L * H), 1.0f));
        const auto yw = labels(shared, P * L, V), yl = labels(shared, P * L, V);
        auto view = [&](int k) { return tpo::hidden_view<const float>{h[k].data(), P, L, H}; };
        const tpo::hidden_preference_batch<float, std::int64_t> batch{
            {w.data(), b.data(), shard.size, H},
            {w_ref.data(), b.data(), shard.size, H},
            {view(0), view(1), view(2), view(3), {yw.data(), P, L}},
            {view(4), view(5), view(6), view(7), {yl.data(), P, L}}};
        std::vector<std::vector<float>> g(4, std::vector<float>(static_cast<std::size_t>(P * L * H)));
        std::vector<float> gw(static_cast<std::size_t>(shard.size * H)), gb(static_cast<std::size_t>(shard.size));
        auto gv = [&](int k) { return tpo::hidden_view<float>{g[k].data(), P, L, H}; };
        const tpo::hidden_gradients<float> grads{{gv(0), gv(1)}, {gv(2), gv(3)}, gw.data(), gb.data()};
        step([&] { tpo::dist::evaluate(backend, comm, options, shard, batch, &grads); });
    } else {
        if (rank == 0) std::fprintf(stderr, "tpo_bench_sharded: unknown --shape '%s'\n", shape.c_str());
        MPI_Finalize();
        return 2;
    }
    std::sort(times.begin(), times.end());
    std::vector<double> rss(static_cast<std::size_t>(R));
    double mine = peak_rss_mib();
    MPI_Gather(&mine, 1, MPI_DOUBLE, rss.data(), 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    long long counts[4] = {comm.collectives, comm.row_bytes, comm.hidden_bytes, comm.host_bytes};
    if (rank == 0) {
        std::printf("shape=%s P=%lld L=%lld V=%lld H=%lld ranks=%d threads/rank=%d step_s=%.4f (min %.4f, %d reps)"
                    " collectives/step=%lld row_exchange_bytes/rank=%lld hidden_grad_bytes/rank=%lld"
                    " agreement_bytes/rank=%lld peak_rss_mib/rank=",
                    shape.c_str(), static_cast<long long>(P), static_cast<long long>(L), static_cast<long long>(V),
                    static_cast<long long>(H), R, threads, times[times.size() / 2], times.front(), reps, counts[0],
                    counts[1], counts[2], counts[3]);
        for (int k = 0; k < R; ++k) std::printf("%s%.0f", k ? "," : "", rss[k]);
        std::printf("\n");
    }
    MPI_Finalize();
    return 0;
}
