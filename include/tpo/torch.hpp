#pragma once
// tpo for libtorch trainers: the objective as a torch::autograd::Function computed on the tensors'
// own memory, CPU or CUDA, with the metrics beside the loss.
//
//   #include <tpo/torch.hpp>     // CMake: find_package(tpo CONFIG REQUIRED COMPONENTS torch),
//                                //        target_link_libraries(trainer PRIVATE tpo::torch)
//   tpo::libtorch::logits_batch b{.policy_chosen = zw, .policy_chosen_noisy = zw_noisy,
//                                 .policy_rejected = zl, ..., .labels_chosen = yw, .labels_rejected = yl};
//   auto [loss, metrics] = tpo::libtorch::preference_loss(b, options);
//   loss.backward();                          // ∂loss/∂logits flow back into the model
//   metrics.read().reward_accuracy;           // on CUDA the one call that waits for the device
//
//   tpo::libtorch::hidden_batch h{.policy_hidden_chosen = hw, ..., .lm_head_weight = head->weight,
//                                 .lm_head_bias = head->bias, ..., .labels_chosen = yw, .labels_rejected = yl};
//   auto [loss, metrics] = tpo::libtorch::preference_loss(h, options);   // no (P, L, V) logits
//
// Inputs: logits (P, L, V) of float32, float64, bfloat16 or float16 (all of one dtype, on one
// device), labels (P, L) int64 or int32; optionally the reference as precomputed sequence scores
// (P) float64 and caller token weights (P, L) float32. Non-contiguous tensors are made contiguous
// (a copy). Gradients flow into the policy logits; the reference logits are constants. The
// gradients are computed in the forward, in the logits' dtype, when a policy tensor requires grad
// (the backward then has nothing left to read), and kept until backward: the O(P·L·V) memory
// libtorch's own log_softmax would keep. The loss has the logits' dtype, as libtorch's losses do.
//
// CPU tensors run on tpo::backend::cpu when <tpo/backend/cpu.hpp> can be used (tpo::torch links
// tpo::cpu), else on the reference backend; bad input throws tpo::error at once.
//
// CUDA tensors run on tpo::backend::thrust<thrust::cuda::tag> on the current CUDA stream, with the
// backend's scratch from libtorch's caching allocator, and nothing waits for the device: the
// metrics stay in device tensors until read(). An input error (a label out of range, a NaN logit)
// then makes the loss and the gradients NaN on the device at once, and read() throws the
// tpo::value_error that names it; with options::synchronous_errors the call waits and throws
// itself (not capturable in a CUDA graph). Without that option the forward and backward issue no
// synchronisation and allocate only through the caching allocator, so they can be captured in a
// CUDA graph (torch.cuda.graph / at::cuda::CUDAGraph). The CUDA path is compiled where nvcc
// compiles this header: include it in at least one .cu translation unit of the program (built
// against a CUDA libtorch, and linked with cuBLAS, CUDA::cublas, for the hidden-state kind's
// products); translation units compiled by the host compiler then reach it too.
//
// Hidden states in (hidden_batch): the last hidden states (P, L, H) of each side and the lm_head's
// weight (V, H) and optional bias (V), all of the hidden states' dtype; the logits
// transform(h·Wᵀ + b) (objective_options' logit_scale, logit_softcap, temperature) are computed
// chunk by chunk (chunk_tokens rows at a time) and never stored whole. The reference enters as its
// own hidden states with its own frozen head (reference_lm_head_weight, + bias), or as precomputed
// scores. Gradients flow into the policy hidden states, the weight and the bias (the reference
// tensors are constants), computed in the forward like the logits' and held until backward: O(P·L·H
// + V·H), not O(P·L·V). This kind waits for its results on CUDA too (the fused path reads back which
// rows are scored and whether the head is finite): its errors are thrown at once and it is not
// capturable in a CUDA graph.
//
// An input kind is a struct (detail::logits_kind, detail::hidden_kind) with its differentiable
// tensors (at most max_differentiable), its checks and run(); the autograd function, the device
// dispatch and the metrics are shared, and its CUDA implementation is registered by one line.

#include <torch/torch.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "tpo/tpo.hpp"
#if __has_include(<Eigen/Core>) && !defined(TPO_TORCH_NO_CPU_BACKEND)
#  include "tpo/backend/cpu.hpp"
#  define TPO_TORCH_CPU_BACKEND 1
#endif
#if defined(__CUDACC__) && __has_include(<c10/cuda/CUDACachingAllocator.h>)
#  include <ATen/cuda/CUDAContext.h>
#  include <c10/cuda/CUDACachingAllocator.h>
#  include <c10/cuda/CUDAGuard.h>
#  include "tpo/backend/thrust.hpp"
#  define TPO_TORCH_CUDA 1
#endif

