#pragma once
// The training loop a trainer writes around tpo: supervised fine-tuning, then preference
// optimisation from the same checkpoint against a frozen reference copy, with DPO or TPO.
// tpo computes the loss and ∂loss/∂logits; the model backpropagates them.

#include <cmath>
#include <cstdint>
#include <functional>
#include <numbers>
#include <numeric>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <tpo/corrupt/diffusion.hpp>
#include <tpo/loss/objective.hpp>
#include <tpo/reward/token.hpp>

#include <tpo/backend/reference.hpp>

#include "metrics.hpp"
#include "model.hpp"
#include "world.hpp"

namespace toy {

using real = float;  // the training precision; the gradient test instantiates the model in double
// With V = 17 the objective is a negligible share of a step (the model dominates), so the plain
// reference backend is the right one here; a trainer with a real vocabulary swaps in a faster one.
using tpo_backend = tpo::backend::reference;

/// Where the preference pairs come from. on_policy: captions sampled from the SFT checkpoint
/// (rejected) and their minimal corrections (chosen), like RLHF-V's annotated model responses;
/// swapped: the ground-truth caption against a copy with one shape swapped (`make_pair`).
enum class pair_source { on_policy, swapped };

struct settings {
    std::uint64_t seed = 1;
    int sft_steps = 3000, sft_batch = 32;
    double sft_lr = 3e-3;
    int pref_steps = 500, pref_batch = 16;  // 500 × 16 = 4 epochs over the 2000 preference images (the paper's 4)
    double pref_lr = 3e-6;  // the headline operating point: the rule of `headline_index` on the frontier of `--sweep`
    bool cosine = true;  // the preference learning rate decays as lr·½(1 + cos(π·step/steps)), no warm-up
    double beta = 0.1;      // the official β (docs/formulas.md#numerics)
    double a = 0.5;         // calibration margin
    int noise_step = 500;   // diffusion step k of the corruption (official: 500)
    tpo::score_kind score = tpo::score_kind::logit;  // official
    bool detach_weights = false;                     // official: gradients flow through c
    tpo::sequence_form form = tpo::sequence_form::additive;  // official: A = Σ (ℓ + log c)
    double sft_weight = 0;  // > 0 adds the library's `sft` term on the chosen captions (RPO/MPO-style)
    pair_source pairs = pair_source::on_policy;
    int pref_pairs = 2000;  // preference images; on-policy, those where no hallucination is sampled are skipped
    int sample_tries = 8;   // on-policy: captions sampled (temperature 1) per image before it is skipped
    int kl_pairs = 256;     // preference pairs (chosen and rejected) on which the KL is measured
    int eval_images = 600;
    int probe_images = 200;  // evaluated during preference training for the curves
    int probe_every = 25;
    model_shape shape{};
};

/// Input tokens padded with `pad`, labels with pad → ignore_index (`docs/formulas.md#notation-and-data-layout`).
struct encoded {
    std::vector<int> tokens, labels;
};
inline void append(encoded& e, const caption& c) {
    for (int t = 0; t < max_length; ++t) {
        const bool real_token = t < static_cast<int>(c.size());
        e.tokens.push_back(real_token ? c[t] : pad);
        e.labels.push_back(real_token ? c[t] : -100);
    }
}

struct curve_point {
    int step;
    double value;
};
struct preference_curves {
    std::vector<curve_point> loss, accuracy, margin, chair_i, recall;
    std::vector<curve_point> chosen_reward, rejected_reward;  // batch means of β·Δ
};

/// Mean TPO weight c per token class (`docs/formulas.md#self-calibrated-weight`), measured on the current policy.
struct weight_stats {
    double chosen[3] = {0, 0, 0}, rejected[3] = {0, 0, 0};  // by token_class
    double rejected_hallucinated = 0;                        // the replacing shape in the rejected caption
    double rejected_true_objects = 0;                        // the other shapes of the rejected caption
};

struct caption_weights {
    caption chosen, rejected;
    std::vector<double> chosen_weight, rejected_weight;  // weight of token t (t ≥ 1), index t − 1
    std::array<bool, num_shapes> absent;                 // shapes the image does not hold
};

/// How the preference set came out of the pair builder.
struct pair_stats {
    int images = 0, pairs = 0, skipped = 0;  // skipped: no hallucinating caption within the tries
    int samples = 0, ungrammatical = 0;      // captions sampled, and those that do not parse
    double hallucinated_per_rejected = 0;    // absent-shape mentions per rejected caption
    double changed_per_pair = 0;             // tokens in which chosen and rejected differ (position-wise, padded)
};

/// Mean per-token KL(π ‖ π_ref) over the positions of teacher-forced captions.
struct divergence {
    double held_out = 0;  // ground-truth captions of the held-out scenes
    double pairs = 0;     // chosen and rejected captions of preference pairs
};

/// One preference-optimisation objective: DPO, or TPO's self-calibrated weights with a setting.
struct variant {
    std::string name;
    bool weighted = false;  // false: DPO
    tpo::score_kind score = tpo::score_kind::logit;
    bool detach = false;
    tpo::sequence_form form = tpo::sequence_form::additive;
};
inline variant dpo_variant() { return {"DPO"}; }
inline variant tpo_official() { return {"TPO", true}; }
/// The frontier's methods: DPO, TPO with the official settings, and the variants that separate the
/// ways the weights act (docs/toy_lvlm.md): detached, `logprob` score, multiplicative + detached.
inline std::vector<variant> frontier_variants() {
    return {dpo_variant(), tpo_official(), {"TPO detached", true, tpo::score_kind::logit, true},
            {"TPO logprob", true, tpo::score_kind::logprob},
            {"TPO mult+detached", true, tpo::score_kind::logit, true, tpo::sequence_form::multiplicative}};
}

/// A preference run's end point.
struct run_point {
    hallucination_metrics m;
    divergence kl;
    double accuracy = 0;  // reward accuracy, mean of the last 50 steps
};

struct run_result {
    hallucination_metrics base, sft, dpo, tpo;
    divergence dpo_kl, tpo_kl;
    pair_stats pairs;
    hallucination_metrics sft_in_distribution;  // SFT on held-out scenes of its own (biased) world
    std::vector<curve_point> sft_loss;
    preference_curves dpo_curves, tpo_curves;
    weight_stats weights_before, weights_after;  // at the SFT checkpoint and after TPO
    std::vector<caption_weights> examples_before, examples;  // TPO weights of a few held-out pairs: SFT, after TPO
    std::vector<std::pair<std::string, std::string>> sample_captions;  // truth, TPO caption
};

/// Reports progress: (phase, step, total, current loss).
using progress_fn = std::function<void(const char*, int, int, double)>;

class experiment {
public:
    explicit experiment(settings s) : s_(s), model_(s.shape) {}

