#pragma once
// Every failure the library reports is a tpo::error, so a trainer can catch one type.
// Messages name the argument, the value or shape found, and what was expected.

#include <sstream>
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

namespace detail {

template <class... Parts>
std::string concat(Parts&&... parts) {
    std::ostringstream out;
    out.precision(17);
    (out << ... << std::forward<Parts>(parts));
    return out.str();
}

template <class Error = value_error, class... Parts>
void require(bool condition, Parts&&... parts) {
    if (!condition) throw Error(concat(std::forward<Parts>(parts)...));
}

}  // namespace detail

TPO_END_NAMESPACE
