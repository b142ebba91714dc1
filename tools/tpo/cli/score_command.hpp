#pragma once
// `tpo score`: per-token log-probabilities, visual scores and self-calibrated weights of one side,
// for inspecting which tokens TPO rewards. Built from the library's row statistics and the same
// reward functions the objective uses (SPEC §3), so the numbers are the objective's numbers.

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
#include "tpo/reward/token.hpp"

#include "cli/args.hpp"
#include "cli/inputs.hpp"
#include "cli/loss_command.hpp"

namespace tpo_cli {

inline constexpr flag_spec score_flags[] = {
    {"clean", true}, {"noisy", true},        {"labels", true},   {"side", true}, {"score", true},
    {"a", true},     {"no-shift", false},    {"ignore-index", true}, {"out", true},
};

/// Per-token outputs of one side, shape (P, scored rows), zero at masked positions.
template <class T>
struct token_outputs {
    std::vector<T> logps, scores, weights;
    std::vector<std::uint8_t> mask;
};

template <class T>
token_outputs<T> score_tokens(tpo::logits_view<const T> clean, tpo::logits_view<const T> noisy,
                              tpo::labels_view<const std::int64_t> labels, tpo::response_side side,
                              const tpo::objective_options& o) {
    tpo::backend::reference backend;
    const tpo::index_t scored = o.alignment.scored_rows(clean.length);
    const auto rows = static_cast<std::size_t>(clean.sequences * scored);
    std::vector<tpo::row_stats> clean_stats(rows), noisy_stats(rows);
    if (rows) {
        backend.row_statistics(clean, labels, o.alignment, tpo::row_reduction::logsumexp, clean_stats.data());
        backend.row_statistics(noisy, labels, o.alignment, tpo::row_reduction::logsumexp, noisy_stats.data());
    }
    token_outputs<T> out{std::vector<T>(rows, T(0)), std::vector<T>(rows, T(0)), std::vector<T>(rows, T(0)),
                         std::vector<std::uint8_t>(rows, 0)};
    for (std::size_t r = 0; r < rows; ++r) {
        if (clean_stats[r].status != tpo::row_status::ok) continue;
        const double s = tpo::reward::visual_score(o.score, clean_stats[r], noisy_stats[r]);
        out.logps[r] = static_cast<T>(clean_stats[r].log_prob());
        out.scores[r] = static_cast<T>(s);
        out.weights[r] = static_cast<T>(tpo::reward::calibrate(side, s, o.a).value);
        out.mask[r] = 1;
    }
    return out;
}

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
        const token_outputs<T> t = score_tokens<T>(clean.view<T>(), noisy.view<T>(), labels.view(), side, o);
        const std::vector<std::int64_t> shape{clean.sequences(), o.alignment.scored_rows(clean.length())};
        dir.emplace(out_dir, "--out");
        const std::filesystem::path d = dir->path();
        outputs.add(d / "logps.npy", tpo::io::encode_npy<T>(shape, std::span<const T>(t.logps)));
        outputs.add(d / "scores.npy", tpo::io::encode_npy<T>(shape, std::span<const T>(t.scores)));
        outputs.add(d / "weights.npy", tpo::io::encode_npy<T>(shape, std::span<const T>(t.weights)));
        outputs.add(d / "mask.npy", tpo::io::encode_npy<std::uint8_t>(shape, std::span<const std::uint8_t>(t.mask)));
    };
    if (clean.array.dtype == tpo::io::npy_dtype::f8)
        compute(double{});
    else
        compute(float{});
    outputs.commit();
    dir->keep();
    return 0;
}

}  // namespace tpo_cli
