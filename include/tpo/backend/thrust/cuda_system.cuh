#pragma once
// Thrust's CUDA system as a tpo backend (nvcc only): stream-ordered device scratch
// (thrust/cuda_buffer.cuh; the caller's allocator when its cuda_context gives one), work ordered on
// one user-given stream, the row passes as the kernels of thrust/cuda_rows.cuh.
//
// Nothing here waits for the GPU except to_host(), which the objective calls for its O(P)
// results. Launch errors are reported as tpo::error where they happen; errors of the kernels
// themselves surface at the next synchronisation (to_host) as tpo::error too.

#include <cuda_runtime.h>

#include <thrust/for_each.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/system/cuda/execution_policy.h>
#include <thrust/system_error.h>

#include <vector>

#include "tpo/backend/thrust/cuda_blas.cuh"
#include "tpo/backend/thrust/cuda_buffer.cuh"
#include "tpo/backend/thrust/cuda_lanes.cuh"
#include "tpo/backend/thrust/cuda_rows.cuh"
#include "tpo/backend/thrust/host_systems.hpp"
#include "tpo/core/error.hpp"

TPO_BEGIN_NAMESPACE
namespace backend::thrust_detail {

namespace cuda {

/// The kernels read the caller's pointers directly: host memory the device cannot reach is a
/// usage error, reported before a launch would fault.
inline void require_device_accessible(const void* p, const char* what) {
    if (p == nullptr) return;
    cudaPointerAttributes attributes{};
    check(cudaPointerGetAttributes(&attributes, p), "cudaPointerGetAttributes");
    detail::require<shape_error>(attributes.type != cudaMemoryTypeUnregistered, "thrust backend (CUDA): ", what,
                                 " at ", p,
                                 " is host memory; pass device (or managed or mapped) memory, the backend "
                                 "never copies the caller's tensors");
}

}  // namespace cuda

template <>
struct system<::thrust::cuda::tag> {
    using context = cuda_context;

    template <class T>
    using vector = cuda::device_buffer<T>;

    template <class T>
    static vector<T> allocate(const cuda_context& context, index_t n) {
        return vector<T>(n, context);
    }

    template <class T>
    static std::vector<T> to_host(const cuda_context& context, const vector<T>& b) {
        const cudaStream_t stream = context.stream;
        std::vector<T> h(b.size());
        if (!h.empty())
            cuda::check(cudaMemcpyAsync(h.data(), b.data(), h.size() * sizeof(T),
                                        cudaMemcpyDeviceToHost, stream),
                        "copy of a result to the host");
        cuda::check(cudaStreamSynchronize(stream), "stream synchronisation");
        return h;
    }

    static constexpr index_t fused_chunk_values = index_t{1} << 27;

    template <class T>
    static vector<T> upload(const cuda_context& context, const std::vector<T>& host) {
        const cudaStream_t stream = context.stream;
        vector<T> b(static_cast<index_t>(host.size()), context);
        if (!host.empty())
            cuda::check(cudaMemcpyAsync(b.data(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice,
                                        stream),
                        "copy of an index list to the device");
        return b;
    }

    template <class X, class Y, class Acc>
    static void matmul(const cuda_context& context, bool trans_a, bool trans_b, index_t m, index_t n, index_t k,
                       const X* a, index_t lda, const Y* b, index_t ldb, Acc* c, index_t ldc, Acc beta) {
        cuda::matmul(context, trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, beta);
    }

    template <class F>
    static void for_each(const cuda_context& context, index_t n, const F& f) {
        for_each(context.stream, n, f);
    }

    template <class F>
    static void for_each(cudaStream_t stream, index_t n, const F& f) {
        if (n <= 0) return;
        try {
            ::thrust::for_each(::thrust::cuda::par_nosync.on(stream), ::thrust::counting_iterator<index_t>(0),
                               ::thrust::counting_iterator<index_t>(n), f);
        } catch (const ::thrust::system_error& e) {
            throw error(detail::concat("thrust backend (CUDA): for_each: ", e.what()));
        }
    }

    /// f(lanes) for each of n groups, a block of cuda::group_lanes threads each.
    template <class F>
    static void for_each_group(const cuda_context& context, index_t n, const F& f) {
        if (n <= 0) return;
        cuda::group_kernel<<<static_cast<unsigned int>(n), cuda::group_lanes, 0, context.stream>>>(f);
        cuda::check(cudaGetLastError(), "launch of a pass over groups of lanes");
    }

    template <class T, class I>
    static void row_statistics(const cuda_context& context, logits_view<const T> z, labels_view<const I> labels,
                               row_alignment align, row_reduction reduction, row_stats* out) {
        const cudaStream_t stream = context.stream;
        const auto plan = rows::scored_rows<I>::of(labels, align, z.vocab);
        if (plan.count() <= 0) return;
        cuda::require_device_accessible(z.data, "logits");
        cuda::require_device_accessible(labels.data, "labels");
        switch (reduction) {
        case row_reduction::label:  // one gather per row: a thread per row
            for_each(stream, plan.count(), row_statistics_op<T, I>{z, plan, reduction, out});
            return;
        case row_reduction::finiteness: launch_row_statistics<row_reduction::finiteness>(stream, z, plan, out); return;
        case row_reduction::logsumexp: launch_row_statistics<row_reduction::logsumexp>(stream, z, plan, out); return;
        case row_reduction::logsumexp_and_doubled:
            launch_row_statistics<row_reduction::logsumexp_and_doubled>(stream, z, plan, out);
            return;
        }
    }

    template <row_reduction Reduction, class T, class I>
    static void launch_row_statistics(cudaStream_t stream, logits_view<const T> z, const rows::scored_rows<I>& plan,
                                      row_stats* out) {
        const bool warp = cuda::use_warp_rows<T>(z.vocab);
        const unsigned int grid = cuda::grid_for(plan.count(), warp ? 32 : cuda::block_threads);
        constexpr unsigned int block = cuda::block_threads;
        if (warp)
            cuda::row_statistics_kernel<32, Reduction><<<grid, block, 0, stream>>>(z, plan, out);
        else
            cuda::row_statistics_kernel<cuda::block_threads, Reduction><<<grid, block, 0, stream>>>(z, plan, out);
        cuda::check(cudaGetLastError(), "launch of the row statistics kernel");
    }

    template <class T, class G>
    static void row_gradient(const cuda_context& context, logits_view<const T> z,
                             const row_coefficients* coefficients, index_t scored, logits_view<G> grad) {
        const cudaStream_t stream = context.stream;
        const rows::gradient_rows plan{z.sequences, z.length, scored, coefficients};
        if (plan.count() <= 0) return;
        cuda::require_device_accessible(z.data, "logits");
        cuda::require_device_accessible(grad.data, "gradient");
        const bool warp = cuda::use_warp_rows<T>(z.vocab);
        const unsigned int grid = cuda::grid_for(plan.count(), warp ? 32 : cuda::block_threads);
        constexpr unsigned int block = cuda::block_threads;
        if (warp)
            cuda::row_gradient_kernel<32><<<grid, block, 0, stream>>>(z, plan, grad);
        else
            cuda::row_gradient_kernel<cuda::block_threads><<<grid, block, 0, stream>>>(z, plan, grad);
        cuda::check(cudaGetLastError(), "launch of the row gradient kernel");
    }
};

}  // namespace backend::thrust_detail
TPO_END_NAMESPACE
