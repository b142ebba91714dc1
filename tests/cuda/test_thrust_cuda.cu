// The Thrust backend on a CUDA GPU against the reference backend on the host: the same random
// batches (copied to the device once), every input element type, row lengths that take the
// warp-per-row and the block-per-row kernels and misaligned rows, forward values and gradients
// at the tolerances of the CPU backends, and unchanged when the reference enters as precomputed
// sequence scores; identical errors for bad input; h = 0 exactly at
// initialisation; device noise within a few ulps of the host's (docs/formulas.md#reproducible-noise). Needs a GPU to run
// (scripts/device-check); CI compiles and links it.

#include <catch2/catch.hpp>

#include <cuda_runtime.h>
#include <thrust/device_vector.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>

#include <tpo/backend/thrust.hpp>
#include <tpo/tpo.hpp>

#include "support/agreement.hpp"
#include "support/batch.hpp"
#include "support/hidden.hpp"

using namespace tpo_test;
using cuda_backend = tpo::backend::thrust<thrust::cuda::tag>;

namespace {

/// A batch's tensors on the device and its views there.
template <class T>
struct device_side {
    thrust::device_vector<T> tensor[4];
    thrust::device_vector<std::int64_t> labels;
    thrust::device_vector<float> weights;
    index_t pairs, length, vocab;

    explicit device_side(const side_data<T>& s) : pairs(s.pairs), length(s.length), vocab(s.vocab) {
        for (int k = 0; k < 4; ++k) tensor[k] = const_cast<side_data<T>&>(s).tensor(k);
        labels = s.labels;
        weights = s.weights;
    }
    tpo::side_batch<T, std::int64_t> batch() {
        auto z = [&](int k) { return tpo::logits_view<const T>(tpo::logits_of(tensor[k], pairs, length, vocab)); };
        return {z(0), z(1), z(2), z(3), tpo::labels_of(labels, pairs, length),
                tpo::token_values_of(weights, pairs, length)};
    }
};

template <class T>
struct device_batch {
    device_side<T> chosen, rejected;
    explicit device_batch(const batch_data<T>& d) : chosen(d.chosen), rejected(d.rejected) {}
    tpo::preference_batch<T, std::int64_t> batch() { return {chosen.batch(), rejected.batch()}; }
};

template <class G>
struct device_gradients {
    thrust::device_vector<G> tensor[4];
    index_t pairs, length_chosen, length_rejected, vocab;

