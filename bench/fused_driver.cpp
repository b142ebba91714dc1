// The library's side of a hidden-states benchmark: a long-lived process that holds one fused
// lm_head workload and answers commands on stdin, so a script can interleave its runs with other
// tools' (PyTorch eager, Liger-Kernel) on the same machine.
//
//   tpo_fused_driver P L H V fp32|bf16 THREADS tpo|dpo [CHUNK]
//
// P pairs of chosen and rejected answers of L tokens, hidden size H, vocabulary V; every label
// scored (no prompt mask), labels and values from integer hashes that a script can reproduce:
//   hidden state (side, pass, s, t, k) and head (v, k): hashed_value(i, seed) of the flat index i
//   (row-major), seeds 11 + 2·side + pass for the states (pass 0 clean, 1 noisy), 97 for the
//   head, scaled by 1 (states) and 1/sqrt(H) (head); label (s, t) = (s·L + t)·7919 mod V.
// `tpo`: the objective's defaults (self-calibrated weights, logit score, sigmoid loss, β = 0.1),
// `dpo`: plain DPO with the sigmoid loss; the reference enters as precomputed sequence scores
// (given_reference_score). Gradients: the policy states of both passes, the head's weight.
//
// Commands: run → "seconds loss" of one forward + backward; floor → "seconds" of the four
// matrix products of the clean pass of both sides (logits forward, logits again, ∂L/∂h, ∂L/∂W on
// every scored row, float results) done once each by the same backend; rss → "peak_rss_bytes
// input_bytes gradient_bytes"; quit.

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include <tpo/backend/cpu.hpp>
#include <tpo/loss/objective.hpp>

namespace {

using tpo::index_t;

double peak_rss_bytes() {
    std::FILE* status = std::fopen("/proc/self/status", "r");
    double kib = -1;
    if (status) {
        char line[256];
        while (std::fgets(line, sizeof line, status))
            if (std::strncmp(line, "VmHWM:", 6) == 0) kib = std::atof(line + 6);
        std::fclose(status);
    }
    return kib * 1024.0;
}

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

/// Uniform in [−1, 1) from a multiplicative hash of (i, seed).
double hashed_value(std::uint64_t i, std::uint64_t seed) {
    const std::uint64_t h = (i * 2654435761ull + seed * 97531ull) & 0xffffffffull;
    return static_cast<double>(h) * 0x1p-31 - 1.0;
}

template <class T>
void fill(std::vector<T>& v, std::uint64_t seed, double scale) {
    const auto n = static_cast<std::int64_t>(v.size());
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < n; ++i)
        v[static_cast<std::size_t>(i)] =
            tpo::narrow<T>(static_cast<float>(scale * hashed_value(static_cast<std::uint64_t>(i), seed)));
}

