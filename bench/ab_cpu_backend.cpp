// Two versions of the CPU backend in one process: tpo::backend::cpu_a (a renamed copy of the
// backend at some git revision, made by scripts/ab-cpu-backend) and tpo::backend::cpu (the working
// tree), each running the whole TPO step (forward + backward, bench/workload.hpp) in turn on the
// same buffers, timing the forward and the whole step. Alternating steps inside one process sees
// the same memory, the same pages and the same moment of a shared host, so differences of 2–5 %
// that separate processes hide in this machine's drift become visible.
//
// usage: ab_cpu_backend THREADS [fp32|bf16] [llava|qwen2vl] [scores|logits] [ROUNDS]

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <tpo/backend/cpu.hpp>
#include <tpo/backend/cpu_a.hpp>
#include <tpo/tpo.hpp>

#include "workload.hpp"

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

struct step_time {
    double forward_ms, step_ms;
};

template <class Backend, class Batch, class Gradients>
step_time timed_step(Backend& backend, const Batch& batch, const Gradients& grads) {
    const double start = now();
    tpo::objective<Backend> objective(backend, tpo_bench::tpo_options());
    objective.forward(batch);
    const double forward_end = now();
    objective.backward(batch, grads);
    return {(forward_end - start) * 1e3, (now() - start) * 1e3};
}

struct quartiles {
    double q1, median, q3;
    explicit quartiles(std::vector<double> v) {
        std::sort(v.begin(), v.end());
        q1 = v[v.size() / 4];
        median = v[v.size() / 2];
        q3 = v[3 * v.size() / 4];
    }
};

template <class T>
int compare(int threads, tpo_bench::shape dims, tpo_bench::reference_input reference, int rounds) {
    tpo_bench::workload<T> w(dims, true, reference);
    tpo::backend::cpu_a a(threads);
    tpo::backend::cpu b(threads);
    const auto batch = w.batch();
    const auto grads = w.gradients();
    std::vector<double> fa, fb, ta, tb;
    for (int round = -2; round < rounds; ++round) {  // two warm-up rounds
        const step_time x = timed_step(a, batch, grads), y = timed_step(b, batch, grads);
        if (round >= 0) {
            fa.push_back(x.forward_ms);
            fb.push_back(y.forward_ms);
            ta.push_back(x.step_ms);
            tb.push_back(y.step_ms);
        }
    }
    auto report = [](const char* what, const std::vector<double>& times_a, const std::vector<double>& times_b) {
        const quartiles qa(times_a), qb(times_b);
        std::printf("%-8s A (revision)     median %7.2f ms  (q1 %.2f, q3 %.2f)\n", what, qa.median, qa.q1, qa.q3);
        std::printf("%-8s B (working tree) median %7.2f ms  (q1 %.2f, q3 %.2f)  B/A %.3f\n", what, qb.median, qb.q1,
                    qb.q3, qb.median / qa.median);
    };
    report("forward", fa, fb);
    report("step", ta, tb);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    const std::string usage = "usage: ab_cpu_backend THREADS [fp32|bf16] [llava|qwen2vl] [scores|logits] [ROUNDS]";
    if (argc < 2) {
        std::fprintf(stderr, "%s\n", usage.c_str());
        return 2;
    }
    const int threads = std::atoi(argv[1]);
    const std::string dtype = argc > 2 ? argv[2] : "fp32", shape = argc > 3 ? argv[3] : "llava",
                      reference = argc > 4 ? argv[4] : "scores";
    const int rounds = argc > 5 ? std::atoi(argv[5]) : 40;
    if (threads < 1 || rounds < 4 || (dtype != "fp32" && dtype != "bf16") || (shape != "llava" && shape != "qwen2vl") ||
        (reference != "scores" && reference != "logits")) {
        std::fprintf(stderr, "%s\n", usage.c_str());
        return 2;
    }
    const tpo_bench::shape dims = shape == "llava" ? tpo_bench::shape{4, 512, 32000} : tpo_bench::shape{4, 128, 152064};
    const auto ref = reference == "scores" ? tpo_bench::reference_input::scores : tpo_bench::reference_input::logits;
    std::printf("%s %s, reference as %s, %d threads, %d alternating rounds\n", shape.c_str(), dtype.c_str(),
                reference.c_str(), threads, rounds);
    return dtype == "fp32" ? compare<float>(threads, dims, ref, rounds)
                           : compare<tpo::bfloat16>(threads, dims, ref, rounds);
}
