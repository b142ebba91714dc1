#pragma once
// Whole-file reads and all-or-nothing writes (POSIX; the unnamed temporaries are Linux's).
//
// Inputs: only regular files are read (a FIFO, a device such as /dev/zero or a directory is
// refused before any byte is read), up to a caller's size limit, and every failure names the file
// and the system's reason, read right after the call that failed.
//
// Outputs: a staged_files set is written to temporaries in each target's directory (same
// filesystem, so the final renames are atomic) and appears together or not at all:
//   - While the data is written, the temporaries have no name where the filesystem allows it
//     (O_TMPFILE): a process killed then, even by SIGKILL, leaves nothing behind. Elsewhere they are
//     named `.tpo-*` files that remove_temporaries() (installed on SIGINT, SIGTERM, SIGHUP, SIGQUIT
//     and SIGPIPE by remove_temporaries_on_signals()) deletes.
//   - commit() gives the temporaries names, keeps a hard link to every file it replaces, then
//     renames the new files into place; if a rename fails, the files already placed are put back
//     (restored from the links, or removed where there was none) and nothing of the set remains.
//     The calling thread blocks those signals during the commit, so they take effect before or
//     after it, never in the middle.
//   - Not covered: SIGKILL or a power failure during commit() itself (renames only, no data
//     written) can leave part of the set placed, with `.tpo-old-*` links holding the replaced files
//     and `.tpo-new-*` files not yet renamed; nothing is fsync'ed, so durability across a power
//     failure is the filesystem's.

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <limits>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tpo/core/error.hpp"

TPO_BEGIN_NAMESPACE
namespace io {

/// A file could not be opened, read or written.
class file_error : public error {
public:
    using error::error;
};

namespace detail {

inline std::string reason(int e) { return std::strerror(e); }

/// An owned file descriptor.
class unique_fd {
public:
    unique_fd() = default;
    explicit unique_fd(int fd) : fd_(fd) {}
    unique_fd(unique_fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
    unique_fd& operator=(unique_fd&& o) noexcept {
        if (this != &o) {
            reset();
            fd_ = std::exchange(o.fd_, -1);
        }
        return *this;
    }
    ~unique_fd() { reset(); }
    int get() const { return fd_; }
    explicit operator bool() const { return fd_ >= 0; }
    /// Closes the descriptor; the close's own error, if any (0 otherwise).
    int reset() noexcept {
        int e = 0;
        if (fd_ >= 0 && ::close(fd_) != 0) e = errno;
        fd_ = -1;
        return e == EINTR ? 0 : e;  // Linux closes the descriptor even when close reports EINTR
    }

private:
    int fd_ = -1;
};

inline const char* file_kind(mode_t mode) {
    if (S_ISDIR(mode)) return "a directory";
    if (S_ISFIFO(mode)) return "a FIFO";
    if (S_ISCHR(mode)) return "a character device";
    if (S_ISBLK(mode)) return "a block device";
    if (S_ISSOCK(mode)) return "a socket";
    return "not a regular file";
}

}  // namespace detail

/// A regular file open for reading, its size known before anything is read.
class input_file {
public:
    /// Opens `path` (following symbolic links) and refuses anything but a regular file of at most
    /// `max_bytes`. Opening does not block, even on a FIFO.
    explicit input_file(const std::filesystem::path& path,
                        std::uint64_t max_bytes = std::numeric_limits<std::uint64_t>::max())
        : name_(path.string()) {
        fd_ = detail::unique_fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK));
        if (!fd_) {
            const int e = errno;
            if (e == ENOENT)
                fail(tpo::detail::concat("does not exist, expected a readable file"));
            if (e == ELOOP)
                fail(tpo::detail::concat("cannot open (", detail::reason(e), ": a symbolic link loop?)"));
            fail(tpo::detail::concat("cannot open for reading (", detail::reason(e), ")"));
        }
        struct stat st {};
        if (::fstat(fd_.get(), &st) != 0) fail(tpo::detail::concat("cannot stat (", detail::reason(errno), ")"));
        if (!S_ISREG(st.st_mode))
            fail(tpo::detail::concat("is ", detail::file_kind(st.st_mode), ", expected a regular file"));
        size_ = static_cast<std::uint64_t>(st.st_size);
        if (size_ > max_bytes)
            fail(tpo::detail::concat(size_, " bytes, expected at most ", max_bytes));
    }

