// Google Benchmark programs for each stage of TPO on the CPU backend, with bytes-processed counters
// (GB/s): corruptor throughput, row statistics, gradient write, full forward, forward+backward.
// Arguments: shape (0 = LLaVA-1.5 (4, 512, 32000), 1 = Qwen2-VL (4, 128, 152064)), threads.
//
//   build/release/bench/tpo_bench_components --benchmark_filter=forward_backward

#include <benchmark/benchmark.h>

#include <memory>
#include <vector>

#include <tpo/corrupt/diffusion.hpp>

#include "workload.hpp"

namespace {

using tpo_bench::shape;
using tpo::index_t;

shape shape_of(std::int64_t k) { return k == 0 ? tpo_bench::llava : tpo_bench::qwen2vl; }

// One workload alive at a time: the two shapes in two element types would not fit in memory.
template <class T>
tpo_bench::workload<T>& workload_for(std::int64_t shape_index) {
    static std::unique_ptr<tpo_bench::workload<T>> cached;
    static std::int64_t cached_index = -1;
    if (!cached || cached_index != shape_index) {
        cached.reset();
        cached = std::make_unique<tpo_bench::workload<T>>(shape_of(shape_index));
        cached_index = shape_index;
    }
    return *cached;
}

void label(benchmark::State& state, const shape& s, const char* dtype) {
    state.SetLabel(std::string(dtype) + " S=" + std::to_string(s.sequences) + " L=" + std::to_string(s.length) +
                   " V=" + std::to_string(s.vocab) + " threads=" + std::to_string(state.range(1)));
}

template <class T>
constexpr const char* dtype_name() {
    return std::is_same_v<T, float> ? "fp32" : "bf16";
}

// One logits tensor reduced as `Reduction` asks: the log-sum-exp pass of the clean logits, or the
// NaN/Inf scan the noisy logits get under the logit score.
template <class T, tpo::row_reduction Reduction>
void row_statistics(benchmark::State& state) {
    auto& w = workload_for<T>(state.range(0));
    tpo::backend::cpu backend(static_cast<int>(state.range(1)));
    std::vector<tpo::row_stats> stats(static_cast<std::size_t>(w.dims.sequences * (w.dims.length - 1)));
    const tpo::logits_view<const T> z{w.roles[0].data(), w.dims.sequences, w.dims.length, w.dims.vocab};
    const tpo::labels_view<const std::int64_t> y{w.labels.data(), w.dims.sequences, w.dims.length};
    for (auto _ : state) {
        backend.row_statistics(z, y, tpo::row_alignment{}, Reduction, stats.data());
        benchmark::DoNotOptimize(stats.data());
    }
    state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(z.size() * sizeof(T)));
    label(state, w.dims, dtype_name<T>());
}

// A model's clean (log-sum-exp) and noisy (scan) logits in the one pass the forward uses; compare
// with the two row_statistics figures.
template <class T>
void row_statistics_pair(benchmark::State& state) {
    auto& w = workload_for<T>(state.range(0));
    tpo::backend::cpu backend(static_cast<int>(state.range(1)));
    std::vector<tpo::row_stats> clean(static_cast<std::size_t>(w.dims.sequences * (w.dims.length - 1)));
    std::vector<tpo::row_stats> noisy(clean.size());
    const tpo::logits_view<const T> z{w.roles[0].data(), w.dims.sequences, w.dims.length, w.dims.vocab};
    const tpo::logits_view<const T> zn{w.roles[1].data(), w.dims.sequences, w.dims.length, w.dims.vocab};
    const tpo::labels_view<const std::int64_t> y{w.labels.data(), w.dims.sequences, w.dims.length};
    for (auto _ : state) {
        backend.row_statistics_pair(z, tpo::row_reduction::logsumexp, clean.data(), zn,
                                    tpo::row_reduction::finiteness, noisy.data(), y, tpo::row_alignment{});
        benchmark::DoNotOptimize(clean.data());
        benchmark::DoNotOptimize(noisy.data());
    }
    state.SetBytesProcessed(state.iterations() * 2 * static_cast<std::int64_t>(z.size() * sizeof(T)));
    label(state, w.dims, dtype_name<T>());
}

template <class T>
void gradient_write(benchmark::State& state) {
    auto& w = workload_for<T>(state.range(0));
    tpo::backend::cpu backend(static_cast<int>(state.range(1)));
    const tpo::logits_view<const T> z{w.roles[0].data(), w.dims.sequences, w.dims.length, w.dims.vocab};
    const tpo::labels_view<const std::int64_t> y{w.labels.data(), w.dims.sequences, w.dims.length};
    const index_t scored = w.dims.length - 1;
    std::vector<tpo::row_stats> stats(static_cast<std::size_t>(w.dims.sequences * scored));
    backend.row_statistics(z, y, tpo::row_alignment{}, tpo::row_reduction::logsumexp, stats.data());
    std::vector<tpo::row_coefficients> coefficients(stats.size());
    for (std::size_t r = 0; r < stats.size(); ++r) coefficients[r] = {0.01, 0.01, stats[r].lse, stats[r].label};
    const tpo::logits_view<T> g{w.grad_clean.data(), w.dims.sequences, w.dims.length, w.dims.vocab};
    for (auto _ : state) {
        backend.row_gradient(z, coefficients.data(), scored, g);
        benchmark::DoNotOptimize(g.data);
    }
    // Reads the logits, writes the gradient.
    state.SetBytesProcessed(state.iterations() * 2 * static_cast<std::int64_t>(z.size() * sizeof(T)));
    label(state, w.dims, dtype_name<T>());
}

