// Scalar math shared by every backend: Philox known answers (docs/formulas.md#reproducible-noise),
// the beta schedules and their reference figures (docs/formulas.md#diffusion-noise), stable
// sigmoids, online log-sum-exp, 16-bit floats.

#include <catch2/catch.hpp>

#include "tpo/core/parse.hpp"
#include <rapidcheck/catch.h>

#include <cmath>
#include <optional>
#include <cstring>
#include <limits>

#include <tpo/core/parse.hpp>
#include <tpo/tpo.hpp>

using tpo::math::philox4x32_10;

TEST_CASE("Philox4x32-10 matches the Random123 known-answer vectors", "[math][philox]") {
    struct kat {
        std::uint32_t counter[4], key[2], expected[4];
    };
    const kat vectors[] = {
        {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
        {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
         {0xffffffff, 0xffffffff},
         {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
        {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
         {0xa4093822, 0x299f31d0},
         {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
    };
    for (const kat& v : vectors) {
        const auto out =
            philox4x32_10({{v.counter[0], v.counter[1], v.counter[2], v.counter[3]}}, v.key[0], v.key[1]);
        for (int i = 0; i < 4; ++i) CHECK(out.x[i] == v.expected[i]);
    }
}

TEST_CASE("the element-to-counter mapping of docs/formulas.md#reproducible-noise", "[math][philox]") {
    const std::uint64_t seed = 0x0000000500000007ull, stream = 0x0000000900000003ull;
    const tpo::math::philox_stream rng{seed, stream};
    for (std::uint64_t i : {0ull, 1ull, 2ull, 3ull, 4ull, 4099ull, (1ull << 34) + 6}) {
        const std::uint64_t b = i / 4;
        const auto r = philox4x32_10({{std::uint32_t(b), std::uint32_t(b >> 32), 3u, 9u}}, 7u, 5u);
        const int pair = static_cast<int>(i % 4) / 2;
        const float u1 = static_cast<float>(r.x[2 * pair]) * 0x1p-32f + 0x1p-33f;
        const float u2 = static_cast<float>(r.x[2 * pair + 1]) * 0x1p-32f + 0x1p-33f;
        const float radius = std::sqrt(-2.0f * std::log(u1)), angle = 6.2831853071795865f * u2;
        const float expected = (i % 2 == 0) ? radius * std::sin(angle) : radius * std::cos(angle);
        CHECK(rng.normal(i) == expected);
    }
    // u(x) is in (0, 1]: the extremes stay finite under log.
    CHECK(tpo::math::uniform_open_closed(0) > 0.0f);
    CHECK(tpo::math::uniform_open_closed(0xffffffffu) <= 1.0f);
}

TEST_CASE("Philox normals have the moments of N(0, 1)", "[math][philox]") {
    const tpo::math::philox_stream rng{123, 0};
    const int n = 400000;
    double sum = 0, sq = 0, fourth = 0;
    for (int i = 0; i < n; ++i) {
        const double x = rng.normal(static_cast<std::uint64_t>(i));
        sum += x;
        sq += x * x;
        fourth += x * x * x * x;
    }
    // Standard errors: mean 1/sqrt(n) = 0.0016, variance sqrt(2/n) = 0.0022, 4th moment sqrt(96/n) = 0.015.
    CHECK(std::abs(sum / n) < 0.008);
    CHECK(std::abs(sq / n - 1) < 0.011);
    CHECK(std::abs(fourth / n - 3) < 0.08);
}

TEST_CASE("the sigmoid schedule reproduces the reference values of its defaults", "[math][schedule]") {
    const tpo::schedule_options sigmoid{};
    CHECK(tpo::alpha_bar(sigmoid, 500) == Approx(0.744798526).epsilon(1e-9));
    struct row {
        int k;
        double alpha_bar, sqrt_alpha_bar, sqrt_one_minus;
    };
    for (const row& r : {row{0, 0.999978, 0.999989, 0.004726}, row{100, 0.996589, 0.998293, 0.058406},
                         row{500, 0.744799, 0.863017, 0.505175}, row{999, 0.081249, 0.285042, 0.958515}}) {
        const double a = tpo::alpha_bar(sigmoid, r.k);
        CHECK(std::abs(a - r.alpha_bar) < 5e-7);
        CHECK(std::abs(std::sqrt(a) - r.sqrt_alpha_bar) < 5e-7);
        CHECK(std::abs(std::sqrt(1 - a) - r.sqrt_one_minus) < 5e-7);
    }
}

TEST_CASE("every schedule is a decreasing ᾱ in (0, 1]", "[math][schedule]") {
    for (auto kind : {tpo::beta_schedule::sigmoid, tpo::beta_schedule::linear, tpo::beta_schedule::scaled_linear,
                      tpo::beta_schedule::cosine}) {
        tpo::schedule_options o;
        o.kind = kind;
        const auto a = tpo::alpha_bars(o);
        REQUIRE(a.size() == 1000);
        CHECK(a.front() < 1.0);
        CHECK(a.back() > 0.0);
        for (std::size_t k = 1; k < a.size(); ++k) CHECK(a[k] < a[k - 1]);
    }
    // Linear's endpoints and scaled_linear's square-root interpolation, from their definitions.
    tpo::schedule_options lin;
    lin.kind = tpo::beta_schedule::linear;
    const auto b = tpo::betas(lin);
    CHECK(b.front() == Approx(1e-4));
    CHECK(b.back() == Approx(0.02));
    tpo::schedule_options scaled;
    scaled.kind = tpo::beta_schedule::scaled_linear;
    CHECK(tpo::betas(scaled)[999] == Approx(0.012));
    tpo::schedule_options cosine;
    cosine.kind = tpo::beta_schedule::cosine;
    const auto bc = tpo::betas(cosine);
    CHECK(bc.back() == 0.999);  // the cap of squaredcos_cap_v2
}

TEST_CASE("zero terminal SNR makes the last step pure noise and keeps the first", "[math][schedule]") {
    tpo::schedule_options o;
    o.kind = tpo::beta_schedule::linear;
    o.zero_terminal_snr = true;
    const auto rescaled = tpo::alpha_bars(o);
    o.zero_terminal_snr = false;
    const auto plain = tpo::alpha_bars(o);
    CHECK(rescaled.back() == Approx(0.0).margin(1e-15));
    CHECK(rescaled.front() == Approx(plain.front()).epsilon(1e-12));
}

TEST_CASE("schedules reject bad settings", "[math][schedule][bad-input]") {
    tpo::schedule_options o;
    CHECK_THROWS_AS(tpo::alpha_bar(o, 1000), tpo::value_error);
    CHECK_THROWS_AS(tpo::alpha_bar(o, -1), tpo::value_error);
    o.steps = 0;
    CHECK_THROWS_WITH(tpo::alpha_bars(o), Catch::Contains("steps = 0"));
    o.steps = 10;
    o.beta_start = -0.1;
    CHECK_THROWS_WITH(tpo::alpha_bars(o), Catch::Contains("beta_start = -0.1"));
    CHECK_THROWS_WITH(tpo::parse_beta_schedule("quadratic"), Catch::Contains("quadratic"));
}

TEST_CASE("stable sigmoids stay finite where the naive forms fail", "[math]") {
    using tpo::math::log_sigmoid;
    using tpo::math::sigmoid;
    CHECK(log_sigmoid(-1000.0) == -1000.0);
    CHECK(log_sigmoid(1000.0) == 0.0);
    CHECK(log_sigmoid(-100.0f) == -100.0f);
    CHECK(sigmoid(-1000.0) == 0.0);
    CHECK(sigmoid(1000.0) == 1.0);
    rc::prop("log σ(x) − log σ(−x) = x", [](int scaled) {
        const double x = scaled / 1000.0;
        RC_ASSERT(std::abs(log_sigmoid(x) - log_sigmoid(-x) - x) <= 1e-12 * std::max(1.0, std::abs(x)));
    });
}

TEST_CASE("online log-sum-exp equals the two-pass value, in any split", "[math]") {
    rc::prop("merge of two halves", [](const std::vector<int>& raw, unsigned cut) {
        RC_PRE(!raw.empty());
        std::vector<double> x;
        for (int v : raw) x.push_back((v % 100000) / 100.0);
        const double m = *std::max_element(x.begin(), x.end());
        double s = 0;
        for (double v : x) s += std::exp(v - m);
        const double expected = m + std::log(s);
        tpo::math::online_logsumexp<double> left, right, whole;
        const std::size_t split = cut % (x.size() + 1);
        for (std::size_t i = 0; i < x.size(); ++i) {
            (i < split ? left : right).add(x[i]);
            whole.add(x[i]);
        }
        left.merge(right);
        RC_ASSERT(std::abs(whole.value() - expected) <= 1e-12 * std::max(1.0, std::abs(expected)));
        RC_ASSERT(std::abs(left.value() - expected) <= 1e-12 * std::max(1.0, std::abs(expected)));
    });
}

TEST_CASE("16-bit floats convert like IEEE round-to-nearest-even", "[element]") {
    // Every bf16 and fp16 bit pattern round-trips through float exactly (NaNs stay NaN).
    for (std::uint32_t bits = 0; bits < 65536; ++bits) {
        const auto b = tpo::bfloat16::from_bits(static_cast<std::uint16_t>(bits));
        const float fb = static_cast<float>(b);
        if (std::isnan(fb))
            CHECK(std::isnan(static_cast<float>(tpo::bfloat16(fb))));
        else
            CHECK(tpo::bfloat16(fb).bits == b.bits);
        const auto h = tpo::float16::from_bits(static_cast<std::uint16_t>(bits));
        const float fh = static_cast<float>(h);
        if (std::isnan(fh))
            CHECK(std::isnan(static_cast<float>(tpo::float16(fh))));
        else
            CHECK(tpo::float16(fh).bits == h.bits);
    }
    // Known values, from the formats' definitions.
    CHECK(static_cast<float>(tpo::float16::from_bits(0x3c00)) == 1.0f);
    CHECK(static_cast<float>(tpo::float16::from_bits(0x7bff)) == 65504.0f);
    CHECK(static_cast<float>(tpo::float16::from_bits(0x0001)) == std::ldexp(1.0f, -24));
    CHECK(std::isinf(static_cast<float>(tpo::float16(70000.0f))));
    CHECK(static_cast<float>(tpo::bfloat16(1.00390625f)) == 1.0f);           // tie → even
    CHECK(static_cast<float>(tpo::bfloat16(1.01171875f)) == 1.015625f);      // tie → even (up)
    CHECK(static_cast<float>(tpo::float16(1.0f + std::ldexp(1.0f, -11))) == 1.0f);  // tie → even
    rc::prop("fp16 rounding error is at most half an ulp", [](int raw) {
        const float x = static_cast<float>(raw % 6000000) / 100.0f;
        const float r = static_cast<float>(tpo::float16(x));
        const float ulp = std::abs(x) < std::ldexp(1.0f, -14) ? std::ldexp(1.0f, -24)
                                                               : std::ldexp(1.0f, std::ilogb(x) - 10);
        RC_ASSERT(std::abs(r - x) <= ulp / 2);
    });
}

TEST_CASE("numbers as text: Python's float() and int() grammar without stripping", "[parse]") {
    // Expected values as Python 3 prints float(text); nullopt where float(text) raises (or where
    // it would strip whitespace) or where the text has non-ASCII digits.
    const std::pair<const char*, std::optional<double>> reals[] = {
        {"0.1", 0.1}, {".5", 0.5}, {"5.", 5.0}, {"1.e5", 1e5}, {"1E+05", 1e5}, {"+2", 2.0}, {"-0", -0.0},
        {"1_000.5", 1000.5}, {"1e1_0", 1e10}, {"1e-320", 1e-320}, {"2.4e-324", 0.0}, {"2.5e-324", 5e-324},
        {"1e-400", 0.0}, {"1.7976931348623157e308", 1.7976931348623157e308},
        {"1.7976931348623159e308", INFINITY}, {"1e400", INFINITY}, {"-1e400", -INFINITY}, {"inf", INFINITY},
        {"-Infinity", -INFINITY}, {"0x10", std::nullopt}, {" 1", std::nullopt}, {"1 ", std::nullopt},
        {"1e", std::nullopt}, {"1e+", std::nullopt}, {".", std::nullopt}, {"", std::nullopt}, {"+", std::nullopt},
        {"1__0", std::nullopt}, {"_1", std::nullopt}, {"1_", std::nullopt}, {"1_.5", std::nullopt},
        {"1._5", std::nullopt}, {"0.1x", std::nullopt}, {"e5", std::nullopt}, {"infinit", std::nullopt},
    };
    for (const auto& [text, expected] : reals) {
        INFO("'" << text << "'");
        const std::optional<double> got = tpo::parse_real(text);
        REQUIRE(got.has_value() == expected.has_value());
        if (expected) {
            CHECK(*got == *expected);
            CHECK(std::signbit(*got) == std::signbit(*expected));
        }
    }
    CHECK(std::isnan(*tpo::parse_real("nAn")));
    CHECK(*tpo::parse_real(std::string("0.") + std::string(340, '0') + "1e10") == 0.0);
    bool overflow = false;
    CHECK(*tpo::parse_integer<std::int64_t>("-9223372036854775808") == INT64_MIN);
    CHECK(!tpo::parse_integer<std::int64_t>("9223372036854775808", &overflow));
    CHECK(overflow);
    CHECK(*tpo::parse_integer<std::uint64_t>("-0") == 0u);
    CHECK(!tpo::parse_integer<std::uint64_t>("-1", &overflow));
    CHECK(overflow);
    CHECK(*tpo::parse_integer<std::uint64_t>("007") == 7u);
    CHECK(*tpo::parse_integer<std::int64_t>("+1_000") == 1000);
    for (const char* bad : {"1.0", "1e3", " 5", "5 ", "0x10", "", "-", "1__0"}) {
        CHECK(!tpo::parse_integer<std::int64_t>(bad, &overflow));
        CHECK(!overflow);
    }
}
