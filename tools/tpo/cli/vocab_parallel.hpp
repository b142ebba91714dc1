#pragma once
// `mpirun -np R tpo loss --dir DIR --vocab-parallel mpi [flags]`: the same run as without the flag,
// on the vocabulary split over R ranks (tpo::dist::sharded_objective). Every rank reads and checks
// DIR as the single-process tool does and keeps its contiguous slice of the vocabulary (V split as
// evenly as possible): its columns of the logits, or its rows of lm_head.npy (+ bias). The JSON
// goes to rank 0's standard output; gradient files are assembled on rank 0 and written there. Any
// failure on any rank is every rank's (dist::agree): exit status 2 everywhere, one line on rank 0's
// standard error, no file. The binary has this only where CMake found MPI (TPO_TOOL_WITH_MPI);
// main() initialises MPI when the flag is on its command line.

#include <array>
#include <climits>
#include <cstring>
#include <filesystem>
#include <optional>
#include <ostream>
#include <span>
#include <string>
#include <vector>

#include "tpo/io/file.hpp"
#include "tpo/io/npy.hpp"

#include "cli/args.hpp"
#include "cli/backends.hpp"
#include "cli/fused_loss.hpp"
#include "cli/inputs.hpp"
#include "cli/json.hpp"
#include "cli/output.hpp"

#if defined(TPO_TOOL_WITH_MPI) && __has_include(<mpi.h>)
#  include <mpi.h>
#  include "tpo/dist/mpi.hpp"
#  include "tpo/dist/sharded.hpp"
#  define TPO_TOOL_HAS_MPI 1
#else
#  define TPO_TOOL_HAS_MPI 0
#endif

