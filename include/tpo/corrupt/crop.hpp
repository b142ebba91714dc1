#pragma once
// mDPO's corruption (docs/formulas.md#other-corruptions): a random resized crop keeping a small
// share of the area, resized back bilinearly. The box follows torchvision's
// RandomResizedCrop.get_params (ten tries, then a centre crop), with every random choice drawn from
// Philox (stream + image index).

#include <cmath>
#include <cstdint>

#include "tpo/backend/concept.hpp"
#include "tpo/corrupt/diffusion.hpp"
#include "tpo/corrupt/geometry.hpp"
#include "tpo/math/philox.hpp"

TPO_BEGIN_NAMESPACE

struct crop_options {
    double min_area = 0.01;  // share of the image kept, drawn uniformly in [min_area, max_area]
    double max_area = 0.20;
    double min_aspect = 3.0 / 4.0;
    double max_aspect = 4.0 / 3.0;
    std::uint64_t seed = 0;
    std::uint64_t stream = 0;
    overflow_mode overflow = overflow_mode::clamp;
};

namespace corrupt {

struct crop_box {
    index_t top, left, height, width;
};

/// Uniform integer in [0, count) from u ∈ (0, 1].
TPO_HOST_DEVICE inline index_t uniform_below(float u, index_t count) {
    const auto i = static_cast<index_t>(static_cast<double>(u) * static_cast<double>(count));
    return i < count ? i : count - 1;
}

TPO_HOST_DEVICE inline crop_box draw_crop_box(const crop_options& o, std::uint64_t stream, index_t height,
                                              index_t width) {
    using std::exp;
    using std::log;
    using std::lround;
    using std::sqrt;
    const math::philox_stream rng{o.seed, stream};
    const double area = static_cast<double>(height) * static_cast<double>(width);
    const double log_min = log(o.min_aspect), log_max = log(o.max_aspect);
    for (std::uint32_t attempt = 0; attempt < 10; ++attempt) {
        const double target = area * (o.min_area + (o.max_area - o.min_area) * rng.parameter_uniform(4 * attempt));
        const double aspect = exp(log_min + (log_max - log_min) * rng.parameter_uniform(4 * attempt + 1));
        const auto w = static_cast<index_t>(lround(sqrt(target * aspect)));
        const auto h = static_cast<index_t>(lround(sqrt(target / aspect)));
        if (w > 0 && w <= width && h > 0 && h <= height)
            return {uniform_below(rng.parameter_uniform(4 * attempt + 2), height - h + 1),
                    uniform_below(rng.parameter_uniform(4 * attempt + 3), width - w + 1), h, w};
    }
    // Centre crop at the nearest allowed aspect ratio.
    const double ratio = static_cast<double>(width) / static_cast<double>(height);
    index_t w = width, h = height;
    if (ratio < o.min_aspect)
        h = static_cast<index_t>(lround(static_cast<double>(w) / o.min_aspect));
    else if (ratio > o.max_aspect)
        w = static_cast<index_t>(lround(static_cast<double>(h) * o.max_aspect));
    return {(height - h) / 2, (width - w) / 2, h, w};
}

struct crop_box_pass {
    crop_options options;
    index_t height, width;
    crop_box* boxes;
    TPO_HOST_DEVICE void operator()(index_t n) const {
        boxes[n] = draw_crop_box(options, options.stream + static_cast<std::uint64_t>(n), height, width);
    }
};

/// Bilinear resize of the crop back to the full size (half-pixel centres, as PyTorch's
/// interpolate(..., mode="bilinear", align_corners=False)).
template <class TIn, class TOut>
struct crop_resize_pass {
    using real = pixel_real_t<TIn>;
    image_view<const TIn> in;
    image_view<TOut> out;
    const crop_box* boxes;
    overflow_mode overflow;

    TPO_HOST_DEVICE void operator()(index_t i) const {
        const pixel_coordinate p = coordinate_of(out, i);
        const crop_box b = boxes[p.n];
        auto source = [](index_t dst, index_t dst_size, index_t src_size, index_t& lo, index_t& hi, real& frac) {
            real s = (static_cast<real>(dst) + real(0.5)) * static_cast<real>(src_size) / static_cast<real>(dst_size) -
                     real(0.5);
            if (s < 0) s = 0;
            lo = static_cast<index_t>(s);
            if (lo > src_size - 1) lo = src_size - 1;
            hi = lo + 1 < src_size ? lo + 1 : src_size - 1;
            frac = s - static_cast<real>(lo);
        };
        index_t y0, y1, x0, x1;
        real fy, fx;
        source(p.y, out.extent[2], b.height, y0, y1, fy);
        source(p.x, out.extent[3], b.width, x0, x1, fx);
        auto at = [&](index_t y, index_t x) {
            return load_pixel<real>(in.data[in.offset(p.n, p.c, b.top + y, b.left + x)]);
        };
        const real top = at(y0, x0) * (1 - fx) + at(y0, x1) * fx;
        const real bottom = at(y1, x0) * (1 - fx) + at(y1, x1) * fx;
        out.data[out.offset(p.n, p.c, p.y, p.x)] = store_pixel<TOut>(top * (1 - fy) + bottom * fy, overflow);
    }
};

}  // namespace corrupt

/// Random resized crop of every image of the batch. `out` must not alias `in`.
template <tensor_backend B, class TIn, class TOut>
void random_resized_crop(B& backend, image_view<const TIn> in, image_view<TOut> out, const crop_options& o) {
    corrupt::check_same_image_shape(in, out, "random resized crop");
    detail::require(o.min_area > 0 && o.min_area <= o.max_area && o.max_area <= 1, "crop: area range [", o.min_area,
                    ", ", o.max_area, "], expected 0 < min <= max <= 1");
    detail::require(o.min_aspect > 0 && o.min_aspect <= o.max_aspect, "crop: aspect range [", o.min_aspect, ", ",
                    o.max_aspect, "], expected 0 < min <= max");
    auto boxes = backend.template allocate<corrupt::crop_box>(in.extent[0]);
    backend.for_each(in.extent[0], corrupt::crop_box_pass{o, in.extent[2], in.extent[3], backend.raw(boxes)});
    backend.for_each(out.size(), corrupt::crop_resize_pass<TIn, TOut>{in, out, backend.raw(boxes), o.overflow});
}

TPO_END_NAMESPACE
