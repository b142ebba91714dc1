#pragma once
// The logit transform trainers apply between the lm_head and the softmax, in this order:
//   z = c·tanh(s·u / c) / τ    (soft-capped; c > 0)
//   z = s·u / τ                (no soft-cap)
// with s the logit scale, c the soft-cap and τ the temperature (docs/math.md, "The logit
// transform"). Its derivative is written in terms of z, so a gradient pass needs no second copy of
// the pre-transform logits: dz/du = (s/τ)·(1 − (τ·z/c)²), or s/τ without a soft-cap.

#include <cmath>

#include "tpo/core/config.hpp"

TPO_BEGIN_NAMESPACE

struct logit_transform {
    double scale = 1.0;
    double softcap = 0.0;  // 0: no soft-cap
    double temperature = 1.0;

    TPO_HOST_DEVICE bool identity() const { return scale == 1.0 && softcap == 0.0 && temperature == 1.0; }
    TPO_HOST_DEVICE bool linear() const { return softcap == 0.0; }

    template <class A>
    TPO_HOST_DEVICE A apply(A u) const {
        using std::tanh;
        A x = static_cast<A>(scale) * u;
        if (softcap != 0.0) x = static_cast<A>(softcap) * tanh(x / static_cast<A>(softcap));
        return x / static_cast<A>(temperature);
    }

    /// dz/du at the transformed logit z.
    template <class A>
    TPO_HOST_DEVICE A derivative_at(A z) const {
        A d = static_cast<A>(scale / temperature);
        if (softcap != 0.0) {
            const A t = z * static_cast<A>(temperature / softcap);  // tanh(s·u / c)
            d *= A(1) - t * t;
        }
        return d;
    }
};

TPO_END_NAMESPACE
