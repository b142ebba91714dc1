#pragma once
// `tpo score`: per-token log-probabilities, visual scores and self-calibrated weights of one side,
// for inspecting which tokens TPO rewards (tpo::token_scores, reward/token_scores.hpp), written in
// the logits' dtype.

#include <filesystem>
#include <optional>
#include <ostream>
#include <span>
#include <string>
#include <vector>

#include "tpo/backend/reference.hpp"
#include "tpo/io/file.hpp"
#include "tpo/io/npy.hpp"
#include "tpo/loss/options.hpp"
#include "tpo/reward/token_scores.hpp"

#include "cli/args.hpp"
#include "cli/inputs.hpp"
#include "cli/loss_command.hpp"

namespace tpo_cli {

inline constexpr flag_spec score_flags[] = {
    {"clean", true}, {"noisy", true},        {"labels", true},   {"side", true}, {"score", true},
    {"a", true},     {"no-shift", false},    {"ignore-index", true}, {"out", true},
};

inline int run_score(std::span<const std::string> argv, std::ostream&) {
    const parsed_args args(argv, score_flags, "score");
    tpo::objective_options o;
    read_token_options(args, o);
    if (!(o.a >= 0)) args.fail(tpo::detail::concat("flag --a: ", o.a, ", expected a margin >= 0"));
    if (!args.has("side")) args.required("side");
    const std::string side_name = args.choice("side", "", {"chosen", "rejected"});
    const tpo::response_side side = side_name == "chosen" ? tpo::response_side::chosen : tpo::response_side::rejected;
    const std::string clean_path = args.required("clean"), noisy_path = args.required("noisy"),
                      labels_path = args.required("labels"), out_dir = args.required("out");

    const logits_file clean = load_logits(clean_path);
    const logits_file noisy = load_logits(noisy_path);
    check_same_shape(clean, noisy);
    check_same_dtype(clean, noisy);
    const labels_file labels = load_labels(labels_path);
    check_labels(labels, clean, o.alignment);
    check_finite_rows(clean, labels, o.alignment);
    check_finite_rows(noisy, labels, o.alignment);

    std::optional<output_directory> dir;
    tpo::io::staged_files outputs(tool_temporaries());
    auto compute = [&](auto element) {
        using T = decltype(element);
        tpo::backend::reference backend;
        const tpo::token_score_table t = tpo::token_scores(backend, clean.view<T>(), noisy.view<T>(), labels.view(),
                                                           side, o.score, o.a, o.alignment);
        const std::vector<std::int64_t> shape{t.sequences, t.rows};
        dir.emplace(out_dir, "--out");
        const std::filesystem::path d = dir->path();
        auto narrowed = [](const std::vector<double>& values) { return std::vector<T>(values.begin(), values.end()); };
        outputs.add(d / "logps.npy", tpo::io::encode_npy<T>(shape, std::span<const T>(narrowed(t.logps))));
        outputs.add(d / "scores.npy", tpo::io::encode_npy<T>(shape, std::span<const T>(narrowed(t.scores))));
        outputs.add(d / "weights.npy", tpo::io::encode_npy<T>(shape, std::span<const T>(narrowed(t.weights))));
        outputs.add(d / "mask.npy", tpo::io::encode_npy<std::uint8_t>(shape, std::span<const std::uint8_t>(t.mask)));
    };
    with_element(clean.array.dtype, compute);
    outputs.commit();
    dir->keep();
    return 0;
}

}  // namespace tpo_cli
