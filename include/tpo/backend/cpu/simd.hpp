#pragma once
// The vector building blocks of the CPU backend: Eigen's packet type for an accumulation type,
// block-wise widening of 16-bit inputs and narrowing of outputs written so the compiler
// vectorises them, and a streaming copy that keeps gradient writes out of the caches.
//
// Widening and narrowing are bit-identical to tpo::bfloat16 / tpo::float16 (element.hpp): the
// branch-free forms below exist only because the scalar conversions do not vectorise.

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <Eigen/Core>

#if defined(__SSE2__)
#  include <immintrin.h>
#endif

#include "tpo/core/element.hpp"
#include "tpo/core/views.hpp"

TPO_BEGIN_NAMESPACE
namespace backend::cpu_detail {

/// Accumulation type of an input element: double for double, float for float and 16-bit inputs.
template <class T>
using accumulate_t = std::conditional_t<std::is_same_v<std::remove_const_t<T>, double>, double, float>;

template <class A>
using packet_t = typename Eigen::internal::packet_traits<A>::type;

template <class A>
inline constexpr index_t packet_width = Eigen::internal::unpacket_traits<packet_t<A>>::size;

/// Elements per block: a block of the row stays in L1 between the passes that read it.
inline constexpr index_t block_size = 1024;

inline void widen_block(const bfloat16* src, index_t n, float* dst) {
    for (index_t i = 0; i < n; ++i) {
        const std::uint32_t u = static_cast<std::uint32_t>(src[i].bits) << 16;
        std::memcpy(dst + i, &u, sizeof u);
    }
}

inline void widen_block(const float16* src, index_t n, float* dst) {
    for (index_t i = 0; i < n; ++i) {
        const std::uint16_t h = src[i].bits;
        const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
        const std::uint32_t magnitude = h & 0x7fffu;
        // Shifted into binary32 position, normals and subnormals alike are off by exactly 2^112;
        // the multiplication by a power of two is exact.
        std::uint32_t shifted = magnitude << 13;
        float f;
        std::memcpy(&f, &shifted, sizeof f);
        f *= 5.192296858534828e+33f;  // 2^112
        std::uint32_t u;
        std::memcpy(&u, &f, sizeof u);
        const std::uint32_t special = 0x7f800000u | ((magnitude & 0x3ffu) << 13);  // Inf, NaN
        u = (magnitude >= 0x7c00u ? special : u) | sign;
        std::memcpy(dst + i, &u, sizeof u);
    }
}

/// For 16-bit floats, whose NaN/Inf test needs no widening: the OR over the block of each
/// element's magnitude bits plus one exponent step. Bit 15 of the result is set exactly when some
/// element has an all-ones exponent (NaN or ±Inf); three 16-bit integer operations per element,
/// 32 elements to a vector.
template <class T>
std::uint16_t non_finite_bits(const T* src, index_t n) {
    static_assert(std::is_same_v<T, bfloat16> || std::is_same_v<T, float16>);
    constexpr std::uint16_t exponent_step = std::is_same_v<T, bfloat16> ? 0x0080u : 0x0400u;
    std::uint16_t acc = 0;
    for (index_t i = 0; i < n; ++i) acc |= static_cast<std::uint16_t>((src[i].bits & 0x7fffu) + exponent_step);
    return acc;
}

inline constexpr std::uint16_t non_finite_bit = 0x8000u;

template <class T, class A>
const A* load_block(const T* src, index_t n, A* buffer) {
    if constexpr (std::is_same_v<T, A>) {
        return src;
    } else {
        widen_block(src, n, buffer);
        return buffer;
    }
}

template <class G, class A>
void narrow_block(const A* src, index_t n, G* dst) {
    if constexpr (std::is_same_v<G, bfloat16>) {
        auto round_to_nearest_even = [&](index_t from, index_t to) {
            for (index_t i = from; i < to; ++i) {
                const float f = static_cast<float>(src[i]);
                std::uint32_t u;
                std::memcpy(&u, &f, sizeof u);
                const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
                const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
                dst[i] = bfloat16::from_bits(static_cast<std::uint16_t>(nan ? ((u >> 16) | 0x0040u) : rounded));
            }
        };
        index_t i = 0;
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<A, float>) {
            // vcvtne2ps2bf16 rounds and quiets NaN exactly as above, one instruction per 32 values
            // instead of about seven per 16, but it reads float subnormals as zero: 32 values
            // holding one take the loop above.
            constexpr int subnormal = 0x20;  // vfpclassps category
            for (; i + 32 <= n; i += 32) {
                const __m512 low = _mm512_loadu_ps(src + i), high = _mm512_loadu_ps(src + i + 16);
                if ((_mm512_fpclass_ps_mask(low, subnormal) | _mm512_fpclass_ps_mask(high, subnormal)) != 0)
                    round_to_nearest_even(i, i + 32);
                else
                    _mm512_storeu_si512(static_cast<void*>(dst + i),
                                        std::bit_cast<__m512i>(_mm512_cvtne2ps_pbh(high, low)));
            }
        }
#endif
        round_to_nearest_even(i, n);
    } else {
        for (index_t i = 0; i < n; ++i) dst[i] = narrow<G>(src[i]);
    }
}

