#pragma once
// Row statistics and gradients with hidden states in: the logits u = h·Wᵀ + b, z = transform(u)
// exist only chunk by chunk, never for the whole batch.
//
// A pass takes several tensors through one head together (fused_part: both sides' policy states,
// say), their valid rows end to end, so a chunk may hold rows of more than one of them.
//
// Forward, for tensors whose rows need their log-sum-exp: the valid scored rows (a valid label;
// masked prompt rows cost nothing) are taken C at a time; their hidden states are gathered, one
// matrix product gives the C×V chunk of u, the bias and the transform are applied in place, and
// the backend's own row reduction turns the chunk into row statistics. A tensor that needs only
// the label's logit (the noisy pass under the `logit` score) costs one dot product per row.
//
// Backward: ∂L/∂u of a row is (α·δ(v = y) − β·softmax(z)[v])·dz/du. Rows with β = 0 (the noisy
// rows under the `logit` score) are rank one: ∂L/∂h = α·z'·W[y], ∂L/∂W[y] += α·z'·h. The other
// rows are recomputed chunk by chunk, written by the backend's own gradient kernel into a C×V
// scratch, chained through the transform, and multiplied out: ∂L/∂h_c = G·W,
// ∂L/∂W += Gᵀ·h_c, ∂L/∂b += Σ_rows G. The backward takes a pass's chunks last to first: the
// forward's last chunk is still in scratch (kept_chunk), so the pass whose forward ran last
// starts its backward without computing that chunk again.
//
// Everything here is written once over the backend primitives (allocate, upload, to_host,
// for_each, matmul, row_statistics, row_gradient); the row rules are rows/rules.hpp's.

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "tpo/backend/lanes.hpp"
#include "tpo/core/element.hpp"
#include "tpo/core/error.hpp"
#include "tpo/core/views.hpp"
#include "tpo/math/scalar.hpp"
#include "tpo/reward/row_stats.hpp"
#include "tpo/rows/rules.hpp"
#include "tpo/rows/transform.hpp"

TPO_BEGIN_NAMESPACE
namespace rows {

/// The accumulation type of the fused products and of their scratch: double for double inputs,
/// float otherwise.
template <class T>
using fused_accumulate_t = std::conditional_t<std::is_same_v<std::remove_const_t<T>, double>, double, float>;

/// A model's rows as hidden states through an lm_head.
template <class T>
struct hidden_rows {
    hidden_view<const T> states;
    head_view<const T> head;
};

struct fused_settings {
    logit_transform transform{};
    index_t chunk_rows = 0;  // scored rows per chunk; 0: the backend's default

