#pragma once
// xtensor adaptors: xt::xtensor / xt::xarray (and their adaptors) as tpo views, plus .npy files
// straight into xt::xarray through tpo's validating reader.
//
//   xt::xtensor<float, 3> z = ...;                  // (S, L, V)
//   xt::xtensor<std::int64_t, 2> y = ...;           // (S, L)
//   auto zv = tpo::interop::logits(z);              // logits_view<float>
//   auto yv = tpo::interop::labels(y);              // labels_view<std::int64_t>
//   auto x  = tpo::interop::load_npy<float>("img.npy");
//
// A view aliases the container's memory: it must be row-major and contiguous, which xtensor's
// default containers are; a column-major or strided one is rejected (copy it first, e.g. into
// an xt::xarray<T> with the default layout).

#include <cstddef>
#include <filesystem>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <xtensor/xadapt.hpp>
#include <xtensor/xarray.hpp>
#include <xtensor/xtensor.hpp>

#include "tpo/core/error.hpp"
#include "tpo/core/views.hpp"
#include "tpo/io/npy.hpp"

TPO_BEGIN_NAMESPACE
namespace interop {

namespace detail {

template <class E>
std::string xshape(const E& e) {
    std::string s = "(";
    for (std::size_t k = 0; k < e.dimension(); ++k) {
        if (k) s += ", ";
        s += std::to_string(e.shape()[k]);
    }
    return s + ")";
}

/// Rank and dense row-major layout (xtensor gives axes of extent 1 a stride of 0).
template <class E>
void check_xcontainer(const E& e, std::size_t rank, const char* what, const char* axes) {
    tpo::detail::require<shape_error>(e.dimension() == rank, what, ": shape ", xshape(e), " has ", e.dimension(),
                                      " dimensions, expected ", rank, " ", axes);
    std::ptrdiff_t expected = 1;
    for (std::size_t k = rank; k-- > 0;) {
        const auto extent = static_cast<std::ptrdiff_t>(e.shape()[k]);
        const auto stride = static_cast<std::ptrdiff_t>(e.strides()[k]);
        tpo::detail::require<shape_error>(extent <= 1 || stride == expected, what, ": shape ", xshape(e),
                                          " is not row-major contiguous (stride ", stride, " on axis ", k,
                                          ", expected ", expected, ")");
        expected *= extent;
    }
}

template <class E>
using x_value_t = std::remove_reference_t<decltype(*std::declval<E&>().data())>;

template <class E>
concept xcontainer = requires(E& e) {
    e.data();
    e.shape();
    e.strides();
    e.dimension();
};

}  // namespace detail

/// Logits (S, L, V) from a 3-D row-major xtensor container.
template <detail::xcontainer E>
auto logits(E& e) -> logits_view<detail::x_value_t<E>> {
    detail::check_xcontainer(e, 3, "logits", "(S, L, V)");
    return {e.data(), static_cast<index_t>(e.shape()[0]), static_cast<index_t>(e.shape()[1]),
            static_cast<index_t>(e.shape()[2])};
}

/// Labels (S, L) from a 2-D row-major xtensor container of int32 or int64.
template <detail::xcontainer E>
auto labels(E& e) -> labels_view<detail::x_value_t<E>> {
    detail::check_xcontainer(e, 2, "labels", "(S, L)");
    return {e.data(), static_cast<index_t>(e.shape()[0]), static_cast<index_t>(e.shape()[1])};
}

/// Per-token values (S, L).
template <detail::xcontainer E>
auto token_values(E& e) -> token_values_view<detail::x_value_t<E>> {
    detail::check_xcontainer(e, 2, "token values", "(S, L)");
    return {e.data(), static_cast<index_t>(e.shape()[0]), static_cast<index_t>(e.shape()[1])};
}

/// Images in the usual layouts.
template <detail::xcontainer E>
auto image_hwc(E& e) -> image_view<detail::x_value_t<E>> {
    detail::check_xcontainer(e, 3, "image", "(H, W, C)");
    const auto& s = e.shape();
    return image_view<detail::x_value_t<E>>::hwc(e.data(), s[0], s[1], s[2]);
}
template <detail::xcontainer E>
auto image_chw(E& e) -> image_view<detail::x_value_t<E>> {
    detail::check_xcontainer(e, 3, "image", "(C, H, W)");
    const auto& s = e.shape();
    return image_view<detail::x_value_t<E>>::chw(e.data(), s[0], s[1], s[2]);
}
template <detail::xcontainer E>
auto image_nchw(E& e) -> image_view<detail::x_value_t<E>> {
    detail::check_xcontainer(e, 4, "image", "(N, C, H, W)");
    const auto& s = e.shape();
    return image_view<detail::x_value_t<E>>::nchw(e.data(), s[0], s[1], s[2], s[3]);
}
template <detail::xcontainer E>
auto image_nhwc(E& e) -> image_view<detail::x_value_t<E>> {
    detail::check_xcontainer(e, 4, "image", "(N, H, W, C)");
    const auto& s = e.shape();
    return image_view<detail::x_value_t<E>>::nhwc(e.data(), s[0], s[1], s[2], s[3]);
}

/// Reads a .npy file (validated by tpo::io) into an xt::xarray<T>; the file's dtype must be T's.
template <class T>
xt::xarray<T> load_npy(const std::filesystem::path& path) {
    io::npy_array a = io::read_npy(path);
    if (a.dtype != io::dtype_of<T>())
        throw io::format_error(tpo::detail::concat(path.string(), ": descr: ", io::descr(a.dtype), ", expected '",
                                                   io::descr(io::dtype_of<T>()), "'"));
    std::vector<std::size_t> shape(a.shape.begin(), a.shape.end());
    xt::xarray<T> out = xt::xarray<T>::from_shape(shape);
    std::vector<T>& v = a.values<T>();
    std::copy(v.begin(), v.end(), out.data());
    return out;
}

/// Writes any xtensor expression to a .npy file (atomically, C order).
template <class E>
void save_npy(const std::filesystem::path& path, const xt::xexpression<E>& e) {
    using T = typename E::value_type;
    const xt::xarray<T, xt::layout_type::row_major> a = e.derived_cast();
    std::vector<std::int64_t> shape(a.shape().begin(), a.shape().end());
    io::write_npy<T>(path, shape, std::span<const T>(a.data(), a.size()));
}

}  // namespace interop
TPO_END_NAMESPACE
