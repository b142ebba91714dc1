#pragma once
// `tpo loss --dir DIR ...`: the objective on logits dumped by a trainer, with optional gradients.

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
#include "tpo/loss/options.hpp"

#include "cli/args.hpp"
#include "cli/backends.hpp"
#include "cli/fused_loss.hpp"
#include "cli/inputs.hpp"
#include "cli/json.hpp"
#include "cli/output.hpp"

namespace tpo_cli {

inline constexpr flag_spec loss_flags[] = {
    {"dir", true},           {"method", true},          {"loss", true},
    {"loss-weights", true},  {"beta", true},            {"label-smoothing", true},
    {"a", true},             {"score", true},           {"form", true},
    {"average", false},      {"detach-weights", false}, {"no-shift", false},
    {"ignore-index", true},  {"backend", true},         {"grad-dir", true},
    {"f-divergence-type", true}, {"f-alpha-divergence-coef", true}, {"discopop-tau", true},
    {"use-weighting", false},    {"ld-alpha", true},
    {"logit-scale", true},       {"logit-softcap", true},   {"temperature", true},
    {"chunk-tokens", true},      {"vocab-parallel", true},
};

/// Options shared by `loss` and `score`: token reward settings and label alignment.
inline void read_token_options(const parsed_args& args, tpo::objective_options& o) {
    o.score = tpo::parse_score_kind(args.choice("score", "logit", {"logit", "prob", "logprob"}));
    o.a = args.real("a", 0.5);
    o.alignment.shift = !args.has("no-shift");
    o.alignment.ignore_index = args.integer("ignore-index", -100, INT64_MIN, INT64_MAX);
}

inline tpo::objective_options read_loss_options(const parsed_args& args) {
    tpo::objective_options o;
    const std::string method = args.choice("method", "tpo", {"tpo", "dpo"});
    o.weighting = method == "tpo" ? tpo::token_weighting::self_calibrated : tpo::token_weighting::none;
    try {
        o.losses = tpo::parse_loss_terms(args.text("loss", "sigmoid"), args.text("loss-weights", ""));
    } catch (const tpo::error& e) {
        args.fail(tpo::detail::concat("flag --loss/--loss-weights: ", e.what()));
    }
    o.hyper.beta = args.real("beta", 0.1);
    o.hyper.label_smoothing = args.real("label-smoothing", 0.0);
    o.hyper.divergence = tpo::parse_f_divergence(args.choice(
        "f-divergence-type", "reverse_kl", {"reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"}));
    o.hyper.f_alpha_divergence_coef = args.real("f-alpha-divergence-coef", 0.5);
    o.hyper.discopop_tau = args.real("discopop-tau", 0.05);
    read_token_options(args, o);
    o.form = tpo::parse_sequence_form(args.choice("form", "additive", {"additive", "multiplicative"}));
    o.average = args.has("average");
    o.detach_weights = args.has("detach-weights");
    o.use_weighting = args.has("use-weighting");
    if (args.has("ld-alpha")) o.ld_alpha = args.real("ld-alpha", 1.0);
    o.logit_scale = args.real("logit-scale", 1.0);
    if (args.has("logit-softcap")) o.logit_softcap = args.real("logit-softcap", 0.0);
    o.temperature = args.real("temperature", 1.0);
    if (args.has("chunk-tokens")) o.chunk_tokens = args.integer("chunk-tokens", 0, 1, INT64_MAX);
    try {
        tpo::validate(o);
    } catch (const tpo::error& e) {
        args.fail(e.what());
    }
    return o;
}

/// The files of one side, loaded and checked against each other. The reference model comes as its
/// logits (and noisy logits, for TPO) or as precomputed sequence scores A_ref.
struct side_files {
    logits_file policy;
    std::optional<logits_file> reference, policy_noisy, reference_noisy;
    std::optional<sequence_values_file> reference_scores;
    labels_file labels;
};

inline side_files load_side(const std::filesystem::path& dir, const std::string& side, bool noisy,
                            tpo::row_alignment align) {
    auto file = [&](const std::string& name) { return (dir / (name + ".npy")).string(); };
    side_files f{load_logits(file("policy_" + side)), {}, {}, {}, {}, load_labels(file("labels_" + side))};
    std::vector<std::string> reference_logits = {"reference_" + side + ".npy"};
    if (noisy) reference_logits.push_back("reference_" + side + "_noisy.npy");
    const std::size_t reference = choose_input(
        dir, {{"reference logits", reference_logits},
              {"precomputed reference scores", {"reference_scores_" + side + ".npy"}}});
    if (reference == 0) {
        f.reference = load_logits(file("reference_" + side));
        check_same_shape(f.policy, *f.reference);
        check_same_dtype(f.policy, *f.reference);
    } else {
        f.reference_scores = load_sequence_values(file("reference_scores_" + side), f.policy);
    }
    if (noisy) f.policy_noisy = load_logits(file("policy_" + side + "_noisy"));
    if (noisy && reference == 0) f.reference_noisy = load_logits(file("reference_" + side + "_noisy"));
    for (const auto* g : {&f.policy_noisy, &f.reference_noisy})
        if (*g) {
            check_same_shape(f.policy, **g);
            check_same_dtype(f.policy, **g);
        }
    check_labels(f.labels, f.policy, align);
    check_finite_rows(f.policy, f.labels, align);
    for (const auto* z : {&f.reference, &f.policy_noisy, &f.reference_noisy})
        if (*z) check_finite_rows(**z, f.labels, align);
    return f;
}

template <class T>
tpo::side_batch<T, std::int64_t> side_view(const side_files& f) {
    tpo::side_batch<T, std::int64_t> s;
    s.policy = f.policy.view<T>();
    if (f.reference) s.reference = f.reference->view<T>();
    if (f.policy_noisy) s.policy_noisy = f.policy_noisy->view<T>();
    if (f.reference_noisy) s.reference_noisy = f.reference_noisy->view<T>();
    if (f.reference_scores) s.reference_scores = f.reference_scores->view();
    s.labels = f.labels.view();
    return s;
}

/// Both sides of a logits directory, loaded and checked against each other.
inline std::pair<side_files, side_files> load_logits_sides(const std::filesystem::path& dir, bool noisy,
                                                           tpo::row_alignment align) {
    side_files chosen = load_side(dir, "chosen", noisy, align);
    side_files rejected = load_side(dir, "rejected", noisy, align);
    check_same_dtype(chosen.policy, rejected.policy);
    if (chosen.policy.sequences() != rejected.policy.sequences() || chosen.policy.vocab() != rejected.policy.vocab())
        throw input_error(tpo::detail::concat(rejected.policy.path, ": shape: ",
                                              tpo::io::shape_text(rejected.policy.array.shape), ", expected (",
                                              chosen.policy.sequences(), ", L, ", chosen.policy.vocab(),
                                              ") to pair with ", chosen.policy.path, " ",
                                              tpo::io::shape_text(chosen.policy.array.shape)));
    return {std::move(chosen), std::move(rejected)};
}

// cli/vocab_parallel.hpp, included below: the run with --vocab-parallel mpi.
inline int run_loss_vocab_parallel(const parsed_args& args, const tpo::objective_options& options,
                                   const std::filesystem::path& dir, const std::string& backend, std::ostream& out);

inline int run_loss(std::span<const std::string> argv, std::ostream& out) {
    const parsed_args args(argv, loss_flags, "loss");
    const tpo::objective_options options = read_loss_options(args);
    const std::filesystem::path dir = args.required("dir");
    const std::string backend = args.choice("backend", "reference", {"reference", "cpu", "thrust"});
    const bool noisy = options.weighting == tpo::token_weighting::self_calibrated;

    // The backend is checked before any file is read, so a wrong binary fails fast.
    with_backend(backend, [](auto&) {});
    if (args.has("vocab-parallel")) {
        args.choice("vocab-parallel", "mpi", {"mpi"});
        return run_loss_vocab_parallel(args, options, dir, backend, out);
    }
    if (holds_hidden_states(dir)) return run_fused_loss(args, options, dir, backend, out);

    const std::pair<side_files, side_files> sides = load_logits_sides(dir, noisy, options.alignment);
    const side_files& chosen = sides.first;
    const side_files& rejected = sides.second;

    // Declared before the staged set, so that a failed run removes the temporaries first and then
    // the directories it created.
    std::optional<output_directory> grad_dir;
    tpo::io::staged_files outputs(tool_temporaries());
    json_object json;
    auto compute = [&](auto element) {
        using T = decltype(element);
        const tpo::preference_batch<T, std::int64_t> batch{side_view<T>(chosen), side_view<T>(rejected)};
        std::array<std::vector<T>, 4> grads;
        tpo::preference_gradients<T> g;
        const bool want_grads = args.has("grad-dir");
        if (want_grads) {
            auto make = [&](std::vector<T>& buffer, const logits_file& like) {
                buffer.assign(like.array.size(), T(0));
                return tpo::logits_view<T>{buffer.data(), like.sequences(), like.length(), like.vocab()};
            };
            g.chosen.policy = make(grads[0], chosen.policy);
            g.rejected.policy = make(grads[1], rejected.policy);
            if (noisy) {
                g.chosen.policy_noisy = make(grads[2], *chosen.policy_noisy);
                g.rejected.policy_noisy = make(grads[3], *rejected.policy_noisy);
            }
        }
        tpo::objective_result r;
        with_backend(backend, [&](auto& b) { r = tpo::evaluate(b, options, batch, want_grads ? &g : nullptr); });
        add_result(json, r);
        if (want_grads) {
            grad_dir.emplace(args.required("grad-dir"), "--grad-dir");
            const std::filesystem::path gdir = grad_dir->path();
            const char* names[4] = {"grad_policy_chosen.npy", "grad_policy_rejected.npy", "grad_policy_chosen_noisy.npy",
                                    "grad_policy_rejected_noisy.npy"};
            const logits_file* like[4] = {&chosen.policy, &rejected.policy, noisy ? &*chosen.policy_noisy : nullptr,
                                          noisy ? &*rejected.policy_noisy : nullptr};
            for (int k = 0; k < (noisy ? 4 : 2); ++k)
                outputs.add(gdir / names[k],
                            tpo::io::encode_npy<T>(like[k]->array.shape, std::span<const T>(grads[k])));
        }
    };
    // The library's own checks name the side and the tensor; with_directory adds the directory.
    with_directory(dir, [&] { with_element(chosen.policy.array.dtype, compute); });
    publish(outputs, grad_dir, json.str(), out);
    return 0;
}

}  // namespace tpo_cli

#include "cli/vocab_parallel.hpp"
