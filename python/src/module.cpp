// The extension module tpo._tpo. Python's side (python/tpo/) allocates outputs in the caller's
// framework and turns the dictionaries returned here into objects; everything numeric is here.

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <vector>

#include "arrays.hpp"
#include "module.hpp"

#if defined(_OPENMP)
#  include <omp.h>
#endif

NB_MODULE(_tpo, m) {
    namespace nb = nanobind;
    m.doc() = "tpo's C++ core; use the tpo package, not this module";

    // A Python exception per tpo error class, all ValueErrors, carrying the library's message.
    // nanobind tries the translators registered last first, so the base class comes first.
    static nb::exception<tpo::error> error(m, "Error", PyExc_ValueError);
    static nb::exception<tpo::shape_error> shape_error(m, "ShapeError", error);
    static nb::exception<tpo::value_error> value_error(m, "InvalidValueError", error);
    static nb::exception<tpo::overflow_error> overflow_error(m, "NonFiniteResultError", value_error);

    tpo_python::bind_objective(m);
    tpo_python::bind_corrupt(m);

    m.def("backends", [] {
        std::vector<std::string> names{"reference"};
        if (tpo_python::cpu_backend_built()) names.push_back("cpu");
        if (tpo_python::built_with_cuda()) names.push_back("cuda");
        return names;
    });
    m.def("default_threads", [] {
#if defined(_OPENMP)
        return omp_get_max_threads();
#else
        return 1;
#endif
    });
    // How the core sees an argument: its data pointer (to check that nothing was copied), element
    // type, shape and memory.
    m.def("inspect", [](nb::handle h) {
        bool bfloat16_bits = false;
        const tpo_python::input_array a = tpo_python::as_input(h, "array", &bfloat16_bits);
        nb::dict d;
        d["data"] = reinterpret_cast<std::uintptr_t>(a.data());
        d["dtype"] = bfloat16_bits ? std::string("bfloat16") : tpo_python::dtype_text(a.dtype());
        std::vector<std::int64_t> shape;
        for (std::size_t k = 0; k < a.ndim(); ++k) shape.push_back(static_cast<std::int64_t>(a.shape(k)));
        d["shape"] = nb::tuple(nb::cast(shape));
        d["c_contiguous"] = tpo_python::c_contiguous(a);
        const tpo_python::place where = tpo_python::place_of(a);
        d["device"] = where == tpo_python::place::host ? "host" : where == tpo_python::place::cuda ? "cuda" : "other";
        return d;
    });
    m.attr("version") = tpo::detail::concat(TPO_VERSION_MAJOR, ".", TPO_VERSION_MINOR, ".", TPO_VERSION_PATCH);
}
