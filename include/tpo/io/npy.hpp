#pragma once
// A validating reader and writer for NumPy's .npy format (versions 1.0, 2.0 and 3.0).
//
// Files handed to the tool come from anywhere, so the parser trusts nothing: the header is parsed
// as the small Python literal it must be (no eval, no recursion), the element count is computed
// with overflow checks, and the payload size must equal what the header promises before anything
// proportional to the shape is allocated. Every failure is a tpo::io::format_error whose one-line
// message names the file, the field and what was expected.
//
// Supported element types: <f4 <f8 <i4 <i8 |u1, C order only. Half floats (<f2), big-endian data
// and Fortran order are rejected rather than silently converted.

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <variant>
#include <vector>

#include "tpo/core/error.hpp"
#include "tpo/io/file.hpp"

static_assert(std::endian::native == std::endian::little, "tpo/io/npy.hpp reads little-endian data in place");

TPO_BEGIN_NAMESPACE
namespace io {

/// A file's content or header does not have the form the reader expects.
class format_error : public error {
public:
    using error::error;
};

enum class npy_dtype { f4, f8, i4, i8, u1 };

inline const char* descr(npy_dtype d) {
    switch (d) {
    case npy_dtype::f4: return "<f4";
    case npy_dtype::f8: return "<f8";
    case npy_dtype::i4: return "<i4";
    case npy_dtype::i8: return "<i8";
    case npy_dtype::u1: return "|u1";
    }
    return "?";
}

inline std::size_t item_size(npy_dtype d) {
    switch (d) {
    case npy_dtype::f4: return 4;
    case npy_dtype::f8: return 8;
    case npy_dtype::i4: return 4;
    case npy_dtype::i8: return 8;
    case npy_dtype::u1: return 1;
    }
    return 0;
}

template <class T>
constexpr npy_dtype dtype_of() {
    if constexpr (std::is_same_v<T, float>) return npy_dtype::f4;
    else if constexpr (std::is_same_v<T, double>) return npy_dtype::f8;
    else if constexpr (std::is_same_v<T, std::int32_t>) return npy_dtype::i4;
    else if constexpr (std::is_same_v<T, std::int64_t>) return npy_dtype::i8;
    else if constexpr (std::is_same_v<T, std::uint8_t>) return npy_dtype::u1;
    else static_assert(!sizeof(T), "no .npy dtype for this element type");
}

/// Limits that keep a hostile header from costing more than a small, fixed amount of work.
struct npy_limits {
    std::size_t max_header_bytes = 65536;  // NumPy itself refuses headers over 10000 bytes by default
    std::size_t max_dimensions = 32;       // NumPy's NPY_MAXDIMS
};

struct npy_header {
    int major = 1, minor = 0;
    npy_dtype dtype = npy_dtype::f4;
    std::vector<std::int64_t> shape;
    std::size_t data_offset = 0;  // bytes before the payload
    std::uint64_t count = 1;      // number of elements
    std::uint64_t data_bytes = 0;
};

inline std::string shape_text(std::span<const std::int64_t> shape) {
    std::string s = "(";
    for (std::size_t i = 0; i < shape.size(); ++i) {
        if (i) s += ", ";
        s += std::to_string(shape[i]);
    }
    if (shape.size() == 1) s += ",";
    return s + ")";
}

using npy_storage = std::variant<std::vector<float>, std::vector<double>, std::vector<std::int32_t>,
                                 std::vector<std::int64_t>, std::vector<std::uint8_t>>;

/// A whole array in memory: shape and typed, owned elements in C order.
struct npy_array {
    npy_dtype dtype = npy_dtype::f4;
    std::vector<std::int64_t> shape;
    npy_storage data;

    std::uint64_t size() const {
        return std::visit([](const auto& v) { return static_cast<std::uint64_t>(v.size()); }, data);
    }
    template <class T>
    bool holds() const {
        return std::holds_alternative<std::vector<T>>(data);
    }
    template <class T>
    std::vector<T>& values() {
        return std::get<std::vector<T>>(data);
    }
    template <class T>
    const std::vector<T>& values() const {
        return std::get<std::vector<T>>(data);
    }
};

namespace detail {

// A cursor over the header's dictionary literal. Errors name the file and the field being read.
class npy_header_parser {
public:
    npy_header_parser(std::string_view text, std::string_view file) : text_(text), file_(file) {}