    /// SFT from a random initialisation, then the held-out sets and the preference pairs; what every
    /// preference run starts from. Fills the SFT-side fields of `out`.
    void prepare(run_result& out, const progress_fn& progress) {
        // Independent streams per role, so changing one budget does not reshuffle the others.
        world sft_world(s_.seed * 1000 + 1, {.biased = true});
        world pref_world(s_.seed * 1000 + 2, {.biased = false});
        world eval_world(s_.seed * 1000 + 3, {.biased = false});
        world probe_world(s_.seed * 1000 + 4, {.biased = false});
        world stats_world(s_.seed * 1000 + 5, {.biased = false});
        world biased_eval_world(s_.seed * 1000 + 8, {.biased = true});

        eval_set_ = held_out(eval_world, s_.eval_images);
        probe_ = held_out(probe_world, s_.probe_images);
        pairs_.clear();
        std::vector<scene> pref_scenes, stats_scenes;
        if (s_.pairs == pair_source::swapped) {
            for (int i = 0; i < s_.pref_pairs; ++i) pairs_.push_back(make_pair(pref_world, pref_world.sample_scene()));
            for (int i = 0; i < 256; ++i) stats_pairs_.push_back(make_pair(stats_world, stats_world.sample_scene()));
        } else {
            for (int i = 0; i < s_.pref_pairs; ++i) pref_scenes.push_back(pref_world.sample_scene());
            for (int i = 0; i < 256; ++i) stats_scenes.push_back(stats_world.sample_scene());
        }

        sft_ = parameters<real>::random(s_.shape, s_.seed * 1000 + 6);
        out.base = evaluate(sft_, eval_set_);
        out.sft_loss = supervised(sft_, sft_world, progress);
        out.sft = evaluate(sft_, eval_set_);
        out.sft_in_distribution = evaluate(sft_, held_out(biased_eval_world, s_.eval_images));
        if (s_.pairs == pair_source::on_policy) {
            // Built once from the SFT checkpoint, like an offline data set.
            std::mt19937_64 sampler(s_.seed * 1000 + 9);
            pairs_ = on_policy_pairs(sft_, pref_world, pref_scenes, sampler, &out.pairs);
            std::mt19937_64 stats_sampler(s_.seed * 1000 + 10);
            stats_pairs_ = on_policy_pairs(sft_, stats_world, stats_scenes, stats_sampler, nullptr);
        } else {
            out.pairs = describe_pairs(pairs_, s_.pref_pairs);
        }
        if (pairs_.empty()) throw std::runtime_error("no preference pair could be built (seed " + std::to_string(s_.seed) + ")");
    }