    /// Rows per chunk: as asked, or as many as keep a chunk of logits within `chunk_values`, but
    /// no fewer than `rows_min`.
    index_t rows_per_chunk(index_t vocab, index_t chunk_values, index_t rows_min) const {
        if (chunk_rows > 0) return chunk_rows;
        return std::max<index_t>(std::max<index_t>(1, rows_min), chunk_values / std::max<index_t>(1, vocab));
    }
};

/// Values per chunk of logits when the caller sets no chunk size: the backend's own
/// (fused_chunk_values()), or 2^24 (64 MiB in float).
template <class B>
index_t default_chunk_values(const B& backend) {
    if constexpr (requires { backend.fused_chunk_values(); })
        return backend.fused_chunk_values();
    else
        return index_t{1} << 24;
}

/// The fewest rows per chunk when the caller sets no chunk size: the backend's own
/// (fused_chunk_rows_min()), or 1. Each chunk's products read the whole head, so a backend whose
/// products slow down on short chunks asks for more rows at a large V.
template <class B>
index_t default_chunk_rows_min(const B& backend) {
    if constexpr (requires { backend.fused_chunk_rows_min(); })
        return backend.fused_chunk_rows_min();
    else
        return 1;
}

/// Rows per chunk of `settings` on `backend` at vocabulary V.
template <class B>
index_t chunk_rows_of(const B& backend, const fused_settings& settings, index_t vocab) {
    return settings.rows_per_chunk(vocab, default_chunk_values(backend), default_chunk_rows_min(backend));
}

namespace fused_detail {

/// Scratch of n T that its user writes in full before reading (a chunk's gathered states, logits,
/// gradients): the backend's allocate_for_overwrite(), which need not zero it, where it has one.
template <class T, class B>
auto overwritten(B& backend, index_t n) {
    if constexpr (requires { backend.template allocate_for_overwrite<T>(n); })
        return backend.template allocate_for_overwrite<T>(n);
    else
        return backend.template allocate<T>(n);
}

/// flag[r] = 1 for a valid scored row; the others get their final (unread) statistics now.
template <class I>
struct classify_op {
    scored_rows<I> plan;
    row_stats* out;
    std::int32_t* flag;
    TPO_HOST_DEVICE void operator()(index_t r) const {
        const scored_row row = plan(r);
        flag[r] = row.valid() ? 1 : 0;
        if (!row.valid()) out[r] = unread_row(row);
    }
};

/// label[list[i]'s tensor row] = 0: the rows a finiteness scan of the hidden states reads (the
/// others keep −1, an ignored label).
template <class I>
struct scan_labels_op {
    scored_rows<I> plan;
    const index_t* list;
    index_t length;
    std::int64_t* out;
    TPO_HOST_DEVICE void operator()(index_t i) const {
        const scored_row row = plan(list[i]);
        out[row.sequence * length + row.position] = 0;
    }
};

struct fill_labels_op {
    std::int64_t* out;
    std::int64_t value;
    TPO_HOST_DEVICE void operator()(index_t i) const { out[i] = value; }
};

/// The first row of `rows` (as the scan of a tensor seen as logits left them) that is not finite.
inline index_t first_non_finite(const std::vector<row_stats>& rows) {
    for (std::size_t r = 0; r < rows.size(); ++r)
        if (rows[r].status == row_status::non_finite) return static_cast<index_t>(r);
    return -1;
}

/// h·W[y] + b[y] in the accumulation type, through the transform; the lanes split the dot product
/// (one lane: the plain loop) and every lane gets the result.
template <class A, class T, class Lanes>
TPO_HOST_DEVICE A label_logit(const T* h, const head_view<const T>& head, std::int64_t label,
                              const logit_transform& transform, const Lanes& lanes) {
    const T* w = head.row(label);
    A u = A(0);
    for (index_t k = lanes.lane(); k < head.hidden; k += lanes.size()) u += widen<A>(h[k]) * widen<A>(w[k]);
    u = lanes.reduce(u, backend::plus{});
    if (head.bias) u += widen<A>(head.bias[label]);
    return transform.apply(u);
}

/// The statistics of a row that needs only its label's logit: one dot product, a group of lanes
/// per row.
template <class A, class T, class I>
struct label_row_op {
    hidden_rows<T> source;
    scored_rows<I> plan;
    logit_transform transform;
    const index_t* list;
    row_stats* out;
    template <class Lanes>
    TPO_HOST_DEVICE void operator()(const Lanes& lanes) const {
        const index_t i = lanes.group();
        const scored_row row = plan(list[i]);
        const T* h = source.states.row(row.sequence, row.position);
        const A z = label_logit<A>(h, source.head, row.label, transform, lanes);
        if (lanes.lane() == 0) out[list[i]] = row_without_logsumexp(static_cast<double>(z), 0.0, row.label);
    }
};

/// Hidden rows list[0..n) gathered into a dense n×H block.
template <class T, class I>
struct gather_op {
    hidden_view<const T> states;
    scored_rows<I> plan;
    const index_t* list;
    T* out;
    TPO_HOST_DEVICE void operator()(index_t e) const {
        const index_t i = e / states.hidden, k = e % states.hidden;
        const scored_row row = plan(list[i]);
        out[e] = states.row(row.sequence, row.position)[k];
    }
};

/// u + b, then the transform, in place over an n×V chunk.
template <class A, class T>
struct epilogue_op {
    A* chunk;
    const T* bias;
    index_t vocab;
    logit_transform transform;
    TPO_HOST_DEVICE void operator()(index_t e) const {
        A u = chunk[e];
        if (bias) u += widen<A>(bias[e % vocab]);
        chunk[e] = transform.apply(u);
    }
};

/// The chunk's labels (all valid), as a (1, n) label row without the shift.
template <class I>
struct chunk_labels_op {
    scored_rows<I> plan;
    const index_t* list;
    std::int64_t* out;
    TPO_HOST_DEVICE void operator()(index_t i) const { out[i] = plan(list[i]).label; }
};

struct scatter_stats_op {
    const row_stats* chunk;
    const index_t* list;
    row_stats* out;
    TPO_HOST_DEVICE void operator()(index_t i) const { out[list[i]] = chunk[i]; }
};

template <class G>
struct fill_op {
    G* out;
    TPO_HOST_DEVICE void operator()(index_t e) const { out[e] = narrow<G>(0.0f); }
};

/// An accumulated gradient into the caller's element type.
template <class A, class G>
struct narrow_op {
    const A* in;
    G* out;
    TPO_HOST_DEVICE void operator()(index_t e) const { out[e] = narrow<G>(in[e]); }
};

/// The coefficients of the chunk's rows, in chunk order, with α and β scaled by `factor` (the
/// constant derivative of a linear transform, 1 otherwise).
struct gather_coefficients_op {
    const row_coefficients* coefficients;
    const index_t* list;
    double factor;
    row_coefficients* out;
    TPO_HOST_DEVICE void operator()(index_t i) const {
        row_coefficients c = coefficients[list[i]];
        c.alpha *= factor;
        c.beta *= factor;
        out[i] = c;
    }
};

/// ∂L/∂u = ∂L/∂z · dz/du over an n×V chunk.
template <class A>
struct chain_op {
    const A* z;
    A* g;
    logit_transform transform;
    TPO_HOST_DEVICE void operator()(index_t e) const { g[e] *= transform.derivative_at(z[e]); }
};

/// The chunk's ∂L/∂h rows (n×H, accumulation type) into the caller's gradient rows.
template <class A, class G, class I>
struct scatter_hidden_op {
    const A* chunk;
    scored_rows<I> plan;
    const index_t* list;
    hidden_view<G> grad;
    TPO_HOST_DEVICE void operator()(index_t e) const {
        const index_t i = e / grad.hidden, k = e % grad.hidden;
        const scored_row row = plan(list[i]);
        grad.row(row.sequence, row.position)[k] = narrow<G>(chunk[e]);
    }
};

/// ∂L/∂b[v] += Σ over the chunk's rows of G[i][v], in row order (= when `overwrite`: the first
/// share, over whatever the buffer held); G in A, or in the head's type where the products take
/// it so (a backend's rounds_gradient_to).
template <class A, class G = A>
struct bias_gradient_op {
    const G* g;
    index_t rows;
    index_t vocab;
    bool overwrite;
    A* out;
    TPO_HOST_DEVICE void operator()(index_t v) const {
        A sum = A(0);
        for (index_t i = 0; i < rows; ++i) sum += widen<A>(g[i * vocab + v]);
        out[v] = overwrite ? sum : out[v] + sum;
    }
};

/// Rank-one rows (β = 0): d = α·dz/du at the label, kept for ∂L/∂h and the head; a group of lanes
/// per row, as label_row_op, so that z is the forward's.
template <class A, class T, class I>
struct label_factor_op {
    hidden_rows<T> source;
    scored_rows<I> plan;
    logit_transform transform;
    const row_coefficients* coefficients;
    const index_t* list;
    A* factor;
    template <class Lanes>
    TPO_HOST_DEVICE void operator()(const Lanes& lanes) const {
        const index_t i = lanes.group();
        const row_coefficients& c = coefficients[list[i]];
        A d = static_cast<A>(c.alpha);
        if (!transform.identity()) {  // the same for every lane of the group
            const scored_row row = plan(list[i]);
            d *= transform.derivative_at(label_logit<A>(source.states.row(row.sequence, row.position), source.head,
                                                        c.label, transform, lanes));
        }
        if (lanes.lane() == 0) factor[i] = d;
    }
};

/// ∂L/∂h = d·W[y] of the rank-one rows, one entry per index (index = row·H + k).
template <class A, class T, class G, class I>
struct label_only_hidden_op {
    head_view<const T> head;
    scored_rows<I> plan;
    const row_coefficients* coefficients;
    const index_t* list;
    const A* factor;
    hidden_view<G> grad;
    TPO_HOST_DEVICE void operator()(index_t e) const {
        const index_t i = e / grad.hidden, k = e % grad.hidden;
        const scored_row row = plan(list[i]);
        grad.row(row.sequence, row.position)[k] = narrow<G>(factor[i] * widen<A>(head.row(coefficients[list[i]].label)[k]));
    }
};

/// ∂L/∂W[y] += d·h and ∂L/∂b[y] += d of the rank-one rows: one entry (y, k) per index, k = H
/// meaning the bias. The rows of label y are those of its group (`order`, positions in the list
/// grouped by label and in list order within one), so each entry adds its rows in the order a
/// row-by-row loop would, and no two indices touch the same entry.
template <class A, class T, class I>
struct label_only_head_op {
    hidden_view<const T> states;
    scored_rows<I> plan;
    const row_coefficients* coefficients;
    const index_t* list;
    const A* factor;
    const index_t* order;
    const index_t* group_start;  // one past the groups: group g is order[group_start[g], group_start[g + 1])
    index_t hidden;
    A* grad_weight;  // V×H, or null
    A* grad_bias;    // V, or null
    TPO_HOST_DEVICE void operator()(index_t e) const {
        const index_t g = e / (hidden + 1), k = e % (hidden + 1);
        for (index_t j = group_start[g]; j < group_start[g + 1]; ++j) {
            const index_t i = order[j];
            const std::int64_t y = coefficients[list[i]].label;
            if (k < hidden) {
                if (grad_weight) {
                    const scored_row row = plan(list[i]);
                    grad_weight[y * hidden + k] += factor[i] * widen<A>(states.row(row.sequence, row.position)[k]);
                }
            } else if (grad_bias) {
                grad_bias[y] += factor[i];
            }
        }
    }
};

template <class B>
using index_buffer = typename B::template buffer<index_t>;

/// The indices r of `flags` that are set, on the host and in backend memory.
template <class B>
std::pair<std::vector<index_t>, index_buffer<B>> set_indices(B& backend, const std::vector<std::int32_t>& flags) {
    std::vector<index_t> list;
    for (std::size_t r = 0; r < flags.size(); ++r)
        if (flags[r]) list.push_back(static_cast<index_t>(r));
    return {list, backend.upload(list)};
}

/// The positions of `list` grouped by the label of their row (coefficients[list[i]].label), in
/// list order within a group, and where each group starts (one entry more than there are groups).
inline std::pair<std::vector<index_t>, std::vector<index_t>> label_groups(const std::vector<index_t>& list,
                                                                         const std::vector<row_coefficients>& rows) {
    std::vector<index_t> order(list.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = static_cast<index_t>(i);
    auto label = [&](index_t i) { return rows[static_cast<std::size_t>(list[static_cast<std::size_t>(i)])].label; };
    std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) { return label(a) < label(b); });
    std::vector<index_t> start;
    for (std::size_t j = 0; j < order.size(); ++j)
        if (j == 0 || label(order[j]) != label(order[j - 1])) start.push_back(static_cast<index_t>(j));
    start.push_back(static_cast<index_t>(order.size()));
    return {order, start};
}

}  // namespace fused_detail

