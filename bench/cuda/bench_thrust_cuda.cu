// Bandwidth of the Thrust backend's CUDA passes, next to what the device can do.
//
// Prints the device's peak DRAM bandwidth (from its memory clock and bus width), the measured
// device-to-device copy bandwidth (cudaMemcpy D2D, read + write bytes), and for vision-language
// shapes the fused TPO forward+backward: the four row-statistics passes per side and the two
// gradient writes per side, (a) through tpo::objective (what a trainer calls: includes scratch
// allocation and the O(P) result copies) and (b) the row kernels alone. Bytes counted are the
// compulsory ones: every logits tensor read once for the forward, the four policy tensors read
// once more and their gradients written once for the backward.
//
// Usage: tpo_bench_thrust_cuda [--quick | --profile-fused]
//   --profile-fused  only one DPO and one TPO step of the large fused shape, between
//                    cudaProfilerStart and cudaProfilerStop, for `ncu --profile-from-start off`

#include <cuda_profiler_api.h>
#include <cuda_runtime.h>
#include <thrust/device_vector.h>
#include <thrust/transform.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <tpo/backend/thrust.hpp>
#include <tpo/tpo.hpp>

namespace {

using backend_t = tpo::backend::thrust<thrust::cuda::tag>;
using element = tpo::bfloat16;
using tpo::index_t;

void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) {
        std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
        std::exit(1);
    }
}

/// Deterministic pseudo-random logits in [-4, 4) and labels (10% ignored), generated on the device.
struct fill_logits {
    element* out;
    std::uint64_t seed;
    __device__ void operator()(index_t i) const {
        const tpo::math::philox_stream rng{seed, 0};
        out[i] = element(rng.normal(i) * 2.0f);
    }
};
struct fill_labels {
    std::int64_t* out;
    index_t vocab;
    __device__ void operator()(index_t i) const {
        std::uint64_t h = static_cast<std::uint64_t>(i) * 0x9E3779B97F4A7C15ull;
        h ^= h >> 29;
        out[i] = h % 10 == 0 ? -100 : static_cast<std::int64_t>((h >> 8) % static_cast<std::uint64_t>(vocab));
    }
};

/// Plausible gradient coefficients (a label, alpha, beta, a log-sum-exp) for the kernels-only timing.
struct fill_coefficients {
    tpo::row_coefficients* out;
    __device__ void operator()(index_t r) const { out[r] = {0.5, 0.25, 12.0, r % 7}; }
};

struct timer {
    cudaEvent_t start, stop;
    timer() {
        cudaEventCreate(&start);
        cudaEventCreate(&stop);
    }
    ~timer() {
        cudaEventDestroy(start);
        cudaEventDestroy(stop);
    }
};

double peak_bandwidth(int device) {
    int clock_khz = 0, bus_bits = 0;
    cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, device);
    cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, device);
    return 2.0 * clock_khz * 1e3 * (bus_bits / 8.0);  // double data rate
}

double copy_bandwidth(cudaStream_t stream, int repeats) {
    const std::size_t bytes = std::size_t{1} << 30;
    void *a = nullptr, *b = nullptr;
    check(cudaMalloc(&a, bytes), "cudaMalloc");
    check(cudaMalloc(&b, bytes), "cudaMalloc");
    cudaMemsetAsync(a, 1, bytes, stream);
    cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream);  // warm-up
    timer t;
    cudaEventRecord(t.start, stream);
    for (int i = 0; i < repeats; ++i) cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream);
    cudaEventRecord(t.stop, stream);
    check(cudaEventSynchronize(t.stop), "copy");
    float ms = 0;
    cudaEventElapsedTime(&ms, t.start, t.stop);
    cudaFree(a);
    cudaFree(b);
    return 2.0 * bytes * repeats / (ms * 1e-3);  // read + write
}

struct workload {
    const char* name;
    index_t pairs, length, vocab;
};

