// The tpo command-line tool: see cli/run.hpp for the commands and docs/ for examples.
#include <csignal>
#include <exception>
#include <iostream>
#include <string>
#include <vector>

#include "cli/output.hpp"
#include "cli/run.hpp"
#include "tpo/io/file.hpp"

int main(int argc, char** argv) {
    // Named temporaries (where a filesystem has no O_TMPFILE) are removed when the tool is
    // interrupted; a file size limit makes write() fail with EFBIG, reported like any write error.
    tpo::io::remove_temporaries_on_signals();
    std::signal(SIGXFSZ, SIG_IGN);
    std::ios::sync_with_stdio(false);
    tpo_cli::fd_output stdout_buffer(1, "standard output");
    std::ostream out(&stdout_buffer);
    out.exceptions(std::ios::badbit);
    const std::vector<std::string> args(argv + 1, argv + argc);
    const int status = tpo_cli::run(args, out, std::cerr);
    if (status != 0) return status;
    try {
        out.flush();
        stdout_buffer.finish();
    } catch (const std::exception& e) {
        std::cerr << "tpo: " << tpo_cli::one_line(e.what()) << "\n";
        return 2;
    }
    return 0;
}