    void parse(npy_header& h, const npy_limits& limits) {
        bool have_descr = false, have_order = false, have_shape = false;
        skip_space();
        expect('{', "header", "a dictionary starting with '{'");
        for (;;) {
            skip_space();
            if (peek() == '}') {
                ++pos_;
                break;
            }
            const std::string key = string_literal("header", "a quoted key or '}'");
            skip_space();
            expect(':', printable(key), "':' after the key");
            skip_space();
            if (key == "descr") {
                duplicate(have_descr, key);
                h.dtype = parse_descr(string_literal("descr", "a quoted dtype string such as '<f4'"));
            } else if (key == "fortran_order") {
                duplicate(have_order, key);
                if (word("False")) {
                } else if (word("True")) {
                    fail("fortran_order", "True: Fortran-ordered arrays are not supported, expected False "
                                          "(save a C-contiguous array, e.g. numpy.ascontiguousarray)");
                } else {
                    fail("fortran_order", "expected True or False");
                }
            } else if (key == "shape") {
                duplicate(have_shape, key);
                parse_shape(h, limits);
            } else {
                fail("header", "unexpected key '" + printable(key) + "', expected only descr, fortran_order, shape");
            }
            skip_space();
            if (peek() == ',') {
                ++pos_;
                continue;
            }
            skip_space();
            expect('}', "header", "',' or '}' after a value");
            break;
        }
        skip_space();
        if (pos_ != text_.size())
            fail("header", "unexpected text after the dictionary, expected only spaces and a newline");
        if (!have_descr) fail("descr", "missing, expected a key 'descr'");
        if (!have_order) fail("fortran_order", "missing, expected a key 'fortran_order'");
        if (!have_shape) fail("shape", "missing, expected a key 'shape'");
    }

    [[noreturn]] void fail(std::string_view field, std::string_view what) const {
        throw format_error(tpo::detail::concat(file_, ": ", field, ": ", what));
    }

private:
    char peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }

    void skip_space() {
        while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\n' ||
                                       text_[pos_] == '\r'))
            ++pos_;
    }

    void expect(char c, std::string_view field, std::string_view what) {
        if (peek() != c || pos_ >= text_.size()) fail(field, tpo::detail::concat("expected ", what));
        ++pos_;
    }

    bool word(std::string_view w) {
        if (text_.substr(pos_, w.size()) != w) return false;
        pos_ += w.size();
        return true;
    }

    void duplicate(bool& seen, const std::string& key) const {
        if (seen) fail(key, "appears twice, expected each key once");
        seen = true;
    }

    static std::string printable(std::string_view s) {
        std::string out;
        for (char c : s.substr(0, 40)) out += (c >= 0x20 && c < 0x7f) ? c : '?';
        if (s.size() > 40) out += "...";
        return out;
    }

    std::string string_literal(std::string_view field, std::string_view what) {
        const char quote = peek();
        if (quote != '\'' && quote != '"') fail(field, tpo::detail::concat("expected ", what));
        const std::size_t start = ++pos_;
        while (pos_ < text_.size() && text_[pos_] != quote) {
            if (text_[pos_] == '\\') fail(field, "escape sequences are not supported in header strings");
            ++pos_;
        }
        if (pos_ >= text_.size()) fail(field, "unterminated string, expected a closing quote");
        return std::string(text_.substr(start, pos_++ - start));
    }

    npy_dtype parse_descr(const std::string& d) const {
        for (npy_dtype t : {npy_dtype::f4, npy_dtype::f8, npy_dtype::i4, npy_dtype::i8, npy_dtype::u1})
            if (d == descr(t)) return t;
        // NumPy writes uint8 as '|u1'; the other byte orders of a one-byte type mean the same.
        if (d == "<u1" || d == "=u1" || d == "u1") return npy_dtype::u1;
        std::string why = tpo::detail::concat("'", printable(d), "' is not supported");
        if (!d.empty() && d[0] == '>') why += " (big-endian)";
        if (d.size() >= 2 && d.substr(1) == "f2") why += " (half precision: convert to float32 first)";
        fail("descr", why + ", expected one of '<f4', '<f8', '<i4', '<i8', '|u1'");
    }

    void parse_shape(npy_header& h, const npy_limits& limits) {
        expect('(', "shape", "a tuple such as (2, 3)");
        h.shape.clear();
        for (;;) {
            skip_space();
            if (peek() == ')') {
                ++pos_;
                break;
            }
            if (h.shape.size() >= limits.max_dimensions)
                fail("shape", tpo::detail::concat("more than ", limits.max_dimensions, " dimensions"));
            if (peek() < '0' || peek() > '9') fail("shape", "expected a non-negative integer dimension");
            std::uint64_t value = 0;
            while (peek() >= '0' && peek() <= '9') {
                const auto digit = static_cast<std::uint64_t>(peek() - '0');
                if (value > (static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) - digit) / 10)
                    fail("shape", "dimension does not fit in 64 bits");
                value = value * 10 + digit;
                ++pos_;
            }
            if (peek() == 'L') ++pos_;  // Python 2 long literal, as old NumPy wrote
            h.shape.push_back(static_cast<std::int64_t>(value));
            skip_space();
            if (peek() == ',') {
                ++pos_;
                continue;
            }
            skip_space();
            expect(')', "shape", "',' or ')' in the shape tuple");
            break;
        }
        // A one-element tuple needs its comma in Python: "(3)" is the integer 3, not a shape.
    }

    std::string_view text_;
    std::string_view file_;
    std::size_t pos_ = 0;
};

