// Image corruptions on the tested backend (docs/formulas.md#image-corruption): the diffusion formula element by element,
// layouts and spaces, 8-bit clamp and wrap, and the geometry of crop, blur and patch masking.

#include <catch2/catch.hpp>

#include <cmath>
#include <numeric>
#include <random>

#include <tpo/tpo.hpp>

#include "support/tested_backend.hpp"

using tpo::index_t;

namespace {
std::vector<float> random_unit_image(std::size_t n, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> u(0, 1);
    std::vector<float> x(n);
    for (auto& v : x) v = u(rng);
    return x;
}
}  // namespace

TEST_CASE("diffusion noise is sqrt(ᾱ)x + sqrt(1−ᾱ)ε with ε keyed by memory offset", "[corrupt][diffusion]") {
    tpo_test::tested_backend backend;
    const auto x = random_unit_image(2 * 3 * 5 * 7, 1);
    std::vector<float> out(x.size());
    tpo::diffusion_options o;
    o.seed = 77;
    o.stream = 5;
    o.step = 250;
    tpo::add_diffusion_noise(backend, tpo::image_view<const float>::nchw(x.data(), 2, 3, 5, 7),
                             tpo::image_view<float>::nchw(out.data(), 2, 3, 5, 7), o);
    const double a = tpo::alpha_bar(o.schedule, 250);
    const float signal = static_cast<float>(std::sqrt(a)), noise = static_cast<float>(std::sqrt(1 - a));
    const tpo::math::philox_stream rng{77, 5};
    for (std::size_t i = 0; i < x.size(); ++i)
        CHECK(std::abs(out[i] - (signal * x[i] + noise * rng.normal(i))) <= 1e-6f);

    // In place gives the same result; another stream gives other noise.
    auto inplace = x;
    tpo::add_diffusion_noise(backend, tpo::image_view<const float>::nchw(inplace.data(), 2, 3, 5, 7),
                             tpo::image_view<float>::nchw(inplace.data(), 2, 3, 5, 7), o);
    CHECK(inplace == out);
    o.stream = 6;
    std::vector<float> other(x.size());
    tpo::add_diffusion_noise(backend, tpo::image_view<const float>::nchw(x.data(), 2, 3, 5, 7),
                             tpo::image_view<float>::nchw(other.data(), 2, 3, 5, 7), o);
    CHECK(other != out);
}

TEST_CASE("normalised-space noise uses each element's channel in any layout", "[corrupt][diffusion]") {
    tpo_test::tested_backend backend;
    const index_t h = 4, w = 3, c = 3;
    const auto x = random_unit_image(static_cast<std::size_t>(h * w * c), 2);
    std::vector<float> out(x.size());
    tpo::diffusion_options o;
    o.space = tpo::noise_space::normalized;
    tpo::add_diffusion_noise(backend, tpo::image_view<const float>::hwc(x.data(), h, w, c),
                             tpo::image_view<float>::hwc(out.data(), h, w, c), o);
    const double a = tpo::alpha_bar(o.schedule, o.step);
    const tpo::math::philox_stream rng{0, 0};
    const tpo::channel_normalisation n{};
    for (std::size_t i = 0; i < x.size(); ++i) {
        const int ch = static_cast<int>(i % 3);  // HWC: the channel is the fastest axis
        const double normalised = (x[i] - n.mean[ch]) / n.std[ch];
        const double expected = (std::sqrt(a) * normalised + std::sqrt(1 - a) * rng.normal(i)) * n.std[ch] + n.mean[ch];
        CHECK(std::abs(out[i] - expected) <= 2e-6);
    }
    // The normalised space is the stronger corruption (about 3.7×, docs/formulas.md#diffusion-noise).
    std::vector<float> pixel(x.size());
    o.space = tpo::noise_space::pixel;
    tpo::add_diffusion_noise(backend, tpo::image_view<const float>::hwc(x.data(), h, w, c),
                             tpo::image_view<float>::hwc(pixel.data(), h, w, c), o);
    double spread_pixel = 0, spread_norm = 0;
    for (std::size_t i = 0; i < x.size(); ++i) {
        spread_pixel += std::abs(pixel[i] - std::sqrt(a) * x[i]);
        spread_norm += std::abs(out[i] - x[i]);
    }
    CHECK(spread_norm < spread_pixel);  // noise scaled by std_c ≈ 0.27 after mapping back
}

