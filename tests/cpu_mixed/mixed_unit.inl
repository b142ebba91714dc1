// The body of both translation units (included by mixed_default.cpp and mixed_native.cpp).

#include <tpo/backend/cpu.hpp>
#include <tpo/tpo.hpp>

#include "cpu_mixed/mixed.hpp"
#include "support/batch.hpp"

namespace mixed {

tu_result MIXED_RUN(tpo::backend::cpu_level level, const inputs& in) {
    using tpo::index_t;
    namespace kernels = tpo::backend::cpu_detail::kernels;
    tu_result r;
    r.kernels_namespace = TPO_CPU_TU_NAME;
    r.default_level = tpo::backend::default_cpu_level();

    const index_t rows = in.rows, V = in.vocab;
    const std::vector<float>& z = in.logits;
    for (index_t row = 0; row < rows; ++row) {
        const float* zr = z.data() + row * V;
        const std::int64_t label = (row * 977) % V;
        for (auto reduction : {tpo::row_reduction::logsumexp_and_doubled, tpo::row_reduction::finiteness})
            r.stats.push_back(kernels::row_statistics_of(level, reduction, zr, V, label));
        const tpo::row_coefficients c{0.4, 0.9, r.stats[static_cast<std::size_t>(2 * row)].lse, label};
        std::vector<float> g(static_cast<std::size_t>(V));
        std::vector<tpo::bfloat16> g16(static_cast<std::size_t>(V));
        kernels::gradient_row(level, zr, V, c, g.data(), row % 2 == 0);
        kernels::gradient_row(level, zr, V, c, g16.data(), row % 2 == 1);
        kernels::store_fence(level);
        r.gradient.insert(r.gradient.end(), g.begin(), g.end());
        r.gradient_bf16.insert(r.gradient_bf16.end(), g16.begin(), g16.end());
    }
    r.normals.resize(4 * 100);
    kernels::philox_normals(level, tpo::math::philox_stream{20261204, 3}, 12345, 100, r.normals.data());

    tpo::backend::cpu backend(1, level);
    r.loss = tpo::evaluate(backend, tpo::objective_options{}, in.batch.batch()).loss;
    return r;
}

}  // namespace mixed
