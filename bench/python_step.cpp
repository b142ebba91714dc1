// The C++ side of bench/compare_python: the step tpo_driver times (tpo::objective on the CPU
// backend, forward then backward into caller-owned gradients, default options), as a C function
// the script calls through ctypes on the same NumPy buffers the Python package reads, so the two
// are timed in one process, alternating.

#include <chrono>
#include <cstdint>

#include <tpo/backend/cpu.hpp>
#include <tpo/loss/objective.hpp>

namespace {

template <class T>
double step(const void* const* roles, const std::int64_t* labels, void* const* grads, std::int64_t sequences,
            std::int64_t length, std::int64_t vocab, int threads, bool lean, double* loss) {
    const std::int64_t pairs = sequences / 2, half = pairs * length * vocab;
    auto view = [&](const void* p, int side) {
        return tpo::logits_view<const T>{static_cast<const T*>(p) + side * half, pairs, length, vocab};
    };
    auto gradient = [&](void* p, int side) {
        return tpo::logits_view<T>{static_cast<T*>(p) + side * half, pairs, length, vocab};
    };
    auto side = [&](int s) {
        tpo::side_batch<T, std::int64_t> b;
        b.policy = view(roles[0], s);
        b.policy_noisy = view(roles[1], s);
        b.reference = view(roles[2], s);
        b.reference_noisy = view(roles[3], s);
        b.labels = {labels + s * pairs * length, pairs, length};
        return b;
    };
    const tpo::preference_batch<T, std::int64_t> batch{side(0), side(1)};
    const tpo::preference_gradients<T> g{{gradient(grads[0], 0), gradient(grads[1], 0)},
                                         {gradient(grads[0], 1), gradient(grads[1], 1)}};
    const auto start = std::chrono::steady_clock::now();
    tpo::backend::cpu backend(threads);
    tpo::objective_options options;
    options.check_unused_logits = !lean;
    tpo::objective<tpo::backend::cpu> objective(backend, options);
    *loss = objective.forward(batch).loss;
    objective.backward(batch, g);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

/// roles: policy, policy noisy, reference, reference noisy, each (S, L, V), chosen rows first;
/// grads: clean and noisy gradients, (S, L, V); dtype 0 float32, 1 bfloat16. Returns seconds.
extern "C" double tpo_bench_step(const void* const* roles, const std::int64_t* labels, void* const* grads,
                                 std::int64_t sequences, std::int64_t length, std::int64_t vocab, int dtype,
                                 int threads, int lean, double* loss) {
    try {
        if (dtype == 1)
            return step<tpo::bfloat16>(roles, labels, grads, sequences, length, vocab, threads, lean != 0, loss);
        return step<float>(roles, labels, grads, sequences, length, vocab, threads, lean != 0, loss);
    } catch (...) {
        return -1.0;
    }
}
