// tpo::torch (tpo/torch.hpp): loss, gradients and metrics against libtorch autograd of the same
// formula written in libtorch ops (docs/formulas.md: log_softmax + gather on clean and noisy
// logits, weights σ(s) + a and 1 − σ(s) + a, additive sequence scores, sigmoid DPO loss), in every
// dtype, then a few
// optimiser steps of a tiny vision-language model trained once through tpo::torch and once through
// the libtorch formula. The same for hidden states and the lm_head in (hidden_batch), against
// torch::linear and the logit transform in libtorch ops before that formula; and bad input.
// One translation unit on purpose: libtorch headers are slow to compile.
#include <tpo/torch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
    std::printf("%s %s\n", ok ? "ok    " : "FAILED", what.c_str());
    if (!ok) ++failures;
}

// max |a − b| ≤ tol · max |b|: relative to the tensor's scale, so entries that are tiny compared
// with the rest (most of a softmax) do not demand more than the arithmetic can give.
void expect_close(const torch::Tensor& got, const torch::Tensor& want, double tol, const std::string& what) {
    const double scale = want.abs().max().item<double>();
    const double diff = (got.to(torch::kDouble) - want.to(torch::kDouble)).abs().max().item<double>();
    char line[256];
    std::snprintf(line, sizeof line, "%s: max |diff| %.3g, scale %.3g, relative %.3g (tol %.0e)", what.c_str(), diff,
                  scale, scale > 0 ? diff / scale : diff, tol);
    expect(scale > 0 && diff <= tol * scale, line);
}

constexpr std::int64_t ignore_index = -100;

// A(y) = Σ_t m_t (ℓ_t + log c_t) with the causal shift; c ≡ 1 when `weighted` is false (DPO).
// The visual score s = g(z)_y − g(z̃)_y, g the identity, softmax or log_softmax (docs/formulas.md).
torch::Tensor sequence_scores(const torch::Tensor& z, const torch::Tensor& zn, const torch::Tensor& y, bool chosen,
                              double a, bool weighted, tpo::score_kind score = tpo::score_kind::logit) {
    const std::int64_t L = z.size(1);
    const torch::Tensor zs = z.slice(1, 0, L - 1);
    const torch::Tensor ys = y.slice(1, 1, L);
    const torch::Tensor mask = ys.ne(ignore_index);
    const torch::Tensor index = ys.masked_fill(mask.logical_not(), 0).unsqueeze(-1);
    torch::Tensor term = torch::log_softmax(zs, -1).gather(-1, index).squeeze(-1);
    if (weighted) {
        auto g = [&](const torch::Tensor& x) {
            switch (score) {
            case tpo::score_kind::prob: return torch::softmax(x, -1);
            case tpo::score_kind::logprob: return torch::log_softmax(x, -1);
            default: return x;
            }
        };
        const torch::Tensor s =
            g(zs).gather(-1, index).squeeze(-1) - g(zn.slice(1, 0, L - 1)).gather(-1, index).squeeze(-1);
        const torch::Tensor c = chosen ? torch::sigmoid(s) + a : 1 - torch::sigmoid(s) + a;
        term = term + torch::log(c);
    }
    return (term * mask.to(z.scalar_type())).sum(-1);
}

torch::Tensor torch_loss(const tpo::libtorch::logits_batch& b, double beta, double a, bool weighted,
                         tpo::score_kind score = tpo::score_kind::logit) {
    auto scores = [&](const torch::Tensor& z, const torch::Tensor& zn, const torch::Tensor& y, bool chosen) {
        return sequence_scores(z, zn, y, chosen, a, weighted, score);
    };
    const torch::Tensor h =
        (scores(b.policy_chosen, b.policy_chosen_noisy, b.labels_chosen, true) -
         scores(b.reference_chosen, b.reference_chosen_noisy, b.labels_chosen, true)) -
        (scores(b.policy_rejected, b.policy_rejected_noisy, b.labels_rejected, false) -
         scores(b.reference_rejected, b.reference_rejected_noisy, b.labels_rejected, false));
    return -torch::log_sigmoid(beta * h).mean();
}

torch::Tensor random_labels(std::int64_t P, std::int64_t L, std::int64_t V, std::int64_t prompt) {
    torch::Tensor y = torch::randint(V, {P, L}, torch::kLong);
    y.slice(1, 0, prompt).fill_(ignore_index);  // prompt and image tokens are not scored
    y.index_put_({P - 1, L - 1}, ignore_index);  // padding at the end of one sequence
    return y;
}

tpo::libtorch::logits_batch random_batch(torch::ScalarType dtype, bool policy_grad) {
    const std::int64_t P = 3, Lw = 7, Ll = 5, V = 50;
    auto logits = [&](std::int64_t L) { return (2 * torch::randn({P, L, V}, torch::kDouble)).to(dtype); };
    auto noisy = [&](const torch::Tensor& z) { return z + (0.7 * torch::randn(z.sizes(), torch::kDouble)).to(dtype); };
    tpo::libtorch::logits_batch b;
    b.policy_chosen = logits(Lw), b.policy_rejected = logits(Ll);
    b.policy_chosen_noisy = noisy(b.policy_chosen), b.policy_rejected_noisy = noisy(b.policy_rejected);
    b.reference_chosen = b.policy_chosen + 0.5 * torch::randn({P, Lw, V}, torch::kDouble).to(dtype);
    b.reference_rejected = b.policy_rejected + 0.5 * torch::randn({P, Ll, V}, torch::kDouble).to(dtype);
    b.reference_chosen_noisy = noisy(b.reference_chosen), b.reference_rejected_noisy = noisy(b.reference_rejected);
    b.labels_chosen = random_labels(P, Lw, V, 2), b.labels_rejected = random_labels(P, Ll, V, 2);
    for (torch::Tensor* t : {&b.policy_chosen, &b.policy_chosen_noisy, &b.policy_rejected, &b.policy_rejected_noisy})
        t->set_requires_grad(policy_grad);
    return b;
}