inline std::uint32_t read_le(const unsigned char* p, int bytes) {
    std::uint32_t v = 0;
    for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
    return v;
}

}  // namespace detail

/// Parses the magic, version and header of `bytes` (the whole file or at least its header) and
/// checks that `total_bytes` (the whole file's size) holds exactly the promised payload.
inline npy_header parse_npy_header(std::span<const unsigned char> bytes, std::uint64_t total_bytes,
                                   std::string_view file, const npy_limits& limits = {}) {
    auto fail = [&](std::string_view field, std::string_view what) -> void {
        throw format_error(tpo::detail::concat(file, ": ", field, ": ", what));
    };
    static constexpr unsigned char magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
    if (bytes.size() < 6 || std::memcmp(bytes.data(), magic, 6) != 0)
        fail("magic", bytes.size() < 6 ? "file too short, expected a .npy file starting with \\x93NUMPY"
                                       : "not a .npy file, expected it to start with \\x93NUMPY");
    if (bytes.size() < 8) fail("version", "file truncated before the version bytes");
    npy_header h;
    h.major = bytes[6];
    h.minor = bytes[7];
    if (!((h.major == 1 || h.major == 2 || h.major == 3) && h.minor == 0))
        fail("version", tpo::detail::concat(h.major, ".", h.minor, " is not supported, expected 1.0, 2.0 or 3.0"));
    const int length_bytes = h.major == 1 ? 2 : 4;
    const std::size_t prefix = 8 + static_cast<std::size_t>(length_bytes);
    if (bytes.size() < prefix) fail("header length", "file truncated before the header length");
    const std::uint32_t header_len = detail::read_le(bytes.data() + 8, length_bytes);
    if (header_len > limits.max_header_bytes)
        fail("header length", tpo::detail::concat(header_len, " bytes, expected at most ", limits.max_header_bytes));
    if (bytes.size() < prefix + header_len)
        fail("header", tpo::detail::concat("file truncated: the header needs ", header_len, " bytes, ",
                                           bytes.size() - prefix, " present"));
    std::string_view text(reinterpret_cast<const char*>(bytes.data() + prefix), header_len);
    // Versions 1 and 2 are latin-1, version 3 UTF-8; the keys and values we accept are ASCII either way.
    for (char c : text)
        if (static_cast<unsigned char>(c) >= 0x80 || (static_cast<unsigned char>(c) < 0x20 && c != '\n' && c != ' ' &&
                                                      c != '\t' && c != '\r'))
            fail("header", "contains a control or non-ASCII byte, expected a Python dictionary literal");
    detail::npy_header_parser(text, file).parse(h, limits);
    h.data_offset = prefix + header_len;

    std::uint64_t count = 1;
    bool overflow = false;
    for (std::int64_t d : h.shape) {
        const auto u = static_cast<std::uint64_t>(d);
        if (u != 0 && count > std::numeric_limits<std::uint64_t>::max() / u) overflow = true;
        count *= u;
    }
    const std::uint64_t item = item_size(h.dtype);
    if (overflow || count > std::numeric_limits<std::uint64_t>::max() / item ||
        count > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        fail("shape", tpo::detail::concat(shape_text(h.shape), " has too many elements to address"));
    h.count = count;
    h.data_bytes = count * item;
    if (total_bytes < h.data_offset) fail("data", "file size smaller than its header");
    const std::uint64_t payload = total_bytes - h.data_offset;
    if (payload < h.data_bytes)
        fail("data", tpo::detail::concat("file truncated: shape ", shape_text(h.shape), " of ", descr(h.dtype),
                                         " needs ", h.data_bytes, " bytes, ", payload, " present"));
    if (payload > h.data_bytes)
        fail("data", tpo::detail::concat(payload - h.data_bytes, " bytes after the ", h.data_bytes,
                                         " bytes that shape ", shape_text(h.shape), " of ", descr(h.dtype),
                                         " needs, expected none"));
    return h;
}

namespace detail {
/// An array of the header's dtype and shape whose payload `read(destination, bytes)` supplies.
template <class Read>
npy_array make_array(const npy_header& h, Read&& read) {
    npy_array a;
    a.dtype = h.dtype;
    a.shape = h.shape;
    auto fill = [&](auto tag) {
        using T = decltype(tag);
        std::vector<T> v(static_cast<std::size_t>(h.count));
        if (h.data_bytes) read(static_cast<void*>(v.data()), static_cast<std::size_t>(h.data_bytes));
        a.data = std::move(v);
    };
    switch (h.dtype) {
    case npy_dtype::f4: fill(float{}); break;
    case npy_dtype::f8: fill(double{}); break;
    case npy_dtype::i4: fill(std::int32_t{}); break;
    case npy_dtype::i8: fill(std::int64_t{}); break;
    case npy_dtype::u1: fill(std::uint8_t{}); break;
    }
    return a;
}
}  // namespace detail

/// Parses a whole .npy file held in memory.
inline npy_array parse_npy(std::span<const unsigned char> bytes, std::string_view file, const npy_limits& limits = {}) {
    const npy_header h = parse_npy_header(bytes, bytes.size(), file, limits);
    return detail::make_array(h, [&](void* to, std::size_t n) { std::memcpy(to, bytes.data() + h.data_offset, n); });
}

/// Reads and validates a .npy file: a regular file only (see io::input_file). The header is
/// checked against the file's size before the payload is allocated, and the payload is read
/// straight into the array (one copy in memory).
inline npy_array read_npy(const std::filesystem::path& path, const npy_limits& limits = {}) {
    const input_file in(path);
    const std::uint64_t size = in.size();
    std::vector<unsigned char> prefix(static_cast<std::size_t>(std::min<std::uint64_t>(size, 12 + limits.max_header_bytes)));
    if (!prefix.empty()) in.read_at(prefix.data(), prefix.size(), 0);
    const npy_header h = parse_npy_header(prefix, size, in.name(), limits);
    npy_array a = detail::make_array(h, [&](void* to, std::size_t n) { in.read_at(to, n, h.data_offset); });
    if (in.grew()) in.fail("read error (the file grew while it was read)");
    return a;
}

/// The bytes of a .npy file (version 1.0, or 2.0 when the header needs it) holding `count`
/// elements of `dtype` with the given shape.
inline std::string encode_npy(npy_dtype dtype, std::span<const std::int64_t> shape, const void* data) {
    std::uint64_t count = 1;
    for (std::int64_t d : shape) {
        tpo::detail::require<shape_error>(d >= 0, "npy: negative dimension in shape ", shape_text(shape));
        count *= static_cast<std::uint64_t>(d);
    }
    std::string dict = tpo::detail::concat("{'descr': '", descr(dtype), "', 'fortran_order': False, 'shape': ",
                                           shape_text(shape), ", }");
    // Pad with spaces so that the payload starts on a 64-byte boundary, newline last.
    const bool v2 = dict.size() + 1 + 10 > 65535;
    const std::size_t prefix = v2 ? 12 : 10;
    const std::size_t total = (prefix + dict.size() + 1 + 63) / 64 * 64;
    dict.append(total - prefix - dict.size() - 1, ' ');
    dict += '\n';
    std::string out = "\x93NUMPY";
    out += static_cast<char>(v2 ? 2 : 1);
    out += '\0';
    const std::size_t n = dict.size();
    for (std::size_t i = 0; i < (v2 ? 4u : 2u); ++i) out += static_cast<char>((n >> (8 * i)) & 0xff);
    out += dict;
    out.append(static_cast<const char*>(data), static_cast<std::size_t>(count * item_size(dtype)));
    return out;
}

template <class T>
std::string encode_npy(std::span<const std::int64_t> shape, std::span<const T> values) {
    std::uint64_t count = 1;
    for (std::int64_t d : shape) count *= static_cast<std::uint64_t>(d < 0 ? 0 : d);
    tpo::detail::require<shape_error>(count == values.size(), "npy: shape ", shape_text(shape), " holds ", count,
                                      " elements, ", values.size(), " given");
    return encode_npy(dtype_of<T>(), shape, values.data());
}

inline std::string encode_npy(const npy_array& a) {
    return std::visit(
        [&](const auto& v) {
            using T = typename std::decay_t<decltype(v)>::value_type;
            return encode_npy<T>(a.shape, std::span<const T>(v));
        },
        a.data);
}

/// Writes a .npy file atomically (temporary name in the same directory, then rename).
template <class T>
void write_npy(const std::filesystem::path& path, std::span<const std::int64_t> shape, std::span<const T> values) {
    write_file_atomically(path, encode_npy<T>(shape, values));
}

}  // namespace io
TPO_END_NAMESPACE
