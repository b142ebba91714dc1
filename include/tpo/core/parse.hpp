#pragma once
// The one grammar numbers given as text are read with (the tpo tool's flags, loss weights):
// what Python's float() and int() accept, without their stripping of surrounding whitespace and
// with ASCII digits only. So "0.1", ".5", "5.", "1e-3", "1E+05", "+2", "-0", "1_000.5" and (for
// float) "inf", "nan" in any case are numbers; "0x10", " 1", "1 ", "1e", ".", "1__0", "_1", "1_"
// and "" are not. Values are rounded to nearest like Python's (so "1e400" is inf and "1e-400" is
// 0); whether a value is in range is the caller's check.

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>

#include "tpo/core/config.hpp"

TPO_BEGIN_NAMESPACE
namespace detail {

inline bool is_digit(char c) { return c >= '0' && c <= '9'; }

inline char lower(char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; }

inline bool equals_lower(std::string_view s, std::string_view word) {
    if (s.size() != word.size()) return false;
    for (std::size_t i = 0; i < s.size(); ++i)
        if (lower(s[i]) != word[i]) return false;
    return true;
}

/// Reads digit (["_"] digit)* at `pos`, appending the digits to `out`; false when there is none or
/// an underscore is not between two digits.
inline bool digit_part(std::string_view s, std::size_t& pos, std::string& out) {
    if (pos >= s.size() || !is_digit(s[pos])) return false;
    out += s[pos++];
    while (pos < s.size()) {
        if (is_digit(s[pos])) {
            out += s[pos++];
        } else if (s[pos] == '_' && pos + 1 < s.size() && is_digit(s[pos + 1])) {
            out += s[pos + 1];
            pos += 2;
        } else {
            break;
        }
    }
    return true;
}

/// The decimal exponent of the leading nonzero digit of "digits[.digits][e[sign]digits]" (with a
/// nonzero digit), the exponent's magnitude capped far beyond any double's.
inline long long leading_exponent(std::string_view text) {
    const std::size_t e = text.find('e');
    const std::string_view mantissa = text.substr(0, e);
    long long exponent = 0;
    if (e != std::string_view::npos) {
        std::size_t i = e + 1;
        const bool minus = i < text.size() && text[i] == '-';
        if (i < text.size() && (text[i] == '-' || text[i] == '+')) ++i;
        for (; i < text.size(); ++i) exponent = std::min(exponent * 10 + (text[i] - '0'), 1000000000LL);
        if (minus) exponent = -exponent;
    }
    const std::size_t point = std::min(mantissa.find('.'), mantissa.size());
    const std::size_t first = mantissa.find_first_not_of("0.");
    if (first == std::string_view::npos) return 0;
    const long long position = first < point ? static_cast<long long>(point - first) - 1
                                             : -static_cast<long long>(first - point);
    return position + exponent;
}

}  // namespace detail

/// A decimal floating-point number as Python's float() reads it (see the top of this file).
inline std::optional<double> parse_real(std::string_view s) {
    std::size_t pos = 0;
    bool negative = false;
    if (pos < s.size() && (s[pos] == '+' || s[pos] == '-')) negative = s[pos++] == '-';
    const std::string_view rest = s.substr(pos);
    if (detail::equals_lower(rest, "inf") || detail::equals_lower(rest, "infinity"))
        return negative ? -std::numeric_limits<double>::infinity() : std::numeric_limits<double>::infinity();
    if (detail::equals_lower(rest, "nan")) return std::numeric_limits<double>::quiet_NaN();
    std::string text;  // digits, '.', 'e', sign: what std::from_chars reads
    const bool whole = detail::digit_part(s, pos, text);
    bool fraction = false;
    if (pos < s.size() && s[pos] == '.') {
        text += '.';
        ++pos;
        fraction = detail::digit_part(s, pos, text);
    }
    if (!whole && !fraction) return std::nullopt;
    if (pos < s.size() && (s[pos] == 'e' || s[pos] == 'E')) {
        text += 'e';
        ++pos;
        if (pos < s.size() && (s[pos] == '+' || s[pos] == '-')) text += s[pos++];
        if (!detail::digit_part(s, pos, text)) return std::nullopt;
    }
    if (pos != s.size()) return std::nullopt;
    double value = 0;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (end != text.data() + text.size()) return std::nullopt;
    if (ec == std::errc::result_out_of_range) {
        // Correctly rounded, the value is inf or a zero (from_chars leaves `value` alone): which
        // one the decimal exponent of the leading nonzero digit says, hundreds away from 0 here.
        value = detail::leading_exponent(text) > 0 ? std::numeric_limits<double>::infinity() : 0.0;
    } else if (ec != std::errc{}) {
        return std::nullopt;
    }
    return negative ? -value : value;
}

/// A decimal integer as Python's int() reads it in base 10 (see the top of this file), when it
/// fits in T; `overflow` is set when it is a number that does not.
template <class T>
std::optional<T> parse_integer(std::string_view s, bool* overflow = nullptr) {
    if (overflow) *overflow = false;
    std::size_t pos = 0;
    bool negative = false;
    if (pos < s.size() && (s[pos] == '+' || s[pos] == '-')) negative = s[pos++] == '-';
    std::string digits = negative ? "-" : "";
    if (!detail::digit_part(s, pos, digits) || pos != s.size()) return std::nullopt;
    if (negative && digits.find_first_not_of("-0") == std::string::npos) return T{0};  // "-0" is 0
    T value{};
    const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), value);
    if (ec == std::errc::result_out_of_range || (ec == std::errc::invalid_argument && negative)) {
        // "-5" for an unsigned T is a number out of range, like 2^64 is.
        if (overflow) *overflow = true;
        return std::nullopt;
    }
    if (ec != std::errc{} || end != digits.data() + digits.size()) return std::nullopt;
    return value;
}

TPO_END_NAMESPACE
