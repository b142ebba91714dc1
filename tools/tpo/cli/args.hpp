#pragma once
// Flag parsing for the tpo tool: each subcommand declares its flags; anything else is a usage
// error naming the flag and what was expected. Numbers are read with one grammar (tpo/core/parse.hpp),
// the whole text or nothing, because "0.1x" silently read as 0.1 is a wrong experiment, not a
// convenience.

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tpo/core/error.hpp"
#include "tpo/core/parse.hpp"

namespace tpo_cli {

/// Bad usage: unknown or repeated flag, missing or malformed value.
class usage_error : public tpo::error {
public:
    using tpo::error::error;
};

struct flag_spec {
    std::string_view name;  // without the leading dashes
    bool takes_value;
};

class parsed_args {
public:
    parsed_args(std::span<const std::string> args, std::span<const flag_spec> specs, std::string_view command)
        : command_(command) {
        for (std::size_t i = 0; i < args.size(); ++i) {
            const std::string& a = args[i];
            if (a.size() < 3 || a[0] != '-' || a[1] != '-')
                fail(tpo::detail::concat("unexpected argument '", shorten(a), "', expected a flag such as --",
                                         specs.empty() ? "help" : specs.front().name));
            std::string name = a.substr(2);
            std::optional<std::string> inline_value;
            if (const auto eq = name.find('='); eq != std::string::npos) {
                inline_value = name.substr(eq + 1);
                name.resize(eq);
            }
            const flag_spec* spec = nullptr;
            for (const flag_spec& s : specs)
                if (s.name == name) spec = &s;
            if (!spec)
                fail(tpo::detail::concat("unknown flag '--", shorten(name), "', expected ",
                                         specs.empty() ? std::string("no flags") : "one of " + list(specs)));
            if (values_.count(name)) fail(tpo::detail::concat("flag --", name, " given twice, expected it once"));
            if (spec->takes_value) {
                if (inline_value) {
                    values_[name] = *inline_value;
                } else {
                    if (i + 1 >= args.size()) fail(tpo::detail::concat("flag --", name, ": missing value"));
                    values_[name] = args[++i];
                }
            } else {
                if (inline_value) fail(tpo::detail::concat("flag --", name, " takes no value"));
                values_[name] = "";
            }
        }
    }

    bool has(std::string_view name) const { return values_.count(std::string(name)) != 0; }

    std::string text(std::string_view name, std::string_view fallback) const {
        const auto it = values_.find(std::string(name));
        return it == values_.end() ? std::string(fallback) : it->second;
    }

    std::string required(std::string_view name) const {
        const auto it = values_.find(std::string(name));
        if (it == values_.end()) fail(tpo::detail::concat("missing required flag --", name));
        if (it->second.empty()) fail(tpo::detail::concat("flag --", name, ": empty value"));
        return it->second;
    }

    /// A finite decimal number (the grammar of tpo/core/parse.hpp: Python's float() without its
    /// whitespace stripping); ranges are checked where the option is (tpo::validate and the
    /// commands), each message naming the range.
    double real(std::string_view name, double fallback) const {
        if (!has(name)) return fallback;
        return real_value(name, text(name, ""));
    }

    /// `text`, one value of flag `name`, as a finite decimal number.
    double real_value(std::string_view name, const std::string& text) const {
        const std::optional<double> v = tpo::parse_real(text);
        if (!v)
            fail(tpo::detail::concat("flag --", name, ": '", shorten(text),
                                     "' is not a decimal number (such as 0.1, 1e-3 or -2)"));
        if (!std::isfinite(*v))
            fail(tpo::detail::concat("flag --", name, ": '", shorten(text), "' is ", *v,
                                     ", expected a finite number (at most 1.7976931348623157e308 in magnitude)"));
        return *v;
    }

    /// A decimal integer in [lo, hi] (Python's int() grammar in base 10, without stripping).
    std::int64_t integer(std::string_view name, std::int64_t fallback, std::int64_t lo, std::int64_t hi) const {
        if (!has(name)) return fallback;
        const std::string t = text(name, "");
        bool overflow = false;
        const std::optional<std::int64_t> v = tpo::parse_integer<std::int64_t>(t, &overflow);
        if (!v && !overflow)
            fail(tpo::detail::concat("flag --", name, ": '", shorten(t), "' is not a decimal integer"));
        if (!v || *v < lo || *v > hi)
            fail(tpo::detail::concat("flag --", name, ": ", shorten(t), " is out of range, expected ", lo, " to ", hi));
        return *v;
    }

    /// A decimal integer in [0, 2^64 - 1].
    std::uint64_t unsigned_integer(std::string_view name, std::uint64_t fallback) const {
        if (!has(name)) return fallback;
        const std::string t = text(name, "");
        bool overflow = false;
        const std::optional<std::uint64_t> v = tpo::parse_integer<std::uint64_t>(t, &overflow);
        if (!v && !overflow)
            fail(tpo::detail::concat("flag --", name, ": '", shorten(t), "' is not a decimal integer"));
        if (!v)
            fail(tpo::detail::concat("flag --", name, ": ", shorten(t), " is out of range, expected 0 to ",
                                     std::numeric_limits<std::uint64_t>::max()));
        return *v;
    }

    /// One of `choices`; `fallback` when absent.
    std::string choice(std::string_view name, std::string_view fallback,
                       std::initializer_list<std::string_view> choices) const {
        const std::string t = text(name, fallback);
        for (std::string_view c : choices)
            if (t == c) return t;
        std::string expected;
        for (std::string_view c : choices) expected += (expected.empty() ? "" : "|") + std::string(c);
        fail(tpo::detail::concat("flag --", name, ": '", shorten(t), "', expected ", expected));
    }

    [[noreturn]] void fail(const std::string& what) const {
        throw usage_error(tpo::detail::concat(command_, ": ", what));
    }

private:
    static std::string shorten(std::string_view s) {
        std::string out;
        for (char c : s.substr(0, 60)) out += (c >= 0x20 && c < 0x7f) ? c : '?';
        if (s.size() > 60) out += "...";
        return out;
    }
    static std::string list(std::span<const flag_spec> specs) {
        std::string s;
        for (const flag_spec& f : specs) s += (s.empty() ? "--" : ", --") + std::string(f.name);
        return s;
    }

    std::string command_;
    std::map<std::string, std::string> values_;
};

}  // namespace tpo_cli