namespace tpo_cli {

#if TPO_TOOL_HAS_MPI

namespace vocab_parallel {

/// Point-to-point in pieces MPI's int counts can hold.
inline void send_bytes(const void* data, std::size_t bytes, int to, MPI_Comm comm) {
    const auto* p = static_cast<const char*>(data);
    for (std::size_t first = 0; first < bytes; first += INT_MAX / 2)
        MPI_Send(p + first, static_cast<int>(std::min<std::size_t>(INT_MAX / 2, bytes - first)), MPI_BYTE, to, 0, comm);
}
inline void receive_bytes(void* data, std::size_t bytes, int from, MPI_Comm comm) {
    auto* p = static_cast<char*>(data);
    for (std::size_t first = 0; first < bytes; first += INT_MAX / 2)
        MPI_Recv(p + first, static_cast<int>(std::min<std::size_t>(INT_MAX / 2, bytes - first)), MPI_BYTE, from, 0,
                 comm, MPI_STATUS_IGNORE);
}

/// Columns [offset, offset + size) of every row of a (rows × vocab) array.
template <class T>
std::vector<T> columns(std::span<const T> values, tpo::index_t vocab, const tpo::dist::vocab_shard& s) {
    std::vector<T> out;
    const tpo::index_t rows = static_cast<tpo::index_t>(values.size()) / vocab;
    out.reserve(static_cast<std::size_t>(rows * s.size));
    for (tpo::index_t r = 0; r < rows; ++r)
        out.insert(out.end(), values.begin() + r * vocab + s.offset, values.begin() + r * vocab + s.offset + s.size);
    return out;
}

/// Every rank's (rows × V_k) slice into rank 0's (rows × V) array (empty elsewhere).
template <class T>
std::vector<T> gather_columns(tpo::dist::mpi_communicator& comm, const std::vector<T>& local, tpo::index_t vocab) {
    const int ranks = comm.size();
    const tpo::dist::vocab_shard mine = tpo::dist::vocab_shard::even(vocab, ranks, comm.rank());
    const tpo::index_t rows = static_cast<tpo::index_t>(local.size()) / mine.size;
    if (comm.rank() != 0) {
        send_bytes(local.data(), local.size() * sizeof(T), 0, comm.native());
        return {};
    }
    std::vector<T> full(static_cast<std::size_t>(rows * vocab));
    std::vector<T> part;
    for (int k = 0; k < ranks; ++k) {
        const tpo::dist::vocab_shard s = tpo::dist::vocab_shard::even(vocab, ranks, k);
        if (k == 0) {
            part = local;
        } else {
            part.resize(static_cast<std::size_t>(rows * s.size));
            receive_bytes(part.data(), part.size() * sizeof(T), k, comm.native());
        }
        for (tpo::index_t r = 0; r < rows; ++r)
            std::memcpy(full.data() + r * vocab + s.offset, part.data() + r * s.size, sizeof(T) * s.size);
    }
    return full;
}

/// This rank's rows [offset, offset + size) of a (vocab × width) array.
template <class T>
std::vector<T> rows_of(std::span<const T> values, tpo::index_t width, const tpo::dist::vocab_shard& s) {
    return std::vector<T>(values.begin() + s.offset * width, values.begin() + (s.offset + s.size) * width);
}

/// Every rank's rows, in order, into rank 0's array (empty elsewhere).
template <class T>
std::vector<T> gather_rows(tpo::dist::mpi_communicator& comm, const std::vector<T>& local, tpo::index_t width,
                           tpo::index_t vocab) {
    const int ranks = comm.size();
    if (comm.rank() != 0) {
        send_bytes(local.data(), local.size() * sizeof(T), 0, comm.native());
        return {};
    }
    std::vector<T> full(static_cast<std::size_t>(vocab * width));
    for (int k = 0; k < ranks; ++k) {
        const tpo::dist::vocab_shard s = tpo::dist::vocab_shard::even(vocab, ranks, k);
        T* at = full.data() + s.offset * width;
        if (k == 0) std::memcpy(at, local.data(), local.size() * sizeof(T));
        else receive_bytes(at, static_cast<std::size_t>(s.size * width) * sizeof(T), k, comm.native());
    }
    return full;
}

/// The communicator of the tool's run; MPI was initialised by main().
inline tpo::dist::mpi_communicator world() {
    int initialised = 0;
    MPI_Initialized(&initialised);
    if (!initialised)
        throw usage_error("--vocab-parallel mpi: MPI is not initialised in this process (run the tpo binary itself)");
    return tpo::dist::mpi_communicator(MPI_COMM_WORLD);
}

/// The vocabulary split over the ranks, refused when a rank would hold nothing.
inline tpo::dist::vocab_shard shard_of(tpo::dist::mpi_communicator& comm, tpo::index_t vocab, const std::string& what) {
    if (vocab < comm.size())
        throw input_error(tpo::detail::concat(what, ": vocabulary of ", vocab, " ids, expected at least one per rank (",
                                              comm.size(), " ranks) for --vocab-parallel"));
    return tpo::dist::vocab_shard::even(vocab, comm.size(), comm.rank());
}

/// Rank 0 prints the JSON and places the files, as the single-process run does; a failure there is
/// every rank's.
inline void finish(tpo::dist::mpi_communicator& comm, const parsed_args& args, const json_object& json,
                   const std::vector<std::pair<std::string, std::string>>& files, std::ostream& out) {
    tpo::dist::agree_on(comm, [&] {
        if (comm.rank() != 0) return;
        std::optional<output_directory> grad_dir;
        tpo::io::staged_files outputs(tool_temporaries());
        if (args.has("grad-dir")) {
            grad_dir.emplace(args.required("grad-dir"), "--grad-dir");
            for (const auto& [name, bytes] : files) outputs.add(grad_dir->path() / name, bytes);
        }
        publish(outputs, grad_dir, json.str(), out);
    });
}

}  // namespace vocab_parallel

inline int run_loss_vocab_parallel(const parsed_args& args, const tpo::objective_options& options,
                                   const std::filesystem::path& dir, const std::string& backend, std::ostream& out) {
    namespace vp = vocab_parallel;
    tpo::dist::mpi_communicator comm = vp::world();
    const bool noisy = options.weighting == tpo::token_weighting::self_calibrated;
    const bool want_grads = args.has("grad-dir");
    json_object json;
    std::vector<std::pair<std::string, std::string>> files;

    bool hidden = false;
    std::optional<std::pair<side_files, side_files>> logits;
    std::optional<fused_files> fused;
    tpo::dist::vocab_shard shard;
    tpo::dist::agree_on(comm, [&] {
        hidden = holds_hidden_states(dir);
        if (hidden) {
            fused = load_fused_files(dir, noisy, options.alignment);
            shard = vp::shard_of(comm, fused->head.array.shape[0], (dir / "lm_head.npy").string());
        } else {
            logits = load_logits_sides(dir, noisy, options.alignment);
            shard = vp::shard_of(comm, logits->first.policy.vocab(), logits->first.policy.path);
        }
    });

    if (!hidden) {
        const side_files& chosen = logits->first;
        const side_files& rejected = logits->second;
        const tpo::index_t V = chosen.policy.vocab();
        auto compute = [&](auto element) {
            using T = decltype(element);
            // This rank's columns of every logits tensor; the labels stay global ids.
            std::vector<std::vector<T>> slices;
            slices.reserve(8);
            auto local = [&](const logits_file& f) {
                slices.push_back(vp::columns(std::span<const T>(f.array.values<T>()), V, shard));
                return tpo::logits_view<const T>{slices.back().data(), f.sequences(), f.length(), shard.size};
            };
            auto side = [&](const side_files& f) {
                tpo::side_batch<T, std::int64_t> s = side_view<T>(f);
                s.policy = local(f.policy);
                if (f.reference) s.reference = local(*f.reference);
                if (f.policy_noisy) s.policy_noisy = local(*f.policy_noisy);
                if (f.reference_noisy) s.reference_noisy = local(*f.reference_noisy);
                return s;
            };
            const tpo::preference_batch<T, std::int64_t> batch{side(chosen), side(rejected)};
            const logits_file* like[4] = {&chosen.policy, &rejected.policy, noisy ? &*chosen.policy_noisy : nullptr,
                                          noisy ? &*rejected.policy_noisy : nullptr};
            std::array<std::vector<T>, 4> grads;
            tpo::preference_gradients<T> g;
            tpo::logits_view<T>* views[4] = {&g.chosen.policy, &g.rejected.policy, &g.chosen.policy_noisy,
                                             &g.rejected.policy_noisy};
            for (int k = 0; want_grads && k < (noisy ? 4 : 2); ++k) {
                grads[k].assign(static_cast<std::size_t>(like[k]->sequences() * like[k]->length() * shard.size), T(0));
                *views[k] = {grads[k].data(), like[k]->sequences(), like[k]->length(), shard.size};
            }
            tpo::objective_result r;
            with_directory(dir, [&] {
                with_backend(backend, [&](auto& b) {
                    r = tpo::dist::evaluate(b, comm, options, shard, batch, want_grads ? &g : nullptr);
                });
            });
            add_result(json, r);
            const char* names[4] = {"grad_policy_chosen.npy", "grad_policy_rejected.npy",
                                    "grad_policy_chosen_noisy.npy", "grad_policy_rejected_noisy.npy"};
            for (int k = 0; want_grads && k < (noisy ? 4 : 2); ++k) {
                const std::vector<T> full = vp::gather_columns(comm, grads[k], V);
                if (comm.rank() == 0)
                    files.emplace_back(names[k], tpo::io::encode_npy<T>(like[k]->array.shape, std::span<const T>(full)));
            }
        };
        with_element(chosen.policy.array.dtype, compute);
    } else {
        const tpo::index_t V = fused->head.array.shape[0], H = fused->head.array.shape[1];
        auto compute = [&](auto element) {
            using T = decltype(element);
            // This rank's rows of the heads; the hidden states are whole on every rank.
            std::vector<std::vector<T>> slices;
            slices.reserve(4);
            auto local = [&](const named_array* a, tpo::index_t width) -> const T* {
                if (!a) return nullptr;
                slices.push_back(vp::rows_of(std::span<const T>(a->array.values<T>()), width, shard));
                return slices.back().data();
            };
            auto head = [&](const named_array* w, const named_array* b) {
                if (!w) return tpo::head_view<const T>{};
                const T* weight = local(w, H);
                return tpo::head_view<const T>{weight, local(b, 1), shard.size, H};
            };
            const tpo::hidden_preference_batch<T, std::int64_t> batch{
                head(&fused->head, pointer(fused->head_bias)),
                head(pointer(fused->reference_head), pointer(fused->reference_head_bias)),
                fused_side_view<T>(fused->chosen), fused_side_view<T>(fused->rejected)};
            const named_array* like[4] = {&fused->chosen.policy, &fused->rejected.policy,
                                          noisy ? &*fused->chosen.policy_noisy : nullptr,
                                          noisy ? &*fused->rejected.policy_noisy : nullptr};
            std::array<std::vector<T>, 4> grads;
            std::vector<T> grad_head, grad_bias;
            tpo::hidden_gradients<T> g;
            tpo::hidden_view<T>* views[4] = {&g.chosen.policy, &g.rejected.policy, &g.chosen.policy_noisy,
                                             &g.rejected.policy_noisy};
            if (want_grads) {
                for (int k = 0; k < (noisy ? 4 : 2); ++k) {
                    const auto& s = like[k]->array.shape;
                    grads[k].assign(like[k]->array.size(), T(0));
                    *views[k] = {grads[k].data(), s[0], s[1], s[2]};
                }
                grad_head.assign(static_cast<std::size_t>(shard.size * H), T(0));
                g.head_weight = grad_head.data();
                if (fused->head_bias) {
                    grad_bias.assign(static_cast<std::size_t>(shard.size), T(0));
                    g.head_bias = grad_bias.data();
                }
            }
            tpo::objective_result r;
            with_directory(dir, [&] {
                with_backend(backend, [&](auto& b) {
                    if constexpr (tpo::head_backend<std::decay_t<decltype(b)>>)
                        r = tpo::dist::evaluate(b, comm, options, shard, batch, want_grads ? &g : nullptr);
                    else
                        throw input_error(tpo::detail::concat("--backend ", backend, ": cannot take hidden states"));
                });
            });
            add_result(json, r);
            if (!want_grads) return;
            const char* names[4] = {"grad_policy_hidden_chosen.npy", "grad_policy_hidden_rejected.npy",
                                    "grad_policy_hidden_chosen_noisy.npy", "grad_policy_hidden_rejected_noisy.npy"};
            // ∂L/∂H is already summed on every rank; the head's rows are gathered.
            const std::vector<T> full_head = vp::gather_rows(comm, grad_head, H, V);
            const std::vector<T> full_bias = fused->head_bias ? vp::gather_rows(comm, grad_bias, 1, V) : std::vector<T>{};
            if (comm.rank() != 0) return;
            for (int k = 0; k < (noisy ? 4 : 2); ++k)
                files.emplace_back(names[k], tpo::io::encode_npy<T>(like[k]->array.shape, std::span<const T>(grads[k])));
            files.emplace_back("grad_lm_head.npy",
                               tpo::io::encode_npy<T>(fused->head.array.shape, std::span<const T>(full_head)));
            if (fused->head_bias)
                files.emplace_back("grad_lm_head_bias.npy",
                                   tpo::io::encode_npy<T>(fused->head_bias->array.shape, std::span<const T>(full_bias)));
        };
        with_element(fused->head.array.dtype, compute);
    }
    vp::finish(comm, args, json, files, out);
    return 0;
}

#else

inline int run_loss_vocab_parallel(const parsed_args&, const tpo::objective_options&, const std::filesystem::path&,
                                   const std::string&, std::ostream&) {
    throw usage_error("--vocab-parallel mpi: this tpo binary was built without MPI (CMake found no MPI when it was "
                      "built; install one, e.g. Debian's libopenmpi-dev, and rebuild)");
}

#endif

}  // namespace tpo_cli
