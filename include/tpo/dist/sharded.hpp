#pragma once
// The objective on a vocabulary split across ranks (tensor parallelism of the lm_head, as in
// Megatron-LM): each rank holds the columns [o_r, o_r + V_r) of every logits row, or the rows
// [o_r, o_r + V_r) of the lm_head with the full hidden states, and no rank ever holds a whole row.
//
// The objective needs of a scored row only its label logit, its log-sum-exp and, for WPO, the
// log-sum-exp of 2z (docs/math.md). Each rank reduces its slice of every row with the backend's
// own row pass (a local log-sum-exp, and the label logit where the label is its own), then
//
//   all-reduce max   of the local log-sum-exps (and of 2z)            — a row's global maximum M
//   all-reduce sum   of [label logit or 0, exp(lse_r − M), exp(lse2_r − M2)]
//
// over every scored row of every tensor at once: two collectives per forward, 1–5 doubles per
// row, never O(V). The merge is the online log-sum-exp's (math/online_logsumexp.hpp), so every
// rank then holds the statistics a single process would have computed, and the O(S·L) passes
// (loss/passes.hpp) run identically on every rank. A row that holds a NaN or ±∞ on any rank sends
// NaN in place of its label logit, so every rank marks it non-finite. The noisy pass under the
// `logit` score sends the label logit alone. The backward writes each rank's slice of the
// gradient locally (the global log-sum-exp is in the row coefficients); with hidden states in,
// ∂L/∂H is summed over the ranks (one all-reduce per hidden-state tensor) and ∂L/∂W, ∂L/∂b stay
// with the shard.
//
// Errors never deadlock: everything a rank can get wrong on its own (shapes, its shard, labels
// outside [0, V), NaN in its head) is found before the first collective, and dist::agree() makes
// every rank throw the error of the lowest failing rank. The agreement also compares what must be
// equal on every rank (batch shape, V, the options that decide the collectives, a fingerprint of
// the labels) and gathers the shards, which must tile [0, V). After the row exchange every rank
// computes on the same values, so the remaining checks fail alike; a last agreement closes each
// forward and backward all the same.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "tpo/backend/concept.hpp"
#include "tpo/core/error.hpp"
#include "tpo/core/views.hpp"
#include "tpo/dist/communicator.hpp"
#include "tpo/loss/objective.hpp"
#include "tpo/math/online_logsumexp.hpp"
#include "tpo/rows/rules.hpp"

TPO_BEGIN_NAMESPACE
namespace dist {

/// This rank's slice of the vocabulary: ids [offset, offset + size) of a vocabulary of `vocab`.
struct vocab_shard {
    index_t offset = 0;
    index_t size = 0;
    index_t vocab = 0;