TPO_BEGIN_NAMESPACE
namespace libtorch {

struct options {
    objective_options objective{};
    /// CUDA only: wait for the device after the forward and throw an input error at once, instead
    /// of a NaN loss now and the error from read(). Costs a synchronisation per call and makes the
    /// call uncapturable in a CUDA graph. (On the CPU errors are always thrown at once.)
    bool synchronous_errors = false;
};

/// The tensors of one preference batch, as logits. The noisy ones are needed with self-calibrated
/// weights only (leave them undefined for plain DPO); the reference enters as its logits or as
/// precomputed sequence scores A_ref (reference_*_scores, float64 (P)), not both; caller token
/// weights (float32 (P, L)) only with token_weighting::caller.
struct logits_batch {
    ::torch::Tensor policy_chosen, policy_chosen_noisy, policy_rejected, policy_rejected_noisy;
    ::torch::Tensor reference_chosen, reference_chosen_noisy, reference_rejected, reference_rejected_noisy;
    ::torch::Tensor reference_chosen_scores, reference_rejected_scores;
    ::torch::Tensor labels_chosen, labels_rejected;
    ::torch::Tensor weights_chosen, weights_rejected;
};

/// The tensors of one preference batch as the last hidden states and the lm_head, whose logits
/// transform(h·Wᵀ + b) tpo computes chunk by chunk and never stores whole: policy hidden states
/// (P, L, H) per side (the noisy ones with self-calibrated weights only), the head's weight (V, H)
/// and optional bias (V). The reference enters as its own hidden states (P, L, H_ref) with its own
/// head (reference_lm_head_weight (V, H_ref), optional bias), or as precomputed sequence scores;
/// labels and caller weights as in logits_batch.
struct hidden_batch {
    ::torch::Tensor policy_hidden_chosen, policy_hidden_chosen_noisy, policy_hidden_rejected, policy_hidden_rejected_noisy;
    ::torch::Tensor lm_head_weight, lm_head_bias;
    ::torch::Tensor reference_hidden_chosen, reference_hidden_chosen_noisy, reference_hidden_rejected,
        reference_hidden_rejected_noisy;
    ::torch::Tensor reference_lm_head_weight, reference_lm_head_bias;
    ::torch::Tensor reference_chosen_scores, reference_rejected_scores;
    ::torch::Tensor labels_chosen, labels_rejected;
    ::torch::Tensor weights_chosen, weights_rejected;
};

namespace detail {

/// What a forward leaves for the metrics: the host result (CPU, or read back), or the objective's
/// O(P) result buffers copied into device tensors.
struct metrics_state {
    objective_options options;
    bool on_host = false;
    objective_result host;
    ::torch::Tensor summaries, pairs, batch;  // bytes of the loss:: structs, on the device
    ::torch::Tensor overflow;                 // bytes of loss::gradient_overflow (2P), after a backward
    ::torch::Tensor input_problem;            // 0-dim bool on the device: bad input or overflow
    index_t pair_count = 0, vocab = 0;
    ::torch::Device device{::torch::kCPU};    // the inputs'; the metric tensors are put there
    /// loss::report_gradient_overflow for the call's logits and gradient types.
    void (*report_overflow)(const std::vector<loss::gradient_overflow>&, index_t, const objective_options&) = nullptr;

    static_assert(std::is_trivially_copyable_v<loss::sequence_summary> && std::is_trivially_copyable_v<loss::pair_result> &&
                  std::is_trivially_copyable_v<loss::batch_result>);

    template <class S>
    static std::vector<S> unpack(const ::torch::Tensor& bytes) {
        const ::torch::Tensor h = bytes.to(::torch::kCPU).contiguous();
        std::vector<S> out(static_cast<std::size_t>(h.numel()) / sizeof(S));
        std::memcpy(out.data(), h.data_ptr<std::uint8_t>(), out.size() * sizeof(S));
        return out;
    }

    const objective_result& read() {
        if (!on_host) {
            const auto summary_rows = unpack<loss::sequence_summary>(summaries);
            if (options.check_inputs) tpo::detail::report_input_problems(options, summary_rows, pair_count, vocab);
            host = tpo::detail::collect_result(summary_rows, unpack<loss::pair_result>(pairs),
                                               unpack<loss::batch_result>(batch).front(), pair_count, options);
            if (overflow.defined() && report_overflow)
                report_overflow(unpack<loss::gradient_overflow>(overflow), pair_count, options);
            on_host = true;
        }
        return host;
    }

    /// The batch_result field at `offset` as a 0-dim float64 tensor where the metrics live; NaN
    /// for a batch with bad input.
    ::torch::Tensor batch_field(std::size_t offset, double host_value) const {
        if (!batch.defined())
            return ::torch::tensor(host_value, ::torch::TensorOptions().dtype(::torch::kDouble).device(device));
        ::torch::Tensor x =
            batch.narrow(0, static_cast<std::int64_t>(offset), sizeof(double)).view(::torch::kDouble).squeeze(0).clone();
        if (input_problem.defined())
            x = ::torch::where(input_problem, ::torch::full({}, std::numeric_limits<double>::quiet_NaN(), x.options()), x);
        return x;
    }
};

}  // namespace detail

/// The metrics of one call. On CUDA they stay in device memory until read().
class loss_metrics {
public:
    loss_metrics() = default;
    explicit loss_metrics(std::shared_ptr<detail::metrics_state> s) : state_(std::move(s)) {}

    /// Loss, reward accuracy and margin of the batch as 0-dim float64 tensors on the inputs' device
    /// (no synchronisation; NaN when the batch had bad input, which read() then names).
    ::torch::Tensor loss() const { return field(offsetof(loss::batch_result, loss), state().host.loss); }
    ::torch::Tensor reward_accuracy() const {
        return field(offsetof(loss::batch_result, reward_accuracy), state().host.reward_accuracy);
    }
    ::torch::Tensor reward_margin() const {
        return field(offsetof(loss::batch_result, reward_margin), state().host.reward_margin);
    }