std::string dtype_name(torch::ScalarType t) {
    switch (t) {
    case torch::kFloat: return "fp32";
    case torch::kDouble: return "fp64";
    case torch::kBFloat16: return "bf16";
    case torch::kHalf: return "fp16";
    default: return "?";
    }
}

// The libtorch formula runs in float64 on the very values tpo reads (the dtype's own numbers,
// widened), so the comparison measures tpo's arithmetic and the rounding of its outputs only.
void compare_with_autograd(torch::ScalarType dtype, double tol, bool weighted) {
    const std::string name = std::string(weighted ? "TPO " : "DPO ") + dtype_name(dtype);
    tpo::libtorch::logits_batch b = random_batch(dtype, true);
    if (!weighted)
        for (torch::Tensor* t : {&b.policy_chosen_noisy, &b.policy_rejected_noisy, &b.reference_chosen_noisy,
                                 &b.reference_rejected_noisy})
            *t = torch::Tensor();
    tpo::objective_options options;  // TPO, sigmoid loss, β = 0.1, a = 0.5, logit score, additive
    if (!weighted) options.weighting = tpo::token_weighting::none;

    const auto [mine, metrics] = tpo::libtorch::preference_loss(b, options);
    // A non-unit upstream gradient checks that backward scales by it.
    (3 * mine).backward();
    const std::vector<torch::Tensor> my_grads{b.policy_chosen.grad().clone(), b.policy_rejected.grad().clone()};
    const std::vector<torch::Tensor> my_noisy_grads =
        weighted ? std::vector<torch::Tensor>{b.policy_chosen_noisy.grad().clone(), b.policy_rejected_noisy.grad().clone()}
                 : std::vector<torch::Tensor>{};

    tpo::libtorch::logits_batch wide = b;
    for (torch::Tensor* t : {&wide.policy_chosen, &wide.policy_chosen_noisy, &wide.policy_rejected,
                             &wide.policy_rejected_noisy, &wide.reference_chosen, &wide.reference_chosen_noisy,
                             &wide.reference_rejected, &wide.reference_rejected_noisy})
        if (t->defined()) *t = t->detach().to(torch::kDouble).requires_grad_(t == &wide.policy_chosen ||
                                                                           t == &wide.policy_chosen_noisy ||
                                                                           t == &wide.policy_rejected ||
                                                                           t == &wide.policy_rejected_noisy);
    const torch::Tensor theirs = torch_loss(wide, options.hyper.beta, options.a, weighted);
    (3 * theirs).backward();
    expect(mine.scalar_type() == dtype, name + ": loss has the logits' dtype");
    const double rel = std::abs(mine.item<double>() - theirs.item<double>()) / std::abs(theirs.item<double>());
    char line[200];
    std::snprintf(line, sizeof line, "%s loss: tpo %.17g, libtorch %.17g, relative %.3g (tol %.0e)", name.c_str(),
                  mine.item<double>(), theirs.item<double>(), rel, tol);
    expect(rel <= tol, line);
    expect(my_grads[0].scalar_type() == dtype, name + ": gradients have the logits' dtype");
    expect_close(my_grads[0], wide.policy_chosen.grad(), tol, name + " d/d policy_chosen");
    expect_close(my_grads[1], wide.policy_rejected.grad(), tol, name + " d/d policy_rejected");
    if (weighted) {
        expect_close(my_noisy_grads[0], wide.policy_chosen_noisy.grad(), tol, name + " d/d policy_chosen_noisy");
        expect_close(my_noisy_grads[1], wide.policy_rejected_noisy.grad(), tol, name + " d/d policy_rejected_noisy");
    }

    // The metrics: the rewards β(A_θ − A_ref) of the formula, and the device-side scalars equal
    // to what read() reports.
    const tpo::objective_result& r = metrics.read();
    torch::NoGradGuard no_grad;
    const torch::Tensor chosen_rewards =
        options.hyper.beta *
        (sequence_scores(wide.policy_chosen, wide.policy_chosen_noisy, wide.labels_chosen, true, options.a, weighted) -
         sequence_scores(wide.reference_chosen, wide.reference_chosen_noisy, wide.labels_chosen, true, options.a,
                         weighted));
    expect_close(torch::tensor(r.chosen_rewards, torch::kDouble), chosen_rewards, tol, name + " chosen rewards");
    expect(std::abs(r.loss - theirs.item<double>()) <= tol * std::abs(theirs.item<double>()),
           name + ": metrics.read().loss is the loss");
    expect(metrics.loss().item<double>() == r.loss && metrics.reward_accuracy().item<double>() == r.reward_accuracy &&
               metrics.reward_margin().item<double>() == r.reward_margin,
           name + ": loss/accuracy/margin tensors equal read()");
}