    /// The contiguous slices of `vocab` ids over `ranks` ranks, as even as possible (the first
    /// vocab mod ranks ranks hold one id more).
    static vocab_shard even(index_t vocab, int ranks, int rank) {
        detail::require<shape_error>(ranks >= 1 && rank >= 0 && rank < ranks, "vocab_shard: rank ", rank, " of ",
                                     ranks, ", expected 0 <= rank < ranks");
        const index_t base = vocab / ranks, extra = vocab % ranks;
        return {rank * base + std::min<index_t>(rank, extra), base + (rank < extra ? 1 : 0), vocab};
    }
};

namespace sharded_detail {

/// A global label as this rank's row passes see it: its own ids shifted to [0, V_r), another
/// rank's id as 0 (the row is still reduced, its label logit not used), anything not scored as −1
/// (the local ignore index; −1 is never a local id).
template <class I>
struct localise_labels_op {
    const I* labels;
    std::int64_t ignore_index;
    index_t offset, size, vocab;
    std::int64_t* out;
    TPO_HOST_DEVICE void operator()(index_t i) const {
        const auto y = static_cast<std::int64_t>(labels[i]);
        if (rows::classify_label(y, vocab, ignore_index) != row_status::ok) out[i] = -1;
        else out[i] = (y >= offset && y < offset + size) ? y - offset : 0;
    }
};

/// Per sequence: the first scored label outside [0, V) (position, label), or position −1.
template <class I>
struct label_range_op {
    rows::scored_rows<I> plan;
    std::int64_t* out;  // 2 per sequence
    TPO_HOST_DEVICE void operator()(index_t s) const {
        out[2 * s] = -1;
        out[2 * s + 1] = 0;
        for (index_t t = 0; t < plan.per_sequence; ++t) {
            const rows::scored_row row = plan(s * plan.per_sequence + t);
            if (row.status != row_status::label_out_of_range) continue;
            out[2 * s] = plan.align.label_position(t);
            out[2 * s + 1] = row.label;
            return;
        }
    }
};

/// Per sequence: a 52-bit fingerprint of its labels, exact as a double.
template <class I>
struct label_fingerprint_op {
    labels_view<const I> labels;
    double* out;
    TPO_HOST_DEVICE void operator()(index_t s) const {
        std::uint64_t h = 1469598103934665603ull;
        for (index_t t = 0; t < labels.length; ++t) {
            h ^= static_cast<std::uint64_t>(static_cast<std::int64_t>(labels.at(s, t)));
            h *= 1099511628211ull;
            h ^= h >> 29;
        }
        out[s] = static_cast<double>(h & ((std::uint64_t{1} << 52) - 1));
    }
};

/// What a row reduction sends: doubles per row to the max and to the sum.
TPO_HOST_DEVICE inline index_t max_width(row_reduction r) {
    return r == row_reduction::logsumexp_and_doubled ? 2 : needs_logsumexp(r) ? 1 : 0;
}
TPO_HOST_DEVICE inline index_t sum_width(row_reduction r) { return 1 + max_width(r); }

struct pack_max_op {
    const row_stats* local;
    index_t width;
    double* out;
    TPO_HOST_DEVICE void operator()(index_t r) const {
        const row_stats& s = local[r];
        const bool ok = s.status == row_status::ok;
        constexpr double none = -std::numeric_limits<double>::infinity();
        out[r * width] = ok ? s.lse : none;
        if (width == 2) out[r * width + 1] = ok ? s.lse_doubled : none;
    }
};

template <class I>
struct pack_sum_op {
    rows::scored_rows<I> plan;  // the caller's labels against the whole vocabulary
    index_t offset, size;
    const row_stats* local;
    const double* max;  // the reduced maxima (null when the reduction sends none)
    index_t max_width, sum_width;
    double* out;
    TPO_HOST_DEVICE void operator()(index_t r) const {
        using std::exp;
        double* slot = out + r * sum_width;
        for (index_t k = 0; k < sum_width; ++k) slot[k] = 0.0;
        const rows::scored_row row = plan(r);
        if (!row.valid()) return;
        const row_stats& s = local[r];
        if (s.status != row_status::ok) {
            slot[0] = std::numeric_limits<double>::quiet_NaN();  // a NaN or ±∞ in this rank's slice
            return;
        }
        slot[0] = (row.label >= offset && row.label < offset + size) ? s.label_logit : 0.0;
        if (max_width >= 1) slot[1] = exp(s.lse - max[r * max_width]);
        if (max_width == 2) slot[2] = exp(s.lse_doubled - max[r * max_width + 1]);
    }
};

/// The global statistics of row r from the reduced values, by the row rules of a single process.
template <class I>
struct finish_op {
    rows::scored_rows<I> plan;
    const double* max;
    const double* sum;
    index_t max_width, sum_width;
    row_stats* out;
    TPO_HOST_DEVICE void operator()(index_t r) const {
        const rows::scored_row row = plan(r);
        if (!row.valid()) {
            out[r] = rows::unread_row(row);
            return;
        }
        const double* slot = sum + r * sum_width;
        const double label_logit = slot[0];
        if (max_width == 0) {
            out[r] = rows::row_without_logsumexp(label_logit, 0.0, row.label);
            return;
        }
        math::online_logsumexp<double> lse, lse_doubled;
        lse.max = max[r * max_width];
        lse.sum = slot[1];
        if (max_width == 2) {
            lse_doubled.max = max[r * max_width + 1];
            lse_doubled.sum = slot[2];
        }
        // A non-finite slice anywhere sent NaN as the label logit: the probe says so.
        out[r] = rows::finish_row(lse, lse_doubled, label_logit, label_logit - label_logit, row.label);
    }
};

/// A row's coefficients for this rank's slice: the label as a local id where it is this rank's;
/// elsewhere no α term (a softmax row keeps −β·softmax, a label-only row is zero).
struct localise_coefficients_op {
    index_t offset, size;
    row_coefficients* c;
    TPO_HOST_DEVICE void operator()(index_t r) const {
        row_coefficients& k = c[r];
        if (k.label < 0) return;
        if (k.label >= offset && k.label < offset + size) {
            k.label -= offset;
        } else if (k.beta == 0) {
            k.label = -1;
        } else {
            k.label = 0;
            k.alpha = 0;
        }
    }
};

/// An FNV-1a hash of values, cut to 52 bits so that it is exact as a double.
class fingerprint {
public:
    template <class T>
    fingerprint& add(const T& value) {
        unsigned char bytes[sizeof(T)];
        std::memcpy(bytes, &value, sizeof(T));
        for (unsigned char b : bytes) {
            h_ ^= b;
            h_ *= 1099511628211ull;
        }
        return *this;
    }
    double value() const { return static_cast<double>(h_ & ((std::uint64_t{1} << 52) - 1)); }

private:
    std::uint64_t h_ = 1469598103934665603ull;
};

/// The options every rank must share: they decide the collectives and the results.
inline double options_fingerprint(const objective_options& o) {
    fingerprint f;
    f.add(o.weighting).add(o.hyper.beta).add(o.hyper.label_smoothing).add(o.hyper.divergence).add(o.score).add(o.form);
    f.add(o.a).add(o.average).add(o.detach_weights).add(o.alignment.shift).add(o.alignment.ignore_index);
    f.add(o.use_weighting).add(o.ld_alpha.has_value()).add(o.ld_alpha.value_or(0.0)).add(o.check_inputs);
    f.add(o.check_unused_logits).add(o.logit_scale).add(o.logit_softcap.value_or(0.0)).add(o.temperature);
    for (const loss_term& t : o.losses) f.add(t.type).add(t.weight);
    return f.value();
}

}  // namespace sharded_detail

/// The objective of tpo::objective on this rank's vocabulary slice. Every rank of `comm` constructs
/// one with the same options and its own shard, and calls forward() and backward() together with
/// batches of one shape: logits views `(P, L, V_r)` of its slice, or the full hidden states with its
/// rows `(V_r, H)` (+ bias) of the head; labels are global ids, the same on every rank. Results are
/// those of a single process on the whole vocabulary, on every rank.
template <class B, class C>
class sharded_objective {
    static_assert(tensor_backend<B> && communicator<C>);

public:
    sharded_objective(B& backend, C& comm, objective_options options, vocab_shard shard)
        : backend_(backend), comm_(comm), inner_(backend, options), options_(std::move(options)), shard_(shard) {
        inner_.row_align_ = {options_.alignment.shift, -1};
    }

