#pragma once
// The training loop a trainer writes around tpo: supervised fine-tuning, then preference
// optimisation from the same checkpoint against a frozen reference copy, with DPO or TPO.
// tpo computes the loss and ∂loss/∂logits; the model backpropagates them.

#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <random>
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

struct settings {
    std::uint64_t seed = 1;
    int sft_steps = 3000, sft_batch = 32;
    double sft_lr = 3e-3;
    int pref_steps = 300, pref_batch = 16;
    double pref_lr = 1e-4;
    double beta = 0.1;      // the official β (docs/formulas.md#numerics)
    double a = 0.5;         // calibration margin
    int noise_step = 500;   // diffusion step k of the corruption (official: 500)
    tpo::score_kind score = tpo::score_kind::logit;  // official
    bool detach_weights = false;                     // official: gradients flow through c
    tpo::sequence_form form = tpo::sequence_form::additive;  // official: A = Σ (ℓ + log c)
    double sft_weight = 0;  // > 0 adds the library's `sft` term on the chosen captions (RPO/MPO-style)
    int pref_pairs = 2000;  // size of the fixed preference set
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
    int hallucinated_token;
};

struct run_result {
    hallucination_metrics base, sft, dpo, tpo;
    hallucination_metrics sft_in_distribution;  // SFT on held-out scenes of its own (biased) world
    std::vector<curve_point> sft_loss;
    preference_curves dpo_curves, tpo_curves;
    weight_stats weights_before, weights_after;  // at the SFT checkpoint and after TPO
    std::vector<caption_weights> examples_before, examples;  // TPO weights of a few held-out pairs: SFT, after TPO
    std::vector<std::pair<std::string, std::string>> sample_captions;  // truth, TPO caption
};

/// Reports progress: (phase, step, total, current loss).
using progress_fn = std::function<void(const char*, int, int, double)>;

enum class method { dpo, tpo };

class experiment {
public:
    explicit experiment(settings s) : s_(s), model_(s.shape) {}

    run_result run(const progress_fn& progress) {
        run_result out;
        // Independent streams per role, so changing one budget does not reshuffle the others.
        world sft_world(s_.seed * 1000 + 1, {.biased = true});
        world pref_world(s_.seed * 1000 + 2, {.biased = false});
        world eval_world(s_.seed * 1000 + 3, {.biased = false});
        world probe_world(s_.seed * 1000 + 4, {.biased = false});
        world stats_world(s_.seed * 1000 + 5, {.biased = false});
        world biased_eval_world(s_.seed * 1000 + 8, {.biased = true});

        auto eval_set = held_out(eval_world, s_.eval_images);
        probe_ = held_out(probe_world, s_.probe_images);
        pairs_.clear();
        for (int i = 0; i < s_.pref_pairs; ++i) pairs_.push_back(make_pair(pref_world, pref_world.sample_scene()));
        std::vector<preference_pair> stats_pairs;
        for (int i = 0; i < 256; ++i) stats_pairs.push_back(make_pair(stats_world, stats_world.sample_scene()));

        parameters<real> theta = parameters<real>::random(s_.shape, s_.seed * 1000 + 6);
        out.base = evaluate(theta, eval_set);
        out.sft_loss = supervised(theta, sft_world, progress);
        out.sft = evaluate(theta, eval_set);
        out.sft_in_distribution = evaluate(theta, held_out(biased_eval_world, s_.eval_images));
        out.weights_before = token_weights(theta, stats_pairs, nullptr);
        const std::vector<preference_pair> shown(stats_pairs.begin(), stats_pairs.begin() + 4);
        token_weights(theta, shown, &out.examples_before);

        parameters<real> dpo = theta;
        out.dpo_curves = prefer(dpo, theta, method::dpo, progress);
        out.dpo = evaluate(dpo, eval_set);

        parameters<real> tpo = theta;
        out.tpo_curves = prefer(tpo, theta, method::tpo, progress);
        out.tpo = evaluate(tpo, eval_set);
        out.weights_after = token_weights(tpo, stats_pairs, nullptr);
        token_weights(tpo, shown, &out.examples);

        const auto captions = model_.generate(tpo, eval_set.images.data(), 6);
        for (int i = 0; i < 6; ++i) out.sample_captions.emplace_back(text(describe(eval_set.scenes[i])), text(captions[i]));
        return out;
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

    tpo::objective_options options(method m) const {
        tpo::objective_options o;
        o.weighting = m == method::tpo ? tpo::token_weighting::self_calibrated : tpo::token_weighting::none;
        o.hyper.beta = s_.beta;
        o.a = s_.a;
        o.score = s_.score;
        o.detach_weights = s_.detach_weights;
        o.form = s_.form;
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
    pref_batch assemble(const std::vector<const preference_pair*>& batch, bool noisy, std::uint64_t noise_stream) {
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

    preference_curves prefer(parameters<real>& theta, const parameters<real>& reference, method m,
                             const progress_fn& progress) {
        preference_curves curves;
        adam<real> opt(theta, s_.pref_lr);
        parameters<real> grad = parameters<real>::zeros_like(s_.shape);
        tpo::objective<tpo_backend> objective(backend_, options(m));
        const bool noisy = m == method::tpo;
        // Same pair order for both methods: the budgets differ only in the objective.
        std::mt19937_64 order(s_.seed * 1000 + 7);
        std::vector<std::size_t> perm(pairs_.size());
        std::iota(perm.begin(), perm.end(), 0);
        std::size_t cursor = perm.size();
        activations<real> cache;
        const char* name = m == method::tpo ? "TPO" : "DPO";
        auto probe = [&](int step) {
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
                               std::vector<caption_weights>* examples) {
        std::vector<const preference_pair*> batch;
        for (const auto& p : pairs) batch.push_back(&p);
        const pref_batch pb = assemble(batch, true, 1u << 30);
        const int P = pb.pairs, rows = 4 * P, L = max_length, V = vocab_size;
        std::vector<real> z(static_cast<std::size_t>(rows) * L * V);
        model_.forward(theta, pb.images.data(), pb.e.tokens.data(), rows, L, z.data(), nullptr);
        double sums[2][4] = {}, counts[2][4] = {};  // [side][function, attribute, object, hallucinated]
        const std::size_t base = examples ? examples->size() : 0;
        if (examples)
            for (const auto& pair : pairs) examples->push_back({pair.chosen, pair.rejected, {}, {}, pair.hallucinated_token});
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
                    if (side == 1 && y == pair.hallucinated_token) {
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
    held_out_set probe_;
    std::vector<preference_pair> pairs_;
};

}  // namespace toy