/// Non-finite values in a head are an input error, reported by the vocabulary entry that holds
/// one. `what` names the head ("lm_head", "reference lm_head"). The weight is scanned as V rows of
/// H "logits" by the backend's own finiteness reduction, which reads rows as fast as it can. A head
/// that is a slice of the vocabulary starting at `first_row` names rows and entries in the whole.
template <class B, class T>
void check_head(B& backend, const head_view<const T>& head, const char* what, index_t first_row = 0) {
    const row_alignment unshifted{false, -1};
    auto labels = backend.template allocate<std::int64_t>(head.vocab);  // 0: every row is read
    auto stats = backend.template allocate<row_stats>(head.vocab);
    backend.row_statistics(logits_view<const T>{head.weight, 1, head.vocab, head.hidden},
                           labels_view<const std::int64_t>{backend.raw(labels), 1, head.vocab}, unshifted,
                           row_reduction::finiteness, backend.raw(stats));
    const index_t row = fused_detail::first_non_finite(backend.to_host(stats));
    detail::require<value_error>(row < 0, what, ": row ", first_row + row, " of the weight holds a NaN or an infinite value");
    if (!head.bias) return;
    // The bias as V rows of one entry, so the error can name the entry.
    backend.row_statistics(logits_view<const T>{head.bias, 1, head.vocab, 1},
                           labels_view<const std::int64_t>{backend.raw(labels), 1, head.vocab}, unshifted,
                           row_reduction::finiteness, backend.raw(stats));
    const index_t entry = fused_detail::first_non_finite(backend.to_host(stats));
    detail::require<value_error>(entry < 0, what, ": entry ", first_row + entry, " of the bias holds a NaN or an infinite value");
}

