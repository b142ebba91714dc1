#pragma once
// Philox4x32-10 (Salmon et al., SC'11) and the fixed element-to-counter mapping of
// docs/formulas.md#reproducible-noise, so every backend draws the same normal for the same
// (seed, stream, index), whatever the thread count or launch shape, and any sub-range can be
// generated on its own.

#include <cmath>
#include <cstdint>

#include "tpo/core/config.hpp"

TPO_BEGIN_NAMESPACE
namespace math {

struct philox_block {
    std::uint32_t x[4];
};

TPO_HOST_DEVICE TPO_FORCE_INLINE philox_block philox4x32_10(philox_block counter, std::uint32_t k0,
                                                            std::uint32_t k1) {
    constexpr std::uint32_t m0 = 0xD2511F53u, m1 = 0xCD9E8D57u;
    constexpr std::uint32_t w0 = 0x9E3779B9u, w1 = 0xBB67AE85u;
    std::uint32_t c0 = counter.x[0], c1 = counter.x[1], c2 = counter.x[2], c3 = counter.x[3];
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += w0;
            k1 += w1;
        }
        const std::uint64_t p0 = static_cast<std::uint64_t>(m0) * c0;
        const std::uint64_t p1 = static_cast<std::uint64_t>(m1) * c2;
        const std::uint32_t n0 = static_cast<std::uint32_t>(p1 >> 32) ^ c1 ^ k0;
        const std::uint32_t n1 = static_cast<std::uint32_t>(p1);
        const std::uint32_t n2 = static_cast<std::uint32_t>(p0 >> 32) ^ c3 ^ k1;
        const std::uint32_t n3 = static_cast<std::uint32_t>(p0);
        c0 = n0;
        c1 = n1;
        c2 = n2;
        c3 = n3;
    }
    return {{c0, c1, c2, c3}};
}

/// uint32 → uniform in (0, 1]: u(x) = x·2⁻³² + 2⁻³³, never 0 so log(u) is finite.
TPO_HOST_DEVICE TPO_FORCE_INLINE float uniform_open_closed(std::uint32_t x) {
    return static_cast<float>(x) * 2.3283064365386963e-10f + 1.1641532182693481e-10f;
}

/// The counter-based generator keyed by (seed, stream).
struct philox_stream {
    std::uint64_t seed = 0;
    std::uint64_t stream = 0;

    TPO_HOST_DEVICE philox_block block(std::uint64_t b) const {
        return philox4x32_10({{static_cast<std::uint32_t>(b), static_cast<std::uint32_t>(b >> 32),
                               static_cast<std::uint32_t>(stream), static_cast<std::uint32_t>(stream >> 32)}},
                             static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32));
    }

    /// The four standard normals of block b = ⌊i/4⌋; element i takes entry i mod 4. float32.
    TPO_HOST_DEVICE void normals(std::uint64_t b, float out[4]) const {
        using std::cos;
        using std::log;
        using std::sin;
        using std::sqrt;
        const philox_block r = block(b);
        constexpr float two_pi = 6.2831853071795865f;
        for (int pair = 0; pair < 2; ++pair) {
            const float radius = sqrt(-2.0f * log(uniform_open_closed(r.x[2 * pair])));
            const float angle = two_pi * uniform_open_closed(r.x[2 * pair + 1]);
            out[2 * pair] = radius * sin(angle);
            out[2 * pair + 1] = radius * cos(angle);
        }
    }

    TPO_HOST_DEVICE float normal(std::uint64_t i) const {
        float n[4];
        normals(i / 4, n);
        return n[i % 4];
    }

    /// Uniforms for the random parameters of a corruption (crop box, blur σ, masked patches).
    /// They use counter word 1 = 0xFFFFFFFF, a block range no image reaches (it would need
    /// 2^66 elements), so parameters never share draws with the noise of the same stream.
    TPO_HOST_DEVICE float parameter_uniform(std::uint32_t draw) const {
        const philox_block r =
            philox4x32_10({{draw, 0xFFFFFFFFu, static_cast<std::uint32_t>(stream),
                            static_cast<std::uint32_t>(stream >> 32)}},
                          static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32));
        return uniform_open_closed(r.x[0]);
    }
};

}  // namespace math
TPO_END_NAMESPACE
