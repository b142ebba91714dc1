// The tpo command-line tool: see cli/run.hpp for the commands and docs/ for examples.
#include <iostream>
#include <string>
#include <vector>

#include "cli/run.hpp"

int main(int argc, char** argv) {
    std::ios::sync_with_stdio(false);
    const std::vector<std::string> args(argv + 1, argv + argc);
    const int status = tpo_cli::run(args, std::cout, std::cerr);
    std::cout.flush();
    return status;
}