    /// The demo: prepare, then DPO and TPO (the settings' variant) at the settings' learning rate.
    run_result run(const progress_fn& progress) {
        run_result out;
        prepare(out, progress);
        out.weights_before = token_weights(sft_, stats_pairs_, nullptr);
        const std::vector<preference_pair> shown(stats_pairs_.begin(), stats_pairs_.begin() + std::min<std::size_t>(4, stats_pairs_.size()));
        token_weights(sft_, shown, &out.examples_before);

        parameters<real> dpo = sft_;
        out.dpo_curves = prefer(dpo, dpo_variant(), s_.pref_lr, progress);
        out.dpo = evaluate(dpo, eval_set_);
        out.dpo_kl = kl(dpo);

        parameters<real> tpo = sft_;
        out.tpo_curves = prefer(tpo, settings_variant(), s_.pref_lr, progress);
        out.tpo = evaluate(tpo, eval_set_);
        out.tpo_kl = kl(tpo);
        out.weights_after = token_weights(tpo, stats_pairs_, nullptr);
        token_weights(tpo, shown, &out.examples);

        const auto captions = model_.generate(tpo, eval_set_.images.data(), 6);
        for (int i = 0; i < 6; ++i) out.sample_captions.emplace_back(text(describe(eval_set_.scenes[i])), text(captions[i]));
        return out;
    }

    /// One point of the frontier: `v` at learning rate `lr` from the SFT checkpoint of `prepare`.
    /// Reads the experiment only, so points of one seed may train concurrently.
    run_point point(const variant& v, double lr, const progress_fn& progress) const {
        parameters<real> theta = sft_;
        const preference_curves c = prefer(theta, v, lr, progress);
        run_point p;
        p.m = evaluate(theta, eval_set_);
        p.kl = kl(theta);
        double acc = 0;
        const std::size_t from = c.accuracy.size() > 50 ? c.accuracy.size() - 50 : 0;
        for (std::size_t i = from; i < c.accuracy.size(); ++i) acc += c.accuracy[i].value;
        p.accuracy = c.accuracy.size() > from ? acc / static_cast<double>(c.accuracy.size() - from) : 0.0;
        return p;
    }

    /// TPO as the settings' flags configure it (official by default).
    variant settings_variant() const { return {"TPO", true, s_.score, s_.detach_weights, s_.form}; }

    const std::vector<preference_pair>& pairs() const { return pairs_; }
    const parameters<real>& sft_checkpoint() const { return sft_; }

