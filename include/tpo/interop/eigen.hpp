#pragma once
// Eigen adaptors: dense matrices and maps, and row-major Eigen::Tensor / TensorMap, as tpo views.
//
//   Eigen::Tensor<float, 3, Eigen::RowMajor> z(S, L, V);      → tpo::interop::logits(z)
//   Eigen::Matrix<float, Dynamic, Dynamic, RowMajor> m(S*L, V) → tpo::interop::logits(m, S)
//   Eigen::Matrix<std::int64_t, Dynamic, Dynamic, RowMajor> y(S, L) → tpo::interop::labels(y)
//
// A view aliases Eigen's memory, so the data must be row-major with unit inner stride and no
// padding between rows. Eigen's default is column-major: a column-major matrix is accepted only
// when it is a single column or row (where both orders coincide); otherwise it is rejected at
// compile time for tensors and at run time for strided maps.

#include <cstdint>
#include <type_traits>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/Tensor>

#include "tpo/core/error.hpp"
#include "tpo/core/views.hpp"

TPO_BEGIN_NAMESPACE
namespace interop {

namespace detail {

/// Row-major and contiguous: element (r, c) at r·cols + c, whatever Eigen's storage order.
template <class M>
void check_dense_rows(const M& m, const char* what) {
    const auto rows = m.rows(), cols = m.cols();
    const auto row_step = M::IsRowMajor ? m.outerStride() : m.innerStride();
    const auto col_step = M::IsRowMajor ? m.innerStride() : m.outerStride();
    const bool dense = rows == 0 || cols == 0 || ((cols == 1 || col_step == 1) && (rows == 1 || row_step == cols));
    tpo::detail::require<shape_error>(dense, what, ": a ", rows, "x", cols,
                                      " matrix that is not row-major contiguous (use Eigen::RowMajor storage)");
}

template <class M>
using e_value_t = std::remove_reference_t<decltype(*std::declval<M&>().data())>;

template <class TensorType, int Rank>
void check_tensor() {
    static_assert(TensorType::NumDimensions == Rank, "tpo: tensor of the wrong rank for this view");
    static_assert(static_cast<int>(TensorType::Layout) == static_cast<int>(Eigen::RowMajor),
                  "tpo: Eigen::Tensor views need Eigen::RowMajor layout (row-major (S, L, V))");
}

}  // namespace detail

// ---- dense matrices (Matrix, Map, Ref, blocks with direct access) -----------------------------

/// Logits from a (S·L, V) row-major matrix holding `sequences` sequences.
template <class M>
    requires requires(M& m) { m.data(); m.outerStride(); m.innerStride(); }
auto logits(M& m, index_t sequences) -> logits_view<detail::e_value_t<M>> {
    detail::check_dense_rows(m, "logits");
    tpo::detail::require<shape_error>(sequences >= 1 && m.rows() % sequences == 0, "logits: ", m.rows(),
                                      " rows cannot be split into ", sequences, " sequences of equal length");
    return {m.data(), sequences, static_cast<index_t>(m.rows()) / sequences, static_cast<index_t>(m.cols())};
}

/// Labels (S, L) from an (S, L) row-major integer matrix.
template <class M>
    requires requires(M& m) { m.data(); m.outerStride(); m.innerStride(); }
auto labels(M& m) -> labels_view<detail::e_value_t<M>> {
    detail::check_dense_rows(m, "labels");
    return {m.data(), static_cast<index_t>(m.rows()), static_cast<index_t>(m.cols())};
}

/// Per-token values (S, L) from an (S, L) row-major matrix.
template <class M>
    requires requires(M& m) { m.data(); m.outerStride(); m.innerStride(); }
auto token_values(M& m) -> token_values_view<detail::e_value_t<M>> {
    detail::check_dense_rows(m, "token values");
    return {m.data(), static_cast<index_t>(m.rows()), static_cast<index_t>(m.cols())};
}

// ---- Eigen::Tensor / TensorMap (row-major) ----------------------------------------------------

template <class Scalar, int Options, class Index>
logits_view<Scalar> logits(Eigen::Tensor<Scalar, 3, Options, Index>& t) {
    detail::check_tensor<Eigen::Tensor<Scalar, 3, Options, Index>, 3>();
    return {t.data(), static_cast<index_t>(t.dimension(0)), static_cast<index_t>(t.dimension(1)),
            static_cast<index_t>(t.dimension(2))};
}

template <class TensorType>
    requires(TensorType::NumDimensions == 3)
auto logits(Eigen::TensorMap<TensorType>& t) -> logits_view<std::remove_reference_t<decltype(*t.data())>> {
    detail::check_tensor<TensorType, 3>();
    return {t.data(), static_cast<index_t>(t.dimension(0)), static_cast<index_t>(t.dimension(1)),
            static_cast<index_t>(t.dimension(2))};
}

template <class Scalar, int Options, class Index>
labels_view<Scalar> labels(Eigen::Tensor<Scalar, 2, Options, Index>& t) {
    detail::check_tensor<Eigen::Tensor<Scalar, 2, Options, Index>, 2>();
    return {t.data(), static_cast<index_t>(t.dimension(0)), static_cast<index_t>(t.dimension(1))};
}

/// Images: a row-major (H, W, C) / (C, H, W) tensor, or a 4-D (N, C, H, W) / (N, H, W, C) one.
template <class Scalar, int Options, class Index>
image_view<Scalar> image_hwc(Eigen::Tensor<Scalar, 3, Options, Index>& t) {
    detail::check_tensor<Eigen::Tensor<Scalar, 3, Options, Index>, 3>();
    return image_view<Scalar>::hwc(t.data(), t.dimension(0), t.dimension(1), t.dimension(2));
}
template <class Scalar, int Options, class Index>
image_view<Scalar> image_chw(Eigen::Tensor<Scalar, 3, Options, Index>& t) {
    detail::check_tensor<Eigen::Tensor<Scalar, 3, Options, Index>, 3>();
    return image_view<Scalar>::chw(t.data(), t.dimension(0), t.dimension(1), t.dimension(2));
}
template <class Scalar, int Options, class Index>
image_view<Scalar> image_nchw(Eigen::Tensor<Scalar, 4, Options, Index>& t) {
    detail::check_tensor<Eigen::Tensor<Scalar, 4, Options, Index>, 4>();
    return image_view<Scalar>::nchw(t.data(), t.dimension(0), t.dimension(1), t.dimension(2), t.dimension(3));
}
template <class Scalar, int Options, class Index>
image_view<Scalar> image_nhwc(Eigen::Tensor<Scalar, 4, Options, Index>& t) {
    detail::check_tensor<Eigen::Tensor<Scalar, 4, Options, Index>, 4>();
    return image_view<Scalar>::nhwc(t.data(), t.dimension(0), t.dimension(1), t.dimension(2), t.dimension(3));
}

}  // namespace interop
TPO_END_NAMESPACE
