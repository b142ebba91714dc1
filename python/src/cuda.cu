// The CUDA engine (nvcc): the objective, the token scores and the corruptions on device memory
// through tpo::backend::thrust<thrust::cuda::tag>, ordered on the caller's stream (PyTorch's
// current stream), on the device the arrays live on. Nothing is copied to the host but the O(P)
// results.

#include <cuda_runtime.h>

#include "tpo/backend/thrust.hpp"

#include "corrupt.hpp"
#include "engine.hpp"

namespace tpo_python {
namespace {

using cuda_backend = tpo::backend::thrust<thrust::cuda::tag>;

cudaStream_t as_stream(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

/// Makes `device` current for a scope (the backend allocates its scratch on the current device).
class device_scope {
public:
    explicit device_scope(int device) {
        tpo::backend::thrust_detail::cuda::check(cudaGetDevice(&previous_), "cudaGetDevice");
        if (previous_ != device) tpo::backend::thrust_detail::cuda::check(cudaSetDevice(device), "cudaSetDevice");
    }
    ~device_scope() { cudaSetDevice(previous_); }
    device_scope(const device_scope&) = delete;
    device_scope& operator=(const device_scope&) = delete;

private:
    int previous_ = 0;
};

class cuda_engine final : public engine {
public:
    cuda_engine(const tpo::objective_options& options, std::uintptr_t stream, int device)
        : device_(device), inner_(make(options, stream, device)) {}

    tpo::objective_result forward(const batch_refs& batch) override {
        device_scope scope(device_);
        return inner_->forward(batch);
    }
    void backward(const batch_refs& batch, const gradient_refs& grads) override {
        device_scope scope(device_);
        inner_->backward(batch, grads);
    }
    tpo::token_score_table token_scores(const token_score_request& request) override {
        device_scope scope(device_);
        return inner_->token_scores(request);
    }

private:
    static std::unique_ptr<engine> make(const tpo::objective_options& options, std::uintptr_t stream, int device) {
        device_scope scope(device);
        return std::make_unique<backend_engine<cuda_backend>>(options, as_stream(stream));
    }

    int device_;
    std::unique_ptr<engine> inner_;
};

}  // namespace

bool built_with_cuda() { return true; }

std::unique_ptr<engine> make_cuda_engine(const tpo::objective_options& options, std::uintptr_t stream, int device) {
    return std::make_unique<cuda_engine>(options, stream, device);
}

void corrupt_cuda(const corruption& c, const image_ref& in, const image_ref& out, std::uintptr_t stream,
                  int device) {
    device_scope scope(device);
    cuda_backend backend(as_stream(stream));
    apply_corruption(backend, c, in, out);
    // The corruptions return nothing to the host, so nothing else would report a kernel's failure.
    tpo::backend::thrust_detail::cuda::check(cudaStreamSynchronize(as_stream(stream)), "corruption kernels");
}

}  // namespace tpo_python
