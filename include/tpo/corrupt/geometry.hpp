#pragma once
// Shared pieces of the spatial corruptions: walking an image in logical (n, c, y, x) order and
// sampling it bilinearly or with reflected borders.

#include <cmath>

#include "tpo/core/views.hpp"
#include "tpo/corrupt/pixel.hpp"

TPO_BEGIN_NAMESPACE
namespace corrupt {

struct pixel_coordinate {
    index_t n, c, y, x;
};

/// Logical index ((n·C + c)·H + y)·W + x → coordinates, whatever the memory order.
template <class T>
TPO_HOST_DEVICE inline pixel_coordinate coordinate_of(const image_view<T>& img, index_t i) {
    const index_t w = img.extent[3], h = img.extent[2], c = img.extent[1];
    return {i / (w * h * c), (i / (w * h)) % c, (i / w) % h, i % w};
}

/// Mirror an index into [0, size) without repeating the edge (PyTorch's "reflect" padding).
TPO_HOST_DEVICE inline index_t reflect(index_t i, index_t size) {
    if (size == 1) return 0;
    const index_t period = 2 * (size - 1);
    i %= period;
    if (i < 0) i += period;
    return i < size ? i : period - i;
}

}  // namespace corrupt
TPO_END_NAMESPACE
