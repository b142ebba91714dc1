// The toy LVLM demo (examples/toy_lvlm): its hand-written backward pass against central finite
// differences in double, the whole TPO chain (model → tpo → model) against finite differences of
// the TPO loss, and a shortened training run that must lower its losses.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <random>

#include "sweep.hpp"
#include "train.hpp"

namespace {

toy::model_shape small_shape() {
    toy::model_shape s;
    s.features = 5;
    s.image = 4;
    s.embed = 3;
    s.hidden = 6;
    return s;
}

struct inputs {
    std::vector<float> images;
    std::vector<int> tokens, labels;
    int rows = 0;
};

inputs random_inputs(int rows, std::uint64_t seed) {
    toy::world w(seed, {.biased = true});
    inputs in;
    in.rows = rows;
    toy::encoded e;
    for (int b = 0; b < rows; ++b) {
        const toy::scene sc = w.sample_scene();
        const auto img = w.render(sc);
        in.images.insert(in.images.end(), img.begin(), img.end());
        toy::append(e, toy::describe(sc));
    }
    in.tokens = e.tokens;
    in.labels = e.labels;
    return in;
}

/// Worst |analytic − numeric| / (atol + rtol·|numeric|) over every parameter; ≤ 1 passes.
template <class Loss>
double worst_gradient_ratio(toy::parameters<double>& p, const toy::parameters<double>& analytic, Loss loss,
                            std::string& where) {
    const double eps = 1e-6, atol = 1e-7, rtol = 1e-5;
    double worst = 0;
    for (std::size_t i = 0; i < p.size(); ++i) {
        double& x = p.flat(i);
        const double keep = x;
        x = keep + eps;
        const double up = loss(p);
        x = keep - eps;
        const double down = loss(p);
        x = keep;
        const double numeric = (up - down) / (2 * eps);
        const double a = const_cast<toy::parameters<double>&>(analytic).flat(i);
        const double ratio = std::abs(a - numeric) / (atol + rtol * std::abs(numeric));
        if (ratio > worst) {
            worst = ratio;
            where = "parameter " + std::to_string(i) + ": analytic " + std::to_string(a) + ", numeric " +
                    std::to_string(numeric);
        }
    }
    return worst;
}

}  // namespace

TEST_CASE("toy LVLM backward matches finite differences", "[toy_lvlm][gradient]") {
    const toy::model_shape shape = small_shape();
    const toy::lvlm<double> model(shape);
    toy::parameters<double> p = toy::parameters<double>::random(shape, 11);
    // Non-zero biases so every bias path is exercised away from 0.
    std::mt19937_64 rng(5);
    std::normal_distribution<double> n(0.0, 0.3);
    for (auto& w : p.m)
        if (w.rows() == 1)
            for (Eigen::Index i = 0; i < w.size(); ++i) w.data()[i] = n(rng);
    const inputs in = random_inputs(3, 17);
    const int L = toy::max_length, V = toy::vocab_size;
    // A random linear functional of all logits reaches every logit's gradient path.
    std::vector<double> weights(static_cast<std::size_t>(in.rows) * L * V);
    for (double& w : weights) w = n(rng);
    auto loss = [&](const toy::parameters<double>& q) {
        std::vector<double> z(weights.size());
        model.forward(q, in.images.data(), in.tokens.data(), in.rows, L, z.data(), nullptr);
        double s = 0;
        for (std::size_t i = 0; i < z.size(); ++i) s += weights[i] * z[i];
        return s;
    };
    std::vector<double> z(weights.size());
    toy::activations<double> cache;
    model.forward(p, in.images.data(), in.tokens.data(), in.rows, L, z.data(), &cache);
    toy::parameters<double> grad = toy::parameters<double>::zeros_like(shape);
    model.backward(p, cache, weights.data(), grad);
    std::string where;
    const double worst = worst_gradient_ratio(p, grad, loss, where);
    INFO(where);
    CHECK(worst <= 1.0);
}

