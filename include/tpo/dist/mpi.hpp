#pragma once
// The communicator on MPI (any MPI-3 implementation; tested with Debian's OpenMPI): collectives on
// host buffers over the caller's MPI_Comm, which the caller initialises and keeps alive. MPI's own
// error handler stays in charge of failures of MPI itself (by default it aborts the job).

#include <mpi.h>

#include <climits>
#include <string>

#include "tpo/core/error.hpp"
#include "tpo/core/views.hpp"
#include "tpo/dist/communicator.hpp"

TPO_BEGIN_NAMESPACE
namespace dist {

class mpi_communicator {
public:
    explicit mpi_communicator(MPI_Comm comm = MPI_COMM_WORLD) : comm_(comm) {
        MPI_Comm_rank(comm_, &rank_);
        MPI_Comm_size(comm_, &size_);
    }

    int rank() const { return rank_; }
    int size() const { return size_; }
    MPI_Comm native() const { return comm_; }

    void all_reduce_max(double* data, index_t n) { reduce(data, n, MPI_DOUBLE, MPI_MAX); }
    void all_reduce_sum(double* data, index_t n) { reduce(data, n, MPI_DOUBLE, MPI_SUM); }
    void all_reduce_sum(float* data, index_t n) { reduce(data, n, MPI_FLOAT, MPI_SUM); }
    void host_all_reduce_max(double* data, index_t n) { reduce(data, n, MPI_DOUBLE, MPI_MAX); }

    void host_broadcast(std::string& s, int root) {
        long long length = static_cast<long long>(s.size());
        MPI_Bcast(&length, 1, MPI_LONG_LONG, root, comm_);
        s.resize(static_cast<std::size_t>(length));
        if (length > 0) MPI_Bcast(s.data(), static_cast<int>(length), MPI_CHAR, root, comm_);
    }

private:
    /// In place, in pieces of at most INT_MAX elements (MPI counts are int).
    template <class T>
    void reduce(T* data, index_t n, MPI_Datatype type, MPI_Op op) {
        for (index_t first = 0; first < n; first += INT_MAX) {
            const index_t m = n - first < INT_MAX ? n - first : INT_MAX;
            MPI_Allreduce(MPI_IN_PLACE, data + first, static_cast<int>(m), type, op, comm_);
        }
    }

    MPI_Comm comm_;
    int rank_ = 0, size_ = 1;
};

static_assert(communicator<mpi_communicator>);

}  // namespace dist
TPO_END_NAMESPACE
