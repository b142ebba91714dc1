// tpo::torch on CUDA tensors (needs a CUDA build of libtorch to compile and a GPU to run;
// scripts/device-check runs it where both are present): the same batch on the GPU and on the
// CPU agrees; the forward and backward capture in a CUDA graph (no synchronisation, scratch from
// libtorch's caching allocator) and replay to the same gradients; bad input makes the loss and
// the gradients NaN at once and read() names it, or, with synchronous_errors, the call throws;
// with hidden states and the lm_head in, the GPU agrees with the CPU and bad input throws at once.
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <tpo/torch.hpp>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
    std::printf("%s %s\n", ok ? "ok    " : "FAILED", what.c_str());
    if (!ok) ++failures;
}

double relative(const torch::Tensor& got, const torch::Tensor& want) {
    const torch::Tensor g = got.detach().to(torch::kCPU, torch::kDouble), w = want.detach().to(torch::kCPU, torch::kDouble);
    return ((g - w).abs().max() / w.abs().max()).item<double>();
}

tpo::libtorch::logits_batch random_batch(torch::ScalarType dtype, const torch::Device& device) {
    const std::int64_t P = 3, Lw = 9, Ll = 6, V = 5003;
    auto logits = [&](std::int64_t L) { return (2 * torch::randn({P, L, V}, torch::kDouble)).to(dtype).to(device); };
    auto labels = [&](std::int64_t L) {
        torch::Tensor y = torch::randint(V, {P, L}, torch::kLong);
        y.slice(1, 0, 2).fill_(-100);
        return y.to(device);
    };
    tpo::libtorch::logits_batch b;
    b.policy_chosen = logits(Lw), b.policy_chosen_noisy = logits(Lw), b.reference_chosen = logits(Lw);
    b.reference_chosen_noisy = logits(Lw);
    b.policy_rejected = logits(Ll), b.policy_rejected_noisy = logits(Ll), b.reference_rejected = logits(Ll);
    b.reference_rejected_noisy = logits(Ll);
    b.labels_chosen = labels(Lw), b.labels_rejected = labels(Ll);
    return b;
}

tpo::libtorch::logits_batch on(const tpo::libtorch::logits_batch& b, const torch::Device& device, bool grad) {
    tpo::libtorch::logits_batch c;
    auto move = [&](const torch::Tensor& t) { return t.defined() ? t.detach().to(device) : torch::Tensor(); };
    c.policy_chosen = move(b.policy_chosen), c.policy_chosen_noisy = move(b.policy_chosen_noisy);
    c.policy_rejected = move(b.policy_rejected), c.policy_rejected_noisy = move(b.policy_rejected_noisy);
    c.reference_chosen = move(b.reference_chosen), c.reference_chosen_noisy = move(b.reference_chosen_noisy);
    c.reference_rejected = move(b.reference_rejected), c.reference_rejected_noisy = move(b.reference_rejected_noisy);
    c.labels_chosen = move(b.labels_chosen), c.labels_rejected = move(b.labels_rejected);
    for (torch::Tensor* t : {&c.policy_chosen, &c.policy_chosen_noisy, &c.policy_rejected, &c.policy_rejected_noisy})
        t->requires_grad_(grad);
    return c;
}

void agrees_with_cpu(torch::ScalarType dtype, double tol) {
    const torch::Device gpu(torch::kCUDA, 0);
    const tpo::libtorch::logits_batch source = random_batch(dtype, torch::kCPU);
    tpo::libtorch::logits_batch g = on(source, gpu, true), c = on(source, torch::kCPU, true);
    const tpo::objective_options options;
    const auto on_gpu = tpo::libtorch::preference_loss(g, options);
    const auto on_cpu = tpo::libtorch::preference_loss(c, options);
    (2 * on_gpu.loss).backward();
    (2 * on_cpu.loss).backward();
    const std::string name = std::string(c10::toString(dtype));
    expect(on_gpu.loss.device().is_cuda(), name + ": the loss stays on the GPU");
    expect(std::abs(on_gpu.metrics.read().loss - on_cpu.metrics.read().loss) <= tol * std::abs(on_cpu.metrics.read().loss),
           name + ": loss agrees with the CPU");
    expect(relative(g.policy_chosen.grad(), c.policy_chosen.grad()) <= tol &&
               relative(g.policy_rejected_noisy.grad(), c.policy_rejected_noisy.grad()) <= tol,
           name + ": gradients agree with the CPU");
    expect(on_gpu.metrics.reward_accuracy().device().is_cuda() &&
               on_gpu.metrics.reward_accuracy().item<double>() == on_gpu.metrics.read().reward_accuracy,
           name + ": reward accuracy on the device equals read()");
}