    std::uint64_t size() const { return size_; }
    const std::string& name() const { return name_; }

    /// Reads exactly `n` bytes at `offset` (the file must not have shrunk since it was opened).
    void read_at(void* to, std::size_t n, std::uint64_t offset) const {
        auto* p = static_cast<unsigned char*>(to);
        while (n > 0) {
            const ssize_t got = ::pread(fd_.get(), p, n, static_cast<off_t>(offset));
            if (got < 0) {
                if (errno == EINTR) continue;
                fail(tpo::detail::concat("read error (", detail::reason(errno), ")"));
            }
            if (got == 0) fail("read error (the file shrank while it was read)");
            p += got;
            n -= static_cast<std::size_t>(got);
            offset += static_cast<std::uint64_t>(got);
        }
    }

    /// True when the file holds more than size() bytes now (it grew while it was read).
    bool grew() const {
        unsigned char byte;
        for (;;) {
            const ssize_t got = ::pread(fd_.get(), &byte, 1, static_cast<off_t>(size_));
            if (got < 0 && errno == EINTR) continue;
            return got > 0;
        }
    }

    [[noreturn]] void fail(const std::string& what) const {
        throw file_error(tpo::detail::concat(name_, ": file: ", what));
    }

private:
    std::string name_;
    detail::unique_fd fd_;
    std::uint64_t size_ = 0;
};

/// The whole content of a regular file of at most `max_bytes`.
inline std::vector<unsigned char> read_file(const std::filesystem::path& path,
                                            std::uint64_t max_bytes = std::numeric_limits<std::uint64_t>::max()) {
    const input_file in(path, max_bytes);
    std::vector<unsigned char> bytes(static_cast<std::size_t>(in.size()));
    if (!bytes.empty()) in.read_at(bytes.data(), bytes.size(), 0);
    if (in.grew()) in.fail("read error (the file grew while it was read)");
    return bytes;
}

// --- temporaries that a signal handler can remove ---

namespace detail {
inline constexpr int temporary_slots = 256;
/// Paths of the named temporaries being written; a slot is claimed and released atomically, so a
/// handler running at any moment sees either a complete path or none.
inline std::atomic<const char*> temporary_paths[temporary_slots];

inline int claim_temporary_slot(const char* path) noexcept {
    for (int i = 0; i < temporary_slots; ++i) {
        const char* expected = nullptr;
        if (temporary_paths[i].compare_exchange_strong(expected, path)) return i;
    }
    return -1;  // all slots in use: the file is still cleaned up by discard(), not by a signal
}

inline void release_temporary_slot(int slot) noexcept {
    if (slot >= 0) temporary_paths[slot].store(nullptr);
}

inline const int cleanup_signals[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE};

/// Commits under way. A handler that runs on another thread while one is (the committing thread
/// blocks the signals, its neighbours may not) waits for it: the set is then complete.
inline std::atomic<int> commits_in_progress{0};

inline void unlink_temporaries() noexcept {
    for (auto& slot : temporary_paths)
        if (const char* p = slot.load()) ::unlink(p);
}

extern "C" inline void remove_temporaries_and_reraise(int sig) {
    while (commits_in_progress.load() > 0) {
    }
    unlink_temporaries();
    // SA_RESETHAND restored the default action: the process ends from the same signal.
    ::raise(sig);
}

/// Blocks the cleanup signals in the calling thread for the lifetime of the object.
class signals_blocked {
public:
    signals_blocked() {
        sigset_t set;
        sigemptyset(&set);
        for (int s : cleanup_signals) sigaddset(&set, s);
        ::pthread_sigmask(SIG_BLOCK, &set, &old_);
    }
    ~signals_blocked() { ::pthread_sigmask(SIG_SETMASK, &old_, nullptr); }
    signals_blocked(const signals_blocked&) = delete;
    signals_blocked& operator=(const signals_blocked&) = delete;

private:
    sigset_t old_{};
};

/// A short name for a temporary in a target's directory: never derived from the target's name,
/// so a target name of up to NAME_MAX bytes still has a temporary.
inline std::string temporary_name(const char* kind) {
    static std::atomic<unsigned> counter{0};
    static const unsigned salt = [] {
        std::uint32_t s = static_cast<std::uint32_t>(::getpid()) * 2654435761u;
        return static_cast<unsigned>(s ^ static_cast<std::uint32_t>(reinterpret_cast<std::uintptr_t>(&counter)));
    }();
    const unsigned n = counter.fetch_add(1);
    char buf[64];
    std::snprintf(buf, sizeof buf, ".tpo-%s-%ld-%u-%08x", kind, static_cast<long>(::getpid()), n,
                  (n * 2246822519u) ^ salt);
    return buf;
}

inline void write_all(int fd, std::string_view data, const std::string& shown) {
    const char* p = data.data();
    std::size_t left = data.size();
    while (left > 0) {
        const std::size_t chunk = left < (std::size_t{1} << 30) ? left : (std::size_t{1} << 30);
        const ssize_t n = ::write(fd, p, chunk);
        if (n < 0) {
            if (errno == EINTR) continue;
            const int e = errno;
            throw file_error(tpo::detail::concat(shown, ": output: write failed (", reason(e), ")"));
        }
        p += n;
        left -= static_cast<std::size_t>(n);
    }
}

}  // namespace detail