    template <class T>
    explicit device_gradients(const batch_data<T>& d)
        : pairs(d.chosen.pairs), length_chosen(d.chosen.length), length_rejected(d.rejected.length),
          vocab(d.chosen.vocab) {
        for (int k = 0; k < 4; ++k) tensor[k].resize((k < 2 ? d.chosen.policy : d.rejected.policy).size());
    }
    tpo::preference_gradients<G> views() {
        return {{tpo::logits_of(tensor[0], pairs, length_chosen, vocab),
                 tpo::logits_of(tensor[1], pairs, length_chosen, vocab)},
                {tpo::logits_of(tensor[2], pairs, length_rejected, vocab),
                 tpo::logits_of(tensor[3], pairs, length_rejected, vocab)}};
    }
    std::vector<G> host(int k) const {
        std::vector<G> h(tensor[k].size());
        thrust::copy(tensor[k].begin(), tensor[k].end(), h.begin());
        return h;
    }
};

template <class T, class G>
void agree_on(std::mt19937_64& rng, index_t vocab, index_t length) {
    cudaStream_t stream;
    REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess);
    cuda_backend gpu(stream);
    tpo::backend::reference oracle;
    const batch_data<T> data = convert<T>(random_batch<double>(rng, 3, length, length - 2, vocab, 3.0, 0.3));
    device_batch<T> device(data);
    for (const auto& [name, options] : option_cases()) {
        INFO("element " << tpo::element_name<T>() << ", V = " << vocab << ", " << name);
        device_gradients<G> ours(data);
        gradient_data<G> theirs(data);
        auto ours_view = ours.views();
        auto theirs_view = theirs.views();
        const auto a = tpo::evaluate(gpu, options, device.batch(), &ours_view);
        const auto b = tpo::evaluate(oracle, options, data.batch(), &theirs_view);
        REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
        const double tol = std::is_same_v<T, double> ? 1e-12 : 2e-5;
        check_close({a.loss, a.reward_accuracy, a.reward_margin}, {b.loss, b.reward_accuracy, b.reward_margin}, tol,
                    "loss, accuracy, margin");
        check_close(a.losses, b.losses, tol, "losses");
        check_close(a.policy_chosen_scores, b.policy_chosen_scores, tol, "policy chosen scores");
        check_close(a.reference_rejected_scores, b.reference_rejected_scores, tol, "reference rejected scores");
        check_close(a.mean_visual_score_chosen, b.mean_visual_score_chosen, tol, "mean visual score chosen");
        const double gtol = std::is_same_v<G, double> ? 1e-12 : 1e-5;
        for (int k = 0; k < 4; ++k) {
            const std::vector<G> mine = ours.host(k);
            const std::vector<G>& exact = theirs.tensor(k);
            double scale = 0, worst = 0;
            for (std::size_t i = 0; i < exact.size(); ++i) {
                scale = std::max(scale, std::abs(tpo::widen<double>(exact[i])));
                worst = std::max(worst, std::abs(tpo::widen<double>(mine[i]) - tpo::widen<double>(exact[i])));
            }
            INFO("gradient tensor " << k << ": worst difference " << worst << ", scale " << scale);
            CHECK(worst <= gtol * std::max(scale, 1e-30));
        }

        // The reference as the sequence scores this backend reported, in device memory: the step
        // then reads the policy's tensors only and, as on the host (test_properties), changes no bit.
        thrust::device_vector<double> given_chosen = a.reference_chosen_scores;
        thrust::device_vector<double> given_rejected = a.reference_rejected_scores;
        const auto scored =
            with_reference_scores(device.batch(), tpo::sequence_values_of(given_chosen, data.chosen.pairs),
                                  tpo::sequence_values_of(given_rejected, data.rejected.pairs));
        device_gradients<G> with_scores(data);
        auto with_scores_view = with_scores.views();
        const auto c = tpo::evaluate(gpu, options, scored, &with_scores_view);
        REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
        CHECK(c.loss == a.loss);
        CHECK(c.losses == a.losses);
        CHECK(c.reference_rejected_scores == a.reference_rejected_scores);
        for (int k = 0; k < 4; ++k) {
            INFO("gradient tensor " << k << " with reference scores");
            const std::vector<G> given = with_scores.host(k), computed = ours.host(k);
            CHECK(std::memcmp(given.data(), computed.data(), given.size() * sizeof(G)) == 0);
        }
    }
    cudaStreamDestroy(stream);
}

}  // namespace

TEST_CASE("CUDA: agrees with the reference backend for every element type and row kernel", "[cuda][agreement]") {
    std::mt19937_64 rng(42);
    // V = 1 and 7: warp rows, misaligned; 1000: warp rows; 5003: block rows, misaligned (odd V);
    // 32768: block rows, aligned, packed stores.
    for (index_t vocab : {1, 7, 1000, 5003, 32768}) {
        agree_on<double, double>(rng, vocab, 6);
        agree_on<float, float>(rng, vocab, 6);
        agree_on<tpo::bfloat16, float>(rng, vocab, 6);
        agree_on<tpo::float16, float>(rng, vocab, 6);
    }
    agree_on<tpo::bfloat16, tpo::bfloat16>(rng, 4096, 5);
}

