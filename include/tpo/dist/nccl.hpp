#pragma once
// The communicator on NCCL (compile with nvcc, link libnccl): the row exchange's collectives run on
// device buffers, enqueued on the caller's CUDA stream (the stream of the Thrust CUDA backend the
// sharded objective runs on), so no row statistic goes through the host and nothing waits for
// them. The agreement's few host values go through a small device buffer, and wait. The caller
// creates the ncclComm_t (one GPU per rank: NCCL refuses two ranks of one communicator on one
// device) and keeps it alive.

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdint>
#include <string>

#include "tpo/core/error.hpp"
#include "tpo/core/views.hpp"
#include "tpo/dist/communicator.hpp"

TPO_BEGIN_NAMESPACE
namespace dist {

class nccl_communicator {
public:
    nccl_communicator(ncclComm_t comm, cudaStream_t stream) : comm_(comm), stream_(stream) {
        check(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank");
        check(ncclCommCount(comm_, &size_), "ncclCommCount");
    }
    nccl_communicator(const nccl_communicator&) = delete;
    nccl_communicator& operator=(const nccl_communicator&) = delete;
    ~nccl_communicator() {
        if (staging_) cudaFree(staging_);
    }

    int rank() const { return rank_; }
    int size() const { return size_; }
    ncclComm_t native() const { return comm_; }
    cudaStream_t stream() const { return stream_; }

    /// Device buffers, on the stream.
    void all_reduce_max(double* data, index_t n) { reduce(data, n, ncclDouble, ncclMax); }
    void all_reduce_sum(double* data, index_t n) { reduce(data, n, ncclDouble, ncclSum); }
    void all_reduce_sum(float* data, index_t n) { reduce(data, n, ncclFloat, ncclSum); }

    /// A host buffer, through the device; returns when the result is on the host.
    void host_all_reduce_max(double* data, index_t n) {
        if (n <= 0) return;
        auto* device = static_cast<double*>(staging(static_cast<std::size_t>(n) * sizeof(double)));
        cuda(cudaMemcpyAsync(device, data, static_cast<std::size_t>(n) * sizeof(double), cudaMemcpyHostToDevice, stream_),
             "cudaMemcpyAsync");
        reduce(device, n, ncclDouble, ncclMax);
        cuda(cudaMemcpyAsync(data, device, static_cast<std::size_t>(n) * sizeof(double), cudaMemcpyDeviceToHost, stream_),
             "cudaMemcpyAsync");
        cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    }

    void host_broadcast(std::string& s, int root) {
        std::int64_t length = static_cast<std::int64_t>(s.size());
        auto* device = static_cast<std::int64_t*>(staging(sizeof(std::int64_t)));
        cuda(cudaMemcpyAsync(device, &length, sizeof length, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync");
        check(ncclBroadcast(device, device, 1, ncclInt64, root, comm_, stream_), "ncclBroadcast");
        cuda(cudaMemcpyAsync(&length, device, sizeof length, cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync");
        cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
        s.resize(static_cast<std::size_t>(length));
        if (length == 0) return;
        auto* bytes = static_cast<char*>(staging(static_cast<std::size_t>(length)));
        cuda(cudaMemcpyAsync(bytes, s.data(), s.size(), cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync");
        check(ncclBroadcast(bytes, bytes, s.size(), ncclChar, root, comm_, stream_), "ncclBroadcast");
        cuda(cudaMemcpyAsync(s.data(), bytes, s.size(), cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync");
        cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    }

private:
    void reduce(void* data, index_t n, ncclDataType_t type, ncclRedOp_t op) {
        if (n <= 0) return;
        check(ncclAllReduce(data, data, static_cast<std::size_t>(n), type, op, comm_, stream_), "ncclAllReduce");
    }

    void* staging(std::size_t bytes) {
        if (bytes > staging_bytes_) {
            cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
            if (staging_) cudaFree(staging_);
            staging_ = nullptr;
            cuda(cudaMalloc(&staging_, bytes), "cudaMalloc");
            staging_bytes_ = bytes;
        }
        return staging_;
    }

    static void check(ncclResult_t r, const char* what) {
        if (r != ncclSuccess) throw error(detail::concat("NCCL: ", what, " failed: ", ncclGetErrorString(r)));
    }
    static void cuda(cudaError_t r, const char* what) {
        if (r != cudaSuccess) throw error(detail::concat("CUDA: ", what, " failed: ", cudaGetErrorString(r)));
    }

    ncclComm_t comm_;
    cudaStream_t stream_;
    int rank_ = 0, size_ = 1;
    void* staging_ = nullptr;
    std::size_t staging_bytes_ = 0;
};

static_assert(communicator<nccl_communicator>);

}  // namespace dist
TPO_END_NAMESPACE
