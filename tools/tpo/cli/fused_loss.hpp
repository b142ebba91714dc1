#pragma once
// `tpo loss --dir DIR` on a fused directory: last hidden states and the lm_head instead of logits.
//
//   policy_hidden_{chosen,rejected}.npy        (P, L, H)   (+ _noisy twins with --method tpo)
//   lm_head.npy (V, H), lm_head_bias.npy (V)   the policy's head; the bias is optional
//   labels_{chosen,rejected}.npy               (P, L)
//   the reference: reference_hidden_{chosen,rejected}.npy (+ _noisy) with reference_lm_head.npy
//   (+ reference_lm_head_bias.npy), or reference_scores_{chosen,rejected}.npy (P) <f8
//
// With --grad-dir: grad_policy_hidden_{chosen,rejected}.npy (+ _noisy), grad_lm_head.npy, and
// grad_lm_head_bias.npy when the head has a bias. Every array is <f4 or <f8, one dtype for all.

#include <array>
#include <filesystem>
#include <optional>
#include <ostream>
#include <span>
#include <string>
#include <vector>

#include "tpo/io/file.hpp"
#include "tpo/io/npy.hpp"
#include "tpo/loss/objective.hpp"

#include "cli/args.hpp"
#include "cli/backends.hpp"
#include "cli/inputs.hpp"
#include "cli/json.hpp"
#include "cli/output.hpp"