TEST_CASE("CUDA: identical policy and reference logits give h = 0 and a loss of exactly ln 2", "[cuda][init]") {
    std::mt19937_64 rng(11);
    cuda_backend gpu;
    auto data = convert<tpo::bfloat16>(random_batch<double>(rng, 4, 9, 6, 32000, 4.0, 0.2));
    for (auto* side : {&data.chosen, &data.rejected}) {
        side->reference = side->policy;
        side->reference_noisy = side->policy_noisy;
    }
    device_batch<tpo::bfloat16> device(data);
    const auto r = tpo::evaluate(gpu, tpo::objective_options{}, device.batch());
    for (std::size_t i = 0; i < r.losses.size(); ++i) {
        CHECK(r.chosen_rewards[i] == 0.0);
        CHECK(r.losses[i] == std::log(2.0));
    }
    CHECK(r.loss == std::log(2.0));
}

TEST_CASE("CUDA: bad input gives the reference backend's error", "[cuda][bad-input]") {
    cuda_backend gpu;
    tpo::backend::reference oracle;
    auto message = [](auto& backend, auto& data_batch) -> std::string {
        try {
            tpo::evaluate(backend, tpo::objective_options{}, data_batch);
        } catch (const tpo::error& e) {
            return e.what();
        }
        return "no error";
    };
    auto compare = [&](auto&& edit) {
        std::mt19937_64 rng(1);
        auto data = random_batch<double>(rng, 2, 4, 3, 5, 1.0, 0.0);
        edit(data);
        device_batch<double> device(data);
        auto host_batch = data.batch();
        auto device_view = device.batch();
        const std::string expected = message(oracle, host_batch);
        CHECK(expected != "no error");
        CHECK(message(gpu, device_view) == expected);
    };
    compare([](auto& d) { d.chosen.labels[1 * 4 + 2] = 5; });
    compare([](auto& d) { d.rejected.labels[1] = -7; });
    for (double value : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()})
        for (int k = 0; k < 4; ++k)
            compare([&](auto& d) { d.rejected.tensor(k)[(1 * 3 + 1) * 5 + 3] = value; });

    // Host memory handed to the CUDA backend is named, not dereferenced on the device.
    std::mt19937_64 rng(2);
    const auto host_data = random_batch<float>(rng, 2, 4, 3, 5);
    CHECK_THROWS_AS(tpo::evaluate(gpu, tpo::objective_options{}, host_data.batch()), tpo::shape_error);
}

TEST_CASE("CUDA: diffusion noise matches the host's within a few ulps", "[cuda][corrupt]") {
    cuda_backend gpu;
    tpo::backend::reference oracle;
    std::mt19937_64 rng(3);
    std::uniform_real_distribution<float> u(0, 1);
    std::vector<float> image(3 * 64 * 48);
    for (auto& x : image) x = u(rng);
    thrust::device_vector<float> in = image, out(image.size());
    std::vector<float> expected(image.size());
    tpo::diffusion_options o;
    o.seed = 1234567890123ull;
    o.stream = 7;
    tpo::add_diffusion_noise(gpu, tpo::image_view<const float>::chw(thrust::raw_pointer_cast(in.data()), 3, 64, 48),
                             tpo::image_view<float>::chw(thrust::raw_pointer_cast(out.data()), 3, 64, 48), o);
    tpo::add_diffusion_noise(oracle, tpo::image_view<const float>::chw(image.data(), 3, 64, 48),
                             tpo::image_view<float>::chw(expected.data(), 3, 64, 48), o);
    std::vector<float> got(image.size());
    thrust::copy(out.begin(), out.end(), got.begin());
    for (std::size_t i = 0; i < got.size(); ++i)
        CHECK(std::abs(got[i] - expected[i]) <= 4 * 1.2e-7f * std::max(1.0f, std::abs(expected[i])));
}

namespace {

/// A hidden-state batch's tensors on the device and its views there.
template <class T>
struct device_hidden {
    thrust::device_vector<T> weight, bias, reference_weight, reference_bias;
    thrust::device_vector<T> states[2][4];
    thrust::device_vector<std::int64_t> labels[2];
    thrust::device_vector<float> weights[2];
    const tpo_test::hidden::hidden_data<T>& host;