// Options, input forms and autograd behaviour around the same batch.
void behaviour() {
    tpo::libtorch::logits_batch b = random_batch(torch::kFloat, true);
    const tpo::objective_options options;
    const auto first = tpo::libtorch::preference_loss(b, options);
    first.loss.backward();
    const torch::Tensor g = b.policy_chosen.grad().clone();
    const tpo::objective_result& r = first.metrics.read();

    // The reference as the sequence scores reported: same loss and gradients, bit for bit.
    {
        tpo::libtorch::logits_batch s = b;
        for (torch::Tensor* t : {&s.reference_chosen, &s.reference_chosen_noisy, &s.reference_rejected, &s.reference_rejected_noisy})
            *t = torch::Tensor();
        s.reference_chosen_scores = torch::tensor(r.reference_chosen_scores, torch::kDouble);
        s.reference_rejected_scores = torch::tensor(r.reference_rejected_scores, torch::kDouble);
        s.policy_chosen.mutable_grad() = torch::Tensor();
        const auto with_scores = tpo::libtorch::preference_loss(s, options);
        with_scores.loss.backward();
        expect(with_scores.loss.item<float>() == first.loss.item<float>() && torch::equal(s.policy_chosen.grad(), g),
               "reference as precomputed scores: same loss and gradients, bit for bit");
    }
    // Non-contiguous logits and int32 labels: the same numbers.
    {
        tpo::libtorch::logits_batch t = b;
        t.policy_chosen = b.policy_chosen.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(true);
        t.labels_chosen = b.labels_chosen.to(torch::kInt);
        t.labels_rejected = b.labels_rejected.to(torch::kInt);
        expect(!t.policy_chosen.is_contiguous(), "the transposed copy is not contiguous");
        const auto other = tpo::libtorch::preference_loss(t, options);
        other.loss.backward();
        expect(other.loss.item<float>() == first.loss.item<float>() && torch::equal(t.policy_chosen.grad(), g),
               "non-contiguous logits, int32 labels: same loss and gradients");
    }
    // No policy tensor requires grad: no gradient is computed, the loss has no grad_fn.
    {
        tpo::libtorch::logits_batch n = random_batch(torch::kFloat, false);
        const auto frozen = tpo::libtorch::preference_loss(n, options);
        expect(!frozen.loss.requires_grad(), "no policy tensor requires grad: the loss does not either");
    }
    // Plain DPO with the noisy logits given anyway: the loss does not depend on them, and no
    // gradient flows into them.
    {
        tpo::libtorch::logits_batch n = random_batch(torch::kFloat, true);
        tpo::objective_options dpo;
        dpo.weighting = tpo::token_weighting::none;
        const auto plain = tpo::libtorch::preference_loss(n, dpo);
        plain.loss.backward();
        expect(n.policy_chosen.grad().defined() && !n.policy_chosen_noisy.grad().defined() &&
                   !n.policy_rejected_noisy.grad().defined(),
               "DPO with noisy logits given: no gradient flows into them");
    }
    // A second backward through a retained graph gives the same gradients again.
    {
        tpo::libtorch::logits_batch d = random_batch(torch::kDouble, true);
        const auto twice = tpo::libtorch::preference_loss(d, options);
        (2 * twice.loss).backward({}, /*retain_graph=*/true);
        const torch::Tensor once = d.policy_rejected.grad().clone();
        (2 * twice.loss).backward();
        expect(torch::allclose(d.policy_rejected.grad(), 2 * once, 0, 0), "retain_graph: the second backward adds the same gradient");
    }
}

// A tiny LVLM: token embedding plus a projected image feature, tanh, then the vocabulary head.
struct tiny_lvlm : torch::nn::Module {
    torch::nn::Embedding embed{nullptr};
    torch::nn::Linear vision{nullptr}, head{nullptr};
    tiny_lvlm(std::int64_t vocab, std::int64_t width, std::int64_t features) {
        embed = register_module("embed", torch::nn::Embedding(vocab, width));
        vision = register_module("vision", torch::nn::Linear(features, width));
        head = register_module("head", torch::nn::Linear(width, vocab));
    }
    torch::Tensor forward(const torch::Tensor& tokens, const torch::Tensor& image) {
        return head(torch::tanh(embed(tokens) + vision(image).unsqueeze(1)));
    }
};

void copy_parameters(tiny_lvlm& to, tiny_lvlm& from) {
    torch::NoGradGuard no_grad;
    auto dst = to.parameters(), src = from.parameters();
    for (std::size_t i = 0; i < dst.size(); ++i) dst[i].copy_(src[i]);
}

