#pragma once
// Element types accepted on input: float, double and the two 16-bit floats trainers hand over.
//
// bfloat16 and float16 are plain 16-bit storage with host/device conversions, so the same
// struct is read by every backend without a CUDA or compiler extension type. Arithmetic is never
// done in 16 bits: values are widened on load (every reduction accumulates in float32 or wider,
// docs/formulas.md#notation-and-data-layout).

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "tpo/core/config.hpp"

TPO_BEGIN_NAMESPACE

namespace detail {
TPO_HOST_DEVICE inline std::uint32_t float_bits(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}
TPO_HOST_DEVICE inline float bits_float(std::uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
}  // namespace detail

/// Brain float: the upper 16 bits of an IEEE binary32.
struct bfloat16 {
    std::uint16_t bits = 0;

    bfloat16() = default;
    TPO_HOST_DEVICE explicit bfloat16(float f) : bits(round_to_nearest_even(f)) {}
    TPO_HOST_DEVICE explicit operator float() const {
        return detail::bits_float(static_cast<std::uint32_t>(bits) << 16);
    }
    TPO_HOST_DEVICE static bfloat16 from_bits(std::uint16_t b) {
        bfloat16 x;
        x.bits = b;
        return x;
    }

private:
    TPO_HOST_DEVICE static std::uint16_t round_to_nearest_even(float f) {
        std::uint32_t u = detail::float_bits(f);
        if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0)
            return static_cast<std::uint16_t>((u >> 16) | 0x0040u);  // keep NaN a NaN
        u += 0x7fffu + ((u >> 16) & 1u);
        return static_cast<std::uint16_t>(u >> 16);
    }
};

/// IEEE binary16.
struct float16 {
    std::uint16_t bits = 0;

    float16() = default;
    TPO_HOST_DEVICE explicit float16(float f) : bits(from_float(f)) {}
    TPO_HOST_DEVICE explicit operator float() const { return to_float(bits); }
    TPO_HOST_DEVICE static float16 from_bits(std::uint16_t b) {
        float16 x;
        x.bits = b;
        return x;
    }

private:
    TPO_HOST_DEVICE static float to_float(std::uint16_t h) {
        const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
        const std::uint32_t exponent = (h >> 10) & 0x1fu;
        const std::uint32_t mantissa = h & 0x3ffu;
        if (exponent == 0x1f) return detail::bits_float(sign | 0x7f800000u | (mantissa << 13));
        if (exponent != 0) return detail::bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
        // Subnormal (or zero): value = mantissa * 2^-24, exact in binary32.
        const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
        return sign ? -magnitude : magnitude;
    }
    TPO_HOST_DEVICE static std::uint16_t from_float(float f) {
        const std::uint32_t u = detail::float_bits(f);
        const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
        const std::uint32_t abs = u & 0x7fffffffu;
        if (abs >= 0x7f800000u)  // Inf or NaN
            return static_cast<std::uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
        if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds past 65504
        if (abs < 0x38800000u) {  // below the smallest normal: round to a multiple of 2^-24
            const float magnitude = detail::bits_float(abs);
            const float scaled = magnitude * 16777216.0f;  // exact
            // Round half to even on an exactly representable scaled value.
            auto whole = static_cast<std::uint32_t>(scaled);
            const float fraction = scaled - static_cast<float>(whole);
            if (fraction > 0.5f || (fraction == 0.5f && (whole & 1u))) ++whole;
            return static_cast<std::uint16_t>(sign | whole);
        }
        std::uint32_t rebased = abs - (112u << 23);
        rebased += 0xfffu + ((rebased >> 13) & 1u);
        return static_cast<std::uint16_t>(sign | (rebased >> 13));
    }
};

template <class T>
inline constexpr bool is_logit_element_v = std::is_same_v<T, float> || std::is_same_v<T, double> ||
                                           std::is_same_v<T, bfloat16> || std::is_same_v<T, float16>;

template <class T>
concept logit_element = is_logit_element_v<std::remove_const_t<T>>;

template <class T>
concept label_element = std::is_same_v<std::remove_const_t<T>, std::int32_t> ||
                        std::is_same_v<std::remove_const_t<T>, std::int64_t>;

/// Widen any input element to the accumulation type.
template <class Acc, class T>
TPO_HOST_DEVICE TPO_FORCE_INLINE Acc widen(T x) {
    if constexpr (std::is_same_v<std::remove_const_t<T>, double>)
        return static_cast<Acc>(x);
    else
        return static_cast<Acc>(static_cast<float>(x));
}

/// Narrow a computed value to an output element (round to nearest even for 16-bit types).
template <class T, class Acc>
TPO_HOST_DEVICE TPO_FORCE_INLINE T narrow(Acc x) {
    if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>)
        return static_cast<T>(x);
    else
        return T(static_cast<float>(x));
}

/// The largest finite value of an element type.
template <class T>
constexpr double largest_finite() {
    using U = std::remove_const_t<T>;
    if constexpr (std::is_same_v<U, double>) return 1.7976931348623157e308;
    else if constexpr (std::is_same_v<U, float>) return 3.4028234663852886e38;
    else if constexpr (std::is_same_v<U, bfloat16>) return 3.3895313892515355e38;  // (2 − 2^−7)·2^127
    else if constexpr (std::is_same_v<U, float16>) return 65504.0;
    else static_assert(!sizeof(U), "no largest_finite for this element type");
}

template <class T>
constexpr const char* element_name() {
    using U = std::remove_const_t<T>;
    if constexpr (std::is_same_v<U, float>) return "float32";
    else if constexpr (std::is_same_v<U, double>) return "float64";
    else if constexpr (std::is_same_v<U, bfloat16>) return "bfloat16";
    else if constexpr (std::is_same_v<U, float16>) return "float16";
    else if constexpr (std::is_same_v<U, std::int32_t>) return "int32";
    else if constexpr (std::is_same_v<U, std::int64_t>) return "int64";
    else if constexpr (std::is_same_v<U, std::uint8_t>) return "uint8";
    else return "unknown";
}

TPO_END_NAMESPACE
