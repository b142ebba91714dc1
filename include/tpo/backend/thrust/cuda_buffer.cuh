#pragma once
// Scratch for the CUDA system: device memory that is allocated, value-initialised and freed in
// the order of the backend's stream (cudaMallocAsync / a Thrust fill / cudaFreeAsync).
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
#include <utility>

#include "tpo/core/error.hpp"
#include "tpo/core/views.hpp"

TPO_BEGIN_NAMESPACE
namespace backend::thrust_detail::cuda {

inline void check(cudaError_t status, const char* what) {
    if (status != cudaSuccess)
        throw error(detail::concat("thrust backend (CUDA): ", what, ": ", cudaGetErrorName(status), " (",
                                   cudaGetErrorString(status), ")"));
}

template <class T>
class device_buffer {
public:
    device_buffer() = default;

    /// n value-initialised T, ready for any later work on `stream`.
    device_buffer(index_t n, cudaStream_t stream) : stream_(stream) {
        if (n <= 0) return;
        void* p = nullptr;
        check(cudaMallocAsync(&p, static_cast<std::size_t>(n) * sizeof(T), stream), "allocation of scratch memory");
        data_ = static_cast<T*>(p);
        size_ = static_cast<std::size_t>(n);
        try {
            ::thrust::uninitialized_fill_n(::thrust::cuda::par_nosync.on(stream), data_, n, T{});
        } catch (const ::thrust::system_error& e) {
            release();
            throw error(detail::concat("thrust backend (CUDA): initialisation of scratch memory: ", e.what()));
        }
    }

    device_buffer(device_buffer&& other) noexcept
        : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)), stream_(other.stream_) {}

    device_buffer& operator=(device_buffer&& other) noexcept {
        if (this != &other) {
            release();
            data_ = std::exchange(other.data_, nullptr);
            size_ = std::exchange(other.size_, 0);
            stream_ = other.stream_;
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
        if (data_) (void)cudaFreeAsync(data_, stream_);
        data_ = nullptr;
        size_ = 0;
    }

    T* data_ = nullptr;
    std::size_t size_ = 0;
    cudaStream_t stream_ = nullptr;
};

}  // namespace backend::thrust_detail::cuda
TPO_END_NAMESPACE