void run(const workload& w, cudaStream_t stream, double copy_bw, int repeats) {
    const index_t n = w.pairs * w.length * w.vocab;
    backend_t gpu(stream);
    // chosen/rejected × policy, policy noisy, reference, reference noisy; gradients of the 4 policy tensors.
    thrust::device_vector<element> logits[8], grads[4];
    thrust::device_vector<std::int64_t> labels[2];
    for (int k = 0; k < 8; ++k) {
        logits[k].resize(static_cast<std::size_t>(n));
        gpu.for_each(n, fill_logits{thrust::raw_pointer_cast(logits[k].data()), static_cast<std::uint64_t>(k + 1)});
    }
    for (auto& g : grads) g.resize(static_cast<std::size_t>(n));
    for (auto& y : labels) {
        y.resize(static_cast<std::size_t>(w.pairs * w.length));
        gpu.for_each(w.pairs * w.length, fill_labels{thrust::raw_pointer_cast(y.data()), w.vocab});
    }
    auto z = [&](int k) { return tpo::logits_view<const element>(tpo::logits_of(logits[k], w.pairs, w.length, w.vocab)); };
    auto g = [&](int k) { return tpo::logits_of(grads[k], w.pairs, w.length, w.vocab); };
    tpo::preference_batch<element, std::int64_t> batch{
        {z(0), z(1), z(2), z(3), tpo::labels_of(labels[0], w.pairs, w.length), {}},
        {z(4), z(5), z(6), z(7), tpo::labels_of(labels[1], w.pairs, w.length), {}}};
    tpo::preference_gradients<element> out{{g(0), g(1)}, {g(2), g(3)}};

    const double bytes = (8.0 + 4.0 + 4.0) * n * sizeof(element);  // forward reads, backward reads, writes
    tpo::objective<backend_t> objective(gpu, tpo::objective_options{});
    objective.forward(batch);  // warm-up (and first-touch of the kernels)
    objective.backward(batch, out);
    check(cudaStreamSynchronize(stream), "warm-up");
    auto start = std::chrono::steady_clock::now();
    double loss = 0;
    for (int i = 0; i < repeats; ++i) {
        loss += objective.forward(batch).loss;
        objective.backward(batch, out);
    }
    check(cudaStreamSynchronize(stream), "objective");
    const double objective_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / repeats;

    // The row kernels alone, on the same tensors: what the objective's O(S·L·V) work costs.
    const tpo::row_alignment align{};
    const index_t rows = w.pairs * align.scored_rows(w.length);
    auto stats = gpu.allocate<tpo::row_stats>(rows);
    auto coefficients = gpu.allocate<tpo::row_coefficients>(rows);
    gpu.for_each(rows, fill_coefficients{gpu.raw(coefficients)});
    auto kernels = [&] {
        for (int side = 0; side < 2; ++side) {
            for (int k = 0; k < 4; ++k)
                gpu.row_statistics(z(4 * side + k), tpo::labels_view<const std::int64_t>(tpo::labels_of(labels[side], w.pairs, w.length)),
                                   align, tpo::row_reduction::logsumexp, gpu.raw(stats));
            for (int k = 0; k < 2; ++k) gpu.row_gradient(z(4 * side + k), gpu.raw(coefficients), align.scored_rows(w.length), g(2 * side + k));
        }
    };
    kernels();
    timer t;
    cudaEventRecord(t.start, stream);
    for (int i = 0; i < repeats; ++i) kernels();
    cudaEventRecord(t.stop, stream);
    check(cudaEventSynchronize(t.stop), "kernels");
    float ms = 0;
    cudaEventElapsedTime(&ms, t.start, t.stop);
    const double kernel_s = ms * 1e-3 / repeats;

    const double objective_bw = bytes / objective_s, kernel_bw = bytes / kernel_s;
    std::printf("%-28s P=%lld L=%lld V=%lld bf16, %.2f GB moved, loss %.6f\n", w.name, static_cast<long long>(w.pairs),
                static_cast<long long>(w.length), static_cast<long long>(w.vocab), bytes * 1e-9, loss / repeats);
    std::printf("  tpo::objective fwd+bwd   %8.3f ms  %8.1f GB/s  %5.1f%% of D2D copy\n", objective_s * 1e3,
                objective_bw * 1e-9, 100.0 * objective_bw / copy_bw);
    std::printf("  row kernels alone        %8.3f ms  %8.1f GB/s  %5.1f%% of D2D copy\n", kernel_s * 1e3,
                kernel_bw * 1e-9, 100.0 * kernel_bw / copy_bw);
}

