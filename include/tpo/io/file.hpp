#pragma once
// Whole-file reads and all-or-nothing writes.
//
// A reader of our outputs must never see a half-written file: every output is written under a
// temporary name in the destination directory (same filesystem, so rename is atomic) and renamed
// into place only once complete. staged_files extends that to a set of files: nothing is renamed
// until every file of the set has been written, and a failure removes every temporary.

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <unistd.h>

#include "tpo/core/error.hpp"

TPO_BEGIN_NAMESPACE
namespace io {

/// A file could not be opened, read or written.
class file_error : public error {
public:
    using error::error;
};

inline std::vector<unsigned char> read_file(const std::filesystem::path& path) {
    std::error_code ec;
    const auto status = std::filesystem::status(path, ec);
    if (ec || !std::filesystem::exists(status))
        throw file_error(tpo::detail::concat(path.string(), ": file: does not exist, expected a readable file"));
    if (std::filesystem::is_directory(status))
        throw file_error(tpo::detail::concat(path.string(), ": file: is a directory, expected a regular file"));
    std::ifstream in(path, std::ios::binary);
    if (!in)
        throw file_error(tpo::detail::concat(path.string(), ": file: cannot open for reading (", std::strerror(errno), ")"));
    std::vector<unsigned char> bytes;
    char chunk[65536];
    while (in) {
        in.read(chunk, sizeof chunk);
        bytes.insert(bytes.end(), chunk, chunk + in.gcount());
    }
    if (in.bad()) throw file_error(tpo::detail::concat(path.string(), ": file: read error"));
    return bytes;
}

namespace detail {
inline std::filesystem::path temporary_sibling(const std::filesystem::path& path) {
    // The process id and a counter keep concurrent writers (and repeated calls) apart.
    static unsigned counter = 0;
    std::filesystem::path tmp = path;
    tmp += tpo::detail::concat(".tmp-", ::getpid(), "-", counter++);
    return tmp;
}

inline void write_bytes(const std::filesystem::path& path, const std::filesystem::path& shown, std::string_view data) {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    if (!f)
        throw file_error(tpo::detail::concat(shown.string(), ": output: cannot create (", std::strerror(errno),
                                             "), expected a writable directory"));
    const std::size_t written = data.empty() ? 0 : std::fwrite(data.data(), 1, data.size(), f);
    const int saved = errno;
    const bool flushed = std::fflush(f) == 0;
    const bool closed = std::fclose(f) == 0;
    if (written != data.size() || !flushed || !closed) {
        std::remove(path.c_str());
        throw file_error(tpo::detail::concat(shown.string(), ": output: write failed (", std::strerror(saved), ")"));
    }
}
}  // namespace detail

/// A set of output files that appear together or not at all.
class staged_files {
public:
    staged_files() = default;
    staged_files(const staged_files&) = delete;
    staged_files& operator=(const staged_files&) = delete;
    ~staged_files() { discard(); }

    /// Writes `data` under a temporary name next to `path`.
    void add(const std::filesystem::path& path, std::string_view data) {
        const std::filesystem::path tmp = detail::temporary_sibling(path);
        detail::write_bytes(tmp, path, data);
        staged_.emplace_back(tmp, path);
    }

    /// Renames every staged file into place.
    void commit() {
        for (std::size_t i = 0; i < staged_.size(); ++i) {
            std::error_code ec;
            std::filesystem::rename(staged_[i].first, staged_[i].second, ec);
            if (ec) {
                // Files already renamed stay (they are complete); the rest are removed.
                const std::string target = staged_[i].second.string();
                staged_.erase(staged_.begin(), staged_.begin() + static_cast<std::ptrdiff_t>(i));
                discard();
                throw file_error(tpo::detail::concat(target, ": output: cannot rename into place (", ec.message(),
                                                     ")"));
            }
        }
        staged_.clear();
    }

    void discard() noexcept {
        for (auto& [tmp, path] : staged_) {
            std::error_code ec;
            std::filesystem::remove(tmp, ec);
        }
        staged_.clear();
    }

private:
    std::vector<std::pair<std::filesystem::path, std::filesystem::path>> staged_;
};

inline void write_file_atomically(const std::filesystem::path& path, std::string_view data) {
    staged_files files;
    files.add(path, data);
    files.commit();
}

}  // namespace io
TPO_END_NAMESPACE
