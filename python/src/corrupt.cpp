// tpo._tpo.corrupt and the schedule functions: the library's image corruptions on arrays from
// Python, in place of nothing (the output is the caller's array), in any dense memory order.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <iterator>
#include <optional>
#include <string>

#include "arrays.hpp"
#include "corrupt.hpp"
#include "module.hpp"

#if defined(TPO_PYTHON_WITH_CPU_BACKEND)
#  include "tpo/backend/cpu.hpp"
#else
#  include "tpo/backend/reference.hpp"
#endif

namespace tpo_python {
namespace {

/// (..., C, H, W) or (..., H, W, C) → (N, C, H, W) extents and strides; a 2-d array is one
/// channel. The leading axes must merge into one (they do for any array that is dense).
template <class A>
image_ref image_of(const A& a, const std::string& layout, const char* name) {
    const auto ndim = static_cast<int>(a.ndim());
    if (ndim < 2)
        throw tpo::shape_error(tpo::detail::concat(name, ": shape ", shape_text(a),
                                                   ", expected an image (..., C, H, W) or (..., H, W, C)"));
    image_ref r;
    r.data = const_cast<void*>(static_cast<const void*>(a.data()));
    r.type = element_of(a.dtype());
    auto axis = [&](int k, int target) {
        r.extent[static_cast<std::size_t>(target)] = static_cast<index_t>(a.shape(static_cast<std::size_t>(k)));
        r.stride[static_cast<std::size_t>(target)] = a.stride(static_cast<std::size_t>(k));
    };
    r.extent = {1, 1, 1, 1};
    r.stride = {0, 0, 0, 0};
    int leading = ndim - 3;
    if (ndim == 2) {
        axis(0, 2), axis(1, 3);
        leading = 0;
    } else if (layout == "chw") {
        axis(ndim - 3, 1), axis(ndim - 2, 2), axis(ndim - 1, 3);
    } else {
        axis(ndim - 3, 2), axis(ndim - 2, 3), axis(ndim - 1, 1);
    }
    // Leading axes → N: from the innermost outwards each must step over the one inside it.
    index_t n = 1, n_stride = 0, next_stride = 0;
    for (int k = leading - 1; k >= 0; --k) {
        const auto extent = static_cast<index_t>(a.shape(static_cast<std::size_t>(k)));
        const index_t stride = a.stride(static_cast<std::size_t>(k));
        if (extent == 1) continue;
        if (n > 1 && stride != next_stride)
            throw tpo::shape_error(tpo::detail::concat(name, ": shape ", shape_text(a),
                                                       ": the leading (batch) axes do not form one dense axis"));
        if (n == 1) n_stride = stride;
        n *= extent;
        next_stride = n_stride * n;
    }
    r.extent[0] = n;
    r.stride[0] = n_stride;
    if (place_of(a) == place::other)
        throw tpo::shape_error(tpo::detail::concat(name, ": on a device of DLPack type ", a.device_type(),
                                                   ", expected CPU or CUDA memory"));
    return r;
}

std::size_t element_bytes(element e) {
    switch (e) {
    case element::u8: return 1;
    case element::bf16:
    case element::f16: return 2;
    case element::f32:
    case element::i32: return 4;
    default: return 8;
    }
}

/// The bytes a dense image covers.
std::pair<const char*, const char*> span_of(const image_ref& r) {
    index_t size = 1;
    for (index_t e : r.extent) size *= e;
    const auto* first = static_cast<const char*>(r.data);
    return {first, first + size * static_cast<index_t>(element_bytes(r.type))};
}

tpo::schedule_options schedule(int step, const std::string& kind, int steps, std::optional<double> beta_start,
                               std::optional<double> beta_end, bool zero_snr) {
    tpo::schedule_options s;
    s.kind = tpo::parse_beta_schedule(kind);
    tpo::detail::require(steps >= 1, "steps = ", steps, ", expected at least 1");
    tpo::detail::require(step >= 0 && step < steps, "step = ", step, ", expected 0 <= step < steps (", steps, ")");
    s.steps = steps;
    s.beta_start = beta_start;
    s.beta_end = beta_end;
    s.zero_terminal_snr = zero_snr;
    return s;
}

corruption_kind parse_kind(const std::string& kind) {
    if (kind == "diffusion") return corruption_kind::diffusion;
    if (kind == "crop") return corruption_kind::crop;
    if (kind == "blur") return corruption_kind::blur;
    if (kind == "patch_mask") return corruption_kind::patch_mask;
    if (kind == "mean") return corruption_kind::mean;
    if (kind == "noise") return corruption_kind::noise;
    throw tpo::value_error(tpo::detail::concat("kind: '", kind, "', expected diffusion, crop, blur, patch_mask, "
                                               "mean or noise"));
}

void corrupt(const std::string& kind, nb::handle image, nb::handle out, const std::string& layout, int step,
             const std::string& schedule_kind, int steps, std::optional<double> beta_start,
             std::optional<double> beta_end, bool zero_snr, std::uint64_t seed, std::uint64_t stream,
             const std::string& space, bool wrap, double min_area, double max_area, double min_aspect,
             double max_aspect, int kernel_size, double min_sigma, double max_sigma, index_t patch_size, double ratio,
             int threads, std::uintptr_t cuda_stream) {
    if (layout != "chw" && layout != "hwc")
        throw tpo::value_error(tpo::detail::concat("layout: '", layout, "', expected chw or hwc"));
    corruption c;
    c.kind = parse_kind(kind);
    c.seed = seed;
    c.stream = stream;
    c.overflow = wrap ? tpo::overflow_mode::wrap : tpo::overflow_mode::clamp;
    const tpo::noise_space noise_space = tpo::parse_noise_space(space);
    c.diffusion.schedule = schedule(step, schedule_kind, steps, beta_start, beta_end, zero_snr);
    c.diffusion.step = step;
    c.diffusion.seed = seed;
    c.diffusion.stream = stream;
    c.diffusion.space = noise_space;
    c.diffusion.overflow = c.overflow;
    c.crop = {min_area, max_area, min_aspect, max_aspect, seed, stream, c.overflow};
    c.blur.kernel_size = kernel_size;
    c.blur.min_sigma = min_sigma;
    c.blur.max_sigma = max_sigma;
    c.blur.seed = seed;
    c.blur.stream = stream;
    c.blur.overflow = c.overflow;
    c.patch_mask.patch_size = patch_size;
    c.patch_mask.ratio = ratio;
    c.patch_mask.seed = seed;
    c.patch_mask.stream = stream;
    c.patch_mask.overflow = c.overflow;

    const typed_array<input_array> typed_in =
        cast_array<input_array>(image, "image", "an array the library can read in place");
    const typed_array<output_array> typed_out = cast_array<output_array>(out, "out", "a writable array");
    const input_array& in = typed_in.array;
    const output_array& target = typed_out.array;
    image_ref source = image_of(in, layout, "image"), result = image_of(target, layout, "out");
    if (typed_in.bfloat16_bits) source.type = element::bf16;
    if (typed_out.bfloat16_bits) result.type = element::bf16;
    const element pixel_types[] = {element::u8, element::f32, element::f64, element::bf16, element::f16};
    tpo::detail::require<tpo::shape_error>(std::find(std::begin(pixel_types), std::end(pixel_types), source.type) !=
                                               std::end(pixel_types),
                                           "image: dtype ", dtype_text(in.dtype()),
                                           ", expected uint8, float32, float64, bfloat16 or float16");
    tpo::detail::require<tpo::shape_error>(result.type == source.type, "out: dtype ", element_name(result.type),
                                           ", expected ", element_name(source.type), " as the image");
    tpo::detail::require<tpo::shape_error>(place_of(in) == place_of(target) && in.device_id() == target.device_id(),
                                           "out: not in the memory of the image");
    // Validated here as well as by the corruption, so that a bad image fails before anything is
    // written (mean and noise read no input).
    (void)tpo::image_view<const char>::strided(static_cast<const char*>(source.data), source.extent, source.stride);
    (void)tpo::image_view<char>::strided(static_cast<char*>(result.data), result.extent, result.stride);
    const auto [in_first, in_last] = span_of(source);
    const auto [out_first, out_last] = span_of(result);
    const bool overlap = in_first < out_last && out_first < in_last;
    const bool same = source.data == result.data && source.stride == result.stride;
    if (c.kind != corruption_kind::mean && c.kind != corruption_kind::noise) {
        tpo::detail::require<tpo::shape_error>(!overlap || (same && c.kind != corruption_kind::crop), "out: ",
                                               c.kind == corruption_kind::crop
                                                   ? "overlaps the image; the crop reads other pixels than it "
                                                     "writes, pass a separate array"
                                                   : "overlaps the image without being it; pass the image itself "
                                                     "or a separate array");
    }
    if (place_of(in) == place::cuda) {
        tpo::detail::require<tpo::shape_error>(built_with_cuda(), "image: CUDA memory, but this package was built "
                                               "without CUDA; move it to the CPU or rebuild with CUDA");
        corrupt_cuda(c, source, result, cuda_stream, in.device_id());
        return;
    }
    nb::gil_scoped_release release;
#if defined(TPO_PYTHON_WITH_CPU_BACKEND)
    tpo::backend::cpu backend(threads);
#else
    (void)threads;
    tpo::backend::reference backend;
#endif
    apply_corruption(backend, c, source, result);
}

}  // namespace

void bind_corrupt(nb::module_& m) {
    m.def("corrupt", &corrupt, nb::arg("kind"), nb::arg("image"), nb::arg("out"), nb::kw_only(), nb::arg("layout"),
          nb::arg("step"), nb::arg("schedule"), nb::arg("steps"), nb::arg("beta_start").none(),
          nb::arg("beta_end").none(), nb::arg("zero_snr"), nb::arg("seed"), nb::arg("stream"), nb::arg("space"),
          nb::arg("wrap"), nb::arg("min_area"), nb::arg("max_area"), nb::arg("min_aspect"), nb::arg("max_aspect"),
          nb::arg("kernel_size"), nb::arg("min_sigma"), nb::arg("max_sigma"), nb::arg("patch_size"),
          nb::arg("ratio"), nb::arg("threads"), nb::arg("cuda_stream"));
    m.def(
        "alpha_bars",
        [](const std::string& kind, int steps, std::optional<double> beta_start, std::optional<double> beta_end,
           bool zero_snr) { return to_numpy(tpo::alpha_bars(schedule(0, kind, steps, beta_start, beta_end, zero_snr))); },
        nb::kw_only(), nb::arg("schedule"), nb::arg("steps"), nb::arg("beta_start").none(), nb::arg("beta_end").none(),
        nb::arg("zero_snr"));
}

}  // namespace tpo_python
