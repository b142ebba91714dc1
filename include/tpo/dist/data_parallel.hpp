#pragma once
// The objective over data-parallel ranks: each rank holds its own pairs (its micro-batch), and the
// loss is the one of the whole batch, every rank's pairs in rank order, as a single process would
// compute it on their concatenation.
//
// Only the batch stage of the objective couples pairs (loss/passes.hpp: `aot` and `aot_unpaired`
// sort the batch, `sft` divides by the batch's tokens, the loss and the metrics are batch means).
// Each rank runs the row passes and the sequence pass on its own pairs, then
//
//   all-reduce sum   of the 2N sequence summaries (6 doubles each; rank r fills the slots of its
//                    pairs, zeros elsewhere), N = Σ_r P_r
//
// gives every rank the summaries of the whole batch: the all-gather of the summaries as one
// all-reduce of the communicator concept (x + 0 is exact). Every rank runs the batch stage on them
// (the single process's code, on the same values), keeps its pairs' share with ∂L/∂A times R
// (loss::rank_share_pass), and writes the gradient of its own logits or hidden states from it. A
// data-parallel trainer (DDP) averages the ranks' gradients: R·∂L/∂(rank r's inputs) averages to
// ∂L/∂θ of the whole batch. Every rank reports the whole batch's loss and metrics.
//
// Errors never deadlock: a rank's own checks (shapes, labels, NaN, its input problems) run before
// the exchange, and dist::agree() makes every rank throw the error of the lowest failing rank,
// its message prefixed with that rank. The agreement also compares the options and gathers each
// rank's P, which fixes N and the ranks' slots. After the exchange every rank computes on the same
// values; a last agreement closes each forward and backward all the same.

#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "tpo/backend/concept.hpp"
#include "tpo/core/error.hpp"
#include "tpo/core/views.hpp"
#include "tpo/dist/communicator.hpp"
#include "tpo/dist/sharded.hpp"
#include "tpo/loss/objective.hpp"
#include "tpo/loss/passes.hpp"

TPO_BEGIN_NAMESPACE
namespace dist {

namespace data_parallel_detail {

/// What the batch stage reads of a sequence summary, in this order, per sequence.
constexpr index_t summary_width = 6;

/// Sequence g of the whole batch (chosen [0, N), rejected [N, 2N)): this rank's summary where the
/// pair is this rank's, zeros elsewhere.
struct pack_summaries_op {
    const loss::sequence_summary* local;  // 2P: chosen, then rejected
    index_t first, pairs, total;
    double* out;
    TPO_HOST_DEVICE void operator()(index_t g) const {
        double* slot = out + g * summary_width;
        const bool chosen = g < total;
        const index_t pair = chosen ? g : g - total;
        if (pair < first || pair >= first + pairs) {
            for (index_t k = 0; k < summary_width; ++k) slot[k] = 0.0;
            return;
        }
        const loss::sequence_summary& s = local[(chosen ? 0 : pairs) + pair - first];
        slot[0] = s.tokens;
        slot[1] = s.policy_score;
        slot[2] = s.reference_score;
        slot[3] = s.visual_score_sum;
        slot[4] = s.wpo_log_weight;
        slot[5] = s.sft_logp_sum;
    }
};

struct unpack_summaries_op {
    const double* in;
    loss::sequence_summary* out;
    TPO_HOST_DEVICE void operator()(index_t g) const {
        const double* slot = in + g * summary_width;
        loss::sequence_summary s{};
        s.tokens = slot[0];
        s.policy_score = slot[1];
        s.reference_score = slot[2];
        s.visual_score_sum = slot[3];
        s.wpo_log_weight = slot[4];
        s.sft_logp_sum = slot[5];
        out[g] = s;
    }
};

/// The same error with "data-parallel rank r: " before its message: a rank's own checks name its
/// local sequence indices. The error's type travels as the agreement carries it between ranks.
inline std::exception_ptr on_rank(std::exception_ptr failure, int rank) {
    if (!failure) return failure;
    std::string encoded = agreement_detail::encode(failure);
    encoded.insert(1, detail::concat("data-parallel rank ", rank, ": "));
    try {
        agreement_detail::raise(encoded);
    } catch (...) {
        return std::current_exception();
    }
}

}  // namespace data_parallel_detail

/// The objective of tpo::objective over the pairs of every rank of `comm` (data parallelism: each
/// rank its own micro-batch). Every rank constructs one with the same options and calls forward()
/// and backward() together with its own batch (logits or hidden states with the whole head; ranks
/// may hold different P, L or V). The batch is every rank's pairs in rank order, N = Σ_r P_r:
///
/// - forward() returns, on every rank, that batch's loss, reward accuracy and margin, and for this
///   rank's pairs (its rows [first_pair(), first_pair() + P) of the batch) the per-pair values, as
///   a single process computes them on the concatenated batch; ∂L/∂A of its sequences times R.
/// - backward() writes R·∂L/∂(this rank's inputs): averaged over the ranks as a data-parallel
///   trainer averages gradients, that is the single process's gradient of the whole batch.
///
/// With equal P on every rank, the per-pair terms give what each rank's own objective gives; only
/// `sft`, `aot` and `aot_unpaired` and the reported loss and metrics differ. Per forward: one
/// all-reduce sum of 12·N doubles, and two host agreements (docs/distributed.md).
template <class B, class C>
class data_parallel_objective {
    static_assert(tensor_backend<B> && communicator<C>);

public:
    data_parallel_objective(B& backend, C& comm, objective_options options)
        : backend_(backend), comm_(comm), inner_(backend, options), options_(std::move(options)) {}

