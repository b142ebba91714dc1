// tpo._tpo.Objective: the objective on arrays from Python. One engine per forward (its backend
// follows the arrays' device); the arrays of the last forward are held until the next one, so
// backward reads exactly what forward read.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "arrays.hpp"
#include "engine.hpp"
#include "module.hpp"

#include "tpo/backend/reference.hpp"
#if defined(TPO_PYTHON_WITH_CPU_BACKEND)
#  include "tpo/backend/cpu.hpp"
#endif

namespace tpo_python {
namespace {

tpo::token_weighting parse_method(const std::string& method) {
    if (method == "tpo") return tpo::token_weighting::self_calibrated;
    if (method == "dpo") return tpo::token_weighting::none;
    if (method == "weighted") return tpo::token_weighting::caller;
    throw tpo::value_error(tpo::detail::concat("method: '", method, "', expected tpo, dpo or weighted"));
}

tpo::objective_options make_options(const std::string& method, const std::vector<std::string>& loss_type,
                                    const std::optional<std::vector<double>>& loss_weights, double beta,
                                    double label_smoothing, const std::string& f_divergence_type,
                                    double f_alpha_divergence_coef, double discopop_tau, double a,
                                    const std::string& score, const std::string& form, bool average,
                                    bool detach_weights, bool shift, std::int64_t ignore_index, bool use_weighting,
                                    std::optional<double> ld_alpha, bool check_inputs, bool check_unused_logits,
                                    double logit_scale, std::optional<double> logit_softcap, double temperature,
                                    std::optional<index_t> chunk_tokens) {
    tpo::objective_options o;
    o.weighting = parse_method(method);
    o.losses.clear();
    for (const std::string& t : loss_type) o.losses.push_back({tpo::parse_loss_type(t), 1.0});
    if (loss_weights) {
        tpo::detail::require(loss_weights->size() == o.losses.size(), "loss_weights: ", loss_weights->size(),
                             " weights for ", o.losses.size(), " losses");
        for (std::size_t k = 0; k < o.losses.size(); ++k) o.losses[k].weight = (*loss_weights)[k];
    }
    o.hyper.beta = beta;
    o.hyper.label_smoothing = label_smoothing;
    o.hyper.divergence = tpo::parse_f_divergence(f_divergence_type);
    o.hyper.f_alpha_divergence_coef = f_alpha_divergence_coef;
    o.hyper.discopop_tau = discopop_tau;
    o.a = a;
    o.score = tpo::parse_score_kind(score);
    o.form = tpo::parse_sequence_form(form);
    o.average = average;
    o.detach_weights = detach_weights;
    o.alignment.shift = shift;
    o.alignment.ignore_index = ignore_index;
    o.use_weighting = use_weighting;
    o.ld_alpha = ld_alpha;
    o.check_inputs = check_inputs;
    o.check_unused_logits = check_unused_logits;
    o.logit_scale = logit_scale;
    o.logit_softcap = logit_softcap;
    o.temperature = temperature;
    o.chunk_tokens = chunk_tokens;
    tpo::validate(o);
    return o;
}

struct role_spec {
    const char* key;     // the key Python passes
    const char* prefix;  // the Python argument's name: prefix + side + suffix
    const char* suffix;
    int rank;
    std::initializer_list<element> types;
    tensor_ref side_refs::*member;
};

constexpr std::initializer_list<element> logits_types{element::f32, element::f64, element::bf16, element::f16};
constexpr std::initializer_list<element> label_types{element::i64, element::i32};

const role_spec roles[] = {
    {"policy", "policy_", "", 3, logits_types, &side_refs::policy},
    {"policy_noisy", "policy_", "_noisy", 3, logits_types, &side_refs::policy_noisy},
    {"reference", "reference_", "", 3, logits_types, &side_refs::reference},
    {"reference_noisy", "reference_", "_noisy", 3, logits_types, &side_refs::reference_noisy},
    {"labels", "labels_", "", 2, label_types, &side_refs::labels},
    {"weights", "weights_", "", 2, {element::f32}, &side_refs::weights},
    {"reference_scores", "reference_", "_scores", 1, {element::f64}, &side_refs::reference_scores},
};

struct array_place {
    place where = place::host;
    int device = 0;
    std::string first;  // the first array's name, for messages
};

template <class A>
void same_place(array_place& p, const A& a, const std::string& name, bool& seen) {
    const place where = place_of(a);
    const int device = where == place::cuda ? a.device_id() : 0;
    if (!seen) {
        p = {where, device, name};
        seen = true;
        return;
    }
    if (where != p.where || device != p.device)
        throw tpo::shape_error(tpo::detail::concat(name, ": in ", where == place::cuda ? "CUDA" : "host", " memory",
                                                   where == place::cuda ? tpo::detail::concat(" of device ", device) : "",
                                                   ", expected the memory of ", p.first, " (",
                                                   p.where == place::cuda ? "CUDA" : "host",
                                                   p.where == place::cuda ? tpo::detail::concat(" device ", p.device) : "",
                                                   ")"));
}


class objective_binding {
public:
    objective_binding(tpo::objective_options options, std::string backend, int threads)
        : options_(std::move(options)), backend_(std::move(backend)), threads_(threads) {
        if (backend_ != "auto" && backend_ != "cpu" && backend_ != "reference" && backend_ != "cuda")
            throw tpo::value_error(
                tpo::detail::concat("backend: '", backend_, "', expected auto, cpu, reference or cuda"));
        if (backend_ == "cpu" && !cpu_backend_built())
            throw tpo::value_error("backend: 'cpu' is not built into this package (Eigen 3.4 was not found when it "
                                   "was built), expected reference");
        if (backend_ == "cuda" && !built_with_cuda())
            throw tpo::value_error("backend: 'cuda' is not built into this package (it was built without CUDA)");
        tpo::detail::require(threads_ >= 0, "threads = ", threads_, ", expected >= 0 (0: OpenMP's default)");
    }

