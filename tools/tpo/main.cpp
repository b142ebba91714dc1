// The tpo command-line tool: see cli/run.hpp for the commands and docs/ for examples.
#include <csignal>
#include <exception>
#include <iostream>
#include <string>
#include <vector>

#include "cli/output.hpp"
#include "cli/run.hpp"
#include "tpo/io/file.hpp"

#if TPO_TOOL_HAS_MPI
#  include <algorithm>
#  include <sstream>
#endif

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
#if TPO_TOOL_HAS_MPI
    // --vocab-parallel runs under mpirun: MPI is initialised before anything is parsed, so that a
    // usage error is printed once, by rank 0, and every rank exits with the same status.
    const bool mpi = std::any_of(args.begin(), args.end(), [](const std::string& a) {
        return a == "--vocab-parallel" || a.rfind("--vocab-parallel=", 0) == 0;
    });
    if (mpi) {
        MPI_Init(&argc, &argv);
        int rank = 0;
        MPI_Comm_rank(MPI_COMM_WORLD, &rank);
        std::ostringstream silent;
        int status = tpo_cli::run(args, out, rank == 0 ? static_cast<std::ostream&>(std::cerr) : silent);
        if (status == 0) {
            try {
                out.flush();
                stdout_buffer.finish();
            } catch (const std::exception& e) {
                if (rank == 0) std::cerr << "tpo: " << tpo_cli::one_line(e.what()) << "\n";
                status = 2;
            }
        }
        MPI_Finalize();
        return status;
    }
#endif
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