    C& comm() { return comm_; }
    /// This rank's first pair in the whole batch, and the whole batch's pairs N (last forward).
    index_t first_pair() const { return first_; }
    index_t total_pairs() const { return total_; }
    /// Doubles this rank gave to the last forward's exchange (2N·6).
    index_t exchanged_values() const { return exchanged_values_; }

    template <class T, class I, class R>
    objective_result forward(const preference_batch<T, I, R>& batch) {
        return run_forward(batch.chosen.policy.sequences, [&] { inner_.prepare_rows(batch); });
    }

    template <class T, class I, class R>
    objective_result forward(const hidden_preference_batch<T, I, R>& batch)
        requires head_backend<B>
    {
        return run_forward(batch.chosen.policy.sequences, [&] { inner_.prepare_rows(batch); });
    }

    /// R·∂L/∂(this rank's policy logits), into views shaped like its batch.
    template <class T, class I, class R, class G>
    void backward(const preference_batch<T, I, R>& batch, const preference_gradients<G>& grads) {
        agree_here([&] { inner_.backward(batch, grads); });
    }

    /// R·∂L/∂(this rank's policy hidden states), and R·∂L/∂W, R·∂L/∂b of the head through this
    /// rank's pairs (their average over the ranks is the whole batch's ∂L/∂W, ∂L/∂b).
    template <class T, class I, class R, class G>
    void backward(const hidden_preference_batch<T, I, R>& batch, const hidden_gradients<G>& grads)
        requires head_backend<B>
    {
        agree_here([&] { inner_.backward(batch, grads); });
    }

private:
    /// Runs `f` and agrees on its failure, named with this rank.
    template <class F>
    void agree_here(F&& f) {
        std::exception_ptr failure;
        try {
            f();
        } catch (...) {
            failure = data_parallel_detail::on_rank(std::current_exception(), comm_.rank());
        }
        agree(comm_, failure);
    }

