#pragma once
// Thrust's host systems (C++, OpenMP, TBB) as tpo backends: memory is host memory, rows are
// independent work items of thrust::for_each, and each row runs the shared row routines of
// thrust/row_pass.hpp. A system is available when its headers can be used by this translation
// unit: OpenMP needs the compiler's OpenMP mode, TBB needs to be Thrust's host or device system
// (or TPO_THRUST_TBB defined, for programs that link TBB and pick the system explicitly).

#include <thrust/copy.h>
#include <thrust/execution_policy.h>
#include <thrust/detail/config.h>
#include <thrust/for_each.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/system/cpp/execution_policy.h>
#include <thrust/system/cpp/vector.h>

#include <type_traits>
#include <vector>

#include "tpo/backend/thrust/row_pass.hpp"

#if defined(_OPENMP) || THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_OMP || THRUST_HOST_SYSTEM == THRUST_HOST_SYSTEM_OMP
#  define TPO_THRUST_HAS_OMP 1
#  include <thrust/system/omp/execution_policy.h>
#  include <thrust/system/omp/vector.h>
#endif
#if defined(TPO_THRUST_TBB) || THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_TBB || THRUST_HOST_SYSTEM == THRUST_HOST_SYSTEM_TBB
#  define TPO_THRUST_HAS_TBB 1
#  include <thrust/system/tbb/execution_policy.h>
#  include <thrust/system/tbb/vector.h>
#endif

TPO_BEGIN_NAMESPACE
namespace backend::thrust_detail {

/// What a backend object of a system carries: nothing on the host systems, the stream on CUDA.
struct no_context {};

/// The primitives every host system shares, given the system's vector and execution policy.
template <template <class> class Vector, class Policy>
struct host_system {
    using context = no_context;

    template <class T>
    using vector = Vector<T>;

    template <class T>
    static vector<T> allocate(no_context, index_t n) {
        return vector<T>(static_cast<std::size_t>(n));  // value-initialised, as the concept asks
    }

    template <class T>
    static std::vector<T> to_host(no_context, const vector<T>& b) {
        std::vector<T> h(b.size());
        ::thrust::copy(b.begin(), b.end(), h.begin());
        return h;
    }

    static constexpr index_t fused_chunk_values = index_t{1} << 24;

    template <class T>
    static vector<T> upload(no_context, const std::vector<T>& host) {
        return vector<T>(host.begin(), host.end());
    }

    template <class X, class Y, class Acc>
    static void matmul(no_context, bool trans_a, bool trans_b, index_t m, index_t n, index_t k, const X* a,
                       index_t lda, const Y* b, index_t ldb, Acc* c, index_t ldc, Acc beta) {
        run(m * n, matmul_op<X, Y, Acc>{trans_a, trans_b, n, k, a, lda, b, ldb, c, ldc, beta},
            m * n * k >= parallel_elements);
    }

    /// Work below these sizes runs on the calling thread: waking a thread team (or spawning TBB
    /// tasks) for a pass over the P pairs, or over a few short rows, costs more than the pass.
    static constexpr index_t parallel_items = 256;
    static constexpr index_t parallel_elements = index_t{1} << 14;

    template <class F>
    static void for_each(no_context, index_t n, const F& f) {
        run(n, f, n >= parallel_items);
    }

    template <class F>
    static void run(index_t n, const F& f, bool parallel) {
        if (n <= 0) return;
        const ::thrust::counting_iterator<index_t> first(0), last(n);
        if (parallel)
            ::thrust::for_each(Policy{}, first, last, f);
        else
            ::thrust::for_each(::thrust::seq, first, last, f);
    }

    template <class T, class I>
    static void row_statistics(no_context, logits_view<const T> z, labels_view<const I> labels,
                               row_alignment align, row_reduction reduction, row_stats* out) {
        const auto plan = rows::scored_rows<I>::of(labels, align, z.vocab);
        const index_t count = plan.count();
        const index_t read_per_row = reads_row(reduction) ? z.vocab : 1;
        run(count, row_statistics_op<T, I>{z, plan, reduction, out},
            count > 1 && count * read_per_row >= parallel_elements);
    }

    template <class T, class G>
    static void row_gradient(no_context, logits_view<const T> z, const row_coefficients* coefficients,
                             index_t scored, logits_view<G> grad) {
        const rows::gradient_rows plan{z.sequences, z.length, scored, coefficients};
        const index_t count = plan.count();
        run(count, row_gradient_op<T, G>{z, plan, grad}, count > 1 && count * z.vocab >= parallel_elements);
    }
};

template <class Policy>
using policy_type = std::remove_cv_t<Policy>;

template <class Tag>
struct system;  // specialised for each system this translation unit can use

template <class T>
using cpp_vector = ::thrust::cpp::vector<T>;
template <>
struct system<::thrust::cpp::tag> : host_system<cpp_vector, policy_type<decltype(::thrust::cpp::par)>> {};

#if defined(TPO_THRUST_HAS_OMP)
template <class T>
using omp_vector = ::thrust::omp::vector<T>;
template <>
struct system<::thrust::omp::tag> : host_system<omp_vector, policy_type<decltype(::thrust::omp::par)>> {};
#endif

#if defined(TPO_THRUST_HAS_TBB)
template <class T>
using tbb_vector = ::thrust::tbb::vector<T>;
template <>
struct system<::thrust::tbb::tag> : host_system<tbb_vector, policy_type<decltype(::thrust::tbb::par)>> {};
#endif

}  // namespace backend::thrust_detail
TPO_END_NAMESPACE
