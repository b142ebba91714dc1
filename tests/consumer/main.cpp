// Computes TPO losses through the installed headers, on the reference and the CPU backends, and
// checks them against values derived here from the formulas of docs/formulas.md (token rewards, losses)
// with plain loops.
#include <tpo/tpo.hpp>
#include <tpo/backend/cpu.hpp>

#if defined(TPO_CONSUMER_XTENSOR) && __has_include(<tpo/interop/xtensor.hpp>)
#  define TPO_CONSUMER_WITH_XTENSOR 1
#  include <tpo/interop/xtensor.hpp>
#endif

#if defined(TPO_CONSUMER_THRUST)
#  include <tpo/backend/thrust.hpp>
#endif

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <algorithm>
#include <fstream>
#include <initializer_list>
#include <sstream>
#include <string>
#include <vector>

namespace {

int failures = 0;

void expect_near(const char* what, double got, double want, double tol) {
    const bool ok = std::abs(got - want) <= tol * std::max(1.0, std::abs(want));
    std::printf("%-44s %.12f (expected %.12f) %s\n", what, got, want, ok ? "ok" : "FAILED");
    if (!ok) ++failures;
}

// One sequence of length 2 with the causal shift: position 0's logits score label[1].
constexpr std::int64_t P = 1, L = 2, V = 3;

struct side {
    std::vector<double> policy, policy_noisy, reference, reference_noisy;
    std::vector<std::int64_t> labels;
};

// A = Σ_t (ℓ_t + log c_t) over the one scored row, c = σ(s) + a (chosen) or 1 − σ(s) + a (rejected),
// s = z[y] − z̃[y] (the logit score).
double sequence_score(const std::vector<double>& z, const std::vector<double>& zn, std::int64_t y, bool chosen,
                      double a) {
    double sum = 0;
    for (std::int64_t v = 0; v < V; ++v) sum += std::exp(z[v]);
    const double logp = z[y] - std::log(sum);
    const double sig = 1 / (1 + std::exp(-(z[y] - zn[y])));
    return logp + std::log((chosen ? sig : 1 - sig) + a);
}

template <class Backend>
double tpo_loss(Backend& backend, const side& w, const side& l) {
    auto view = [](const std::vector<double>& x) { return tpo::logits_view<const double>{x.data(), P, L, V}; };
    tpo::preference_batch<double, std::int64_t> batch{
        {.policy = view(w.policy), .policy_noisy = view(w.policy_noisy), .reference = view(w.reference),
         .reference_noisy = view(w.reference_noisy), .labels = {w.labels.data(), P, L}},
        {.policy = view(l.policy), .policy_noisy = view(l.policy_noisy), .reference = view(l.reference),
         .reference_noisy = view(l.reference_noisy), .labels = {l.labels.data(), P, L}}};
    return tpo::evaluate(backend, tpo::objective_options{}, batch).loss;
}

// 1 if /proc/cpuinfo lists every one of `flags`, 0 if not, −1 where it cannot be read.
int cpuinfo_has(std::initializer_list<const char*> flags) {
    std::ifstream in("/proc/cpuinfo");
    for (std::string line; std::getline(in, line);) {
        if (line.rfind("flags", 0) != 0) continue;
        std::istringstream words(line.substr(line.find(':') + 1));
        std::vector<std::string> have;
        for (std::string w; words >> w;) have.push_back(w);
        for (const char* f : flags)
            if (std::find(have.begin(), have.end(), f) == have.end()) return 0;
        return 1;
    }
    return -1;
}

// Runtime dispatch: this program is built with the compiler's default flags (no -march), yet the
// CPU backend must run its AVX-512 kernels where the CPU has them, and agree with its baseline
// kernels within the tolerance docs/design.md documents between levels.
void check_dispatch() {
    using tpo::backend::cpu_level;
#if defined(__AVX512F__)
    std::puts("note: this consumer was built with AVX-512 enabled; the dispatch check below proves less");
#endif
    const tpo::backend::cpu best;
    std::printf("cpu backend level: %s (TPO_CPU_LEVEL %s)\n", tpo::backend::to_string(best.level()),
                std::getenv("TPO_CPU_LEVEL") ? std::getenv("TPO_CPU_LEVEL") : "unset");
    const int avx512 = cpuinfo_has({"avx512f", "avx512dq", "avx512bw", "avx512vl"});
    const int avx2 = cpuinfo_has({"avx2", "fma"});
    if (std::getenv("TPO_CPU_LEVEL") == nullptr && avx512 >= 0) {
        const cpu_level expected = !TPO_CPU_DISPATCH ? cpu_level::baseline  // no dispatch in this build
                                   : avx512 == 1        ? cpu_level::avx512
                                   : avx2 == 1          ? cpu_level::avx2
                                                        : cpu_level::baseline;
        const bool ok = best.level() == expected;
        std::printf("level chosen for this CPU (/proc/cpuinfo: avx512 %d, avx2 %d): %s, expected %s %s\n", avx512,
                    avx2, tpo::backend::to_string(best.level()), tpo::backend::to_string(expected),
                    ok ? "ok" : "FAILED");
        if (!ok) ++failures;
    }

    // A realistic row length, float logits: the loss and every gradient entry at the chosen level
    // against the forced baseline.
    const std::int64_t pairs = 2, length = 6, vocab = 32003;
    std::vector<std::vector<float>> logits(8, std::vector<float>(static_cast<std::size_t>(pairs * length * vocab)));
    std::uint64_t state = 20261204;
    for (auto& tensor : logits)
        for (auto& x : tensor) {
            state = state * 6364136223846793005ull + 1442695040888963407ull;
            x = static_cast<float>(static_cast<double>(state >> 11) * 0x1p-53 * 8.0 - 4.0);
        }
    std::vector<std::int64_t> labels(static_cast<std::size_t>(pairs * length));
    for (std::size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<std::int64_t>((i * 7919) % vocab);
    auto view = [&](int k) { return tpo::logits_view<const float>{logits[k].data(), pairs, length, vocab}; };
    const tpo::labels_view<const std::int64_t> y{labels.data(), pairs, length};
    const tpo::preference_batch<float, std::int64_t> batch{
        {.policy = view(0), .policy_noisy = view(1), .reference = view(2), .reference_noisy = view(3), .labels = y},
        {.policy = view(4), .policy_noisy = view(5), .reference = view(6), .reference_noisy = view(7), .labels = y}};
    auto run = [&](const tpo::backend::cpu& backend, std::vector<std::vector<float>>& grads) {
        grads.assign(4, std::vector<float>(logits[0].size()));
        auto g = [&](int k) { return tpo::logits_view<float>{grads[k].data(), pairs, length, vocab}; };
        tpo::preference_gradients<float> views{{g(0), g(1)}, {g(2), g(3)}};
        tpo::backend::cpu b = backend;
        return tpo::evaluate(b, tpo::objective_options{}, batch, &views).loss;
    };
    std::vector<std::vector<float>> g_best, g_base;
    const double loss_best = run(best, g_best);
    const double loss_base = run(tpo::backend::cpu(0, cpu_level::baseline), g_base);
    expect_near("chosen level vs baseline, loss", loss_best, loss_base, 1e-6);
    // Per tensor, max |difference| / max |entry|: an entry α − β·p where the two nearly cancel
    // (the label's, in double) keeps the absolute, not the relative, size of the last-bit
    // differences of the log-sum-exp it was computed from.
    double worst = 0;
    for (int k = 0; k < 4; ++k) {
        double difference = 0, scale = 0;
        for (std::size_t i = 0; i < g_base[k].size(); ++i) {
            difference = std::max(difference, std::abs(static_cast<double>(g_best[k][i]) - g_base[k][i]));
            scale = std::max(scale, std::abs(static_cast<double>(g_base[k][i])));
        }
        worst = std::max(worst, difference / scale);
    }
    const bool ok = worst <= 1e-6;
    std::printf("chosen level vs baseline, gradients: max difference / max entry %.3g (tolerance 1e-6) %s\n", worst,
                ok ? "ok" : "FAILED");
    if (!ok) ++failures;
}

}  // namespace

int main() {
    // Position 1's logits are never scored (nothing follows them); give them values anyway.
    side w{{0.5, -1.0, 2.0, 9, 9, 9}, {0.1, -0.5, 1.0, 9, 9, 9}, {0.2, 0.3, 1.5, 9, 9, 9},
           {0.0, 0.3, 1.9, 9, 9, 9}, {-100, 2}};
    side l{{1.0, 0.0, -1.0, 9, 9, 9}, {1.5, 0.2, -1.0, 9, 9, 9}, {0.7, 0.1, -0.4, 9, 9, 9},
           {0.6, 0.4, -0.4, 9, 9, 9}, {-100, 0}};
    const double beta = 0.1, a = 0.5;
    const double h = (sequence_score(w.policy, w.policy_noisy, 2, true, a) -
                      sequence_score(w.reference, w.reference_noisy, 2, true, a)) -
                     (sequence_score(l.policy, l.policy_noisy, 0, false, a) -
                      sequence_score(l.reference, l.reference_noisy, 0, false, a));
    const double expected = std::log1p(std::exp(-beta * h));  // −log σ(βh)

    tpo::backend::reference reference;
    tpo::backend::cpu cpu;
    expect_near("reference backend, TPO loss", tpo_loss(reference, w, l), expected, 1e-12);
    expect_near("cpu backend, TPO loss", tpo_loss(cpu, w, l), expected, 1e-12);
#if defined(TPO_CONSUMER_ONEDNN)
    // tpo::onednn: the float products go through oneDNN's sgemm. C = A·Bᵀ against the plain sums.
    {
        if (cpu.products() != tpo::backend::cpu_products::onednn) {
            std::printf("FAIL cpu backend with tpo::onednn: products are %s\n", tpo::backend::to_string(cpu.products()));
            ++failures;
        }
        const float a[6] = {1, 2, 3, 4, 5, 6}, b[6] = {0.5f, -1, 2, 0.25f, 3, -2};  // A 2×3, B 2×3
        float c[4] = {};
        cpu.matmul(false, true, 2, 2, 3, a, 3, b, 3, c, 2, 0.0f);
        for (int i = 0; i < 2; ++i)
            for (int j = 0; j < 2; ++j)
                expect_near("cpu backend through oneDNN, A·Bᵀ", c[i * 2 + j],
                            a[i * 3] * b[j * 3] + a[i * 3 + 1] * b[j * 3 + 1] + a[i * 3 + 2] * b[j * 3 + 2], 1e-6);
    }
#endif
#if defined(TPO_CONSUMER_THRUST)
    // Thrust's device system as tpoConfig.cmake chose it for a C++-only project (OpenMP).
    tpo::backend::thrust<> thrust;
    expect_near("thrust backend (host system), TPO loss", tpo_loss(thrust, w, l), expected, 1e-12);
#endif

    // At initialisation the policy is the reference: h = 0 and the loss is ln 2 exactly (docs/formulas.md#numerics).
    side w0 = w, l0 = l;
    w0.reference = w0.policy, w0.reference_noisy = w0.policy_noisy;
    l0.reference = l0.policy, l0.reference_noisy = l0.policy_noisy;
    expect_near("reference backend, policy == reference", tpo_loss(reference, w0, l0), std::log(2.0), 0);
    expect_near("cpu backend, policy == reference", tpo_loss(cpu, w0, l0), std::log(2.0), 0);

#if defined(TPO_CONSUMER_WITH_XTENSOR)
    // The same batch held in xtensor containers, through the xtensor adaptors.
    {
        auto tensor = [](const std::vector<double>& x) {
            xt::xtensor<double, 3> t = xt::zeros<double>({P, L, V});
            std::copy(x.begin(), x.end(), t.begin());
            return t;
        };
        const xt::xtensor<double, 3> zw = tensor(w.policy), zwn = tensor(w.policy_noisy), rw = tensor(w.reference),
                                     rwn = tensor(w.reference_noisy), zl = tensor(l.policy),
                                     zln = tensor(l.policy_noisy), rl = tensor(l.reference),
                                     rln = tensor(l.reference_noisy);
        const xt::xtensor<std::int64_t, 2> yw = {{-100, 2}}, yl = {{-100, 0}};
        namespace ti = tpo::interop;
        tpo::preference_batch<double, std::int64_t> batch{
            {.policy = ti::logits(zw), .policy_noisy = ti::logits(zwn), .reference = ti::logits(rw),
             .reference_noisy = ti::logits(rwn), .labels = ti::labels(yw)},
            {.policy = ti::logits(zl), .policy_noisy = ti::logits(zln), .reference = ti::logits(rl),
             .reference_noisy = ti::logits(rln), .labels = ti::labels(yl)}};
        expect_near("xtensor containers, TPO loss", tpo::evaluate(cpu, tpo::objective_options{}, batch).loss,
                    expected, 1e-12);
    }
#endif

    check_dispatch();

    // Bad input surfaces as tpo::error through the installed headers too.
    try {
        side bad = w;
        bad.labels[1] = V;
        tpo_loss(reference, bad, l);
        std::puts("label out of range: no error FAILED");
        ++failures;
    } catch (const tpo::error& e) {
        std::printf("label out of range: tpo::error \"%s\" ok\n", e.what());
    }
    return failures == 0 ? 0 : 1;
}