    /// RLHF-V-style pairs from `theta`'s own captions: for each scene, captions are sampled at
    /// temperature 1 until one parses and names a shape the image does not hold (at most
    /// `sample_tries`; scenes where none does are skipped and counted). Rejected = that caption,
    /// chosen = its minimal correction (`correct`).
    std::vector<preference_pair> on_policy_pairs(const parameters<real>& theta, world& w, const std::vector<scene>& scenes,
                                                 std::mt19937_64& rng, pair_stats* stats) const {
        std::vector<std::vector<float>> images;
        for (const scene& sc : scenes) images.push_back(w.render(sc));
        std::vector<std::optional<caption>> found(scenes.size());
        pair_stats st;
        std::vector<std::size_t> open(scenes.size());
        std::iota(open.begin(), open.end(), 0);
        for (int attempt = 0; attempt < s_.sample_tries && !open.empty(); ++attempt) {
            std::vector<float> batch;
            for (std::size_t i : open) batch.insert(batch.end(), images[i].begin(), images[i].end());
            const auto said = model_.sample(theta, batch.data(), static_cast<int>(open.size()), rng, 1.0);
            std::vector<std::size_t> still;
            for (std::size_t k = 0; k < open.size(); ++k) {
                st.samples += 1;
                const bool parses = grammatical(said[k]);
                st.ungrammatical += parses ? 0 : 1;
                if (parses && hallucinations(scenes[open[k]], said[k]) > 0) found[open[k]] = said[k];
                else still.push_back(open[k]);
            }
            open = std::move(still);
        }
        std::vector<preference_pair> out;
        for (std::size_t i = 0; i < scenes.size(); ++i) {
            if (!found[i]) continue;
            preference_pair p;
            p.image = std::move(images[i]);
            p.rejected = *found[i];
            p.chosen = correct(scenes[i], p.rejected);
            p.absent = absent_shapes(scenes[i]);
            out.push_back(std::move(p));
        }
        if (stats) {
            const pair_stats d = describe_pairs(out, static_cast<int>(scenes.size()));
            *stats = d;
            stats->samples = st.samples;
            stats->ungrammatical = st.ungrammatical;
        }
        return out;
    }

    static pair_stats describe_pairs(const std::vector<preference_pair>& pairs, int images) {
        pair_stats st;
        st.images = images;
        st.pairs = static_cast<int>(pairs.size());
        st.skipped = images - st.pairs;
        double hallucinated = 0, changed = 0;
        for (const auto& p : pairs) {
            for (int t : p.rejected) hallucinated += p.hallucinated(t) ? 1 : 0;
            const std::size_t n = std::max(p.chosen.size(), p.rejected.size());
            for (std::size_t t = 0; t < n; ++t) {
                const int a = t < p.chosen.size() ? p.chosen[t] : pad, b = t < p.rejected.size() ? p.rejected[t] : pad;
                changed += a != b ? 1 : 0;
            }
        }
        if (!pairs.empty()) {
            st.hallucinated_per_rejected = hallucinated / static_cast<double>(pairs.size());
            st.changed_per_pair = changed / static_cast<double>(pairs.size());
        }
        return st;
    }

    /// Mean per-token KL(π_θ ‖ π_ref) = Σ_v π_θ(v) (log π_θ(v) − log π_ref(v)), averaged over every
    /// position that predicts a caption token, the captions teacher-forced under both models.
    /// Exactly 0 when θ is the reference (the two forward passes are the same arithmetic).
    double mean_token_kl(const parameters<real>& theta, const parameters<real>& reference, const float* images,
                         const std::vector<caption>& captions) const {
        const int L = max_length, V = vocab_size, chunk = 256;
        const int n = static_cast<int>(captions.size());
        double total = 0, count = 0;
        std::vector<real> z, z_ref;
        for (int from = 0; from < n; from += chunk) {
            const int rows = std::min(chunk, n - from);
            encoded e;
            for (int b = 0; b < rows; ++b) append(e, captions[from + b]);
            z.resize(static_cast<std::size_t>(rows) * L * V);
            z_ref.resize(z.size());
            const float* img = images + static_cast<std::size_t>(from) * pixels;
            model_.forward(theta, img, e.tokens.data(), rows, L, z.data(), nullptr);
            model_.forward(reference, img, e.tokens.data(), rows, L, z_ref.data(), nullptr);
            for (int b = 0; b < rows; ++b)
                for (int t = 0; t + 1 < L; ++t) {
                    if (e.labels[b * L + t + 1] < 0) continue;
                    const real* p = &z[(static_cast<std::size_t>(b) * L + t) * V];
                    const real* q = &z_ref[(static_cast<std::size_t>(b) * L + t) * V];
                    auto lse = [V](const real* x) {
                        double mx = x[0], sum = 0;
                        for (int v = 1; v < V; ++v) mx = std::max(mx, static_cast<double>(x[v]));
                        for (int v = 0; v < V; ++v) sum += std::exp(x[v] - mx);
                        return mx + std::log(sum);
                    };
                    const double lp = lse(p), lq = lse(q);
                    double d = 0;
                    for (int v = 0; v < V; ++v) {
                        const double log_p = p[v] - lp, log_q = q[v] - lq;
                        d += std::exp(log_p) * (log_p - log_q);
                    }
                    total += d;
                    count += 1;
                }
        }
        return count > 0 ? total / count : 0.0;
    }

