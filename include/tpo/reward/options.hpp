#pragma once
// The choices that define a token reward (docs/formulas.md#token-rewards).

#include <string_view>

#include "tpo/core/error.hpp"

TPO_BEGIN_NAMESPACE

/// g in s = g(z)[y] − g(z̃)[y] (`docs/formulas.md#visual-anchored-score`).
enum class score_kind { logit, prob, logprob };

/// How token terms add up to a sequence score (`docs/formulas.md#sequence-score`).
enum class sequence_form { additive, multiplicative };

/// Which side of the pair a sequence is on: the calibration flips for rejected tokens
/// (`docs/formulas.md#self-calibrated-weight`).
enum class response_side { chosen, rejected };

inline score_kind parse_score_kind(std::string_view name) {
    if (name == "logit") return score_kind::logit;
    if (name == "prob") return score_kind::prob;
    if (name == "logprob") return score_kind::logprob;
    throw value_error(detail::concat("score: unknown kind '", name, "', expected logit, prob or logprob"));
}

inline sequence_form parse_sequence_form(std::string_view name) {
    if (name == "additive") return sequence_form::additive;
    if (name == "multiplicative") return sequence_form::multiplicative;
    throw value_error(detail::concat("form: unknown sequence form '", name, "', expected additive or multiplicative"));
}

TPO_END_NAMESPACE
