#pragma once
// What the extension module runs, free of Python: arrays arrive as tensor_refs (pointer, element
// type, shape), an engine owns one backend and one tpo::objective on it and turns the refs into
// typed views. The nanobind layer (module.cpp, objective.cpp) builds the refs; the CUDA engine
// (cuda.cu) compiles this same header with nvcc, so host and device share every line below.
//
// Inputs are typed at run time: logits (or hidden states) in float32, float64, bfloat16 or float16
// (all of one batch alike, the lm_head too), labels int32 or int64, caller token weights float32,
// reference scores float64. With hidden states in, the roles of side_refs hold (P, L, H) states
// and batch_refs the lm_heads.

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "tpo/core/element.hpp"
#include "tpo/core/error.hpp"
#include "tpo/core/views.hpp"
#include "tpo/loss/objective.hpp"
#include "tpo/loss/options.hpp"
#include "tpo/reward/token_scores.hpp"

namespace tpo_python {

using tpo::index_t;

enum class element { none, f32, f64, bf16, f16, i32, i64, u8, other };

inline const char* element_name(element e) {
    switch (e) {
    case element::none: return "none";
    case element::f32: return "float32";
    case element::f64: return "float64";
    case element::bf16: return "bfloat16";
    case element::f16: return "float16";
    case element::i32: return "int32";
    case element::i64: return "int64";
    case element::u8: return "uint8";
    case element::other: return "unsupported";
    }
    return "?";
}

/// A C-contiguous array already checked by the caller: rank, shape, element type.
struct tensor_ref {
    void* data = nullptr;
    element type = element::none;
    int rank = 0;
    std::array<index_t, 3> shape{};

    bool given() const { return type != element::none; }
};

/// One side's inputs (objective.hpp's side_batch, untyped).
struct side_refs {
    tensor_ref policy, policy_noisy, reference, reference_noisy, labels, weights, reference_scores;
};

struct batch_refs {
    side_refs chosen, rejected;
    bool hidden = false;  // the roles are hidden states; the lm_heads below make them logits
    tensor_ref head, head_bias, reference_head, reference_head_bias;
};

/// Where ∂L/∂(policy logits or hidden states) goes, and ∂L/∂(lm_head weight, bias) with hidden
/// states in; an absent ref is not computed.
struct gradient_refs {
    tensor_ref chosen_policy, chosen_policy_noisy, rejected_policy, rejected_policy_noisy;
    tensor_ref head, head_bias;
};

/// One side's token values (tpo::token_scores), as the module asks for them.
struct token_score_request {
    tensor_ref clean, noisy, labels;
    tpo::response_side side = tpo::response_side::chosen;
    tpo::score_kind score = tpo::score_kind::logit;
    double a = 0.5;
    tpo::row_alignment alignment{};
};

class engine {
public:
    virtual ~engine() = default;
    virtual tpo::objective_result forward(const batch_refs& batch) = 0;
    virtual void backward(const batch_refs& batch, const gradient_refs& grads) = 0;
    virtual tpo::token_score_table token_scores(const token_score_request& request) = 0;
};

namespace detail {

template <class T>
tpo::logits_view<const T> logits(const tensor_ref& r) {
    if (!r.given()) return {};
    return {static_cast<const T*>(r.data), r.shape[0], r.shape[1], r.shape[2]};
}
template <class T>
tpo::logits_view<T> gradient(const tensor_ref& r) {
    if (!r.given()) return {};
    return {static_cast<T*>(r.data), r.shape[0], r.shape[1], r.shape[2]};
}
template <class I>
tpo::labels_view<const I> labels(const tensor_ref& r) {
    return {static_cast<const I*>(r.data), r.shape[0], r.shape[1]};
}
inline tpo::token_values_view<const float> weights(const tensor_ref& r) {
    if (!r.given()) return {};
    return {static_cast<const float*>(r.data), r.shape[0], r.shape[1]};
}
inline tpo::sequence_values_view<const double> scores(const tensor_ref& r) {
    if (!r.given()) return {};
    return {static_cast<const double*>(r.data), r.shape[0]};
}

template <class T>
tpo::hidden_view<const T> hidden(const tensor_ref& r) {
    if (!r.given()) return {};
    return {static_cast<const T*>(r.data), r.shape[0], r.shape[1], r.shape[2]};
}
template <class T>
tpo::hidden_view<T> hidden_gradient(const tensor_ref& r) {
    if (!r.given()) return {};
    return {static_cast<T*>(r.data), r.shape[0], r.shape[1], r.shape[2]};
}
template <class T>
tpo::head_view<const T> head(const tensor_ref& weight, const tensor_ref& bias) {
    if (!weight.given()) return {};
    return {static_cast<const T*>(weight.data), bias.given() ? static_cast<const T*>(bias.data) : nullptr,
            weight.shape[0], weight.shape[1]};
}

template <class T, class I>
tpo::hidden_side_batch<T, I> hidden_side(const side_refs& s) {
    tpo::hidden_side_batch<T, I> b;
    b.policy = hidden<T>(s.policy);
    b.policy_noisy = hidden<T>(s.policy_noisy);
    b.reference = hidden<T>(s.reference);
    b.reference_noisy = hidden<T>(s.reference_noisy);
    b.labels = labels<I>(s.labels);
    b.weights = weights(s.weights);
    b.reference_scores = scores(s.reference_scores);
    return b;
}

template <class T, class I>
tpo::side_batch<T, I> side(const side_refs& s) {
    tpo::side_batch<T, I> b;
    b.policy = logits<T>(s.policy);
    b.policy_noisy = logits<T>(s.policy_noisy);
    b.reference = logits<T>(s.reference);
    b.reference_noisy = logits<T>(s.reference_noisy);
    b.labels = labels<I>(s.labels);
    b.weights = weights(s.weights);
    b.reference_scores = scores(s.reference_scores);
    return b;
}

/// Calls f.template operator()<T>() with the logits element type `e`.
template <class F>
decltype(auto) with_logits_type(element e, F&& f) {
    switch (e) {
    case element::f32: return f.template operator()<float>();
    case element::f64: return f.template operator()<double>();
    case element::bf16: return f.template operator()<tpo::bfloat16>();
    case element::f16: return f.template operator()<tpo::float16>();
    default: break;
    }
    throw tpo::shape_error(tpo::detail::concat("logits: dtype ", element_name(e),
                                               ", expected float32, float64, bfloat16 or float16"));
}

template <class F>
decltype(auto) with_label_type(element e, F&& f) {
    switch (e) {
    case element::i64: return f.template operator()<std::int64_t>();
    case element::i32: return f.template operator()<std::int32_t>();
    default: break;
    }
    throw tpo::shape_error(tpo::detail::concat("labels: dtype ", element_name(e), ", expected int64 or int32"));
}

/// A typed batch and its element type, so the engine's visitors can tell logits from hidden
/// states. At namespace scope: nvcc names kernels after the types they are instantiated with, and
/// its generated host stubs cannot reach a class's private members.
template <class T, class Batch>
struct typed_batch {
    using element = T;
    Batch batch;
};
template <class Batch>
inline constexpr bool is_hidden_batch = requires(const Batch& b) { b.batch.head; };

}  // namespace detail

/// An engine on backend B. `B` is built first and outlives the objective that refers to it.
template <class B>
class backend_engine final : public engine {
public:
    template <class... Args>
    backend_engine(const tpo::objective_options& options, Args&&... backend_args)
        : backend_(std::forward<Args>(backend_args)...), objective_(backend_, options) {}