    /// KL of θ from the SFT checkpoint on the held-out captions and on the first `kl_pairs` pairs.
    divergence kl(const parameters<real>& theta) const {
        divergence d;
        std::vector<caption> truth;
        for (const scene& sc : eval_set_.scenes) truth.push_back(describe(sc));
        d.held_out = mean_token_kl(theta, sft_, eval_set_.images.data(), truth);
        std::vector<float> images;
        std::vector<caption> both;
        const std::size_t n = std::min<std::size_t>(pairs_.size(), static_cast<std::size_t>(s_.kl_pairs));
        for (int side = 0; side < 2; ++side)
            for (std::size_t i = 0; i < n; ++i) {
                images.insert(images.end(), pairs_[i].image.begin(), pairs_[i].image.end());
                both.push_back(side == 0 ? pairs_[i].chosen : pairs_[i].rejected);
            }
        d.pairs = mean_token_kl(theta, sft_, images.data(), both);
        return d;
    }

    struct held_out_set {
        std::vector<scene> scenes;
        std::vector<float> images;
    };
    static held_out_set held_out(world& w, int n) {
        held_out_set h;
        for (int i = 0; i < n; ++i) {
            h.scenes.push_back(w.sample_scene());
            const auto img = w.render(h.scenes.back());
            h.images.insert(h.images.end(), img.begin(), img.end());
        }
        return h;
    }

    hallucination_metrics evaluate(const parameters<real>& theta, const held_out_set& set) const {
        const auto captions = model_.generate(theta, set.images.data(), static_cast<int>(set.scenes.size()));
        return measure(set.scenes, captions);
    }

    /// Maximum likelihood on fresh scenes of the biased world; returns the loss curve.
    std::vector<curve_point> supervised(parameters<real>& theta, world& w, const progress_fn& progress) {
        std::vector<curve_point> curve;
        adam<real> opt(theta, s_.sft_lr);
        parameters<real> grad = parameters<real>::zeros_like(s_.shape);
        const int B = s_.sft_batch, L = max_length, V = vocab_size;
        std::vector<real> logits(static_cast<std::size_t>(B) * L * V), dlogits(logits.size());
        activations<real> cache;
        double smoothed = 0;
        for (int step = 0; step < s_.sft_steps; ++step) {
            std::vector<float> images;
            encoded e;
            for (int b = 0; b < B; ++b) {
                const scene sc = w.sample_scene();
                const auto img = w.render(sc);
                images.insert(images.end(), img.begin(), img.end());
                append(e, describe(sc));
            }
            model_.forward(theta, images.data(), e.tokens.data(), B, L, logits.data(), &cache);
            const double loss = cross_entropy(logits, e.labels, B, dlogits);
            grad.set_zero();
            model_.backward(theta, cache, dlogits.data(), grad);
            opt.step(theta, grad);
            smoothed = step == 0 ? loss : 0.95 * smoothed + 0.05 * loss;
            curve.push_back({step, loss});
            if (progress) progress("SFT", step + 1, s_.sft_steps, smoothed);
        }
        return curve;
    }