/// Removes every named temporary a staged_files is writing now. Async-signal-safe (unlink only):
/// for a program's own signal handlers.
inline void remove_temporaries() noexcept { detail::unlink_temporaries(); }

/// Installs handlers for SIGINT, SIGTERM, SIGHUP, SIGQUIT and SIGPIPE that remove the named
/// temporaries being written and then end the process from the same signal, as the default
/// action would. For programs that leave those signals at their default action (the tpo tool).
inline void remove_temporaries_on_signals() {
    struct sigaction action {};
    action.sa_handler = detail::remove_temporaries_and_reraise;
    action.sa_flags = SA_RESETHAND;
    sigemptyset(&action.sa_mask);
    for (int s : detail::cleanup_signals) sigaddset(&action.sa_mask, s);
    for (int s : detail::cleanup_signals) ::sigaction(s, &action, nullptr);
}

/// Where staged_files writes while a set is incomplete.
enum class temporaries {
    unnamed,  // O_TMPFILE where the filesystem supports it (nothing left even after SIGKILL), else named
    named,    // always named `.tpo-tmp-*` files (removed by discard() and by the signal handlers)
};

/// A set of output files that appear together or not at all (see the top of this file).
class staged_files {
public:
    explicit staged_files(temporaries kind = temporaries::unnamed) : kind_(kind) {}
    staged_files(const staged_files&) = delete;
    staged_files& operator=(const staged_files&) = delete;
    ~staged_files() { discard(); }