    const vocab_shard& shard() const { return shard_; }
    C& comm() { return comm_; }

    template <class T, class I, class R>
    objective_result forward(const preference_batch<T, I, R>& batch) {
        std::vector<double> shared = shared_values(batch.chosen, batch.rejected, 0, 0);
        std::exception_ptr failure;
        try {
            detail::check_batch(options_, batch);
            check_slice(batch.chosen.policy.vocab, "policy logits");
            check_labels(batch.chosen.labels, batch.rejected.labels);
            inner_.prepare_rows(local_batch(batch));
            shared = shared_values(batch.chosen, batch.rejected, 0, 1);
        } catch (...) {
            failure = std::current_exception();
        }
        check_agreement(agree(comm_, failure, shared, {static_cast<double>(shard_.offset), static_cast<double>(shard_.size)}));
        return finish_forward(batch.chosen.labels, batch.rejected.labels, batch.chosen.policy.sequences);
    }

    template <class T, class I, class R>
    objective_result forward(const hidden_preference_batch<T, I, R>& batch)
        requires head_backend<B>
    {
        std::vector<double> shared = shared_values(batch.chosen, batch.rejected, 0, 0);
        std::exception_ptr failure;
        try {
            detail::check_hidden_batch(options_, batch);
            check_slice(batch.head.vocab, "lm_head weight rows");
            check_labels(batch.chosen.labels, batch.rejected.labels);
            inner_.prepare_rows(local_batch(batch), shard_.offset);
            shared = shared_values(batch.chosen, batch.rejected, batch.head.hidden, 2);
        } catch (...) {
            failure = std::current_exception();
        }
        check_agreement(agree(comm_, failure, shared, {static_cast<double>(shard_.offset), static_cast<double>(shard_.size)}));
        return finish_forward(batch.chosen.labels, batch.rejected.labels, batch.chosen.policy.sequences);
    }