    /// `heads`: None for logits inputs; with hidden states in, the lm_heads ("head", "head_bias",
    /// "reference_head", "reference_head_bias").
    nb::dict forward(nb::dict chosen, nb::dict rejected, std::uintptr_t stream, std::optional<nb::dict> heads) {
        std::lock_guard lock(mutex_);
        engine_.reset();
        held_.clear();
        batch_ = {};
        array_place where;
        bool seen = false;
        batch_.hidden = heads.has_value();
        read_side(chosen, "chosen", batch_.chosen, where, seen);
        read_side(rejected, "rejected", batch_.rejected, where, seen);
        if (heads) read_heads(*heads, where, seen);
        check_types();
        engine_ = make_engine(where, stream);
        tpo::objective_result r;
        {
            nb::gil_scoped_release release;
            r = engine_->forward(batch_);
        }
        where_ = where;
        return result_dict(r);
    }

    void backward(nb::dict out) {
        std::lock_guard lock(mutex_);
        tpo::detail::require<tpo::error>(engine_ != nullptr, "backward: forward() must run first");
        gradient_refs g;
        std::vector<output_array> outputs;
        struct target {
            const char* key;
            const char* name;
            tensor_ref gradient_refs::*member;
            const tensor_ref* like;
            int rank;
        } targets[] = {
            {"policy_chosen", "out['policy_chosen']", &gradient_refs::chosen_policy, &batch_.chosen.policy, 3},
            {"policy_chosen_noisy", "out['policy_chosen_noisy']", &gradient_refs::chosen_policy_noisy,
             &batch_.chosen.policy_noisy, 3},
            {"policy_rejected", "out['policy_rejected']", &gradient_refs::rejected_policy, &batch_.rejected.policy, 3},
            {"policy_rejected_noisy", "out['policy_rejected_noisy']", &gradient_refs::rejected_policy_noisy,
             &batch_.rejected.policy_noisy, 3},
            {"lm_head", "out['lm_head']", &gradient_refs::head, &batch_.head, 2},
            {"lm_head_bias", "out['lm_head_bias']", &gradient_refs::head_bias, &batch_.head_bias, 1},
        };
        std::size_t used = 0;
        for (const target& t : targets) {
            if (!out.contains(t.key) || out[t.key].is_none()) continue;
            ++used;
            const typed_array<output_array> typed =
                cast_array<output_array>(out[t.key], t.name, "a writable array shaped like the logits");
            const output_array& a = typed.array;
            tpo::detail::require<tpo::shape_error>(t.like->given(), t.name,
                                                   ": given, but forward() had no such input");
            tensor_ref r = make_ref(a, t.name, t.rank, logits_types, typed.bfloat16_bits);
            tpo::detail::require<tpo::shape_error>(r.type == t.like->type, t.name, ": dtype ", element_name(r.type),
                                                   ", expected ", element_name(t.like->type), " as the input");
            tpo::detail::require<tpo::shape_error>(r.rank == 3 || r.shape == t.like->shape, t.name, ": shape (",
                                                   r.shape[0], r.rank == 2 ? tpo::detail::concat(", ", r.shape[1]) : "",
                                                   "), expected that of the lm_head it differentiates");
            const place where = place_of(a);
            const int device = where == place::cuda ? a.device_id() : 0;
            tpo::detail::require<tpo::shape_error>(where == where_.where && device == where_.device, t.name,
                                                   ": not in the memory of the logits (", where_.first, ")");
            g.*t.member = r;
            outputs.push_back(a);
        }
        tpo::detail::require<tpo::shape_error>(used == out.size(), "backward: out has keys other than "
                                               "policy_chosen, policy_chosen_noisy, policy_rejected, "
                                               "policy_rejected_noisy, lm_head, lm_head_bias");
        nb::gil_scoped_release release;
        engine_->backward(batch_, g);
    }

