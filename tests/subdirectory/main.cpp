// The loss of a batch whose policy is its reference is ln 2 exactly, through a vendored tpo.
#include <tpo/tpo.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>

int main() {
    const float z[2 * 3] = {0.5f, -1.0f, 2.0f, 0.25f, 0.0f, -0.5f};
    const std::int64_t y[2] = {-100, 2};
    const tpo::logits_view<const float> view{z, 1, 2, 3};
    const tpo::side_batch<float, std::int64_t> side{
        .policy = view, .policy_noisy = view, .reference = view, .reference_noisy = view, .labels = {y, 1, 2}};
    tpo::backend::reference backend;
    const double loss = tpo::evaluate(backend, tpo::objective_options{}, tpo::preference_batch<float, std::int64_t>{side, side}).loss;
    std::printf("vendored tpo: loss %.17g (ln 2 = %.17g)\n", loss, std::log(2.0));
    return loss == std::log(2.0) ? 0 : 1;
}
