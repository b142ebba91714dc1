#pragma once
// Online log-sum-exp (docs/formulas.md#token-log-probability): one pass over a row keeps a running
// maximum and the sum of exponentials rescaled to it, so a softmax is never materialised. Two
// partial states merge, which is what a vectorised, a warp-parallel or a vocabulary-sharded pass
// needs.

#include <cmath>
#include <limits>

#include "tpo/core/config.hpp"

TPO_BEGIN_NAMESPACE
namespace math {

template <class R>
struct online_logsumexp {
    R max = -std::numeric_limits<R>::infinity();
    R sum = R(0);  // Σ exp(x − max)

    TPO_HOST_DEVICE TPO_FORCE_INLINE void add(R x) {
        using std::exp;
        if (x > max) {
            sum = sum * exp(max - x) + R(1);
            max = x;
        } else if (x != -std::numeric_limits<R>::infinity()) {  // −∞ adds 0, even before any finite x
            sum += exp(x - max);
        }
    }

    TPO_HOST_DEVICE TPO_FORCE_INLINE void merge(const online_logsumexp& other) {
        using std::exp;
        if (other.sum == R(0)) return;
        if (sum == R(0)) {
            *this = other;
            return;
        }
        if (other.max > max) {
            sum = sum * exp(max - other.max) + other.sum;
            max = other.max;
        } else {
            sum += other.sum * exp(other.max - max);
        }
    }

    /// log Σ exp(x); −∞ for an empty row.
    TPO_HOST_DEVICE TPO_FORCE_INLINE R value() const {
        using std::log;
        return sum == R(0) ? max : max + log(sum);
    }
};

}  // namespace math
TPO_END_NAMESPACE