    /// Lets go of the last forward's arrays (and its engine); backward() then needs a new forward.
    void release() {
        std::lock_guard lock(mutex_);
        engine_.reset();
        held_.clear();
        batch_ = {};
    }

private:
    void read_heads(nb::dict d, array_place& where, bool& seen) {
        struct head_spec {
            const char* key;
            const char* name;
            int rank;
            tensor_ref batch_refs::*member;
        } specs[] = {{"head", "lm_head", 2, &batch_refs::head},
                     {"head_bias", "lm_head_bias", 1, &batch_refs::head_bias},
                     {"reference_head", "reference_lm_head", 2, &batch_refs::reference_head},
                     {"reference_head_bias", "reference_lm_head_bias", 1, &batch_refs::reference_head_bias}};
        std::size_t used = 0;
        for (const head_spec& spec : specs) {
            if (!d.contains(spec.key)) continue;
            ++used;
            nb::handle h = d[spec.key];
            if (h.is_none()) continue;
            bool bfloat16_bits = false;
            input_array a = as_input(h, spec.name, &bfloat16_bits);
            batch_.*spec.member = make_ref(a, spec.name, spec.rank, logits_types, bfloat16_bits);
            same_place(where, a, spec.name, seen);
            held_.push_back(a);
        }
        if (used != d.size()) throw tpo::value_error("heads: unknown key");
        tpo::detail::require<tpo::shape_error>(batch_.head.given(), "lm_head: missing, required with hidden states");
    }

    void read_side(nb::dict d, const char* side, side_refs& s, array_place& where, bool& seen) {
        std::size_t used = 0;
        for (const role_spec& role : roles) {
            if (!d.contains(role.key)) continue;
            ++used;
            nb::handle h = d[role.key];
            if (h.is_none()) continue;
            const std::string name = tpo::detail::concat(role.prefix, side, role.suffix);
            bool bfloat16_bits = false;
            input_array a = as_input(h, name, &bfloat16_bits);
            s.*role.member = make_ref(a, name, role.rank, role.types, bfloat16_bits);
            same_place(where, a, name, seen);
            held_.push_back(a);
        }
        if (used != d.size())
            throw tpo::value_error(tpo::detail::concat(side, ": unknown input among ", d.size(), " keys"));
    }

