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
#include <cstdio>
#include <algorithm>
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