void training_agrees() {
    const std::int64_t P = 4, L = 6, V = 40, D = 16, F = 12;
    torch::manual_seed(7);
    tiny_lvlm via_tpo(V, D, F), via_torch(V, D, F), reference(V, D, F);
    via_tpo.to(torch::kDouble), via_torch.to(torch::kDouble), reference.to(torch::kDouble);
    copy_parameters(via_torch, via_tpo);
    copy_parameters(reference, via_tpo);
    for (auto& p : reference.parameters()) p.set_requires_grad(false);

    const torch::Tensor yw = random_labels(P, L, V, 1), yl = random_labels(P, L, V, 1);
    // The model reads the label stream as its input tokens (teacher forcing); unscored slots read token 0.
    const torch::Tensor tw = yw.clamp_min(0), tl = yl.clamp_min(0);
    const torch::Tensor image = torch::rand({P, F}, torch::kDouble);
    // The noisy image through tpo's own corruptor, the official one (sigmoid schedule, k = 500).
    torch::Tensor noisy_image = torch::empty_like(image);
    {
        tpo::backend::reference backend;
        tpo::add_diffusion_noise(backend, tpo::image_view<const double>::nchw(image.data_ptr<double>(), P, 1, 1, F),
                                 tpo::image_view<double>::nchw(noisy_image.data_ptr<double>(), P, 1, 1, F),
                                 tpo::diffusion_options{});
    }
    expect((noisy_image - image).abs().max().item<double>() > 0.05, "diffusion noise changed the image");

    torch::optim::Adam opt_tpo(via_tpo.parameters(), torch::optim::AdamOptions(1e-2));
    torch::optim::Adam opt_torch(via_torch.parameters(), torch::optim::AdamOptions(1e-2));
    const tpo::objective_options options;
    double first = 0, last = 0;
    for (int step = 0; step < 5; ++step) {
        auto reference_batch = [&] {
            torch::NoGradGuard no_grad;
            tpo::libtorch::logits_batch b;
            b.reference_chosen = reference.forward(tw, image), b.reference_chosen_noisy = reference.forward(tw, noisy_image);
            b.reference_rejected = reference.forward(tl, image);
            b.reference_rejected_noisy = reference.forward(tl, noisy_image);
            b.labels_chosen = yw, b.labels_rejected = yl;
            return b;
        };
        tpo::libtorch::logits_batch a = reference_batch(), b = reference_batch();
        a.policy_chosen = via_tpo.forward(tw, image), a.policy_chosen_noisy = via_tpo.forward(tw, noisy_image);
        a.policy_rejected = via_tpo.forward(tl, image), a.policy_rejected_noisy = via_tpo.forward(tl, noisy_image);
        b.policy_chosen = via_torch.forward(tw, image), b.policy_chosen_noisy = via_torch.forward(tw, noisy_image);
        b.policy_rejected = via_torch.forward(tl, image);
        b.policy_rejected_noisy = via_torch.forward(tl, noisy_image);

        opt_tpo.zero_grad(), opt_torch.zero_grad();
        const torch::Tensor loss_tpo = tpo::libtorch::preference_loss(a, options).loss;
        const torch::Tensor loss_torch = torch_loss(b, options.hyper.beta, options.a, true);
        loss_tpo.backward(), loss_torch.backward();
        opt_tpo.step(), opt_torch.step();

        const double lt = loss_tpo.item<double>(), lr = loss_torch.item<double>();
        char line[160];
        std::snprintf(line, sizeof line, "training step %d: loss tpo %.15f, libtorch %.15f", step, lt, lr);
        expect(std::abs(lt - lr) <= 1e-12 * std::abs(lr), line);
        if (step == 0) {
            // The policy starts as the reference: h = 0, the loss is ln 2 exactly (docs/formulas.md#numerics).
            expect(lt == std::log(2.0), "step 0: tpo's loss is exactly ln 2 with policy == reference");
            first = lt;
        }
        last = lt;
    }
    expect(last < first, "five Adam steps lowered the loss");
    auto pa = via_tpo.parameters(), pb = via_torch.parameters();
    double worst = 0;
    for (std::size_t i = 0; i < pa.size(); ++i)
        worst = std::max(worst, ((pa[i] - pb[i]).abs().max() / pb[i].abs().max()).item<double>());
    char line[120];
    std::snprintf(line, sizeof line, "parameters after 5 steps agree: worst relative difference %.3g (tol 1e-10)",
                  worst);
    expect(worst <= 1e-10, line);
}

// Hidden states and the lm_head (tpo::libtorch::hidden_batch): against libtorch autograd of
// torch::linear(h, W, b), the logit transform in libtorch ops (z = c·tanh(s·u/c)/τ, or s·u/τ; docs/formulas.md#logit-transform),
// then torch_loss above on those logits.
torch::Tensor head_logits(const torch::Tensor& h, const torch::Tensor& weight, const torch::Tensor& bias,
                          const tpo::objective_options& o) {
    if (!h.defined()) return {};
    torch::Tensor u = torch::linear(h, weight, bias) * o.logit_scale;
    if (o.logit_softcap) u = *o.logit_softcap * torch::tanh(u / *o.logit_softcap);
    return u / o.temperature;
}

tpo::libtorch::logits_batch as_logits(const tpo::libtorch::hidden_batch& b, const tpo::objective_options& o) {
    tpo::libtorch::logits_batch z;
    z.policy_chosen = head_logits(b.policy_hidden_chosen, b.lm_head_weight, b.lm_head_bias, o);
    z.policy_chosen_noisy = head_logits(b.policy_hidden_chosen_noisy, b.lm_head_weight, b.lm_head_bias, o);
    z.policy_rejected = head_logits(b.policy_hidden_rejected, b.lm_head_weight, b.lm_head_bias, o);
    z.policy_rejected_noisy = head_logits(b.policy_hidden_rejected_noisy, b.lm_head_weight, b.lm_head_bias, o);
    const torch::Tensor& rw = b.reference_lm_head_weight;
    const torch::Tensor& rb = b.reference_lm_head_bias;
    z.reference_chosen = head_logits(b.reference_hidden_chosen, rw, rb, o);
    z.reference_chosen_noisy = head_logits(b.reference_hidden_chosen_noisy, rw, rb, o);
    z.reference_rejected = head_logits(b.reference_hidden_rejected, rw, rb, o);
    z.reference_rejected_noisy = head_logits(b.reference_hidden_rejected_noisy, rw, rb, o);
    z.labels_chosen = b.labels_chosen, z.labels_rejected = b.labels_rejected;
    return z;
}

std::vector<torch::Tensor*> policy_leaves(tpo::libtorch::hidden_batch& b) {
    return {&b.policy_hidden_chosen, &b.policy_hidden_chosen_noisy, &b.policy_hidden_rejected,
            &b.policy_hidden_rejected_noisy, &b.lm_head_weight, &b.lm_head_bias};
}