TEST_CASE("TPO and DPO gradients through the toy LVLM match finite differences of tpo's loss", "[toy_lvlm][gradient]") {
    const toy::model_shape shape = small_shape();
    const toy::lvlm<double> model(shape);
    const toy::parameters<double> reference = toy::parameters<double>::random(shape, 3);
    toy::parameters<double> p = reference;
    std::mt19937_64 rng(9);
    std::normal_distribution<double> n(0.0, 0.05);
    for (auto& w : p.m)
        for (Eigen::Index i = 0; i < w.size(); ++i) w.data()[i] += n(rng);  // policy ≠ reference: a live margin

    toy::world w(23, {.biased = false});
    std::vector<toy::preference_pair> pairs;
    for (int i = 0; i < 3; ++i) pairs.push_back(toy::make_pair(w, w.sample_scene()));
    const int P = 3, L = toy::max_length, V = toy::vocab_size;
    tpo::backend::reference backend;
    for (bool self_calibrated : {false, true}) {
        // Rows: chosen clean, chosen noisy, rejected clean, rejected noisy (P each).
        std::vector<float> images;
        toy::encoded e;
        for (int side = 0; side < 2; ++side)
            for (int corrupted = 0; corrupted < 2; ++corrupted)
                for (int i = 0; i < P; ++i) {
                    std::vector<float> img = pairs[i].image;
                    if (corrupted) {
                        tpo::diffusion_options d;
                        d.seed = 4;
                        d.stream = static_cast<std::uint64_t>(i);
                        tpo::add_diffusion_noise(
                            backend,
                            tpo::image_view<const float>::chw(pairs[i].image.data(), toy::channels, toy::image_size, toy::image_size),
                            tpo::image_view<float>::chw(img.data(), toy::channels, toy::image_size, toy::image_size), d);
                    }
                    images.insert(images.end(), img.begin(), img.end());
                    toy::append(e, side == 0 ? pairs[i].chosen : pairs[i].rejected);
                }
        const int rows = 4 * P;
        tpo::objective_options o;
        o.weighting = self_calibrated ? tpo::token_weighting::self_calibrated : tpo::token_weighting::none;
        o.hyper.beta = 0.5;
        std::vector<double> z_ref(static_cast<std::size_t>(rows) * L * V);
        model.forward(reference, images.data(), e.tokens.data(), rows, L, z_ref.data(), nullptr);
        auto view = [&](std::vector<double>& z, int g) {
            return tpo::logits_view<double>{z.data() + static_cast<std::size_t>(g) * P * L * V, P, L, V};
        };
        auto labels = [&](int g) {
            return tpo::labels_view<const int>{e.labels.data() + static_cast<std::size_t>(g) * P * L, P, L};
        };
        auto batch_of = [&](std::vector<double>& z) {
            tpo::preference_batch<double, int, double> b;
            b.chosen = {view(z, 0), view(z, 1), view(z_ref, 0), view(z_ref, 1), labels(0), {}};
            b.rejected = {view(z, 2), view(z, 3), view(z_ref, 2), view(z_ref, 3), labels(2), {}};
            return b;
        };
        auto loss = [&](const toy::parameters<double>& q) {
            std::vector<double> z(z_ref.size());
            model.forward(q, images.data(), e.tokens.data(), rows, L, z.data(), nullptr);
            return tpo::evaluate(backend, o, batch_of(z)).loss;
        };
        std::vector<double> z(z_ref.size()), dz(z_ref.size(), 0.0);
        toy::activations<double> cache;
        model.forward(p, images.data(), e.tokens.data(), rows, L, z.data(), &cache);
        tpo::preference_gradients<double> g;
        g.chosen = {view(dz, 0), self_calibrated ? view(dz, 1) : tpo::logits_view<double>{}};
        g.rejected = {view(dz, 2), self_calibrated ? view(dz, 3) : tpo::logits_view<double>{}};
        const tpo::objective_result r = tpo::evaluate(backend, o, batch_of(z), &g);
        CHECK(std::isfinite(r.loss));
        toy::parameters<double> grad = toy::parameters<double>::zeros_like(shape);
        model.backward(p, cache, dz.data(), grad);
        std::string where;
        const double worst = worst_gradient_ratio(p, grad, loss, where);
        INFO((self_calibrated ? "TPO: " : "DPO: ") << where);
        CHECK(worst <= 1.0);
    }
}