/// One tensor of hidden states among those a fused pass takes together: every part goes through
/// the same head and transform, and a chunk of logits may hold rows of several parts, so that a
/// product covers as many rows as the chunk allows (both policies of a batch, say). `what` names
/// the tensor in errors; the forward writes its rows' statistics to `out`.
template <class T, class I>
struct fused_part {
    hidden_view<const T> states;
    labels_view<const I> labels;
    const char* what = "";
    row_stats* out = nullptr;
};

/// One tensor's share of a fused backward: its hidden states and labels, the coefficients of its
/// scored rows, and its gradient (empty: not computed).
template <class B, class T, class I, class G>
struct fused_gradient_part {
    hidden_view<const T> states;
    labels_view<const I> labels;
    typename B::template buffer<row_coefficients>* coefficients = nullptr;
    hidden_view<G> grad;
};

namespace fused_detail {

/// Calls f(part, first, end, offset) for every part whose rows [first, end) of its own list lie in
/// rows [begin, begin + count) of the parts' lists put end to end (sizes `sizes`), `offset` being
/// where they start in that range.
template <class F>
void for_each_segment(const std::vector<index_t>& sizes, index_t begin, index_t count, F&& f) {
    index_t start = 0;
    for (std::size_t p = 0; p < sizes.size(); ++p) {
        const index_t lo = std::max(begin, start), hi = std::min(begin + count, start + sizes[p]);
        if (lo < hi) f(p, lo - start, hi - start, lo - begin);
        start += sizes[p];
    }
}

/// Each part's rows at positions [first, end) of the parts' lists put end to end: the rows of a
/// pass's last chunk when `first` is where that chunk starts.
inline std::vector<std::vector<index_t>> rows_from(const std::vector<std::vector<index_t>>& lists, index_t first) {
    std::vector<index_t> sizes;
    index_t total = 0;
    for (const auto& list : lists) {
        sizes.push_back(static_cast<index_t>(list.size()));
        total += sizes.back();
    }
    std::vector<std::vector<index_t>> rows(lists.size());
    for_each_segment(sizes, first, total - first, [&](std::size_t p, index_t b, index_t e, index_t) {
        rows[p].assign(lists[p].begin() + b, lists[p].begin() + e);
    });
    return rows;
}

}  // namespace fused_detail

