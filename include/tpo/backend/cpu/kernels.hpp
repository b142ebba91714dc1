#pragma once
// The CPU backend's kernels at every instruction-set level (cpu/level.hpp), and the calls that
// pick one at run time.
//
// cpu/kernels.inl is compiled once per level, each time inside the level's namespace
// (cpu_detail::TPO_CPU_TU_NAMESPACE::baseline, ::avx2, ::avx512) and the compiler's per-function
// target options, over that level's vectors (vectors_*.inl: SSE2, AVX2 + FMA, AVX-512 intrinsics;
// one scalar lane where there is no dispatch). No kernel uses Eigen, whose packet types are fixed
// per translation unit by its flags. Header-only: everything is inline or a template.

#include <algorithm>
#include <bit>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "tpo/backend/cpu/level.hpp"
#include "tpo/backend/cpu/simd.hpp"
#include "tpo/backend/cpu/tiles_f32.hpp"
#include "tpo/math/online_logsumexp.hpp"
#include "tpo/math/philox.hpp"
#include "tpo/reward/row_stats.hpp"
#include "tpo/rows/rules.hpp"

#if TPO_CPU_DISPATCH
#  include <immintrin.h>
#endif

TPO_CPU_INTRINSICS_BEGIN

// A loop over a register block's rows must be unrolled, or its accumulators live in memory: GCC
// unrolls such loops at -O3 on its own, not at -O2.
#if defined(__clang__)
#  define TPO_CPU_UNROLL _Pragma("clang loop unroll(full)")
#elif defined(__GNUC__)
#  define TPO_CPU_UNROLL _Pragma("GCC unroll 8")
#else
#  define TPO_CPU_UNROLL
#endif

TPO_BEGIN_NAMESPACE
namespace backend::cpu_detail::TPO_CPU_TU_NAMESPACE {

#if TPO_CPU_DISPATCH

// Baseline: the translation unit's own target (x86-64 guarantees SSE2).
namespace baseline {
#  include "tpo/backend/cpu/vectors_sse2.inl"
#  include "tpo/backend/cpu/kernels.inl"
}  // namespace baseline

#  if defined(__clang__)
#    pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#  else
#    pragma GCC push_options
#    pragma GCC target("avx2,fma")
#  endif
namespace avx2 {
#  include "tpo/backend/cpu/vectors_avx2.inl"
#  include "tpo/backend/cpu/kernels.inl"
}  // namespace avx2
#  if defined(__clang__)
#    pragma clang attribute pop
#  else
#    pragma GCC pop_options
#  endif

#  if defined(__clang__)
#    pragma clang attribute push(__attribute__((target("avx2,fma,avx512f,avx512dq,avx512bw,avx512vl"))), \
                                 apply_to = function)
#  else
#    pragma GCC push_options
// prefer-vector-width=512: under -march= of an AVX-512 server core GCC's tuning prefers 256-bit
// vectors, so the loops it vectorises itself here (16-bit widening, narrowing and NaN/Inf bits)
// would run at half the width they get in a translation unit built with default flags.
#    pragma GCC target("avx2,fma,avx512f,avx512dq,avx512bw,avx512vl,prefer-vector-width=512")
#  endif
namespace avx512 {
#  include "tpo/backend/cpu/vectors_avx512.inl"
#  include "tpo/backend/cpu/kernels.inl"
}  // namespace avx512
#  if defined(__clang__)
#    pragma clang attribute pop
#  else
#    pragma GCC pop_options
#  endif

#else

namespace baseline {
#  include "tpo/backend/cpu/vectors_scalar.inl"
#  include "tpo/backend/cpu/kernels.inl"
}  // namespace baseline

#endif

/// Row r's statistics at `level`.
template <class T>
row_stats row_statistics_of(cpu_level level, row_reduction reduction, const T* row, index_t vocab,
                            std::int64_t label) {
#if TPO_CPU_DISPATCH
    if (level == cpu_level::avx512) return avx512::row_statistics_of(reduction, row, vocab, label);
    if (level == cpu_level::avx2) return avx2::row_statistics_of(reduction, row, vocab, label);
#endif
    (void)level;
    return baseline::row_statistics_of(reduction, row, vocab, label);
}

