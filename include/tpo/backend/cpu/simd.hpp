#pragma once
// What the CPU backend's kernels share at every instruction-set level (cpu/kernels.hpp): the
// accumulation type, the block size, memory prefetching and the scalar bf16 rounding. Nothing
// here depends on the translation unit's vector width.
//
// Widening and narrowing are bit-identical to tpo::bfloat16 / tpo::float16 (element.hpp): the
// branch-free forms in cpu/kernels.inl exist only because the scalar conversions do not vectorise.

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__SSE2__) || defined(_M_X64)
#  include <immintrin.h>
#endif

#include "tpo/core/element.hpp"
#include "tpo/core/views.hpp"

TPO_BEGIN_NAMESPACE
namespace backend::cpu_detail {

/// Accumulation type of an input element: double for double, float for float and 16-bit inputs.
template <class T>
using accumulate_t = std::conditional_t<std::is_same_v<std::remove_const_t<T>, double>, double, float>;

/// Elements per block: a block of the row stays in L1 between the passes that read it.
inline constexpr index_t block_size = 1024;

/// Bit 15 of non_finite_bits(): some element of the block is NaN or ±Inf.
inline constexpr std::uint16_t non_finite_bit = 0x8000u;

/// Blocks of the noise generator drawn at once, in vector lanes.
inline constexpr int philox_lanes = 16;

/// Rounds floats to bfloat16 to nearest even, quieting NaN, as tpo::bfloat16 does.
TPO_FORCE_INLINE void narrow_bf16_scalar(const float* src, index_t n, bfloat16* dst) {
    for (index_t i = 0; i < n; ++i) {
        std::uint32_t u;
        std::memcpy(&u, src + i, sizeof u);
        const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
        const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        dst[i] = bfloat16::from_bits(static_cast<std::uint16_t>(nan ? ((u >> 16) | 0x0040u) : rounded));
    }
}

/// How far ahead of the element being computed the row kernels ask for memory: at one core the
/// hardware prefetcher alone leaves the exponential-bound sweeps waiting on memory about a third
/// of the time; asking 16 KiB ahead, one line per line consumed and while the exponentials run,
/// made the log-sum-exp pass ~20 % faster (docs/design.md).
inline constexpr std::size_t prefetch_distance_bytes = 16 * 1024;

/// Asks for the cache lines of [address, address + bytes) into L2 (the T1 hint). Into L1 (T0), each
/// prefetch holds one of the core's few line-fill buffers until its line arrives, which caps the
/// lines in flight at one core; the L2's miss queue is several times longer, and the load that
/// follows 16 KiB later moves the line to L1 at L2 latency (docs/design.md). A prefetch never
/// faults, so addresses past the end of the tensor are harmless; they are integers here so that no
/// pointer past the allocation is ever formed.
TPO_FORCE_INLINE void prefetch_lines(std::uintptr_t address, std::size_t bytes) {
#if defined(__SSE2__) || defined(_M_X64)
    for (std::size_t k = 0; k < bytes; k += 64) _mm_prefetch(reinterpret_cast<const char*>(address + k), _MM_HINT_T1);
#elif defined(__GNUC__)
    for (std::size_t k = 0; k < bytes; k += 64) __builtin_prefetch(reinterpret_cast<const char*>(address + k), 0, 2);
#else
    (void)address;
    (void)bytes;
#endif
}

/// Asks for the cache line holding `address` into L1 (the T0 hint): for a register block's operands
/// a few iterations before it loads them, where the distance is short and the line is usually in L2.
TPO_FORCE_INLINE void prefetch_line_l1(std::uintptr_t address) {
#if defined(__SSE2__) || defined(_M_X64)
    _mm_prefetch(reinterpret_cast<const char*>(address), _MM_HINT_T0);
#elif defined(__GNUC__)
    __builtin_prefetch(reinterpret_cast<const char*>(address), 0, 3);
#else
    (void)address;
#endif
}

/// Asks for the `elements` source elements prefetch_distance_bytes past `at`, which is what a row
/// sweep reads while it computes on `at`.
template <class T>
TPO_FORCE_INLINE void prefetch_ahead(const T* at, index_t elements) {
    prefetch_lines(reinterpret_cast<std::uintptr_t>(at) + prefetch_distance_bytes,
                   static_cast<std::size_t>(elements) * sizeof(T));
}

}  // namespace backend::cpu_detail
TPO_END_NAMESPACE