    explicit device_hidden(const tpo_test::hidden::hidden_data<T>& d)
        : weight(d.weight), bias(d.bias), reference_weight(d.reference_weight), reference_bias(d.reference_bias),
          host(d) {
        const tpo_test::hidden::hidden_side<T>* sides[2] = {&d.chosen, &d.rejected};
        for (int s = 0; s < 2; ++s) {
            for (int k = 0; k < 4; ++k)
                states[s][k] = const_cast<tpo_test::hidden::hidden_side<T>*>(sides[s])->tensor(k);
            labels[s] = sides[s]->labels;
            weights[s] = sides[s]->weights;
        }
    }
    tpo::hidden_preference_batch<T, std::int64_t> batch() {
        auto side = [&](int s, const tpo_test::hidden::hidden_side<T>& h) {
            auto v = [&](int k) {
                return tpo::hidden_view<const T>{thrust::raw_pointer_cast(states[s][k].data()), h.pairs, h.length,
                                                 h.hidden};
            };
            return tpo::hidden_side_batch<T, std::int64_t>{
                v(0), v(1), v(2), v(3), tpo::labels_of(labels[s], h.pairs, h.length),
                tpo::token_values_of(weights[s], h.pairs, h.length)};
        };
        const T* b = host.with_bias ? thrust::raw_pointer_cast(bias.data()) : nullptr;
        const T* rb = host.with_bias ? thrust::raw_pointer_cast(reference_bias.data()) : nullptr;
        return {{thrust::raw_pointer_cast(weight.data()), b, host.vocab, host.hidden},
                {thrust::raw_pointer_cast(reference_weight.data()), rb, host.vocab, host.hidden},
                side(0, host.chosen),
                side(1, host.rejected)};
    }
};

/// The fused path on the GPU (cuBLAS products) against the reference backend's on the host.
template <class T>
void check_fused(const tpo::objective_options& options, double forward_tol, double gradient_tol) {
    using namespace tpo_test::hidden;
    std::mt19937_64 rng(2026);
    const hidden_data<T> d = convert<T>(random_hidden(rng, 3, 70, 45, 96, 1000));
    tpo::backend::reference oracle;
    hidden_gradient_data<double> want(d);
    auto want_views = want.views(d, true);
    const tpo::objective_result e = tpo::evaluate(oracle, options, d.batch(), &want_views);

    device_hidden<T> dev(d);
    thrust::device_vector<double> g[4], gw(d.weight.size()), gb(d.bias.size());
    for (int k = 0; k < 4; ++k) g[k].resize(want.hidden[k].size());
    auto view = [&](int k) {
        const auto& s = k < 2 ? d.chosen : d.rejected;
        return tpo::hidden_view<double>{thrust::raw_pointer_cast(g[k].data()), s.pairs, s.length, s.hidden};
    };
    tpo::hidden_gradients<double> grads{{view(0), view(1)}, {view(2), view(3)}, thrust::raw_pointer_cast(gw.data()),
                                        thrust::raw_pointer_cast(gb.data())};
    cuda_backend gpu;
    const tpo::objective_result r = tpo::evaluate(gpu, options, dev.batch(), &grads);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    check_close({r.loss, r.reward_margin}, {e.loss, e.reward_margin}, forward_tol, "loss, margin");
    check_close(r.chosen_rewards, e.chosen_rewards, forward_tol, "chosen rewards");
    check_close(r.rejected_rewards, e.rejected_rewards, forward_tol, "rejected rewards");
    auto host = [](const thrust::device_vector<double>& v) { return std::vector<double>(v.begin(), v.end()); };
    for (int k = 0; k < 4; ++k) check_close(host(g[k]), want.hidden[k], gradient_tol, "dL/dh");
    check_close(host(gw), want.weight, gradient_tol, "dL/dW");
    check_close(host(gb), want.bias, gradient_tol, "dL/db");
}

}  // namespace