template <class T>
void tpo_forward(benchmark::State& state) {
    auto& w = workload_for<T>(state.range(0));
    tpo::backend::cpu backend(static_cast<int>(state.range(1)));
    const auto batch = w.batch();
    for (auto _ : state) {
        tpo::objective<tpo::backend::cpu> objective(backend, tpo_bench::tpo_options());
        benchmark::DoNotOptimize(objective.forward(batch).loss);
    }
    state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(w.input_bytes()));
    label(state, w.dims, dtype_name<T>());
}

template <class T>
void tpo_forward_backward(benchmark::State& state) {
    auto& w = workload_for<T>(state.range(0));
    tpo::backend::cpu backend(static_cast<int>(state.range(1)));
    const auto batch = w.batch();
    const auto grads = w.gradients();
    for (auto _ : state) {
        tpo::objective<tpo::backend::cpu> objective(backend, tpo_bench::tpo_options());
        benchmark::DoNotOptimize(objective.forward(batch).loss);
        objective.backward(batch, grads);
    }
    // Forward reads the four inputs; backward re-reads the clean policy logits and writes both
    // gradients (the noisy one is a delta per row: written, never read).
    state.SetBytesProcessed(state.iterations() *
                            static_cast<std::int64_t>(w.input_bytes() * 5 / 4 + w.gradient_bytes()));
    label(state, w.dims, dtype_name<T>());
}

// Diffusion noise on a batch of 16 CLIP-sized images (3×336×336), as float or 8-bit pixels.
template <class P>
void diffusion_noise(benchmark::State& state) {
    const tpo::index_t n = 16, c = 3, h = 336, wd = 336;
    std::vector<P> in(static_cast<std::size_t>(n * c * h * wd)), out(in.size());
    for (std::size_t i = 0; i < in.size(); ++i) in[i] = static_cast<P>(i % 200);
    tpo::backend::cpu backend(static_cast<int>(state.range(0)));
    const auto vin = tpo::image_view<const P>::nchw(in.data(), n, c, h, wd);
    const auto vout = tpo::image_view<P>::nchw(out.data(), n, c, h, wd);
    tpo::diffusion_options o;
    for (auto _ : state) {
        tpo::add_diffusion_noise(backend, vin, vout, o);
        benchmark::DoNotOptimize(out.data());
    }
    state.SetBytesProcessed(state.iterations() * 2 * static_cast<std::int64_t>(in.size() * sizeof(P)));
    state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(in.size()));
    state.SetLabel(std::string(std::is_same_v<P, float> ? "float" : "uint8") + " 16x3x336x336 threads=" +
                   std::to_string(state.range(0)));
}

void shapes_and_threads(benchmark::internal::Benchmark* b) {
    b->ArgsProduct({{0, 1}, {1, 2}})->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(0.5);
}

}  // namespace

BENCHMARK(diffusion_noise<float>)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(diffusion_noise<std::uint8_t>)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(row_statistics<float, tpo::row_reduction::logsumexp>)->Apply(shapes_and_threads);
BENCHMARK(row_statistics<tpo::bfloat16, tpo::row_reduction::logsumexp>)->Apply(shapes_and_threads);
BENCHMARK(row_statistics<float, tpo::row_reduction::finiteness>)->Apply(shapes_and_threads);
BENCHMARK(row_statistics<tpo::bfloat16, tpo::row_reduction::finiteness>)->Apply(shapes_and_threads);
BENCHMARK(row_statistics_pair<float>)->Apply(shapes_and_threads);
BENCHMARK(row_statistics_pair<tpo::bfloat16>)->Apply(shapes_and_threads);
BENCHMARK(gradient_write<float>)->Apply(shapes_and_threads);
BENCHMARK(gradient_write<tpo::bfloat16>)->Apply(shapes_and_threads);
BENCHMARK(tpo_forward<float>)->Apply(shapes_and_threads);
BENCHMARK(tpo_forward<tpo::bfloat16>)->Apply(shapes_and_threads);
BENCHMARK(tpo_forward_backward<float>)->Apply(shapes_and_threads);
BENCHMARK(tpo_forward_backward<tpo::bfloat16>)->Apply(shapes_and_threads);

BENCHMARK_MAIN();
