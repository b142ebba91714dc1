#pragma once
// Central finite differences of the batch loss in double, compared with the analytic gradient
// with gradcheck's convention |analytic − numeric| <= atol + rtol·|numeric|.

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>

#include "support/batch.hpp"
#include "support/naive.hpp"

namespace tpo_test {

struct gradient_check {
    double worst_excess = -1;  // max over entries of |a − n| − (atol + rtol·|n|); <= 0 passes
    std::string where;
    double analytic = 0, numeric = 0;
    std::size_t entries = 0;
};

inline std::string describe(const gradient_check& c) {
    return c.where + ": analytic " + std::to_string(c.analytic) + ", numeric " + std::to_string(c.numeric) +
           " (excess " + std::to_string(c.worst_excess) + ", " + std::to_string(c.entries) + " entries)";
}

/// Analytic gradients from `backend`, numeric ones from `loss` (the same objective, or with
/// detached weights the objective with the weights frozen at the current point).
template <class Backend>
gradient_check check_gradients(Backend& backend, const tpo::objective_options& options, batch_data<double>& data,
                               double eps = 1e-6, double rtol = 1e-6, double atol = 1e-8) {
    const bool noisy = options.weighting == tpo::token_weighting::self_calibrated;
    gradient_data<double> grads(data);
    auto views = grads.views();
    tpo::evaluate(backend, options, data.batch(), &views);

    // What the gradient treats as constants (detached token weights, WPO's pair weights) is frozen
    // at the current point in the independent implementation; otherwise the library is differenced.
    std::function<double(batch_data<double>&)> loss;
    naive::frozen_weights frozen_w, frozen_l;
    std::vector<double> frozen_pairs;
    const bool detached = options.detach_weights && noisy;
    if (detached || options.use_weighting) {
        if (detached) {
            frozen_w = naive::current_weights(data.chosen, options, true);
            frozen_l = naive::current_weights(data.rejected, options, false);
        }
        frozen_pairs = naive::evaluate(data, options).pair_weights;
        loss = [&](batch_data<double>& d) {
            return naive::evaluate(d, options, detached ? &frozen_w : nullptr, detached ? &frozen_l : nullptr,
                                   &frozen_pairs)
                .loss;
        };
    } else {
        loss = [&](batch_data<double>& d) { return tpo::evaluate(backend, options, d.batch()).loss; };
    }
    // Central differences lose about machine-epsilon·|loss|/eps to cancellation: allow for it.
    atol *= std::max(1.0, std::abs(loss(data)));

    gradient_check result;
    for (int k = 0; k < 4; ++k) {
        const bool noisy_tensor = k == 1 || k == 3;
        if (!noisy && noisy_tensor) continue;
        auto& z = (k < 2 ? data.chosen : data.rejected).tensor(noisy_tensor ? 1 : 0);
        const auto& g = grads.tensor(k);
        for (std::size_t i = 0; i < z.size(); ++i) {
            const double saved = z[i];
            z[i] = saved + eps;
            const double up = loss(data);
            z[i] = saved - eps;
            const double down = loss(data);
            z[i] = saved;
            // Detached weights freeze c of the policy's own noisy rows: their gradient is 0.
            const double numeric = (options.detach_weights && noisy_tensor) ? 0.0 : (up - down) / (2 * eps);
            const double excess = std::abs(g[i] - numeric) - (atol + rtol * std::abs(numeric));
            ++result.entries;
            if (excess > result.worst_excess) {
                result.worst_excess = excess;
                result.where = "tensor " + std::to_string(k) + " entry " + std::to_string(i);
                result.analytic = g[i];
                result.numeric = numeric;
            }
        }
    }
    return result;
}

}  // namespace tpo_test