template <class G>
void zero_row(cpu_level level, G* out, index_t vocab, bool stream) {
#if TPO_CPU_DISPATCH
    if (level == cpu_level::avx512) return avx512::zero_row(out, vocab, stream);
    if (level == cpu_level::avx2) return avx2::zero_row(out, vocab, stream);
#endif
    (void)level;
    baseline::zero_row(out, vocab, stream);
}

template <class G>
void label_only_row(cpu_level level, G* out, index_t vocab, const row_coefficients& c, bool stream) {
#if TPO_CPU_DISPATCH
    if (level == cpu_level::avx512) return avx512::label_only_row(out, vocab, c, stream);
    if (level == cpu_level::avx2) return avx2::label_only_row(out, vocab, c, stream);
#endif
    (void)level;
    baseline::label_only_row(out, vocab, c, stream);
}

template <class T, class G>
void gradient_row(cpu_level level, const T* row, index_t vocab, const row_coefficients& c, G* out, bool stream) {
#if TPO_CPU_DISPATCH
    if (level == cpu_level::avx512) return avx512::gradient_row(row, vocab, c, out, stream);
    if (level == cpu_level::avx2) return avx2::gradient_row(row, vocab, c, out, stream);
#endif
    (void)level;
    baseline::gradient_row(row, vocab, c, out, stream);
}

/// dst[i] = src[i] rounded to bf16, at `level`.
inline void narrow_values(cpu_level level, const float* src, index_t n, bfloat16* dst) {
#if TPO_CPU_DISPATCH
    if (level == cpu_level::avx512) return avx512::narrow_array(src, n, dst);
    if (level == cpu_level::avx2) return avx2::narrow_array(src, n, dst);
#endif
    (void)level;
    baseline::narrow_array(src, n, dst);
}

inline void store_fence(cpu_level) { baseline::store_fence(); }

template <class F>
void for_range(cpu_level level, index_t begin, index_t end, F& f) {
#if TPO_CPU_DISPATCH
    if (level == cpu_level::avx512) return avx512::for_range(begin, end, f);
    if (level == cpu_level::avx2) return avx2::for_range(begin, end, f);
#endif
    (void)level;
    baseline::for_range(begin, end, f);
}

#if TPO_CPU_DISPATCH
/// One line of the float product at `level`, avx2 or avx512 (f32_line; float, bf16 or fp16
/// operands, float C): at the baseline level the fused head's products are Eigen's
/// (cpu/matmul.hpp), so no baseline form is compiled.
template <class X, class Y, class Out>
void f32_line(cpu_level level, bool by_rows, bool trans_a, bool trans_b, index_t line, index_t m, index_t n, index_t k0,
              index_t span, const X* a, index_t lda, const Y* b, index_t ldb, bool fresh, const Out& out,
              f32_scratch& scratch) {
    if (level == cpu_level::avx512)
        return avx512::f32_line(by_rows, trans_a, trans_b, line, m, n, k0, span, a, lda, b, ldb, fresh, out, scratch);
    avx2::f32_line(by_rows, trans_a, trans_b, line, m, n, k0, span, a, lda, b, ldb, fresh, out, scratch);
}
#endif

inline void philox_normals(cpu_level level, const math::philox_stream& rng, std::uint64_t first, index_t count,
                           float* out) {
#if TPO_CPU_DISPATCH
    if (level == cpu_level::avx512) return avx512::philox_normals(rng, first, count, out);
    if (level == cpu_level::avx2) return avx2::philox_normals(rng, first, count, out);
#endif
    (void)level;
    baseline::philox_normals(rng, first, count, out);
}

}  // namespace backend::cpu_detail::TPO_CPU_TU_NAMESPACE

namespace backend::cpu_detail {
/// This translation unit's kernels (cpu/level.hpp: named by its instruction-set macros).
namespace kernels = TPO_CPU_TU_NAMESPACE;
}  // namespace backend::cpu_detail
TPO_END_NAMESPACE

#undef TPO_CPU_UNROLL
TPO_CPU_INTRINSICS_END
