#pragma once
// An independent, deliberately plain implementation of docs/formulas.md for tests: it materialises
// log_softmax, writes every loss straight from the formulas' table and shares no code with the
// library beyond the option enums. The library's forward must agree with it to round-off.

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <vector>

#include "support/batch.hpp"

namespace tpo_test::naive {

inline double sig(double x) { return 1.0 / (1.0 + std::exp(-x)); }
inline double logsig(double x) { return -std::log1p(std::exp(-std::abs(x))) + std::min(x, 0.0); }

inline std::vector<double> log_softmax(const double* row, index_t v) {
    const double m = *std::max_element(row, row + v);
    double sum = 0;
    for (index_t i = 0; i < v; ++i) sum += std::exp(row[i] - m);
    std::vector<double> out(static_cast<std::size_t>(v));
    for (index_t i = 0; i < v; ++i) out[i] = row[i] - m - std::log(sum);
    return out;
}

struct sequence {
    double policy = 0, reference = 0, tokens = 0, wpo = 0, sft = 0;
};

/// Frozen self-calibrated weights of the policy: c[s][t] by scored row (nullptr: computed).
using frozen_weights = std::vector<std::vector<double>>;

inline double score_of(tpo::score_kind kind, const double* z, const double* zn, index_t v, std::int64_t y) {
    const auto l = log_softmax(z, v), ln = log_softmax(zn, v);
    switch (kind) {
    case tpo::score_kind::logit: return z[y] - zn[y];
    case tpo::score_kind::prob: return std::exp(l[y]) - std::exp(ln[y]);
    case tpo::score_kind::logprob: return l[y] - ln[y];
    }
    return 0;
}

inline std::vector<sequence> sequences(const side_data<double>& d, const tpo::objective_options& o, bool chosen,
                                       const std::vector<index_t>& shared, const frozen_weights* frozen) {
    std::vector<sequence> out(static_cast<std::size_t>(d.pairs));
    const index_t L = d.length, V = d.vocab;
    for (index_t s = 0; s < d.pairs; ++s) {
        index_t rank = 0;
        for (index_t t = 0; t + (o.alignment.shift ? 1 : 0) < L; ++t) {
            const index_t lp = o.alignment.shift ? t + 1 : t;
            const std::int64_t y = d.labels[s * L + lp];
            if (y == o.alignment.ignore_index) continue;
            const double lambda = (o.ld_alpha && rank >= shared[s]) ? *o.ld_alpha : 1.0;
            ++rank;
            auto token = [&](const std::vector<double>& z, const std::vector<double>& zn, bool policy) {
                const double* row = z.data() + (s * L + t) * V;
                const double logp = log_softmax(row, V)[y];
                double c = 1;
                if (o.weighting == tpo::token_weighting::caller) c = d.weights[s * L + lp];
                if (o.weighting == tpo::token_weighting::self_calibrated) {
                    const double sc = score_of(o.score, row, zn.data() + (s * L + t) * V, V, y);
                    c = (chosen ? sig(sc) : 1 - sig(sc)) + o.a;
                    if (policy && frozen) c = (*frozen)[s][t];
                }
                return o.form == tpo::sequence_form::additive ? logp + std::log(c) : c * logp;
            };
            sequence& q = out[s];
            q.policy += lambda * token(d.policy, d.policy_noisy, true);
            q.reference += lambda * token(d.reference, d.reference_noisy, false);
            q.tokens += 1;
            const auto l = log_softmax(d.policy.data() + (s * L + t) * V, V);
            q.sft += l[y];
            double sq = 0;
            for (double x : l) sq += std::exp(2 * x);
            q.wpo += l[y] - std::log(sq);
        }
        sequence& q = out[s];
        if (q.tokens > 0) {
            q.wpo /= q.tokens;
            if (o.average) {
                q.policy /= q.tokens;
                q.reference /= q.tokens;
            }
        }
    }
    return out;
}

// f-divergence scores with their constants (they survive ipo's and sigmoid_norm's division by
// each side's own length); exponents capped at 80.
inline double f(const tpo::loss_hyperparameters& h, double d) {
    switch (h.divergence) {
    case tpo::f_divergence::reverse_kl: return d;
    case tpo::f_divergence::forward_kl: return 1 - std::exp(std::min(-d, 80.0));
    case tpo::f_divergence::js_divergence: return std::log(2.0) + logsig(d);
    case tpo::f_divergence::alpha_divergence: {
        const double a = h.f_alpha_divergence_coef;
        return std::abs(a - 1) < 1e-6 ? d : (std::exp(std::min((a - 1) * d, 80.0)) - 1) / (a - 1);
    }
    }
    return d;
}

/// WPO's pair weight w_w·w_l, not capped.
inline double wpo_weight(const sequence& w, const sequence& l) { return std::exp(w.wpo + l.wpo); }

/// Per-pair losses of one loss type (sft: its batch scalar on every pair).
inline std::vector<double> losses_of(tpo::loss_type type, const tpo::objective_options& o,
                                     const std::vector<sequence>& w, const std::vector<sequence>& l,
                                     const std::vector<double>* frozen_pair_weights) {
    const auto& h = o.hyper;
    const double b = h.beta, e = h.label_smoothing;
    const std::size_t P = w.size();
    std::vector<double> out(P);
    auto smoothed = [&](double x) { return -(1 - e) * logsig(x) - e * logsig(-x); };
    if (type == tpo::loss_type::aot || type == tpo::loss_type::aot_unpaired) {
        std::vector<double> left(P), right(P);
        for (std::size_t i = 0; i < P; ++i) {
            if (type == tpo::loss_type::aot) {
                left[i] = w[i].policy - l[i].policy;
                right[i] = w[i].reference - l[i].reference;
            } else {
                left[i] = w[i].policy - w[i].reference;
                right[i] = l[i].policy - l[i].reference;
            }
        }
        std::sort(left.begin(), left.end());
        std::sort(right.begin(), right.end());
        for (std::size_t j = 0; j < P; ++j) out[j] = smoothed(b * (left[j] - right[j]));
        return out;
    }
    auto weighted = [&](std::vector<double> v) {
        if (o.use_weighting)
            for (std::size_t i = 0; i < P; ++i)
                v[i] *= frozen_pair_weights ? (*frozen_pair_weights)[i] : wpo_weight(w[i], l[i]);
        return v;
    };
    if (type == tpo::loss_type::sft) {
        double n = 0, s = 0;
        for (const auto& q : w) {
            n += q.tokens;
            s += q.sft;
        }
        std::fill(out.begin(), out.end(), n > 0 ? -s / n : 0.0);
        return weighted(out);
    }
    for (std::size_t i = 0; i < P; ++i) {
        const double dw = w[i].policy - w[i].reference, dl = l[i].policy - l[i].reference;
        const double fw = f(h, dw), fl = f(h, dl), x = b * (fw - fl);
        const double nw = std::max(w[i].tokens, 1.0), nl = std::max(l[i].tokens, 1.0);
        double v = 0;
        switch (type) {
        case tpo::loss_type::sigmoid: v = smoothed(x); break;
        case tpo::loss_type::hinge: v = std::max(0.0, 1 - x); break;
        case tpo::loss_type::ipo: v = std::pow(fw / nw - fl / nl - 1 / (2 * b), 2); break;
        case tpo::loss_type::sigmoid_norm: v = -logsig(b * (fw / nw - fl / nl)); break;
        case tpo::loss_type::exo_pair:
            v = sig(x) * (logsig(x) - std::log(1 - e)) + sig(-x) * (logsig(-x) - std::log(e));
            break;
        case tpo::loss_type::nca_pair: v = -logsig(b * dw) - 0.5 * logsig(-b * dw) - 0.5 * logsig(-b * dl); break;
        case tpo::loss_type::robust: v = (-(1 - e) * logsig(x) + e * logsig(-x)) / (1 - 2 * e); break;
        case tpo::loss_type::bco_pair: v = -logsig(b * dw) - logsig(-b * dl); break;
        case tpo::loss_type::sppo_hard: v = std::pow(dw - 1 / (2 * b), 2) + std::pow(dl + 1 / (2 * b), 2); break;
        case tpo::loss_type::apo_zero: v = 1 - sig(b * dw) + sig(b * dl); break;
        case tpo::loss_type::apo_down: v = sig(b * dw) + 1 - sig(b * (dw - dl)); break;
        case tpo::loss_type::discopop: {
            const double m = sig(x / h.discopop_tau);
            v = -logsig(x) * (1 - m) + std::exp(std::min(-x, 80.0)) * m;
            break;
        }
        default: break;
        }
        out[i] = v;
    }
    return weighted(out);
}

struct result {
    double loss = 0;
    std::vector<double> losses, chosen_rewards, rejected_rewards;
    std::vector<double> pair_weights;  // WPO's w_w·w_l
};

inline result evaluate(const batch_data<double>& d, const tpo::objective_options& o,
                       const frozen_weights* frozen_chosen = nullptr, const frozen_weights* frozen_rejected = nullptr,
                       const std::vector<double>* frozen_pair_weights = nullptr) {
    // LD-DPO needs each pair's min(n_w, n_l) before scoring.
    auto count = [&](const side_data<double>& s) {
        std::vector<index_t> n(static_cast<std::size_t>(s.pairs));
        for (index_t i = 0; i < s.pairs; ++i)
            for (index_t t = o.alignment.shift ? 1 : 0; t < s.length; ++t)
                n[i] += s.labels[i * s.length + t] != o.alignment.ignore_index;
        return n;
    };
    const auto nw = count(d.chosen), nl = count(d.rejected);
    std::vector<index_t> shared(nw.size());
    for (std::size_t i = 0; i < nw.size(); ++i) shared[i] = std::min(nw[i], nl[i]);
    const auto w = sequences(d.chosen, o, true, shared, frozen_chosen);
    const auto l = sequences(d.rejected, o, false, shared, frozen_rejected);
    result r;
    r.losses.assign(w.size(), 0.0);
    for (const auto& term : o.losses) {
        const auto v = losses_of(term.type, o, w, l, frozen_pair_weights);
        for (std::size_t i = 0; i < v.size(); ++i) r.losses[i] += term.weight * v[i];
    }
    r.loss = std::accumulate(r.losses.begin(), r.losses.end(), 0.0) / static_cast<double>(w.size());
    for (std::size_t i = 0; i < w.size(); ++i) {
        r.chosen_rewards.push_back(o.hyper.beta * (w[i].policy - w[i].reference));
        r.rejected_rewards.push_back(o.hyper.beta * (l[i].policy - l[i].reference));
        r.pair_weights.push_back(wpo_weight(w[i], l[i]));
    }
    return r;
}

/// The policy's current self-calibrated weights, by scored row (what detaching freezes).
inline frozen_weights current_weights(const side_data<double>& d, const tpo::objective_options& o, bool chosen) {
    frozen_weights c(static_cast<std::size_t>(d.pairs));
    const index_t L = d.length, V = d.vocab;
    for (index_t s = 0; s < d.pairs; ++s)
        for (index_t t = 0; t + (o.alignment.shift ? 1 : 0) < L; ++t) {
            const index_t lp = o.alignment.shift ? t + 1 : t;
            const std::int64_t y = d.labels[s * L + lp];
            double value = 1;
            if (y != o.alignment.ignore_index) {
                const double sc = score_of(o.score, d.policy.data() + (s * L + t) * V,
                                           d.policy_noisy.data() + (s * L + t) * V, V, y);
                value = (chosen ? sig(sc) : 1 - sig(sc)) + o.a;
            }
            c[s].push_back(value);
        }
    return c;
}

}  // namespace tpo_test::naive
