#pragma once
// Non-owning views of the data (docs/formulas.md#notation-and-data-layout). A view is a pointer
// plus its shape; it never copies, so the same view type describes host memory and device memory
// alike. Shape checks live in
// the constructors' callers (tpo::check_* below) so that device code can build views freely.

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

#include "tpo/core/config.hpp"
#include "tpo/core/element.hpp"
#include "tpo/core/error.hpp"

TPO_BEGIN_NAMESPACE

using index_t = std::int64_t;

/// Logits `(S, L, V)`, row-major and contiguous: row `(s, t)` starts at `(s·L + t)·V`.
template <class T>
struct logits_view {
    T* data = nullptr;
    index_t sequences = 0;  // S
    index_t length = 0;     // L
    index_t vocab = 0;      // V

    TPO_HOST_DEVICE index_t rows() const { return sequences * length; }
    TPO_HOST_DEVICE index_t size() const { return sequences * length * vocab; }
    TPO_HOST_DEVICE T* row(index_t s, index_t t) const { return data + (s * length + t) * vocab; }
    TPO_HOST_DEVICE bool empty() const { return data == nullptr; }
    TPO_HOST_DEVICE operator logits_view<const T>() const { return {data, sequences, length, vocab}; }
};

/// Integer labels `(S, L)`.
template <class I>
struct labels_view {
    I* data = nullptr;
    index_t sequences = 0;
    index_t length = 0;

    TPO_HOST_DEVICE I at(index_t s, index_t t) const { return data[s * length + t]; }
    TPO_HOST_DEVICE operator labels_view<const I>() const { return {data, sequences, length}; }
};

/// Per-token real values `(S, L)` aligned with the labels (caller-supplied token weights).
template <class T>
struct token_values_view {
    T* data = nullptr;
    index_t sequences = 0;
    index_t length = 0;

    TPO_HOST_DEVICE bool empty() const { return data == nullptr; }
    TPO_HOST_DEVICE T at(index_t s, index_t t) const { return data[s * length + t]; }
    TPO_HOST_DEVICE operator token_values_view<const T>() const { return {data, sequences, length}; }
};

/// One real value per sequence `(S)` (precomputed reference sequence scores).
template <class T>
struct sequence_values_view {
    T* data = nullptr;
    index_t sequences = 0;

    TPO_HOST_DEVICE bool empty() const { return data == nullptr; }
    TPO_HOST_DEVICE operator sequence_values_view<const T>() const { return {data, sequences}; }
};

/// Hidden states `(S, L, H)` of the last layer, row-major and contiguous: the input of the lm_head.
template <class T>
struct hidden_view {
    T* data = nullptr;
    index_t sequences = 0;  // S
    index_t length = 0;     // L
    index_t hidden = 0;     // H

    TPO_HOST_DEVICE index_t rows() const { return sequences * length; }
    TPO_HOST_DEVICE index_t size() const { return sequences * length * hidden; }
    TPO_HOST_DEVICE T* row(index_t s, index_t t) const { return data + (s * length + t) * hidden; }
    TPO_HOST_DEVICE bool empty() const { return data == nullptr; }
    TPO_HOST_DEVICE operator hidden_view<const T>() const { return {data, sequences, length, hidden}; }
};

/// The lm_head: weight `(V, H)` row-major (row v holds the weights of vocabulary entry v), and an
/// optional bias `(V)` (null when the head has none). Logits are u = h·Wᵀ + b.
template <class T>
struct head_view {
    T* weight = nullptr;
    T* bias = nullptr;
    index_t vocab = 0;   // V
    index_t hidden = 0;  // H

    TPO_HOST_DEVICE bool empty() const { return weight == nullptr; }
    TPO_HOST_DEVICE T* row(index_t v) const { return weight + v * hidden; }
    TPO_HOST_DEVICE operator head_view<const T>() const { return {weight, bias, vocab, hidden}; }
};

/// How a sequence's rows pair with its labels (`docs/formulas.md#notation-and-data-layout`): with
/// the causal shift, logits row `t` is scored against label `t + 1`, so a length-L sequence has
/// L−1 scored rows.
struct row_alignment {
    bool shift = true;
    std::int64_t ignore_index = -100;

