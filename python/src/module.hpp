#pragma once
// Shared by the module's translation units: registration functions and small helpers.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "engine.hpp"

namespace tpo_python {

namespace nb = nanobind;

void bind_objective(nb::module_& m);
void bind_corrupt(nb::module_& m);

/// An engine on the host: the CPU backend for "auto" and "cpu" where it is built, else the
/// reference backend.
std::unique_ptr<engine> make_host_engine(const tpo::objective_options& options, const std::string& backend,
                                         int threads);
bool cpu_backend_built();

/// A NumPy array owning a copy of `values` (O(P) or O(P·L) results, never a logits tensor); 1-d
/// unless `shape` says otherwise.
inline nb::ndarray<nb::numpy, double> to_numpy(const std::vector<double>& values,
                                               std::vector<std::size_t> shape = {}) {
    if (shape.empty()) shape.push_back(values.size());
    auto* data = new double[values.empty() ? 1 : values.size()];
    if (!values.empty()) std::memcpy(data, values.data(), values.size() * sizeof(double));
    nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<double*>(p); });
    return nb::ndarray<nb::numpy, double>(data, shape.size(), shape.data(), owner);
}

}  // namespace tpo_python
