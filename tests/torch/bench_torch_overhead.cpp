// What tpo::torch's autograd function costs over calling the library directly on the same
// buffers, on the CPU: one TPO step (forward and the gradients of the policy's logits) on
// (S/2, L, V) logits per side, alternating the two ways step by step, medians of each.
//
//   direct    tpo::evaluate on tpo::backend::cpu, views on the tensors' memory, gradients written
//             into tensors allocated once
//   fresh     the same, the four gradient tensors allocated (torch::empty_like) in each step, as
//             the autograd function must: what both pay for fresh memory (page faults where the
//             allocator returns large blocks to the system, as glibc's default does)
//   autograd  tpo::libtorch::preference_loss, then loss.backward(); the leaves' .grad reset to
//             undefined before each step (zero_grad(set_to_none)), so each step allocates its
//             gradients as a trainer's step does
//
// With --hidden H the inputs are hidden states (S/2, L, H) per side, clean and noisy, and an
// lm_head (V, H) with bias (tpo::libtorch::hidden_batch; the reference as scores), and the
// gradients are those of the four hidden-state tensors, the weight and the bias.
//
// Usage: tpo_bench_torch_overhead [S L V] [--threads N] [--reps N] [--reference logits|scores]
//                                 [--hidden H]
// Logits (or hidden states and head) hashed as bench/workload.hpp, every label scored; fp32.
#include <tpo/torch.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