    /// This rank's slice of ∂L/∂(policy logits): views `(P, L, V_r)`.
    template <class T, class I, class R, class G>
    void backward(const preference_batch<T, I, R>& batch, const preference_gradients<G>& grads) {
        agree_on(comm_, [&] {
            const preference_batch<T, I, R> local = local_batch(batch, false);
            auto [chosen, rejected] = inner_.template backward_coefficients<T>(local, grads);
            localise(chosen);
            localise(rejected);
            inner_.write_gradients(local, grads, chosen, rejected);
        });
    }

    /// With hidden states in: ∂L/∂(policy hidden states) summed over the ranks (every rank gets the
    /// whole of it), and this rank's rows of ∂L/∂W `(V_r, H)` and ∂L/∂b `(V_r)`.
    template <class T, class I, class R, class G>
    void backward(const hidden_preference_batch<T, I, R>& batch, const hidden_gradients<G>& grads)
        requires head_backend<B>
    {
        using A = rows::fused_accumulate_t<T>;
        const bool noisy = options_.weighting == token_weighting::self_calibrated;
        // The ranks' shares of ∂L/∂H are summed in A; in the caller's buffers when G is A.
        hidden_gradients<A> partial{};
        std::vector<typename B::template buffer<A>> scratch;
        agree_on(comm_, [&] {
            const hidden_preference_batch<T, I, R> local = local_batch(batch, false);
            auto [chosen, rejected] = inner_.template backward_coefficients<T>(local, grads);
            localise(chosen);
            localise(rejected);
            if constexpr (std::is_same_v<G, A>) {
                partial = grads;
            } else {
                auto in_scratch = [&](auto view) {
                    if (view.empty()) return hidden_view<A>{};
                    scratch.push_back(backend_.template allocate<A>(view.size()));
                    return hidden_view<A>{backend_.raw(scratch.back()), view.sequences, view.length, view.hidden};
                };
                scratch.reserve(6);
                partial.chosen = {in_scratch(grads.chosen.policy), in_scratch(grads.chosen.policy_noisy)};
                partial.rejected = {in_scratch(grads.rejected.policy), in_scratch(grads.rejected.policy_noisy)};
                const index_t rows = batch.head.vocab, H = batch.head.hidden;
                if (grads.head_weight) {
                    scratch.push_back(backend_.template allocate<A>(rows * H));
                    partial.head_weight = backend_.raw(scratch.back());
                }
                if (grads.head_bias) {
                    scratch.push_back(backend_.template allocate<A>(rows));
                    partial.head_bias = backend_.raw(scratch.back());
                }
            }
            inner_.write_gradients(local, partial, chosen, rejected);
        });
        auto hidden_views = [&](const auto& g) {
            return std::vector<decltype(g.chosen.policy)>{g.chosen.policy, g.rejected.policy,
                                                          noisy ? g.chosen.policy_noisy : decltype(g.chosen.policy){},
                                                          noisy ? g.rejected.policy_noisy : decltype(g.chosen.policy){}};
        };
        for (const hidden_view<A>& h : hidden_views(partial))
            if (!h.empty()) comm_.all_reduce_sum(h.data, h.size());
        agree_on(comm_, [&] {
            if constexpr (!std::is_same_v<G, A>) {
                const auto from = hidden_views(partial);
                const auto to = hidden_views(grads);
                for (std::size_t k = 0; k < from.size(); ++k)
                    if (!to[k].empty())
                        backend_.for_each(to[k].size(), rows::fused_detail::narrow_op<A, G>{from[k].data, to[k].data});
                const index_t rows = batch.head.vocab, H = batch.head.hidden;
                if (grads.head_weight)
                    backend_.for_each(rows * H, rows::fused_detail::narrow_op<A, G>{partial.head_weight, grads.head_weight});
                if (grads.head_bias)
                    backend_.for_each(rows, rows::fused_detail::narrow_op<A, G>{partial.head_bias, grads.head_bias});
                loss::require_finite_output(backend_, grads.head_weight, grads.head_weight ? rows * H : 0,
                                            "gradient of the lm_head weight", options_);
                loss::require_finite_output(backend_, grads.head_bias, grads.head_bias ? rows : 0,
                                            "gradient of the lm_head bias", options_);
            }
            const char* names[4] = {"gradient of the chosen policy hidden states",
                                    "gradient of the rejected policy hidden states",
                                    "gradient of the chosen policy noisy hidden states",
                                    "gradient of the rejected policy noisy hidden states"};
            const auto to = hidden_views(grads);
            for (std::size_t k = 0; k < to.size(); ++k)
                loss::require_finite_output(backend_, to[k].data, to[k].empty() ? 0 : to[k].size(), names[k], options_);
        });
    }

private:
    using label_buffer = typename B::template buffer<std::int64_t>;