/// Copies `bytes` to `dst` with non-temporal stores where the target supports them: a gradient
/// tensor is far larger than the caches, and streaming saves reading every line before writing it.
/// The caller issues store_fence() before anyone else reads `dst`.
inline void stream_copy(void* dst, const void* src, std::size_t bytes) {
    auto* d = static_cast<char*>(dst);
    const auto* s = static_cast<const char*>(src);
#if defined(__SSE2__)
    std::size_t head = static_cast<std::size_t>(-reinterpret_cast<std::uintptr_t>(d)) & 63u;
    head = std::min(head, bytes);
    std::memcpy(d, s, head);
    d += head;
    s += head;
    bytes -= head;
    for (; bytes >= 64; bytes -= 64, d += 64, s += 64) {
#  if defined(__AVX512F__)
        _mm512_stream_si512(reinterpret_cast<__m512i*>(d), _mm512_loadu_si512(s));
#  elif defined(__AVX__)
        _mm256_stream_si256(reinterpret_cast<__m256i*>(d),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
        _mm256_stream_si256(reinterpret_cast<__m256i*>(d + 32),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 32)));
#  else
        for (int k = 0; k < 4; ++k)
            _mm_stream_si128(reinterpret_cast<__m128i*>(d + 16 * k),
                             _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 16 * k)));
#  endif
    }
#endif
    std::memcpy(d, s, bytes);
}

/// How far ahead of the element being computed the row kernels ask for memory: at one core the
/// hardware prefetcher alone leaves the exponential-bound sweeps waiting on memory about a third
/// of the time; asking 16 KiB ahead, one line per line consumed and while the exponentials run,
/// made the log-sum-exp pass ~20 % faster (docs/design.md).
inline constexpr std::size_t prefetch_distance_bytes = 16 * 1024;

/// Asks for the cache lines of [address, address + bytes) into L1. A prefetch never faults, so
/// addresses past the end of the tensor are harmless; they are integers here so that no pointer
/// past the allocation is ever formed.
inline void prefetch_lines(std::uintptr_t address, std::size_t bytes) {
#if defined(__SSE2__)
    for (std::size_t k = 0; k < bytes; k += 64) _mm_prefetch(reinterpret_cast<const char*>(address + k), _MM_HINT_T0);
#else
    (void)address;
    (void)bytes;
#endif
}

/// Asks for the `elements` source elements prefetch_distance_bytes past `at`, which is what a row
/// sweep reads while it computes on `at`.
template <class T>
void prefetch_ahead(const T* at, index_t elements) {
    prefetch_lines(reinterpret_cast<std::uintptr_t>(at) + prefetch_distance_bytes,
                   static_cast<std::size_t>(elements) * sizeof(T));
}

inline void store_fence() {
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

}  // namespace backend::cpu_detail
TPO_END_NAMESPACE
