#pragma once
// The Thrust backend: the primitives of backend/concept.hpp on any Thrust system.
//
//   tpo::backend::thrust<>                     Thrust's device system (CUDA under nvcc, or the
//                                              system THRUST_DEVICE_SYSTEM names: OMP, TBB, CPP)
//   tpo::backend::thrust<thrust::cuda::tag>    CUDA (nvcc only); constructed with a cudaStream_t,
//                                              or a cuda_context: the stream and an allocator
//                                              for the scratch (a framework's caching allocator)
//   tpo::backend::thrust<thrust::omp::tag>     OpenMP threads (compile with OpenMP)
//   tpo::backend::thrust<thrust::tbb::tag>     TBB (define TPO_THRUST_TBB and link TBB, unless TBB
//                                              is Thrust's host or device system)
//   tpo::backend::thrust<thrust::cpp::tag>     sequential
//
// Memory stays where the caller's data lives: views hold pointers in the system's memory (device
// pointers on CUDA), the backend's O(S·L) scratch is in that memory (a Thrust vector of the system;
// on CUDA stream-ordered device memory or the caller's allocator, thrust/cuda_buffer.cuh), results
// stay there,
// and only to_host() (the O(P) results the objective reports) copies back. On CUDA everything is
// ordered on the stream given to the constructor; to_host() is the only synchronisation.
// Tensors held in Thrust vectors become views with tpo::logits_of / labels_of / token_values_of /
// sequence_values_of (thrust/views.hpp); raw device pointers are views as they are:
// logits_view{pointer, S, L, V}.

#include <thrust/detail/config.h>
#include <thrust/execution_policy.h>

#include <type_traits>
#include <vector>

#include "tpo/backend/concept.hpp"
#include "tpo/backend/thrust/host_systems.hpp"
#include "tpo/backend/thrust/row_pass.hpp"
#include "tpo/backend/thrust/views.hpp"

#if defined(__CUDACC__)
#  include "tpo/backend/thrust/cuda_system.cuh"
#endif

TPO_BEGIN_NAMESPACE
namespace backend {

template <class System = ::thrust::device_system_tag>
class thrust {
    using system = thrust_detail::system<System>;

public:
    /// Nothing on the host systems; for CUDA the stream every call is ordered on and, optionally,
    /// the allocator of the scratch (cuda_context, constructible from a cudaStream_t).
    using context_type = typename system::context;

    template <class T>
    using buffer = typename system::template vector<T>;

    thrust() = default;
    explicit thrust(context_type context) : context_(context) {}

    context_type context() const { return context_; }

    template <class T>
    buffer<T> allocate(index_t n) const {
        return system::template allocate<T>(context_, n);
    }
    template <class T>
    T* raw(buffer<T>& b) const {
        return ::thrust::raw_pointer_cast(b.data());
    }
    template <class T>
    std::vector<T> to_host(const buffer<T>& b) const {
        return system::template to_host<T>(context_, b);
    }

    /// A host vector in the system's memory (small index lists of the fused lm_head path).
    template <class T>
    buffer<T> upload(const std::vector<T>& host) const {
        return system::template upload<T>(context_, host);
    }

    /// C (m×n) = op(A)·op(B) + beta·C (beta 0 or 1), A stored m×k (k×m when trans_a) with row
    /// stride lda, B likewise: a product per entry on the host systems, cuBLAS on CUDA.
    template <class X, class Y, class Acc>
    void matmul(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, const X* a, index_t lda, const Y* b,
                index_t ldb, Acc* c, index_t ldc, Acc beta) const {
        system::matmul(context_, trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, beta);
    }

    /// Values per chunk of logits of the fused lm_head path when the caller sets none: on CUDA
    /// 2^27 (512 MiB in float), so that a chunk holds enough rows for ∂L/∂W's product to be bound
    /// by arithmetic rather than by rewriting the V×H accumulator; 2^24 on the host systems.
    index_t fused_chunk_values() const { return system::fused_chunk_values; }

    template <class F>
    void for_each(index_t n, F&& f) const {
        system::for_each(context_, n, static_cast<const std::decay_t<F>&>(f));
    }

    /// f(lanes) for each of n groups (backend/lanes.hpp), where the system has groups of lanes.
    template <class F>
        requires requires(const context_type& c, index_t n, const F& f) { system::for_each_group(c, n, f); }
    void for_each_group(index_t n, const F& f) const {
        system::for_each_group(context_, n, f);
    }

    template <class T, class I>
    void row_statistics(logits_view<const T> z, labels_view<const I> labels, row_alignment align,
                        row_reduction reduction, row_stats* out) const {
        system::row_statistics(context_, z, labels, align, reduction, out);
    }

    template <class T, class G>
    void row_gradient(logits_view<const T> z, const row_coefficients* coefficients, index_t scored,
                      logits_view<G> grad) const {
        system::row_gradient(context_, z, coefficients, scored, grad);
    }

private:
    context_type context_{};
};

static_assert(tensor_backend<thrust<::thrust::cpp::tag>>);
// Thrust's default device system is CUDA, which only nvcc can build: a host compiler without a
// THRUST_DEVICE_SYSTEM of OMP, TBB or CPP still gets the explicitly named host systems.
#if THRUST_DEVICE_SYSTEM != THRUST_DEVICE_SYSTEM_CUDA || defined(__CUDACC__)
static_assert(tensor_backend<thrust<>>);
#endif

}  // namespace backend
TPO_END_NAMESPACE