namespace tpo_cli {

/// The JSON object `tpo loss` prints, whatever its inputs.
inline void add_result(json_object& json, const tpo::objective_result& r) {
    json.number("loss", r.loss);
    json.numbers("losses", r.losses);
    json.numbers("chosen_rewards", r.chosen_rewards);
    json.numbers("rejected_rewards", r.rejected_rewards);
    json.numbers("policy_chosen_scores", r.policy_chosen_scores);
    json.numbers("policy_rejected_scores", r.policy_rejected_scores);
    json.numbers("reference_chosen_scores", r.reference_chosen_scores);
    json.numbers("reference_rejected_scores", r.reference_rejected_scores);
    json.numbers("mean_visual_score_chosen", r.mean_visual_score_chosen);
    json.numbers("mean_visual_score_rejected", r.mean_visual_score_rejected);
    json.number("reward_accuracy", r.reward_accuracy);
    json.number("reward_margin", r.reward_margin);
    json.numbers("chosen_tokens", r.chosen_tokens);
    json.numbers("rejected_tokens", r.rejected_tokens);
}

/// A float array of a given number of dimensions, each at least 1.
inline io::npy_array load_float_dims(const std::string& path, std::size_t dims, const char* layout) {
    io::npy_array a = load_float_array(path);
    if (a.shape.size() != dims)
        throw input_error(tpo::detail::concat(path, ": shape: ", io::shape_text(a.shape), " has ", a.shape.size(),
                                              " dimensions, expected ", dims, " ", layout));
    for (std::int64_t d : a.shape)
        if (d < 1)
            throw input_error(tpo::detail::concat(path, ": shape: ", io::shape_text(a.shape), ", expected ", layout,
                                                  " with every dimension at least 1"));
    return a;
}

struct named_array {
    std::string path;
    io::npy_array array;
};

struct fused_side_files {
    named_array policy;
    std::optional<named_array> policy_noisy, reference, reference_noisy, reference_scores;
    labels_file labels;
};

struct fused_files {
    named_array head;
    std::optional<named_array> head_bias, reference_head, reference_head_bias;
    fused_side_files chosen, rejected;
};

/// Which kind of policy input DIR holds: logits (false) or hidden states (true); both or neither
/// is an error naming what was found.
inline bool holds_hidden_states(const std::filesystem::path& dir) {
    const bool logits = has_file(dir, "policy_chosen.npy") || has_file(dir, "policy_rejected.npy");
    const bool hidden = has_file(dir, "policy_hidden_chosen.npy") || has_file(dir, "policy_hidden_rejected.npy") ||
                        has_file(dir, "lm_head.npy");
    if (logits && hidden)
        throw input_error(tpo::detail::concat(dir.string(), ": holds both policy logits (policy_chosen.npy / "
                                              "policy_rejected.npy) and hidden-state inputs (policy_hidden_*.npy, "
                                              "lm_head.npy); expected one kind"));
    if (!logits && !hidden)
        throw input_error(tpo::detail::concat(dir.string(), ": holds neither policy logits (policy_chosen.npy) nor "
                                              "hidden states (policy_hidden_chosen.npy with lm_head.npy)"));
    return hidden;
}

inline void require_same(const named_array& a, const named_array& b, bool shape) {
    if (a.array.dtype != b.array.dtype)
        throw input_error(tpo::detail::concat(b.path, ": descr: ", io::descr(b.array.dtype), ", expected ",
                                              io::descr(a.array.dtype), " as ", a.path));
    if (shape && a.array.shape != b.array.shape)
        throw input_error(tpo::detail::concat(b.path, ": shape: ", io::shape_text(b.array.shape), ", expected ",
                                              io::shape_text(a.array.shape), " as ", a.path));
}

/// A head (V, H) and its optional bias (V), checked against each other.
inline std::pair<named_array, std::optional<named_array>> load_head(const std::filesystem::path& dir,
                                                                    const std::string& name) {
    named_array head{(dir / (name + ".npy")).string(), {}};
    head.array = load_float_dims(head.path, 2, "(V, H)");
    std::optional<named_array> bias;
    if (has_file(dir, name + "_bias.npy")) {
        bias = named_array{(dir / (name + "_bias.npy")).string(), {}};
        bias->array = load_float_dims(bias->path, 1, "(V)");
        require_same(head, *bias, false);
        if (bias->array.shape[0] != head.array.shape[0])
            throw input_error(tpo::detail::concat(bias->path, ": shape: ", io::shape_text(bias->array.shape),
                                                  ", expected (", head.array.shape[0], ") as the vocabulary of ",
                                                  head.path, " ", io::shape_text(head.array.shape)));
    }
    return {std::move(head), std::move(bias)};
}

inline fused_side_files load_fused_side(const std::filesystem::path& dir, const std::string& side, bool noisy,
                                        const named_array& head, tpo::row_alignment align) {
    auto file = [&](const std::string& name) { return (dir / (name + ".npy")).string(); };
    auto hidden = [&](const std::string& name) {
        named_array a{file(name), load_float_dims(file(name), 3, "(P, L, H)")};
        require_same(head, a, false);
        if (a.array.shape[2] != head.array.shape[1])
            throw input_error(tpo::detail::concat(a.path, ": shape: ", io::shape_text(a.array.shape),
                                                  ", hidden size ", a.array.shape[2], " differs from the H = ",
                                                  head.array.shape[1], " of ", head.path));
        return a;
    };
    fused_side_files f{hidden("policy_hidden_" + side), {}, {}, {}, {}, load_labels(file("labels_" + side))};
    const bool scores = has_file(dir, "reference_scores_" + side + ".npy");
    const bool states = has_file(dir, "reference_hidden_" + side + ".npy");
    if (scores == states)
        throw input_error(tpo::detail::concat(dir.string(), ": the ", side, " reference: expected either reference_hidden_",
                                              side, ".npy (with reference_lm_head.npy) or reference_scores_", side,
                                              ".npy, found ", scores ? "both" : "neither"));
    if (states) {
        f.reference = hidden("reference_hidden_" + side);
        require_same(f.policy, *f.reference, true);
    } else {
        named_array s{file("reference_scores_" + side), io::read_npy(file("reference_scores_" + side))};
        if (s.array.dtype != io::npy_dtype::f8 || s.array.shape.size() != 1 ||
            s.array.shape[0] != f.policy.array.shape[0])
            throw input_error(tpo::detail::concat(s.path, ": ", io::descr(s.array.dtype), " ",
                                                  io::shape_text(s.array.shape), ", expected '<f8' of shape (",
                                                  f.policy.array.shape[0], "), one score per sequence"));
        f.reference_scores = std::move(s);
    }
    if (noisy) {
        f.policy_noisy = hidden("policy_hidden_" + side + "_noisy");
        require_same(f.policy, *f.policy_noisy, true);
        if (states) {
            f.reference_noisy = hidden("reference_hidden_" + side + "_noisy");
            require_same(f.policy, *f.reference_noisy, true);
        }
    }
    const auto& shape = f.policy.array.shape;
    if (f.labels.shape[0] != shape[0] || f.labels.shape[1] != shape[1])
        throw input_error(tpo::detail::concat(f.labels.path, ": shape: ", io::shape_text(f.labels.shape),
                                              ", expected (", shape[0], ", ", shape[1], ") to match ", f.policy.path,
                                              " ", io::shape_text(shape)));
    const std::int64_t vocab = head.array.shape[0];
    for (std::size_t i = 0; i < f.labels.values.size(); ++i) {
        const std::int64_t label = f.labels.values[i];
        if (label != align.ignore_index && (label < 0 || label >= vocab))
            throw input_error(tpo::detail::concat(f.labels.path, ": data: label ", label, " at ",
                                                  index_text(f.labels.shape, i), " is outside [0, ", vocab,
                                                  ") and is not the ignore index ", align.ignore_index));
    }
    return f;
}

/// Views on the loaded arrays (which must outlive them); a null array gives an empty view.
template <class T>
tpo::hidden_view<const T> hidden_of(const named_array* a) {
    if (!a) return {};
    const auto& s = a->array.shape;
    return {a->array.values<T>().data(), s[0], s[1], s[2]};
}

template <class T>
tpo::head_view<const T> head_of(const named_array* w, const named_array* b) {
    if (!w) return {};
    return {w->array.values<T>().data(), b ? b->array.values<T>().data() : nullptr, w->array.shape[0],
            w->array.shape[1]};
}

inline const named_array* pointer(const std::optional<named_array>& a) { return a ? &*a : nullptr; }

template <class T>
tpo::hidden_side_batch<T, std::int64_t> fused_side_view(const fused_side_files& f) {
    tpo::hidden_side_batch<T, std::int64_t> s;
    s.policy = hidden_of<T>(&f.policy);
    s.policy_noisy = hidden_of<T>(pointer(f.policy_noisy));
    s.reference = hidden_of<T>(pointer(f.reference));
    s.reference_noisy = hidden_of<T>(pointer(f.reference_noisy));
    s.labels = f.labels.view();
    if (f.reference_scores)
        s.reference_scores = {f.reference_scores->array.values<double>().data(), f.reference_scores->array.shape[0]};
    return s;
}

/// The fused run: loads and checks DIR's files, evaluates, prints the JSON and stages the
/// gradient files, exactly as the logits run does.
/// A fused directory's files, loaded and checked against each other.
inline fused_files load_fused_files(const std::filesystem::path& dir, bool noisy, tpo::row_alignment align) {
    fused_files files{{}, {}, {}, {}, {}, {}};
    auto [head, bias] = load_head(dir, "lm_head");
    files.head = std::move(head);
    files.head_bias = std::move(bias);
    files.chosen = load_fused_side(dir, "chosen", noisy, files.head, align);
    files.rejected = load_fused_side(dir, "rejected", noisy, files.head, align);
    if (files.chosen.reference) {
        auto [reference_head, reference_bias] = load_head(dir, "reference_lm_head");
        require_same(files.head, reference_head, true);
        files.reference_head = std::move(reference_head);
        files.reference_head_bias = std::move(reference_bias);
    }
    require_same(files.chosen.policy, files.rejected.policy, false);
    if (files.chosen.policy.array.shape[0] != files.rejected.policy.array.shape[0])
        throw input_error(tpo::detail::concat(files.rejected.policy.path, ": shape: ",
                                              io::shape_text(files.rejected.policy.array.shape), ", expected ",
                                              files.chosen.policy.array.shape[0], " sequences to pair with ",
                                              files.chosen.policy.path));
    return files;
}

inline int run_fused_loss(const parsed_args& args, const tpo::objective_options& options,
                          const std::filesystem::path& dir, const std::string& backend, std::ostream& out) {
    const bool noisy = options.weighting == tpo::token_weighting::self_calibrated;
    const fused_files files = load_fused_files(dir, noisy, options.alignment);

    std::optional<output_directory> grad_dir;
    tpo::io::staged_files outputs(tool_temporaries());
    json_object json;
    auto compute = [&](auto element) {
        using T = decltype(element);
        const tpo::hidden_preference_batch<T, std::int64_t> batch{
            head_of<T>(&files.head, pointer(files.head_bias)),
            head_of<T>(pointer(files.reference_head), pointer(files.reference_head_bias)),
            fused_side_view<T>(files.chosen),
            fused_side_view<T>(files.rejected)};
        const bool want_grads = args.has("grad-dir");
        std::array<std::vector<T>, 4> grads;
        std::vector<T> grad_head, grad_bias;
        tpo::hidden_gradients<T> g;
        const named_array* like[4] = {&files.chosen.policy, &files.rejected.policy,
                                      noisy ? &*files.chosen.policy_noisy : nullptr,
                                      noisy ? &*files.rejected.policy_noisy : nullptr};
        if (want_grads) {
            auto make = [&](std::vector<T>& buffer, const named_array& a) {
                buffer.assign(a.array.size(), T(0));
                const auto& s = a.array.shape;
                return tpo::hidden_view<T>{buffer.data(), s[0], s[1], s[2]};
            };
            g.chosen.policy = make(grads[0], *like[0]);
            g.rejected.policy = make(grads[1], *like[1]);
            if (noisy) {
                g.chosen.policy_noisy = make(grads[2], *like[2]);
                g.rejected.policy_noisy = make(grads[3], *like[3]);
            }
            grad_head.assign(files.head.array.size(), T(0));
            g.head_weight = grad_head.data();
            if (files.head_bias) {
                grad_bias.assign(files.head_bias->array.size(), T(0));
                g.head_bias = grad_bias.data();
            }
        }
        tpo::objective_result r;
        with_backend(backend, [&](auto& b) {
            if constexpr (tpo::head_backend<std::decay_t<decltype(b)>>)
                r = tpo::evaluate(b, options, batch, want_grads ? &g : nullptr);
            else
                throw input_error(tpo::detail::concat("--backend ", backend, ": cannot take hidden states"));
        });
        add_result(json, r);
        if (want_grads) {
            grad_dir.emplace(args.required("grad-dir"), "--grad-dir");
            const std::filesystem::path gdir = grad_dir->path();
            const char* names[4] = {"grad_policy_hidden_chosen.npy", "grad_policy_hidden_rejected.npy",
                                    "grad_policy_hidden_chosen_noisy.npy", "grad_policy_hidden_rejected_noisy.npy"};
            for (int k = 0; k < (noisy ? 4 : 2); ++k)
                outputs.add(gdir / names[k], tpo::io::encode_npy<T>(like[k]->array.shape, std::span<const T>(grads[k])));
            outputs.add(gdir / "grad_lm_head.npy",
                        tpo::io::encode_npy<T>(files.head.array.shape, std::span<const T>(grad_head)));
            if (files.head_bias)
                outputs.add(gdir / "grad_lm_head_bias.npy",
                            tpo::io::encode_npy<T>(files.head_bias->array.shape, std::span<const T>(grad_bias)));
        }
    };
    with_directory(dir, [&] { with_element(files.head.array.dtype, compute); });
    publish(outputs, grad_dir, json.str(), out);
    return 0;
}

}  // namespace tpo_cli
