#pragma once
// The two O(S·L·V) passes of the Thrust backend as CUDA kernels (nvcc only).
//
// One row per block of 256 threads (a warp per row when V is small), so a row is read by a whole
// block in coalesced 16-byte loads and every load is independent of the others:
//   row_statistics_kernel  one read of the row: each thread folds its packs into an online
//                          log-sum-exp state (thrust/row_pass.hpp: fold, one exponential per
//                          value, 2z for free; no exponential for a finiteness scan), CUB merges
//                          the states, one thread gathers z[y];
//   row_gradient_kernel    one read and one write: alpha·δ(v=y) − beta·exp(z[v] − lse).
// 16-bit inputs are read as they are (8 per load) and widened to float in registers; a softmax
// is never stored. Reductions run in a fixed order, so identical rows give identical bits (the
// policy and the reference at initialisation give h = 0 exactly, docs/formulas.md#numerics).

#include <cub/block/block_reduce.cuh>
#include <cub/warp/warp_reduce.cuh>

#include <cstdint>

#include "tpo/backend/thrust/row_pass.hpp"

TPO_BEGIN_NAMESPACE
namespace backend::thrust_detail::cuda {

inline constexpr int block_threads = 256;
/// Below this many 16-byte packs per row, a warp per row keeps the block's threads busy.
inline constexpr index_t warp_row_packs = 256;

/// Elements per 16-byte load.
template <class T>
inline constexpr int pack_size = 16 / static_cast<int>(sizeof(T));

template <class T, int N>
struct alignas(sizeof(T) * N) pack {
    T v[N];
};

/// A row as a scalar head up to the first 16-byte boundary, whole packs, and a scalar tail.
struct row_split {
    index_t head;   // scalar elements before the first pack
    index_t packs;  // whole packs after the head
    index_t tail;   // first element after the packs
};

template <class T>
__device__ TPO_FORCE_INLINE row_split split_row(const T* row, index_t vocab) {
    constexpr int n = pack_size<T>;
    const auto misalignment = static_cast<index_t>(reinterpret_cast<std::uintptr_t>(row) % 16);
    index_t head = misalignment == 0 ? 0 : (16 - misalignment) / static_cast<index_t>(sizeof(T));
    if (head > vocab) head = vocab;
    const index_t packs = (vocab - head) / n;
    return {head, packs, head + packs * n};
}

/// Merges the states of the threads that share a row; the result is valid in the row's first thread.
template <int RowThreads, class State>
__device__ TPO_FORCE_INLINE State reduce_row(const State& state, int group) {
    if constexpr (RowThreads == block_threads) {
        using reduce = cub::BlockReduce<State, block_threads>;
        __shared__ typename reduce::TempStorage storage;
        return reduce(storage).Reduce(state, merge_states{});
    } else {
        static_assert(RowThreads == 32, "a row is read by a block or by a warp");
        using reduce = cub::WarpReduce<State, 32>;
        __shared__ typename reduce::TempStorage storage[block_threads / 32];
        return reduce(storage[group]).Reduce(state, merge_states{});
    }
}

template <int RowThreads, row_reduction Reduction, class T, class I>
__global__ void __launch_bounds__(block_threads)
    row_statistics_kernel(logits_view<const T> z, rows::scored_rows<I> plan, row_stats* out) {
    using Acc = accumulate_t<T>;
    constexpr int n = pack_size<T>;
    const int lane = static_cast<int>(threadIdx.x) % RowThreads;
    const int group = static_cast<int>(threadIdx.x) / RowThreads;
    const index_t r = static_cast<index_t>(blockIdx.x) * (block_threads / RowThreads) + group;
    // Every exit below is uniform over the threads of a row, so the reduction sees all of them.
    if (r >= plan.count()) return;
    const rows::scored_row scored = plan(r);
    const T* row = z.row(scored.sequence, scored.position);
    if (!rows::reduces(scored, Reduction)) {
        if (lane == 0) out[r] = rows::statistics_without_reduction(scored, row);
        return;
    }
    const row_split split = split_row(row, z.vocab);
    lse_state<Acc> state;
    Acc x[n];
    for (index_t v = lane; v < split.head; v += RowThreads) {
        x[0] = widen<Acc>(row[v]);
        fold<Reduction>(state, x, 1);
    }
    const auto* packs = reinterpret_cast<const pack<T, n>*>(row + split.head);
    for (index_t p = lane; p < split.packs; p += RowThreads) {
        const pack<T, n> loaded = packs[p];
#pragma unroll
        for (int k = 0; k < n; ++k) x[k] = widen<Acc>(loaded.v[k]);
        fold<Reduction>(state, x, n);
    }
    for (index_t v = split.tail + lane; v < z.vocab; v += RowThreads) {
        x[0] = widen<Acc>(row[v]);
        fold<Reduction>(state, x, 1);
    }
    const lse_state<Acc> total = reduce_row<RowThreads>(state, group);
    if (lane == 0) out[r] = finish<Reduction>(total, row, scored.label);
}

template <int RowThreads, class T, class G>
__global__ void __launch_bounds__(block_threads)
    row_gradient_kernel(logits_view<const T> z, rows::gradient_rows plan, logits_view<G> grad) {
    using C = gradient_t<T, G>;
    constexpr int n = pack_size<T>;
    const int lane = static_cast<int>(threadIdx.x) % RowThreads;
    const index_t r = static_cast<index_t>(blockIdx.x) * (block_threads / RowThreads) +
                      static_cast<int>(threadIdx.x) / RowThreads;
    if (r >= plan.count()) return;
    const rows::gradient_row task = plan(r);
    const T* row = z.row(task.sequence, task.position);
    G* out = grad.row(task.sequence, task.position);
    // Only softmax rows are read; zero and label-only rows (whose lse may not exist) are written.
    const bool read = task.kind == rows::gradient_row_kind::softmax;
    const bool written = task.kind != rows::gradient_row_kind::zero;
    const C alpha = written ? static_cast<C>(task.coefficients.alpha) : C(0);
    const C beta = read ? static_cast<C>(task.coefficients.beta) : C(0);
    const C lse = read ? static_cast<C>(task.coefficients.lse) : C(0);
    const index_t label = written ? task.coefficients.label : -1;
    auto value = [&](index_t v, T x) {
        using std::exp;
        const C at_label = v == label ? alpha : C(0);
        if (!read) return narrow<G>(at_label);
        return narrow<G>(at_label - beta * exp(widen<C>(x) - lse));
    };

    const row_split split = split_row(row, z.vocab);
    for (index_t v = lane; v < split.head; v += RowThreads) out[v] = value(v, read ? row[v] : T{});
    const auto* packs = reinterpret_cast<const pack<T, n>*>(row + split.head);
    // The output row is stored in packs too when its alignment allows (same V, 16-byte aligned buffers).
    G* out_packed = out + split.head;
    const bool store_packs = reinterpret_cast<std::uintptr_t>(out_packed) % alignof(pack<G, n>) == 0;
    for (index_t p = lane; p < split.packs; p += RowThreads) {
        pack<T, n> loaded{};
        if (read) loaded = packs[p];
        pack<G, n> result;
        const index_t v0 = split.head + p * n;
#pragma unroll
        for (int k = 0; k < n; ++k) result.v[k] = value(v0 + k, loaded.v[k]);
        if (store_packs) {
            reinterpret_cast<pack<G, n>*>(out_packed)[p] = result;
        } else {
#pragma unroll
            for (int k = 0; k < n; ++k) out[v0 + k] = result.v[k];
        }
    }
    for (index_t v = split.tail + lane; v < z.vocab; v += RowThreads) out[v] = value(v, read ? row[v] : T{});
}

/// Rows per block and grid size for a row-per-block or row-per-warp launch.
inline unsigned int grid_for(index_t rows, int row_threads) {
    const index_t per_block = block_threads / row_threads;
    return static_cast<unsigned int>((rows + per_block - 1) / per_block);
}

template <class T>
inline bool use_warp_rows(index_t vocab) {
    return vocab / pack_size<T> < warp_row_packs;
}

}  // namespace backend::thrust_detail::cuda
TPO_END_NAMESPACE
