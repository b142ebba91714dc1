#pragma once
// The learning-rate frontier (`toy_lvlm --sweep`): every method of `frontier_variants` trained from
// the same SFT checkpoint at every rate of one grid, with the same steps, pair order and seeds,
// and compared where the comparison is fair — at equal KL from the reference.

#include <algorithm>
#include <cctype>
#include <cmath>
#include <string>
#include <optional>
#include <utility>
#include <vector>

#include "metrics.hpp"
#include "train.hpp"

namespace toy {

/// The short name of a frontier method on the command line (`--methods dpo,tpo,...`).
inline std::string method_key(const variant& v) {
    std::string k;
    for (char ch : v.name) k += ch == ' ' || ch == '+' ? '-' : static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    return k;
}

/// The grid: half-decades from 1e-6 to 1e-3 (1000×). Adam's step is ≈ lr per parameter, so the
/// small end keeps the policy next to the reference (the regime the paper trains in) and the large
/// end reproduces the far-from-reference runs the toy used to make.
inline std::vector<double> default_lr_grid() { return {1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3}; }

struct frontier_result {
    std::vector<double> lrs;
    std::vector<variant> variants;
    std::vector<hallucination_metrics> sft;                   // per seed
    std::vector<pair_stats> pairs;                            // per seed
    std::vector<std::vector<std::vector<run_point>>> points;  // [variant][lr][seed]
};

/// The headline operating point, a rule fixed before any TPO result was seen and applied to DPO's
/// results alone: the largest learning rate of the grid at which DPO's mean recall over seeds lies
/// within one sample standard deviation (over seeds) of SFT's mean recall, |mean_DPO − mean_SFT| ≤
/// std_SFT. Recall is what preference optimisation may trade away for a lower CHAIR by saying less,
/// so the rule caps how far the policy may move by what it costs, not by what it gains. When no
/// rate qualifies, the smallest. Returns the index into the grid.
inline std::size_t headline_index(const std::vector<std::vector<double>>& dpo_recall /* [lr][seed] */,
                                  const std::vector<double>& sft_recall) {
    const mean_std sft = summarise(sft_recall);
    std::size_t best = 0;  // the grid is ascending
    for (std::size_t i = 0; i < dpo_recall.size(); ++i)
        if (std::abs(summarise(dpo_recall[i]).mean - sft.mean) <= sft.std) best = i;
    return best;
}

/// The value of a metric at KL `k` along one seed's line of (KL, metric) points: linear in log KL
/// between the two points that bracket k (points sorted by KL). Empty outside the line's KL range
/// or where a KL is not positive.
inline std::optional<double> at_kl(std::vector<std::pair<double, double>> line, double k) {
    if (line.empty() || !(k > 0)) return std::nullopt;
    std::sort(line.begin(), line.end());
    if (!(line.front().first > 0) || k < line.front().first || k > line.back().first) return std::nullopt;
    for (std::size_t i = 0; i + 1 < line.size(); ++i) {
        const auto [k0, m0] = line[i];
        const auto [k1, m1] = line[i + 1];
        if (k > k1) continue;
        if (k1 == k0) return m0;
        const double t = (std::log(k) - std::log(k0)) / (std::log(k1) - std::log(k0));
        return m0 + t * (m1 - m0);
    }
    return line.back().second;  // k equals the last point's KL
}

/// metric(variant v at grid point i, seed s) − DPO's metric of seed s interpolated at the same KL
/// (held-out captions), for every seed where that KL lies inside DPO's range.
template <class Metric>
std::vector<double> equal_kl_differences(const frontier_result& f, std::size_t v, std::size_t i, Metric metric) {
    std::vector<double> out;
    const std::size_t seeds = f.sft.size();
    for (std::size_t s = 0; s < seeds; ++s) {
        std::vector<std::pair<double, double>> dpo_line;
        for (std::size_t j = 0; j < f.lrs.size(); ++j) dpo_line.emplace_back(f.points[0][j][s].kl.held_out, metric(f.points[0][j][s].m));
        const run_point& p = f.points[v][i][s];
        if (const auto d = at_kl(dpo_line, p.kl.held_out)) out.push_back(metric(p.m) - *d);
    }
    return out;
}

}  // namespace toy