    /// Every logits tensor of a batch has the chosen policy's element type, both label tensors
    /// one type: the engine types the whole batch from those two.
    void check_types() const {
        const element logits = batch_.chosen.policy.type, labels = batch_.chosen.labels.type;
        tpo::detail::require<tpo::shape_error>(logits != element::none, "policy_chosen: missing");
        tpo::detail::require<tpo::shape_error>(batch_.rejected.policy.given(), "policy_rejected: missing");
        tpo::detail::require<tpo::shape_error>(labels != element::none && batch_.rejected.labels.given(),
                                               "labels_chosen and labels_rejected are required");
        for (const char* side : {"chosen", "rejected"}) {
            const side_refs& s = side[0] == 'c' ? batch_.chosen : batch_.rejected;
            for (const role_spec& role : roles) {
                const tensor_ref& r = s.*role.member;
                if (!r.given() || role.rank != 3) continue;
                tpo::detail::require<tpo::shape_error>(r.type == logits, role.prefix, side, role.suffix, ": dtype ",
                                                       element_name(r.type), ", expected ", element_name(logits),
                                                       " as policy_chosen (one dtype for every logits tensor)");
            }
        }
        const std::pair<const tensor_ref*, const char*> heads[] = {{&batch_.head, "lm_head"},
                                                                    {&batch_.head_bias, "lm_head_bias"},
                                                                    {&batch_.reference_head, "reference_lm_head"},
                                                                    {&batch_.reference_head_bias, "reference_lm_head_bias"}};
        for (const auto& [r, name] : heads)
            tpo::detail::require<tpo::shape_error>(!r->given() || r->type == logits, name, ": dtype ",
                                                   element_name(r->type), ", expected ", element_name(logits),
                                                   " as policy_chosen (the hidden states' dtype)");
        tpo::detail::require<tpo::shape_error>(batch_.rejected.labels.type == labels, "labels_rejected: dtype ",
                                               element_name(batch_.rejected.labels.type), ", expected ",
                                               element_name(labels), " as labels_chosen");
    }

    std::unique_ptr<engine> make_engine(const array_place& where, std::uintptr_t stream) const {
        if (where.where == place::cuda) {
            if (backend_ == "cpu" || backend_ == "reference")
                throw tpo::shape_error(tpo::detail::concat(where.first, ": CUDA memory, but backend='", backend_,
                                                           "' runs on the host; use backend='auto' or 'cuda'"));
            if (!built_with_cuda())
                throw tpo::shape_error(tpo::detail::concat(
                    where.first, ": CUDA memory, but this package was built without CUDA (see docs/python.md); "
                                 "move the tensors to the CPU or rebuild with CUDA"));
            return make_cuda_engine(options_, stream, where.device);
        }
        if (backend_ == "cuda")
            throw tpo::shape_error(tpo::detail::concat(where.first, ": host memory, but backend='cuda'"));
        return make_host_engine(options_, backend_, threads_);
    }

