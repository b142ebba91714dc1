#pragma once
// Views of Thrust vectors (thrust::device_vector, thrust::host_vector, a system's vector), so that a
// trainer holding its tensors in Thrust containers hands them to tpo without a copy. Raw device
// pointers need no adaptor: logits_view{pointer, S, L, V} is the view.

#include <thrust/memory.h>

#include <type_traits>
#include <utility>

#include "tpo/core/error.hpp"
#include "tpo/core/views.hpp"

TPO_BEGIN_NAMESPACE

namespace detail {
template <class Vector>
using thrust_element_t = std::remove_reference_t<decltype(*::thrust::raw_pointer_cast(std::declval<Vector&>().data()))>;

template <class Vector>
auto thrust_data(Vector& v, index_t expected, const char* what) {
    require<shape_error>(static_cast<index_t>(v.size()) == expected, what, ": vector holds ", v.size(),
                         " elements, the shape needs ", expected);
    return ::thrust::raw_pointer_cast(v.data());
}
}  // namespace detail

/// `(S, L, V)` logits in a Thrust vector; const vectors give views of const elements.
template <class Vector>
logits_view<detail::thrust_element_t<Vector>> logits_of(Vector& v, index_t sequences, index_t length, index_t vocab) {
    return {detail::thrust_data(v, sequences * length * vocab, "logits"), sequences, length, vocab};
}

/// `(S, L)` labels in a Thrust vector.
template <class Vector>
labels_view<detail::thrust_element_t<Vector>> labels_of(Vector& v, index_t sequences, index_t length) {
    return {detail::thrust_data(v, sequences * length, "labels"), sequences, length};
}

/// `(S, L)` token values (caller weights) in a Thrust vector.
template <class Vector>
token_values_view<detail::thrust_element_t<Vector>> token_values_of(Vector& v, index_t sequences, index_t length) {
    return {detail::thrust_data(v, sequences * length, "token values"), sequences, length};
}

/// `(S)` per-sequence values (precomputed reference scores, side_batch::reference_scores) in a
/// Thrust vector.
template <class Vector>
sequence_values_view<detail::thrust_element_t<Vector>> sequence_values_of(Vector& v, index_t sequences) {
    return {detail::thrust_data(v, sequences, "sequence values"), sequences};
}

TPO_END_NAMESPACE
