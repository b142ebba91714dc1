// Our side of bench/compare_pytorch: a long-lived process that holds one TPO workload and answers
// commands on stdin, so the script can interleave our runs with PyTorch's.
//
//   tpo_driver tpo S L V fp32|bf16 THREADS [checked|lean] [logits|scores]
//                                            commands: run → "time_s loss", rss → "peak_rss_bytes
//                                            input_bytes gradient_bytes", quit. `lean` sets
//                                            check_unused_logits = false (noisy rows read at the
//                                            label only); `checked`, the library's default, scans them.
//                                            `scores`: the reference enters as precomputed sequence
//                                            scores (workload.hpp), not as its two logits tensors.
//   tpo_driver bandwidth GIB THREADS         commands: run → "seconds bytes" of one read sweep
//
// The bandwidth probe lives in its own process so that its buffer never counts in the peak
// resident memory of the TPO run.

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include <omp.h>
#include <sys/resource.h>

#include "workload.hpp"

namespace {

// Peak resident memory of this process. Linux folds the pre-exec high-water mark of the launching
// process into getrusage's ru_maxrss, so under bench/compare_pytorch it would report the Python
// coordinator's peak whenever ours is smaller; /proc/self/status's VmHWM belongs to this program only.
double peak_rss_bytes() {
    std::FILE* status = std::fopen("/proc/self/status", "r");
    if (status) {
        char line[256];
        double kib = -1;
        while (std::fgets(line, sizeof line, status))
            if (std::strncmp(line, "VmHWM:", 6) == 0) kib = std::atof(line + 6);
        std::fclose(status);
        if (kib >= 0) return kib * 1024.0;
    }
    rusage usage{};
    getrusage(RUSAGE_SELF, &usage);
    return static_cast<double>(usage.ru_maxrss) * 1024.0;
}

double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

template <class T>
int serve_tpo(tpo_bench::shape dims, int threads, bool lean, tpo_bench::reference_input reference) {
    tpo_bench::workload<T> w(dims, true, reference);
    tpo::backend::cpu backend(threads);
    const auto batch = w.batch();
    const auto grads = w.gradients();
    std::cout << "ready" << std::endl;
    for (std::string command; std::getline(std::cin, command);) {
        if (command == "run") {
            const double start = now();
            tpo::objective_options options = tpo_bench::tpo_options();
            options.check_unused_logits = !lean;
            tpo::objective<tpo::backend::cpu> objective(backend, options);
            const tpo::objective_result r = objective.forward(batch);
            objective.backward(batch, grads);
            const double seconds = now() - start;
            std::printf("%.9f %.17g\n", seconds, r.loss);
            std::fflush(stdout);
        } else if (command == "rss") {
            std::printf("%.0f %.0f %.0f\n", peak_rss_bytes(), w.input_bytes(),
                        w.gradient_bytes());
            std::fflush(stdout);
        } else if (command == "quit") {
            break;
        }
    }
    return 0;
}

// STREAM-like read bandwidth: every thread sums its static share of a buffer far larger than
// the caches (first-touched by the same thread), as many bytes as the TPO run's largest tensor.
int serve_bandwidth(double gib, int threads) {
    const auto n = static_cast<std::int64_t>(gib * (1u << 30) / sizeof(float));
    float* data = static_cast<float*>(std::aligned_alloc(64, static_cast<std::size_t>(n) * sizeof(float)));
#pragma omp parallel num_threads(threads)
    {
        // First touch by the thread that sweeps the same range.
        const std::int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
        for (std::int64_t i = n * me / team; i < n * (me + 1) / team; ++i) data[i] = static_cast<float>(i & 1023);
    }
    std::cout << "ready" << std::endl;
    volatile double sink = 0;
    for (std::string command; std::getline(std::cin, command);) {
        if (command == "run") {
            const double start = now();
            double total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
            {
                // Eigen's sum keeps several vector accumulators, so the sweep is bound by memory,
                // not by the latency of one dependent add.
                const std::int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
                const std::int64_t lo = n * me / team, hi = n * (me + 1) / team;
                total += static_cast<double>(Eigen::Map<const Eigen::ArrayXf>(data + lo, hi - lo).sum());
            }
            const double seconds = now() - start;
            sink = sink + total;
            std::printf("%.9f %.0f\n", seconds, static_cast<double>(n) * sizeof(float));
            std::fflush(stdout);
        } else if (command == "quit") {
            break;
        }
    }
    std::free(data);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    const std::string mode = argc > 1 ? argv[1] : "";
    if (mode == "tpo" && argc >= 7 && argc <= 9) {
        const tpo_bench::shape dims{std::atoll(argv[2]), std::atoll(argv[3]), std::atoll(argv[4])};
        const std::string dtype = argv[5];
        const int threads = std::atoi(argv[6]);
        const std::string checks = argc >= 8 ? argv[7] : "checked";
        if (checks != "checked" && checks != "lean") {
            std::fprintf(stderr, "tpo_driver: '%s', expected checked or lean\n", checks.c_str());
            return 2;
        }
        const bool lean = checks == "lean";
        const std::string reference = argc == 9 ? argv[8] : "logits";
        if (reference != "logits" && reference != "scores") {
            std::fprintf(stderr, "tpo_driver: '%s', expected logits or scores\n", reference.c_str());
            return 2;
        }
        const auto ref = reference == "scores" ? tpo_bench::reference_input::scores : tpo_bench::reference_input::logits;
        if (dims.sequences < 2 || dims.sequences % 2 != 0 || dims.length < 2 || dims.vocab < 1 || threads < 1) {
            std::fprintf(stderr, "tpo_driver: bad shape or thread count\n");
            return 2;
        }
        if (dtype == "fp32") return serve_tpo<float>(dims, threads, lean, ref);
        if (dtype == "bf16") return serve_tpo<tpo::bfloat16>(dims, threads, lean, ref);
        std::fprintf(stderr, "tpo_driver: dtype '%s', expected fp32 or bf16\n", dtype.c_str());
        return 2;
    }
    if (mode == "bandwidth" && argc == 4) return serve_bandwidth(std::atof(argv[2]), std::atoi(argv[3]));
    std::fprintf(stderr,
                 "usage: tpo_driver tpo S L V fp32|bf16 THREADS [checked|lean] [logits|scores]\n"
                 "       tpo_driver bandwidth GIB THREADS\n");
    return 2;
}