    /// What every rank must share, as doubles: the batch shape, V, H, the input kind, whether the
    /// reference comes as scores, the options, and the labels' fingerprints. `kind` 0 marks a rank
    /// that failed before it knew them (its error is reported instead).
    template <class Side>
    std::vector<double> shared_values(const Side& chosen, const Side& rejected, index_t hidden, int kind) {
        std::vector<double> v(10, 0.0);
        if (kind == 0) return v;
        v[0] = static_cast<double>(kind);
        v[1] = static_cast<double>(chosen.labels.sequences);
        v[2] = static_cast<double>(chosen.labels.length);
        v[3] = static_cast<double>(rejected.labels.length);
        v[4] = static_cast<double>(shard_.vocab);
        v[5] = static_cast<double>(hidden);
        v[6] = (chosen.reference_scores.empty() ? 0.0 : 1.0) + (rejected.reference_scores.empty() ? 0.0 : 2.0);
        v[7] = sharded_detail::options_fingerprint(options_);
        v[8] = label_fingerprint(chosen.labels);
        v[9] = label_fingerprint(rejected.labels);
        return v;
    }

    template <class I>
    double label_fingerprint(labels_view<const I> labels) {
        auto per_sequence = backend_.template allocate<double>(labels.sequences);
        backend_.for_each(labels.sequences, sharded_detail::label_fingerprint_op<I>{labels, backend_.raw(per_sequence)});
        sharded_detail::fingerprint f;
        for (double h : backend_.to_host(per_sequence)) f.add(h);
        return f.value();
    }

