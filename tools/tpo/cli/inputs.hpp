#pragma once
// Loading and checking the tool's input arrays. Every check names the file, so a user with ten
// .npy files in a directory knows which one to fix; the library's own checks run afterwards as a
// second line of defence.

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include "tpo/core/error.hpp"
#include "tpo/core/views.hpp"
#include "tpo/io/npy.hpp"

namespace tpo_cli {

namespace io = tpo::io;

/// Bad input data (as opposed to bad usage): same exit status, different wording.
class input_error : public tpo::error {
public:
    using tpo::error::error;
};

inline std::string index_text(std::span<const std::int64_t> shape, std::uint64_t flat) {
    std::vector<std::int64_t> idx(shape.size());
    for (std::size_t k = shape.size(); k-- > 0;) {
        const auto d = static_cast<std::uint64_t>(shape[k]);
        idx[k] = static_cast<std::int64_t>(d ? flat % d : 0);
        flat = d ? flat / d : 0;
    }
    std::string s = "[";
    for (std::size_t k = 0; k < idx.size(); ++k) s += (k ? ", " : "") + std::to_string(idx[k]);
    return s + "]";
}

struct logits_file {
    std::string path;
    io::npy_array array;

    tpo::index_t sequences() const { return array.shape[0]; }
    tpo::index_t length() const { return array.shape[1]; }
    tpo::index_t vocab() const { return array.shape[2]; }

    template <class T>
    tpo::logits_view<const T> view() const {
        return {array.values<T>().data(), sequences(), length(), vocab()};
    }
};

struct labels_file {
    std::string path;
    std::vector<std::int64_t> values;  // widened: both <i4 and <i8 are accepted
    std::vector<std::int64_t> shape;

    tpo::labels_view<const std::int64_t> view() const { return {values.data(), shape[0], shape[1]}; }
};

/// Any float array (for corrupt): dtype <f4 or <f8, any shape.
inline io::npy_array load_float_array(const std::string& path) {
    io::npy_array a = io::read_npy(path);
    if (a.dtype != io::npy_dtype::f4 && a.dtype != io::npy_dtype::f8)
        throw input_error(tpo::detail::concat(path, ": descr: ", io::descr(a.dtype), ", expected '<f4' or '<f8'"));
    return a;
}

inline logits_file load_logits(const std::string& path) {
    logits_file f{path, load_float_array(path)};
    const auto& shape = f.array.shape;
    if (shape.size() != 3)
        throw input_error(tpo::detail::concat(path, ": shape: ", io::shape_text(shape), " has ", shape.size(),
                                              " dimensions, expected 3 (P, L, V)"));
    if (shape[0] < 1 || shape[1] < 1 || shape[2] < 1)
        throw input_error(tpo::detail::concat(path, ": shape: ", io::shape_text(shape),
                                              ", expected (P, L, V) with every dimension at least 1"));
    std::visit(
        [&](const auto& v) {
            using T = typename std::decay_t<decltype(v)>::value_type;
            if constexpr (std::is_floating_point_v<T>) {
                for (std::size_t i = 0; i < v.size(); ++i)
                    if (!std::isfinite(v[i]))
                        throw input_error(tpo::detail::concat(path, ": data: element ", index_text(shape, i), " is ",
                                                              v[i], ", expected finite logits"));
            }
        },
        f.array.data);
    return f;
}

inline labels_file load_labels(const std::string& path) {
    io::npy_array a = io::read_npy(path);
    labels_file f{path, {}, a.shape};
    if (a.dtype == io::npy_dtype::i4) {
        const auto& v = a.values<std::int32_t>();
        f.values.assign(v.begin(), v.end());
    } else if (a.dtype == io::npy_dtype::i8) {
        f.values = std::move(a.values<std::int64_t>());
    } else {
        throw input_error(tpo::detail::concat(path, ": descr: ", io::descr(a.dtype), ", expected '<i4' or '<i8'"));
    }
    if (f.shape.size() != 2)
        throw input_error(tpo::detail::concat(path, ": shape: ", io::shape_text(f.shape), " has ", f.shape.size(),
                                              " dimensions, expected 2 (P, L)"));
    return f;
}

/// Labels must match the logits' (P, L) and lie in [0, V) unless they are the ignore index.
inline void check_labels(const labels_file& y, const logits_file& z, std::int64_t ignore_index) {
    if (y.shape[0] != z.sequences() || y.shape[1] != z.length())
        throw input_error(tpo::detail::concat(y.path, ": shape: ", io::shape_text(y.shape), ", expected (",
                                              z.sequences(), ", ", z.length(), ") to match ", z.path, " ",
                                              io::shape_text(z.array.shape)));
    for (std::size_t i = 0; i < y.values.size(); ++i) {
        const std::int64_t label = y.values[i];
        if (label != ignore_index && (label < 0 || label >= z.vocab()))
            throw input_error(tpo::detail::concat(y.path, ": data: label ", label, " at ", index_text(y.shape, i),
                                                  " is outside [0, ", z.vocab(), ") and is not the ignore index ",
                                                  ignore_index));
    }
}

inline void check_same_shape(const logits_file& a, const logits_file& b) {
    if (a.array.shape != b.array.shape)
        throw input_error(tpo::detail::concat(b.path, ": shape: ", io::shape_text(b.array.shape), ", expected ",
                                              io::shape_text(a.array.shape), " as ", a.path));
}

inline void check_same_dtype(const logits_file& a, const logits_file& b) {
    if (a.array.dtype != b.array.dtype)
        throw input_error(tpo::detail::concat(b.path, ": descr: ", io::descr(b.array.dtype), ", expected ",
                                              io::descr(a.array.dtype), " as ", a.path));
}

}  // namespace tpo_cli