// P = 3 pairs, chosen 7 and rejected 5 positions, H = 12, V = 50; the reference a perturbed copy
// of the policy with its own head. Scaled so that the logits spread over a few units.
tpo::libtorch::hidden_batch random_hidden_batch(torch::ScalarType dtype, bool bias, bool grad) {
    const std::int64_t P = 3, Lw = 7, Ll = 5, H = 12, V = 50;
    auto draw = [&](torch::IntArrayRef shape, double scale) { return (scale * torch::randn(shape, torch::kDouble)).to(dtype); };
    auto noisy = [&](const torch::Tensor& h) { return h + draw(h.sizes(), 0.3); };
    tpo::libtorch::hidden_batch b;
    b.policy_hidden_chosen = draw({P, Lw, H}, 1), b.policy_hidden_rejected = draw({P, Ll, H}, 1);
    b.policy_hidden_chosen_noisy = noisy(b.policy_hidden_chosen);
    b.policy_hidden_rejected_noisy = noisy(b.policy_hidden_rejected);
    b.lm_head_weight = draw({V, H}, 0.6);
    b.reference_hidden_chosen = b.policy_hidden_chosen + draw({P, Lw, H}, 0.2);
    b.reference_hidden_rejected = b.policy_hidden_rejected + draw({P, Ll, H}, 0.2);
    b.reference_hidden_chosen_noisy = noisy(b.reference_hidden_chosen);
    b.reference_hidden_rejected_noisy = noisy(b.reference_hidden_rejected);
    b.reference_lm_head_weight = b.lm_head_weight + draw({V, H}, 0.1);
    if (bias) b.lm_head_bias = draw({V}, 0.5), b.reference_lm_head_bias = b.lm_head_bias + draw({V}, 0.1);
    b.labels_chosen = random_labels(P, Lw, V, 2), b.labels_rejected = random_labels(P, Ll, V, 2);
    for (torch::Tensor* t : policy_leaves(b))
        if (t->defined()) t->set_requires_grad(grad);
    return b;
}

struct hidden_case {
    bool weighted = true;
    tpo::score_kind score = tpo::score_kind::logit;
    bool bias = true;
    bool transform = false;  // logit_scale 1.7, softcap 3, temperature 0.8
};

void compare_hidden_with_autograd(torch::ScalarType dtype, double tol, const hidden_case& c) {
    const char* const score_names[] = {"logit", "prob", "logprob"};  // tpo::score_kind's order
    const std::string name = std::string("hidden ") + (c.weighted ? "TPO " : "DPO ") +
                             (c.weighted ? std::string(score_names[static_cast<int>(c.score)]) + " " : "") +
                             (c.bias ? "bias " : "no-bias ") + (c.transform ? "transform " : "") + dtype_name(dtype);
    tpo::libtorch::hidden_batch b = random_hidden_batch(dtype, c.bias, true);
    if (!c.weighted)
        for (torch::Tensor* t : {&b.policy_hidden_chosen_noisy, &b.policy_hidden_rejected_noisy,
                                 &b.reference_hidden_chosen_noisy, &b.reference_hidden_rejected_noisy})
            *t = torch::Tensor();
    tpo::objective_options options;
    options.score = c.score;
    if (!c.weighted) options.weighting = tpo::token_weighting::none;
    if (c.transform) options.logit_scale = 1.7, options.logit_softcap = 3.0, options.temperature = 0.8;

    const auto [mine, metrics] = tpo::libtorch::preference_loss(b, options);
    (3 * mine).backward();

    tpo::libtorch::hidden_batch wide = b;
    const std::vector<torch::Tensor*> leaves = policy_leaves(wide);
    for (torch::Tensor* t : {&wide.policy_hidden_chosen, &wide.policy_hidden_chosen_noisy, &wide.policy_hidden_rejected,
                             &wide.policy_hidden_rejected_noisy, &wide.lm_head_weight, &wide.lm_head_bias,
                             &wide.reference_hidden_chosen, &wide.reference_hidden_chosen_noisy,
                             &wide.reference_hidden_rejected, &wide.reference_hidden_rejected_noisy,
                             &wide.reference_lm_head_weight, &wide.reference_lm_head_bias})
        if (t->defined())
            *t = t->detach().to(torch::kDouble).requires_grad_(std::find(leaves.begin(), leaves.end(), t) !=
                                                                leaves.end());
    const torch::Tensor theirs =
        torch_loss(as_logits(wide, options), options.hyper.beta, options.a, c.weighted, c.score);
    (3 * theirs).backward();

    expect(mine.scalar_type() == dtype, name + ": loss has the hidden states' dtype");
    const double rel = std::abs(mine.item<double>() - theirs.item<double>()) / std::abs(theirs.item<double>());
    char line[240];
    std::snprintf(line, sizeof line, "%s loss: tpo %.17g, libtorch %.17g, relative %.3g (tol %.0e)", name.c_str(),
                  mine.item<double>(), theirs.item<double>(), rel, tol);
    expect(rel <= tol, line);
    const char* names[] = {"policy_hidden_chosen", "policy_hidden_chosen_noisy", "policy_hidden_rejected",
                           "policy_hidden_rejected_noisy", "lm_head_weight", "lm_head_bias"};
    const std::vector<torch::Tensor*> mine_leaves = policy_leaves(b);
    for (std::size_t k = 0; k < leaves.size(); ++k) {
        if (!leaves[k]->defined()) {
            expect(!mine_leaves[k]->defined(), name + ": no " + names[k]);
            continue;
        }
        const torch::Tensor& g = mine_leaves[k]->grad();
        if (!g.defined()) {
            expect(false, name + " d/d " + names[k] + ": no gradient");
            continue;
        }
        expect(g.scalar_type() == dtype, name + " d/d " + names[k] + " has the dtype");
        expect_close(g, leaves[k]->grad(), tol, name + " d/d " + names[k]);
    }
    const tpo::objective_result& r = metrics.read();
    expect(std::abs(r.loss - theirs.item<double>()) <= tol * std::abs(theirs.item<double>()) &&
               metrics.loss().item<double>() == r.loss,
           name + ": metrics.read().loss and metrics.loss() are the loss");
}