void captures_in_a_graph() {
    const torch::Device gpu(torch::kCUDA, 0);
    const tpo::libtorch::logits_batch source = random_batch(torch::kFloat, torch::kCPU);
    tpo::libtorch::logits_batch eager = on(source, gpu, true), captured = on(source, gpu, true);
    const auto reference = tpo::libtorch::preference_loss(eager, tpo::objective_options{});
    reference.loss.backward();

    // Captured on a side stream, as torch.cuda.graph does; the static inputs are `captured`'s.
    c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool();
    side.synchronize();
    at::cuda::CUDAGraph graph;
    torch::Tensor loss;
    {
        const c10::cuda::CUDAStreamGuard guard(side);
        graph.capture_begin();
        const auto r = tpo::libtorch::preference_loss(captured, tpo::objective_options{});
        loss = r.loss;
        loss.backward();
        graph.capture_end();
    }
    for (torch::Tensor* t : {&captured.policy_chosen, &captured.policy_rejected})
        t->mutable_grad().zero_();
    graph.replay();
    torch::cuda::synchronize();
    expect(loss.item<float>() == reference.loss.item<float>(), "CUDA graph: the replayed loss is the eager one");
    expect(torch::equal(captured.policy_chosen.grad(), eager.policy_chosen.grad()) &&
               torch::equal(captured.policy_rejected.grad(), eager.policy_rejected.grad()),
           "CUDA graph: the replayed gradients are the eager ones, bit for bit");
}

void bad_input() {
    const torch::Device gpu(torch::kCUDA, 0);
    tpo::libtorch::logits_batch b = on(random_batch(torch::kFloat, torch::kCPU), gpu, true);
    b.labels_chosen.index_put_({1, 4}, 7777);
    const auto r = tpo::libtorch::preference_loss(b, tpo::objective_options{});
    r.loss.backward();
    expect(std::isnan(r.loss.item<float>()), "bad label: the loss is NaN at once");
    expect(torch::isnan(b.policy_chosen.grad()).all().item<bool>(), "bad label: the gradients are NaN");
    try {
        r.metrics.read();
        expect(false, "bad label: read() throws");
    } catch (const tpo::value_error& e) {
        expect(std::string(e.what()).find("7777") != std::string::npos, std::string("bad label: read() throws: ") + e.what());
    }
    tpo::libtorch::options synchronous;
    synchronous.synchronous_errors = true;
    try {
        tpo::libtorch::preference_loss(b, synchronous);
        expect(false, "bad label, synchronous_errors: the call throws");
    } catch (const tpo::value_error& e) {
        expect(std::string(e.what()).find("7777") != std::string::npos, "bad label, synchronous_errors: the call throws");
    }
}

