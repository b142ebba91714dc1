// tpo::torch (tpo/torch.hpp): loss, gradients and metrics against libtorch autograd of the same
// formula written in libtorch ops (docs/formulas.md: log_softmax + gather on clean and noisy
// logits, weights σ(s) + a and 1 − σ(s) + a, additive sequence scores, sigmoid DPO loss), in every
// dtype, then a few
// optimiser steps of a tiny vision-language model trained once through tpo::torch and once through
// the libtorch formula. One translation unit on purpose: libtorch headers are slow to compile.
#include <tpo/torch.hpp>

#include <cmath>
#include <cstdio>
#include <string>

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
torch::Tensor sequence_scores(const torch::Tensor& z, const torch::Tensor& zn, const torch::Tensor& y, bool chosen,
                              double a, bool weighted) {
    const std::int64_t L = z.size(1);
    const torch::Tensor zs = z.slice(1, 0, L - 1);
    const torch::Tensor ys = y.slice(1, 1, L);
    const torch::Tensor mask = ys.ne(ignore_index);
    const torch::Tensor index = ys.masked_fill(mask.logical_not(), 0).unsqueeze(-1);
    torch::Tensor term = torch::log_softmax(zs, -1).gather(-1, index).squeeze(-1);
    if (weighted) {
        const torch::Tensor s = zs.gather(-1, index).squeeze(-1) - zn.slice(1, 0, L - 1).gather(-1, index).squeeze(-1);
        const torch::Tensor c = chosen ? torch::sigmoid(s) + a : 1 - torch::sigmoid(s) + a;
        term = term + torch::log(c);
    }
    return (term * mask.to(z.scalar_type())).sum(-1);
}

torch::Tensor torch_loss(const tpo::libtorch::logits_batch& b, double beta, double a, bool weighted) {
    const torch::Tensor h =
        (sequence_scores(b.policy_chosen, b.policy_chosen_noisy, b.labels_chosen, true, a, weighted) -
         sequence_scores(b.reference_chosen, b.reference_chosen_noisy, b.labels_chosen, true, a, weighted)) -
        (sequence_scores(b.policy_rejected, b.policy_rejected_noisy, b.labels_rejected, false, a, weighted) -
         sequence_scores(b.reference_rejected, b.reference_rejected_noisy, b.labels_rejected, false, a, weighted));
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
