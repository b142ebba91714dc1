#pragma once
// The image corruptions as the module runs them, free of Python (shared with cuda.cu): an
// untyped image ref, the corruption's options, and one function that types the views and calls
// the library.

#include <array>
#include <cstdint>

#include "tpo/corrupt/blur.hpp"
#include "tpo/corrupt/crop.hpp"
#include "tpo/corrupt/diffusion.hpp"
#include "tpo/corrupt/fill.hpp"

#include "engine.hpp"

namespace tpo_python {

/// (N, C, H, W) with strides in elements; dense in some axis order (checked by tpo::image_view).
struct image_ref {
    void* data = nullptr;
    element type = element::none;
    std::array<index_t, 4> extent{}, stride{};
};

enum class corruption_kind { diffusion, crop, blur, patch_mask, mean, noise };

struct corruption {
    corruption_kind kind = corruption_kind::diffusion;
    tpo::diffusion_options diffusion{};
    tpo::crop_options crop{};
    tpo::blur_options blur{};
    tpo::patch_mask_options patch_mask{};
    tpo::channel_normalisation normalisation{};
    std::uint64_t seed = 0, stream = 0;
    tpo::overflow_mode overflow = tpo::overflow_mode::clamp;
};

namespace detail {

template <class F>
decltype(auto) with_pixel_type(element e, F&& f) {
    switch (e) {
    case element::u8: return f.template operator()<std::uint8_t>();
    case element::f32: return f.template operator()<float>();
    case element::f64: return f.template operator()<double>();
    case element::bf16: return f.template operator()<tpo::bfloat16>();
    case element::f16: return f.template operator()<tpo::float16>();
    default: break;
    }
    throw tpo::shape_error(tpo::detail::concat("image: dtype ", element_name(e),
                                               ", expected uint8, float32, float64, bfloat16 or float16"));
}

}  // namespace detail

/// Applies `c` to `in`, writing `out` (same element type; the caller has checked aliasing).
/// The mean and noise images read no input: `in` is only their shape.
template <class B>
void apply_corruption(B& backend, const corruption& c, const image_ref& in, const image_ref& out) {
    detail::with_pixel_type(in.type, [&]<class T>() {
        const auto source = tpo::image_view<const T>::strided(static_cast<const T*>(in.data), in.extent, in.stride);
        const auto target = tpo::image_view<T>::strided(static_cast<T*>(out.data), out.extent, out.stride);
        switch (c.kind) {
        case corruption_kind::diffusion: tpo::add_diffusion_noise(backend, source, target, c.diffusion); break;
        case corruption_kind::crop: tpo::random_resized_crop(backend, source, target, c.crop); break;
        case corruption_kind::blur: tpo::gaussian_blur(backend, source, target, c.blur); break;
        case corruption_kind::patch_mask: tpo::mask_patches(backend, source, target, c.patch_mask); break;
        case corruption_kind::mean: tpo::fill_mean_image(backend, target, c.normalisation, c.overflow); break;
        case corruption_kind::noise:
            tpo::fill_noise_image(backend, target, c.seed, c.stream, c.normalisation, c.overflow);
            break;
        }
    });
}

/// The corruption on CUDA device memory (cuda.cu), ordered on `stream` of `device`.
void corrupt_cuda(const corruption& c, const image_ref& in, const image_ref& out, std::uintptr_t stream, int device);

}  // namespace tpo_python