/// A forward pass's last chunk, left in scratch for the backward: its gathered hidden states, its
/// logits z (after the bias and the transform), and what they were computed from. The backward of
/// the same rows (fused_row_gradient, which takes chunks last to first) starts from it instead of
/// computing that chunk again; any backward pass takes the scratch over for its chunks where it is
/// large enough, so that a chunk that cannot be used costs no new allocation either.
template <class B, class T>
struct kept_chunk {
    using A = fused_accumulate_t<T>;
    typename B::template buffer<T> gathered;
    typename B::template buffer<A> logits;
    std::vector<const T*> states;            // each part's hidden states
    std::vector<std::vector<index_t>> rows;  // each part's rows in the chunk, as indices into its scored rows
    index_t chunk_rows = 0;                  // the pass's rows per chunk
    index_t gathered_size = 0;               // the buffers' sizes, in elements
    index_t logits_size = 0;
    const T* weight = nullptr;
    const T* bias = nullptr;
    logit_transform transform{};

    /// Whether the backward of parts with hidden states `parts_states` through `head`, whose last
    /// chunk is rows [last, ...) of their lists `lists` put end to end at `chunk` rows per chunk,
    /// would compute exactly what is kept.
    bool holds(const std::vector<const T*>& parts_states, const head_view<const T>& head, const logit_transform& t,
               index_t chunk, const std::vector<std::vector<index_t>>& lists, index_t last) const {
        if (parts_states.empty() || parts_states != states || weight != head.weight || bias != head.bias ||
            chunk != chunk_rows || t.scale != transform.scale || t.softcap != transform.softcap ||
            t.temperature != transform.temperature)
            return false;
        return fused_detail::rows_from(lists, last) == rows;
    }
};

