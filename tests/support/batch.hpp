#pragma once
// Owning random preference batches for tests: tensors in std::vector, views on demand.

#include <algorithm>
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include <tpo/tpo.hpp>

namespace tpo_test {

using tpo::index_t;

struct side_shape {
    index_t pairs = 2, length = 4, vocab = 5;
};

template <class T>
struct side_data {
    index_t pairs = 0, length = 0, vocab = 0;
    std::vector<T> policy, policy_noisy, reference, reference_noisy;
    std::vector<std::int64_t> labels;
    std::vector<float> weights;

    tpo::logits_view<const T> view(const std::vector<T>& z) const { return {z.data(), pairs, length, vocab}; }
    tpo::logits_view<T> view(std::vector<T>& z) { return {z.data(), pairs, length, vocab}; }
    std::vector<T>& tensor(int k) {
        switch (k) {
        case 0: return policy;
        case 1: return policy_noisy;
        case 2: return reference;
        default: return reference_noisy;
        }
    }
    tpo::side_batch<T, std::int64_t> batch() const {
        return {view(policy),
                view(policy_noisy),
                view(reference),
                view(reference_noisy),
                {labels.data(), pairs, length},
                {weights.data(), pairs, length}};
    }
};

/// `mask_rate`: share of labels set to the ignore index; sequences may end up fully masked.
template <class T>
side_data<T> random_side(std::mt19937_64& rng, side_shape shape, double scale = 2.0, double mask_rate = 0.3,
                         std::int64_t ignore_index = -100) {
    side_data<T> d;
    d.pairs = shape.pairs;
    d.length = shape.length;
    d.vocab = shape.vocab;
    std::normal_distribution<double> normal(0.0, scale);
    const auto n = static_cast<std::size_t>(shape.pairs * shape.length * shape.vocab);
    for (int k = 0; k < 4; ++k) {
        auto& z = d.tensor(k);
        z.resize(n);
        for (auto& x : z) x = static_cast<T>(normal(rng));
    }
    std::uniform_real_distribution<double> u(0, 1);
    std::uniform_int_distribution<std::int64_t> label(0, shape.vocab - 1);
    for (index_t i = 0; i < shape.pairs * shape.length; ++i)
        d.labels.push_back(u(rng) < mask_rate ? ignore_index : label(rng));
    for (index_t i = 0; i < shape.pairs * shape.length; ++i) d.weights.push_back(static_cast<float>(0.2 + u(rng)));
    return d;
}

template <class T>
struct batch_data {
    side_data<T> chosen, rejected;
    tpo::preference_batch<T, std::int64_t> batch() const { return {chosen.batch(), rejected.batch()}; }
};

template <class T>
batch_data<T> random_batch(std::mt19937_64& rng, index_t pairs, index_t length_chosen, index_t length_rejected,
                           index_t vocab, double scale = 2.0, double mask_rate = 0.3) {
    return {random_side<T>(rng, {pairs, length_chosen, vocab}, scale, mask_rate),
            random_side<T>(rng, {pairs, length_rejected, vocab}, scale, mask_rate)};
}

/// Gradient buffers shaped like a batch's policy tensors.
template <class G>
struct gradient_data {
    std::vector<G> chosen, chosen_noisy, rejected, rejected_noisy;
    index_t pairs, length_chosen, length_rejected, vocab;

    template <class T>
    explicit gradient_data(const batch_data<T>& b)
        : chosen(b.chosen.policy.size()), chosen_noisy(b.chosen.policy.size()), rejected(b.rejected.policy.size()),
          rejected_noisy(b.rejected.policy.size()), pairs(b.chosen.pairs), length_chosen(b.chosen.length),
          length_rejected(b.rejected.length), vocab(b.chosen.vocab) {}

    tpo::preference_gradients<G> views() {
        return {{{chosen.data(), pairs, length_chosen, vocab}, {chosen_noisy.data(), pairs, length_chosen, vocab}},
                {{rejected.data(), pairs, length_rejected, vocab},
                 {rejected_noisy.data(), pairs, length_rejected, vocab}}};
    }
    std::vector<G>& tensor(int k) {
        switch (k) {
        case 0: return chosen;
        case 1: return chosen_noisy;
        case 2: return rejected;
        default: return rejected_noisy;
        }
    }
};

/// A forward and backward whose gradients went into fresh buffers shaped like the batch.
template <class G>
struct evaluated {
    tpo::objective_result result;
    gradient_data<G> gradients;
};

/// Evaluates `batch` (views into `data`, possibly edited) with gradients.
template <class G = double, class B, class T, class Batch>
evaluated<G> evaluate_with_gradients(B& backend, const tpo::objective_options& options, const batch_data<T>& data,
                                     const Batch& batch) {
    evaluated<G> e{{}, gradient_data<G>(data)};
    auto views = e.gradients.views();
    e.result = tpo::evaluate(backend, options, batch, &views);
    return e;
}

template <class G = double, class B, class T>
evaluated<G> evaluate_with_gradients(B& backend, const tpo::objective_options& options, const batch_data<T>& data) {
    return evaluate_with_gradients<G>(backend, options, data, data.batch());
}

/// Every valid label set to the likeliest token of the policy row that scores it (row t scores
/// label t + 1 with the shift): on such on-policy labels WPO's pair weights exceed 1.
template <class T>
void label_the_likeliest(side_data<T>& d, bool shift = true, std::int64_t ignore_index = -100) {
    for (index_t s = 0; s < d.pairs; ++s)
        for (index_t t = shift ? 1 : 0; t < d.length; ++t) {
            std::int64_t& y = d.labels[static_cast<std::size_t>(s * d.length + t)];
            if (y == ignore_index) continue;
            const T* row = d.policy.data() + (s * d.length + (shift ? t - 1 : t)) * d.vocab;
            y = std::max_element(row, row + d.vocab) - row;
        }
}

/// The batch with its reference model given as sequence scores (views into the caller's memory:
/// host or device, as the backend needs) instead of its two logits tensors.
template <class T, class I>
tpo::preference_batch<T, I> with_reference_scores(tpo::preference_batch<T, I> batch,
                                                  tpo::sequence_values_view<const double> chosen,
                                                  tpo::sequence_values_view<const double> rejected) {
    for (auto [side, scores] : {std::pair{&batch.chosen, chosen}, std::pair{&batch.rejected, rejected}}) {
        side->reference = {};
        side->reference_noisy = {};
        side->reference_scores = scores;
    }
    return batch;
}

}  // namespace tpo_test

namespace tpo_test {

/// The same batch in another element type (values rounded once, to nearest).
template <class T>
batch_data<T> convert(const batch_data<double>& d) {
    auto side = [](const side_data<double>& s) {
        side_data<T> out;
        out.pairs = s.pairs;
        out.length = s.length;
        out.vocab = s.vocab;
        for (int k = 0; k < 4; ++k) {
            const auto& src = const_cast<side_data<double>&>(s).tensor(k);
            auto& dst = out.tensor(k);
            dst.reserve(src.size());
            for (double x : src) dst.push_back(tpo::narrow<T>(x));
        }
        out.labels = s.labels;
        out.weights = s.weights;
        return out;
    };
    return {side(d.chosen), side(d.rejected)};
}

}  // namespace tpo_test
