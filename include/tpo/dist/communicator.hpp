#pragma once
// The communicator concept: the few collectives a vocabulary-sharded objective needs
// (dist/sharded.hpp), over the distributed engine a trainer already runs (MPI: dist/mpi.hpp,
// NCCL: dist/nccl.hpp), and the agreement that turns an error seen by some ranks into the same
// error on every rank.
//
//   rank(), size()                 this process's rank in [0, size)
//   all_reduce_max(double*, n)     element-wise, in place, over buffers in the memory of the backend
//   all_reduce_sum(double*, n)     the communicator is paired with (host memory for MPI, device
//   all_reduce_sum(float*, n)      memory for NCCL); every rank gets the same result
//   host_all_reduce_max(double*, n)  the same over a small host buffer (agreement, shapes)
//   host_broadcast(std::string&, root)  root's string to every rank
//
// Every rank must make the same calls in the same order with the same sizes: the sharded objective
// guarantees it by agreeing on shapes and on errors (agree() below) before any collective whose
// size or presence depends on them.

#include <algorithm>
#include <concepts>
#include <exception>
#include <limits>
#include <string>
#include <vector>

#include "tpo/core/config.hpp"
#include "tpo/core/error.hpp"
#include "tpo/core/views.hpp"

TPO_BEGIN_NAMESPACE
namespace dist {

template <class C>
concept communicator = requires(C& c, const C& cc, double* d, float* f, index_t n, std::string& s, int root) {
    { cc.rank() } -> std::convertible_to<int>;
    { cc.size() } -> std::convertible_to<int>;
    c.all_reduce_max(d, n);
    c.all_reduce_sum(d, n);
    c.all_reduce_sum(f, n);
    c.host_all_reduce_max(d, n);
    c.host_broadcast(s, root);
};

/// One process: every collective is the identity. What a sharded objective runs on when the
/// vocabulary is not split (and what its tests compare the one-rank path through).
class single_process {
public:
    int rank() const { return 0; }
    int size() const { return 1; }
    void all_reduce_max(double*, index_t) {}
    void all_reduce_sum(double*, index_t) {}
    void all_reduce_sum(float*, index_t) {}
    void host_all_reduce_max(double*, index_t) {}
    void host_broadcast(std::string&, int) {}
};

static_assert(communicator<single_process>);

/// What every rank learns from agree(): the values each rank gave (gathered[k] holds rank k's), and
/// the range of the values every rank must share.
struct agreement {
    std::vector<std::vector<double>> gathered;  // [rank][i]
    std::vector<double> low, high;              // per shared value: min and max over the ranks
    bool shared_agree(std::size_t i) const { return low[i] == high[i]; }
};

namespace agreement_detail {

enum class error_kind : char { error = 'e', shape = 's', value = 'v', overflow = 'o' };

inline std::string encode(std::exception_ptr failure) {
    try {
        std::rethrow_exception(failure);
    } catch (const overflow_error& e) {
        return std::string(1, static_cast<char>(error_kind::overflow)) + e.what();
    } catch (const shape_error& e) {
        return std::string(1, static_cast<char>(error_kind::shape)) + e.what();
    } catch (const value_error& e) {
        return std::string(1, static_cast<char>(error_kind::value)) + e.what();
    } catch (const std::exception& e) {
        return std::string(1, static_cast<char>(error_kind::error)) + e.what();
    } catch (...) {
        return std::string(1, static_cast<char>(error_kind::error)) + "unknown error";
    }
}

[[noreturn]] inline void raise(const std::string& encoded) {
    const std::string message = encoded.empty() ? std::string("unknown error") : encoded.substr(1);
    switch (encoded.empty() ? 'e' : encoded[0]) {
    case static_cast<char>(error_kind::overflow): throw overflow_error(message);
    case static_cast<char>(error_kind::shape): throw shape_error(message);
    case static_cast<char>(error_kind::value): throw value_error(message);
    default: throw error(message);
    }
}

}  // namespace agreement_detail

/// The any-error agreement: every rank calls it at the same point with its own failure (null when
/// it has none). When any rank failed, every rank throws the error of the lowest failing rank (same
/// type, same message); otherwise every rank gets the values of all ranks (`gathered`, each rank's
/// vector of one length on every rank) and the range of `shared` (values that should be equal on
/// every rank; the caller decides what a disagreement means). One host all-reduce, plus a
/// broadcast of the message when a rank failed.
template <communicator C>
agreement agree(C& comm, std::exception_ptr failure, const std::vector<double>& shared = {},
                const std::vector<double>& gathered = {}) {
    const int ranks = comm.size(), rank = comm.rank();
    const std::size_t ns = shared.size(), ng = gathered.size();
    // [failure slot | max of shared | max of −shared | rank k's gathered values at k·ng]; −∞ is
    // the neutral value of max, so a rank leaves the others' slots at −∞.
    std::vector<double> buffer(1 + 2 * ns + static_cast<std::size_t>(ranks) * ng,
                               -std::numeric_limits<double>::infinity());
    buffer[0] = failure ? static_cast<double>(ranks - rank) : 0.0;
    for (std::size_t i = 0; i < ns; ++i) {
        buffer[1 + i] = shared[i];
        buffer[1 + ns + i] = -shared[i];
    }
    for (std::size_t i = 0; i < ng; ++i) buffer[1 + 2 * ns + static_cast<std::size_t>(rank) * ng + i] = gathered[i];
    comm.host_all_reduce_max(buffer.data(), static_cast<index_t>(buffer.size()));
    if (buffer[0] > 0) {
        const int root = ranks - static_cast<int>(buffer[0]);
        std::string message = rank == root ? agreement_detail::encode(failure) : std::string();
        comm.host_broadcast(message, root);
        agreement_detail::raise(message);
    }
    agreement a;
    for (std::size_t i = 0; i < ns; ++i) {
        a.high.push_back(buffer[1 + i]);
        a.low.push_back(-buffer[1 + ns + i]);
    }
    for (int k = 0; k < ranks; ++k)
        a.gathered.emplace_back(buffer.begin() + static_cast<std::ptrdiff_t>(1 + 2 * ns + k * ng),
                                buffer.begin() + static_cast<std::ptrdiff_t>(1 + 2 * ns + (k + 1) * ng));
    return a;
}

/// Runs `f` and agrees on its failure: every rank returns, or every rank throws the same error.
template <communicator C, class F>
void agree_on(C& comm, F&& f) {
    std::exception_ptr failure;
    try {
        f();
    } catch (...) {
        failure = std::current_exception();
    }
    agree(comm, failure);
}

}  // namespace dist
TPO_END_NAMESPACE
