// The built `tpo` binary, driven on generated files: outputs checked against the library's own
// API (loss, gradients, corruptions bit for bit) and against plain formulas (token scores), and
// every bad input of the contract checked for exit 2, one line on stderr and no output file.

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include <stb/stb_image.h>
#include <stb/stb_image_write.h>

#include "cli/process.hpp"
#include "support/batch.hpp"
#include "support/hidden.hpp"
#include "tpo/io/npy.hpp"

using namespace tpo_cli_test;
namespace io = tpo::io;

namespace {

// --- a minimal reader of the tool's JSON (numbers, null, arrays of numbers) ---
using json_value = std::vector<double>;  // a scalar is a one-element vector

std::map<std::string, json_value> parse_json(const std::string& text) {
    std::map<std::string, json_value> result;
    std::size_t i = text.find('{');
    REQUIRE(i != std::string::npos);
    auto number = [&](std::size_t& p) {
        while (text[p] == ' ') ++p;
        if (text.compare(p, 4, "null") == 0) {
            p += 4;
            return std::nan("");
        }
        char* end = nullptr;
        const double v = std::strtod(text.c_str() + p, &end);
        REQUIRE(end != text.c_str() + p);
        p = static_cast<std::size_t>(end - text.c_str());
        return v;
    };
    for (;;) {
        const std::size_t q = text.find('"', i);
        if (q == std::string::npos) break;
        const std::size_t q2 = text.find('"', q + 1);
        const std::string key = text.substr(q + 1, q2 - q - 1);
        std::size_t p = text.find(':', q2) + 1;
        while (text[p] == ' ') ++p;
        json_value v;
        if (text[p] == '[') {
            ++p;
            while (text[p] == ' ') ++p;
            while (text[p] != ']') {
                v.push_back(number(p));
                while (text[p] == ' ' || text[p] == ',') ++p;
            }
            ++p;
        } else {
            v.push_back(number(p));
        }
        REQUIRE(result.count(key) == 0);
        result[key] = v;
        i = p;
    }
    return result;
}

template <class T>
void save(const fs::path& p, std::vector<std::int64_t> shape, const std::vector<T>& v) {
    io::write_npy<T>(p, shape, std::span<const T>(v));
}

/// Writes the ten files of `tpo loss --method tpo` for a batch.
template <class T, class I = std::int64_t>
void save_batch(const fs::path& dir, const tpo_test::batch_data<T>& b) {
    for (auto [side, d] : {std::pair{"chosen", &b.chosen}, std::pair{"rejected", &b.rejected}}) {
        const std::vector<std::int64_t> shape{d->pairs, d->length, d->vocab};
        save(dir / ("policy_" + std::string(side) + ".npy"), shape, d->policy);
        save(dir / ("reference_" + std::string(side) + ".npy"), shape, d->reference);
        save(dir / ("policy_" + std::string(side) + "_noisy.npy"), shape, d->policy_noisy);
        save(dir / ("reference_" + std::string(side) + "_noisy.npy"), shape, d->reference_noisy);
        std::vector<I> labels(d->labels.begin(), d->labels.end());
        save(dir / ("labels_" + std::string(side) + ".npy"), {d->pairs, d->length}, labels);
    }
}

template <class T>
std::vector<T> load(const fs::path& p, std::vector<std::int64_t> expected_shape) {
    io::npy_array a = io::read_npy(p);
    REQUIRE(a.shape == expected_shape);
    REQUIRE(a.holds<T>());
    return a.values<T>();
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

const std::set<std::string> loss_keys{"loss",
                                      "losses",
                                      "chosen_rewards",
                                      "rejected_rewards",
                                      "policy_chosen_scores",
                                      "policy_rejected_scores",
                                      "reference_chosen_scores",
                                      "reference_rejected_scores",
                                      "mean_visual_score_chosen",
                                      "mean_visual_score_rejected",
                                      "reward_accuracy",
                                      "reward_margin",
                                      "chosen_tokens",
                                      "rejected_tokens"};

void check_json_matches(const std::map<std::string, json_value>& j, const tpo::objective_result& r) {
    std::set<std::string> keys;
    for (const auto& [k, v] : j) keys.insert(k);
    CHECK(keys == loss_keys);
    // Printed with 17 significant digits: the values read back are the library's doubles exactly.
    CHECK(j.at("loss").at(0) == r.loss);
    CHECK(j.at("reward_accuracy").at(0) == r.reward_accuracy);
    CHECK(j.at("reward_margin").at(0) == r.reward_margin);
    CHECK(j.at("losses") == r.losses);
    CHECK(j.at("chosen_rewards") == r.chosen_rewards);
    CHECK(j.at("rejected_rewards") == r.rejected_rewards);
    CHECK(j.at("policy_chosen_scores") == r.policy_chosen_scores);
    CHECK(j.at("policy_rejected_scores") == r.policy_rejected_scores);
    CHECK(j.at("reference_chosen_scores") == r.reference_chosen_scores);
    CHECK(j.at("reference_rejected_scores") == r.reference_rejected_scores);
    CHECK(j.at("mean_visual_score_chosen") == r.mean_visual_score_chosen);
    CHECK(j.at("mean_visual_score_rejected") == r.mean_visual_score_rejected);
    CHECK(j.at("chosen_tokens") == r.chosen_tokens);
    CHECK(j.at("rejected_tokens") == r.rejected_tokens);
}

/// A bad run: exit 2, exactly one non-empty line on stderr mentioning `mention`, nothing on stdout.
void check_rejected(const run_result& r, const std::string& mention) {
    INFO("stderr: " << r.err);
    CHECK(r.status == 2);
    REQUIRE(!r.err.empty());
    CHECK(r.err.back() == '\n');
    CHECK(r.err.find('\n') == r.err.size() - 1);
    CHECK(r.err.find(mention) != std::string::npos);
    CHECK(r.out.empty());
}

std::string npy_with_header(const std::string& dict, const std::string& payload) {
    std::string header = dict;
    while ((10 + header.size() + 1) % 64) header += ' ';
    header += '\n';
    std::string s = "\x93NUMPY";
    s += '\x01';
    s += '\0';
    s += static_cast<char>(header.size() & 0xff);
    s += static_cast<char>(header.size() >> 8);
    return s + header + payload;
}

void write_text(const fs::path& p, const std::string& s) { io::write_file_atomically(p, s); }

}  // namespace

TEST_CASE("tpo loss matches the library's forward and gradients (TPO, float32)", "[cli]") {
    std::mt19937_64 rng(2026);
    const auto b = tpo_test::random_batch<float>(rng, 3, 6, 4, 7);
    temp_dir dir;
    save_batch(dir.path, b);
    const run_result r = run_tool({"loss", "--dir", dir.path.string(), "--grad-dir", (dir / "grads").string()});
    INFO(r.err);
    REQUIRE(r.status == 0);
    CHECK(r.err.empty());

    tpo::backend::reference backend;
    tpo::objective_options o;
    tpo_test::gradient_data<float> g(b);
    auto views = g.views();
    const tpo::objective_result expected = tpo::evaluate(backend, o, b.batch(), &views);
    check_json_matches(parse_json(r.out), expected);

    const std::vector<std::int64_t> chosen{3, 6, 7}, rejected{3, 4, 7};
    CHECK(same_bits(load<float>(dir / "grads/grad_policy_chosen.npy", chosen), g.chosen));
    CHECK(same_bits(load<float>(dir / "grads/grad_policy_chosen_noisy.npy", chosen), g.chosen_noisy));
    CHECK(same_bits(load<float>(dir / "grads/grad_policy_rejected.npy", rejected), g.rejected));
    CHECK(same_bits(load<float>(dir / "grads/grad_policy_rejected_noisy.npy", rejected), g.rejected_noisy));
    CHECK(files_under(dir / "grads").size() == 4);
}

TEST_CASE("tpo loss forwards every option (DPO, float64, int32 labels, combined losses)", "[cli]") {
    std::mt19937_64 rng(7);
    const auto b = tpo_test::random_batch<double>(rng, 2, 5, 5, 6);
    temp_dir dir;
    save_batch<double, std::int32_t>(dir.path, b);
    const run_result r = run_tool({"loss", "--dir", dir.path.string(), "--method", "dpo", "--loss",
                                   "sigmoid,ipo,sft", "--loss-weights", "0.8,0.2,1.0", "--beta", "0.25",
                                   "--label-smoothing", "0.1", "--form", "multiplicative", "--average",
                                   "--use-weighting", "--ld-alpha", "0.5", "--f-divergence-type", "js_divergence",
                                   "--grad-dir", (dir / "g").string()});
    INFO(r.err);
    REQUIRE(r.status == 0);
    tpo::objective_options o;
    o.weighting = tpo::token_weighting::none;
    o.losses = {{tpo::loss_type::sigmoid, 0.8}, {tpo::loss_type::ipo, 0.2}, {tpo::loss_type::sft, 1.0}};
    o.hyper.beta = 0.25;
    o.hyper.label_smoothing = 0.1;
    o.hyper.divergence = tpo::f_divergence::js_divergence;
    o.form = tpo::sequence_form::multiplicative;
    o.average = true;
    o.use_weighting = true;
    o.ld_alpha = 0.5;
    tpo::backend::reference backend;
    tpo_test::gradient_data<double> g(b);
    tpo::preference_gradients<double> views = g.views();
    views.chosen.policy_noisy = {};
    views.rejected.policy_noisy = {};
    const tpo::objective_result expected = tpo::evaluate(backend, o, b.batch(), &views);
    check_json_matches(parse_json(r.out), expected);
    CHECK(same_bits(load<double>(dir / "g/grad_policy_chosen.npy", {2, 5, 6}), g.chosen));
    CHECK(same_bits(load<double>(dir / "g/grad_policy_rejected.npy", {2, 5, 6}), g.rejected));
    CHECK(files_under(dir / "g").size() == 2);  // DPO has no noisy logits to differentiate
}

TEST_CASE("tpo loss: the remaining flags reach the objective", "[cli]") {
    std::mt19937_64 rng(11);
    const auto b = tpo_test::random_batch<float>(rng, 2, 5, 6, 5);
    temp_dir dir;
    save_batch(dir.path, b);
    const run_result r =
        run_tool({"loss", "--dir", dir.path.string(), "--loss", "discopop", "--discopop-tau", "0.2", "--a", "0.25",
                  "--score", "logprob", "--detach-weights", "--no-shift", "--ignore-index", "-100",
                  "--f-divergence-type", "alpha_divergence", "--f-alpha-divergence-coef", "0.3"});
    INFO(r.err);
    REQUIRE(r.status == 0);
    tpo::objective_options o;
    o.losses = {{tpo::loss_type::discopop, 1.0}};
    o.hyper.discopop_tau = 0.2;
    o.a = 0.25;
    o.score = tpo::score_kind::logprob;
    o.detach_weights = true;
    o.alignment.shift = false;
    o.hyper.divergence = tpo::f_divergence::alpha_divergence;
    o.hyper.f_alpha_divergence_coef = 0.3;
    tpo::backend::reference backend;
    check_json_matches(parse_json(r.out), tpo::evaluate(backend, o, b.batch()));
}

TEST_CASE("tpo loss reads precomputed reference scores instead of the reference logits", "[cli]") {
    // A_ref of a run with the reference logits, written as reference_scores_*.npy in place of the
    // reference files: the tool must report what the library computes from those scores, and (the
    // library's own property) the same numbers and gradients as the run with the logits.
    std::mt19937_64 rng(1616);
    const auto b = tpo_test::random_batch<double>(rng, 3, 6, 4, 7);
    for (const bool tpo_method : {true, false}) {
        INFO((tpo_method ? "tpo" : "dpo"));
        temp_dir dir;
        save_batch(dir.path, b);
        std::vector<std::string> args{"loss", "--dir", dir.path.string(), "--grad-dir", (dir / "g").string(),
                                      "--loss", "sigmoid,ipo", "--ld-alpha", "0.5", "--use-weighting"};
        if (!tpo_method) args.insert(args.end(), {"--method", "dpo"});
        const run_result with_logits = run_tool(args);
        INFO(with_logits.err);
        REQUIRE(with_logits.status == 0);
        const auto grad_chosen = load<double>(dir / "g/grad_policy_chosen.npy", {3, 6, 7});
        const auto grad_rejected = load<double>(dir / "g/grad_policy_rejected.npy", {3, 4, 7});

        tpo::objective_options o;
        o.weighting = tpo_method ? tpo::token_weighting::self_calibrated : tpo::token_weighting::none;
        o.losses = {{tpo::loss_type::sigmoid, 1.0}, {tpo::loss_type::ipo, 1.0}};
        o.ld_alpha = 0.5;
        o.use_weighting = true;
        tpo::backend::reference backend;
        const tpo::objective_result from_logits = tpo::evaluate(backend, o, b.batch());
        for (const char* side : {"chosen", "rejected"}) {
            fs::remove(dir / ("reference_" + std::string(side) + ".npy"));
            fs::remove(dir / ("reference_" + std::string(side) + "_noisy.npy"));
        }
        save(dir / "reference_scores_chosen.npy", {3}, from_logits.reference_chosen_scores);
        save(dir / "reference_scores_rejected.npy", {3}, from_logits.reference_rejected_scores);
        fs::remove_all(dir / "g");
        const run_result with_scores = run_tool(args);
        INFO(with_scores.err);
        REQUIRE(with_scores.status == 0);

        auto scores = [](const std::vector<double>& v) {
            return tpo::sequence_values_view<const double>{v.data(), static_cast<tpo::index_t>(v.size())};
        };
        const auto batch = tpo_test::with_reference_scores(b.batch(), scores(from_logits.reference_chosen_scores),
                                                           scores(from_logits.reference_rejected_scores));
        check_json_matches(parse_json(with_scores.out), tpo::evaluate(backend, o, batch));
        CHECK(parse_json(with_scores.out) == parse_json(with_logits.out));
        CHECK(same_bits(load<double>(dir / "g/grad_policy_chosen.npy", {3, 6, 7}), grad_chosen));
        CHECK(same_bits(load<double>(dir / "g/grad_policy_rejected.npy", {3, 4, 7}), grad_rejected));
    }
}

TEST_CASE("tpo loss --backend: cpu agrees with reference when built in; others are refused clearly", "[cli]") {
    std::mt19937_64 rng(3);
    const auto b = tpo_test::random_batch<float>(rng, 2, 4, 4, 9);
    temp_dir dir;
    save_batch(dir.path, b);
    const run_result ref = run_tool({"loss", "--dir", dir.path.string(), "--backend", "reference"});
    REQUIRE(ref.status == 0);
    for (const std::string backend : {"cpu", "thrust"}) {
        const run_result r = run_tool({"loss", "--dir", dir.path.string(), "--backend", backend});
        if (r.status == 0) {
            const auto a = parse_json(ref.out), c = parse_json(r.out);
            CHECK(c.at("loss").at(0) == Approx(a.at("loss").at(0)).epsilon(1e-6));
            for (std::size_t i = 0; i < a.at("losses").size(); ++i)
                CHECK(c.at("losses")[i] == Approx(a.at("losses")[i]).epsilon(1e-6));
        } else {
            check_rejected(r, "not built into this tpo binary");
        }
    }
}

TEST_CASE("tpo score writes logps, scores, weights and mask as the formulas of docs/formulas.md#token-rewards", "[cli]") {
    std::mt19937_64 rng(5);
    const auto b = tpo_test::random_batch<float>(rng, 3, 6, 6, 8);
    temp_dir dir;
    save_batch(dir.path, b);
    for (const std::string side : {"chosen", "rejected"}) {
        const run_result r =
            run_tool({"score", "--clean", (dir / "policy_chosen.npy").string(), "--noisy",
                      (dir / "policy_chosen_noisy.npy").string(), "--labels", (dir / "labels_chosen.npy").string(),
                      "--side", side, "--a", "0.3", "--out", (dir / ("s_" + side)).string()});
        INFO(r.err);
        REQUIRE(r.status == 0);
        const std::vector<std::int64_t> shape{3, 5};  // the labels aligned by the causal shift
        const auto logps = load<float>(dir / ("s_" + side) / "logps.npy", shape);
        const auto scores = load<float>(dir / ("s_" + side) / "scores.npy", shape);
        const auto weights = load<float>(dir / ("s_" + side) / "weights.npy", shape);
        const auto mask = load<std::uint8_t>(dir / ("s_" + side) / "mask.npy", shape);
        const auto& d = b.chosen;
        for (tpo::index_t s = 0; s < 3; ++s)
            for (tpo::index_t t = 0; t < 5; ++t) {
                const std::size_t k = static_cast<std::size_t>(s * 5 + t);
                const std::int64_t y = d.labels[s * 6 + t + 1];
                if (y == -100) {
                    CHECK(mask[k] == 0);
                    CHECK(logps[k] == 0.0f);
                    CHECK(scores[k] == 0.0f);
                    CHECK(weights[k] == 0.0f);
                    continue;
                }
                const float* z = d.policy.data() + (s * 6 + t) * 8;
                const float* zn = d.policy_noisy.data() + (s * 6 + t) * 8;
                double sum = 0;
                for (int v = 0; v < 8; ++v) sum += std::exp(static_cast<double>(z[v]));
                const double logp = z[y] - std::log(sum);
                const double score = static_cast<double>(z[y]) - zn[y];
                const double sig = 1.0 / (1.0 + std::exp(-score));
                const double c = side == "chosen" ? sig + 0.3 : 1.0 - sig + 0.3;
                CHECK(mask[k] == 1);
                CHECK(logps[k] == Approx(logp).epsilon(1e-6).margin(1e-6));
                CHECK(scores[k] == Approx(score).epsilon(1e-6).margin(1e-6));
                CHECK(weights[k] == Approx(c).epsilon(1e-6));
            }
    }
}

TEST_CASE("tpo corrupt on .npy equals add_diffusion_noise bit for bit", "[cli]") {
    std::mt19937_64 rng(9);
    std::uniform_real_distribution<double> u(0, 1);
    temp_dir dir;
    SECTION("float32 batch, normalised space") {
        std::vector<float> x(2 * 3 * 5 * 7);
        for (float& v : x) v = static_cast<float>(u(rng));
        save(dir / "x.npy", {2, 3, 5, 7}, x);
        const run_result r = run_tool({"corrupt", "--in", (dir / "x.npy").string(), "--out", (dir / "y.npy").string(),
                                       "--seed", "123456789012", "--stream", "5", "--step", "321", "--space",
                                       "normalized", "--schedule", "linear", "--steps", "400"});
        INFO(r.err);
        REQUIRE(r.status == 0);
        std::vector<float> expected(x.size());
        tpo::diffusion_options o;
        o.seed = 123456789012ull;
        o.stream = 5;
        o.step = 321;
        o.space = tpo::noise_space::normalized;
        o.schedule.kind = tpo::beta_schedule::linear;
        o.schedule.steps = 400;
        tpo::backend::reference backend;
        tpo::add_diffusion_noise(backend, tpo::image_view<const float>::nchw(x.data(), 2, 3, 5, 7),
                                 tpo::image_view<float>::nchw(expected.data(), 2, 3, 5, 7), o);
        CHECK(same_bits(load<float>(dir / "y.npy", {2, 3, 5, 7}), expected));
    }
    SECTION("float64 vector, defaults, cosine schedule with zero terminal SNR and custom betas") {
        std::vector<double> x(37);
        for (double& v : x) v = u(rng);
        save(dir / "x.npy", {37}, x);
        const run_result r = run_tool({"corrupt", "--in", (dir / "x.npy").string(), "--out", (dir / "y.npy").string(),
                                       "--schedule", "scaled_linear", "--beta-start", "0.001", "--beta-end", "0.02",
                                       "--zero-snr", "--step", "998"});
        INFO(r.err);
        REQUIRE(r.status == 0);
        std::vector<double> expected(x.size());
        tpo::diffusion_options o;
        o.step = 998;
        o.schedule.kind = tpo::beta_schedule::scaled_linear;
        o.schedule.beta_start = 0.001;
        o.schedule.beta_end = 0.02;
        o.schedule.zero_terminal_snr = true;
        tpo::backend::reference backend;
        tpo::add_diffusion_noise(backend, tpo::image_view<const double>::nchw(x.data(), 1, 1, 1, 37),
                                 tpo::image_view<double>::nchw(expected.data(), 1, 1, 1, 37), o);
        CHECK(same_bits(load<double>(dir / "y.npy", {37}), expected));
    }
    SECTION("the other kinds equal their library calls") {
        std::vector<float> x(3 * 16 * 20);
        for (float& v : x) v = static_cast<float>(u(rng));
        save(dir / "x.npy", {3, 16, 20}, x);
        tpo::backend::reference backend;
        const auto in = tpo::image_view<const float>::nchw(x.data(), 1, 3, 16, 20);
        for (const std::string kind : {"crop", "blur", "patch-mask", "mean"}) {
            const run_result r = run_tool({"corrupt", "--in", (dir / "x.npy").string(), "--out",
                                           (dir / (kind + ".npy")).string(), "--kind", kind, "--seed", "4"});
            INFO(kind << ": " << r.err);
            REQUIRE(r.status == 0);
            std::vector<float> expected(x.size());
            const auto out = tpo::image_view<float>::nchw(expected.data(), 1, 3, 16, 20);
            if (kind == "crop") {
                tpo::crop_options o;
                o.seed = 4;
                tpo::random_resized_crop(backend, in, out, o);
            } else if (kind == "blur") {
                tpo::blur_options o;
                o.seed = 4;
                tpo::gaussian_blur(backend, in, out, o);
            } else if (kind == "patch-mask") {
                tpo::patch_mask_options o;
                o.seed = 4;
                tpo::mask_patches(backend, in, out, o);
            } else {
                tpo::fill_mean_image(backend, out);
            }
            CHECK(same_bits(load<float>(dir / (kind + ".npy"), {3, 16, 20}), expected));
        }
    }
}

TEST_CASE("tpo corrupt on a PNG produces a PNG with the library's 8-bit noise", "[cli]") {
    temp_dir dir;
    const int w = 19, h = 13;
    std::vector<std::uint8_t> px(w * h * 3);
    for (std::size_t i = 0; i < px.size(); ++i) px[i] = static_cast<std::uint8_t>((i * 37) % 256);
    REQUIRE(stbi_write_png((dir / "in.png").c_str(), w, h, 3, px.data(), w * 3));
    for (const bool wrap : {false, true}) {
        const std::string out = (dir / (wrap ? "wrapped.png" : "out.png")).string();
        std::vector<std::string> args{"corrupt", "--in", (dir / "in.png").string(), "--out", out, "--seed", "3"};
        if (wrap) args.push_back("--wrap");
        const run_result r = run_tool(args);
        INFO(r.err);
        REQUIRE(r.status == 0);
        const std::string bytes = slurp(out);
        REQUIRE(bytes.size() > 8);
        CHECK(bytes.compare(0, 8, "\x89PNG\r\n\x1a\n") == 0);
        int ow = 0, oh = 0, oc = 0;
        std::uint8_t* decoded = stbi_load(out.c_str(), &ow, &oh, &oc, 3);
        REQUIRE(decoded);
        CHECK(ow == w);
        CHECK(oh == h);
        std::vector<std::uint8_t> got(decoded, decoded + w * h * 3), expected(px.size());
        stbi_image_free(decoded);
        tpo::diffusion_options o;
        o.seed = 3;
        o.overflow = wrap ? tpo::overflow_mode::wrap : tpo::overflow_mode::clamp;
        tpo::backend::reference backend;
        tpo::add_diffusion_noise(backend, tpo::image_view<const std::uint8_t>::hwc(px.data(), h, w, 3),
                                 tpo::image_view<std::uint8_t>::hwc(expected.data(), h, w, 3), o);
        CHECK(got == expected);  // PNG is lossless
    }
    const run_result jpg = run_tool({"corrupt", "--in", (dir / "in.png").string(), "--out",
                                     (dir / "out.jpg").string(), "--kind", "blur"});
    INFO(jpg.err);
    REQUIRE(jpg.status == 0);
    CHECK(slurp(dir / "out.jpg").compare(0, 2, "\xff\xd8") == 0);
}

TEST_CASE("tpo corrupt reads every valid PNG and JPEG of the test images as libstb decodes them", "[cli]") {
    // The tool checks each file before its own PNG/JPEG-only copy of stb decodes it: those checks
    // must let every valid file through, to the same pixels as Debian's libstb (all its decoders).
    temp_dir dir;
    const fs::path images = fs::path(TPO_TEST_SOURCE_DIR) / "images";
    int tried = 0;
    for (const auto& e : fs::directory_iterator(images)) {
        const std::string name = e.path().filename().string();
        if (name.rfind("valid_", 0) != 0) continue;
        ++tried;
        INFO(name);
        const std::string out = (dir / "out.png").string();
        const run_result r = run_tool({"corrupt", "--in", e.path().string(), "--out", out, "--seed", "5", "--step", "50"});
        REQUIRE(r.status == 0);
        int w = 0, h = 0, c = 0;
        std::uint8_t* in = stbi_load(e.path().c_str(), &w, &h, &c, 3);
        REQUIRE(in);
        std::vector<std::uint8_t> px(in, in + w * h * 3), expected(px.size());
        stbi_image_free(in);
        tpo::diffusion_options o;
        o.seed = 5;
        o.step = 50;
        tpo::backend::reference backend;
        tpo::add_diffusion_noise(backend, tpo::image_view<const std::uint8_t>::hwc(px.data(), h, w, 3),
                                 tpo::image_view<std::uint8_t>::hwc(expected.data(), h, w, 3), o);
        int ow = 0, oh = 0, oc = 0;
        std::uint8_t* got = stbi_load(out.c_str(), &ow, &oh, &oc, 3);
        REQUIRE(got);
        CHECK(std::vector<std::uint8_t>(got, got + ow * oh * 3) == expected);
        stbi_image_free(got);
    }
    CHECK(tried >= 40);
}

TEST_CASE("tpo loss: every bad input exits 2 with one line and writes nothing", "[cli]") {
    std::mt19937_64 rng(13);
    const auto b = tpo_test::random_batch<float>(rng, 2, 4, 3, 5, 2.0, 0.0);
    temp_dir dir;
    save_batch(dir.path, b);
    const fs::path good = dir / "good";
    fs::create_directories(good);
    save_batch(good, b);
    const fs::path grads = dir / "grads";
    const std::string policy = (dir / "policy_chosen.npy").string();
    const std::string valid = slurp(policy);

    auto run_loss = [&](std::vector<std::string> extra = {}) {
        std::vector<std::string> args{"loss", "--dir", dir.path.string(), "--grad-dir", grads.string()};
        args.insert(args.end(), extra.begin(), extra.end());
        return run_tool(args);
    };
    auto restore = [&] { save_batch(dir.path, b); };

    SECTION("the valid batch passes (the cases below differ from it in one file)") {
        const run_result r = run_loss();
        INFO(r.err);
        CHECK(r.status == 0);
        fs::remove_all(grads);
    }
    SECTION("truncated file") {
        write_text(policy, valid.substr(0, valid.size() - 3));
        check_rejected(run_loss(), "policy_chosen.npy: data: file truncated");
    }
    SECTION("truncated header") {
        write_text(policy, valid.substr(0, 30));
        check_rejected(run_loss(), "policy_chosen.npy: header: file truncated");
    }
    SECTION("wrong magic") {
        std::string bad = valid;
        bad[1] = 'X';
        write_text(policy, bad);
        check_rejected(run_loss(), "policy_chosen.npy: magic");
    }
    SECTION("dtype <f2") {
        write_text(policy, npy_with_header("{'descr': '<f2', 'fortran_order': False, 'shape': (2, 4, 5), }",
                                           std::string(2 * 4 * 5 * 2, '\0')));
        check_rejected(run_loss(), "policy_chosen.npy: descr: '<f2' is not supported");
    }
    SECTION("dtype >f4") {
        write_text(policy, npy_with_header("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 4, 5), }",
                                           std::string(2 * 4 * 5 * 4, '\0')));
        check_rejected(run_loss(), "policy_chosen.npy: descr: '>f4' is not supported (big-endian)");
    }
    SECTION("Fortran order") {
        write_text(policy, npy_with_header("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 4, 5), }",
                                           std::string(2 * 4 * 5 * 4, '\0')));
        check_rejected(run_loss(), "policy_chosen.npy: fortran_order: True");
    }
    SECTION("shape mismatch between files") {
        std::vector<float> z(2 * 3 * 5, 0.5f);
        save(dir / "reference_chosen.npy", {2, 3, 5}, z);
        check_rejected(run_loss(), "reference_chosen.npy: shape: (2, 3, 5), expected (2, 4, 5)");
    }
    SECTION("labels that do not match the logits") {
        save(dir / "labels_rejected.npy", {2, 4}, std::vector<std::int64_t>(8, 1));
        check_rejected(run_loss(), "labels_rejected.npy: shape: (2, 4), expected (2, 3)");
    }
    SECTION("label out of range") {
        auto labels = b.chosen.labels;
        labels[5] = 5;
        save(dir / "labels_chosen.npy", {2, 4}, labels);
        check_rejected(run_loss(), "labels_chosen.npy: data: label 5 at [1, 1] is outside [0, 5)");
    }
    SECTION("NaN in logits") {
        auto z = b.rejected.policy_noisy;
        z[7] = std::nanf("");
        save(dir / "policy_rejected_noisy.npy", {2, 3, 5}, z);
        check_rejected(run_loss(), "policy_rejected_noisy.npy: data: element [0, 1, 2] is nan");
    }
    SECTION("missing file") {
        fs::remove(dir / "reference_rejected_noisy.npy");
        check_rejected(run_loss(), "reference_rejected_noisy.npy: file: does not exist");
    }
    SECTION("reference scores given with the reference logits") {
        save(dir / "reference_scores_chosen.npy", {2}, std::vector<double>{-3.0, -4.0});
        check_rejected(run_loss(), "reference_scores_chosen.npy: file: precomputed reference scores given with "
                                   "reference logits (reference_chosen.npy), expected one of them");
        fs::remove(dir / "reference_scores_chosen.npy");
    }
    SECTION("reference scores given with a reference noisy logits file") {
        fs::remove(dir / "reference_rejected.npy");
        save(dir / "reference_scores_rejected.npy", {2}, std::vector<double>{-3.0, -4.0});
        check_rejected(run_loss(), "reference_rejected_noisy.npy: file: reference logits given with precomputed "
                                   "reference scores (reference_scores_rejected.npy), expected one of them");
        fs::remove(dir / "reference_scores_rejected.npy");
    }
    SECTION("neither reference logits nor reference scores") {
        fs::remove(dir / "reference_chosen.npy");
        check_rejected(run_loss(), "reference_chosen.npy: file: does not exist, expected reference_chosen.npy "
                                   "(reference logits) or reference_scores_chosen.npy (precomputed reference scores)");
    }
    for (const auto& [name, write, mention] :
         std::vector<std::tuple<std::string, std::function<void(const fs::path&)>, std::string>>{
             {"reference scores of the wrong length",
              [](const fs::path& p) { save(p, {3}, std::vector<double>{1, 2, 3}); },
              "reference_scores_chosen.npy: shape: (3,), expected (2,): one value per sequence of"},
             {"reference scores of two dimensions",
              [](const fs::path& p) { save(p, {2, 1}, std::vector<double>{1, 2}); },
              "reference_scores_chosen.npy: shape: (2, 1), expected (2,)"},
             {"reference scores as float32",
              [](const fs::path& p) { save(p, {2}, std::vector<float>{1, 2}); },
              "reference_scores_chosen.npy: descr: <f4, expected '<f8'"},
             {"a non-finite reference score",
              [](const fs::path& p) { save(p, {2}, std::vector<double>{1, std::nan("")}); },
              "reference_scores_chosen.npy: data: element [1] is nan, expected a finite score"},
         }) {
        SECTION(name) {
            fs::remove(dir / "reference_chosen.npy");
            fs::remove(dir / "reference_chosen_noisy.npy");
            write(dir / "reference_scores_chosen.npy");
            check_rejected(run_loss(), mention);
            fs::remove(dir / "reference_scores_chosen.npy");
        }
    }
    SECTION("labels of a float dtype") {
        save(dir / "labels_chosen.npy", {2, 4}, std::vector<float>(8, 1.0f));
        check_rejected(run_loss(), "labels_chosen.npy: descr: <f4, expected '<i4' or '<i8'");
    }
    SECTION("unknown flag") { check_rejected(run_loss({"--bogus"}), "unknown flag '--bogus'"); }
    SECTION("malformed number") { check_rejected(run_loss({"--beta", "0.1x"}), "--beta: '0.1x' is not a decimal number"); }
    SECTION("hyperparameter out of range") { check_rejected(run_loss({"--beta", "-1"}), "beta = -1"); }
    SECTION("unknown loss") { check_rejected(run_loss({"--loss", "sigmoid,nope"}), "unknown loss_type 'nope'"); }
    SECTION("unwritable output directory") {
        // A regular file where a directory is expected: unwritable even for root.
        write_text(dir / "blocker", "x");
        const run_result r = run_tool({"loss", "--dir", good.string(), "--grad-dir", (dir / "blocker/sub").string()});
        check_rejected(r, "blocker/sub");
    }
    // Nothing was written: no gradient file, no temporary file anywhere.
    CHECK(files_under(grads).empty());
    for (const std::string& f : files_under(dir.path)) CHECK(f.find(".tpo-") == std::string::npos);
    restore();
}

TEST_CASE("tpo loss: a result that overflows exits 2 naming it, with no gradient file", "[cli][hostile]") {
    std::mt19937_64 rng(19);
    auto b = tpo_test::random_batch<double>(rng, 2, 4, 3, 5, 2.0, 0.0);
    temp_dir dir;
    const fs::path grads = dir / "grads";
    SECTION("finite float64 logits of +-1e308") {
        const std::int64_t label = b.chosen.labels[1];  // row t = 0 is scored against position 1
        for (int v = 0; v < 5; ++v) b.chosen.policy[static_cast<std::size_t>(v)] = v == label ? -1e308 : 1e308;
        save_batch(dir.path, b);
        check_rejected(run_tool({"loss", "--dir", dir.path.string(), "--grad-dir", grads.string()}),
                       "result: chosen policy sequence score of pair 0 is -inf, expected a finite value");
    }
    SECTION("--beta 1e-300 with ipo") {
        save_batch(dir.path, b);
        check_rejected(run_tool({"loss", "--dir", dir.path.string(), "--loss", "ipo", "--beta", "1e-300",
                                 "--grad-dir", grads.string()}),
                       "result: loss of pair 0 is inf, expected a finite value: it overflowed (loss ipo, "
                       "beta = 1e-300)");
    }
    SECTION("float32 gradients that would overflow though the loss is finite") {
        save_batch(dir.path, tpo_test::convert<float>(b));
        check_rejected(run_tool({"loss", "--dir", dir.path.string(), "--loss", "ipo", "--beta", "1e-40",
                                 "--grad-dir", grads.string()}),
                       "exceeds what the row pass over float32 logits holds");
    }
    CHECK(files_under(grads).empty());
}

TEST_CASE("tpo score and corrupt: bad inputs exit 2 with one line and write nothing", "[cli]") {
    std::mt19937_64 rng(17);
    const auto b = tpo_test::random_batch<float>(rng, 2, 4, 3, 5, 2.0, 0.0);
    temp_dir dir;
    save_batch(dir.path, b);
    const fs::path out = dir / "out";
    auto score = [&](const std::string& noisy, std::vector<std::string> extra = {}) {
        std::vector<std::string> args{"score",  "--clean", (dir / "policy_chosen.npy").string(), "--noisy", noisy,
                                      "--labels", (dir / "labels_chosen.npy").string(), "--out", out.string()};
        args.insert(args.end(), extra.begin(), extra.end());
        return run_tool(args);
    };
    check_rejected(score((dir / "policy_chosen_noisy.npy").string()), "missing required flag --side");
    check_rejected(score((dir / "policy_rejected.npy").string(), {"--side", "chosen"}), "policy_rejected.npy: shape");
    check_rejected(score((dir / "nope.npy").string(), {"--side", "chosen"}), "nope.npy: file: does not exist");
    check_rejected(score((dir / "policy_chosen_noisy.npy").string(), {"--side", "both"}), "--side: 'both'");
    CHECK(files_under(out).empty());

    std::vector<float> x(3 * 4 * 4, 0.5f);
    save(dir / "x.npy", {3, 4, 4}, x);
    auto corrupt = [&](std::vector<std::string> args) {
        args.insert(args.begin(), "corrupt");
        return run_tool(args);
    };
    const std::string in = (dir / "x.npy").string(), y = (out / "y.npy").string();
    check_rejected(corrupt({"--in", (dir / "labels_chosen.npy").string(), "--out", y}), "descr: <i8");
    check_rejected(corrupt({"--in", in, "--out", y, "--step", "1000"}), "--step: 1000 is out of range");
    check_rejected(corrupt({"--in", in, "--out", y, "--kind", "melt"}), "--kind: 'melt'");
    check_rejected(corrupt({"--in", in, "--out", (out / "y.png").string()}), "expected a .npy file like --in");
    check_rejected(corrupt({"--in", (dir / "missing.png").string(), "--out", (out / "y.png").string()}),
                   "missing.png: file: does not exist");
    write_text(dir / "fake.png", "not a png at all");
    check_rejected(corrupt({"--in", (dir / "fake.png").string(), "--out", (out / "y.png").string()}),
                   "fake.png: image: no PNG or JPEG signature");
    write_text(dir / "blocker", "x");
    check_rejected(corrupt({"--in", in, "--out", (dir / "blocker/y.npy").string()}), "blocker/y.npy: output");
    CHECK(files_under(out).empty());
    for (const std::string& f : files_under(dir.path)) CHECK(f.find(".tpo-") == std::string::npos);
}

TEST_CASE("tpo demo runs the end-to-end example", "[cli]") {
    const run_result r = run_tool({"demo"});
    INFO(r.err);
    REQUIRE(r.status == 0);
    CHECK(r.out.find("alpha_bar_500 = 0.744799") != std::string::npos);
    CHECK(r.out.find("loss = ") != std::string::npos);
    CHECK(r.out.find("reward accuracy") != std::string::npos);
    check_rejected(run_tool({"demo", "--fast"}), "expected no flags");
    check_rejected(run_tool({"train"}), "unknown command 'train'");
    check_rejected(run_tool({}), "missing command");
}

namespace {

/// Writes a hidden-state dump of `d`: the policy's states and head, the labels, and the reference
/// as its own states and head or (reference_scores) as the sequence scores given.
void save_hidden(const fs::path& dir, const tpo_test::hidden::hidden_data<double>& d,
                 const std::vector<double>* reference_scores = nullptr) {
    save(dir / "lm_head.npy", {d.vocab, d.hidden}, d.weight);
    if (d.with_bias) save(dir / "lm_head_bias.npy", {d.vocab}, d.bias);
    if (!reference_scores) {
        save(dir / "reference_lm_head.npy", {d.vocab, d.hidden}, d.reference_weight);
        if (d.with_bias) save(dir / "reference_lm_head_bias.npy", {d.vocab}, d.reference_bias);
    }
    int k = 0;
    for (auto [side, s] : {std::pair{std::string("chosen"), &d.chosen}, std::pair{std::string("rejected"), &d.rejected}}) {
        const std::vector<std::int64_t> shape{s->pairs, s->length, s->hidden};
        save(dir / ("policy_hidden_" + side + ".npy"), shape, s->policy);
        save(dir / ("policy_hidden_" + side + "_noisy.npy"), shape, s->policy_noisy);
        if (reference_scores) {
            const std::vector<double> scores(reference_scores[k].begin(), reference_scores[k].end());
            save(dir / ("reference_scores_" + side + ".npy"), {s->pairs}, scores);
        } else {
            save(dir / ("reference_hidden_" + side + ".npy"), shape, s->reference);
            save(dir / ("reference_hidden_" + side + "_noisy.npy"), shape, s->reference_noisy);
        }
        save(dir / ("labels_" + side + ".npy"), {s->pairs, s->length}, s->labels);
        ++k;
    }
}

}  // namespace

TEST_CASE("tpo loss on hidden states and an lm_head matches the library's fused path", "[cli][fused]") {
    using namespace tpo_test::hidden;
    std::mt19937_64 rng(404);
    const hidden_data<double> d = random_hidden(rng, 2, 6, 5, 4, 9);
    temp_dir dir;
    save_hidden(dir.path, d);
    const run_result r = run_tool({"loss", "--dir", dir.path.string(), "--grad-dir", (dir / "grads").string(),
                                   "--logit-scale", "1.5", "--logit-softcap", "3", "--temperature", "0.8",
                                   "--chunk-tokens", "2"});
    INFO(r.err);
    REQUIRE(r.status == 0);
    tpo::objective_options o;
    o.logit_scale = 1.5;
    o.logit_softcap = 3.0;
    o.temperature = 0.8;
    o.chunk_tokens = 2;
    tpo::backend::reference backend;
    hidden_gradient_data<double> g(d);
    auto views = g.views(d, true);
    const tpo::objective_result expected = tpo::evaluate(backend, o, d.batch(), &views);
    const auto j = parse_json(r.out);
    CHECK(j.at("loss").at(0) == expected.loss);
    CHECK(j.at("chosen_rewards") == expected.chosen_rewards);
    CHECK(j.at("reference_rejected_scores") == expected.reference_rejected_scores);
    CHECK(same_bits(load<double>(dir / "grads/grad_policy_hidden_chosen.npy", {2, 6, 4}), g.hidden[0]));
    CHECK(same_bits(load<double>(dir / "grads/grad_policy_hidden_chosen_noisy.npy", {2, 6, 4}), g.hidden[1]));
    CHECK(same_bits(load<double>(dir / "grads/grad_policy_hidden_rejected.npy", {2, 5, 4}), g.hidden[2]));
    CHECK(same_bits(load<double>(dir / "grads/grad_policy_hidden_rejected_noisy.npy", {2, 5, 4}), g.hidden[3]));
    CHECK(same_bits(load<double>(dir / "grads/grad_lm_head.npy", {9, 4}), g.weight));
    CHECK(same_bits(load<double>(dir / "grads/grad_lm_head_bias.npy", {9}), g.bias));
    CHECK(files_under(dir / "grads").size() == 6);

    // The reference as precomputed scores gives the same numbers.
    temp_dir scores_dir;
    const std::vector<double> given[2] = {expected.reference_chosen_scores, expected.reference_rejected_scores};
    save_hidden(scores_dir.path, d, given);
    const run_result s = run_tool({"loss", "--dir", scores_dir.path.string(), "--logit-scale", "1.5",
                                   "--logit-softcap", "3", "--temperature", "0.8"});
    INFO(s.err);
    REQUIRE(s.status == 0);
    CHECK(std::abs(parse_json(s.out).at("loss").at(0) - expected.loss) <= 1e-12 * std::abs(expected.loss));
}

TEST_CASE("tpo loss on hidden states: bad directories and flags are refused by name", "[cli][fused]") {
    using namespace tpo_test::hidden;
    std::mt19937_64 rng(405);
    const hidden_data<double> d = random_hidden(rng, 2, 4, 4, 3, 7);
    {
        temp_dir dir;
        save_hidden(dir.path, d);
        save(dir / "policy_chosen.npy", {2, 4, 7}, std::vector<double>(56, 0.0));
        check_rejected(run_tool({"loss", "--dir", dir.path.string()}), "holds both policy logits");
    }
    {
        temp_dir dir;
        save(dir / "labels_chosen.npy", {2, 4}, d.chosen.labels);
        check_rejected(run_tool({"loss", "--dir", dir.path.string()}), "holds neither");
    }
    {
        temp_dir dir;
        save_hidden(dir.path, d);
        save(dir / "lm_head.npy", {7, 2}, std::vector<double>(14, 0.1));  // H = 2 against states of H = 3
        check_rejected(run_tool({"loss", "--dir", dir.path.string()}), "differs from the H = 2");
    }
    {
        temp_dir dir;
        save_hidden(dir.path, d);
        save(dir / "lm_head_bias.npy", {6}, std::vector<double>(6, 0.0));
        check_rejected(run_tool({"loss", "--dir", dir.path.string()}), "lm_head_bias.npy: shape: (6,), expected (7)");
    }
    {
        temp_dir dir;
        save_hidden(dir.path, d);
        check_rejected(run_tool({"loss", "--dir", dir.path.string(), "--logit-softcap", "0"}), "logit_softcap");
        check_rejected(run_tool({"loss", "--dir", dir.path.string(), "--temperature", "-1"}), "temperature");
        check_rejected(run_tool({"loss", "--dir", dir.path.string(), "--chunk-tokens", "0"}), "chunk-tokens");
    }
}