    /// Mean next-token cross-entropy over valid labels, and its gradient in `dlogits`.
    static double cross_entropy(const std::vector<real>& logits, const std::vector<int>& labels, int rows,
                                std::vector<real>& dlogits) {
        const int L = max_length, V = vocab_size;
        std::fill(dlogits.begin(), dlogits.end(), real(0));
        double total = 0, count = 0;
        for (int b = 0; b < rows; ++b)
            for (int t = 0; t + 1 < L; ++t)
                if (labels[b * L + t + 1] >= 0) count += 1;
        for (int b = 0; b < rows; ++b)
            for (int t = 0; t + 1 < L; ++t) {
                const int y = labels[b * L + t + 1];
                if (y < 0) continue;
                const real* z = &logits[(static_cast<std::size_t>(b) * L + t) * V];
                real* dz = &dlogits[(static_cast<std::size_t>(b) * L + t) * V];
                double mx = z[0], sum = 0;
                for (int v = 1; v < V; ++v) mx = std::max(mx, static_cast<double>(z[v]));
                for (int v = 0; v < V; ++v) sum += std::exp(z[v] - mx);
                const double lse = mx + std::log(sum);
                total += lse - z[y];
                for (int v = 0; v < V; ++v)
                    dz[v] = static_cast<real>((std::exp(z[v] - lse) - (v == y ? 1.0 : 0.0)) / count);
            }
        return count > 0 ? total / count : 0.0;
    }

    tpo::objective_options options(const variant& v) const {
        tpo::objective_options o;
        o.weighting = v.weighted ? tpo::token_weighting::self_calibrated : tpo::token_weighting::none;
        o.hyper.beta = s_.beta;
        o.a = s_.a;
        o.score = v.score;
        o.detach_weights = v.detach;
        o.form = v.form;
        if (s_.sft_weight > 0) o.losses.push_back({tpo::loss_type::sft, s_.sft_weight});
        return o;
    }

    /// Builds the policy batch: [chosen clean | (chosen noisy) | rejected clean | (rejected noisy)],
    /// P sequences each, so each group's logits are one contiguous (P, L, V) block.
    struct pref_batch {
        std::vector<float> images;
        encoded e;
        int groups = 2, pairs = 0;
    };
    pref_batch assemble(const std::vector<const preference_pair*>& batch, bool noisy, std::uint64_t noise_stream) const {
        pref_batch pb;
        pb.pairs = static_cast<int>(batch.size());
        pb.groups = noisy ? 4 : 2;
        for (int side = 0; side < 2; ++side)
            for (int corrupted = 0; corrupted < (noisy ? 2 : 1); ++corrupted)
                for (std::size_t i = 0; i < batch.size(); ++i) {
                    const preference_pair& p = *batch[i];
                    std::vector<float> img = p.image;
                    if (corrupted) {
                        // Each pair's chosen and rejected see the same corrupted image (the noisy
                        // logits are the same tokens under the corrupted image); a new ε every step.
                        tpo::diffusion_options d;
                        d.step = s_.noise_step;
                        d.seed = s_.seed;
                        d.stream = noise_stream + i;
                        tpo::add_diffusion_noise(backend_, tpo::image_view<const float>::chw(p.image.data(), channels, image_size, image_size),
                                                 tpo::image_view<float>::chw(img.data(), channels, image_size, image_size), d);
                    }
                    pb.images.insert(pb.images.end(), img.begin(), img.end());
                    append(pb.e, side == 0 ? p.chosen : p.rejected);
                }
        return pb;
    }

    /// Logit views of group g of a (groups·P, L, V) buffer.
    static tpo::logits_view<const real> group(const std::vector<real>& z, int g, int pairs) {
        return {z.data() + static_cast<std::size_t>(g) * pairs * max_length * vocab_size, pairs, max_length, vocab_size};
    }
    static tpo::logits_view<real> group(std::vector<real>& z, int g, int pairs) {
        return {z.data() + static_cast<std::size_t>(g) * pairs * max_length * vocab_size, pairs, max_length, vocab_size};
    }

