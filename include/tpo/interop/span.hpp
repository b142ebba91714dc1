#pragma once
// Views from raw pointers with shapes, or from std::span, with the checks a bare aggregate
// initialisation skips: non-negative extents, a non-null pointer for a non-empty tensor, and
// (for spans) a buffer of exactly the size the shape describes.
//
//   auto z = tpo::interop::logits(std::span(buffer), S, L, V);   // logits_view<float>
//   auto y = tpo::interop::labels(ids.data(), S, L);              // labels_view<std::int64_t>

#include <cstddef>
#include <span>

#include "tpo/core/element.hpp"
#include "tpo/core/error.hpp"
#include "tpo/core/views.hpp"

TPO_BEGIN_NAMESPACE
namespace interop {

namespace detail {

inline index_t checked_size(const char* what, std::initializer_list<index_t> extents) {
    index_t n = 1;
    for (index_t e : extents) {
        tpo::detail::require<shape_error>(e >= 0, what, ": negative extent ", e);
        n *= e;
    }
    return n;
}

template <class T>
void check_pointer(const char* what, T* data, index_t size) {
    tpo::detail::require<shape_error>(data != nullptr || size == 0, what, ": null data pointer for ", size,
                                      " elements");
}

template <class T, std::size_t E>
void check_span(const char* what, std::span<T, E> data, index_t size, const std::string& shape) {
    tpo::detail::require<shape_error>(static_cast<index_t>(data.size()) == size, what, ": buffer of ", data.size(),
                                      " elements, expected ", size, " for shape ", shape);
}

}  // namespace detail

/// Logits (S, L, V), row-major and contiguous.
template <class T>
    requires logit_element<T>
logits_view<T> logits(T* data, index_t sequences, index_t length, index_t vocab) {
    const index_t n = detail::checked_size("logits", {sequences, length, vocab});
    detail::check_pointer("logits", data, n);
    return {data, sequences, length, vocab};
}

template <class T, std::size_t E>
    requires logit_element<T>
logits_view<T> logits(std::span<T, E> data, index_t sequences, index_t length, index_t vocab) {
    const index_t n = detail::checked_size("logits", {sequences, length, vocab});
    detail::check_span("logits", data, n, tpo::detail::concat("(", sequences, ", ", length, ", ", vocab, ")"));
    return {data.data(), sequences, length, vocab};
}

/// Labels (S, L).
template <class I>
    requires label_element<I>
labels_view<I> labels(I* data, index_t sequences, index_t length) {
    const index_t n = detail::checked_size("labels", {sequences, length});
    detail::check_pointer("labels", data, n);
    return {data, sequences, length};
}

template <class I, std::size_t E>
    requires label_element<I>
labels_view<I> labels(std::span<I, E> data, index_t sequences, index_t length) {
    const index_t n = detail::checked_size("labels", {sequences, length});
    detail::check_span("labels", data, n, tpo::detail::concat("(", sequences, ", ", length, ")"));
    return {data.data(), sequences, length};
}

/// Per-token values (S, L), e.g. caller-supplied token weights.
template <class T, std::size_t E>
token_values_view<T> token_values(std::span<T, E> data, index_t sequences, index_t length) {
    const index_t n = detail::checked_size("token values", {sequences, length});
    detail::check_span("token values", data, n, tpo::detail::concat("(", sequences, ", ", length, ")"));
    return {data.data(), sequences, length};
}

/// Images: a dense buffer in one of the usual layouts (image_view checks extents and pointer).
template <class T, std::size_t E>
image_view<T> image_hwc(std::span<T, E> data, index_t height, index_t width, index_t channels) {
    detail::check_span("image", data, detail::checked_size("image", {height, width, channels}),
                       tpo::detail::concat("(H, W, C) = (", height, ", ", width, ", ", channels, ")"));
    return image_view<T>::hwc(data.data(), height, width, channels);
}

template <class T, std::size_t E>
image_view<T> image_chw(std::span<T, E> data, index_t channels, index_t height, index_t width) {
    detail::check_span("image", data, detail::checked_size("image", {channels, height, width}),
                       tpo::detail::concat("(C, H, W) = (", channels, ", ", height, ", ", width, ")"));
    return image_view<T>::chw(data.data(), channels, height, width);
}

template <class T, std::size_t E>
image_view<T> image_nchw(std::span<T, E> data, index_t n, index_t channels, index_t height, index_t width) {
    detail::check_span("image", data, detail::checked_size("image", {n, channels, height, width}),
                       tpo::detail::concat("(N, C, H, W) = (", n, ", ", channels, ", ", height, ", ", width, ")"));
    return image_view<T>::nchw(data.data(), n, channels, height, width);
}

template <class T, std::size_t E>
image_view<T> image_nhwc(std::span<T, E> data, index_t n, index_t height, index_t width, index_t channels) {
    detail::check_span("image", data, detail::checked_size("image", {n, height, width, channels}),
                       tpo::detail::concat("(N, H, W, C) = (", n, ", ", height, ", ", width, ", ", channels, ")"));
    return image_view<T>::nhwc(data.data(), n, height, width, channels);
}

}  // namespace interop
TPO_END_NAMESPACE