    tpo::objective_result forward(const batch_refs& batch) override {
        return dispatch(batch, [&]<class Batch>(const Batch& b) -> tpo::objective_result {
            if constexpr (runs<Batch>()) return objective_.forward(b.batch);
            throw no_head_support();
        });
    }

    void backward(const batch_refs& batch, const gradient_refs& g) override {
        dispatch(batch, [&]<class Batch>(const Batch& b) {
            if constexpr (!runs<Batch>()) {
                throw no_head_support();
            } else if constexpr (is_hidden<Batch>) {
                using T = typename Batch::element;
                const tpo::hidden_gradients<T> grads{
                    {detail::hidden_gradient<T>(g.chosen_policy), detail::hidden_gradient<T>(g.chosen_policy_noisy)},
                    {detail::hidden_gradient<T>(g.rejected_policy), detail::hidden_gradient<T>(g.rejected_policy_noisy)},
                    static_cast<T*>(g.head.data),
                    static_cast<T*>(g.head_bias.data)};
                objective_.backward(b.batch, grads);
            } else {
                using T = typename Batch::element;
                const tpo::preference_gradients<T> grads{
                    {detail::gradient<T>(g.chosen_policy), detail::gradient<T>(g.chosen_policy_noisy)},
                    {detail::gradient<T>(g.rejected_policy), detail::gradient<T>(g.rejected_policy_noisy)}};
                objective_.backward(b.batch, grads);
            }
            return 0;
        });
    }

    tpo::token_score_table token_scores(const token_score_request& r) override {
        return detail::with_logits_type(r.clean.type, [&]<class T>() {
            return detail::with_label_type(r.labels.type, [&]<class I>() {
                return tpo::token_scores(backend_, detail::logits<T>(r.clean), detail::logits<T>(r.noisy),
                                         detail::labels<I>(r.labels), r.side, r.score, r.a, r.alignment);
            });
        });
    }

private:
    template <class T, class Batch>
    using typed = detail::typed_batch<T, Batch>;
    template <class Batch>
    static constexpr bool is_hidden = detail::is_hidden_batch<Batch>;
    /// Hidden states need a backend that multiplies matrices (tpo::head_backend).
    template <class Batch>
    static constexpr bool runs() {
        if constexpr (is_hidden<Batch>) return tpo::head_backend<B>;
        else return true;
    }
    static tpo::error no_head_support() {
        return tpo::error("hidden states: this backend has no fused lm_head path; pass logits");
    }

    template <class F>
    decltype(auto) dispatch(const batch_refs& batch, F&& f) {
        return detail::with_logits_type(batch.chosen.policy.type, [&]<class T>() {
            return detail::with_label_type(batch.chosen.labels.type, [&]<class I>() {
                if (batch.hidden) {
                    using hidden_batch = tpo::hidden_preference_batch<T, I>;
                    const typed<T, hidden_batch> b{hidden_batch{
                        detail::head<T>(batch.head, batch.head_bias),
                        detail::head<T>(batch.reference_head, batch.reference_head_bias),
                        detail::hidden_side<T, I>(batch.chosen), detail::hidden_side<T, I>(batch.rejected)}};
                    return f(b);
                }
                const typed<T, tpo::preference_batch<T, I>> b{
                    {detail::side<T, I>(batch.chosen), detail::side<T, I>(batch.rejected)}};
                return f(b);
            });
        });
    }

    B backend_;
    tpo::objective<B> objective_;
};

/// The CUDA engine (cuda.cu): tpo::backend::thrust<thrust::cuda::tag> on `stream` (a cudaStream_t
/// as an integer) of device `device`. Declared always; defined only in a CUDA build.
std::unique_ptr<engine> make_cuda_engine(const tpo::objective_options& options, std::uintptr_t stream, int device);
bool built_with_cuda();

}  // namespace tpo_python
