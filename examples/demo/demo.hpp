#pragma once
// The end-to-end demo shared by `tpo demo` and the standalone tpo_demo program: corrupt an
// embedded image with the official TPO noise, let a tiny hand-written "vision-language model"
// read the clean and the corrupted image, and compute TPO's token weights, rewards and loss.
//
// The toy model is deliberately transparent: each vocabulary word's logit is a text prior plus
// visual evidence measured on 8×8 patches of the image (how red, green, blue, purple they are).
// Noise weakens that evidence, so tokens the image supports get a positive visual score
// s = z[y] − z̃[y]: TPO gives them more weight in the chosen answer and less in the rejected one
// (docs/formulas.md#self-calibrated-weight), while text-only tokens ("a", "on", ".") keep weight 1.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <ostream>
#include <string>
#include <vector>

#include "tpo/backend/reference.hpp"
#include "tpo/corrupt/diffusion.hpp"
#include "tpo/loss/objective.hpp"
#include "tpo/math/schedule.hpp"
#include "tpo/reward/token.hpp"

namespace tpo_demo {

inline constexpr int image_size = 32;  // 32×32 RGB, HWC, 8-bit
inline constexpr int patch = 8;

/// The embedded image: blue sky, green grass, a red ball.
inline std::vector<std::uint8_t> embedded_image() {
    std::vector<std::uint8_t> px(image_size * image_size * 3);
    for (int y = 0; y < image_size; ++y)
        for (int x = 0; x < image_size; ++x) {
            std::array<double, 3> c = y < 20 ? std::array<double, 3>{0.35, 0.55, 0.90 - 0.01 * y}
                                             : std::array<double, 3>{0.20, 0.70 - 0.005 * (y - 20), 0.25};
            const double dx = x - 16.5, dy = y - 17.5;
            if (dx * dx + dy * dy < 36.0) c = {0.85, 0.15, 0.10};
            for (int k = 0; k < 3; ++k) px[(y * image_size + x) * 3 + k] = static_cast<std::uint8_t>(c[k] * 255 + 0.5);
        }
    return px;
}

inline const std::vector<std::string>& vocabulary() {
    static const std::vector<std::string> words{"<s>", "a",   "the",   "red", "green", "blue", "purple",
                                                "ball", "cat", "grass", "sky", "on",    "is",   "."};
    return words;
}

inline int word(const std::string& w) {
    const auto& v = vocabulary();
    return static_cast<int>(std::find(v.begin(), v.end(), w) - v.begin());
}

/// Visual evidence for each word: the strongest patch response of the word's colour feature.
inline std::vector<double> visual_evidence(const std::vector<std::uint8_t>& px) {
    std::vector<double> best(vocabulary().size(), 0.0);
    std::vector<bool> seen(best.size(), false);
    for (int py = 0; py < image_size / patch; ++py)
        for (int pxl = 0; pxl < image_size / patch; ++pxl) {
            double m[3] = {0, 0, 0};
            for (int y = 0; y < patch; ++y)
                for (int x = 0; x < patch; ++x)
                    for (int k = 0; k < 3; ++k)
                        m[k] += px[((py * patch + y) * image_size + pxl * patch + x) * 3 + k] / 255.0;
            for (double& v : m) v /= patch * patch;
            const double red = m[0] - (m[1] + m[2]) / 2, green = m[1] - (m[0] + m[2]) / 2,
                         blue = m[2] - (m[0] + m[1]) / 2, purple = std::min(m[0], m[2]) - m[1];
            auto update = [&](const char* w, double v) {
                const int i = word(w);
                best[i] = seen[i] ? std::max(best[i], v) : v;
                seen[i] = true;
            };
            update("red", red), update("ball", red);
            update("green", green), update("grass", py >= 2 ? green : -0.5);
            update("blue", blue), update("sky", py < 2 ? blue : -0.5);
            update("purple", purple), update("cat", purple);
        }
    return best;
}

/// One sequence of the example batch: its words (the first is the prompt) and the words the
/// other side of the pair has at the same positions (the text prior cannot tell them apart).
struct sentence {
    std::vector<std::string> words, rival;
};

struct example_batch {
    std::vector<sentence> chosen, rejected;
    tpo::index_t length = 0;
};

inline example_batch embedded_batch() {
    example_batch b;
    b.chosen = {{{"<s>", "a", "red", "ball", "on", "green", "grass", "."},
                 {"<s>", "a", "purple", "cat", "on", "green", "grass", "."}},
                {{"<s>", "the", "sky", "is", "blue", ".", "", ""}, {"<s>", "the", "sky", "is", "purple", ".", "", ""}}};
    for (const sentence& s : b.chosen) b.rejected.push_back({s.rival, s.words});
    b.length = 8;
    return b;
}

/// Logits (S, L, V) of the toy model for the given sentences: row t predicts word t + 1.
inline std::vector<float> toy_logits(const std::vector<sentence>& sentences, tpo::index_t length,
                                     const std::vector<double>& evidence, double visual_gain) {
    const auto vocab = static_cast<tpo::index_t>(vocabulary().size());
    std::vector<float> z(sentences.size() * length * vocab, 0.0f);
    for (std::size_t s = 0; s < sentences.size(); ++s)
        for (tpo::index_t t = 0; t + 1 < length; ++t) {
            float* row = z.data() + (s * length + t) * vocab;
            for (const std::string* w : {&sentences[s].words[t + 1], &sentences[s].rival[t + 1]})
                if (!w->empty()) row[word(*w)] = 2.0f;  // the language prior: both continuations are fluent
            for (tpo::index_t v = 0; v < vocab; ++v) row[v] += static_cast<float>(visual_gain * 4.0 * evidence[v]);
        }
    return z;
}

inline std::vector<std::int64_t> labels_of(const std::vector<sentence>& sentences, tpo::index_t length) {
    std::vector<std::int64_t> y;
    for (const sentence& s : sentences)
        for (tpo::index_t t = 0; t < length; ++t)
            y.push_back(t == 0 || s.words[t].empty() ? -100 : word(s.words[t]));  // the prompt is not scored
    return y;
}

inline std::string fixed(double v, int digits = 4) {
    char buf[48];
    std::snprintf(buf, sizeof buf, "%+.*f", digits, v);
    return buf;
}
inline std::string plain(double v, int digits = 4) {
    char buf[48];
    std::snprintf(buf, sizeof buf, "%.*f", digits, v);
    return buf;
}

/// Runs the demo, printing to `out`. Returns 0.
inline int run(std::ostream& out) {
    tpo::backend::reference backend;

    // 1. The official corruption: forward diffusion at step 500 of the sigmoid schedule.
    const std::vector<std::uint8_t> image = embedded_image();
    std::vector<std::uint8_t> noisy(image.size());
    tpo::diffusion_options noise;
    tpo::add_diffusion_noise(backend, tpo::image_view<const std::uint8_t>::hwc(image.data(), image_size, image_size, 3),
                             tpo::image_view<std::uint8_t>::hwc(noisy.data(), image_size, image_size, 3), noise);
    const double ab = tpo::alpha_bar(noise.schedule, noise.step);
    double abs_change = 0, squared = 0;
    for (std::size_t i = 0; i < image.size(); ++i) {
        const double d = (static_cast<double>(noisy[i]) - image[i]) / 255.0;
        abs_change += std::abs(d);
        squared += d * d;
    }
    out << "tpo demo: Token Preference Optimization on an embedded example\n\n"
        << "1. Corrupt the image (official TPO noise: sigmoid schedule, K = 1000, k = 500, seed 0)\n"
        << "   embedded image: 32x32 RGB (sky, grass, a red ball)\n"
        << "   alpha_bar_500 = " << plain(ab, 6) << ": x~ = " << plain(std::sqrt(ab), 6) << " x + "
        << plain(std::sqrt(1 - ab), 6) << " eps, eps ~ N(0, 1) from Philox4x32-10\n"
        << "   mean |x~ - x| = " << plain(abs_change / image.size(), 3)
        << " (pixel values in [0, 1]), PSNR " << plain(10 * std::log10(image.size() / squared), 1)
        << " dB\n\n";

    // 2. The toy model reads the clean and the noisy image; the policy leans on the image a bit
    //    more than the reference (gain 1.25 vs 1), as a policy a few TPO steps in would.
    const example_batch batch = embedded_batch();
    const std::vector<double> clean_evidence = visual_evidence(image), noisy_evidence = visual_evidence(noisy);
    const auto vocab = static_cast<tpo::index_t>(vocabulary().size());
    const tpo::index_t pairs = static_cast<tpo::index_t>(batch.chosen.size()), length = batch.length;
    struct side_data {
        std::vector<float> policy, policy_noisy, reference, reference_noisy;
        std::vector<std::int64_t> labels;
    };
    auto make_side = [&](const std::vector<sentence>& s) {
        return side_data{toy_logits(s, length, clean_evidence, 1.25), toy_logits(s, length, noisy_evidence, 1.25),
                         toy_logits(s, length, clean_evidence, 1.0), toy_logits(s, length, noisy_evidence, 1.0),
                         labels_of(s, length)};
    };
    const side_data chosen = make_side(batch.chosen), rejected = make_side(batch.rejected);
    auto view = [&](const std::vector<float>& z) { return tpo::logits_view<const float>{z.data(), pairs, length, vocab}; };
    auto side_view = [&](const side_data& d) {
        tpo::side_batch<float, std::int64_t> s;
        s.policy = view(d.policy);
        s.policy_noisy = view(d.policy_noisy);
        s.reference = view(d.reference);
        s.reference_noisy = view(d.reference_noisy);
        s.labels = {d.labels.data(), pairs, length};
        return s;
    };
    const tpo::preference_batch<float, std::int64_t> tpo_batch{side_view(chosen), side_view(rejected)};

    tpo::objective_options options;  // the official settings: TPO, sigmoid loss, beta 0.1, a 0.5
    out << "2. Score an example batch of " << pairs << " preference pairs (toy model, vocabulary of " << vocab
        << " words)\n"
        << "   token weight c = sigmoid(s) + 0.5 (chosen), 1.5 - sigmoid(s) (rejected); s = z[y] - z~[y]\n";
    auto token_table = [&](const side_data& d, const std::vector<sentence>& s, tpo::response_side which) {
        const tpo::row_alignment align = options.alignment;
        const tpo::index_t scored = align.scored_rows(length);
        std::vector<tpo::row_stats> clean(pairs * scored), noisy_rows(pairs * scored);
        backend.row_statistics(view(d.policy), tpo::labels_view<const std::int64_t>{d.labels.data(), pairs, length},
                               align, tpo::row_reduction::logsumexp, clean.data());
        backend.row_statistics(view(d.policy_noisy),
                               tpo::labels_view<const std::int64_t>{d.labels.data(), pairs, length}, align,
                               tpo::row_reduction::logsumexp,
                               noisy_rows.data());
        for (tpo::index_t p = 0; p < pairs; ++p) {
            out << "   pair " << p << (which == tpo::response_side::chosen ? " chosen:  " : " rejected:") << " ";
            for (tpo::index_t t = 0; t < scored; ++t) {
                const tpo::row_stats& r = clean[p * scored + t];
                if (r.status != tpo::row_status::ok) continue;
                const double score = tpo::reward::visual_score(options.score, r, noisy_rows[p * scored + t]);
                const double c = tpo::reward::calibrate(which, score, options.a).value;
                char buf[64];
                std::snprintf(buf, sizeof buf, " %s(%.2f)", s[p].words[align.label_position(t)].c_str(), c);
                out << buf;
            }
            out << "\n";
        }
    };
    token_table(chosen, batch.chosen, tpo::response_side::chosen);
    token_table(rejected, batch.rejected, tpo::response_side::rejected);

    // 3. The objective: TPO (and plain DPO on the same logits, for comparison).
    const tpo::objective_result r = tpo::evaluate(backend, options, tpo_batch);
    tpo::objective_options dpo = options;
    dpo.weighting = tpo::token_weighting::none;
    const tpo::objective_result d = tpo::evaluate(backend, dpo, tpo_batch);
    out << "\n3. TPO loss (sigmoid, beta = 0.1, a = 0.5)\n"
        << "   loss = " << plain(r.loss) << "   (plain DPO on the same logits: " << plain(d.loss)
        << "; ln 2 = 0.6931 when the policy equals the reference)\n";
    for (tpo::index_t p = 0; p < pairs; ++p)
        out << "   pair " << p << ": chosen reward " << fixed(r.chosen_rewards[p]) << ", rejected reward "
            << fixed(r.rejected_rewards[p]) << ", loss " << plain(r.losses[p])
            << ", mean visual score chosen " << fixed(r.mean_visual_score_chosen[p], 3) << " / rejected "
            << fixed(r.mean_visual_score_rejected[p], 3) << "\n";
    out << "   reward accuracy " << plain(r.reward_accuracy, 2) << ", reward margin " << fixed(r.reward_margin)
        << "\n";
    return 0;
}

}  // namespace tpo_demo