TEST_CASE("8-bit output clamps and rounds by default, wraps only when asked", "[corrupt][pixel]") {
    using tpo::overflow_mode;
    CHECK(tpo::store_pixel<std::uint8_t>(1.2f, overflow_mode::clamp) == 255);
    CHECK(tpo::store_pixel<std::uint8_t>(-0.1f, overflow_mode::clamp) == 0);
    CHECK(tpo::store_pixel<std::uint8_t>(0.5f, overflow_mode::clamp) == 128);  // 127.5 rounds half up
    // mul(255) then a truncating cast modulo 256: 306 → 50, −25.5 → −25 → 231.
    CHECK(tpo::store_pixel<std::uint8_t>(1.2f, overflow_mode::wrap) == 50);
    CHECK(tpo::store_pixel<std::uint8_t>(-0.1f, overflow_mode::wrap) == 231);
    CHECK(tpo::store_pixel<std::uint8_t>(0.5f, overflow_mode::wrap) == 127);
    CHECK(tpo::load_pixel<float>(std::uint8_t{255}) == 1.0f);

    tpo_test::tested_backend backend;
    std::vector<std::uint8_t> image(3 * 8 * 8, 250), clamped(image.size()), wrapped(image.size());
    tpo::diffusion_options o;
    o.step = 999;
    auto in = tpo::image_view<const std::uint8_t>::chw(image.data(), 3, 8, 8);
    tpo::add_diffusion_noise(backend, in, tpo::image_view<std::uint8_t>::chw(clamped.data(), 3, 8, 8), o);
    o.overflow = overflow_mode::wrap;
    tpo::add_diffusion_noise(backend, in, tpo::image_view<std::uint8_t>::chw(wrapped.data(), 3, 8, 8), o);
    const double a = tpo::alpha_bar(o.schedule, 999);
    const tpo::math::philox_stream rng{0, 0};
    int overflowed = 0;
    for (std::size_t i = 0; i < image.size(); ++i) {
        const float y = static_cast<float>(std::sqrt(a)) * (250.0f / 255.0f) +
                        static_cast<float>(std::sqrt(1 - a)) * rng.normal(i);
        CHECK(clamped[i] == tpo::store_pixel<std::uint8_t>(y, overflow_mode::clamp));
        CHECK(wrapped[i] == tpo::store_pixel<std::uint8_t>(y, overflow_mode::wrap));
        overflowed += y > 1.0f || y < 0.0f;
    }
    CHECK(overflowed > 10);  // the case the two modes disagree on does occur here
}

TEST_CASE("random resized crop keeps a share of the area and is reproducible", "[corrupt][crop]") {
    const tpo::crop_options o{};
    for (std::uint64_t stream = 0; stream < 200; ++stream) {
        const auto box = tpo::corrupt::draw_crop_box(o, stream, 336, 336);
        CHECK(box.top >= 0);
        CHECK(box.left >= 0);
        CHECK(box.top + box.height <= 336);
        CHECK(box.left + box.width <= 336);
        const double share = double(box.height) * box.width / (336.0 * 336.0);
        CHECK(share >= 0.0095);
        CHECK(share <= 0.21);
        const double aspect = double(box.width) / box.height;
        CHECK(aspect >= 0.70);
        CHECK(aspect <= 1.43);
    }
    tpo_test::tested_backend backend;
    // Bilinear resampling reproduces a linear ramp exactly away from the borders, so the output of
    // a ramp is a ramp; and a constant image stays constant.
    const index_t h = 40, w = 40;
    std::vector<float> ramp(static_cast<std::size_t>(h * w)), out(ramp.size()), again(ramp.size());
    for (index_t y = 0; y < h; ++y)
        for (index_t x = 0; x < w; ++x) ramp[y * w + x] = 0.01f * x;
    auto in = tpo::image_view<const float>::chw(ramp.data(), 1, h, w);
    tpo::random_resized_crop(backend, in, tpo::image_view<float>::chw(out.data(), 1, h, w), o);
    tpo::random_resized_crop(backend, in, tpo::image_view<float>::chw(again.data(), 1, h, w), o);
    CHECK(out == again);
    const auto box = tpo::corrupt::draw_crop_box(o, 0, h, w);
    auto interior = [&](index_t x) {  // the source coordinate needs no clamping at the crop's border
        const double s = (x + 0.5) * box.width / w - 0.5;
        return s >= 0 && s <= box.width - 1;
    };
    int checked = 0;
    for (index_t y = 0; y < h; ++y)
        for (index_t x = 1; x + 1 < w; ++x) {
            if (!interior(x - 1) || !interior(x + 1)) continue;
            ++checked;
            const float d1 = out[y * w + x + 1] - out[y * w + x], d0 = out[y * w + x] - out[y * w + x - 1];
            CHECK(std::abs(d1 - d0) <= 1e-5f);
            CHECK(d1 > 0.0f);
        }
    CHECK(checked > 10 * h);
}