// Input forms and autograd behaviour of the hidden-state kind.
void hidden_behaviour() {
    const tpo::objective_options options;
    tpo::libtorch::hidden_batch b = random_hidden_batch(torch::kDouble, true, true);
    const auto first = tpo::libtorch::preference_loss(b, options);
    first.loss.backward();
    const tpo::objective_result& r = first.metrics.read();
    auto grads_of = [](tpo::libtorch::hidden_batch& x) {
        std::vector<torch::Tensor> g;
        for (torch::Tensor* t : policy_leaves(x))
            g.push_back(t->grad().defined() ? t->grad().clone() : torch::Tensor());
        return g;
    };
    auto fresh = [](const tpo::libtorch::hidden_batch& x, bool grad) {
        tpo::libtorch::hidden_batch y = x;
        for (torch::Tensor* t : policy_leaves(y))
            if (t->defined()) *t = t->detach().clone().requires_grad_(grad);
        return y;
    };
    auto equal = [](const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& c) {
        for (std::size_t k = 0; k < a.size(); ++k)
            if (a[k].defined() != c[k].defined() || (a[k].defined() && !torch::equal(a[k], c[k]))) return false;
        return true;
    };
    const std::vector<torch::Tensor> g = grads_of(b);

    // The reference as the sequence scores reported: same loss and gradients, bit for bit.
    {
        tpo::libtorch::hidden_batch s = fresh(b, true);
        for (torch::Tensor* t : {&s.reference_hidden_chosen, &s.reference_hidden_chosen_noisy,
                                 &s.reference_hidden_rejected, &s.reference_hidden_rejected_noisy,
                                 &s.reference_lm_head_weight, &s.reference_lm_head_bias})
            *t = torch::Tensor();
        s.reference_chosen_scores = torch::tensor(r.reference_chosen_scores, torch::kDouble);
        s.reference_rejected_scores = torch::tensor(r.reference_rejected_scores, torch::kDouble);
        const auto with_scores = tpo::libtorch::preference_loss(s, options);
        with_scores.loss.backward();
        expect(with_scores.loss.item<double>() == first.loss.item<double>() && equal(grads_of(s), g),
               "hidden, reference as precomputed scores: same loss and gradients, bit for bit");
    }
    // Only the head trains (the hidden states are constants): the head's gradients are the same.
    {
        tpo::libtorch::hidden_batch h = fresh(b, false);
        h.lm_head_weight.requires_grad_(true), h.lm_head_bias.requires_grad_(true);
        const auto head_only = tpo::libtorch::preference_loss(h, options);
        head_only.loss.backward();
        expect(!h.policy_hidden_chosen.grad().defined() && torch::equal(h.lm_head_weight.grad(), g[4]) &&
                   torch::equal(h.lm_head_bias.grad(), g[5]),
               "hidden, only the head requires grad: its gradients alone, the same bit for bit");
    }
    // Non-contiguous hidden states, int32 labels, a few tokens per chunk: the same numbers.
    {
        tpo::libtorch::hidden_batch t = fresh(b, true);
        t.policy_hidden_chosen =
            b.policy_hidden_chosen.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(true);
        t.labels_chosen = b.labels_chosen.to(torch::kInt), t.labels_rejected = b.labels_rejected.to(torch::kInt);
        tpo::objective_options chunked = options;
        chunked.chunk_tokens = 2;
        const auto other = tpo::libtorch::preference_loss(t, chunked);
        other.loss.backward();
        const std::vector<torch::Tensor> o = grads_of(t);
        double worst =
            std::abs(other.loss.item<double>() - first.loss.item<double>()) / std::abs(first.loss.item<double>());
        for (std::size_t k = 0; k < g.size(); ++k)
            worst = std::max(worst, ((o[k] - g[k]).abs().max() / g[k].abs().max()).item<double>());
        char line[200];
        std::snprintf(line, sizeof line, "hidden, non-contiguous states, int32 labels, 2 tokens per chunk: same loss "
                      "and gradients (worst relative %.3g, tol 1e-13)", worst);
        expect(!t.policy_hidden_chosen.is_contiguous() && worst <= 1e-13, line);
    }
    // Nothing requires grad: no gradient is computed, the loss has no grad_fn.
    {
        tpo::libtorch::hidden_batch n = fresh(b, false);
        const auto frozen = tpo::libtorch::preference_loss(n, options);
        expect(!frozen.loss.requires_grad() && frozen.loss.item<double>() == first.loss.item<double>(),
               "hidden, nothing requires grad: the same loss, which does not require grad");
    }
    // Plain DPO with the noisy states given anyway: no gradient flows into them.
    {
        tpo::libtorch::hidden_batch n = fresh(b, true);
        tpo::objective_options dpo;
        dpo.weighting = tpo::token_weighting::none;
        tpo::libtorch::preference_loss(n, dpo).loss.backward();
        expect(n.policy_hidden_chosen.grad().defined() && n.lm_head_weight.grad().defined() &&
                   !n.policy_hidden_chosen_noisy.grad().defined() && !n.policy_hidden_rejected_noisy.grad().defined(),
               "hidden, DPO with noisy states given: no gradient flows into them");
    }
    // A second backward through a retained graph adds the same gradients again.
    {
        tpo::libtorch::hidden_batch d = fresh(b, true);
        const auto twice = tpo::libtorch::preference_loss(d, options);
        (2 * twice.loss).backward({}, /*retain_graph=*/true);
        const torch::Tensor once = d.lm_head_weight.grad().clone();
        (2 * twice.loss).backward();
        expect(torch::allclose(d.lm_head_weight.grad(), 2 * once, 0, 0),
               "hidden, retain_graph: the second backward adds the same gradient");
    }
}

