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

/// f(), with a library error named by the input directory; the tool's own errors already name
/// their file and pass through.
template <class F>
void with_directory(const std::filesystem::path& dir, F&& f) {
    try {
        f();
    } catch (const tpo::io::file_error&) {
        throw;
    } catch (const input_error&) {
        throw;
    } catch (const tpo::error& e) {
        throw input_error(tpo::detail::concat(dir.string(), ": ", e.what()));
    }
}

/// compute(double{}) for float64 inputs and compute(float{}) otherwise: the element type the run
/// computes in and writes its gradients in.
template <class F>
void with_element(tpo::io::npy_dtype dtype, F&& compute) {
    if (dtype == tpo::io::npy_dtype::f8)
        compute(double{});
    else
        compute(float{});
}

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

/// One value per sequence (P), read as float64: precomputed sequence scores.
struct sequence_values_file {
    std::string path;
    std::vector<double> values;

    tpo::sequence_values_view<const double> view() const {
        return {values.data(), static_cast<tpo::index_t>(values.size())};
    }
};

/// Which of a role's mutually exclusive inputs a dump directory holds. Each alternative is the
/// list of files that make it up (its first file names it); the one whose first file is present is
/// chosen, and every file of the others must be absent, so no file is ever silently ignored.
struct input_alternative {
    const char* what;                // "reference logits", "precomputed reference scores", ...
    std::vector<std::string> files;  // names without the directory
};

/// Whether DIR has an entry NAME of any kind. A dangling link, a link loop or a FIFO counts as
/// present, so that the reader, not the choice of inputs, reports what is wrong with it.
inline bool has_file(const std::filesystem::path& dir, const std::string& name) {
    std::error_code ec;
    return std::filesystem::exists(std::filesystem::symlink_status(dir / name, ec));
}

inline std::size_t choose_input(const std::filesystem::path& dir, const std::vector<input_alternative>& alternatives) {
    auto present = [&](const std::string& name) { return has_file(dir, name); };
    std::size_t chosen = alternatives.size();
    for (std::size_t k = 0; k < alternatives.size(); ++k)
        if (present(alternatives[k].files.front())) {
            chosen = k;
            break;
        }
    if (chosen == alternatives.size()) {
        std::string expected;
        for (std::size_t k = 0; k < alternatives.size(); ++k)
            expected += tpo::detail::concat(k ? " or " : "", alternatives[k].files.front(), " (", alternatives[k].what, ")");
        throw tpo::io::file_error(tpo::detail::concat((dir / alternatives.front().files.front()).string(),
                                                      ": file: does not exist, expected ", expected));
    }
    for (std::size_t k = 0; k < alternatives.size(); ++k) {
        if (k == chosen) continue;
        for (const std::string& name : alternatives[k].files)
            if (present(name))
                throw input_error(tpo::detail::concat((dir / name).string(), ": file: ", alternatives[k].what,
                                                      " given with ", alternatives[chosen].what, " (",
                                                      alternatives[chosen].files.front(), "), expected one of them"));
    }
    return chosen;
}

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

/// Sequence values (P) <f8, one per sequence of `like`, all finite.
inline sequence_values_file load_sequence_values(const std::string& path, const logits_file& like) {
    io::npy_array a = io::read_npy(path);
    if (a.dtype != io::npy_dtype::f8)
        throw input_error(tpo::detail::concat(path, ": descr: ", io::descr(a.dtype), ", expected '<f8'"));
    if (a.shape.size() != 1 || a.shape[0] != like.sequences())
        throw input_error(tpo::detail::concat(path, ": shape: ", io::shape_text(a.shape), ", expected (",
                                              like.sequences(), ",): one value per sequence of ", like.path, " ",
                                              io::shape_text(like.array.shape)));
    sequence_values_file f{path, std::move(a.values<double>())};
    for (std::size_t i = 0; i < f.values.size(); ++i)
        if (!std::isfinite(f.values[i]))
            throw input_error(tpo::detail::concat(path, ": data: element [", i, "] is ", f.values[i],
                                                  ", expected a finite score"));
    return f;
}

/// The rows the objective reads: row t of sequence s is scored against the label at position
/// t + 1 (t with --no-shift) unless that label is the ignore index. Rows that are not scored enter
/// no result (their gradient is zero) and are not read, by the tool as by the library.
template <class F>
void for_each_scored_row(const labels_file& y, tpo::row_alignment align, F&& f) {
    const std::int64_t length = y.shape[1];
    const std::int64_t scored = align.scored_rows(length);
    for (std::int64_t s = 0; s < y.shape[0]; ++s)
        for (std::int64_t t = 0; t < scored; ++t) {
            const std::size_t at = static_cast<std::size_t>(s * length + align.label_position(t));
            if (y.values[at] != align.ignore_index) f(s, t, at);
        }
}

/// Labels must match the logits' (P, L); the labels that are scored must lie in [0, V).
inline void check_labels(const labels_file& y, const logits_file& z, tpo::row_alignment align) {
    if (y.shape[0] != z.sequences() || y.shape[1] != z.length())
        throw input_error(tpo::detail::concat(y.path, ": shape: ", io::shape_text(y.shape), ", expected (",
                                              z.sequences(), ", ", z.length(), ") to match ", z.path, " ",
                                              io::shape_text(z.array.shape)));
    for_each_scored_row(y, align, [&](std::int64_t, std::int64_t, std::size_t at) {
        const std::int64_t label = y.values[at];
        if (label < 0 || label >= z.vocab())
            throw input_error(tpo::detail::concat(y.path, ": data: label ", label, " at ", index_text(y.shape, at),
                                                  " is outside [0, ", z.vocab(), ") and is not the ignore index ",
                                                  align.ignore_index));
    });
}

/// NaN or Inf in a scored row is an error; the rows that are not scored are not read.
inline void check_finite_rows(const logits_file& z, const labels_file& y, tpo::row_alignment align) {
    std::visit(
        [&](const auto& v) {
            using T = typename std::decay_t<decltype(v)>::value_type;
            if constexpr (std::is_floating_point_v<T>) {
                const auto vocab = static_cast<std::size_t>(z.vocab());
                for_each_scored_row(y, align, [&](std::int64_t s, std::int64_t t, std::size_t) {
                    const std::size_t row = static_cast<std::size_t>(s * z.length() + t) * vocab;
                    for (std::size_t i = row; i < row + vocab; ++i)
                        if (!std::isfinite(v[i]))
                            throw input_error(tpo::detail::concat(z.path, ": data: element ",
                                                                  index_text(z.array.shape, i), " is ", v[i],
                                                                  ", expected finite logits"));
                });
            }
        },
        z.array.data);
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