    /// Everything tpo::evaluate reports, on the host. On CUDA this copies the O(P) results back
    /// (waits for the stream) and throws what tpo::evaluate would have: the tpo::value_error of a
    /// bad input (with check_inputs), the tpo::overflow_error of a non-finite result or gradient.
    const objective_result& read() const { return state().read(); }

private:
    detail::metrics_state& state() const {
        TORCH_CHECK(state_ != nullptr, "tpo::libtorch: these metrics belong to no call");
        return *state_;
    }
    ::torch::Tensor field(std::size_t offset, double host_value) const {
        return state().batch_field(offset, host_value);
    }
    std::shared_ptr<detail::metrics_state> state_;
};

/// What preference_loss returns: the loss (0-dim, the logits' dtype, differentiable in the policy
/// logits) and the metrics.
struct loss_and_metrics {
    ::torch::Tensor loss;
    loss_metrics metrics;
};

namespace detail {

// tpo's 16-bit types are plain bit containers with the layout of c10's.
template <class T>
struct element {
    using type = T;
};
template <>
struct element<c10::BFloat16> {
    using type = bfloat16;
};
template <>
struct element<c10::Half> {
    using type = float16;
};
static_assert(sizeof(c10::BFloat16) == sizeof(bfloat16) && sizeof(c10::Half) == sizeof(float16));

template <class T>
using element_t = typename element<T>::type;

/// Calls f.template operator()<T>() with T the C++ type of a floating dtype tpo takes.
template <class F>
void with_logits_type(::torch::ScalarType dtype, F&& f) {
    switch (dtype) {
    case ::torch::kFloat: f.template operator()<float>(); return;
    case ::torch::kDouble: f.template operator()<double>(); return;
    case ::torch::kBFloat16: f.template operator()<c10::BFloat16>(); return;
    case ::torch::kHalf: f.template operator()<c10::Half>(); return;
    default: TORCH_CHECK(false, "tpo::libtorch: logits have dtype ", dtype, ", expected float32, float64, bfloat16 or float16");
    }
}
template <class F>
void with_label_type(::torch::ScalarType dtype, F&& f) {
    switch (dtype) {
    case ::torch::kLong: f.template operator()<std::int64_t>(); return;
    case ::torch::kInt: f.template operator()<std::int32_t>(); return;
    default: TORCH_CHECK(false, "tpo::libtorch: labels have dtype ", dtype, ", expected int64 or int32");
    }
}

template <class T>
logits_view<const element_t<T>> logits(const ::torch::Tensor& t) {
    if (!t.defined()) return {};
    return {reinterpret_cast<const element_t<T>*>(t.data_ptr<T>()), t.size(0), t.size(1), t.size(2)};
}
template <class T>
logits_view<element_t<T>> gradient(const ::torch::Tensor& t) {
    if (!t.defined()) return {};
    return {reinterpret_cast<element_t<T>*>(t.data_ptr<T>()), t.size(0), t.size(1), t.size(2)};
}

/// A tensor's checks: defined when required, rank, dtype, device; returned contiguous.
struct tensor_check {
    const char* name;
    std::int64_t rank;
    bool required = false;
};

inline ::torch::Tensor checked(const ::torch::Tensor& t, const tensor_check& c, const ::torch::Device& device) {
    if (!t.defined()) {
        TORCH_CHECK(!c.required, "tpo::libtorch: ", c.name, " is required");
        return {};
    }
    TORCH_CHECK(t.dim() == c.rank, "tpo::libtorch: ", c.name, " has shape ", t.sizes(), ", expected ", c.rank,
                " dimensions");
    TORCH_CHECK(t.device() == device, "tpo::libtorch: ", c.name, " is on ", t.device(), ", expected ", device,
                " (where the chosen policy tensor is)");
    return t.contiguous();
}

inline bool wants_grad(const ::torch::Tensor& t) { return t.defined() && t.requires_grad(); }

/// What a kind's run() fills: the loss as float64 on the device (0-dim; NaN for bad input), the
/// gradient of each differentiable input (undefined where none is computed), and the metrics.
struct outcome {
    ::torch::Tensor loss;
    std::vector<::torch::Tensor> gradients;
    std::shared_ptr<metrics_state> metrics;
};

/// The most differentiable inputs any kind has (the autograd function's fixed arity).
inline constexpr std::size_t max_differentiable = 6;

/// An absent tensor travels through autograd as an empty 1-d tensor (autograd takes no undefined
/// inputs) and becomes undefined again inside.
inline ::torch::Tensor absent() { return ::torch::empty({0}); }
inline ::torch::Tensor present(const ::torch::Tensor& t) { return t.dim() == 1 && t.numel() == 0 ? ::torch::Tensor() : t; }

/// The objective's O(P) results copied out of backend memory into byte tensors on the device
/// (ordered on the current stream, no wait), the loss read from them, and the input-problem flag.
template <class B>
void keep_on_device(objective<B>& obj, const ::torch::Device& device, outcome& out) {
    const auto r = obj.results();
    auto bytes = [&](const void* p, std::size_t n) {
        return ::torch::from_blob(const_cast<void*>(p), {static_cast<std::int64_t>(n)},
                                  ::torch::TensorOptions().dtype(::torch::kByte).device(device))
            .clone();
    };
    metrics_state& m = *out.metrics;
    m.summaries = bytes(r.summaries, 2 * r.pair_count * sizeof(loss::sequence_summary));
    m.pairs = bytes(r.pairs, r.pair_count * sizeof(loss::pair_result));
    m.batch = bytes(r.batch, sizeof(loss::batch_result));
    m.pair_count = r.pair_count;
    m.vocab = r.vocab;
    ::torch::Tensor bad;
    auto column = [&](const ::torch::Tensor& rows, std::size_t row_bytes, std::size_t offset) {
        return rows.view(::torch::kInt)
            .view({2 * r.pair_count, static_cast<std::int64_t>(row_bytes / sizeof(std::int32_t))})
            .select(1, static_cast<std::int64_t>(offset / sizeof(std::int32_t)));
    };
    if (m.options.check_inputs) {
        static_assert(sizeof(loss::input_problem) == sizeof(std::int32_t) &&
                      offsetof(loss::sequence_summary, problem) % sizeof(std::int32_t) == 0 &&
                      sizeof(loss::sequence_summary) % sizeof(std::int32_t) == 0);
        bad = column(m.summaries, sizeof(loss::sequence_summary), offsetof(loss::sequence_summary, problem))
                  .ne(static_cast<int>(loss::input_problem::none))
                  .any();
    }
    if (r.gradient_overflow) {
        static_assert(offsetof(loss::gradient_overflow, found) % sizeof(std::int32_t) == 0 &&
                      sizeof(loss::gradient_overflow) % sizeof(std::int32_t) == 0);
        m.overflow = bytes(r.gradient_overflow, 2 * r.pair_count * sizeof(loss::gradient_overflow));
        const ::torch::Tensor found =
            column(m.overflow, sizeof(loss::gradient_overflow), offsetof(loss::gradient_overflow, found)).ne(0).any();
        bad = bad.defined() ? bad.logical_or(found) : found;
    }
    m.input_problem = bad;
    out.loss = m.batch_field(offsetof(loss::batch_result, loss), 0);
}

/// Forward (and backward into `grads` when asked) of one batch on one backend, waiting for the
/// results: errors are thrown here, and the loss is put on the inputs' device.
template <class B, class Batch, class Gradients>
void evaluate_now(B& backend, const options& opt, const Batch& batch, const Gradients* grads,
                  const ::torch::Device& device, outcome& out) {
    objective<B> obj(backend, opt.objective);
    out.metrics->host = obj.forward(batch);
    out.metrics->on_host = true;
    if (grads) obj.backward(batch, *grads);
    out.loss = ::torch::tensor(out.metrics->host.loss, ::torch::TensorOptions().dtype(::torch::kDouble).device(device));
}

/// The same, or (deferred) without waiting: the results stay on the device (keep_on_device).
template <class B, class T, class I, class G>
void evaluate_on(B& backend, const options& opt, const preference_batch<T, I>& batch,
                 const preference_gradients<G>* grads, bool deferred, const ::torch::Device& device, outcome& out) {
    if (!deferred) {
        evaluate_now(backend, opt, batch, grads, device, out);
        return;
    }
    objective<B> obj(backend, opt.objective);
    obj.launch_forward(batch);
    if (grads) {
        obj.backward(batch, *grads);
        out.metrics->report_overflow = &loss::report_gradient_overflow<T, G>;
    }
    keep_on_device(obj, device, out);
}

inline ::torch::Tensor checked(const ::torch::Tensor& t, const tensor_check& c, const ::torch::Device& device,
                              ::torch::ScalarType want, const char* want_name = nullptr) {
    ::torch::Tensor x = checked(t, c, device);
    TORCH_CHECK(!x.defined() || x.scalar_type() == want, "tpo::libtorch: ", c.name, " has dtype ", x.scalar_type(),
                ", expected ", want_name ? want_name : "", want_name ? "'s " : "", want);
    return x;
}

/// What every kind takes beside the models' outputs: reference scores, labels, caller weights.
template <class Batch>
void check_extras(const Batch& b, Batch& in, const ::torch::Device& device) {
    in.reference_chosen_scores =
        checked(b.reference_chosen_scores, {"reference_chosen_scores", 1}, device, ::torch::kDouble);
    in.reference_rejected_scores =
        checked(b.reference_rejected_scores, {"reference_rejected_scores", 1}, device, ::torch::kDouble);
    in.labels_chosen = checked(b.labels_chosen, {"labels_chosen", 2, true}, device);
    in.labels_rejected = checked(b.labels_rejected, {"labels_rejected", 2, true}, device,
                                 in.labels_chosen.scalar_type(), "labels_chosen");
    in.weights_chosen = checked(b.weights_chosen, {"weights_chosen", 2}, device, ::torch::kFloat);
    in.weights_rejected = checked(b.weights_rejected, {"weights_rejected", 2}, device, ::torch::kFloat);
}

/// The logits kind: its differentiable inputs are the four policy tensors.
struct logits_kind {
    logits_batch in;  // contiguous, checked
    ::torch::ScalarType dtype{};
    ::torch::Device device{::torch::kCPU};

