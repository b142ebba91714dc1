#pragma once
// Corruptions that replace image content (docs/formulas.md#other-corruptions): patch masking, the
// mean-colour image (zeros in normalised space, V-DPO / CHiP "black"), and pure Gaussian noise in
// normalised space.

#include <cstdint>

#include "tpo/backend/concept.hpp"
#include "tpo/corrupt/diffusion.hpp"
#include "tpo/corrupt/geometry.hpp"
#include "tpo/math/philox.hpp"

TPO_BEGIN_NAMESPACE

struct patch_mask_options {
    index_t patch_size = 14;  // CLIP ViT-L/14's patch
    double ratio = 0.5;       // probability that a patch is masked, drawn per patch
    std::uint64_t seed = 0;
    std::uint64_t stream = 0;
    /// Fill value per channel in pixel space; the default is the normalisation mean (0 once normalised).
    channel_normalisation fill{};
    overflow_mode overflow = overflow_mode::clamp;
};

namespace corrupt {

// Each patch is masked independently with probability `ratio`: the decision is a pure function of
// (seed, stream + n, patch index), so any element can be computed on its own with no table.
template <class TIn, class TOut>
struct patch_mask_pass {
    using real = pixel_real_t<TIn>;
    image_view<const TIn> in;
    image_view<TOut> out;
    patch_mask_options options;

    TPO_HOST_DEVICE void operator()(index_t i) const {
        const pixel_coordinate p = coordinate_of(out, i);
        const index_t size = options.patch_size;
        const index_t patches_per_row = (out.extent[3] + size - 1) / size;
        const index_t patch = (p.y / size) * patches_per_row + p.x / size;
        const math::philox_stream rng{options.seed, options.stream + static_cast<std::uint64_t>(p.n)};
        const bool masked = rng.parameter_uniform(static_cast<std::uint32_t>(patch)) <= options.ratio;
        const real value = masked ? static_cast<real>(options.fill.mean_of(p.c))
                                  : load_pixel<real>(in.data[in.offset(p.n, p.c, p.y, p.x)]);
        out.data[out.offset(p.n, p.c, p.y, p.x)] = store_pixel<TOut>(value, options.overflow);
    }
};

template <class TOut>
struct channel_fill_pass {
    image_view<TOut> out;
    channel_normalisation norm;
    math::philox_stream rng;
    bool noise;  // false: mean colour; true: ε·std_c + mean_c
    overflow_mode overflow;

    TPO_HOST_DEVICE void operator()(index_t i) const {
        const index_t c = out.channel_of(i);
        const float value = noise ? rng.normal(static_cast<std::uint64_t>(i)) * norm.std_of(c) + norm.mean_of(c)
                                  : norm.mean_of(c);
        out.data[i] = store_pixel<TOut>(value, overflow);
    }
};

}  // namespace corrupt

/// Masks random patches. `out` may alias `in`.
template <tensor_backend B, class TIn, class TOut>
void mask_patches(B& backend, image_view<const TIn> in, image_view<TOut> out, const patch_mask_options& o) {
    corrupt::check_same_image_shape(in, out, "patch masking");
    detail::require(o.patch_size >= 1, "patch masking: patch_size = ", o.patch_size, ", expected at least 1");
    detail::require(o.ratio >= 0 && o.ratio <= 1, "patch masking: ratio = ", o.ratio, ", expected 0 <= ratio <= 1");
    backend.for_each(out.size(), corrupt::patch_mask_pass<TIn, TOut>{in, out, o});
}

/// The mean-colour image: every pixel takes the normalisation mean (zero in normalised space).
template <tensor_backend B, class TOut>
void fill_mean_image(B& backend, image_view<TOut> out, const channel_normalisation& norm = {},
                     overflow_mode overflow = overflow_mode::clamp) {
    backend.for_each(out.size(), corrupt::channel_fill_pass<TOut>{out, norm, {}, false, overflow});
}

/// Pure Gaussian noise in normalised space (ε·std_c + mean_c in pixel space), ε as in
/// `docs/formulas.md#reproducible-noise`.
template <tensor_backend B, class TOut>
void fill_noise_image(B& backend, image_view<TOut> out, std::uint64_t seed, std::uint64_t stream,
                      const channel_normalisation& norm = {}, overflow_mode overflow = overflow_mode::clamp) {
    backend.for_each(out.size(), corrupt::channel_fill_pass<TOut>{out, norm, {seed, stream}, true, overflow});
}

TPO_END_NAMESPACE