TEST_CASE("the minimal correction of a caption", "[toy_lvlm][pairs]") {
    using namespace toy;
    // A red square (shape 0) and a blue cross (shape 3); colours 0 = red, 1 = green, 2 = blue.
    scene sc;
    sc.objects = {{0, 0, 0, 0}, {3, 2, 8, 8}};
    const auto clause = [](int colour, int shape) { return object{shape, colour, 0, 0}; };
    // The partner hallucination (circle for square) becomes the unmentioned cross, in its colour.
    CHECK(correct(sc, describe({clause(0, 0), clause(1, 1)})) == describe({clause(0, 0), clause(2, 3)}));
    // Mentions keep their order; a wrong colour on a present shape is corrected.
    CHECK(correct(sc, describe({clause(1, 1), clause(3, 0)})) == describe({clause(2, 3), clause(0, 0)}));
    // No present shape left to name: the clause goes, whichever position it has.
    CHECK(correct(sc, describe({clause(0, 0), clause(1, 1), clause(2, 3)})) == describe({clause(0, 0), clause(2, 3)}));
    CHECK(correct(sc, describe({clause(1, 5), clause(0, 0), clause(2, 3)})) == describe({clause(0, 0), clause(2, 3)}));
    // Two hallucinations, two unmentioned shapes: replaced in canonical order of the scene.
    CHECK(correct(sc, describe({clause(1, 1), clause(1, 5)})) == describe({clause(0, 0), clause(2, 3)}));
    // A correct caption is its own correction.
    CHECK(correct(sc, describe(sc)) == describe(sc));
    CHECK(hallucinations(sc, describe({clause(0, 0), clause(1, 1)})) == 1);
    CHECK(hallucinations(sc, describe(sc)) == 0);
}

TEST_CASE("a shortened SFT → DPO/TPO run trains", "[toy_lvlm][train]") {
    toy::settings s;
    s.seed = 2;
    s.shape.features = 16;
    s.shape.image = 16;
    s.shape.hidden = 24;
    s.sft_steps = 150;
    s.sft_batch = 16;
    s.pref_steps = 40;
    s.pref_batch = 8;
    s.pref_lr = 2e-3;
    s.pref_pairs = 64;
    s.eval_images = 60;
    s.probe_images = 20;
    s.probe_every = 20;
    s.pairs = toy::pair_source::on_policy;
    toy::experiment e(s);
    const toy::run_result r = e.run(nullptr);
    auto mean = [](const std::vector<toy::curve_point>& c, std::size_t from, std::size_t to) {
        double acc = 0;
        for (std::size_t i = from; i < to; ++i) acc += c[i].value;
        return acc / static_cast<double>(to - from);
    };
    const auto& sft = r.sft_loss;
    INFO("SFT loss: first 20 steps " << mean(sft, 0, 20) << ", last 20 " << mean(sft, sft.size() - 20, sft.size()));
    CHECK(mean(sft, sft.size() - 20, sft.size()) < 0.6 * mean(sft, 0, 20));
    // Preference losses start at ln 2 exactly (policy = reference, docs/formulas.md#numerics) and must go down.
    for (const auto* curve : {&r.dpo_curves.loss, &r.tpo_curves.loss}) {
        CHECK(curve->front().value == Approx(std::log(2.0)).epsilon(1e-6));
        INFO("preference loss: first 10 " << mean(*curve, 0, 10) << ", last 10 " << mean(*curve, 30, 40));
        CHECK(mean(*curve, 30, 40) < mean(*curve, 0, 10));
    }
    // Supervised training must have taught the grammar: most greedy captions parse.
    CHECK(r.sft.well_formed > 0.8);

    // The on-policy pairs: rejected = a sampled caption naming an absent shape, chosen = its correction.
    const auto& pairs = e.pairs();
    REQUIRE(!pairs.empty());
    CHECK(r.pairs.pairs == static_cast<int>(pairs.size()));
    CHECK(r.pairs.pairs + r.pairs.skipped == s.pref_pairs);
    for (const auto& p : pairs) {
        INFO("chosen: " << toy::text(p.chosen) << " | rejected: " << toy::text(p.rejected));
        CHECK(toy::grammatical(p.chosen));
        CHECK(toy::grammatical(p.rejected));
        CHECK(std::none_of(p.chosen.begin(), p.chosen.end(), [&](int t) { return p.hallucinated(t); }));
        CHECK(std::any_of(p.rejected.begin(), p.rejected.end(), [&](int t) { return p.hallucinated(t); }));
    }

    // KL(π ‖ π_ref) is exactly zero at the reference, positive after preference training, and equals
    // the divergence computed here from the two models' softmax distributions.
    const toy::parameters<toy::real>& checkpoint = e.sft_checkpoint();
    std::vector<float> images;
    std::vector<toy::caption> captions;
    for (std::size_t i = 0; i < 8 && i < pairs.size(); ++i) {
        images.insert(images.end(), pairs[i].image.begin(), pairs[i].image.end());
        captions.push_back(pairs[i].rejected);
    }
    CHECK(e.mean_token_kl(checkpoint, checkpoint, images.data(), captions) == 0.0);
    CHECK(r.dpo_kl.held_out > 0);
    CHECK(r.dpo_kl.pairs > 0);
    CHECK(r.tpo_kl.held_out > 0);
    toy::parameters<toy::real> moved = checkpoint;
    std::mt19937_64 rng(3);
    std::normal_distribution<double> n(0.0, 0.05);
    for (auto& w : moved.m)
        for (Eigen::Index i = 0; i < w.size(); ++i) w.data()[i] += static_cast<toy::real>(n(rng));
    const toy::lvlm<toy::real> model(s.shape);
    const int rows = static_cast<int>(captions.size()), L = toy::max_length, V = toy::vocab_size;
    toy::encoded enc;
    for (const auto& c : captions) toy::append(enc, c);
    std::vector<toy::real> zp(static_cast<std::size_t>(rows) * L * V), zq(zp.size());
    model.forward(moved, images.data(), enc.tokens.data(), rows, L, zp.data(), nullptr);
    model.forward(checkpoint, images.data(), enc.tokens.data(), rows, L, zq.data(), nullptr);
    double expected = 0;
    int positions = 0;
    for (int b = 0; b < rows; ++b)
        for (int t = 0; t + 1 < static_cast<int>(captions[b].size()); ++t) {
            std::vector<double> p(V), q(V);
            double sp = 0, sq = 0;
            for (int v = 0; v < V; ++v) {
                p[v] = std::exp(static_cast<double>(zp[(static_cast<std::size_t>(b) * L + t) * V + v]));
                q[v] = std::exp(static_cast<double>(zq[(static_cast<std::size_t>(b) * L + t) * V + v]));
                sp += p[v];
                sq += q[v];
            }
            for (int v = 0; v < V; ++v) expected += p[v] / sp * std::log((p[v] / sp) / (q[v] / sq));
            positions += 1;
        }
    expected /= positions;
    CHECK(expected > 0);
    CHECK(e.mean_token_kl(moved, checkpoint, images.data(), captions) == Approx(expected).epsilon(1e-9));
}