    nb::dict result_dict(const tpo::objective_result& r) const {
        nb::dict d;
        d["loss"] = r.loss;
        d["reward_accuracy"] = r.reward_accuracy;
        d["reward_margin"] = r.reward_margin;
        d["losses"] = to_numpy(r.losses);
        d["chosen_rewards"] = to_numpy(r.chosen_rewards);
        d["rejected_rewards"] = to_numpy(r.rejected_rewards);
        d["policy_chosen_scores"] = to_numpy(r.policy_chosen_scores);
        d["policy_rejected_scores"] = to_numpy(r.policy_rejected_scores);
        d["reference_chosen_scores"] = to_numpy(r.reference_chosen_scores);
        d["reference_rejected_scores"] = to_numpy(r.reference_rejected_scores);
        d["mean_visual_score_chosen"] = to_numpy(r.mean_visual_score_chosen);
        d["mean_visual_score_rejected"] = to_numpy(r.mean_visual_score_rejected);
        d["chosen_tokens"] = to_numpy(r.chosen_tokens);
        d["rejected_tokens"] = to_numpy(r.rejected_tokens);
        d["grad_policy_chosen_scores"] = to_numpy(r.grad_policy_chosen_scores);
        d["grad_policy_rejected_scores"] = to_numpy(r.grad_policy_rejected_scores);
        return d;
    }

