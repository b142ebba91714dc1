#pragma once
// The tool's entry point as a function, so the fuzz target can drive exactly what main() does.
// Exit status: 0 on success, 2 on bad usage or bad input with one line on stderr.

#include <exception>
#include <new>
#include <ostream>
#include <span>
#include <string>

#include "cli/args.hpp"
#include "cli/backends.hpp"
#include "cli/corrupt_command.hpp"
#include "cli/loss_command.hpp"
#include "cli/score_command.hpp"
#include "demo/demo.hpp"

namespace tpo_cli {

inline constexpr const char* usage_text =
    "usage: tpo <command> [flags]\n"
    "  tpo loss --dir DIR [--method tpo|dpo] [--loss TYPE[,TYPE...]] [--loss-weights W[,W...]] [--beta 0.1]\n"
    "           [--label-smoothing 0] [--a 0.5] [--score logit|prob|logprob] [--form additive|multiplicative]\n"
    "           [--average] [--detach-weights] [--no-shift] [--ignore-index -100] [--backend reference|cpu|thrust]\n"
    "           [--f-divergence-type T] [--f-alpha-divergence-coef 0.5] [--discopop-tau 0.05] [--use-weighting]\n"
    "           [--ld-alpha X] [--logit-scale X] [--logit-softcap X] [--temperature X] [--chunk-tokens N]\n"
    "           [--grad-dir OUT] [--vocab-parallel mpi (under mpirun: the vocabulary split over the ranks)]\n"
    "  tpo score --clean Z.npy --noisy ZN.npy --labels Y.npy --side chosen|rejected [--score ...] [--a 0.5]\n"
    "            [--no-shift] [--ignore-index -100] --out DIR\n"
    "  tpo corrupt --in IN --out OUT [--kind diffusion|crop|blur|patch-mask|mean]\n"
    "              [--schedule sigmoid|linear|scaled_linear|cosine] [--steps 1000] [--step 500] [--beta-start X]\n"
    "              [--beta-end X] [--zero-snr] [--seed 0] [--stream 0] [--space pixel|normalized] [--wrap]\n"
    "              [--max-pixels 33554432]\n"
    "  tpo demo\n"
    "Exit status 0 on success, 2 on bad usage or bad input (one line on stderr).\n";

/// One line: the message with any line break flattened, so scripts can rely on a single line.
inline std::string one_line(std::string s) {
    for (char& c : s)
        if (c == '\n' || c == '\r') c = ' ';
    return s;
}

inline int run(std::span<const std::string> args, std::ostream& out, std::ostream& err) {
    try {
        if (args.empty()) throw usage_error("missing command, expected loss, score, corrupt or demo (see tpo --help)");
        const std::string& command = args[0];
        const auto rest = args.subspan(1);
        if (command == "--help" || command == "-h" || command == "help") {
            out << usage_text;
            return 0;
        }
        if (command == "loss") return run_loss(rest, out);
        if (command == "score") return run_score(rest, out);
        if (command == "corrupt") return run_corrupt(rest, out);
        if (command == "demo") {
            const parsed_args parsed(rest, {}, "demo");  // no flags: anything given is a usage error
            return tpo_demo::run(out);
        }
        throw usage_error(tpo::detail::concat("unknown command '", command.substr(0, 40),
                                              "', expected loss, score, corrupt or demo"));
    } catch (const std::bad_alloc&) {
        err << "tpo: out of memory\n";
        return 2;
    } catch (const std::exception& e) {
        err << "tpo: " << one_line(e.what()) << "\n";
        return 2;
    }
}

}  // namespace tpo_cli