    void check_agreement(const agreement& a) {
        static const char* const names[10] = {"input kind (logits or hidden states)",
                                              "number of pairs P",
                                              "chosen length L",
                                              "rejected length L",
                                              "vocabulary size V",
                                              "hidden size H",
                                              "reference given as scores",
                                              "objective options",
                                              "chosen labels",
                                              "rejected labels"};
        for (std::size_t i = 0; i < a.low.size(); ++i)
            detail::require<shape_error>(a.shared_agree(i), "vocab-parallel ranks disagree on the ", names[i],
                                         i >= 7 ? "" : detail::concat(" (from ", a.low[i], " to ", a.high[i], ")"),
                                         ": every rank must be given the same batch and options, its own vocabulary slice");
        // The slices must tile [0, V) exactly, in any order of the ranks.
        std::vector<std::pair<index_t, index_t>> slices;
        for (const std::vector<double>& g : a.gathered)
            slices.emplace_back(static_cast<index_t>(g[0]), static_cast<index_t>(g[1]));
        std::vector<int> order(slices.size());
        for (std::size_t k = 0; k < order.size(); ++k) order[k] = static_cast<int>(k);
        std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return slices[x].first < slices[y].first; });
        index_t end = 0, total = 0;
        for (int k : order) {
            total += slices[k].second;
            detail::require<shape_error>(slices[k].first == end, "vocab-parallel shards: rank ", k, " holds [",
                                         slices[k].first, ", ", slices[k].first + slices[k].second, ")",
                                         ", expected its slice to start at ", end,
                                         ": the ranks' slices must tile [0, V) without gaps or overlaps");
            end = slices[k].first + slices[k].second;
        }
        detail::require<shape_error>(total == shard_.vocab, "vocab-parallel shards: the ranks' slices hold ", total,
                                     " vocabulary ids in all, expected V = ", shard_.vocab);
    }

    /// This rank's shard against the size of its slice of a tensor.
    void check_slice(index_t slice, const char* what) const {
        detail::require<shape_error>(shard_.vocab >= 1, "vocab_shard: V = ", shard_.vocab, ", expected V >= 1");
        detail::require<shape_error>(shard_.size >= 1 && shard_.offset >= 0 && shard_.offset + shard_.size <= shard_.vocab,
                                     "vocab_shard: slice [", shard_.offset, ", ", shard_.offset + shard_.size,
                                     ") of V = ", shard_.vocab, ", expected a non-empty slice of [0, V)");
        detail::require<shape_error>(slice == shard_.size, what, ": ", slice, " vocabulary entries on rank ",
                                     comm_.rank(), ", expected this rank's slice of ", shard_.size, " ids [",
                                     shard_.offset, ", ", shard_.offset + shard_.size, ")");
    }

    /// Labels outside [0, V) on scored rows, named as a single process names them.
    template <class I>
    void check_labels(labels_view<const I> chosen, labels_view<const I> rejected) {
        if (!options_.check_inputs) return;
        for (auto [labels, side] : {std::pair{chosen, "chosen"}, std::pair{rejected, "rejected"}}) {
            const auto plan = rows::scored_rows<I>::of(labels, options_.alignment, shard_.vocab);
            auto found = backend_.template allocate<std::int64_t>(2 * labels.sequences);
            backend_.for_each(labels.sequences, sharded_detail::label_range_op<I>{plan, backend_.raw(found)});
            const std::vector<std::int64_t> host = backend_.to_host(found);
            for (index_t s = 0; s < labels.sequences; ++s)
                if (host[2 * s] >= 0)
                    throw value_error(detail::concat(side, " labels: label ", host[2 * s + 1], " at sequence ", s,
                                                     ", position ", host[2 * s], " is outside [0, ", shard_.vocab,
                                                     ") and is not the ignore index ",
                                                     options_.alignment.ignore_index));
        }
    }

    template <class I>
    void localise_labels(labels_view<const I> labels, label_buffer& out) {
        out = backend_.template allocate<std::int64_t>(labels.sequences * labels.length);
        backend_.for_each(labels.sequences * labels.length,
                          sharded_detail::localise_labels_op<I>{labels.data, options_.alignment.ignore_index,
                                                                shard_.offset, shard_.size, shard_.vocab,
                                                                backend_.raw(out)});
    }

    /// The batch with this rank's local labels (made anew by a forward, reused by its backward).
    template <class Batch>
    auto local_batch(const Batch& batch, bool fresh = true) {
        using I = std::remove_const_t<std::remove_pointer_t<decltype(batch.chosen.labels.data)>>;
        if (fresh) {
            localise_labels<I>(batch.chosen.labels, chosen_labels_);
            localise_labels<I>(batch.rejected.labels, rejected_labels_);
        }
        auto local = relabel(batch);
        local.chosen.labels = {backend_.raw(chosen_labels_), batch.chosen.labels.sequences, batch.chosen.labels.length};
        local.rejected.labels = {backend_.raw(rejected_labels_), batch.rejected.labels.sequences,
                                 batch.rejected.labels.length};
        return local;
    }

    /// A batch of the same tensors with std::int64_t labels (the local labels' type).
    template <class T, class I, class R>
    static preference_batch<T, std::int64_t, R> relabel(const preference_batch<T, I, R>& b) {
        auto side = [](const side_batch<T, I, R>& s) {
            return side_batch<T, std::int64_t, R>{s.policy, s.policy_noisy, s.reference, s.reference_noisy, {},
                                                  s.weights, s.reference_scores};
        };
        return {side(b.chosen), side(b.rejected)};
    }
    template <class T, class I, class R>
    static hidden_preference_batch<T, std::int64_t, R> relabel(const hidden_preference_batch<T, I, R>& b) {
        auto side = [](const hidden_side_batch<T, I, R>& s) {
            return hidden_side_batch<T, std::int64_t, R>{s.policy, s.policy_noisy, s.reference, s.reference_noisy, {},
                                                         s.weights, s.reference_scores};
        };
        return {b.head, b.reference_head, side(b.chosen), side(b.rejected)};
    }

    template <class Coefficients>
    void localise(Coefficients& c) {
        for (auto* buffer : {&c.clean, &c.noisy}) {
            const auto n = static_cast<index_t>(buffer->size());
            if (n > 0)
                backend_.for_each(n, sharded_detail::localise_coefficients_op{shard_.offset, shard_.size,
                                                                             backend_.raw(*buffer)});
        }
    }

    struct table {
        row_stats* stats;
        index_t count;
        row_reduction reduction;
        int side;  // 0 chosen, 1 rejected
    };

    /// The row exchange over every tensor's statistics (two collectives), then the O(S·L) passes
    /// and the results, agreed.
    template <class I>
    objective_result finish_forward(labels_view<const I> chosen, labels_view<const I> rejected, index_t pairs) {
        std::vector<table> tables;
        const bool noisy = options_.weighting == token_weighting::self_calibrated;
        const row_reduction policy =
            options_.use_weighting ? row_reduction::logsumexp_and_doubled : row_reduction::logsumexp;
        int side = 0;
        for (auto* s : {&inner_.chosen_, &inner_.rejected_}) {
            const index_t count = pairs * s->scored;
            const bool reference_rows = s->reference_scores == nullptr;
            tables.push_back({backend_.raw(s->policy), count, policy, side});
            if (noisy) tables.push_back({backend_.raw(s->policy_noisy), count, inner_.noisy_reduction(), side});
            if (reference_rows) tables.push_back({backend_.raw(s->reference), count, row_reduction::logsumexp, side});
            if (reference_rows && noisy)
                tables.push_back({backend_.raw(s->reference_noisy), count, inner_.noisy_reduction(), side});
            ++side;
        }
        index_t max_total = 0, sum_total = 0;
        for (const table& t : tables) {
            max_total += t.count * sharded_detail::max_width(t.reduction);
            sum_total += t.count * sharded_detail::sum_width(t.reduction);
        }
        auto max_buffer = backend_.template allocate<double>(max_total);
        auto sum_buffer = backend_.template allocate<double>(sum_total);
        double* max_data = backend_.raw(max_buffer);
        double* sum_data = backend_.raw(sum_buffer);
        const auto plan = [&](int s) {
            return rows::scored_rows<I>::of(s == 0 ? chosen : rejected, options_.alignment, shard_.vocab);
        };
        index_t at = 0;
        for (const table& t : tables) {
            const index_t w = sharded_detail::max_width(t.reduction);
            if (w > 0 && t.count > 0) backend_.for_each(t.count, sharded_detail::pack_max_op{t.stats, w, max_data + at});
            at += t.count * w;
        }
        if (max_total > 0) comm_.all_reduce_max(max_data, max_total);
        index_t at_max = 0, at_sum = 0;
        for (const table& t : tables) {
            const index_t wm = sharded_detail::max_width(t.reduction), ws = sharded_detail::sum_width(t.reduction);
            if (t.count > 0)
                backend_.for_each(t.count, sharded_detail::pack_sum_op<I>{plan(t.side), shard_.offset, shard_.size,
                                                                          t.stats, max_data + at_max, wm, ws,
                                                                          sum_data + at_sum});
            at_max += t.count * wm;
            at_sum += t.count * ws;
        }
        if (sum_total > 0) comm_.all_reduce_sum(sum_data, sum_total);
        at_max = at_sum = 0;
        for (const table& t : tables) {
            const index_t wm = sharded_detail::max_width(t.reduction), ws = sharded_detail::sum_width(t.reduction);
            if (t.count > 0)
                backend_.for_each(t.count, sharded_detail::finish_op<I>{plan(t.side), max_data + at_max,
                                                                        sum_data + at_sum, wm, ws, t.stats});
            at_max += t.count * wm;
            at_sum += t.count * ws;
        }
        exchanged_values_ = max_total + sum_total;
        inner_.vocab_ = shard_.vocab;
        objective_result result;
        agree_on(comm_, [&] {
            inner_.launch_passes(pairs);
            inner_.deferred_ = false;
            result = inner_.read_forward();
        });
        return result;
    }