// A tiny LVLM trained through its last hidden states and lm_head (tpo's fused path) and through
// its logits and the libtorch formula: the same parameters after five Adam steps.
void hidden_training_agrees() {
    const std::int64_t P = 4, L = 6, V = 40, D = 16, F = 12;
    torch::manual_seed(11);
    tiny_lvlm via_tpo(V, D, F), via_torch(V, D, F), reference(V, D, F);
    via_tpo.to(torch::kDouble), via_torch.to(torch::kDouble), reference.to(torch::kDouble);
    copy_parameters(via_torch, via_tpo);
    for (auto& p : reference.parameters()) p.set_requires_grad(false);
    const torch::Tensor yw = random_labels(P, L, V, 1), yl = random_labels(P, L, V, 1);
    const torch::Tensor tw = yw.clamp_min(0), tl = yl.clamp_min(0);
    const torch::Tensor image = torch::rand({P, F}, torch::kDouble);
    const torch::Tensor noisy_image = image + 0.5 * torch::randn({P, F}, torch::kDouble);
    auto hidden = [](tiny_lvlm& m, const torch::Tensor& t, const torch::Tensor& i) {
        return torch::tanh(m.embed(t) + m.vision(i).unsqueeze(1));
    };
    torch::optim::Adam opt_tpo(via_tpo.parameters(), torch::optim::AdamOptions(1e-2));
    torch::optim::Adam opt_torch(via_torch.parameters(), torch::optim::AdamOptions(1e-2));
    const tpo::objective_options options;
    double worst_loss = 0;
    for (int step = 0; step < 5; ++step) {
        tpo::libtorch::hidden_batch a;
        {
            torch::NoGradGuard no_grad;
            a.reference_hidden_chosen = hidden(reference, tw, image);
            a.reference_hidden_chosen_noisy = hidden(reference, tw, noisy_image);
            a.reference_hidden_rejected = hidden(reference, tl, image);
            a.reference_hidden_rejected_noisy = hidden(reference, tl, noisy_image);
            a.reference_lm_head_weight = reference.head->weight, a.reference_lm_head_bias = reference.head->bias;
        }
        a.policy_hidden_chosen = hidden(via_tpo, tw, image);
        a.policy_hidden_chosen_noisy = hidden(via_tpo, tw, noisy_image);
        a.policy_hidden_rejected = hidden(via_tpo, tl, image);
        a.policy_hidden_rejected_noisy = hidden(via_tpo, tl, noisy_image);
        a.lm_head_weight = via_tpo.head->weight, a.lm_head_bias = via_tpo.head->bias;
        a.labels_chosen = yw, a.labels_rejected = yl;

        tpo::libtorch::logits_batch b;
        {
            torch::NoGradGuard no_grad;
            b.reference_chosen = reference.forward(tw, image);
            b.reference_chosen_noisy = reference.forward(tw, noisy_image);
            b.reference_rejected = reference.forward(tl, image);
            b.reference_rejected_noisy = reference.forward(tl, noisy_image);
        }
        b.policy_chosen = via_torch.forward(tw, image), b.policy_chosen_noisy = via_torch.forward(tw, noisy_image);
        b.policy_rejected = via_torch.forward(tl, image), b.policy_rejected_noisy = via_torch.forward(tl, noisy_image);
        b.labels_chosen = yw, b.labels_rejected = yl;

        opt_tpo.zero_grad(), opt_torch.zero_grad();
        const torch::Tensor loss_tpo = tpo::libtorch::preference_loss(a, options).loss;
        const torch::Tensor loss_torch = torch_loss(b, options.hyper.beta, options.a, true);
        loss_tpo.backward(), loss_torch.backward();
        opt_tpo.step(), opt_torch.step();
        worst_loss = std::max(worst_loss, std::abs(loss_tpo.item<double>() - loss_torch.item<double>()) /
                                              std::abs(loss_torch.item<double>()));
    }
    auto pa = via_tpo.parameters(), pb = via_torch.parameters();
    double worst = 0;
    for (std::size_t i = 0; i < pa.size(); ++i)
        worst = std::max(worst, ((pa[i] - pb[i]).abs().max() / pb[i].abs().max()).item<double>());
    char line[200];
    std::snprintf(line, sizeof line, "hidden states + lm_head, 5 Adam steps: losses agree (worst relative %.3g), "
                  "parameters agree (worst relative %.3g; tol 1e-10)", worst_loss, worst);
    expect(worst_loss <= 1e-12 && worst <= 1e-10, line);
}

