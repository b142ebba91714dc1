#pragma once
// TPO (and the rest of the DPO family) for libtorch trainers: one autograd function whose forward
// and backward are tpo's, computed on the tensors' own memory.
//
//   torch::Tensor loss = tpo_torch::preference_loss(
//       {.policy_chosen = zw, .policy_chosen_noisy = zw_noisy, .policy_rejected = zl, ...,
//        .labels_chosen = yw, .labels_rejected = yl},
//       options, &metrics);
//   loss.backward();   // ∂loss/∂logits flow back into the model
//
// Logits are (P, L, V) CPU tensors of float32, float64, bfloat16 or float16; labels (P, L) int64
// or int32. Non-contiguous inputs are made contiguous (a copy). The reference logits are
// constants: no gradient flows into them. The gradients are computed during the forward, when a
// policy tensor requires them (one pass re-reads the logits), and kept until backward: the same
// O(P·L·V) memory libtorch's own log_softmax would keep.
//
// CUDA tensors are rejected: a CUDA path (tpo::backend::thrust<thrust::cuda::tag> on the current
// stream) needs this file compiled by nvcc against a CUDA build of libtorch, which is not part of
// what this example builds or tests.

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include <tpo/tpo.hpp>
#if defined(TPO_TORCH_WITH_CPU_BACKEND)
#  include <tpo/backend/cpu.hpp>
#endif

