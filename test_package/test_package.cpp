// Conan's test_package: the packaged headers compute the loss of a batch whose policy equals its
// reference, which must be ln 2 exactly (SPEC §7), on every backend the options brought along.
#include <tpo/tpo.hpp>
#if defined(TPO_TEST_CPU)
#  include <tpo/backend/cpu.hpp>
#endif
#if defined(TPO_TEST_XTENSOR) && __has_include(<tpo/interop/xtensor.hpp>)
#  define TPO_TEST_WITH_XTENSOR 1
#  include <tpo/interop/xtensor.hpp>
#endif
#if defined(TPO_TEST_TBB)
#  include <oneapi/tbb/version.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

constexpr std::int64_t P = 2, L = 3, V = 4;

template <class Backend>
double loss_at_initialisation(Backend& backend, const std::vector<float>& z, const std::vector<std::int64_t>& y) {
    const tpo::logits_view<const float> view{z.data(), P, L, V};
    const tpo::labels_view<const std::int64_t> labels{y.data(), P, L};
    const tpo::side_batch<float, std::int64_t> side{
        .policy = view, .policy_noisy = view, .reference = view, .reference_noisy = view, .labels = labels};
    return tpo::evaluate(backend, tpo::objective_options{}, tpo::preference_batch<float, std::int64_t>{side, side})
        .loss;
}

bool check(const char* what, double loss) {
    const bool ok = loss == std::log(2.0);
    std::printf("tpo %s: loss %.17g, ln 2 = %.17g: %s\n", what, loss, std::log(2.0), ok ? "ok" : "FAILED");
    return ok;
}

}  // namespace

int main() {
    std::vector<float> z(P * L * V);
    for (std::size_t i = 0; i < z.size(); ++i) z[i] = std::sin(0.7f * static_cast<float>(i));
    const std::vector<std::int64_t> y{-100, 1, 3, -100, 0, 2};

    bool ok = true;
    tpo::backend::reference reference;
    ok &= check("reference backend", loss_at_initialisation(reference, z, y));
#if defined(TPO_TEST_CPU)
    tpo::backend::cpu cpu;
    ok &= check("cpu backend", loss_at_initialisation(cpu, z, y));
#endif
#if defined(TPO_TEST_WITH_XTENSOR)
    xt::xtensor<float, 3> zx = xt::zeros<float>({P, L, V});
    std::copy(z.begin(), z.end(), zx.begin());
    const auto view = tpo::interop::logits(zx);
    ok &= view.sequences == P && view.length == L && view.vocab == V && view.data == zx.data();
    std::printf("tpo xtensor adaptor: (%lld, %lld, %lld) view on the container's memory: %s\n",
                static_cast<long long>(view.sequences), static_cast<long long>(view.length),
                static_cast<long long>(view.vocab), ok ? "ok" : "FAILED");
#endif
#if defined(TPO_TEST_TBB)
    std::printf("oneTBB %d.%d available for the Thrust TBB system\n", TBB_VERSION_MAJOR, TBB_VERSION_MINOR);
#endif
    return ok ? 0 : 1;
}