    /// Preference optimisation of θ against the frozen SFT checkpoint; returns the training curves.
    preference_curves prefer(parameters<real>& theta, const variant& v, double lr, const progress_fn& progress) const {
        const parameters<real>& reference = sft_;
        preference_curves curves;
        adam<real> opt(theta, lr);
        parameters<real> grad = parameters<real>::zeros_like(s_.shape);
        tpo_backend backend;  // one per run: concurrent runs of one experiment share no state
        tpo::objective<tpo_backend> objective(backend, options(v));
        const bool noisy = v.weighted;
        // Same pair order for both methods: the budgets differ only in the objective.
        std::mt19937_64 order(s_.seed * 1000 + 7);
        std::vector<std::size_t> perm(pairs_.size());
        std::iota(perm.begin(), perm.end(), 0);
        std::size_t cursor = perm.size();
        activations<real> cache;
        const char* name = v.name.c_str();
        auto probe = [&](int step) {
            if (probe_.scenes.empty()) return;
            const hallucination_metrics h = evaluate(theta, probe_);
            curves.chair_i.push_back({step, h.chair_i});
            curves.recall.push_back({step, h.recall});
        };
        probe(0);
        double smoothed = 0;
        for (int step = 0; step < s_.pref_steps; ++step) {
            std::vector<const preference_pair*> batch;
            for (int i = 0; i < s_.pref_batch; ++i) {
                if (cursor == perm.size()) {
                    std::shuffle(perm.begin(), perm.end(), order);
                    cursor = 0;
                }
                batch.push_back(&pairs_[perm[cursor++]]);
            }
            const pref_batch pb = assemble(batch, noisy, static_cast<std::uint64_t>(step) * s_.pref_batch);
            const int P = pb.pairs, rows = pb.groups * P;
            std::vector<real> z(static_cast<std::size_t>(rows) * max_length * vocab_size), z_ref(z.size()), dz(z.size());
            model_.forward(theta, pb.images.data(), pb.e.tokens.data(), rows, max_length, z.data(), &cache);
            model_.forward(reference, pb.images.data(), pb.e.tokens.data(), rows, max_length, z_ref.data(), nullptr);

            const int chosen_clean = 0, chosen_noisy = 1, rejected_clean = noisy ? 2 : 1, rejected_noisy = 3;
            auto labels = [&](int g) { return tpo::labels_view<const int>{pb.e.labels.data() + static_cast<std::size_t>(g) * P * max_length, P, max_length}; };
            tpo::preference_batch<real, int, real> b;
            b.chosen.policy = group(z, chosen_clean, P);
            b.chosen.reference = group(z_ref, chosen_clean, P);
            b.chosen.labels = labels(chosen_clean);
            b.rejected.policy = group(z, rejected_clean, P);
            b.rejected.reference = group(z_ref, rejected_clean, P);
            b.rejected.labels = labels(rejected_clean);
            tpo::preference_gradients<real> g;
            g.chosen.policy = group(dz, chosen_clean, P);
            g.rejected.policy = group(dz, rejected_clean, P);
            if (noisy) {
                b.chosen.policy_noisy = group(z, chosen_noisy, P);
                b.chosen.reference_noisy = group(z_ref, chosen_noisy, P);
                b.rejected.policy_noisy = group(z, rejected_noisy, P);
                b.rejected.reference_noisy = group(z_ref, rejected_noisy, P);
                g.chosen.policy_noisy = group(dz, chosen_noisy, P);
                g.rejected.policy_noisy = group(dz, rejected_noisy, P);
            }
            const tpo::objective_result r = objective.forward(b);
            objective.backward(b, g);
            grad.set_zero();
            model_.backward(theta, cache, dz.data(), grad);
            if (s_.cosine) opt.set_lr(lr * 0.5 * (1 + std::cos(std::numbers::pi * step / s_.pref_steps)));
            opt.step(theta, grad);

            curves.loss.push_back({step, r.loss});
            curves.accuracy.push_back({step, r.reward_accuracy});
            curves.margin.push_back({step, r.reward_margin});
            auto mean = [](const std::vector<double>& v) {
                double acc = 0;
                for (double x : v) acc += x;
                return v.empty() ? 0.0 : acc / static_cast<double>(v.size());
            };
            curves.chosen_reward.push_back({step, mean(r.chosen_rewards)});
            curves.rejected_reward.push_back({step, mean(r.rejected_rewards)});
            smoothed = step == 0 ? r.loss : 0.95 * smoothed + 0.05 * r.loss;
            if ((step + 1) % s_.probe_every == 0 || step + 1 == s_.pref_steps) probe(step + 1);
            if (progress) progress(name, step + 1, s_.pref_steps, smoothed);
        }
        return curves;
    }