namespace tpo_torch {

/// The tensors of one preference batch. The noisy ones are needed for TPO's self-calibrated
/// weights only (tpo::token_weighting::self_calibrated); leave them undefined for plain DPO.
struct batch_tensors {
    torch::Tensor policy_chosen, policy_chosen_noisy, policy_rejected, policy_rejected_noisy;
    torch::Tensor reference_chosen, reference_chosen_noisy, reference_rejected, reference_rejected_noisy;
    torch::Tensor labels_chosen, labels_rejected;
};

namespace detail {

#if defined(TPO_TORCH_WITH_CPU_BACKEND)
using backend_type = tpo::backend::cpu;
#else
using backend_type = tpo::backend::reference;
#endif

// libtorch's autograd cannot take an undefined tensor as an input, so an absent one travels as an
// empty 1-d tensor and becomes undefined again here.
inline torch::Tensor absent() { return torch::empty({0}); }

inline torch::Tensor checked(const torch::Tensor& t, const char* name, std::int64_t rank) {
    if (!t.defined() || (t.dim() == 1 && t.numel() == 0)) return {};
    TORCH_CHECK(t.device().is_cpu(), "tpo_torch: ", name, " is on ", t.device(),
                ", expected a CPU tensor (see tpo_torch.hpp about CUDA)");
    TORCH_CHECK(t.dim() == rank, "tpo_torch: ", name, " has shape ", t.sizes(), ", expected ", rank, " dimensions");
    return t.contiguous();
}

// tpo's 16-bit types are plain bit containers with the same layout as c10's.
template <class T>
struct tpo_element {
    using type = T;
};
template <>
struct tpo_element<c10::BFloat16> {
    using type = tpo::bfloat16;
};
template <>
struct tpo_element<c10::Half> {
    using type = tpo::float16;
};
static_assert(sizeof(c10::BFloat16) == sizeof(tpo::bfloat16) && sizeof(c10::Half) == sizeof(tpo::float16));

template <class T>
tpo::logits_view<const typename tpo_element<T>::type> logits(const torch::Tensor& t) {
    if (!t.defined()) return {};
    return {reinterpret_cast<const typename tpo_element<T>::type*>(t.data_ptr<T>()), t.size(0), t.size(1),
            t.size(2)};
}
template <class T>
tpo::logits_view<typename tpo_element<T>::type> gradient(const torch::Tensor& t) {
    if (!t.defined()) return {};
    return {reinterpret_cast<typename tpo_element<T>::type*>(t.data_ptr<T>()), t.size(0), t.size(1), t.size(2)};
}
template <class I>
tpo::labels_view<const I> labels(const torch::Tensor& t) {
    return {t.data_ptr<I>(), t.size(0), t.size(1)};
}

inline bool wants_grad(const torch::Tensor& t) { return t.defined() && t.requires_grad(); }

}  // namespace detail

/// The autograd function. Inputs 0-3 are the policy's logits (differentiated), 4-7 the
/// reference's, 8-9 the labels; the options and an optional metrics sink follow.
struct preference_function : torch::autograd::Function<preference_function> {
    static torch::Tensor forward(torch::autograd::AutogradContext* ctx, torch::Tensor pc, torch::Tensor pcn,
                                 torch::Tensor pr, torch::Tensor prn, torch::Tensor rc, torch::Tensor rcn,
                                 torch::Tensor rr, torch::Tensor rrn, torch::Tensor yc, torch::Tensor yr,
                                 const tpo::objective_options* options, tpo::objective_result* metrics) {
        TORCH_CHECK(options != nullptr, "tpo_torch: options must not be null");
        pc = detail::checked(pc, "policy_chosen", 3), pcn = detail::checked(pcn, "policy_chosen_noisy", 3);
        pr = detail::checked(pr, "policy_rejected", 3), prn = detail::checked(prn, "policy_rejected_noisy", 3);
        rc = detail::checked(rc, "reference_chosen", 3), rcn = detail::checked(rcn, "reference_chosen_noisy", 3);
        rr = detail::checked(rr, "reference_rejected", 3);
        rrn = detail::checked(rrn, "reference_rejected_noisy", 3);
        yc = detail::checked(yc, "labels_chosen", 2), yr = detail::checked(yr, "labels_rejected", 2);
        TORCH_CHECK(pc.defined() && pr.defined() && rc.defined() && rr.defined() && yc.defined() && yr.defined(),
                    "tpo_torch: the policy and reference logits and the labels of both sides are required");
        const auto dtype = pc.scalar_type();
        for (const torch::Tensor* t : {&pcn, &pr, &prn, &rc, &rcn, &rr, &rrn})
            TORCH_CHECK(!t->defined() || t->scalar_type() == dtype, "tpo_torch: logits dtypes differ (",
                        t->scalar_type(), " vs policy_chosen's ", dtype, ")");
        TORCH_CHECK(yr.scalar_type() == yc.scalar_type(), "tpo_torch: labels dtypes differ");

        const bool grad = detail::wants_grad(pc) || detail::wants_grad(pcn) || detail::wants_grad(pr) ||
                          detail::wants_grad(prn);
        const bool noisy = options->weighting == tpo::token_weighting::self_calibrated;
        torch::Tensor gc, gcn, gr, grn;
        if (grad) {
            gc = torch::empty_like(pc), gr = torch::empty_like(pr);
            if (noisy) gcn = torch::empty_like(pcn), grn = torch::empty_like(prn);
        }

        tpo::objective_result result;
        detail::backend_type backend;
        auto run = [&]<class T, class I>() {
            const tpo::preference_batch<typename detail::tpo_element<T>::type, I> batch{
                {.policy = detail::logits<T>(pc), .policy_noisy = detail::logits<T>(pcn),
                 .reference = detail::logits<T>(rc), .reference_noisy = detail::logits<T>(rcn),
                 .labels = detail::labels<I>(yc)},
                {.policy = detail::logits<T>(pr), .policy_noisy = detail::logits<T>(prn),
                 .reference = detail::logits<T>(rr), .reference_noisy = detail::logits<T>(rrn),
                 .labels = detail::labels<I>(yr)}};
            const tpo::preference_gradients<typename detail::tpo_element<T>::type> grads{
                {detail::gradient<T>(gc), detail::gradient<T>(gcn)},
                {detail::gradient<T>(gr), detail::gradient<T>(grn)}};
            result = tpo::evaluate(backend, *options, batch, grad ? &grads : nullptr);
        };
        auto with_labels = [&]<class T>() {
            if (yc.scalar_type() == torch::kLong)
                run.template operator()<T, std::int64_t>();
            else if (yc.scalar_type() == torch::kInt)
                run.template operator()<T, std::int32_t>();
            else
                TORCH_CHECK(false, "tpo_torch: labels have dtype ", yc.scalar_type(), ", expected int64 or int32");
        };
        switch (dtype) {
        case torch::kFloat: with_labels.template operator()<float>(); break;
        case torch::kDouble: with_labels.template operator()<double>(); break;
        case torch::kBFloat16: with_labels.template operator()<c10::BFloat16>(); break;
        case torch::kHalf: with_labels.template operator()<c10::Half>(); break;
        default: TORCH_CHECK(false, "tpo_torch: logits have dtype ", dtype, ", expected float32/64, bfloat16 or half");
        }

        ctx->save_for_backward({gc, gcn, gr, grn});
        if (metrics) *metrics = result;
        // The loss is reported in the logits' dtype, as libtorch's own losses are.
        return torch::tensor(result.loss, torch::TensorOptions().dtype(torch::kDouble)).to(dtype);
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                   torch::autograd::variable_list grad_outputs) {
        const auto saved = ctx->get_saved_variables();
        const torch::Tensor& upstream = grad_outputs[0];
        auto scaled = [&](const torch::Tensor& g) { return g.defined() ? g * upstream : torch::Tensor(); };
        // One entry per forward input: the policy logits, then nothing for the reference logits,
        // the labels, the options and the metrics sink.
        return {scaled(saved[0]), scaled(saved[1]), scaled(saved[2]), scaled(saved[3]), {}, {}, {}, {}, {}, {},
                {}, {}};
    }
};

/// The batch loss (mean over pairs) as a 0-dim tensor differentiable in the policy logits.
/// `metrics`, when given, receives the rewards, accuracies and per-pair values of the forward.
inline torch::Tensor preference_loss(const batch_tensors& b, const tpo::objective_options& options,
                                     tpo::objective_result* metrics = nullptr) {
    auto in = [](const torch::Tensor& t) { return t.defined() ? t : detail::absent(); };
    return preference_function::apply(in(b.policy_chosen), in(b.policy_chosen_noisy), in(b.policy_rejected),
                                      in(b.policy_rejected_noisy), in(b.reference_chosen),
                                      in(b.reference_chosen_noisy), in(b.reference_rejected),
                                      in(b.reference_rejected_noisy), in(b.labels_chosen), in(b.labels_rejected),
                                      &options, metrics);
}

}  // namespace tpo_torch