    static constexpr std::size_t differentiable = 4;

    explicit logits_kind(const logits_batch& b) {
        TORCH_CHECK(b.policy_chosen.defined(), "tpo::libtorch: policy_chosen is required");
        device = b.policy_chosen.device();
        dtype = b.policy_chosen.scalar_type();
        auto logits = [&](const ::torch::Tensor& t, const char* name, bool required = false) {
            return checked(t, {name, 3, required}, device, dtype, "policy_chosen");
        };
        in.policy_chosen = logits(b.policy_chosen, "policy_chosen", true);
        in.policy_chosen_noisy = logits(b.policy_chosen_noisy, "policy_chosen_noisy");
        in.policy_rejected = logits(b.policy_rejected, "policy_rejected", true);
        in.policy_rejected_noisy = logits(b.policy_rejected_noisy, "policy_rejected_noisy");
        in.reference_chosen = logits(b.reference_chosen, "reference_chosen");
        in.reference_chosen_noisy = logits(b.reference_chosen_noisy, "reference_chosen_noisy");
        in.reference_rejected = logits(b.reference_rejected, "reference_rejected");
        in.reference_rejected_noisy = logits(b.reference_rejected_noisy, "reference_rejected_noisy");
        check_extras(b, in, device);
    }

    std::array<::torch::Tensor, differentiable> inputs() const {
        return {in.policy_chosen, in.policy_chosen_noisy, in.policy_rejected, in.policy_rejected_noisy};
    }

