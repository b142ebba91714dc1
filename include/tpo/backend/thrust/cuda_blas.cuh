#pragma once
// The CUDA system's matrix product for the fused lm_head path: cuBLAS (nvcc only; link
// CUDA::cublas).
//
// Row-major C (m×n) = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, so cuBLAS gets B first and
// the transpositions as they are. Both operands in one element type go to cublasGemmEx as they are
// (16-bit inputs with float accumulation, the tensor-core path); a float operand next to a 16-bit
// one (the chunk of ∂L/∂u against a 16-bit head or 16-bit hidden states) is rounded to that 16-bit
// type first, in a scratch of its size, as a 16-bit trainer's own backward does.

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <thrust/for_each.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/system/cuda/execution_policy.h>

#include <map>
#include <memory>
#include <type_traits>

#include "tpo/backend/thrust/cuda_buffer.cuh"
#include "tpo/core/element.hpp"
#include "tpo/core/error.hpp"

TPO_BEGIN_NAMESPACE
namespace backend::thrust_detail::cuda {

inline void check_blas(cublasStatus_t status, const char* what) {
    if (status != CUBLAS_STATUS_SUCCESS)
        throw error(detail::concat("thrust backend (CUDA): ", what, ": cuBLAS status ", static_cast<int>(status)));
}

/// One cuBLAS handle per device and host thread, made on first use and kept for the thread's life.
inline cublasHandle_t blas_handle() {
    struct handles {
        std::map<int, cublasHandle_t> by_device;
        ~handles() {
            for (auto& [device, h] : by_device) (void)cublasDestroy(h);
        }
    };
    thread_local handles cache;
    int device = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    auto it = cache.by_device.find(device);
    if (it == cache.by_device.end()) {
        cublasHandle_t h = nullptr;
        check_blas(cublasCreate(&h), "cublasCreate");
        it = cache.by_device.emplace(device, h).first;
    }
    return it->second;
}

template <class T>
constexpr cudaDataType_t blas_type() {
    if constexpr (std::is_same_v<T, double>) return CUDA_R_64F;
    else if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
    else if constexpr (std::is_same_v<T, bfloat16>) return CUDA_R_16BF;
    else {
        static_assert(std::is_same_v<T, float16>, "cuBLAS products take double, float, bfloat16 or float16");
        return CUDA_R_16F;
    }
}

template <class From, class To>
struct narrow_copy {
    const From* in;
    To* out;
    __device__ void operator()(index_t e) const { out[e] = narrow<To>(in[e]); }
};

/// Row-major C (m×n) = op(A)·op(B) + beta·C on `stream`, operands in one element type T.
template <class T, class Acc>
void gemm(cudaStream_t stream, bool trans_a, bool trans_b, index_t m, index_t n, index_t k, const T* a, index_t lda,
          const T* b, index_t ldb, Acc* c, index_t ldc, Acc beta) {
    if (m == 0 || n == 0) return;
    cublasHandle_t h = blas_handle();
    check_blas(cublasSetStream(h, stream), "cublasSetStream");
    const Acc alpha = Acc(1);
    const cublasComputeType_t compute = std::is_same_v<Acc, double> ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F;
    check_blas(cublasGemmEx(h, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                            static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &alpha, b, blas_type<T>(),
                            static_cast<int>(ldb), a, blas_type<T>(), static_cast<int>(lda), &beta, c,
                            blas_type<Acc>(), static_cast<int>(ldc), compute, CUBLAS_GEMM_DEFAULT),
               "cublasGemmEx");
}

/// Elements a row-major operand occupies: `rows` rows of stride ld.
inline index_t stored_extent(index_t rows, index_t ld) { return rows * ld; }

/// The same with operands of different types: the one in the accumulation type is narrowed first,
/// into scratch from the context's allocator.
template <class X, class Y, class Acc>
void matmul(const cuda_context& context, bool trans_a, bool trans_b, index_t m, index_t n, index_t k, const X* a,
            index_t lda, const Y* b, index_t ldb, Acc* c, index_t ldc, Acc beta) {
    const cudaStream_t stream = context.stream;
    if constexpr (std::is_same_v<X, Y>) {
        gemm<X, Acc>(stream, trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, beta);
    } else if constexpr (std::is_same_v<X, Acc>) {  // A in the accumulation type, B 16-bit
        const index_t size = stored_extent(trans_a ? k : m, lda);
        device_buffer<Y> narrowed(size, context, uninitialized);
        ::thrust::for_each(::thrust::cuda::par_nosync.on(stream), ::thrust::counting_iterator<index_t>(0),
                           ::thrust::counting_iterator<index_t>(size), narrow_copy<X, Y>{a, narrowed.data()});
        gemm<Y, Acc>(stream, trans_a, trans_b, m, n, k, narrowed.data(), lda, b, ldb, c, ldc, beta);
    } else {
        static_assert(std::is_same_v<Y, Acc>, "one operand of a mixed product is in the accumulation type");
        const index_t size = stored_extent(trans_b ? n : k, ldb);
        device_buffer<X> narrowed(size, context, uninitialized);
        ::thrust::for_each(::thrust::cuda::par_nosync.on(stream), ::thrust::counting_iterator<index_t>(0),
                           ::thrust::counting_iterator<index_t>(size), narrow_copy<Y, X>{b, narrowed.data()});
        gemm<X, Acc>(stream, trans_a, trans_b, m, n, k, a, lda, narrowed.data(), ldb, c, ldc, beta);
    }
}

}  // namespace backend::thrust_detail::cuda
TPO_END_NAMESPACE