    TPO_HOST_DEVICE index_t scored_rows(index_t length) const {
        return shift ? (length > 0 ? length - 1 : 0) : length;
    }
    TPO_HOST_DEVICE index_t label_position(index_t t) const { return shift ? t + 1 : t; }
};

/// An image or a batch of images, `(N, C, H, W)` in any dense memory order (CHW, HWC, NCHW,
/// NHWC, ...): the strides say where each axis lives. Noise is indexed by memory offset
/// (`docs/formulas.md#reproducible-noise`: flat row-major element index of the buffer as stored).
template <class T>
struct image_view {
    T* data = nullptr;
    std::array<index_t, 4> extent{};  // N, C, H, W
    std::array<index_t, 4> stride{};  // in elements

    TPO_HOST_DEVICE index_t size() const { return extent[0] * extent[1] * extent[2] * extent[3]; }
    TPO_HOST_DEVICE index_t offset(index_t n, index_t c, index_t h, index_t w) const {
        return n * stride[0] + c * stride[1] + h * stride[2] + w * stride[3];
    }
    /// Channel of the element stored at `offset` (valid because the layout is dense).
    TPO_HOST_DEVICE index_t channel_of(index_t offset) const { return (offset / stride[1]) % extent[1]; }
    TPO_HOST_DEVICE operator image_view<const T>() const { return {data, extent, stride}; }

    static image_view chw(T* p, index_t c, index_t h, index_t w) { return nchw(p, 1, c, h, w); }
    static image_view hwc(T* p, index_t h, index_t w, index_t c) { return nhwc(p, 1, h, w, c); }
    static image_view nchw(T* p, index_t n, index_t c, index_t h, index_t w) {
        return checked({p, {n, c, h, w}, {c * h * w, h * w, w, 1}});
    }
    static image_view nhwc(T* p, index_t n, index_t h, index_t w, index_t c) {
        return checked({p, {n, c, h, w}, {h * w * c, 1, w * c, c}});
    }
    /// Any other dense order; throws unless the strides cover the buffer exactly once.
    static image_view strided(T* p, std::array<index_t, 4> extent, std::array<index_t, 4> stride) {
        return checked({p, extent, stride});
    }

private:
    static image_view checked(image_view v) {
        for (int axis = 0; axis < 4; ++axis)
            detail::require<shape_error>(v.extent[axis] > 0, "image: extent of axis ", "NCHW"[axis],
                                         " is ", v.extent[axis], ", expected at least 1");
        detail::require<shape_error>(v.data != nullptr, "image: null data pointer");
        // Dense: sorting axes by stride, each stride equals the product of the smaller extents.
        std::array<int, 4> order{0, 1, 2, 3};
        for (int i = 0; i < 4; ++i)
            for (int j = i + 1; j < 4; ++j)
                if (v.stride[order[j]] < v.stride[order[i]] ||
                    (v.stride[order[j]] == v.stride[order[i]] && v.extent[order[j]] < v.extent[order[i]]))
                    std::swap(order[i], order[j]);
        index_t expected = 1;
        for (int axis : order) {
            if (v.extent[axis] == 1) continue;
            detail::require<shape_error>(v.stride[axis] == expected, "image: stride of axis ", "NCHW"[axis],
                                         " is ", v.stride[axis], ", expected ", expected,
                                         " for a dense layout");
            expected *= v.extent[axis];
        }
        // Axes of extent 1 get a harmless stride so channel_of() never divides by zero.
        if (v.extent[1] == 1 && v.stride[1] == 0) v.stride[1] = 1;
        return v;
    }
};

template <class T>
std::string shape_string(const logits_view<T>& z) {
    return detail::concat("(", z.sequences, ", ", z.length, ", ", z.vocab, ")");
}
template <class T>
std::string shape_string(const hidden_view<T>& h) {
    return detail::concat("(", h.sequences, ", ", h.length, ", ", h.hidden, ")");
}
template <class T>
std::string shape_string(const head_view<T>& w) {
    return detail::concat("(", w.vocab, ", ", w.hidden, ")");
}
template <class I>
std::string shape_string(const labels_view<I>& y) {
    return detail::concat("(", y.sequences, ", ", y.length, ")");
}

TPO_END_NAMESPACE