    /// Runs the objective on `backend`, writing gradients for the differentiable inputs in `grad`.
    template <class B>
    void run(B& backend, const options& opt, const std::array<bool, differentiable>& grad, bool deferred,
             outcome& out) const {
        const std::array<::torch::Tensor, differentiable> x = inputs();
        out.gradients.assign(differentiable, ::torch::Tensor());
        const bool any = grad[0] || grad[1] || grad[2] || grad[3];
        // The objective writes every gradient it is given a view for, so one requested policy
        // tensor asks for all (the others are dropped after). The noisy logits have a gradient
        // only with self-calibrated weights; otherwise the loss does not depend on them (no view,
        // an undefined gradient, which autograd reads as zero).
        const bool noisy = opt.objective.weighting == token_weighting::self_calibrated;
        if (any)
            for (std::size_t k = 0; k < differentiable; ++k)
                if (x[k].defined() && (noisy || k % 2 == 0)) out.gradients[k] = ::torch::empty_like(x[k]);
        with_logits_type(dtype, [&]<class T>() {
            with_label_type(in.labels_chosen.scalar_type(), [&]<class I>() {
                using E = element_t<T>;
                auto side = [&](const ::torch::Tensor& z, const ::torch::Tensor& zn, const ::torch::Tensor& r,
                                const ::torch::Tensor& rn, const ::torch::Tensor& y, const ::torch::Tensor& w,
                                const ::torch::Tensor& scores) {
                    side_batch<E, I> s{.policy = logits<T>(z), .policy_noisy = logits<T>(zn),
                                       .reference = logits<T>(r), .reference_noisy = logits<T>(rn),
                                       .labels = {y.data_ptr<I>(), y.size(0), y.size(1)}};
                    if (w.defined()) s.weights = {w.data_ptr<float>(), w.size(0), w.size(1)};
                    if (scores.defined()) s.reference_scores = {scores.data_ptr<double>(), scores.size(0)};
                    return s;
                };
                const preference_batch<E, I> batch{
                    side(in.policy_chosen, in.policy_chosen_noisy, in.reference_chosen, in.reference_chosen_noisy,
                         in.labels_chosen, in.weights_chosen, in.reference_chosen_scores),
                    side(in.policy_rejected, in.policy_rejected_noisy, in.reference_rejected,
                         in.reference_rejected_noisy, in.labels_rejected, in.weights_rejected,
                         in.reference_rejected_scores)};
                const preference_gradients<E> grads{{gradient<T>(out.gradients[0]), gradient<T>(out.gradients[1])},
                                                    {gradient<T>(out.gradients[2]), gradient<T>(out.gradients[3])}};
                evaluate_on(backend, opt, batch, any ? &grads : nullptr, deferred, device, out);
            });
        });
        for (std::size_t k = 0; k < differentiable; ++k)
            if (!grad[k]) out.gradients[k] = ::torch::Tensor();
    }
};

/// The hidden-state kind: its differentiable inputs are the four policy hidden-state tensors and
/// the head's weight and bias. The fused path reads results back as it goes (which rows are
/// scored, whether the head is finite), so this kind always waits for them: on CUDA its errors
/// are thrown at once, as with options::synchronous_errors, and it cannot be captured in a graph.
struct hidden_kind {
    hidden_batch in;  // contiguous, checked
    ::torch::ScalarType dtype{};
    ::torch::Device device{::torch::kCPU};

    static constexpr std::size_t differentiable = 6;

