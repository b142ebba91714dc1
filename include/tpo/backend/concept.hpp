#pragma once
// The tensor backend concept: the few data-parallel primitives the math needs, nothing more.
//
//   allocate<T>(n)       scratch of n zero-initialised T in the backend's memory (O(S·L) at most)
//   allocate_for_overwrite<T>(n) optional: the same, not necessarily zeroed, for scratch that is
//                        written in full before it is read (the fused head's chunks)
//   raw(buffer)          the buffer's raw pointer, as functors see it
//   to_host(buffer)      a host copy (small results only)
//   for_each(n, f)       f(i) for i in [0, n), any order, f a host/device functor
//   for_each_group(n, f) optional: f(lanes) for n groups of threads that reduce together
//                        (backend/lanes.hpp); without it the O(S·L) passes run one lane per pair
//   row_statistics(...)  runs rows::scored_rows over a logits tensor: for every row the plan sends to
//                        the backend (rows::statistics_of), one pass doing what its row_reduction
//                        asks: a finiteness scan, the online log-sum-exp of z, and of 2z
//   row_gradient(...)    runs rows::gradient_rows over a gradient tensor: zero rows, label-only rows
//                        (β = 0, the logits are not read) and softmax rows α·δ(v=y) − β·exp(z[v] − lse)
//
// Which rows are scored, what a label means and which rows are read are the plans' rules
// (rows/rules.hpp); a backend supplies how to reduce one row and how to write one row, and how to
// run them over many. Everything else (scores, weights, losses, gradient coefficients) is written
// once in functors that run through for_each, so a new backend adds these primitives and never
// touches a formula or a row rule.

#include <concepts>
#include <cstdint>
#include <vector>

#include "tpo/core/views.hpp"
#include "tpo/reward/row_stats.hpp"
#include "tpo/rows/rules.hpp"

TPO_BEGIN_NAMESPACE
namespace detail {
struct concept_probe_functor {
    TPO_HOST_DEVICE void operator()(index_t) const {}
};
}  // namespace detail

template <class B>
concept tensor_backend = requires(B& b, index_t n, typename B::template buffer<double>& buf,
                                  logits_view<const float> z, labels_view<const std::int64_t> y, row_alignment align,
                                  row_stats* stats, const row_coefficients* coefficients, logits_view<float> grad) {
    { b.template allocate<double>(n) } -> std::same_as<typename B::template buffer<double>>;
    { b.raw(buf) } -> std::same_as<double*>;
    { b.to_host(buf) } -> std::same_as<std::vector<double>>;
    b.for_each(n, detail::concept_probe_functor{});
    b.row_statistics(z, y, align, row_reduction::logsumexp, stats);
    b.row_gradient(z, coefficients, n, grad);
};

/// Optional: a backend that can read two tensors of one shape (a model's clean and noisy logits)
/// in one pass provides row_statistics_pair, with results equal to two row_statistics calls;
/// the objective uses it when present.
template <class B, class T, class U, class I>
concept fused_row_statistics = requires(B& b, logits_view<const T> first, logits_view<const U> second,
                                        labels_view<const I> y, row_alignment align, row_reduction r,
                                        row_stats* stats) {
    b.row_statistics_pair(first, r, stats, second, r, stats, y, align);
};

/// Optional: a backend that also uploads small host vectors and multiplies matrices runs the
/// objective with hidden states in (rows/fused.hpp). matmul computes C (m×n) = op(A)·op(B) + beta·C
/// (beta 0 or 1; with beta 0, C is written without being read, so it may hold anything) with A
/// stored m×k (k×m when trans_a) and B stored k×n (n×k when trans_b), row strides lda, ldb, ldc;
/// inputs of any element type, C in float or double. A head backend whose products of a 16-bit T
/// head multiply a float operand rounded to T once may say so (optional:
/// `b.template rounds_gradient_to<T>()`, rows/fused.hpp), and then gets ∂L/∂u written in T.
template <class B>
concept head_backend = tensor_backend<B> && requires(B& b, const std::vector<index_t>& host, index_t n,
                                                     const float* x, float* c) {
    { b.upload(host) } -> std::same_as<typename B::template buffer<index_t>>;
    b.matmul(false, true, n, n, n, x, n, x, n, c, n, 0.0f);
};

TPO_END_NAMESPACE