    /// Writes `data` to a temporary in the directory of `path`, which must exist.
    void add(const std::filesystem::path& path, std::string_view data) {
        entries_.emplace_back();
        entry& e = entries_.back();
        e.target = path;
        e.shown = path.string();
        const std::filesystem::path parent = path.has_parent_path() ? path.parent_path() : ".";
        e.name = path.filename().string();
        if (e.name.empty() || e.name == "." || e.name == "..")
            fail(e, tpo::detail::concat("'", e.shown, "' names no file, expected a file name"));
        e.dir = detail::unique_fd(::open(parent.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
        if (!e.dir) {
            const int err = errno;
            fail(e, tpo::detail::concat("cannot open its directory (", detail::reason(err),
                                        "), expected a writable directory"));
        }
        if (kind_ == temporaries::unnamed) {
            e.file = detail::unique_fd(::openat(e.dir.get(), ".", O_TMPFILE | O_WRONLY | O_CLOEXEC, 0666));
            if (!e.file && errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL) {
                const int err = errno;
                fail(e, tpo::detail::concat("cannot create (", detail::reason(err), "), expected a writable directory"));
            }
        }
        if (!e.file) create_named(e, "tmp");
        detail::write_all(e.file.get(), data, e.shown);
        // An unnamed temporary lives only as long as its descriptor: it is closed once linked.
        if (!e.temp.empty()) close_checked(e);
    }

    /// Refuses, before anything is committed, a target that commit() could not replace: a
    /// directory, or a name whose directory entry cannot be read. (commit() checks again.)
    void check_targets() const {
        for (const entry& e : entries_) {
            struct stat st {};
            if (::fstatat(e.dir.get(), e.name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
                const int err = errno;
                if (err == ENOENT) continue;
                fail(e, tpo::detail::concat("cannot check the file it replaces (", detail::reason(err), ")"));
            }
            if (S_ISDIR(st.st_mode)) fail(e, "exists and is a directory, expected a file or nothing");
        }
    }

    /// Puts every staged file in place, or none of them (then throws file_error).
    void commit() {
        detail::signals_blocked blocked;
        struct in_progress {
            in_progress() { ++detail::commits_in_progress; }
            ~in_progress() { --detail::commits_in_progress; }
        } counted;
        std::size_t placed = 0;
        try {
            for (entry& e : entries_)
                if (e.temp.empty()) link_unnamed(e);
            for (entry& e : entries_) back_up_target(e);
            for (; placed < entries_.size(); ++placed) {
                entry& e = entries_[placed];
                if (::renameat(e.dir.get(), e.temp.c_str(), e.dir.get(), e.name.c_str()) != 0) {
                    const int err = errno;
                    fail(e, tpo::detail::concat("cannot rename into place (", detail::reason(err), ")"));
                }
                e.forget_temp();
            }
        } catch (const file_error& failure) {
            std::string problems = roll_back(placed);
            discard();
            if (problems.empty()) throw;
            throw file_error(tpo::detail::concat(failure.what(), "; and while putting back the previous files: ",
                                                 problems));
        }
        for (entry& e : entries_) e.drop_backup();
        entries_.clear();
    }

    /// Removes every temporary; nothing of the set is placed.
    void discard() noexcept {
        for (entry& e : entries_) {
            e.remove_temp();
            e.drop_backup();
        }
        entries_.clear();
    }

private:
    struct entry {
        std::filesystem::path target;
        std::string shown;        // the target as given, for messages
        std::string name;         // the target's file name in its directory
        detail::unique_fd dir;    // the target's directory
        detail::unique_fd file;   // the temporary while it is written
        std::string temp;         // the temporary's name in dir, once it has one
        std::string temp_path;    // dir/temp, registered for the signal handlers while writing
        int slot = -1;
        std::string backup;       // the file the target replaces, during commit
        bool had_target = false;
        bool backup_is_link = false;  // a second link (the target still in place), not the target renamed aside

        void forget_temp() {
            detail::release_temporary_slot(slot);
            slot = -1;
            temp.clear();
        }
        void remove_temp() noexcept {
            file.reset();
            if (!temp.empty() && dir) ::unlinkat(dir.get(), temp.c_str(), 0);
            forget_temp();
        }
        void drop_backup() noexcept {
            if (!backup.empty() && dir) ::unlinkat(dir.get(), backup.c_str(), 0);
            backup.clear();
        }
    };

    [[noreturn]] static void fail(const entry& e, const std::string& what) {
        throw file_error(tpo::detail::concat(e.shown, ": output: ", what));
    }

    /// Closes the temporary's descriptor: a filesystem may report a failed write only now.
    static void close_checked(entry& e) {
        if (const int err = e.file.reset(); err != 0)
            throw file_error(tpo::detail::concat(e.shown, ": output: write failed (", detail::reason(err), ")"));
    }

    /// A named temporary, registered for the signal handlers before it exists.
    void create_named(entry& e, const char* kind) {
        const std::filesystem::path parent = e.target.has_parent_path() ? e.target.parent_path() : ".";
        for (int attempt = 0;; ++attempt) {
            e.temp = detail::temporary_name(kind);
            e.temp_path = (parent / e.temp).string();
            e.slot = detail::claim_temporary_slot(e.temp_path.c_str());
            e.file = detail::unique_fd(
                ::openat(e.dir.get(), e.temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666));
            if (e.file) return;
            const int err = errno;
            e.forget_temp();
            if (err != EEXIST || attempt > 100)
                fail(e, tpo::detail::concat("cannot create (", detail::reason(err), "), expected a writable directory"));
        }
    }

    /// Gives an unnamed temporary a name (signals are blocked: no registration needed).
    void link_unnamed(entry& e) {
        for (int attempt = 0;; ++attempt) {
            const std::string name = detail::temporary_name("new");
            const std::string self = tpo::detail::concat("/proc/self/fd/", e.file.get());
            if (::linkat(AT_FDCWD, self.c_str(), e.dir.get(), name.c_str(), AT_SYMLINK_FOLLOW) == 0 ||
                (errno != EEXIST && ::linkat(e.file.get(), "", e.dir.get(), name.c_str(), AT_EMPTY_PATH) == 0)) {
                e.temp = name;
                close_checked(e);
                return;
            }
            const int err = errno;
            if (err != EEXIST || attempt > 100)
                fail(e, tpo::detail::concat("cannot give the new file a name (", detail::reason(err), ")"));
        }
    }

    /// Refuses a target that is a directory and keeps a link to the file it replaces.
    void back_up_target(entry& e) {
        struct stat st {};
        if (::fstatat(e.dir.get(), e.name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
            const int err = errno;
            if (err == ENOENT) return;
            fail(e, tpo::detail::concat("cannot check the file it replaces (", detail::reason(err), ")"));
        }
        if (S_ISDIR(st.st_mode)) fail(e, "exists and is a directory, expected a file or nothing");
        for (int attempt = 0;; ++attempt) {
            const std::string name = detail::temporary_name("old");
            // A hard link keeps the target in place meanwhile; a filesystem without hard links
            // gets the target renamed aside instead (absent until the new file replaces it).
            int err = 0;
            bool linked = true;
            if (::linkat(e.dir.get(), e.name.c_str(), e.dir.get(), name.c_str(), 0) != 0) {
                err = errno;
                linked = false;
                if (err == EPERM || err == EOPNOTSUPP || err == EMLINK)
                    err = ::renameat(e.dir.get(), e.name.c_str(), e.dir.get(), name.c_str()) == 0 ? 0 : errno;
            }
            if (err == 0) {
                e.backup = name;
                e.had_target = true;
                e.backup_is_link = linked;
                return;
            }
            if (err != EEXIST || attempt > 100)
                fail(e, tpo::detail::concat("cannot keep the file it replaces until the set is complete (",
                                            detail::reason(err), ")"));
        }
    }

    /// Puts back the files the first `placed` renames replaced (and any target renamed aside) and
    /// removes the new files that replaced nothing; what could not be, as text.
    std::string roll_back(std::size_t placed) noexcept {
        std::string problems;
        for (std::size_t k = entries_.size(); k-- > 0;) {
            entry& e = entries_[k];
            if (k >= placed && (!e.had_target || e.backup_is_link)) continue;  // untouched (discard drops the link)
            const bool ok = e.had_target ? ::renameat(e.dir.get(), e.backup.c_str(), e.dir.get(), e.name.c_str()) == 0
                                         : ::unlinkat(e.dir.get(), e.name.c_str(), 0) == 0;
            if (ok) {
                e.backup.clear();
            } else {
                const int err = errno;
                try {
                    problems += tpo::detail::concat(problems.empty() ? "" : "; ", e.shown, " (", detail::reason(err),
                                                    ")");
                } catch (...) {
                }
            }
        }
        return problems;
    }

    temporaries kind_;
    std::deque<entry> entries_;  // a deque never moves an entry: the handlers hold temp_path's characters
};

inline void write_file_atomically(const std::filesystem::path& path, std::string_view data,
                                  temporaries kind = temporaries::unnamed) {
    staged_files files(kind);
    files.add(path, data);
    files.commit();
}

}  // namespace io
TPO_END_NAMESPACE