    /// The TPO weights c the current policy assigns (clean vs one corrupted view), by token class.
    weight_stats token_weights(const parameters<real>& theta, const std::vector<preference_pair>& pairs,
                               std::vector<caption_weights>* examples) const {
        std::vector<const preference_pair*> batch;
        for (const auto& p : pairs) batch.push_back(&p);
        const pref_batch pb = assemble(batch, true, 1u << 30);
        const int P = pb.pairs, rows = 4 * P, L = max_length, V = vocab_size;
        std::vector<real> z(static_cast<std::size_t>(rows) * L * V);
        model_.forward(theta, pb.images.data(), pb.e.tokens.data(), rows, L, z.data(), nullptr);
        double sums[2][4] = {}, counts[2][4] = {};  // [side][function, attribute, object, hallucinated]
        const std::size_t base = examples ? examples->size() : 0;
        if (examples)
            for (const auto& pair : pairs) examples->push_back({pair.chosen, pair.rejected, {}, {}, pair.absent});
        for (int side = 0; side < 2; ++side)
            for (int i = 0; i < P; ++i) {
                const preference_pair& pair = pairs[i];
                const caption& c = side == 0 ? pair.chosen : pair.rejected;
                caption_weights* ex = examples ? &(*examples)[base + i] : nullptr;
                for (int t = 0; t + 1 < static_cast<int>(c.size()); ++t) {
                    const int y = c[t + 1];
                    const real* clean = &z[((static_cast<std::size_t>(2 * side) * P + i) * L + t) * V];
                    const real* corrupted = &z[((static_cast<std::size_t>(2 * side + 1) * P + i) * L + t) * V];
                    const double s = visual_score(clean, corrupted, y);
                    const double w = tpo::reward::calibrate(side == 0 ? tpo::response_side::chosen : tpo::response_side::rejected, s, s_.a).value;
                    int k = static_cast<int>(classify(y));
                    if (side == 1 && pair.hallucinated(y)) {
                        k = 3;
                    }
                    sums[side][k] += w;
                    counts[side][k] += 1;
                    if (ex) (side == 0 ? ex->chosen_weight : ex->rejected_weight).push_back(w);
                }
            }
        weight_stats ws;
        auto mean = [&](int side, int k) { return counts[side][k] > 0 ? sums[side][k] / counts[side][k] : 0.0; };
        for (int k = 0; k < 3; ++k) {
            ws.chosen[k] = mean(0, k);
            ws.rejected[k] = (sums[1][k] + (k == 2 ? sums[1][3] : 0)) / std::max(1.0, counts[1][k] + (k == 2 ? counts[1][3] : 0));
        }
        ws.rejected_hallucinated = mean(1, 3);
        ws.rejected_true_objects = mean(1, 2);
        return ws;
    }

private:
    /// The visual score s = g(z)[y] − g(z̃)[y] for one row pair, through the library's own function.
    double visual_score(const real* clean, const real* corrupted, int y) const {
        auto stats = [&](const real* z) {
            tpo::math::online_logsumexp<double> lse, unused;
            for (int v = 0; v < vocab_size; ++v) lse.add(static_cast<double>(z[v]));
            return tpo::rows::finish_row(lse, unused, static_cast<double>(z[y]), 0.0, y);
        };
        return tpo::reward::visual_score(s_.score, stats(clean), stats(corrupted));
    }

    settings s_;
    lvlm<real> model_;
    tpo_backend backend_{};
    held_out_set eval_set_, probe_;
    parameters<real> sft_;
    std::vector<preference_pair> pairs_, stats_pairs_;
};

}  // namespace toy