    explicit hidden_kind(const hidden_batch& b) {
        TORCH_CHECK(b.policy_hidden_chosen.defined(), "tpo::libtorch: policy_hidden_chosen is required");
        device = b.policy_hidden_chosen.device();
        dtype = b.policy_hidden_chosen.scalar_type();
        TORCH_CHECK(dtype == ::torch::kFloat || dtype == ::torch::kDouble || dtype == ::torch::kBFloat16 ||
                        dtype == ::torch::kHalf,
                    "tpo::libtorch: policy_hidden_chosen (hidden states) has dtype ", dtype,
                    ", expected float32, float64, bfloat16 or float16");
        auto floating = [&](const ::torch::Tensor& t, const char* name, std::int64_t rank, bool required = false) {
            return checked(t, {name, rank, required}, device, dtype, "policy_hidden_chosen");
        };
        // The core checks every shape against the head's (V, H); a bias is a bare pointer there.
        auto bias = [&](const ::torch::Tensor& t, const char* name, const ::torch::Tensor& weight, const char* of) {
            ::torch::Tensor x = floating(t, name, 1);
            if (!x.defined()) return x;
            TORCH_CHECK(weight.defined(), "tpo::libtorch: ", name, " given without ", of);
            TORCH_CHECK(x.size(0) == weight.size(0), "tpo::libtorch: ", name, " has shape ", x.sizes(), ", expected [",
                        weight.size(0), "]: one entry per row of ", of, " ", weight.sizes());
            return x;
        };
        in.policy_hidden_chosen = floating(b.policy_hidden_chosen, "policy_hidden_chosen", 3, true);
        in.policy_hidden_chosen_noisy = floating(b.policy_hidden_chosen_noisy, "policy_hidden_chosen_noisy", 3);
        in.policy_hidden_rejected = floating(b.policy_hidden_rejected, "policy_hidden_rejected", 3, true);
        in.policy_hidden_rejected_noisy =
            floating(b.policy_hidden_rejected_noisy, "policy_hidden_rejected_noisy", 3);
        in.lm_head_weight = floating(b.lm_head_weight, "lm_head_weight", 2, true);
        in.lm_head_bias = bias(b.lm_head_bias, "lm_head_bias", in.lm_head_weight, "lm_head_weight");
        in.reference_hidden_chosen = floating(b.reference_hidden_chosen, "reference_hidden_chosen", 3);
        in.reference_hidden_chosen_noisy =
            floating(b.reference_hidden_chosen_noisy, "reference_hidden_chosen_noisy", 3);
        in.reference_hidden_rejected = floating(b.reference_hidden_rejected, "reference_hidden_rejected", 3);
        in.reference_hidden_rejected_noisy =
            floating(b.reference_hidden_rejected_noisy, "reference_hidden_rejected_noisy", 3);
        in.reference_lm_head_weight = floating(b.reference_lm_head_weight, "reference_lm_head_weight", 2);
        in.reference_lm_head_bias = bias(b.reference_lm_head_bias, "reference_lm_head_bias",
                                         in.reference_lm_head_weight, "reference_lm_head_weight");
        check_extras(b, in, device);
        const bool reference_states = in.reference_hidden_chosen.defined() || in.reference_hidden_rejected.defined();
        const bool reference_scores = in.reference_chosen_scores.defined() || in.reference_rejected_scores.defined();
        TORCH_CHECK(!reference_states || in.reference_lm_head_weight.defined(),
                    "tpo::libtorch: reference hidden states given without reference_lm_head_weight (the reference "
                    "model's lm_head)");
        TORCH_CHECK(!reference_scores || !in.reference_lm_head_weight.defined(),
                    "tpo::libtorch: reference_lm_head_weight given with reference scores: give the reference as "
                    "hidden states and its head, or as scores");
    }

    std::array<::torch::Tensor, differentiable> inputs() const {
        return {in.policy_hidden_chosen, in.policy_hidden_chosen_noisy, in.policy_hidden_rejected,
                in.policy_hidden_rejected_noisy, in.lm_head_weight, in.lm_head_bias};
    }