template <class T>
int serve(index_t pairs, index_t length, index_t hidden, index_t vocab, int threads, bool tpo_method,
          index_t chunk) {
    const auto states = static_cast<std::size_t>(pairs * length * hidden);
    std::vector<T> head(static_cast<std::size_t>(vocab * hidden));
    fill(head, 97, 1.0 / std::sqrt(static_cast<double>(hidden)));
    std::vector<T> h[2][2], gh[2][2];
    std::vector<std::int64_t> labels(static_cast<std::size_t>(pairs * length));
    for (index_t i = 0; i < pairs * length; ++i) labels[static_cast<std::size_t>(i)] = (i * 7919) % vocab;
    for (int side = 0; side < 2; ++side)
        for (int pass = 0; pass < 2; ++pass) {
            h[side][pass].resize(states);
            fill(h[side][pass], static_cast<std::uint64_t>(11 + 2 * side + pass), 1.0);
            gh[side][pass].assign(states, T{});
        }
    std::vector<T> grad_head(head.size());
    std::vector<double> reference_scores[2];
    for (int side = 0; side < 2; ++side)
        for (index_t s = 0; s < pairs; ++s)
            reference_scores[side].push_back(-static_cast<double>(length - 1) * std::log(static_cast<double>(vocab)) -
                                             0.5 * static_cast<double>(side * pairs + s));
    auto view = [&](std::vector<T>& v) { return tpo::hidden_view<T>{v.data(), pairs, length, hidden}; };
    auto side_batch = [&](int side) {
        tpo::hidden_side_batch<T, std::int64_t> b;
        b.policy = view(h[side][0]);
        if (tpo_method) b.policy_noisy = view(h[side][1]);
        b.labels = {labels.data(), pairs, length};
        b.reference_scores = {reference_scores[side].data(), pairs};
        return b;
    };
    const tpo::head_view<const T> w{head.data(), nullptr, vocab, hidden};
    const tpo::hidden_preference_batch<T, std::int64_t> batch{w, {}, side_batch(0), side_batch(1)};
    tpo::hidden_gradients<T> grads{{view(gh[0][0]), tpo_method ? view(gh[0][1]) : tpo::hidden_view<T>{}},
                                   {view(gh[1][0]), tpo_method ? view(gh[1][1]) : tpo::hidden_view<T>{}},
                                   grad_head.data(),
                                   nullptr};
    tpo::objective_options options;
    if (!tpo_method) options.weighting = tpo::token_weighting::none;
    if (chunk > 0) options.chunk_tokens = chunk;
    tpo::backend::cpu backend(threads);

    // The floor's operands: the scored rows of both sides (L − 1 per sequence) as one block.
    using A = tpo::rows::fused_accumulate_t<T>;
    const index_t rows = 2 * pairs * (length - 1);
    std::vector<T> gathered;
    std::vector<A> logits, hidden_grad, weight_grad;
    std::cout << "ready" << std::endl;
    for (std::string command; std::getline(std::cin, command);) {
        if (command == "run") {
            const double start = now();
            const tpo::objective_result r = tpo::evaluate(backend, options, batch, &grads);
            std::printf("%.9f %.17g\n", now() - start, r.loss);
        } else if (command == "floor") {
            if (gathered.empty()) {
                gathered.resize(static_cast<std::size_t>(rows * hidden));
                fill(gathered, 5, 1.0);
                logits.resize(static_cast<std::size_t>(rows * vocab));
                hidden_grad.resize(static_cast<std::size_t>(rows * hidden));
                weight_grad.resize(head.size());
            }
            const double start = now();
            for (int k = 0; k < 2; ++k)
                backend.matmul(false, true, rows, vocab, hidden, gathered.data(), hidden, head.data(), hidden,
                               logits.data(), vocab, A(0));
            backend.matmul(false, false, rows, hidden, vocab, logits.data(), vocab, head.data(), hidden,
                           hidden_grad.data(), hidden, A(0));
            backend.matmul(true, false, vocab, hidden, rows, logits.data(), vocab, gathered.data(), hidden,
                           weight_grad.data(), hidden, A(0));
            std::printf("%.9f\n", now() - start);
        } else if (command == "rss") {
            const double input = static_cast<double>(head.size() + (tpo_method ? 4 : 2) * states) * sizeof(T);
            const double gradient = static_cast<double>(head.size() + (tpo_method ? 4 : 2) * states) * sizeof(T);
            std::printf("%.0f %.0f %.0f\n", peak_rss_bytes(), input, gradient);
        } else if (command == "quit") {
            break;
        } else {
            std::printf("error: unknown command '%s'\n", command.c_str());
        }
        std::fflush(stdout);
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 8 || argc > 9) {
        std::fprintf(stderr, "usage: tpo_fused_driver P L H V fp32|bf16 THREADS tpo|dpo [CHUNK]\n");
        return 2;
    }
    const index_t pairs = std::atoll(argv[1]), length = std::atoll(argv[2]), hidden = std::atoll(argv[3]),
                  vocab = std::atoll(argv[4]);
    const std::string dtype = argv[5], method = argv[7];
    const int threads = std::atoi(argv[6]);
    const index_t chunk = argc == 9 ? std::atoll(argv[8]) : 0;
    if (pairs < 1 || length < 2 || hidden < 1 || vocab < 1 || threads < 1 || chunk < 0 ||
        (dtype != "fp32" && dtype != "bf16") || (method != "tpo" && method != "dpo")) {
        std::fprintf(stderr, "tpo_fused_driver: bad arguments\n");
        return 2;
    }
    if (dtype == "fp32") return serve<float>(pairs, length, hidden, vocab, threads, method == "tpo", chunk);
    return serve<tpo::bfloat16>(pairs, length, hidden, vocab, threads, method == "tpo", chunk);
}
