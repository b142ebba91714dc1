#pragma once
// The CPU backend's instruction-set levels, chosen at run time.
//
// The row kernels and the noise generator exist once per level (cpu/kernels.inl, compiled for
// each level with the compiler's per-function target options), so a program built with its
// compiler's defaults runs the AVX-512 kernels on a CPU that has AVX-512. The level is chosen once
// per process from the CPU's features, or from the environment variable TPO_CPU_LEVEL
// (baseline | avx2 | avx512); a backend object may also be given one (backend::cpu's constructor).
//
// - baseline: 128-bit SSE2 vectors on x86-64 (and whatever else the translation unit's own flags
//   allow); the portable scalar form on other architectures, where it is the only level.
// - avx2: 256-bit vectors, AVX2 + FMA.
// - avx512: 512-bit vectors, AVX-512 F/DQ/BW/VL (+ BF16 for narrowing, where the CPU has it).
//
// ODR: a level's kernels are named by the level and by the translation unit's own instruction-set
// macros (cpu_detail::TPO_CPU_TU_NAMESPACE). GCC can add instruction sets to a function but not
// take away those the command line enabled, so the avx2 kernels of a -march=native translation
// unit may use AVX-512 encodings; under their own names they can never stand in for the avx2
// kernels of a baseline translation unit, which the linker would otherwise be free to pick.

#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>

#include "tpo/core/config.hpp"
#include "tpo/core/error.hpp"

#if !defined(TPO_CPU_NO_DISPATCH) && (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && \
    !defined(__CUDACC__)
#  define TPO_CPU_DISPATCH 1
#  include <cpuid.h>
#else
#  define TPO_CPU_DISPATCH 0
#endif

// Around the code built for other instruction sets (cpu/kernels.hpp, cpu/amx.hpp): vector
// arguments and returns between functions of one level are that level's own business, and GCC
// would warn that their ABI differs from the translation unit's;
// GCC 12's AVX-512 intrinsics use deliberately undefined operands it then warns about (GCC bug
// 105593).
#if defined(__GNUC__) && !defined(__clang__)
#  define TPO_CPU_INTRINSICS_BEGIN                                                                              \
      _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wpsabi\"")                           \
          _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")                                               \
              _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#  define TPO_CPU_INTRINSICS_END _Pragma("GCC diagnostic pop")
#else
#  define TPO_CPU_INTRINSICS_BEGIN
#  define TPO_CPU_INTRINSICS_END
#endif

// The translation unit's instruction-set macros, as a namespace name for its kernels (see above).
#if defined(__AVX512F__)
#  define TPO_CPU_TU_A 1
#else
#  define TPO_CPU_TU_A 0
#endif
#if defined(__AVX512DQ__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#  define TPO_CPU_TU_B 1
#else
#  define TPO_CPU_TU_B 0
#endif
#if defined(__AVX512BF16__)
#  define TPO_CPU_TU_C 1
#else
#  define TPO_CPU_TU_C 0
#endif
#if defined(__AVX2__)
#  define TPO_CPU_TU_D 1
#else
#  define TPO_CPU_TU_D 0
#endif
#if defined(__FMA__)
#  define TPO_CPU_TU_E 1
#else
#  define TPO_CPU_TU_E 0
#endif
#if defined(__AVX__)
#  define TPO_CPU_TU_F 1
#else
#  define TPO_CPU_TU_F 0
#endif
#if defined(__SSE4_1__)
#  define TPO_CPU_TU_G 1
#else
#  define TPO_CPU_TU_G 0
#endif
#if defined(__SSSE3__)
#  define TPO_CPU_TU_H 1
#else
#  define TPO_CPU_TU_H 0
#endif
#if defined(__F16C__)
#  define TPO_CPU_TU_I 1
#else
#  define TPO_CPU_TU_I 0
#endif
#if defined(__BMI2__)
#  define TPO_CPU_TU_J 1
#else
#  define TPO_CPU_TU_J 0
#endif
// The first digit says whether the unit dispatches at all (the portable kernels have other code).
#define TPO_CPU_CAT2(z, a, b, c, d, e, f, g, h, i, j) tu_##z##a##b##c##d##e##f##g##h##i##j
#define TPO_CPU_CAT(z, a, b, c, d, e, f, g, h, i, j) TPO_CPU_CAT2(z, a, b, c, d, e, f, g, h, i, j)
#define TPO_CPU_TU_NAMESPACE                                                                                    \
    TPO_CPU_CAT(TPO_CPU_DISPATCH, TPO_CPU_TU_A, TPO_CPU_TU_B, TPO_CPU_TU_C, TPO_CPU_TU_D, TPO_CPU_TU_E, TPO_CPU_TU_F, \
                TPO_CPU_TU_G, TPO_CPU_TU_H, TPO_CPU_TU_I, TPO_CPU_TU_J)