/// The statistics of every scored row of hidden-state tensors through one head, as row_statistics
/// gives them for the logits transform(h·Wᵀ + b), each part's into its `out`. The parts' valid rows
/// are taken C at a time in part order, a chunk holding rows of more than one part where they
/// meet. With `check`, a non-finite hidden state of a valid row is an error naming the part, the
/// sequence and the position. With `keep`, the last chunk of logits (if any was computed) is left
/// there for the backward.
template <class B, class T, class I>
void fused_row_statistics(B& backend, const head_view<const T>& head, const std::vector<fused_part<T, I>>& parts,
                          row_alignment align, row_reduction reduction, const fused_settings& settings, bool check,
                          kept_chunk<B, T>* keep = nullptr) {
    using A = fused_accumulate_t<T>;
    using namespace fused_detail;
    const index_t V = head.vocab, H = head.hidden;
    std::vector<scored_rows<I>> plans;
    std::vector<std::vector<index_t>> host_lists;
    std::vector<index_buffer<B>> lists;
    std::vector<index_t> sizes;
    for (const fused_part<T, I>& part : parts) {
        const auto plan = scored_rows<I>::of(part.labels, align, V);
        const index_t count = plan.count();
        plans.push_back(plan);
        std::vector<index_t> host_list;
        index_buffer<B> list;
        if (count > 0) {
            auto flags = backend.template allocate<std::int32_t>(count);
            backend.for_each(count, classify_op<I>{plan, part.out, backend.raw(flags)});
            std::tie(host_list, list) = set_indices(backend, backend.to_host(flags));
        }
        const auto n = static_cast<index_t>(host_list.size());
        if (check && n > 0) {
            // The valid rows' hidden states, scanned as rows of H "logits" (label 0) by the backend.
            const index_t rows = part.states.rows();
            auto scan_labels = backend.template allocate<std::int64_t>(rows);
            backend.for_each(rows, fill_labels_op{backend.raw(scan_labels), -1});
            backend.for_each(n, scan_labels_op<I>{plan, backend.raw(list), part.states.length, backend.raw(scan_labels)});
            auto scanned = backend.template allocate<row_stats>(rows);
            backend.row_statistics(
                logits_view<const T>{part.states.data, part.states.sequences, part.states.length, H},
                labels_view<const std::int64_t>{backend.raw(scan_labels), part.states.sequences, part.states.length},
                row_alignment{false, -1}, row_reduction::finiteness, backend.raw(scanned));
            if (const index_t r = first_non_finite(backend.to_host(scanned)); r >= 0)
                throw value_error(detail::concat(part.what, " at sequence ", r / part.states.length, ", position ",
                                                 r % part.states.length,
                                                 ": the hidden state holds a NaN or an infinite value"));
        }
        if (n > 0 && !needs_logsumexp(reduction))
            backend::for_each_group(backend, n,
                                    label_row_op<A, T, I>{hidden_rows<T>{part.states, head}, plan, settings.transform,
                                                          backend.raw(list), part.out});
        sizes.push_back(n);
        host_lists.push_back(std::move(host_list));
        lists.push_back(std::move(list));
    }
    index_t n = 0;
    for (index_t size : sizes) n += size;
    if (n == 0 || !needs_logsumexp(reduction)) return;
    const index_t C = std::min(n, chunk_rows_of(backend, settings, V));
    auto gathered = fused_detail::overwritten<T>(backend, C * H);
    auto logits = fused_detail::overwritten<A>(backend, C * V);
    auto chunk_labels = backend.template allocate<std::int64_t>(C);
    auto chunk_stats = backend.template allocate<row_stats>(C);
    const row_alignment unshifted{false, align.ignore_index};
    for (index_t first = 0; first < n; first += C) {
        const index_t m = std::min(C, n - first);
        for_each_segment(sizes, first, m, [&](std::size_t p, index_t b, index_t e, index_t at) {
            const index_t* rows = backend.raw(lists[p]) + b;
            backend.for_each((e - b) * H, gather_op<T, I>{parts[p].states, plans[p], rows, backend.raw(gathered) + at * H});
            backend.for_each(e - b, chunk_labels_op<I>{plans[p], rows, backend.raw(chunk_labels) + at});
        });
        backend.matmul(false, true, m, V, H, backend.raw(gathered), H, head.weight, H, backend.raw(logits), V, A(0));
        if (head.bias || !settings.transform.identity())
            backend.for_each(m * V, epilogue_op<A, T>{backend.raw(logits), head.bias, V, settings.transform});
        backend.row_statistics(logits_view<const A>{backend.raw(logits), 1, m, V},
                               labels_view<const std::int64_t>{backend.raw(chunk_labels), 1, m}, unshifted, reduction,
                               backend.raw(chunk_stats));
        for_each_segment(sizes, first, m, [&](std::size_t p, index_t b, index_t e, index_t at) {
            backend.for_each(e - b, scatter_stats_op{backend.raw(chunk_stats) + at, backend.raw(lists[p]) + b, parts[p].out});
        });
    }
    if (keep) {
        const index_t last = (n - 1) / C * C;
        keep->gathered = std::move(gathered);
        keep->logits = std::move(logits);
        keep->states.clear();
        for (const fused_part<T, I>& part : parts) keep->states.push_back(part.states.data);
        keep->rows = rows_from(host_lists, last);
        keep->chunk_rows = C;
        keep->gathered_size = C * H;
        keep->logits_size = C * V;
        keep->weight = head.weight;
        keep->bias = head.bias;
        keep->transform = settings.transform;
    }
}

/// The head's gradient as the sources' shares are added to it: ∂L/∂W (V×H) and ∂L/∂b (V), either
/// may be null. Until `started` they may hold anything: the first share overwrites them (so a
/// V×H accumulator is neither zeroed nor read before the first chunk's product writes it), and
/// finish() zeroes them if no share came.
template <class A>
struct head_gradient {
    A* weight = nullptr;
    A* bias = nullptr;
    bool started = false;