TEST_CASE("swapped pairs: the ground truth against one shape swapped for an absent one", "[toy_lvlm][pairs]") {
    toy::world w(31, {.biased = false});
    for (int i = 0; i < 200; ++i) {
        const toy::scene sc = w.sample_scene();
        const toy::preference_pair p = toy::make_pair(w, sc);
        CHECK(p.chosen == toy::describe(sc));
        CHECK(toy::hallucinations(sc, p.chosen) == 0);
        CHECK(toy::hallucinations(sc, p.rejected) == 1);
        CHECK(std::count_if(p.rejected.begin(), p.rejected.end(), [&](int t) { return p.hallucinated(t); }) == 1);
    }
}

TEST_CASE("the headline rule picks the largest rate whose DPO recall stays within one SFT std", "[toy_lvlm][sweep]") {
    // SFT recall over seeds: mean 0.60, sample std 0.02.
    const std::vector<double> sft = {0.58, 0.60, 0.62};
    // DPO's mean recall per rate: 0.60, 0.61, 0.63 (3 points above: outside), 0.595, 0.50.
    const std::vector<std::vector<double>> dpo = {
        {0.60, 0.60, 0.60}, {0.60, 0.61, 0.62}, {0.62, 0.63, 0.64}, {0.59, 0.595, 0.60}, {0.50, 0.50, 0.50}};
    CHECK(toy::headline_index(dpo, sft) == 3);
    // None within: the smallest rate.
    CHECK(toy::headline_index({{0.3, 0.3, 0.3}, {0.2, 0.2, 0.2}}, sft) == 0);
}

TEST_CASE("a metric at equal KL is interpolated linearly in log KL", "[toy_lvlm][sweep]") {
    // Points (KL, metric) out of order: sorted by KL first.
    const std::vector<std::pair<double, double>> line = {{1e-1, 30.0}, {1e-3, 10.0}, {1e-2, 20.0}};
    CHECK(*toy::at_kl(line, 1e-3) == Approx(10.0));
    CHECK(*toy::at_kl(line, 1e-1) == Approx(30.0));
    // Half-way in log between 1e-3 and 1e-2 is 10^-2.5.
    CHECK(*toy::at_kl(line, std::pow(10.0, -2.5)) == Approx(15.0));
    CHECK(*toy::at_kl(line, std::pow(10.0, -1.25)) == Approx(27.5));
    CHECK(!toy::at_kl(line, 5e-4));
    CHECK(!toy::at_kl(line, 0.2));
    CHECK(!toy::at_kl(line, 0.0));
}