    tpo::objective_options options_;
    std::string backend_;
    int threads_;
    std::mutex mutex_;
    std::unique_ptr<engine> engine_;
    batch_refs batch_;
    array_place where_;
    std::vector<input_array> held_;
};

nb::tuple token_scores(nb::handle clean, nb::handle noisy, nb::handle labels, const std::string& side,
                       const std::string& score, double a, bool shift, std::int64_t ignore_index,
                       const std::string& backend, int threads, std::uintptr_t stream) {
    token_score_request request;
    bool clean_bf16 = false, noisy_bf16 = false;
    const input_array c = as_input(clean, "clean", &clean_bf16), n = as_input(noisy, "noisy", &noisy_bf16),
                      y = as_input(labels, "labels");
    request.clean = make_ref(c, "clean", 3, logits_types, clean_bf16);
    request.noisy = make_ref(n, "noisy", 3, logits_types, noisy_bf16);
    request.labels = make_ref(y, "labels", 2, label_types);
    tpo::detail::require<tpo::shape_error>(request.noisy.type == request.clean.type, "noisy: dtype ",
                                           element_name(request.noisy.type), ", expected ",
                                           element_name(request.clean.type), " as clean");
    if (side == "chosen")
        request.side = tpo::response_side::chosen;
    else if (side == "rejected")
        request.side = tpo::response_side::rejected;
    else
        throw tpo::value_error(tpo::detail::concat("side: '", side, "', expected chosen or rejected"));
    request.score = tpo::parse_score_kind(score);
    request.a = a;
    request.alignment = {shift, ignore_index};
    array_place where;
    bool seen = false;
    same_place(where, c, "clean", seen);
    same_place(where, n, "noisy", seen);
    same_place(where, y, "labels", seen);
    // The engine's objective is never run here: token scores only use its backend.
    const tpo::objective_options options;
    std::unique_ptr<engine> e;
    if (where.where == place::cuda) {
        tpo::detail::require<tpo::shape_error>(built_with_cuda(), "clean: CUDA memory, but this package was built "
                                               "without CUDA; move the tensors to the CPU or rebuild with CUDA");
        tpo::detail::require<tpo::shape_error>(backend == "auto" || backend == "cuda", "clean: CUDA memory, but "
                                               "backend='", backend, "' runs on the host");
        e = make_cuda_engine(options, stream, where.device);
    } else {
        tpo::detail::require<tpo::shape_error>(backend != "cuda", "clean: host memory, but backend='cuda'");
        e = make_host_engine(options, backend, threads);
    }
    tpo::token_score_table t;
    {
        nb::gil_scoped_release release;
        t = e->token_scores(request);
    }
    const std::vector<std::size_t> shape{static_cast<std::size_t>(t.sequences), static_cast<std::size_t>(t.rows)};
    auto* mask = new bool[t.mask.size()];
    for (std::size_t k = 0; k < t.mask.size(); ++k) mask[k] = t.mask[k] != 0;
    nb::capsule mask_owner(mask, [](void* p) noexcept { delete[] static_cast<bool*>(p); });
    return nb::make_tuple(to_numpy(t.logps, shape), to_numpy(t.scores, shape), to_numpy(t.weights, shape),
                          nb::ndarray<nb::numpy, bool, nb::ndim<2>>(mask, 2, shape.data(), mask_owner));
}

}  // namespace

std::unique_ptr<engine> make_host_engine(const tpo::objective_options& options, const std::string& backend,
                                         int threads) {
#if defined(TPO_PYTHON_WITH_CPU_BACKEND)
    if (backend == "auto" || backend == "cpu")
        return std::make_unique<backend_engine<tpo::backend::cpu>>(options, threads);
#else
    tpo::detail::require(backend != "cpu", "backend: 'cpu' is not built into this package");
#endif
    (void)threads;
    return std::make_unique<backend_engine<tpo::backend::reference>>(options);
}

bool cpu_backend_built() {
#if defined(TPO_PYTHON_WITH_CPU_BACKEND)
    return true;
#else
    return false;
#endif
}

void bind_objective(nb::module_& m) {
    nb::class_<objective_binding>(m, "Objective")
        .def(
            "__init__",
            [](objective_binding* self, const std::string& method, const std::vector<std::string>& loss_type,
               const std::optional<std::vector<double>>& loss_weights, double beta, double label_smoothing,
               const std::string& f_divergence_type, double f_alpha_divergence_coef, double discopop_tau, double a,
               const std::string& score, const std::string& form, bool average, bool detach_weights, bool shift,
               std::int64_t ignore_index, bool use_weighting, std::optional<double> ld_alpha, bool check_inputs,
               bool check_unused_logits, double logit_scale, std::optional<double> logit_softcap, double temperature,
               std::optional<index_t> chunk_tokens, const std::string& backend, int threads) {
                new (self) objective_binding(
                    make_options(method, loss_type, loss_weights, beta, label_smoothing, f_divergence_type,
                                 f_alpha_divergence_coef, discopop_tau, a, score, form, average, detach_weights,
                                 shift, ignore_index, use_weighting, ld_alpha, check_inputs, check_unused_logits,
                                 logit_scale, logit_softcap, temperature, chunk_tokens),
                    backend, threads);
            },
            nb::kw_only(), nb::arg("method"), nb::arg("loss_type"), nb::arg("loss_weights").none(), nb::arg("beta"),
            nb::arg("label_smoothing"), nb::arg("f_divergence_type"), nb::arg("f_alpha_divergence_coef"),
            nb::arg("discopop_tau"), nb::arg("a"), nb::arg("score"), nb::arg("form"), nb::arg("average"),
            nb::arg("detach_weights"), nb::arg("shift"), nb::arg("ignore_index"), nb::arg("use_weighting"),
            nb::arg("ld_alpha").none(), nb::arg("check_inputs"), nb::arg("check_unused_logits"),
            nb::arg("logit_scale"), nb::arg("logit_softcap").none(), nb::arg("temperature"),
            nb::arg("chunk_tokens").none(), nb::arg("backend"), nb::arg("threads"))
        .def("forward", &objective_binding::forward, nb::arg("chosen"), nb::arg("rejected"), nb::arg("stream") = 0,
             nb::arg("heads").none() = nb::none())
        .def("backward", &objective_binding::backward, nb::arg("out"))
        .def("release", &objective_binding::release);
    m.def("token_scores", &token_scores, nb::arg("clean"), nb::arg("noisy"), nb::arg("labels"), nb::kw_only(),
          nb::arg("side"), nb::arg("score"), nb::arg("a"), nb::arg("shift"), nb::arg("ignore_index"),
          nb::arg("backend"), nb::arg("threads"), nb::arg("stream"));
    m.def("release_cpu_scratch", []() -> std::size_t {
#if defined(TPO_PYTHON_WITH_CPU_BACKEND)
        return tpo::backend::cpu::release_cached_scratch();
#else
        return 0;
#endif
    });
}

}  // namespace tpo_python
