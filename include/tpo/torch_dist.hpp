#pragma once
// The communicator (tpo::dist::communicator) over a torch.distributed / c10d process group, for a
// libtorch trainer whose tensor-parallel or data-parallel group is a c10d::ProcessGroup (Gloo,
// NCCL, MPI) rather than a raw MPI_Comm or ncclComm_t:
//
//   #include <tpo/torch_dist.hpp>       // CMake: tpo::torch (find_package(tpo COMPONENTS torch))
//   #include <tpo/dist/sharded.hpp>
//   tpo::libtorch::process_group_communicator comm(group);              // Gloo: host buffers
//   tpo::libtorch::process_group_communicator comm(group, torch::kCUDA); // NCCL: device buffers
//   tpo::dist::evaluate(backend, comm, options, shard, batch, &grads);
//
// Each collective is one ProcessGroup call on a tensor that wraps the caller's buffer
// (torch::from_blob, no copy), followed by Work::wait():
//
//   all_reduce_max / all_reduce_sum   allreduce with ReduceOp::MAX / SUM, in place, on buffers of
//                                     the device type given at construction (kCPU for a Gloo or
//                                     MPI group; kCUDA for NCCL, where the buffer's device is
//                                     found from the pointer and must be this rank's device)
//   host_all_reduce_max               the same on a host buffer; with kCUDA buffers it is staged
//                                     through the current CUDA device (NCCL reduces device memory
//                                     only) and copied back before returning
//   host_broadcast                    the length as one int64, then the bytes (uint8), from root
//
// For NCCL, Work::wait() makes the current CUDA stream wait for the collective and does not block
// the host: the tpo backend must run on the current stream (as tpo::libtorch's own calls do), so
// its kernels before and after are ordered with the collectives. A failure of c10d (a rank gone,
// a timeout of the group, a tensor the backend refuses) throws tpo::error naming the backend, the
// rank and the collective, with c10d's message. The group stays the caller's (shared ownership).

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/torch.h>

#include <cstdint>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "tpo/core/error.hpp"
#include "tpo/core/views.hpp"
#include "tpo/dist/communicator.hpp"

TPO_BEGIN_NAMESPACE
namespace libtorch {

/// tpo::dist::communicator over a c10d::ProcessGroup; every rank of the group constructs one with
/// the same `buffers` device type.
class process_group_communicator {
public:
    explicit process_group_communicator(c10::intrusive_ptr<c10d::ProcessGroup> group,
                                        c10::DeviceType buffers = c10::kCPU)
        : group_(std::move(group)), buffers_(buffers) {
        detail::require<error>(group_.defined(), "process_group_communicator: the process group is null");
        detail::require<error>(buffers_ == c10::kCPU || buffers_ == c10::kCUDA,
                               "process_group_communicator: buffers on ", c10::DeviceTypeName(buffers_),
                               ", expected CPU (Gloo, MPI) or CUDA (NCCL)");
        detail::require<error>(buffers_ != c10::kCUDA || torch::cuda::is_available(),
                               "process_group_communicator: buffers on CUDA, but this libtorch sees no CUDA device");
        rank_ = group_->getRank();
        size_ = group_->getSize();
        try {
            backend_ = group_->getBackendName();
        } catch (const std::exception&) {
            backend_ = "c10d";  // a process group that does not name its backend
        }
    }

    int rank() const { return rank_; }
    int size() const { return size_; }
    const c10::intrusive_ptr<c10d::ProcessGroup>& native() const { return group_; }
    c10::DeviceType buffers() const { return buffers_; }

    void all_reduce_max(double* data, index_t n) { reduce_in_place(data, n, c10d::ReduceOp::MAX, "allreduce max"); }
    void all_reduce_sum(double* data, index_t n) { reduce_in_place(data, n, c10d::ReduceOp::SUM, "allreduce sum"); }
    void all_reduce_sum(float* data, index_t n) { reduce_in_place(data, n, c10d::ReduceOp::SUM, "allreduce sum"); }

    void host_all_reduce_max(double* data, index_t n) {
        if (n <= 0) return;
        at::Tensor host = wrap(data, n, c10::kCPU);
        if (buffers_ == c10::kCPU) return all_reduce(host, c10d::ReduceOp::MAX, "allreduce max of host values");
        at::Tensor device = staged(host);
        all_reduce(device, c10d::ReduceOp::MAX, "allreduce max of host values");
        host.copy_(device);
    }

    void host_broadcast(std::string& s, int root) {
        detail::require<error>(root >= 0 && root < size_, "process_group_communicator: broadcast from rank ", root,
                               ", expected 0 <= root < ", size_);
        std::int64_t length = static_cast<std::int64_t>(s.size());
        at::Tensor host_length = wrap(&length, 1, c10::kCPU);
        broadcast(host_length, root, "broadcast of a message's length");
        s.resize(static_cast<std::size_t>(length));
        if (length == 0) return;
        broadcast(wrap(reinterpret_cast<std::uint8_t*>(s.data()), length, c10::kCPU), root, "broadcast of a message");
    }

private:
    template <class T>
    static at::Tensor wrap(T* data, index_t n, c10::DeviceType device) {
        return torch::from_blob(data, {static_cast<std::int64_t>(n)},
                                torch::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value).device(device));
    }

    /// Buffers of the backend's memory; every rank passes the same n, so n ≤ 0 skips on all of them.
    template <class T>
    void reduce_in_place(T* data, index_t n, c10d::ReduceOp::RedOpType op, const char* what) {
        if (n > 0) all_reduce(wrap(data, n, buffers_), op, what);
    }

    /// A host tensor's copy on the current CUDA device, for a backend that reduces device memory only.
    at::Tensor staged(const at::Tensor& host) const { return host.to(c10::Device(buffers_)); }

    void all_reduce(at::Tensor t, c10d::ReduceOp::RedOpType op, const char* what) {
        std::vector<at::Tensor> tensors{std::move(t)};
        c10d::AllreduceOptions options;
        options.reduceOp = op;
        run(what, [&] { return group_->allreduce(tensors, options); });
    }

    /// A host tensor from `root` to every rank (staged through the device for a device backend).
    void broadcast(at::Tensor host, int root, const char* what) {
        c10d::BroadcastOptions options;
        options.rootRank = root;
        std::vector<at::Tensor> tensors{buffers_ == c10::kCPU ? host : staged(host)};
        run(what, [&] { return group_->broadcast(tensors, options); });
        if (buffers_ != c10::kCPU) host.copy_(tensors[0]);
    }

    /// Starts a collective and waits for it; c10d's failures become tpo::error.
    template <class Start>
    void run(const char* what, Start&& start) {
        try {
            auto work = start();
            work->wait();
        } catch (const c10::Error& e) {
            fail(what, e.what_without_backtrace());
        } catch (const std::exception& e) {
            fail(what, e.what());
        }
    }

    [[noreturn]] void fail(const char* what, const char* message) const {
        throw error(detail::concat("c10d process group (", backend_, ", rank ", rank_, " of ", size_, "): ", what,
                                   " failed: ", message));
    }

    c10::intrusive_ptr<c10d::ProcessGroup> group_;
    c10::DeviceType buffers_;
    int rank_ = 0, size_ = 1;
    std::string backend_;
};

static_assert(dist::communicator<process_group_communicator>);

}  // namespace libtorch
TPO_END_NAMESPACE