    /// Runs the objective on `backend` (always waiting for its results: see above), writing the
    /// gradients asked for in `grad`.
    template <class B>
    void run(B& backend, const options& opt, const std::array<bool, differentiable>& grad, bool /*deferred*/,
             outcome& out) const {
        const std::array<::torch::Tensor, differentiable> x = inputs();
        out.gradients.assign(differentiable, ::torch::Tensor());
        // The objective writes exactly the gradients it is given a place for. The noisy hidden
        // states have one only with self-calibrated weights; otherwise the loss does not depend on
        // them (an undefined gradient, which autograd reads as zero).
        const bool noisy = opt.objective.weighting == token_weighting::self_calibrated;
        bool any = false;
        for (std::size_t k = 0; k < differentiable; ++k)
            if (grad[k] && x[k].defined() && (noisy || (k != 1 && k != 3))) {
                out.gradients[k] = ::torch::empty_like(x[k]);
                any = true;
            }
        with_logits_type(dtype, [&]<class T>() {
            with_label_type(in.labels_chosen.scalar_type(), [&]<class I>() {
                using E = element_t<T>;
                auto states = [](const ::torch::Tensor& t) {
                    if (!t.defined()) return hidden_view<const E>{};
                    return hidden_view<const E>{reinterpret_cast<const E*>(t.data_ptr<T>()), t.size(0), t.size(1),
                                                t.size(2)};
                };
                auto head = [](const ::torch::Tensor& w, const ::torch::Tensor& b) {
                    if (!w.defined()) return head_view<const E>{};
                    return head_view<const E>{reinterpret_cast<const E*>(w.data_ptr<T>()),
                                              b.defined() ? reinterpret_cast<const E*>(b.data_ptr<T>()) : nullptr,
                                              w.size(0), w.size(1)};
                };
                auto side = [&](const ::torch::Tensor& h, const ::torch::Tensor& hn, const ::torch::Tensor& r,
                                const ::torch::Tensor& rn, const ::torch::Tensor& y, const ::torch::Tensor& w,
                                const ::torch::Tensor& scores) {
                    hidden_side_batch<E, I> s{.policy = states(h), .policy_noisy = states(hn),
                                              .reference = states(r), .reference_noisy = states(rn),
                                              .labels = {y.data_ptr<I>(), y.size(0), y.size(1)}};
                    if (w.defined()) s.weights = {w.data_ptr<float>(), w.size(0), w.size(1)};
                    if (scores.defined()) s.reference_scores = {scores.data_ptr<double>(), scores.size(0)};
                    return s;
                };
                const hidden_preference_batch<E, I> batch{
                    head(in.lm_head_weight, in.lm_head_bias),
                    head(in.reference_lm_head_weight, in.reference_lm_head_bias),
                    side(in.policy_hidden_chosen, in.policy_hidden_chosen_noisy, in.reference_hidden_chosen,
                         in.reference_hidden_chosen_noisy, in.labels_chosen, in.weights_chosen,
                         in.reference_chosen_scores),
                    side(in.policy_hidden_rejected, in.policy_hidden_rejected_noisy, in.reference_hidden_rejected,
                         in.reference_hidden_rejected_noisy, in.labels_rejected, in.weights_rejected,
                         in.reference_rejected_scores)};
                auto gradient_of = [&](std::size_t k) {
                    const ::torch::Tensor& g = out.gradients[k];
                    if (!g.defined()) return hidden_view<E>{};
                    return hidden_view<E>{reinterpret_cast<E*>(g.data_ptr<T>()), g.size(0), g.size(1), g.size(2)};
                };
                auto pointer = [&](std::size_t k) {
                    const ::torch::Tensor& g = out.gradients[k];
                    return g.defined() ? reinterpret_cast<E*>(g.data_ptr<T>()) : nullptr;
                };
                const hidden_gradients<E> grads{
                    {gradient_of(0), gradient_of(1)}, {gradient_of(2), gradient_of(3)}, pointer(4), pointer(5)};
                evaluate_now(backend, opt, batch, any ? &grads : nullptr, device, out);
            });
        });
    }
};

/// The CPU backend of this build.
#if defined(TPO_TORCH_CPU_BACKEND)
using cpu_backend = backend::cpu;
#else
using cpu_backend = backend::reference;
#endif

/// The CUDA implementation of a kind, set by a translation unit nvcc compiled with this header.
template <class Kind>
struct cuda_slot {
    using function = void (*)(const Kind&, const options&, const std::array<bool, Kind::differentiable>&, outcome&);
    static function& get() {
        static function f = nullptr;
        return f;
    }
};

#if defined(TPO_TORCH_CUDA)
/// libtorch's caching allocator as the Thrust backend's cuda_allocator: blocks are recorded on the
/// stream they were asked for, so a block freed while queued work still reads it is handed out
/// again only to work ordered after (and, under graph capture, it comes from the graph's pool).
inline void* caching_allocate(void*, std::size_t bytes, cudaStream_t stream) {
    return c10::cuda::CUDACachingAllocator::raw_alloc_with_stream(bytes, stream);
}
inline void caching_deallocate(void*, void* pointer, std::size_t, cudaStream_t) {
    c10::cuda::CUDACachingAllocator::raw_delete(pointer);
}
inline backend::cuda_allocator caching_allocator() {
    backend::cuda_allocator a;
    a.allocate = &caching_allocate;
    a.deallocate = &caching_deallocate;
    return a;
}

template <class Kind>
void run_on_cuda(const Kind& kind, const options& opt, const std::array<bool, Kind::differentiable>& grad,
                 outcome& out) {
    const c10::cuda::CUDAGuard guard(kind.device);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream(kind.device.index()).stream();
    backend::thrust<::thrust::cuda::tag> gpu(backend::cuda_context{stream, caching_allocator()});
    kind.run(gpu, opt, grad, !opt.synchronous_errors, out);
}

// One line per kind: set when the program starts, by whichever translation unit nvcc compiled.
inline const bool cuda_logits_registered = (cuda_slot<logits_kind>::get() = &run_on_cuda<logits_kind>, true);
inline const bool cuda_hidden_registered = (cuda_slot<hidden_kind>::get() = &run_on_cuda<hidden_kind>, true);
#endif

template <class Kind>
void run(const Kind& kind, const options& opt, const std::array<bool, Kind::differentiable>& grad, outcome& out) {
    out.metrics = std::make_shared<metrics_state>();
    out.metrics->options = opt.objective;
    out.metrics->device = kind.device;
    if (kind.device.is_cpu()) {
#if defined(TPO_TORCH_CPU_BACKEND) && defined(_OPENMP)
        cpu_backend backend(at::get_num_threads());  // libtorch's intra-op thread count
#else
        // Without OpenMP in this unit (nvcc's host pass, unless told otherwise) the CPU backend runs
        // one thread; asking it for libtorch's count would be an error.
        cpu_backend backend;
#endif
        kind.run(backend, opt, grad, false, out);
        return;
    }
    TORCH_CHECK(kind.device.is_cuda(), "tpo::libtorch: tensors on ", kind.device, ", expected CPU or CUDA");
    const auto cuda = cuda_slot<Kind>::get();
    TORCH_CHECK(cuda != nullptr, "tpo::libtorch: CUDA tensors, but no translation unit of this program was compiled "
                "by nvcc with <tpo/torch.hpp> (against a CUDA libtorch); compile one .cu file that includes it");
    cuda(kind, opt, grad, out);
}

/// The autograd function shared by every kind: the differentiable inputs are tensors (so autograd
/// sees them); the kind, the options and the metrics sink travel by pointer.
template <class Kind>
struct preference_function : ::torch::autograd::Function<preference_function<Kind>> {
    static ::torch::Tensor forward(::torch::autograd::AutogradContext* ctx, const Kind* kind, const options* opt,
                                   std::shared_ptr<metrics_state>* metrics, ::torch::Tensor x0, ::torch::Tensor x1,
                                   ::torch::Tensor x2, ::torch::Tensor x3, ::torch::Tensor x4, ::torch::Tensor x5) {
        const std::array<::torch::Tensor, max_differentiable> x{x0, x1, x2, x3, x4, x5};
        std::array<bool, Kind::differentiable> grad{};
        for (std::size_t k = 0; k < Kind::differentiable; ++k) grad[k] = wants_grad(present(x[k]));
        outcome out;
        run(*kind, *opt, grad, out);
        *metrics = out.metrics;
        // A bad batch found on the device (deferred errors) makes the gradients NaN too.
        ::torch::Tensor scale;
        if (const ::torch::Tensor& bad = out.metrics->input_problem; bad.defined())
            scale = ::torch::where(bad, ::torch::full({}, std::numeric_limits<double>::quiet_NaN(), out.loss.options()),
                                   ::torch::ones({}, out.loss.options()));
        std::vector<::torch::Tensor> saved(out.gradients.begin(), out.gradients.end());
        saved.push_back(scale);
        ctx->save_for_backward(saved);
        return out.loss.to(kind->dtype, /*non_blocking=*/false, /*copy=*/true);
    }