torch::Tensor hashed(std::int64_t S, std::int64_t L, std::int64_t V, std::uint64_t seed) {
    torch::Tensor z = torch::empty({S, L, V}, torch::kFloat);
    float* p = z.data_ptr<float>();
    const std::int64_t n = z.numel();
    at::parallel_for(0, n, 1 << 16, [&](std::int64_t begin, std::int64_t end) {
        for (std::int64_t i = begin; i < end; ++i) {
            const std::uint64_t h = (static_cast<std::uint64_t>(i) * 2654435761ull + seed * 97531ull) & 0xffffffffull;
            p[i] = static_cast<float>(static_cast<double>(h) * 0x1p-32 * 8.0 - 4.0);
        }
    });
    return z;
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

/// The same three ways with hidden states and the lm_head in (scaled so that the logits spread
/// over a few units).
int hidden_overhead(std::int64_t S, std::int64_t L, std::int64_t V, std::int64_t H, int threads, int reps) {
    const std::int64_t P = S / 2;
    const double spread = 1.0 / std::sqrt(static_cast<double>(H));
    tpo::libtorch::hidden_batch b;
    b.policy_hidden_chosen = hashed(P, L, H, 1), b.policy_hidden_rejected = hashed(P, L, H, 11);
    b.policy_hidden_chosen_noisy = hashed(P, L, H, 2), b.policy_hidden_rejected_noisy = hashed(P, L, H, 12);
    b.lm_head_weight = hashed(1, V, H, 5).view({V, H}).mul_(spread), b.lm_head_bias = hashed(1, 1, V, 6).view({V});
    b.reference_chosen_scores = -9.0 * static_cast<double>(L - 1) - torch::arange(P, torch::kDouble);
    b.reference_rejected_scores = b.reference_chosen_scores - 0.25;
    torch::Tensor labels = torch::arange(P * L, torch::kLong).mul(7919).remainder(V).view({P, L});
    b.labels_chosen = labels, b.labels_rejected = labels.flip(0).contiguous();
    const tpo::objective_options options;

    auto leaves = [&]() -> std::vector<torch::Tensor*> {
        return {&b.policy_hidden_chosen, &b.policy_hidden_chosen_noisy, &b.policy_hidden_rejected,
                &b.policy_hidden_rejected_noisy, &b.lm_head_weight, &b.lm_head_bias};
    };
    std::vector<torch::Tensor> grads;
    for (torch::Tensor* t : leaves()) grads.push_back(torch::empty_like(*t));
    auto states = [](const torch::Tensor& t) {
        return tpo::hidden_view<const float>{t.data_ptr<float>(), t.size(0), t.size(1), t.size(2)};
    };
    auto side = [&](const torch::Tensor& h, const torch::Tensor& hn, const torch::Tensor& y, const torch::Tensor& scores) {
        return tpo::hidden_side_batch<float, std::int64_t>{
            .policy = states(h), .policy_noisy = states(hn), .labels = {y.data_ptr<std::int64_t>(), y.size(0), y.size(1)},
            .reference_scores = {scores.data_ptr<double>(), scores.size(0)}};
    };
    const tpo::hidden_preference_batch<float, std::int64_t> batch{
        {b.lm_head_weight.data_ptr<float>(), b.lm_head_bias.data_ptr<float>(), V, H},
        {},
        side(b.policy_hidden_chosen, b.policy_hidden_chosen_noisy, b.labels_chosen, b.reference_chosen_scores),
        side(b.policy_hidden_rejected, b.policy_hidden_rejected_noisy, b.labels_rejected, b.reference_rejected_scores)};
    auto views = [](std::vector<torch::Tensor>& g) {
        auto out = [](torch::Tensor& t) {
            return tpo::hidden_view<float>{t.data_ptr<float>(), t.size(0), t.size(1), t.size(2)};
        };
        return tpo::hidden_gradients<float>{{out(g[0]), out(g[1])}, {out(g[2]), out(g[3])}, g[4].data_ptr<float>(),
                                            g[5].data_ptr<float>()};
    };
    const tpo::hidden_gradients<float> g = views(grads);
    tpo::backend::cpu backend(threads);
    for (torch::Tensor* t : leaves()) t->requires_grad_(true);

    using clock = std::chrono::steady_clock;
    std::vector<double> direct, fresh, autograd;
    double loss_direct = 0, loss_autograd = 0;
    for (int rep = -1; rep < reps; ++rep) {  // rep -1 warms all up
        auto t0 = clock::now();
        loss_direct = tpo::evaluate(backend, options, batch, &g).loss;
        auto t1 = clock::now();
        {
            std::vector<torch::Tensor> own;
            for (const torch::Tensor& z : grads) own.push_back(torch::empty_like(z));
            const tpo::hidden_gradients<float> h = views(own);
            tpo::evaluate(backend, options, batch, &h);
        }
        auto t1b = clock::now();
        for (torch::Tensor* t : leaves()) t->mutable_grad() = torch::Tensor();
        auto t2 = clock::now();
        const auto r = tpo::libtorch::preference_loss(b, options);
        r.loss.backward();
        auto t3 = clock::now();
        loss_autograd = r.loss.item<double>();
        if (rep >= 0) {
            direct.push_back(std::chrono::duration<double>(t1 - t0).count());
            fresh.push_back(std::chrono::duration<double>(t1b - t1).count());
            autograd.push_back(std::chrono::duration<double>(t3 - t2).count());
        }
    }
    bool same = true;
    const std::vector<torch::Tensor*> x = leaves();
    for (std::size_t k = 0; k < x.size(); ++k) same = same && torch::equal(x[k]->grad(), grads[k]);
    const double d = median(direct), f = median(fresh), a = median(autograd);
    std::printf("hidden states: S=%lld L=%lld H=%lld V=%lld fp32, bias, reference scores, %d thread(s), %d steps "
                "each: direct %.2f ms, fresh %.2f ms, autograd %.2f ms; autograd over direct %+.1f %%, over fresh "
                "%+.1f %% (loss %.9g vs %.9g, gradients %s)\n",
                static_cast<long long>(S), static_cast<long long>(L), static_cast<long long>(H),
                static_cast<long long>(V), threads, reps, 1e3 * d, 1e3 * f, 1e3 * a, 100 * (a / d - 1),
                100 * (a / f - 1), loss_direct, loss_autograd, same ? "identical" : "DIFFER");
    return same ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
    std::int64_t S = 4, L = 512, V = 32000;
    int threads = 1, reps = 15;
    bool reference_logits = false;
    std::int64_t hidden = 0;
    std::vector<std::string> positional;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--threads" && i + 1 < argc) threads = std::atoi(argv[++i]);
        else if (a == "--reps" && i + 1 < argc) reps = std::atoi(argv[++i]);
        else if (a == "--reference" && i + 1 < argc) reference_logits = std::string(argv[++i]) == "logits";
        else if (a == "--hidden" && i + 1 < argc) hidden = std::atoll(argv[++i]);
        else positional.push_back(a);
    }
    if (positional.size() == 3) S = std::stoll(positional[0]), L = std::stoll(positional[1]), V = std::stoll(positional[2]);
    at::set_num_threads(threads);
    if (hidden > 0) return hidden_overhead(S, L, V, hidden, threads, reps);
    const std::int64_t P = S / 2;

    // Per side: the policy's clean and noisy logits; the reference as its own two tensors or as
    // precomputed sequence scores.
    tpo::libtorch::logits_batch b;
    b.policy_chosen = hashed(P, L, V, 1), b.policy_rejected = hashed(P, L, V, 11);
    b.policy_chosen_noisy = hashed(P, L, V, 2), b.policy_rejected_noisy = hashed(P, L, V, 12);
    if (reference_logits) {
        b.reference_chosen = hashed(P, L, V, 3), b.reference_rejected = hashed(P, L, V, 13);
        b.reference_chosen_noisy = hashed(P, L, V, 4), b.reference_rejected_noisy = hashed(P, L, V, 14);
    } else {
        b.reference_chosen_scores = -9.0 * static_cast<double>(L - 1) - torch::arange(P, torch::kDouble);
        b.reference_rejected_scores = b.reference_chosen_scores - 0.25;
    }
    torch::Tensor labels = torch::arange(P * L, torch::kLong).mul(7919).remainder(V).view({P, L});
    b.labels_chosen = labels, b.labels_rejected = labels.flip(0).contiguous();
    const tpo::objective_options options;

    // Direct: the same tensors' memory, gradients into tensors allocated once.
    std::vector<torch::Tensor> grads;
    for (const torch::Tensor& z : {b.policy_chosen, b.policy_chosen_noisy, b.policy_rejected, b.policy_rejected_noisy})
        grads.push_back(torch::empty_like(z));
    auto view = [](const torch::Tensor& t) { return tpo::logits_view<const float>{t.data_ptr<float>(), t.size(0), t.size(1), t.size(2)}; };
    auto out = [](torch::Tensor& t) { return tpo::logits_view<float>{t.data_ptr<float>(), t.size(0), t.size(1), t.size(2)}; };
    auto side = [&](const torch::Tensor& z, const torch::Tensor& zn, const torch::Tensor& r, const torch::Tensor& rn,
                    const torch::Tensor& y, const torch::Tensor& scores) {
        tpo::side_batch<float, std::int64_t> s{.policy = view(z), .policy_noisy = view(zn),
                                               .labels = {y.data_ptr<std::int64_t>(), y.size(0), y.size(1)}};
        if (r.defined()) s.reference = view(r), s.reference_noisy = view(rn);
        else s.reference_scores = {scores.data_ptr<double>(), scores.size(0)};
        return s;
    };
    const tpo::preference_batch<float, std::int64_t> batch{
        side(b.policy_chosen, b.policy_chosen_noisy, b.reference_chosen, b.reference_chosen_noisy, b.labels_chosen,
             b.reference_chosen_scores),
        side(b.policy_rejected, b.policy_rejected_noisy, b.reference_rejected, b.reference_rejected_noisy,
             b.labels_rejected, b.reference_rejected_scores)};
    const tpo::preference_gradients<float> g{{out(grads[0]), out(grads[1])}, {out(grads[2]), out(grads[3])}};
    tpo::backend::cpu backend(threads);

    for (torch::Tensor* t : {&b.policy_chosen, &b.policy_chosen_noisy, &b.policy_rejected, &b.policy_rejected_noisy})
        t->requires_grad_(true);

    using clock = std::chrono::steady_clock;
    std::vector<double> direct, fresh, autograd;
    double loss_direct = 0, loss_autograd = 0;
    for (int rep = -1; rep < reps; ++rep) {  // rep -1 warms all up
        auto t0 = clock::now();
        loss_direct = tpo::evaluate(backend, options, batch, &g).loss;
        auto t1 = clock::now();
        {
            std::vector<torch::Tensor> own;
            for (const torch::Tensor& z : grads) own.push_back(torch::empty_like(z));
            const tpo::preference_gradients<float> h{{out(own[0]), out(own[1])}, {out(own[2]), out(own[3])}};
            tpo::evaluate(backend, options, batch, &h);
        }
        auto t1b = clock::now();
        for (torch::Tensor* t : {&b.policy_chosen, &b.policy_chosen_noisy, &b.policy_rejected, &b.policy_rejected_noisy})
            t->mutable_grad() = torch::Tensor();
        auto t2 = clock::now();
        const auto r = tpo::libtorch::preference_loss(b, options);
        r.loss.backward();
        auto t3 = clock::now();
        loss_autograd = r.loss.item<double>();
        if (rep >= 0) {
            direct.push_back(std::chrono::duration<double>(t1 - t0).count());
            fresh.push_back(std::chrono::duration<double>(t1b - t1).count());
            autograd.push_back(std::chrono::duration<double>(t3 - t2).count());
        }
    }
    const bool same = torch::equal(b.policy_chosen.grad(), grads[0]) && torch::equal(b.policy_rejected_noisy.grad(), grads[3]);
    const double d = median(direct), f = median(fresh), a = median(autograd);
    std::printf("S=%lld L=%lld V=%lld fp32, reference %s, %d thread(s), %d steps each: direct %.2f ms, fresh %.2f ms, "
                "autograd %.2f ms; autograd over direct %+.1f %%, over fresh %+.1f %% (loss %.9g vs %.9g, "
                "gradients %s)\n",
                static_cast<long long>(S), static_cast<long long>(L), static_cast<long long>(V),
                reference_logits ? "logits" : "scores", threads, reps, 1e3 * d, 1e3 * f, 1e3 * a, 100 * (a / d - 1),
                100 * (a / f - 1), loss_direct, loss_autograd, same ? "identical" : "DIFFER");
    return same ? 0 : 1;
}
