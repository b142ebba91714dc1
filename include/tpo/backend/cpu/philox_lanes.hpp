#pragma once
// Philox4x32-10 and Box–Muller for many consecutive blocks at once
// (docs/formulas.md#reproducible-noise), so the diffusion noise pass vectorises: the integer rounds
// run over structure-of-arrays lanes the compiler turns into vector multiplies, and
// log/sin/cos/sqrt are Eigen packet functions.
//
// The integer stream is bit-identical to math::philox4x32_10; the float formulas are those of
// math::philox_stream::normals operation for operation, so the normals differ from the scalar
// ones only by the last bits of the vector transcendental functions (a few ulps, which
// docs/formulas.md#reproducible-noise allows).
// Each block's normals depend only on its index: the result is the same for any thread count.

#include <cstdint>

#include "tpo/backend/cpu/simd.hpp"
#include "tpo/math/philox.hpp"

TPO_BEGIN_NAMESPACE
namespace backend::cpu_detail {

inline constexpr int philox_lanes = 16;

/// The raw outputs x[k][lane] of blocks first … first + philox_lanes − 1.
inline void philox_blocks(const math::philox_stream& rng, std::uint64_t first,
                          std::uint32_t (&x)[4][philox_lanes]) {
    constexpr std::uint32_t m0 = 0xD2511F53u, m1 = 0xCD9E8D57u;
    constexpr std::uint32_t w0 = 0x9E3779B9u, w1 = 0xBB67AE85u;
    std::uint32_t c0[philox_lanes], c1[philox_lanes], c2[philox_lanes], c3[philox_lanes];
    for (int l = 0; l < philox_lanes; ++l) {
        const std::uint64_t b = first + static_cast<std::uint64_t>(l);
        c0[l] = static_cast<std::uint32_t>(b);
        c1[l] = static_cast<std::uint32_t>(b >> 32);
        c2[l] = static_cast<std::uint32_t>(rng.stream);
        c3[l] = static_cast<std::uint32_t>(rng.stream >> 32);
    }
    std::uint32_t k0 = static_cast<std::uint32_t>(rng.seed), k1 = static_cast<std::uint32_t>(rng.seed >> 32);
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += w0;
            k1 += w1;
        }
        for (int l = 0; l < philox_lanes; ++l) {
            const std::uint64_t p0 = static_cast<std::uint64_t>(m0) * c0[l];
            const std::uint64_t p1 = static_cast<std::uint64_t>(m1) * c2[l];
            const std::uint32_t n0 = static_cast<std::uint32_t>(p1 >> 32) ^ c1[l] ^ k0;
            const std::uint32_t n1 = static_cast<std::uint32_t>(p1);
            const std::uint32_t n2 = static_cast<std::uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
            const std::uint32_t n3 = static_cast<std::uint32_t>(p0);
            c0[l] = n0;
            c1[l] = n1;
            c2[l] = n2;
            c3[l] = n3;
        }
    }
    for (int l = 0; l < philox_lanes; ++l) {
        x[0][l] = c0[l];
        x[1][l] = c1[l];
        x[2][l] = c2[l];
        x[3][l] = c3[l];
    }
}

/// The four normals of each block first … first + count − 1, block-major: out[4·(b − first) + k].
inline void philox_normals(const math::philox_stream& rng, std::uint64_t first, index_t count, float* out) {
    namespace ei = Eigen::internal;
    using P = packet_t<float>;
    constexpr index_t W = packet_width<float>;
    static_assert(philox_lanes % W == 0);
    constexpr float two_pi = 6.2831853071795865f;  // as math::philox_stream::normals

    for (index_t base = 0; base < count; base += philox_lanes) {
        std::uint32_t x[4][philox_lanes];
        philox_blocks(rng, first + static_cast<std::uint64_t>(base), x);
        alignas(64) float u[4][philox_lanes];
        for (int k = 0; k < 4; ++k)
            for (int l = 0; l < philox_lanes; ++l) u[k][l] = math::uniform_open_closed(x[k][l]);
        alignas(64) float n[4][philox_lanes];
        for (int pair = 0; pair < 2; ++pair)
            for (index_t l = 0; l < philox_lanes; l += W) {
                const P radius =
                    ei::psqrt(ei::pmul(ei::pset1<P>(-2.0f), ei::plog(ei::pload<P>(u[2 * pair] + l))));
                const P angle = ei::pmul(ei::pset1<P>(two_pi), ei::pload<P>(u[2 * pair + 1] + l));
                ei::pstore(n[2 * pair] + l, ei::pmul(radius, ei::psin(angle)));
                ei::pstore(n[2 * pair + 1] + l, ei::pmul(radius, ei::pcos(angle)));
            }
        const index_t lanes = std::min<index_t>(philox_lanes, count - base);
        for (index_t l = 0; l < lanes; ++l)
            for (int k = 0; k < 4; ++k) out[4 * (base + l) + k] = n[k][l];
    }
}

}  // namespace backend::cpu_detail
TPO_END_NAMESPACE
