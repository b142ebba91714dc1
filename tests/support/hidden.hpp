#pragma once
// Owning random batches with hidden states in (tensors in std::vector, views on demand), and
// gradient buffers shaped like them.

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include <tpo/tpo.hpp>

namespace tpo_test::hidden {

using tpo::index_t;

/// A model's side of a hidden-state batch: (P, L, H) states for each of the four passes.
template <class T>
struct hidden_side {
    index_t pairs = 0, length = 0, hidden = 0;
    std::vector<T> policy, policy_noisy, reference, reference_noisy;
    std::vector<std::int64_t> labels;
    std::vector<float> weights;

    std::vector<T>& tensor(int k) { return k == 0 ? policy : k == 1 ? policy_noisy : k == 2 ? reference : reference_noisy; }
    tpo::hidden_view<const T> view(const std::vector<T>& h) const { return {h.data(), pairs, length, hidden}; }
    tpo::hidden_side_batch<T, std::int64_t> batch() const {
        return {view(policy), view(policy_noisy), view(reference), view(reference_noisy), {labels.data(), pairs, length},
                {weights.data(), pairs, length}};
    }
};

template <class T>
struct hidden_data {
    index_t vocab = 0, hidden = 0;
    std::vector<T> weight, bias, reference_weight, reference_bias;
    bool with_bias = true;
    hidden_side<T> chosen, rejected;

    tpo::head_view<const T> head() const { return {weight.data(), with_bias ? bias.data() : nullptr, vocab, hidden}; }
    tpo::head_view<const T> reference_head() const {
        return {reference_weight.data(), with_bias ? reference_bias.data() : nullptr, vocab, hidden};
    }
    tpo::hidden_preference_batch<T, std::int64_t> batch() const {
        return {head(), reference_head(), chosen.batch(), rejected.batch()};
    }
};

hidden_data<double> random_hidden(std::mt19937_64& rng, index_t pairs, index_t length_chosen, index_t length_rejected,
                                  index_t hidden, index_t vocab, bool with_bias = true, double mask_rate = 0.3) {
    std::normal_distribution<double> normal(0.0, 1.0);
    std::uniform_real_distribution<double> u(0, 1);
    std::uniform_int_distribution<std::int64_t> label(0, vocab - 1);
    hidden_data<double> d;
    d.vocab = vocab;
    d.hidden = hidden;
    d.with_bias = with_bias;
    const double head_scale = 1.5 / std::sqrt(static_cast<double>(hidden));
    for (auto* w : {&d.weight, &d.reference_weight}) {
        w->resize(static_cast<std::size_t>(vocab * hidden));
        for (auto& x : *w) x = head_scale * normal(rng);
    }
    for (auto* b : {&d.bias, &d.reference_bias}) {
        b->resize(static_cast<std::size_t>(vocab));
        for (auto& x : *b) x = 0.5 * normal(rng);
    }
    auto side = [&](hidden_side<double>& s, index_t length) {
        s.pairs = pairs;
        s.length = length;
        s.hidden = hidden;
        for (int k = 0; k < 4; ++k) {
            s.tensor(k).resize(static_cast<std::size_t>(pairs * length * hidden));
            for (auto& x : s.tensor(k)) x = normal(rng);
        }
        for (index_t i = 0; i < pairs * length; ++i) {
            s.labels.push_back(u(rng) < mask_rate ? -100 : label(rng));
            s.weights.push_back(static_cast<float>(0.2 + u(rng)));
        }
    };
    side(d.chosen, length_chosen);
    side(d.rejected, length_rejected);
    return d;
}

template <class T, class S>
hidden_data<T> convert(const hidden_data<S>& d) {
    auto cast = [](const std::vector<S>& v) {
        std::vector<T> out;
        for (const S& x : v) out.push_back(tpo::narrow<T>(tpo::widen<double>(x)));
        return out;
    };
    hidden_data<T> out;
    out.vocab = d.vocab;
    out.hidden = d.hidden;
    out.with_bias = d.with_bias;
    out.weight = cast(d.weight);
    out.bias = cast(d.bias);
    out.reference_weight = cast(d.reference_weight);
    out.reference_bias = cast(d.reference_bias);
    for (auto [src, dst] : {std::pair{&d.chosen, &out.chosen}, std::pair{&d.rejected, &out.rejected}}) {
        dst->pairs = src->pairs;
        dst->length = src->length;
        dst->hidden = src->hidden;
        for (int k = 0; k < 4; ++k) dst->tensor(k) = cast(const_cast<hidden_side<S>*>(src)->tensor(k));
        dst->labels = src->labels;
        dst->weights = src->weights;
    }
    return out;
}

template <class G>
struct hidden_gradient_data {
    std::vector<G> hidden[4];
    std::vector<G> weight, bias;
    // The head's gradients start as NaN: the objective overwrites them, it neither adds to them
    // nor reads them (its first share of ∂L/∂W is written, not added). The hidden states'
    // gradients start at zero: a DPO step leaves the noisy ones alone.
    template <class T>
    explicit hidden_gradient_data(const hidden_data<T>& d) {
        const G nan = tpo::narrow<G>(std::numeric_limits<double>::quiet_NaN());
        for (int k = 0; k < 4; ++k) hidden[k].assign((k < 2 ? d.chosen : d.rejected).policy.size(), G{});
        weight.assign(d.weight.size(), nan);
        bias.assign(d.bias.size(), nan);
    }
    template <class T>
    tpo::hidden_gradients<G> views(const hidden_data<T>& d, bool with_bias) {
        auto v = [&](int k) {
            const auto& s = k < 2 ? d.chosen : d.rejected;
            return tpo::hidden_view<G>{hidden[k].data(), s.pairs, s.length, s.hidden};
        };
        return {{v(0), v(1)}, {v(2), v(3)}, weight.data(), with_bias ? bias.data() : nullptr};
    }
};

template <class G>
std::vector<double> as_double(const std::vector<G>& v) {
    std::vector<double> out;
    for (const G& x : v) out.push_back(tpo::widen<double>(x));
    return out;
}

}  // namespace tpo_test::hidden