public:
    /// Doubles this rank sent to the last forward's row exchange (max and sum together).
    index_t exchanged_values() const { return exchanged_values_; }

private:
    B& backend_;
    C& comm_;
    objective<B> inner_;
    objective_options options_;
    vocab_shard shard_;
    label_buffer chosen_labels_, rejected_labels_;
    index_t exchanged_values_ = 0;
};

/// One call on this rank's slice: forward, and backward into `grads` (this rank's slices) when given.
template <tensor_backend B, communicator C, class T, class I, class R, class G = float>
objective_result evaluate(B& backend, C& comm, const objective_options& options, vocab_shard shard,
                          const preference_batch<T, I, R>& batch, const preference_gradients<G>* grads = nullptr) {
    sharded_objective<B, C> obj(backend, comm, options, shard);
    objective_result r = obj.forward(batch);
    if (grads) obj.backward(batch, *grads);
    return r;
}

/// The same with hidden states in (this rank's rows of the head; ∂L/∂H summed over the ranks).
template <tensor_backend B, communicator C, class T, class I, class R, class G = float>
    requires head_backend<B>
objective_result evaluate(B& backend, C& comm, const objective_options& options, vocab_shard shard,
                          const hidden_preference_batch<T, I, R>& batch, const hidden_gradients<G>* grads = nullptr) {
    sharded_objective<B, C> obj(backend, comm, options, shard);
    objective_result r = obj.forward(batch);
    if (grads) obj.backward(batch, *grads);
    return r;
}

}  // namespace dist
TPO_END_NAMESPACE