    static ::torch::autograd::variable_list backward(::torch::autograd::AutogradContext* ctx,
                                                     ::torch::autograd::variable_list grad_outputs) {
        const auto saved = ctx->get_saved_variables();
        ::torch::Tensor upstream = grad_outputs[0];
        const ::torch::Tensor& scale = saved[Kind::differentiable];
        if (scale.defined()) upstream = upstream.to(::torch::kDouble) * scale;
        // On the CPU the upstream gradient is read for free, and 1 (loss.backward()) costs no pass.
        const bool unit = upstream.device().is_cpu() && upstream.item<double>() == 1.0;
        ::torch::autograd::variable_list result{{}, {}, {}};  // the kind, the options, the metrics sink
        for (std::size_t k = 0; k < max_differentiable; ++k) {
            if (k >= Kind::differentiable || !saved[k].defined()) {
                result.emplace_back();
                continue;
            }
            // Out of place, so that a second backward (retain_graph) sees the same gradients.
            result.push_back(unit ? saved[k] : saved[k] * upstream.to(saved[k].scalar_type()));
        }
        return result;
    }
};

template <class Kind>
loss_and_metrics apply(const Kind& kind, const options& opt) {
    validate(opt.objective);
    const auto x = kind.inputs();
    std::array<::torch::Tensor, max_differentiable> args;
    for (std::size_t k = 0; k < max_differentiable; ++k)
        args[k] = k < Kind::differentiable && x[k].defined() ? x[k] : absent();
    std::shared_ptr<metrics_state> metrics;
    ::torch::Tensor loss = preference_function<Kind>::apply(&kind, &opt, &metrics, args[0], args[1], args[2],
                                                            args[3], args[4], args[5]);
    if (opt.synchronous_errors && metrics && !metrics->on_host) metrics->read();
    return {std::move(loss), loss_metrics(std::move(metrics))};
}

}  // namespace detail

/// The batch loss (mean over pairs) of the objective in `opt`, differentiable in the policy logits,
/// and its metrics.
inline loss_and_metrics preference_loss(const logits_batch& batch, const options& opt = {}) {
    return detail::apply(detail::logits_kind(batch), opt);
}

/// The same with plain objective options.
inline loss_and_metrics preference_loss(const logits_batch& batch, const objective_options& objective) {
    return preference_loss(batch, options{.objective = objective});
}

/// The batch loss from hidden states and the lm_head, differentiable in the policy hidden states
/// and the head's weight and bias, and its metrics.
inline loss_and_metrics preference_loss(const hidden_batch& batch, const options& opt = {}) {
    return detail::apply(detail::hidden_kind(batch), opt);
}

/// The same with plain objective options.
inline loss_and_metrics preference_loss(const hidden_batch& batch, const objective_options& objective) {
    return preference_loss(batch, options{.objective = objective});
}

}  // namespace libtorch
TPO_END_NAMESPACE
