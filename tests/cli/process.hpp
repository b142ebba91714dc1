#pragma once
// Runs the built tpo binary with arguments and captures its exit status, stdout and stderr (a
// run that hangs is killed after a timeout), plus small helpers for the temporary directories
// the CLI tests work in.

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

extern char** environ;

namespace tpo_cli_test {

namespace fs = std::filesystem;

struct run_result {
    int status = -1;
    std::string out, err;
};

inline std::string slurp(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
}

/// A fresh directory, removed with everything in it at the end of the test.
struct temp_dir {
    fs::path path;
    temp_dir() {
        std::string tmpl = (fs::temp_directory_path() / "tpo-cli-test-XXXXXX").string();
        if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
        path = tmpl;
    }
    ~temp_dir() {
        std::error_code ec;
        fs::remove_all(path, ec);
    }
    fs::path operator/(const std::string& name) const { return path / name; }
};

/// How run_tool starts the tool. Standard output goes to a capture file unless `stdout_path` names
/// another file (e.g. /dev/full) or `close_stdout` closes it.
struct run_options {
    std::string stdout_path{};
    bool close_stdout = false;
    std::vector<std::string> environment{};  // NAME=VALUE added to the tool's environment
    int timeout_seconds = 60;              // then SIGKILL: a hang shows as status 128 + 9
};

/// A started tool process.
struct process {
    pid_t pid = -1;
    std::string out_path, err_path;
};

inline process start_tool(const std::vector<std::string>& args, const run_options& options = {}) {
    static int counter = 0;
    const fs::path capture = fs::temp_directory_path() / ("tpo-cli-capture-" + std::to_string(::getpid()) + "-" +
                                                          std::to_string(counter++));
    process p;
    p.out_path = options.stdout_path.empty() ? capture.string() + ".out" : options.stdout_path;
    p.err_path = capture.string() + ".err";
    std::vector<std::string> full{TPO_TOOL_PATH};
    full.insert(full.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (std::string& a : full) argv.push_back(a.data());
    argv.push_back(nullptr);
    std::vector<std::string> env_strings;
    for (char** e = environ; *e; ++e) env_strings.emplace_back(*e);
    env_strings.insert(env_strings.end(), options.environment.begin(), options.environment.end());
    std::vector<char*> envp;
    for (std::string& e : env_strings) envp.push_back(e.data());
    envp.push_back(nullptr);
    p.pid = ::fork();
    if (p.pid < 0) throw std::runtime_error("fork failed");
    if (p.pid == 0) {
        const int out = options.close_stdout ? -1 : ::open(p.out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
        const int err = ::open(p.err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (options.close_stdout) ::close(1);
        else ::dup2(out, 1);
        ::dup2(err, 2);
        if (out > 2) ::close(out);
        if (err > 2) ::close(err);
        ::execve(TPO_TOOL_PATH, argv.data(), envp.data());
        ::_exit(127);
    }
    return p;
}

/// Waits for `p` (killing it after `timeout_seconds`) and collects its status and output.
inline run_result finish_tool(process& p, int timeout_seconds = 60, bool captured_stdout = true) {
    int status = 0;
    for (int waited_ms = 0;; waited_ms += 5) {
        const pid_t done = ::waitpid(p.pid, &status, WNOHANG);
        if (done == p.pid) break;
        if (waited_ms >= timeout_seconds * 1000) {
            ::kill(p.pid, SIGKILL);
            ::waitpid(p.pid, &status, 0);
            break;
        }
        ::usleep(5000);
    }
    run_result r;
    r.status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (captured_stdout) {
        r.out = slurp(p.out_path);
        fs::remove(p.out_path);
    }
    r.err = slurp(p.err_path);
    fs::remove(p.err_path);
    return r;
}

inline run_result run_tool(const std::vector<std::string>& args, const run_options& options = {}) {
    process p = start_tool(args, options);
    return finish_tool(p, options.timeout_seconds, options.stdout_path.empty() && !options.close_stdout);
}

/// Every regular file under `dir`, recursively (to prove that a failed run wrote nothing).
inline std::vector<std::string> files_under(const fs::path& dir) {
    std::vector<std::string> names;
    if (!fs::exists(dir)) return names;
    for (const auto& e : fs::recursive_directory_iterator(dir))
        if (e.is_regular_file()) names.push_back(fs::relative(e.path(), dir).string());
    return names;
}

}  // namespace tpo_cli_test
