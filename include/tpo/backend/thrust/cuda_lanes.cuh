#pragma once
// Groups of lanes (backend/lanes.hpp) on CUDA: a block of group_lanes threads per group. The
// reductions go through shared memory in a fixed tree, so a group's result does not depend on
// how its warps were scheduled.

#include <cuda_runtime.h>

#include <cstdlib>
#include <type_traits>

#include "tpo/backend/lanes.hpp"
#include "tpo/core/views.hpp"

TPO_BEGIN_NAMESPACE
namespace backend::thrust_detail::cuda {

/// Threads per group: four warps. A sequence of L rows takes ⌈L/128⌉ rounds.
inline constexpr int group_lanes = 128;

struct lane_scratch {
    alignas(16) unsigned char values[group_lanes * max_lane_value];
    index_t warp_counts[group_lanes / 32];
};

/// The lanes of one block. Its members are host-callable only so that the passes' host-device
/// templates compile for the host too; a group never runs there.
struct block_lanes {
    index_t item;
    lane_scratch* scratch;

    TPO_HOST_DEVICE index_t group() const { return item; }
    TPO_HOST_DEVICE index_t lane() const {
#if defined(__CUDA_ARCH__)
        return static_cast<index_t>(threadIdx.x);
#else
        std::abort();
#endif
    }
    TPO_HOST_DEVICE index_t size() const { return group_lanes; }

    template <class T, class Op>
    TPO_HOST_DEVICE T reduce(const T& value, Op op) const {
        static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= max_lane_value && alignof(T) <= 16);
#if defined(__CUDA_ARCH__)
        T* slot = reinterpret_cast<T*>(scratch->values);
        const unsigned int me = threadIdx.x;
        __syncthreads();  // every lane has read the previous reduction's result
        slot[me] = value;
        __syncthreads();
        for (unsigned int half = group_lanes / 2; half > 0; half /= 2) {
            if (me < half) slot[me] = op(slot[me], slot[me + half]);
            __syncthreads();
        }
        return slot[0];
#else
        (void)value;
        (void)op;
        std::abort();
#endif
    }

    TPO_HOST_DEVICE index_t exclusive_count(bool flag, index_t& all) const {
#if defined(__CUDA_ARCH__)
        const unsigned int me = threadIdx.x, warp = me / 32, lane = me % 32;
        const unsigned int ballot = __ballot_sync(0xffffffffu, flag);
        __syncthreads();  // every lane has read the previous count
        if (lane == 0) scratch->warp_counts[warp] = __popc(ballot);
        __syncthreads();
        index_t before = __popc(ballot & ((1u << lane) - 1u));
        all = 0;
        for (unsigned int w = 0; w < group_lanes / 32; ++w) {
            if (w < warp) before += scratch->warp_counts[w];
            all += scratch->warp_counts[w];
        }
        return before;
#else
        (void)flag;
        (void)all;
        std::abort();
#endif
    }
};

template <class F>
__global__ void __launch_bounds__(group_lanes) group_kernel(F f) {
    __shared__ lane_scratch scratch;
    f(block_lanes{static_cast<index_t>(blockIdx.x), &scratch});
}

}  // namespace backend::thrust_detail::cuda
TPO_END_NAMESPACE