#define TPO_CPU_STRINGIFY2(x) #x
#define TPO_CPU_STRINGIFY(x) TPO_CPU_STRINGIFY2(x)
/// The name of this translation unit's kernel namespace, as a string (for tests and diagnostics).
#define TPO_CPU_TU_NAME TPO_CPU_STRINGIFY(TPO_CPU_TU_NAMESPACE)

TPO_BEGIN_NAMESPACE
namespace backend {

/// An instruction-set level of the CPU backend's kernels, lowest first.
enum class cpu_level : int { baseline = 0, avx2 = 1, avx512 = 2 };

inline const char* to_string(cpu_level level) {
    switch (level) {
    case cpu_level::baseline: return "baseline";
    case cpu_level::avx2: return "avx2";
    case cpu_level::avx512: return "avx512";
    }
    return "unknown";
}

/// The level named `name` (as TPO_CPU_LEVEL spells it), if it is one.
inline std::optional<cpu_level> parse_cpu_level(std::string_view name) {
    for (cpu_level level : {cpu_level::baseline, cpu_level::avx2, cpu_level::avx512})
        if (name == to_string(level)) return level;
    return std::nullopt;
}

/// The highest level this CPU (and its operating system) supports and this build has kernels for.
inline cpu_level supported_cpu_level() {
#if TPO_CPU_DISPATCH
    __builtin_cpu_init();
    // libgcc's feature bits include the operating system's consent (XGETBV) for the wide registers.
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
        return cpu_level::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return cpu_level::avx2;
#endif
    return cpu_level::baseline;
}

namespace cpu_level_detail {

/// The level named by TPO_CPU_LEVEL, checked, or the highest supported one.
inline cpu_level level_from_environment() {
    const cpu_level supported = supported_cpu_level();
    const char* value = std::getenv("TPO_CPU_LEVEL");
    if (value == nullptr || *value == '\0') return supported;
    const std::optional<cpu_level> asked = parse_cpu_level(value);
    detail::require<value_error>(asked.has_value(), "TPO_CPU_LEVEL=", value,
                                 ": expected baseline, avx2 or avx512");
    detail::require<value_error>(*asked <= supported, "TPO_CPU_LEVEL=", value, ": this CPU (or build) supports up to ",
                                 to_string(supported));
    return *asked;
}

/// Whether the CPU has AVX-512 BF16 (the avx512 kernels then narrow bf16 gradients with it; the
/// operating system's consent to the wide registers is the avx512 level's own condition). CPUID
/// leaf 7, subleaf 1, EAX bit 5: not every compiler's __builtin_cpu_supports knows the name.
inline bool cpu_has_bf16() {
#if TPO_CPU_DISPATCH
    static const bool has = [] {
        unsigned a = 0, b = 0, c = 0, d = 0;
        return __get_cpuid_count(7, 1, &a, &b, &c, &d) != 0 && ((a >> 5) & 1u) != 0;
    }();
    return has;
#else
    return false;
#endif
}

inline void require_supported(cpu_level level) {
    detail::require<value_error>(level <= supported_cpu_level(), "cpu backend: level ", to_string(level),
                                 " requested, but this CPU (or build) supports up to ",
                                 to_string(supported_cpu_level()));
}

}  // namespace cpu_level_detail

/// The level a backend::cpu constructed without one uses: TPO_CPU_LEVEL if set (an error if it
/// names no level or one this CPU lacks), else the highest supported. Read once per process.
inline cpu_level default_cpu_level() {
    static const cpu_level level = cpu_level_detail::level_from_environment();
    return level;
}

}  // namespace backend
TPO_END_NAMESPACE