TEST_CASE("CUDA: hidden states in (cuBLAS) agree with the reference backend", "[cuda][fused]") {
    tpo::objective_options options;
    options.logit_softcap = 5.0;
    options.temperature = 0.9;
    options.chunk_tokens = 64;
    SECTION("double") { check_fused<double>(options, 1e-10, 1e-10); }
    SECTION("float") { check_fused<float>(options, 1e-5, 1e-4); }
    SECTION("bf16 (∂L/∂u rounded to bf16 for the products)") { check_fused<tpo::bfloat16>(options, 1e-5, 2e-2); }
    options.score = tpo::score_kind::prob;
    options.chunk_tokens.reset();
    SECTION("float, prob score, default chunks") { check_fused<float>(options, 1e-5, 1e-4); }
}

namespace {

/// A caller's allocator (as a framework's caching allocator is) that counts what it hands out.
struct counting_allocator {
    std::size_t allocations = 0, releases = 0, bytes_out = 0;

    static void* allocate(void* state, std::size_t bytes, cudaStream_t stream) {
        auto& self = *static_cast<counting_allocator*>(state);
        void* p = nullptr;
        if (cudaMallocAsync(&p, bytes, stream) != cudaSuccess) return nullptr;
        ++self.allocations;
        self.bytes_out += bytes;
        return p;
    }
    static void deallocate(void* state, void* p, std::size_t bytes, cudaStream_t stream) {
        auto& self = *static_cast<counting_allocator*>(state);
        ++self.releases;
        self.bytes_out -= bytes;
        (void)cudaFreeAsync(p, stream);
    }
    tpo::backend::cuda_allocator handle() { return {&allocate, &deallocate, this}; }
};

}  // namespace

TEST_CASE("CUDA: scratch from the caller's allocator; forward and backward captured in a CUDA graph",
          "[cuda][allocator][graph]") {
    std::mt19937_64 rng(5);
    const batch_data<float> data = convert<float>(random_batch<double>(rng, 3, 9, 7, 5003, 3.0, 0.3));
    device_batch<float> device(data);
    cudaStream_t stream;
    REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess);
    const tpo::objective_options options;

    // The stream-ordered pool: what the caller's allocator must reproduce bit for bit.
    cuda_backend pooled(stream);
    device_gradients<float> expected_grads(data);
    auto expected_view = expected_grads.views();
    const tpo::objective_result expected = tpo::evaluate(pooled, options, device.batch(), &expected_view);

    counting_allocator counter;
    {
        cuda_backend gpu(tpo::backend::cuda_context{stream, counter.handle()});
        device_gradients<float> grads(data);
        auto grads_view = grads.views();
        tpo::objective<cuda_backend> objective(gpu, options);
        // Under global capture mode any call that waits for the device (a synchronisation, a
        // blocking copy, cudaMalloc) ends the capture with an error: the forward without read-back
        // and the backward must do none.
        cudaGraph_t graph;
        REQUIRE(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal) == cudaSuccess);
        objective.launch_forward(device.batch());
        objective.backward(device.batch(), grads_view);
        REQUIRE(cudaStreamEndCapture(stream, &graph) == cudaSuccess);
        cudaGraphExec_t exec;
        REQUIRE(cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess);
        REQUIRE(cudaGraphLaunch(exec, stream) == cudaSuccess);
        const tpo::objective_result got = objective.read_results();
        CHECK(counter.allocations > 0);
        CHECK(got.loss == expected.loss);
        CHECK(got.losses == expected.losses);
        CHECK(got.chosen_rewards == expected.chosen_rewards);
        CHECK(got.mean_visual_score_rejected == expected.mean_visual_score_rejected);
        for (int k = 0; k < 4; ++k) {
            INFO("gradient tensor " << k);
            const std::vector<float> a = grads.host(k), b = expected_grads.host(k);
            CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
        }
        cudaGraphExecDestroy(exec);
        cudaGraphDestroy(graph);
    }
    REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
    CHECK(counter.releases == counter.allocations);
    CHECK(counter.bytes_out == 0);
    cudaStreamDestroy(stream);
}