// Hidden states and the lm_head: the same batch on the GPU (cuBLAS products, the row kernels) and
// on the CPU; the loss stays on the GPU; bad input throws at once (this kind always waits).
void hidden_agrees_with_cpu(torch::ScalarType dtype, double tol) {
    const torch::Device gpu(torch::kCUDA, 0);
    const std::int64_t P = 3, Lw = 9, Ll = 6, H = 64, V = 5003;
    auto draw = [&](torch::IntArrayRef shape, double scale) { return (scale * torch::randn(shape, torch::kDouble)).to(dtype); };
    auto labels = [&](std::int64_t L) {
        torch::Tensor y = torch::randint(V, {P, L}, torch::kLong);
        y.slice(1, 0, 2).fill_(-100);
        return y;
    };
    tpo::libtorch::hidden_batch source;
    source.policy_hidden_chosen = draw({P, Lw, H}, 1), source.policy_hidden_chosen_noisy = draw({P, Lw, H}, 1);
    source.policy_hidden_rejected = draw({P, Ll, H}, 1), source.policy_hidden_rejected_noisy = draw({P, Ll, H}, 1);
    source.lm_head_weight = draw({V, H}, 0.3), source.lm_head_bias = draw({V}, 0.5);
    source.reference_hidden_chosen = draw({P, Lw, H}, 1), source.reference_hidden_chosen_noisy = draw({P, Lw, H}, 1);
    source.reference_hidden_rejected = draw({P, Ll, H}, 1);
    source.reference_hidden_rejected_noisy = draw({P, Ll, H}, 1);
    source.reference_lm_head_weight = draw({V, H}, 0.3);
    source.labels_chosen = labels(Lw), source.labels_rejected = labels(Ll);
    auto on = [&](const torch::Device& device) {
        tpo::libtorch::hidden_batch c = source;
        for (torch::Tensor* t : {&c.policy_hidden_chosen, &c.policy_hidden_chosen_noisy, &c.policy_hidden_rejected,
                                 &c.policy_hidden_rejected_noisy, &c.lm_head_weight, &c.lm_head_bias,
                                 &c.reference_hidden_chosen, &c.reference_hidden_chosen_noisy,
                                 &c.reference_hidden_rejected, &c.reference_hidden_rejected_noisy,
                                 &c.reference_lm_head_weight, &c.labels_chosen, &c.labels_rejected})
            *t = t->detach().to(device);
        for (torch::Tensor* t : {&c.policy_hidden_chosen, &c.policy_hidden_chosen_noisy, &c.policy_hidden_rejected,
                                 &c.policy_hidden_rejected_noisy, &c.lm_head_weight, &c.lm_head_bias})
            t->requires_grad_(true);
        return c;
    };
    tpo::libtorch::hidden_batch g = on(gpu), c = on(torch::kCPU);
    tpo::objective_options options;
    options.logit_softcap = 4.0;
    const auto on_gpu = tpo::libtorch::preference_loss(g, options);
    const auto on_cpu = tpo::libtorch::preference_loss(c, options);
    (2 * on_gpu.loss).backward();
    (2 * on_cpu.loss).backward();
    const std::string name = std::string("hidden ") + c10::toString(dtype);
    expect(on_gpu.loss.device().is_cuda() && on_gpu.metrics.reward_accuracy().device().is_cuda(),
           name + ": the loss and the metrics are on the GPU");
    expect(std::abs(on_gpu.metrics.read().loss - on_cpu.metrics.read().loss) <= tol * std::abs(on_cpu.metrics.read().loss),
           name + ": loss agrees with the CPU");
    expect(relative(g.policy_hidden_chosen.grad(), c.policy_hidden_chosen.grad()) <= tol &&
               relative(g.policy_hidden_rejected_noisy.grad(), c.policy_hidden_rejected_noisy.grad()) <= tol &&
               relative(g.lm_head_weight.grad(), c.lm_head_weight.grad()) <= tol &&
               relative(g.lm_head_bias.grad(), c.lm_head_bias.grad()) <= tol,
           name + ": gradients of the hidden states, the weight and the bias agree with the CPU");

    tpo::libtorch::hidden_batch bad = on(gpu);
    {
        torch::NoGradGuard no_grad;
        bad.lm_head_weight.index_put_({17, 3}, std::numeric_limits<double>::quiet_NaN());
    }
    try {
        tpo::libtorch::preference_loss(bad, options);
        expect(false, name + ", NaN in the weight: the call throws");
    } catch (const tpo::value_error& e) {
        expect(std::string(e.what()).find("row 17 of the weight") != std::string::npos,
               name + ", NaN in the weight: the call throws: " + e.what());
    }
}

}  // namespace

int main() {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);
    if (!torch::cuda::is_available()) {
        std::puts("FAILED: no CUDA device (this test runs on a GPU: scripts/device-check)");
        return 1;
    }
    torch::manual_seed(3);
    agrees_with_cpu(torch::kFloat, 1e-5);
    agrees_with_cpu(torch::kDouble, 1e-12);
    agrees_with_cpu(torch::kBFloat16, 2 * 0x1p-8);
    agrees_with_cpu(torch::kHalf, 2 * 0x1p-11);
    captures_in_a_graph();
    bad_input();
    hidden_agrees_with_cpu(torch::kFloat, 1e-5);
    hidden_agrees_with_cpu(torch::kDouble, 1e-12);
    hidden_agrees_with_cpu(torch::kBFloat16, 2 * 0x1p-8);
    std::printf("%s\n", failures == 0 ? "all checks passed" : "SOME CHECKS FAILED");
    return failures == 0 ? 0 : 1;
}
