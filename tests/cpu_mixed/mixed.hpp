#pragma once
// Two translation units of one program built with different instruction-set flags
// (tests/CMakeLists.txt: mixed_default.cpp with the compiler's defaults, mixed_native.cpp with
// -march=native) run the same computation at every level: each returns what its own kernels gave.

#include <string>
#include <vector>

#include <tpo/backend/cpu/level.hpp>
#include <tpo/reward/row_stats.hpp>

#include "support/batch.hpp"

namespace mixed {

struct tu_result {
    std::string kernels_namespace;             // TPO_CPU_TU_NAME of the translation unit
    tpo::backend::cpu_level default_level{};   // default_cpu_level() as that unit sees it
    std::vector<tpo::row_stats> stats;         // row statistics through the unit's own kernels
    std::vector<float> gradient;               // gradient rows through the unit's own kernels
    std::vector<tpo::bfloat16> gradient_bf16;  // the same narrowed to bf16
    std::vector<float> normals;                // the noise generator's normals
    double loss = 0;                           // the objective through backend::cpu at the level
};

/// What both units compute on: made once, outside them (their own code would round differently).
struct inputs {
    tpo::index_t rows = 0, vocab = 0;
    std::vector<float> logits;  // rows × vocab
    tpo_test::batch_data<float> batch;
};

tu_result run_default(tpo::backend::cpu_level level, const inputs& in);
tu_result run_native(tpo::backend::cpu_level level, const inputs& in);

}  // namespace mixed