// Bad input of the hidden-state kind: an error naming the tensor and what was expected.
void hidden_bad_input() {
    auto expect_error = [](const std::string& what, const std::string& needle, auto&& change) {
        tpo::libtorch::hidden_batch b = random_hidden_batch(torch::kFloat, true, false);
        change(b);
        try {
            tpo::libtorch::preference_loss(b, tpo::objective_options{});
            expect(false, "hidden, " + what + ": raises");
        } catch (const std::exception& e) {
            const std::string message = e.what();
            const std::string first_line = message.substr(0, message.find('\n'));
            expect(message.find(needle) != std::string::npos, "hidden, " + what + ": " + first_line);
        }
    };
    using batch = tpo::libtorch::hidden_batch;
    expect_error("H of the hidden states differs from the head's", "hidden size 13 differs from the lm_head's H = 12",
                 [](batch& b) { b.policy_hidden_rejected = torch::randn({3, 5, 13}); });
    expect_error("H of the reference head differs from its hidden states",
                 "hidden size 12 differs from the reference lm_head's H = 11",
                 [](batch& b) { b.reference_lm_head_weight = torch::randn({50, 11}); });
    expect_error("V of the bias differs from the weight's", "lm_head_bias has shape [49], expected [50]",
                 [](batch& b) { b.lm_head_bias = torch::randn({49}); });
    expect_error("V of the reference bias differs", "reference_lm_head_bias has shape [51], expected [50]",
                 [](batch& b) { b.reference_lm_head_bias = torch::randn({51}); });
    expect_error("V of the reference head differs", "vocabulary differs from the lm_head's V = 50",
                 [](batch& b) {
                     b.reference_lm_head_weight = torch::randn({49, 12});
                     b.reference_lm_head_bias = torch::Tensor();
                 });
    expect_error("the weight in another dtype",
                 "lm_head_weight has dtype Double, expected policy_hidden_chosen's Float",
                 [](batch& b) { b.lm_head_weight = b.lm_head_weight.to(torch::kDouble); });
    expect_error("noisy states in another dtype", "policy_hidden_chosen_noisy has dtype Half",
                 [](batch& b) { b.policy_hidden_chosen_noisy = b.policy_hidden_chosen_noisy.to(torch::kHalf); });
    expect_error("integer hidden states", "policy_hidden_chosen (hidden states) has dtype Int",
                 [](batch& b) { b.policy_hidden_chosen = b.policy_hidden_chosen.to(torch::kInt); });
    expect_error("the weight on another device", "lm_head_weight is on meta, expected cpu",
                 [](batch& b) { b.lm_head_weight = torch::empty({50, 12}, torch::TensorOptions().device(torch::kMeta)); });
    expect_error("the head's weight missing", "lm_head_weight is required",
                 [](batch& b) { b.lm_head_weight = torch::Tensor(); });
    expect_error("a weight that is not a matrix", "lm_head_weight has shape [600], expected 2 dimensions",
                 [](batch& b) { b.lm_head_weight = b.lm_head_weight.flatten(); });
    expect_error("reference states without the reference head", "without reference_lm_head_weight",
                 [](batch& b) {
                     b.reference_lm_head_weight = torch::Tensor();
                     b.reference_lm_head_bias = torch::Tensor();
                 });
    expect_error("a NaN in the weight", "row 7 of the weight holds a NaN",
                 [](batch& b) { b.lm_head_weight.index_put_({7, 3}, std::numeric_limits<float>::quiet_NaN()); });
    expect_error("an infinite hidden state", "chosen policy hidden states at sequence 1, position 4",
                 [](batch& b) {
                     b.policy_hidden_chosen.index_put_({1, 4, 0}, std::numeric_limits<float>::infinity());
                 });
    expect_error("a label out of range", "label 1000",
                 [](batch& b) { b.labels_chosen.index_put_({0, 3}, 1000); });
}

}  // namespace

int main() {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);
    torch::manual_seed(20261127);
    // Tolerances: the arithmetic's (fp32, fp64), or for 16-bit logits two roundings to the dtype
    // (the gradient tpo writes, then its product with the upstream 3 in that dtype, as libtorch's
    // own 16-bit backward multiplies): 2u with u = 2^-8 for bf16 (8 significant bits) and 2^-11
    // for fp16 (11); the loss is rounded once.
    for (bool weighted : {true, false}) {
        compare_with_autograd(torch::kFloat, 1e-6, weighted);
        compare_with_autograd(torch::kDouble, 1e-12, weighted);
        compare_with_autograd(torch::kBFloat16, 2 * 0x1p-8, weighted);
        compare_with_autograd(torch::kHalf, 2 * 0x1p-11, weighted);
    }
    behaviour();
    training_agrees();

    // Hidden states and the lm_head: fp64 at the arithmetic's precision; fp32 where the products
    // H·Wᵀ and the head's gradient sums accumulate in fp32; 16-bit as the logits (two roundings).
    for (bool bias : {true, false}) {
        compare_hidden_with_autograd(torch::kDouble, 1e-12, {.bias = bias});
        compare_hidden_with_autograd(torch::kDouble, 1e-12, {.weighted = false, .bias = bias});
    }
    compare_hidden_with_autograd(torch::kDouble, 1e-12, {.score = tpo::score_kind::prob});
    compare_hidden_with_autograd(torch::kDouble, 1e-12, {.score = tpo::score_kind::logprob, .bias = false});
    compare_hidden_with_autograd(torch::kDouble, 1e-12, {.transform = true});
    compare_hidden_with_autograd(torch::kDouble, 1e-12, {.weighted = false, .transform = true});
    compare_hidden_with_autograd(torch::kDouble, 1e-12, {.score = tpo::score_kind::prob, .transform = true});
    compare_hidden_with_autograd(torch::kFloat, 1e-5, {});
    compare_hidden_with_autograd(torch::kFloat, 1e-5, {.weighted = false, .bias = false});
    compare_hidden_with_autograd(torch::kFloat, 1e-5, {.score = tpo::score_kind::prob, .transform = true});
    compare_hidden_with_autograd(torch::kBFloat16, 2 * 0x1p-8, {.transform = true});
    compare_hidden_with_autograd(torch::kHalf, 2 * 0x1p-11, {});
    hidden_behaviour();
    hidden_training_agrees();
    hidden_bad_input();

    // Bad input reaches the caller as an exception naming what was wrong.
    try {
        tpo::libtorch::logits_batch b = random_batch(torch::kFloat, false);
        b.labels_chosen.index_put_({0, 3}, 1000);
        tpo::libtorch::preference_loss(b, tpo::objective_options{});
        expect(false, "label out of range raises");
    } catch (const std::exception& e) {
        const std::string what = e.what();
        expect(what.find("1000") != std::string::npos, "label out of range raises: " + what.substr(0, what.find('\n')));
    }
    std::printf("%s\n", failures == 0 ? "all checks passed" : "SOME CHECKS FAILED");
    return failures == 0 ? 0 : 1;
}
