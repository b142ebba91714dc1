#pragma once
// Where the tool's results go: standard output written through a buffer that reports a failed
// write (a full disk, /dev/full, a closed descriptor) as an error with the system's reason, and
// output directories that are removed again when the run that created them fails.

#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <ostream>
#include <streambuf>
#include <string>
#include <system_error>
#include <vector>

#include "tpo/io/file.hpp"

namespace tpo_cli {

/// A streambuf on a file descriptor that throws tpo::io::file_error when a write fails. With
/// `exceptions(badbit)` on the stream, the error reaches the caller with its reason.
class fd_output : public std::streambuf {
public:
    explicit fd_output(int fd, const char* name) : fd_(fd), name_(name) { setp(buffer_, buffer_ + sizeof buffer_); }

    /// Flushes, then closes the descriptor if anything was written, so an error the system reports
    /// only at close (a remote filesystem) is seen too.
    void finish() {
        flush_buffer();
        if (wrote_ && ::close(fd_) != 0 && errno != EINTR) fail(errno);
        wrote_ = false;
    }

protected:
    int_type overflow(int_type c) override {
        flush_buffer();
        if (!traits_type::eq_int_type(c, traits_type::eof())) {
            *pptr() = traits_type::to_char_type(c);
            pbump(1);
        }
        return traits_type::not_eof(c);
    }
    int sync() override {
        flush_buffer();
        return 0;
    }
    std::streamsize xsputn(const char* s, std::streamsize n) override {
        if (n > epptr() - pptr()) {
            flush_buffer();
            write_all(s, static_cast<std::size_t>(n));
            return n;
        }
        std::memcpy(pptr(), s, static_cast<std::size_t>(n));
        pbump(static_cast<int>(n));
        return n;
    }

private:
    void flush_buffer() {
        const std::size_t n = static_cast<std::size_t>(pptr() - pbase());
        setp(buffer_, buffer_ + sizeof buffer_);  // dropped even when the write fails: it is reported once
        write_all(buffer_, n);
    }
    void write_all(const char* p, std::size_t n) {
        while (n > 0) {
            const ssize_t w = ::write(fd_, p, n);
            if (w < 0) {
                if (errno == EINTR) continue;
                fail(errno);
            }
            wrote_ = true;
            p += w;
            n -= static_cast<std::size_t>(w);
        }
    }
    [[noreturn]] void fail(int e) const {
        throw tpo::io::file_error(tpo::detail::concat(name_, ": write failed (", std::strerror(e), ")"));
    }

    int fd_;
    const char* name_;
    bool wrote_ = false;
    char buffer_[1 << 16];
};

/// How the tool writes temporaries: unnamed (O_TMPFILE) unless TPO_TEMPORARY_FILES=named asks
/// for the named fallback (which the tests use to exercise it).
inline tpo::io::temporaries tool_temporaries() {
    const char* v = std::getenv("TPO_TEMPORARY_FILES");
    return v && std::string(v) == "named" ? tpo::io::temporaries::named : tpo::io::temporaries::unnamed;
}

/// An output directory, created with its missing parents; what this run created is removed again
/// (when empty) unless keep() was called, so a failed run leaves no directory behind either.
class output_directory {
public:
    output_directory(const std::string& dir, const char* flag) : path_(dir) {
        std::vector<std::filesystem::path> missing;
        std::error_code ec;
        for (std::filesystem::path p = path_; !p.empty() && !std::filesystem::exists(std::filesystem::symlink_status(p, ec));
             p = p.parent_path()) {
            missing.push_back(p);
            if (p == p.parent_path()) break;
        }
        for (auto it = missing.rbegin(); it != missing.rend(); ++it) {
            if (std::filesystem::create_directory(*it, ec)) created_.push_back(*it);
            if (ec) break;
        }
        if (ec || !std::filesystem::is_directory(path_, ec)) {
            const std::string why = ec ? ec.message() : "not a directory";
            remove_created();
            throw tpo::io::file_error(tpo::detail::concat(dir, ": ", flag, ": cannot create the output directory (", why,
                                                          "), expected a writable directory"));
        }
    }
    output_directory(const output_directory&) = delete;
    output_directory& operator=(const output_directory&) = delete;
    ~output_directory() { remove_created(); }

    const std::filesystem::path& path() const { return path_; }
    void keep() { created_.clear(); }

private:
    void remove_created() noexcept {
        for (auto it = created_.rbegin(); it != created_.rend(); ++it) ::rmdir(it->c_str());
        created_.clear();
    }

    std::filesystem::path path_;
    std::vector<std::filesystem::path> created_;
};

/// Ends a run that produced `text` for standard output and staged its files in `outputs` (in
/// `dir` when it has one): standard output first, so that when it cannot be written (a full disk,
/// /dev/full) no file is placed, and a target that is a directory is refused before anything is
/// printed; then the files, and the directory is kept.
inline void publish(tpo::io::staged_files& outputs, std::optional<output_directory>& dir, const std::string& text,
                    std::ostream& out) {
    outputs.check_targets();
    out << text;
    out.flush();
    outputs.commit();
    if (dir) dir->keep();
}

}  // namespace tpo_cli
