#pragma once
// The benchmark workload shared by the Google Benchmark programs and the driver that
// bench/compare_pytorch talks to: a TPO batch of S sequences (S/2 pairs) of shape (L, V), logits
// filled from an integer hash that the PyTorch side reproduces exactly, every label scored.

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <tpo/backend/cpu.hpp>
#include <tpo/loss/objective.hpp>

namespace tpo_bench {

using tpo::index_t;

struct shape {
    index_t sequences = 4, length = 512, vocab = 32000;
    index_t pairs() const { return sequences / 2; }
    /// Elements of one role's tensors (chosen and rejected together).
    index_t elements() const { return sequences * length * vocab; }
};

inline const shape llava{4, 512, 32000};   // LLaVA-1.5
inline const shape qwen2vl{4, 128, 152064};  // Qwen2-VL (padded vocabulary)

/// Logit i of tensor `seed`: uniform in [−4, 4) from a multiplicative hash, computed in double
/// and rounded once to float (then to the element type), as bench/compare_pytorch does.
inline double hashed_logit(std::uint64_t i, std::uint64_t seed) {
    const std::uint64_t h = (i * 2654435761ull + seed * 97531ull) & 0xffffffffull;
    return static_cast<double>(h) * 0x1p-32 * 8.0 - 4.0;
}

template <class T>
void fill_logits(std::vector<T>& z, std::uint64_t seed) {
    const auto n = static_cast<std::int64_t>(z.size());
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < n; ++i)
        z[static_cast<std::size_t>(i)] = tpo::narrow<T>(static_cast<float>(hashed_logit(static_cast<std::uint64_t>(i), seed)));
}

/// Label of (sequence s, position t): every position is scored (no prompt mask), so no row is
/// skipped and the comparison reads every logit, as PyTorch does.
inline std::int64_t hashed_label(index_t s, index_t t, index_t length, index_t vocab) {
    return static_cast<std::int64_t>(((s * length + t) * 7919) % vocab);
}

/// A_ref of sequence g (chosen pairs, then rejected) when the reference enters as precomputed
/// scores: about what the policy's additive score is on these logits, so the loss is not saturated.
inline double given_reference_score(index_t g, const shape& d) {
    return -static_cast<double>(d.length - 1) * 9.0 - 0.5 * static_cast<double>(g);
}

/// How the reference model enters: through its clean and noisy logits, or through precomputed
/// sequence scores (side_batch::reference_scores), which leaves the policy's two tensors.
enum class reference_input { logits, scores };

/// Owns the input roles and the two gradient outputs of one side pair (chosen, rejected).
template <class T>
struct workload {
    shape dims;
    reference_input reference;
    // Role k (policy, policy noisy, reference, reference noisy), chosen pairs then rejected pairs:
    // one allocation per role, so (S, L, V) is contiguous as in a trainer's batch. Roles 2 and 3
    // stay empty when the reference enters as scores.
    std::vector<T> roles[4];
    std::vector<double> reference_scores;
    std::vector<std::int64_t> labels;
    std::vector<T> grad_clean, grad_noisy;

    explicit workload(shape d, bool with_gradients = true, reference_input ref = reference_input::logits)
        : dims(d), reference(ref) {
        for (int k = 0; k < roles_held(); ++k) {
            roles[k].resize(static_cast<std::size_t>(d.elements()));
            fill_logits(roles[k], static_cast<std::uint64_t>(k + 1));
        }
        if (ref == reference_input::scores)
            for (index_t g = 0; g < d.sequences; ++g) reference_scores.push_back(given_reference_score(g, d));
        labels.resize(static_cast<std::size_t>(d.sequences * d.length));
        for (index_t s = 0; s < d.sequences; ++s)
            for (index_t t = 0; t < d.length; ++t)
                labels[static_cast<std::size_t>(s * d.length + t)] = hashed_label(s, t, d.length, d.vocab);
        if (with_gradients) {
            grad_clean.resize(static_cast<std::size_t>(d.elements()));
            grad_noisy.resize(static_cast<std::size_t>(d.elements()));
        }
    }

    index_t half() const { return dims.pairs() * dims.length * dims.vocab; }

    tpo::logits_view<const T> view(const std::vector<T>& z, int side) const {
        return {z.data() + side * half(), dims.pairs(), dims.length, dims.vocab};
    }
    tpo::logits_view<T> view(std::vector<T>& z, int side) {
        return {z.data() + side * half(), dims.pairs(), dims.length, dims.vocab};
    }

    int roles_held() const { return reference == reference_input::logits ? 4 : 2; }

    tpo::preference_batch<T, std::int64_t> batch() const {
        auto side = [&](int s) {
            tpo::side_batch<T, std::int64_t> b{view(roles[0], s),
                                               view(roles[1], s),
                                               {},
                                               {},
                                               {labels.data() + s * dims.pairs() * dims.length, dims.pairs(),
                                                dims.length},
                                               {}};
            if (reference == reference_input::logits) {
                b.reference = view(roles[2], s);
                b.reference_noisy = view(roles[3], s);
            } else {
                b.reference_scores = {reference_scores.data() + s * dims.pairs(), dims.pairs()};
            }
            return b;
        };
        return {side(0), side(1)};
    }

    tpo::preference_gradients<T> gradients() {
        return {{view(grad_clean, 0), view(grad_noisy, 0)}, {view(grad_clean, 1), view(grad_noisy, 1)}};
    }

    /// Bytes of the inputs and of the gradients this workload holds.
    double input_bytes() const { return roles_held() * static_cast<double>(dims.elements()) * sizeof(T); }
    double gradient_bytes() const { return 2.0 * static_cast<double>(dims.elements()) * sizeof(T); }
};

/// The official TPO options (`docs/formulas.md#numerics`): sigmoid loss, β = 0.1, a = 0.5, logit score, additive.
inline tpo::objective_options tpo_options() {
    tpo::objective_options o;
    o.hyper.beta = 0.1;
    return o;
}

}  // namespace tpo_bench
