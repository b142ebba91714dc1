#pragma once
// `tpo corrupt`: the library's image corruptions on a .npy array or a PNG/JPEG file.
//
// .npy arrays of any shape are read as (..., C, H, W), C-contiguous, leading axes forming the
// batch: the memory order is then exactly the flat row-major index, so diffusion noise element i
// is element i of docs/formulas.md#reproducible-noise. Images are 8-bit RGB HWC with values x/255
// in [0, 1], as the official pipeline corrupts them after ToTensor.

#include <array>
#include <ostream>
#include <span>
#include <string>
#include <vector>

#include "tpo/backend/reference.hpp"
#include "tpo/corrupt/blur.hpp"
#include "tpo/corrupt/crop.hpp"
#include "tpo/corrupt/diffusion.hpp"
#include "tpo/corrupt/fill.hpp"
#include "tpo/io/file.hpp"
#include "tpo/io/npy.hpp"

#include "cli/args.hpp"
#include "cli/image_file.hpp"
#include "cli/inputs.hpp"
#include "cli/output.hpp"

namespace tpo_cli {

inline constexpr flag_spec corrupt_flags[] = {
    {"in", true},        {"out", true},       {"schedule", true}, {"steps", true}, {"step", true},
    {"beta-start", true}, {"beta-end", true}, {"zero-snr", false}, {"seed", true}, {"stream", true},
    {"space", true},     {"wrap", false},     {"kind", true},     {"max-pixels", true},
};

struct corruption {
    std::string kind = "diffusion";
    tpo::diffusion_options diffusion{};
    std::uint64_t seed = 0, stream = 0;
    tpo::overflow_mode overflow = tpo::overflow_mode::clamp;
};

inline corruption read_corruption(const parsed_args& args) {
    corruption c;
    c.kind = args.choice("kind", "diffusion", {"diffusion", "crop", "blur", "patch-mask", "mean"});
    tpo::diffusion_options& d = c.diffusion;
    d.schedule.kind =
        tpo::parse_beta_schedule(args.choice("schedule", "sigmoid", {"sigmoid", "linear", "scaled_linear", "cosine"}));
    // The schedule is a table of K doubles: a bound keeps a typo from allocating gigabytes.
    d.schedule.steps = static_cast<int>(args.integer("steps", 1000, 1, 100000));
    d.step = static_cast<int>(args.integer("step", 500, 0, d.schedule.steps - 1));
    if (args.has("beta-start")) d.schedule.beta_start = args.real("beta-start", 0);
    if (args.has("beta-end")) d.schedule.beta_end = args.real("beta-end", 0);
    d.schedule.zero_terminal_snr = args.has("zero-snr");
    c.seed = d.seed = args.unsigned_integer("seed", 0);
    c.stream = d.stream = args.unsigned_integer("stream", 0);
    d.space = tpo::parse_noise_space(args.choice("space", "pixel", {"pixel", "normalized"}));
    c.overflow = d.overflow = args.has("wrap") ? tpo::overflow_mode::wrap : tpo::overflow_mode::clamp;
    try {
        (void)tpo::alpha_bar(d.schedule, d.step);  // reject a bad schedule before reading any file
    } catch (const tpo::error& e) {
        args.fail(e.what());
    }
    return c;
}

/// Applies the corruption `c` to `in`, writing `out` (same shape; never aliased).
template <class TIn, class TOut>
void apply_corruption(const corruption& c, tpo::image_view<const TIn> in, tpo::image_view<TOut> out) {
    tpo::backend::reference backend;
    if (c.kind == "diffusion") {
        tpo::add_diffusion_noise(backend, in, out, c.diffusion);
    } else if (c.kind == "crop") {
        tpo::crop_options o;
        o.seed = c.seed;
        o.stream = c.stream;
        o.overflow = c.overflow;
        tpo::random_resized_crop(backend, in, out, o);
    } else if (c.kind == "blur") {
        tpo::blur_options o;
        o.seed = c.seed;
        o.stream = c.stream;
        o.overflow = c.overflow;
        tpo::gaussian_blur(backend, in, out, o);
    } else if (c.kind == "patch-mask") {
        tpo::patch_mask_options o;
        o.seed = c.seed;
        o.stream = c.stream;
        o.overflow = c.overflow;
        tpo::mask_patches(backend, in, out, o);
    } else {
        tpo::fill_mean_image(backend, out, tpo::channel_normalisation{}, c.overflow);
    }
}

/// (..., C, H, W) → (N, C, H, W), missing leading axes taken as 1. An array without elements is
/// refused first: its other dimensions may be anything (the reader only bounds their product), so
/// the leading product could overflow; with every dimension at least 1 it is at most the element
/// count, which the reader bounded.
inline std::array<tpo::index_t, 4> nchw_extent(const std::string& path, const std::vector<std::int64_t>& shape) {
    for (std::int64_t d : shape)
        if (d == 0)
            throw input_error(tpo::detail::concat(path, ": shape: ", tpo::io::shape_text(shape),
                                                  " has no element, expected at least one (..., C, H, W) image"));
    std::array<tpo::index_t, 4> e{1, 1, 1, 1};
    const std::size_t n = shape.size();
    for (std::size_t k = 0; k < 3 && k < n; ++k) e[3 - k] = shape[n - 1 - k];
    for (std::size_t k = 3; k < n; ++k) e[0] *= shape[n - 1 - k];
    return e;
}

template <class T>
tpo::image_view<T> nchw_view(T* data, const std::array<tpo::index_t, 4>& e) {
    return tpo::image_view<T>::nchw(data, e[0], e[1], e[2], e[3]);
}

inline int run_corrupt(std::span<const std::string> argv, std::ostream&) {
    const parsed_args args(argv, corrupt_flags, "corrupt");
    const corruption c = read_corruption(args);
    image_limits limits;
    limits.max_pixels = static_cast<std::uint64_t>(
        args.integer("max-pixels", static_cast<std::int64_t>(limits.max_pixels), 1, std::int64_t{1} << 30));
    const std::string in_path = args.required("in"), out_path = args.required("out");
    const bool image_in = is_image_path(in_path), image_out = is_image_path(out_path);
    const bool npy_in = has_extension(in_path, {".npy"}), npy_out = has_extension(out_path, {".npy"});
    if (!image_in && !npy_in) args.fail(tpo::detail::concat("flag --in: '", in_path, "', expected a .npy, .png or .jpg file"));
    if (!image_out && !npy_out) args.fail(tpo::detail::concat("flag --out: '", out_path, "', expected a .npy, .png or .jpg file"));
    if (image_in != image_out)
        args.fail(tpo::detail::concat("flag --out: '", out_path, "', expected ", image_in ? "an image (.png/.jpg)" : "a .npy",
                                      " file like --in"));

    std::string encoded;
    try {
        if (image_in) {
            const rgb_image img = read_rgb_image(in_path, limits);
            rgb_image result{img.height, img.width, std::vector<std::uint8_t>(img.pixels.size())};
            apply_corruption<std::uint8_t, std::uint8_t>(
                c, tpo::image_view<const std::uint8_t>::hwc(img.pixels.data(), img.height, img.width, 3),
                tpo::image_view<std::uint8_t>::hwc(result.pixels.data(), img.height, img.width, 3));
            encoded = encode_rgb_image(out_path, result);
        } else {
            const tpo::io::npy_array a = load_float_array(in_path);
            const auto extent = nchw_extent(in_path, a.shape);
            std::visit(
                [&](const auto& values) {
                    using T = typename std::decay_t<decltype(values)>::value_type;
                    if constexpr (std::is_floating_point_v<T>) {
                        std::vector<T> result(values.size());
                        apply_corruption<T, T>(c, nchw_view<const T>(values.data(), extent),
                                               nchw_view<T>(result.data(), extent));
                        encoded = tpo::io::encode_npy<T>(a.shape, std::span<const T>(result));
                    }
                },
                a.data);
        }
    } catch (const input_error&) {
        throw;
    } catch (const tpo::io::format_error&) {
        throw;
    } catch (const tpo::io::file_error&) {
        throw;
    } catch (const tpo::error& e) {
        throw input_error(tpo::detail::concat(in_path, ": ", e.what()));
    }
    tpo::io::write_file_atomically(out_path, encoded, tool_temporaries());
    return 0;
}

}  // namespace tpo_cli
