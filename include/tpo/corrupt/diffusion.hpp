#pragma once
// Forward diffusion noise, the official TPO corruption (docs/formulas.md#diffusion-noise):
//   x̃ = sqrt(ᾱ_k)·x + sqrt(1 − ᾱ_k)·ε,   ε from Philox indexed by memory offset
//   (docs/formulas.md#reproducible-noise).

#include <cmath>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "tpo/backend/concept.hpp"
#include "tpo/core/error.hpp"
#include "tpo/core/views.hpp"
#include "tpo/corrupt/pixel.hpp"
#include "tpo/math/philox.hpp"
#include "tpo/math/schedule.hpp"

TPO_BEGIN_NAMESPACE

/// Where the noise is added (about 3.7× apart in effective strength, `docs/formulas.md#diffusion-noise`).
enum class noise_space {
    pixel,       // on the values as stored (8-bit images: x/255 ∈ [0, 1]), as official TPO and POVID
    normalized,  // on (x − mean_c)/std_c, as VCD and CHiP; mapped back afterwards
};

inline noise_space parse_noise_space(std::string_view s) {
    if (s == "pixel") return noise_space::pixel;
    if (s == "normalized" || s == "normalised") return noise_space::normalized;
    throw value_error(detail::concat("space: unknown noise space '", s, "', expected pixel or normalized"));
}

struct diffusion_options {
    schedule_options schedule{};
    int step = 500;  // k
    std::uint64_t seed = 0;
    std::uint64_t stream = 0;
    noise_space space = noise_space::pixel;
    overflow_mode overflow = overflow_mode::clamp;  // 8-bit output only
    channel_normalisation normalisation{};
};

namespace corrupt {

template <class TIn, class TOut>
struct diffusion_noise_pass {
    using real = pixel_real_t<TIn>;  // applied in the image's float type (docs/formulas.md#diffusion-noise)

    image_view<const TIn> in;
    image_view<TOut> out;
    real signal, noise;  // sqrt(ᾱ_k), sqrt(1 − ᾱ_k)
    math::philox_stream rng;
    noise_space space;
    overflow_mode overflow;
    channel_normalisation norm;

    TPO_HOST_DEVICE void operator()(index_t block) const {
        float normals[4];
        rng.normals(static_cast<std::uint64_t>(block), normals);
        apply(block, normals);
    }

    /// The elements of `block` given its four normals: a backend that draws the normals of many
    /// blocks at once (vectorised Philox, backend/cpu.hpp) calls this directly.
    TPO_HOST_DEVICE void apply(index_t block, const float normals[4]) const {
        const index_t size = in.size();
        for (int k = 0; k < 4; ++k) {
            const index_t i = 4 * block + k;
            if (i >= size) break;
            const real x = load_pixel<real>(in.data[i]);
            const index_t c = in.channel_of(i);
            if (space == noise_space::normalized) {
                const real mean = norm.mean_of(c), std = norm.std_of(c);
                const real y = signal * ((x - mean) / std) + noise * static_cast<real>(normals[k]);
                out.data[i] = store_pixel<TOut>(y * std + mean, overflow);
            } else {
                const real y = signal * x + noise * static_cast<real>(normals[k]);
                out.data[i] = store_pixel<TOut>(y, overflow);
            }
        }
    }
};

template <class A, class B>
void check_same_image_shape(const image_view<A>& in, const image_view<B>& out, const char* what) {
    for (int axis = 0; axis < 4; ++axis)
        detail::require<shape_error>(in.extent[axis] == out.extent[axis], what, ": output axis ", "NCHW"[axis],
                                     " has extent ", out.extent[axis], ", expected ", in.extent[axis],
                                     " as the input");
    // Same memory order too: the noise of an element is keyed by its offset.
    for (int axis = 0; axis < 4; ++axis)
        detail::require<shape_error>(in.stride[axis] == out.stride[axis], what, ": output axis ", "NCHW"[axis],
                                     " has stride ", out.stride[axis], ", expected ", in.stride[axis],
                                     " as the input (same memory layout)");
}

}  // namespace corrupt

/// Adds diffusion noise at step k. `out` may alias `in`.
template <tensor_backend B, class TIn, class TOut>
void add_diffusion_noise(B& backend, image_view<const TIn> in, image_view<TOut> out, const diffusion_options& o) {
    corrupt::check_same_image_shape(in, out, "diffusion noise");
    const double alpha_bar_k = alpha_bar(o.schedule, o.step);
    using pass = corrupt::diffusion_noise_pass<TIn, TOut>;
    using real = typename pass::real;
    const index_t blocks = (in.size() + 3) / 4;
    backend.for_each(blocks, pass{in, out, static_cast<real>(std::sqrt(alpha_bar_k)),
                                  static_cast<real>(std::sqrt(1.0 - alpha_bar_k)), math::philox_stream{o.seed, o.stream},
                                  o.space, o.overflow, o.normalisation});
}

TPO_END_NAMESPACE
