#pragma once
// Lanes: a group of threads that work on one item together. The O(S·L) passes walk a sequence's
// rows one after another; on a host core that is the fastest order, on a GPU one thread per pair
// leaves the device idle for the length of the answer. A pass written against `Lanes` runs both
// ways from one definition:
//
//   lanes.group()      the item this group works on, in [0, n)
//   lanes.lane()       this thread's index in the group, in [0, lanes.size())
//   lanes.size()       threads in the group (the same for every group of a launch)
//   lanes.reduce(v, op)            op folded over the lanes' v in lane order (a fixed tree, so the
//                                  result is deterministic for a given size); every lane gets it
//   lanes.exclusive_count(f, all)  how many lanes before this one have f set; `all` gets the count
//                                  over the whole group
//
// Every lane of a group must reach every reduce and exclusive_count (no divergent early return
// around them); values passed to reduce are trivially copyable and at most max_lane_value bytes.
//
// A backend may provide for_each_group(n, f), calling f(lanes) for each of n groups; every other
// backend runs f through its for_each with serial_lanes, one lane per group, where the passes are
// the plain loops they read as.

#include <concepts>
#include <cstddef>
#include <utility>

#include "tpo/core/config.hpp"
#include "tpo/core/views.hpp"

TPO_BEGIN_NAMESPACE
namespace backend {

/// The largest value a lane reduction carries (bytes); a backend's shared scratch is sized by it.
inline constexpr std::size_t max_lane_value = 64;

/// One lane per group: the reductions are the identity.
struct serial_lanes {
    index_t item = 0;

    TPO_HOST_DEVICE index_t group() const { return item; }
    TPO_HOST_DEVICE index_t lane() const { return 0; }
    TPO_HOST_DEVICE index_t size() const { return 1; }
    template <class T, class Op>
    TPO_HOST_DEVICE T reduce(const T& value, Op) const {
        return value;
    }
    TPO_HOST_DEVICE index_t exclusive_count(bool flag, index_t& all) const {
        all = flag ? 1 : 0;
        return 0;
    }
};

/// a + b, for lanes.reduce.
struct plus {
    template <class T>
    TPO_HOST_DEVICE T operator()(const T& a, const T& b) const {
        return a + b;
    }
};

}  // namespace backend

namespace detail {
/// f(backend::serial_lanes{i}) as a for_each functor.
template <class F>
struct serial_group_call {
    F f;
    TPO_HOST_DEVICE void operator()(index_t i) const { f(backend::serial_lanes{i}); }
};
}  // namespace detail

namespace backend {

template <class B, class F>
concept grouped_for_each = requires(B& b, index_t n, const F& f) { b.for_each_group(n, f); };

/// f(lanes) for each of n groups: the backend's own groups when it has them, one lane each
/// through for_each otherwise.
template <class B, class F>
void for_each_group(B& backend, index_t n, const F& f) {
    if constexpr (grouped_for_each<B, F>)
        backend.for_each_group(n, f);
    else
        backend.for_each(n, ::tpo::detail::serial_group_call<F>{f});
}

}  // namespace backend
TPO_END_NAMESPACE
