#pragma once
// Gaussian blur (RITUAL: kernel 13, σ drawn in [1.5, 2.0]; docs/formulas.md#other-corruptions),
// separable, with reflected borders as torchvision's GaussianBlur. σ is drawn per image from Philox
// (stream + image index).

#include <cmath>
#include <cstdint>

#include "tpo/backend/concept.hpp"
#include "tpo/corrupt/diffusion.hpp"
#include "tpo/corrupt/geometry.hpp"
#include "tpo/math/philox.hpp"

TPO_BEGIN_NAMESPACE

struct blur_options {
    int kernel_size = 13;  // odd
    double min_sigma = 1.5;
    double max_sigma = 2.0;
    std::uint64_t seed = 0;
    std::uint64_t stream = 0;
    overflow_mode overflow = overflow_mode::clamp;
};

namespace corrupt {

struct blur_sigma_pass {
    blur_options options;
    float* sigmas;
    TPO_HOST_DEVICE void operator()(index_t n) const {
        const math::philox_stream rng{options.seed, options.stream + static_cast<std::uint64_t>(n)};
        sigmas[n] = static_cast<float>(options.min_sigma +
                                       (options.max_sigma - options.min_sigma) * rng.parameter_uniform(0));
    }
};

/// One direction of the separable blur; reads `in`, writes `out` (a float scratch or the image).
template <class TIn, class TOut>
struct blur_axis_pass {
    image_view<const TIn> in;
    image_view<TOut> out;
    const float* sigmas;
    int radius;
    bool vertical;
    overflow_mode overflow;

    TPO_HOST_DEVICE void operator()(index_t i) const {
        using std::exp;
        const pixel_coordinate p = coordinate_of(out, i);
        const float sigma = sigmas[p.n];
        float sum = 0, norm = 0;
        for (int d = -radius; d <= radius; ++d) {
            const float w = exp(-0.5f * static_cast<float>(d * d) / (sigma * sigma));
            const index_t y = vertical ? reflect(p.y + d, in.extent[2]) : p.y;
            const index_t x = vertical ? p.x : reflect(p.x + d, in.extent[3]);
            sum += w * load_pixel<float>(in.data[in.offset(p.n, p.c, y, x)]);
            norm += w;
        }
        out.data[out.offset(p.n, p.c, p.y, p.x)] = store_pixel<TOut>(sum / norm, overflow);
    }
};

}  // namespace corrupt

/// Blurs every image of the batch. `out` may alias `in` (the passes go through a scratch).
template <tensor_backend B, class TIn, class TOut>
void gaussian_blur(B& backend, image_view<const TIn> in, image_view<TOut> out, const blur_options& o) {
    corrupt::check_same_image_shape(in, out, "gaussian blur");
    detail::require(o.kernel_size >= 1 && o.kernel_size % 2 == 1, "blur: kernel_size = ", o.kernel_size,
                    ", expected an odd size >= 1");
    detail::require(o.min_sigma > 0 && o.min_sigma <= o.max_sigma, "blur: sigma range [", o.min_sigma, ", ",
                    o.max_sigma, "], expected 0 < min <= max");
    const index_t n = in.extent[0];
    auto sigmas = backend.template allocate<float>(n);
    backend.for_each(n, corrupt::blur_sigma_pass{o, backend.raw(sigmas)});
    auto scratch = backend.template allocate<float>(in.size());
    const image_view<float> mid{backend.raw(scratch), in.extent, in.stride};
    const int radius = o.kernel_size / 2;
    backend.for_each(in.size(),
                     corrupt::blur_axis_pass<TIn, float>{in, mid, backend.raw(sigmas), radius, false, o.overflow});
    backend.for_each(in.size(), corrupt::blur_axis_pass<float, TOut>{mid, out, backend.raw(sigmas), radius, true,
                                                                     o.overflow});
}

TPO_END_NAMESPACE
