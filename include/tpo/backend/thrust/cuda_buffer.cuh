#pragma once
// Scratch for the CUDA system: device memory that is allocated, value-initialised and freed in
// the order of the backend's stream (cudaMallocAsync / a Thrust fill / cudaFreeAsync), or through
// the caller's allocator (cuda_allocator: a framework's caching allocator) when it gives one.
//
// Why not a thrust::cuda::vector: its constructor fills on the default stream and waits, and its
// destructor's cudaFree waits for the whole device, so every allocation of the objective (a few per
// forward and backward) would be a host round-trip. Stream-ordered memory comes from the
// driver's pool and never waits, and a buffer freed while a kernel on the stream still reads it is
// only released after that kernel.

#include <cuda_runtime.h>

#include <thrust/system/cuda/execution_policy.h>
#include <thrust/system_error.h>
#include <thrust/uninitialized_fill.h>

#include <cstddef>
#include <exception>
#include <utility>

#include "tpo/core/error.hpp"
#include "tpo/core/views.hpp"

TPO_BEGIN_NAMESPACE
namespace backend {

/// Device memory for the CUDA system's scratch from the caller, e.g. a framework's caching
/// allocator, so that the backend's few O(S·L) buffers come from the same pool as the
/// framework's tensors. Both functions are called on the host. `deallocate` may be called while
/// work queued on `stream` still uses the memory (as cudaFreeAsync may): the allocator must hand
/// it out again only to work ordered after that, as a caching allocator that records the stream of
/// each block does. Neither may wait for the device if the backend is to stay capturable in a
/// CUDA graph.
struct cuda_allocator {
    void* (*allocate)(void* state, std::size_t bytes, cudaStream_t stream) = nullptr;
    void (*deallocate)(void* state, void* pointer, std::size_t bytes, cudaStream_t stream) = nullptr;
    void* state = nullptr;

    bool given() const { return allocate != nullptr && deallocate != nullptr; }
};

/// Where the CUDA system works: every call is ordered on `stream`; scratch comes from `allocator`
/// when it is given, else from the driver's stream-ordered pool (cudaMallocAsync).
struct cuda_context {
    cudaStream_t stream = nullptr;
    cuda_allocator allocator{};

    cuda_context() = default;
    cuda_context(cudaStream_t s, cuda_allocator a = {}) : stream(s), allocator(a) {}  // NOLINT: a stream is a context
};

}  // namespace backend

namespace backend::thrust_detail::cuda {

inline void check(cudaError_t status, const char* what) {
    if (status != cudaSuccess)
        throw error(detail::concat("thrust backend (CUDA): ", what, ": ", cudaGetErrorName(status), " (",
                                   cudaGetErrorString(status), ")"));
}

/// Asks device_buffer for memory that its first work overwrites entirely, so not worth filling.
struct uninitialized_t {};
inline constexpr uninitialized_t uninitialized{};

template <class T>
class device_buffer {
public:
    device_buffer() = default;

    /// n value-initialised T, ready for any later work on the context's stream.
    device_buffer(index_t n, const cuda_context& context) : device_buffer(n, context, uninitialized) {
        if (!data_) return;
        try {
            ::thrust::uninitialized_fill_n(::thrust::cuda::par_nosync.on(context_.stream), data_, n, T{});
        } catch (const ::thrust::system_error& e) {
            release();
            throw error(detail::concat("thrust backend (CUDA): initialisation of scratch memory: ", e.what()));
        }
    }

    /// n T whose values are unspecified until written.
    device_buffer(index_t n, const cuda_context& context, uninitialized_t) : context_(context) {
        if (n <= 0) return;
        const std::size_t bytes = static_cast<std::size_t>(n) * sizeof(T);
        void* p = nullptr;
        if (context_.allocator.given()) {
            try {
                p = context_.allocator.allocate(context_.allocator.state, bytes, context_.stream);
            } catch (const std::exception& e) {
                throw error(detail::concat("thrust backend (CUDA): the caller's allocator failed to give ", bytes,
                                           " bytes of scratch memory: ", e.what()));
            }
            detail::require<error>(p != nullptr, "thrust backend (CUDA): the caller's allocator gave no memory for ",
                           bytes, " bytes of scratch");
        } else {
            check(cudaMallocAsync(&p, bytes, context_.stream), "allocation of scratch memory");
        }
        data_ = static_cast<T*>(p);
        size_ = static_cast<std::size_t>(n);
    }

    device_buffer(device_buffer&& other) noexcept
        : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)), context_(other.context_) {}

    device_buffer& operator=(device_buffer&& other) noexcept {
        if (this != &other) {
            release();
            data_ = std::exchange(other.data_, nullptr);
            size_ = std::exchange(other.size_, 0);
            context_ = other.context_;
        }
        return *this;
    }

    device_buffer(const device_buffer&) = delete;
    device_buffer& operator=(const device_buffer&) = delete;

    ~device_buffer() { release(); }

    T* data() const { return data_; }
    std::size_t size() const { return size_; }
    bool empty() const { return size_ == 0; }

private:
    void release() noexcept {
        // A failure here can only be a broken context, which the next checked call reports.
        if (data_) {
            if (context_.allocator.given())
                context_.allocator.deallocate(context_.allocator.state, data_, size_ * sizeof(T), context_.stream);
            else
                (void)cudaFreeAsync(data_, context_.stream);
        }
        data_ = nullptr;
        size_ = 0;
    }

    T* data_ = nullptr;
    std::size_t size_ = 0;
    cuda_context context_{};
};

}  // namespace backend::thrust_detail::cuda
TPO_END_NAMESPACE
