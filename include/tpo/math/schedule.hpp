#pragma once
// Beta schedules of forward diffusion (docs/formulas.md#diffusion-noise), computed in double on the
// host once per call; only the two resulting scalars travel to the element-wise noise pass.

#include <cmath>
#include <numbers>
#include <optional>
#include <string_view>
#include <vector>

#include "tpo/core/config.hpp"
#include "tpo/core/error.hpp"

TPO_BEGIN_NAMESPACE

enum class beta_schedule { sigmoid, linear, scaled_linear, cosine };

inline beta_schedule parse_beta_schedule(std::string_view name) {
    if (name == "sigmoid") return beta_schedule::sigmoid;
    if (name == "linear") return beta_schedule::linear;
    if (name == "scaled_linear") return beta_schedule::scaled_linear;
    if (name == "cosine") return beta_schedule::cosine;
    throw value_error(detail::concat("schedule: unknown name '", name,
                                     "', expected sigmoid, linear, scaled_linear or cosine"));
}

struct schedule_options {
    beta_schedule kind = beta_schedule::sigmoid;
    int steps = 1000;                    // K
    std::optional<double> beta_start;    // β_min / β_start; the schedule's default when empty
    std::optional<double> beta_end;      // β_max / β_end
    bool zero_terminal_snr = false;      // Lin et al. 2023 rescale
};

namespace detail {
inline std::pair<double, double> default_beta_range(beta_schedule kind) {
    switch (kind) {
    case beta_schedule::sigmoid: return {1e-5, 5e-3};
    case beta_schedule::linear: return {1e-4, 0.02};
    case beta_schedule::scaled_linear: return {0.00085, 0.012};
    case beta_schedule::cosine: return {0.0, 0.999};  // unused: the cosine schedule has no range
    }
    return {0, 0};
}
}  // namespace detail

/// β_i for i = 0 … K−1.
inline std::vector<double> betas(const schedule_options& o) {
    detail::require(o.steps >= 1, "schedule: steps = ", o.steps, ", expected at least 1");
    const auto [default_start, default_end] = detail::default_beta_range(o.kind);
    const double start = o.beta_start.value_or(default_start);
    const double end = o.beta_end.value_or(default_end);
    if (o.kind != beta_schedule::cosine)
        detail::require(start >= 0 && end >= 0 && start < 1 && end < 1 && std::isfinite(start) && std::isfinite(end),
                        "schedule: beta_start = ", start, ", beta_end = ", end, ", expected both in [0, 1)");
    const int k_total = o.steps;
    std::vector<double> beta(static_cast<std::size_t>(k_total));
    // i/(K−1) is the schedule's position; a one-step schedule sits at its start.
    auto position = [&](int i) { return k_total > 1 ? static_cast<double>(i) / (k_total - 1) : 0.0; };
    for (int i = 0; i < k_total; ++i) {
        switch (o.kind) {
        case beta_schedule::sigmoid: {
            const double x = -6.0 + 12.0 * position(i);
            beta[i] = 1.0 / (1.0 + std::exp(-x)) * (end - start) + start;
            break;
        }
        case beta_schedule::linear: beta[i] = start + (end - start) * position(i); break;
        case beta_schedule::scaled_linear: {
            const double r = std::sqrt(start) + (std::sqrt(end) - std::sqrt(start)) * position(i);
            beta[i] = r * r;
            break;
        }
        case beta_schedule::cosine: {
            auto f = [](double t) {
                const double c = std::cos((t + 0.008) / 1.008 * std::numbers::pi / 2);
                return c * c;
            };
            beta[i] = std::min(1.0 - f((i + 1.0) / k_total) / f(static_cast<double>(i) / k_total), 0.999);
            break;
        }
        }
    }
    return beta;
}

/// ᾱ_k = Π_{i≤k} (1 − β_i) for every k, with the zero-terminal-SNR rescale when asked.
inline std::vector<double> alpha_bars(const schedule_options& o) {
    const std::vector<double> beta = betas(o);
    std::vector<double> alpha_bar(beta.size());
    double product = 1.0;
    for (std::size_t i = 0; i < beta.size(); ++i) alpha_bar[i] = product *= (1.0 - beta[i]);
    if (o.zero_terminal_snr && alpha_bar.size() > 1) {
        // s' = (s − s_T)·s_0/(s_0 − s_T) with s = sqrt(ᾱ): the last step becomes pure noise.
        const double s0 = std::sqrt(alpha_bar.front()), st = std::sqrt(alpha_bar.back());
        for (double& a : alpha_bar) {
            const double s = (std::sqrt(a) - st) * s0 / (s0 - st);
            a = s * s;
        }
    }
    return alpha_bar;
}

inline double alpha_bar(const schedule_options& o, int step) {
    detail::require(step >= 0 && step < o.steps, "schedule: step k = ", step, ", expected 0 <= k < ", o.steps);
    return alpha_bars(o)[static_cast<std::size_t>(step)];
}

TPO_END_NAMESPACE
