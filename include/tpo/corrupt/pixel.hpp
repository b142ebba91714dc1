#pragma once
// How image elements map to the float values the corruptions work on, and back.
// 8-bit images are read as x/255 in [0, 1]; float images are taken as they are stored.

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "tpo/core/config.hpp"
#include "tpo/core/element.hpp"

TPO_BEGIN_NAMESPACE

/// What happens to values outside [0, 1] when an 8-bit image is written (`docs/formulas.md#diffusion-noise`).
enum class overflow_mode {
    clamp,  // round to nearest and clamp to [0, 255] (default)
    wrap,   // the official pipeline's mul(255) then uint8 cast: truncate, wrap modulo 256
};

/// CLIP's normalisation constants (`docs/formulas.md#diffusion-noise`), the "normalised space" of
/// VCD and CHiP.
struct channel_normalisation {
    float mean[3] = {0.48145466f, 0.4578275f, 0.40821073f};
    float std[3] = {0.26862954f, 0.26130258f, 0.27577711f};

    TPO_HOST_DEVICE float mean_of(std::int64_t channel) const { return mean[channel % 3]; }
    TPO_HOST_DEVICE float std_of(std::int64_t channel) const { return std[channel % 3]; }
};

/// The float type a corruption computes in: double images in double, every other in float.
template <class T>
using pixel_real_t = std::conditional_t<std::is_same_v<std::remove_const_t<T>, double>, double, float>;

template <class Real, class T>
TPO_HOST_DEVICE TPO_FORCE_INLINE Real load_pixel(T x) {
    if constexpr (std::is_same_v<std::remove_const_t<T>, std::uint8_t>)
        return static_cast<Real>(x) * (Real(1) / Real(255));
    else
        return widen<Real>(x);
}

template <class T, class Real>
TPO_HOST_DEVICE TPO_FORCE_INLINE T store_pixel(Real x, overflow_mode mode) {
    if constexpr (std::is_same_v<T, std::uint8_t>) {
        using std::floor;
        using std::trunc;
        const float scaled = static_cast<float>(x) * 255.0f;
        if (mode == overflow_mode::wrap) {
            if (!(scaled - scaled == 0.0f)) return 0;  // NaN/Inf have no wrapped value
            const auto whole = static_cast<std::int64_t>(trunc(scaled));
            return static_cast<std::uint8_t>(((whole % 256) + 256) % 256);
        }
        const float clamped = scaled < 0.0f ? 0.0f : (scaled > 255.0f ? 255.0f : scaled);
        return static_cast<std::uint8_t>(floor(clamped + 0.5f));
    } else {
        return narrow<T>(x);
    }
}

TPO_END_NAMESPACE
