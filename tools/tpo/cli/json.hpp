#pragma once
// A minimal JSON object writer: the tool prints numbers and arrays of numbers only. Doubles are
// printed with 17 significant digits so a script reads back exactly what the library computed;
// JSON has no NaN or infinity, so those become null.

#include <cmath>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

namespace tpo_cli {

class json_object {
public:
    void number(std::string_view key, double v) { field(key) += format(v); }

    void numbers(std::string_view key, const std::vector<double>& values) {
        std::string& s = field(key);
        s += '[';
        for (std::size_t i = 0; i < values.size(); ++i) s += (i ? ", " : "") + format(values[i]);
        s += ']';
    }

    std::string str() const { return body_.empty() ? "{}\n" : "{\n" + body_ + "\n}\n"; }

private:
    std::string& field(std::string_view key) {
        if (!body_.empty()) body_ += ",\n";
        body_ += "  \"";
        body_ += key;
        body_ += "\": ";
        return body_;
    }
    static std::string format(double v) {
        if (!std::isfinite(v)) return "null";
        char buf[32];
        std::snprintf(buf, sizeof buf, "%.17g", v);
        return buf;
    }
    std::string body_;
};

}  // namespace tpo_cli