/// Deterministic pseudo-random hidden states or head weights, scaled.
struct fill_values {
    element* out;
    std::uint64_t seed;
    float scale;
    __device__ void operator()(index_t i) const {
        const tpo::math::philox_stream rng{seed, 0};
        out[i] = element(rng.normal(i) * scale);
    }
};

/// The peak of the default memory pool (the backend's scratch) since the last reset, in bytes.
std::size_t pool_peak(int device, bool reset) {
    cudaMemPool_t pool;
    check(cudaDeviceGetDefaultMemPool(&pool, device), "cudaDeviceGetDefaultMemPool");
    std::uint64_t value = 0;
    if (reset) {
        check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &value), "reset of the pool's peak");
        return 0;
    }
    check(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &value), "the pool's peak");
    return static_cast<std::size_t>(value);
}

/// Hidden states in: the fused TPO (logit score) and DPO steps, forward + backward to the hidden
/// states and the head, against the floor of the same matrix products done once each by cuBLAS
/// (the logits of every valid row of both sides, then recompute, ∂L/∂h and ∂L/∂W), bf16.
void run_fused(cudaStream_t stream, int device, index_t pairs, index_t length, index_t hidden, index_t vocab,
               int repeats, bool profile = false) {
    backend_t gpu(stream);
    const index_t states = pairs * length * hidden;
    thrust::device_vector<element> head(static_cast<std::size_t>(vocab * hidden)), grad_head(head.size());
    gpu.for_each(vocab * hidden, fill_values{thrust::raw_pointer_cast(head.data()), 99, 1.0f / 64});
    thrust::device_vector<element> h[2][2], gh[2][2];  // side × (clean, noisy)
    thrust::device_vector<std::int64_t> labels[2];
    for (int side = 0; side < 2; ++side) {
        for (int k = 0; k < 2; ++k) {
            h[side][k].resize(static_cast<std::size_t>(states));
            gh[side][k].resize(static_cast<std::size_t>(states));
            gpu.for_each(states, fill_values{thrust::raw_pointer_cast(h[side][k].data()),
                                             static_cast<std::uint64_t>(10 + 2 * side + k), 1.0f});
        }
        labels[side].resize(static_cast<std::size_t>(pairs * length));
        gpu.for_each(pairs * length, fill_labels{thrust::raw_pointer_cast(labels[side].data()), vocab});
    }
    auto view = [&](thrust::device_vector<element>& v) {
        return tpo::hidden_view<element>{thrust::raw_pointer_cast(v.data()), pairs, length, hidden};
    };
    const tpo::head_view<const element> w{thrust::raw_pointer_cast(head.data()), nullptr, vocab, hidden};
    // The reference as its own states once, to get its sequence scores; then as those scores.
    tpo::hidden_preference_batch<element, std::int64_t> batch{
        w, w,
        {view(h[0][0]), view(h[0][1]), view(h[0][1]), view(h[0][0]), tpo::labels_of(labels[0], pairs, length), {}, {}},
        {view(h[1][0]), view(h[1][1]), view(h[1][1]), view(h[1][0]), tpo::labels_of(labels[1], pairs, length), {}, {}}};
    const tpo::objective_result first = tpo::evaluate(gpu, tpo::objective_options{}, batch);
    thrust::device_vector<double> scores[2] = {first.reference_chosen_scores, first.reference_rejected_scores};
    for (int side = 0; side < 2; ++side) {
        auto& s = side == 0 ? batch.chosen : batch.rejected;
        s.reference = {};
        s.reference_noisy = {};
        s.reference_scores = {thrust::raw_pointer_cast(scores[side].data()), pairs};
    }
    tpo::hidden_gradients<element> grads{{view(gh[0][0]), view(gh[0][1])},
                                         {view(gh[1][0]), view(gh[1][1])},
                                         thrust::raw_pointer_cast(grad_head.data()),
                                         nullptr};
    auto time_step = [&](const tpo::objective_options& options, std::size_t& peak) {
        tpo::evaluate(gpu, options, batch, &grads);  // warm-up
        check(cudaStreamSynchronize(stream), "warm-up");
        pool_peak(device, true);
        const auto start = std::chrono::steady_clock::now();
        for (int i = 0; i < repeats; ++i) tpo::evaluate(gpu, options, batch, &grads);
        check(cudaStreamSynchronize(stream), "fused step");
        peak = pool_peak(device, false);
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / repeats;
    };
    auto forward_only = [&](const tpo::objective_options& options) {
        tpo::objective<backend_t> objective(gpu, options);
        objective.forward(batch);
        check(cudaStreamSynchronize(stream), "warm-up");
        const auto start = std::chrono::steady_clock::now();
        for (int i = 0; i < repeats; ++i) objective.forward(batch);
        check(cudaStreamSynchronize(stream), "fused forward");
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / repeats;
    };
    if (profile) {  // one DPO step and one TPO step inside the profiler's range, after a warm-up of each
        tpo::objective_options dpo;
        dpo.weighting = tpo::token_weighting::none;
        tpo::evaluate(gpu, dpo, batch, &grads);
        tpo::evaluate(gpu, tpo::objective_options{}, batch, &grads);
        check(cudaStreamSynchronize(stream), "warm-up");
        check(cudaProfilerStart(), "cudaProfilerStart");
        tpo::evaluate(gpu, dpo, batch, &grads);
        check(cudaStreamSynchronize(stream), "DPO step");
        tpo::evaluate(gpu, tpo::objective_options{}, batch, &grads);
        check(cudaStreamSynchronize(stream), "TPO step");
        check(cudaProfilerStop(), "cudaProfilerStop");
        std::printf("profiled one DPO and one TPO step: P=%lld L=%lld H=%lld V=%lld\n", static_cast<long long>(pairs),
                    static_cast<long long>(length), static_cast<long long>(hidden), static_cast<long long>(vocab));
        return;
    }
    std::size_t tpo_peak = 0, dpo_peak = 0, unchecked_peak = 0, one_chunk_peak = 0;
    const double tpo_s = time_step(tpo::objective_options{}, tpo_peak);
    const double tpo_forward_s = forward_only(tpo::objective_options{});
    tpo::objective_options dpo;
    dpo.weighting = tpo::token_weighting::none;
    const double dpo_s = time_step(dpo, dpo_peak);
    tpo::objective_options unchecked = dpo;
    unchecked.check_inputs = false;
    const double unchecked_s = time_step(unchecked, unchecked_peak);
    tpo::objective_options one_chunk = dpo;
    one_chunk.chunk_tokens = pairs * length;
    const double one_chunk_s = time_step(one_chunk, one_chunk_peak);

    // The floor: the four products of the clean pass of both sides, each once, on all valid rows.
    std::vector<std::int64_t> host_labels(static_cast<std::size_t>(pairs * length));
    index_t valid = 0;
    for (int side = 0; side < 2; ++side) {
        thrust::copy(labels[side].begin(), labels[side].end(), host_labels.begin());
        for (index_t i = 0; i < pairs * length; ++i)
            if (i % length != 0 && host_labels[static_cast<std::size_t>(i)] >= 0) ++valid;  // shifted, not ignored
    }
    const index_t n = valid;
    thrust::device_vector<element> rows(static_cast<std::size_t>(n * hidden));
    gpu.for_each(n * hidden, fill_values{thrust::raw_pointer_cast(rows.data()), 7, 1.0f});
    auto logits = gpu.allocate<float>(n * vocab);
    auto dh = gpu.allocate<float>(n * hidden);
    auto dw = gpu.allocate<float>(vocab * hidden);
    const element* hp = thrust::raw_pointer_cast(rows.data());
    auto products = [&] {
        gpu.matmul(false, true, n, vocab, hidden, hp, hidden, w.weight, hidden, gpu.raw(logits), vocab, 0.0f);
        gpu.matmul(false, true, n, vocab, hidden, hp, hidden, w.weight, hidden, gpu.raw(logits), vocab, 0.0f);
        gpu.matmul(false, false, n, hidden, vocab, gpu.raw(logits), vocab, w.weight, hidden, gpu.raw(dh), hidden, 0.0f);
        gpu.matmul(true, false, vocab, hidden, n, gpu.raw(logits), vocab, hp, hidden, gpu.raw(dw), hidden, 1.0f);
    };
    products();
    timer t;
    cudaEventRecord(t.start, stream);
    for (int i = 0; i < repeats; ++i) products();
    cudaEventRecord(t.stop, stream);
    check(cudaEventSynchronize(t.stop), "products");
    float ms = 0;
    cudaEventElapsedTime(&ms, t.start, t.stop);
    const double floor_s = ms * 1e-3 / repeats;
    const double flops = 2.0 * 4.0 * static_cast<double>(n) * vocab * hidden;
    std::printf("fused lm_head  P=%lld L=%lld H=%lld V=%lld bf16, %lld valid rows of both sides\n",
                static_cast<long long>(pairs), static_cast<long long>(length), static_cast<long long>(hidden),
                static_cast<long long>(vocab), static_cast<long long>(n));
    std::printf("  matrix-product floor     %8.3f ms  %6.1f TFLOP/s (4 products, float C, 16-bit operands rounded)\n",
                floor_s * 1e3, flops / floor_s * 1e-12);
    std::printf("  TPO (logit) fwd+bwd      %8.3f ms  %5.2fx floor  scratch peak %.1f MiB\n", tpo_s * 1e3,
                tpo_s / floor_s, tpo_peak / 1048576.0);
    std::printf("  TPO (logit) forward only %8.3f ms\n", tpo_forward_s * 1e3);
    std::printf("  DPO fwd+bwd              %8.3f ms  %5.2fx floor  scratch peak %.1f MiB\n", dpo_s * 1e3,
                dpo_s / floor_s, dpo_peak / 1048576.0);
    std::printf("  DPO, check_inputs off    %8.3f ms  %5.2fx floor  scratch peak %.1f MiB\n", unchecked_s * 1e3,
                unchecked_s / floor_s, unchecked_peak / 1048576.0);
    std::printf("  DPO, one chunk per side  %8.3f ms  %5.2fx floor  scratch peak %.1f MiB\n", one_chunk_s * 1e3,
                one_chunk_s / floor_s, one_chunk_peak / 1048576.0);
}

}  // namespace

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
    const bool profile = argc > 1 && std::strcmp(argv[1], "--profile-fused") == 0;
    int device = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
    cudaStream_t stream;
    check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
    if (profile) {
        run_fused(stream, device, 2, 1024, 4096, 152064, 1, true);
        cudaStreamDestroy(stream);
        return 0;
    }
    const int repeats = quick ? 3 : 10;
    const double peak = peak_bandwidth(device);
    const double copy = copy_bandwidth(stream, repeats);
    std::printf("device %s (sm_%d%d), %.1f GiB\n", prop.name, prop.major, prop.minor,
                static_cast<double>(prop.totalGlobalMem) / (1 << 30));
    std::printf("peak DRAM bandwidth        %8.1f GB/s (memory clock x bus width)\n", peak * 1e-9);
    std::printf("device-to-device copy      %8.1f GB/s (cudaMemcpy D2D, read + write)  %5.1f%% of peak\n",
                copy * 1e-9, 100.0 * copy / peak);
    const workload workloads[] = {{"LLaVA-1.5 (V=32000)", 4, 1024, 32000}, {"Qwen2-VL (V=151936)", 2, 512, 151936}};
    for (const workload& w : workloads) run(w, stream, copy, repeats);
    run_fused(stream, device, 2, 1024, 4096, 152064, repeats);
    run_fused(stream, device, 2, 256, 512, 32000, repeats);
    cudaStreamDestroy(stream);
    return 0;
}