    template <class B>
    void zero(B& backend, index_t vocab, index_t hidden) {
        if (weight) backend.for_each(vocab * hidden, fused_detail::fill_op<A>{weight});
        if (bias) backend.for_each(vocab, fused_detail::fill_op<A>{bias});
        started = true;
    }
    template <class B>
    void finish(B& backend, index_t vocab, index_t hidden) {
        if (!started) zero(backend, vocab, hidden);
    }
};

/// ∂L/∂h of every row of hidden-state tensors through one head (zero for rows that are not
/// scored; not computed for a part whose `grad` is empty) from the coefficients of their scored
/// rows, and the head's share added to `head`. The rows that need the softmax are taken in chunks
/// as fused_row_statistics takes them, several parts' rows in a chunk, last chunk first.
template <class B, class T, class I, class G>
void fused_row_gradient(B& backend, const head_view<const T>& source_head,
                        const std::vector<fused_gradient_part<B, T, I, G>>& parts, row_alignment align,
                        const fused_settings& settings, head_gradient<fused_accumulate_t<T>>& head,
                        kept_chunk<B, T>* kept = nullptr) {
    using A = fused_accumulate_t<T>;
    using namespace fused_detail;
    A* const grad_weight = head.weight;
    A* const grad_bias = head.bias;
    const index_t V = source_head.vocab, H = source_head.hidden;
    std::vector<scored_rows<I>> plans;
    std::vector<std::vector<index_t>> host_full;
    std::vector<index_buffer<B>> full_lists;
    std::vector<index_t> sizes;
    std::vector<const T*> states;
    bool any_grad = false;
    for (const auto& part : parts) {
        const auto plan = scored_rows<I>::of(part.labels, align, V);
        plans.push_back(plan);
        states.push_back(part.states.data);
        backend.for_each(part.grad.size(), fill_op<G>{part.grad.data});
        any_grad = any_grad || !part.grad.empty();
        const index_t count = plan.count();
        std::vector<index_t> host_list;
        index_buffer<B> list;
        if (count > 0) {
            const row_coefficients* coefficients = backend.raw(*part.coefficients);
            const std::vector<row_coefficients> host = backend.to_host(*part.coefficients);
            std::vector<std::int32_t> rank_one(static_cast<std::size_t>(count)), full(static_cast<std::size_t>(count));
            for (std::size_t r = 0; r < host.size(); ++r) {
                rank_one[r] = kind_of(host[r]) == gradient_row_kind::label_only;
                full[r] = kind_of(host[r]) == gradient_row_kind::softmax;
            }
            auto [host_rank_one, rank_one_list] = set_indices(backend, rank_one);
            std::tie(host_list, list) = set_indices(backend, full);
            if (const auto n = static_cast<index_t>(host_rank_one.size()); n > 0) {
                const hidden_rows<T> source{part.states, source_head};
                auto factor = backend.template allocate<A>(n);
                backend::for_each_group(backend, n,
                                        label_factor_op<A, T, I>{source, plan, settings.transform, coefficients,
                                                                 backend.raw(rank_one_list), backend.raw(factor)});
                if (!part.grad.empty())
                    backend.for_each(n * H, label_only_hidden_op<A, T, G, I>{source_head, plan, coefficients,
                                                                             backend.raw(rank_one_list),
                                                                             backend.raw(factor), part.grad});
                if (grad_weight || grad_bias) {
                    if (!head.started) head.zero(backend, V, H);
                    const auto [order, group_start] = label_groups(host_rank_one, host);
                    auto order_buffer = backend.upload(order);
                    auto start_buffer = backend.upload(group_start);
                    const auto groups = static_cast<index_t>(group_start.size()) - 1;
                    backend.for_each(groups * (H + 1),
                                     label_only_head_op<A, T, I>{part.states, plan, coefficients,
                                                                 backend.raw(rank_one_list), backend.raw(factor),
                                                                 backend.raw(order_buffer), backend.raw(start_buffer),
                                                                 H, grad_weight, grad_bias});
                }
            }
        }
        sizes.push_back(static_cast<index_t>(host_list.size()));
        host_full.push_back(std::move(host_list));
        full_lists.push_back(std::move(list));
    }

    index_t n = 0;
    for (index_t size : sizes) n += size;
    if (n == 0) return;
    const index_t C = std::min(n, chunk_rows_of(backend, settings, V));
    // A linear transform has a constant derivative, folded into the coefficients (α and β scale
    // with it), and the gradient overwrites the chunk's logits in place; a soft-cap's derivative
    // needs each logit, so the gradient goes into a second chunk.
    const bool linear = settings.transform.linear();
    const index_t last = (n - 1) / C * C;
    const bool reuse = kept && kept->holds(states, source_head, settings.transform, C, host_full, last);
    const bool adopt = kept && kept->gathered_size >= C * H && kept->logits_size >= C * V;
    auto gathered = adopt ? std::move(kept->gathered) : fused_detail::overwritten<T>(backend, C * H);
    auto logits = adopt ? std::move(kept->logits) : fused_detail::overwritten<A>(backend, C * V);
    if (kept) *kept = {};
    auto second = fused_detail::overwritten<A>(backend, linear ? 0 : C * V);
    A* chunk_grad = linear ? backend.raw(logits) : backend.raw(second);
    // Where the products would round a float ∂L/∂u to the head's type anyway (the backend's
    // optional rounds_gradient_to<T>()), the gradient rows are written in that type themselves:
    // the rounding pass, and half of ∂L/∂u's bytes, saved. A soft-cap's chain rule works on the
    // float gradient, which the products then round.
    constexpr bool may_narrow = sizeof(T) == 2 && requires { backend.template rounds_gradient_to<T>(); };
    bool narrow = false;
    if constexpr (may_narrow) narrow = linear && backend.template rounds_gradient_to<T>();
    auto narrowed = fused_detail::overwritten<T>(backend, narrow ? C * V : 0);
    auto chunk_coefficients = backend.template allocate<row_coefficients>(C);
    auto hidden_grad = fused_detail::overwritten<A>(backend, any_grad ? C * H : 0);
    const double factor = linear ? settings.transform.derivative_at(0.0) : 1.0;
    for (index_t first = last; first >= 0; first -= C) {
        const index_t m = std::min(C, n - first);
        auto segments = [&](auto&& f) {
            for_each_segment(sizes, first, m, [&](std::size_t p, index_t b, index_t e, index_t at) {
                f(parts[p], plans[p], backend.raw(full_lists[p]) + b, e - b, at);
            });
        };
        if (!(reuse && first == last)) {
            segments([&](const auto& part, const auto& plan, const index_t* rows, index_t count, index_t at) {
                backend.for_each(count * H, gather_op<T, I>{part.states, plan, rows, backend.raw(gathered) + at * H});
            });
            backend.matmul(false, true, m, V, H, backend.raw(gathered), H, source_head.weight, H, backend.raw(logits),
                           V, A(0));
            if (source_head.bias || !settings.transform.identity())
                backend.for_each(m * V,
                                 epilogue_op<A, T>{backend.raw(logits), source_head.bias, V, settings.transform});
        }
        segments([&](const auto& part, const auto&, const index_t* rows, index_t count, index_t at) {
            backend.for_each(count, gather_coefficients_op{backend.raw(*part.coefficients), rows, factor,
                                                           backend.raw(chunk_coefficients) + at});
        });
        const logits_view<const A> chunk_logits{backend.raw(logits), 1, m, V};
        // ∂L/∂h and the head's share from ∂L/∂u (G: A, or T where narrowed).
        auto products = [&](const auto* grad) {
            if (any_grad) {
                backend.matmul(false, false, m, H, V, grad, V, source_head.weight, H, backend.raw(hidden_grad), H,
                               A(0));
                segments([&](const auto& part, const auto& plan, const index_t* rows, index_t count, index_t at) {
                    if (!part.grad.empty())
                        backend.for_each(count * H, scatter_hidden_op<A, G, I>{backend.raw(hidden_grad) + at * H,
                                                                               plan, rows, part.grad});
                });
            }
            if (grad_weight)
                backend.matmul(true, false, V, H, m, grad, V, backend.raw(gathered), H, grad_weight, H,
                               A(head.started ? 1 : 0));
            using Grad = std::remove_cv_t<std::remove_pointer_t<decltype(grad)>>;
            if (grad_bias) backend.for_each(V, bias_gradient_op<A, Grad>{grad, m, V, !head.started, grad_bias});
        };
        if constexpr (may_narrow) {
            if (narrow) {
                backend.row_gradient(chunk_logits, backend.raw(chunk_coefficients), m,
                                     logits_view<T>{backend.raw(narrowed), 1, m, V});
                products(static_cast<const T*>(backend.raw(narrowed)));
            }
        }
        if (!narrow) {
            backend.row_gradient(chunk_logits, backend.raw(chunk_coefficients), m,
                                 logits_view<A>{chunk_grad, 1, m, V});
            if (!linear) backend.for_each(m * V, chain_op<A>{backend.raw(logits), chunk_grad, settings.transform});
            products(static_cast<const A*>(chunk_grad));
        }
        head.started = head.started || grad_weight || grad_bias;
    }
}

}  // namespace rows
TPO_END_NAMESPACE
