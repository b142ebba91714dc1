#pragma once
// Every failure the library reports is a tpo::error, so a trainer can catch one type.
// Messages name the argument, the value or shape found, and what was expected.

#include <charconv>
#include <sstream>
#include <type_traits>
#include <stdexcept>
#include <string>
#include <utility>

#include "tpo/core/config.hpp"

TPO_BEGIN_NAMESPACE

class error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// A tensor's shape or layout does not fit the call.
class shape_error : public error {
public:
    using error::error;
};

/// A value (label, logit, hyperparameter) is outside what the formula accepts.
class value_error : public error {
public:
    using error::error;
};

/// A result (loss, metric or gradient) would not be finite: something overflowed. The inputs
/// passed their checks, so the message names the value that overflowed and the settings behind it.
class overflow_error : public value_error {
public:
    using value_error::value_error;
};

namespace detail {

// Floating-point values print in their shortest round-trip form (0.6, not 0.59999999999999998),
// so a message shows the value the user typed.
template <class Part>
void append(std::ostringstream& out, const Part& part) {
    if constexpr (std::is_floating_point_v<Part>) {
        char buffer[64];
        const auto result = std::to_chars(buffer, buffer + sizeof buffer, part);
        out.write(buffer, result.ptr - buffer);
    } else {
        out << part;
    }
}

template <class... Parts>
std::string concat(const Parts&... parts) {
    std::ostringstream out;
    (append(out, parts), ...);
    return out.str();
}

template <class Error = value_error, class... Parts>
void require(bool condition, Parts&&... parts) {
    if (!condition) throw Error(concat(parts...));
}

}  // namespace detail

TPO_END_NAMESPACE