TEST_CASE("gaussian blur is a normalised separable kernel with reflected borders", "[corrupt][blur]") {
    tpo_test::tested_backend backend;
    const index_t n = 21;
    std::vector<float> impulse(static_cast<std::size_t>(n * n), 0.0f), out(impulse.size());
    impulse[10 * n + 10] = 1.0f;
    tpo::blur_options o;
    o.seed = 3;
    tpo::gaussian_blur(backend, tpo::image_view<const float>::chw(impulse.data(), 1, n, n),
                       tpo::image_view<float>::chw(out.data(), 1, n, n), o);
    const double sigma = 1.5 + 0.5 * tpo::math::philox_stream{3, 0}.parameter_uniform(0);
    std::vector<double> k(13);
    double norm = 0;
    for (int d = -6; d <= 6; ++d) norm += k[d + 6] = std::exp(-0.5 * d * d / (sigma * sigma));
    for (index_t y = 0; y < n; ++y)
        for (index_t x = 0; x < n; ++x) {
            const index_t dy = y - 10, dx = x - 10;
            const double expected = (std::abs(dy) <= 6 && std::abs(dx) <= 6)
                                        ? k[dy + 6] * k[dx + 6] / (norm * norm)
                                        : 0.0;
            CHECK(std::abs(out[y * n + x] - expected) <= 1e-6);
        }
    // A constant image stays constant, borders included (the kernel is normalised).
    std::vector<std::uint8_t> flat(3 * 9 * 9, 77), blurred(flat.size());
    tpo::gaussian_blur(backend, tpo::image_view<const std::uint8_t>::chw(flat.data(), 3, 9, 9),
                       tpo::image_view<std::uint8_t>::chw(blurred.data(), 3, 9, 9), o);
    CHECK(blurred == flat);
    CHECK(tpo::corrupt::reflect(-1, 5) == 1);
    CHECK(tpo::corrupt::reflect(5, 5) == 3);
    CHECK(tpo::corrupt::reflect(-9, 3) == 1);
}

TEST_CASE("patch masking fills whole patches, about `ratio` of them", "[corrupt][mask]") {
    tpo_test::tested_backend backend;
    const index_t size = 4, grid = 40;
    const auto x = random_unit_image(static_cast<std::size_t>(3 * size * grid * size * grid), 9);
    std::vector<float> out(x.size());
    tpo::patch_mask_options o;
    o.patch_size = size;
    o.ratio = 0.3;
    const index_t hw = size * grid;
    tpo::mask_patches(backend, tpo::image_view<const float>::chw(x.data(), 3, hw, hw),
                      tpo::image_view<float>::chw(out.data(), 3, hw, hw), o);
    int masked = 0;
    for (index_t py = 0; py < grid; ++py)
        for (index_t px = 0; px < grid; ++px) {
            int filled = 0;
            for (index_t c = 0; c < 3; ++c)
                for (index_t y = 0; y < size; ++y)
                    for (index_t x0 = 0; x0 < size; ++x0) {
                        const auto i = static_cast<std::size_t>((c * hw + py * size + y) * hw + px * size + x0);
                        filled += out[i] == o.fill.mean[c] && out[i] != x[i];
                        if (out[i] != o.fill.mean[c]) CHECK(out[i] == x[i]);
                    }
            CHECK((filled == 0 || filled == 3 * size * size));
            masked += filled > 0;
        }
    // 1600 patches at p = 0.3: standard deviation 18 patches.
    CHECK(std::abs(masked - 480) < 90);
}

TEST_CASE("mean and noise images", "[corrupt][fill]") {
    tpo_test::tested_backend backend;
    std::vector<float> out(3 * 6 * 6);
    auto view = tpo::image_view<float>::chw(out.data(), 3, 6, 6);
    tpo::fill_mean_image(backend, view);
    const tpo::channel_normalisation n{};
    for (std::size_t i = 0; i < out.size(); ++i) CHECK(out[i] == n.mean[i / 36]);
    tpo::fill_noise_image(backend, view, 8, 1);
    const tpo::math::philox_stream rng{8, 1};
    for (std::size_t i = 0; i < out.size(); ++i)
        CHECK(out[i] == Approx(rng.normal(i) * n.std[i / 36] + n.mean[i / 36]).margin(1e-6));
}