    template <class Prepare>
    objective_result run_forward(index_t pairs, Prepare&& prepare) {
        using data_parallel_detail::summary_width;
        std::exception_ptr failure;
        try {
            prepare();
            inner_.launch_sequence_pass(pairs);
            if (options_.check_inputs)
                detail::report_input_problems(options_, backend_.to_host(inner_.summaries_), pairs, inner_.vocab_,
                                              inner_.hidden_input_);
        } catch (...) {
            inner_.forward_done_ = false;
            failure = data_parallel_detail::on_rank(std::current_exception(), comm_.rank());
        }
        const agreement a = agree(comm_, failure, {sharded_detail::options_fingerprint(options_)},
                                  {static_cast<double>(pairs)});
        detail::require<shape_error>(a.shared_agree(0), "data-parallel ranks disagree on the objective options: ",
                                     "every rank must be given the same options, its own pairs");
        const int rank = comm_.rank(), ranks = comm_.size();
        first_ = total_ = 0;
        for (int k = 0; k < ranks; ++k) {
            const auto p = static_cast<index_t>(a.gathered[static_cast<std::size_t>(k)][0]);
            if (k < rank) first_ += p;
            total_ += p;
        }

        const index_t sequences = 2 * total_;
        exchanged_values_ = sequences * summary_width;
        auto exchange = backend_.template allocate<double>(exchanged_values_);
        backend_.for_each(sequences, data_parallel_detail::pack_summaries_op{backend_.raw(inner_.summaries_), first_,
                                                                             pairs, total_, backend_.raw(exchange)});
        comm_.all_reduce_sum(backend_.raw(exchange), exchanged_values_);
        auto summaries = backend_.template allocate<loss::sequence_summary>(sequences);
        backend_.for_each(sequences, data_parallel_detail::unpack_summaries_op{backend_.raw(exchange),
                                                                               backend_.raw(summaries)});
        auto batch_pairs = backend_.template allocate<loss::pair_result>(total_);
        auto batch = backend_.template allocate<loss::batch_result>(1);
        inner_.launch_batch_passes(total_, backend_.raw(summaries), backend_.raw(batch_pairs), backend_.raw(batch));
        const double scale = static_cast<double>(ranks);
        backend_.for_each(pairs, loss::rank_share_pass{scale, first_, backend_.raw(batch_pairs), backend_.raw(batch),
                                                       backend_.raw(inner_.pair_results_),
                                                       backend_.raw(inner_.batch_result_)});
        // The whole batch checked as a single process checks it (alike on every rank, its message
        // naming the pair in the whole batch), then this rank's share read back as its results.
        objective_result result;
        std::exception_ptr failure_after;
        try {
            loss::check_finite_forward(backend_.to_host(summaries), backend_.to_host(batch_pairs),
                                       backend_.to_host(batch).front(), options_);
        } catch (...) {
            failure_after = std::current_exception();
        }
        if (!failure_after) {
            try {
                result = detail::collect_result(backend_.to_host(inner_.summaries_), backend_.to_host(inner_.pair_results_),
                                                backend_.to_host(inner_.batch_result_).front(), pairs, options_);
            } catch (...) {
                failure_after = data_parallel_detail::on_rank(std::current_exception(), rank);
            }
        }
        agree(comm_, failure_after);
        inner_.deferred_ = false;
        inner_.forward_done_ = true;
        return result;
    }

    B& backend_;
    C& comm_;
    objective<B> inner_;
    objective_options options_;
    index_t first_ = 0, total_ = 0, exchanged_values_ = 0;
};

/// One call on this rank's pairs: forward, and backward into `grads` (R·∂L/∂ of this rank's
/// logits) when given.
template <tensor_backend B, communicator C, class T, class I, class R, class G = float>
objective_result data_parallel_evaluate(B& backend, C& comm, const objective_options& options,
                                        const preference_batch<T, I, R>& batch,
                                        const preference_gradients<G>* grads = nullptr) {
    data_parallel_objective<B, C> obj(backend, comm, options);
    objective_result r = obj.forward(batch);
    if (grads) obj.backward(batch, *grads);
    return r;
}

/// The same with hidden states in (the whole head on every rank).
template <tensor_backend B, communicator C, class T, class I, class R, class G = float>
    requires head_backend<B>
objective_result data_parallel_evaluate(B& backend, C& comm, const objective_options& options,
                                        const hidden_preference_batch<T, I, R>& batch,
                                        const hidden_gradients<G>* grads = nullptr) {
    data_parallel_objective<B, C> obj(backend, comm, options);
    objective_result r = obj.forward(batch);
    if (grads) obj.backward(batch, *grads);
    return r;
}

}  // namespace dist
TPO_END_NAMESPACE
