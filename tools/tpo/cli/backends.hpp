#pragma once
// Which tensor backends this binary was built with. The reference backend is always there; the
// others are compiled in when CMake found their header and dependencies (it defines
// TPO_TOOL_WITH_<NAME>_BACKEND), so a binary never claims a backend it cannot run.

#include <string>

#include "tpo/backend/reference.hpp"
#include "tpo/core/error.hpp"

#if defined(TPO_TOOL_WITH_CPU_BACKEND) && __has_include("tpo/backend/cpu.hpp")
#  include "tpo/backend/cpu.hpp"
#  define TPO_TOOL_HAS_CPU 1
#else
#  define TPO_TOOL_HAS_CPU 0
#endif

#if defined(TPO_TOOL_WITH_THRUST_BACKEND) && __has_include("tpo/backend/thrust.hpp")
#  include "tpo/backend/thrust.hpp"
#  define TPO_TOOL_HAS_THRUST 1
#else
#  define TPO_TOOL_HAS_THRUST 0
#endif

namespace tpo_cli {

inline std::string built_backends() {
    std::string s = "reference";
    if (TPO_TOOL_HAS_CPU) s += ", cpu";
    if (TPO_TOOL_HAS_THRUST) s += ", thrust";
    return s;
}

class backend_error : public tpo::error {
public:
    using tpo::error::error;
};

/// Calls f(backend) with the named backend.
template <class F>
void with_backend(const std::string& name, F&& f) {
    if (name == "reference") {
        tpo::backend::reference b;
        f(b);
        return;
    }
    if (name == "cpu") {
#if TPO_TOOL_HAS_CPU
        tpo::backend::cpu b;
        f(b);
        return;
#endif
    } else if (name == "thrust") {
#if TPO_TOOL_HAS_THRUST
        tpo::backend::thrust<> b;  // Thrust's device system, a host system here (see CMakeLists.txt)
        f(b);
        return;
#endif
    }
    throw backend_error(tpo::detail::concat("--backend: '", name, "' is not built into this tpo binary, expected one of: ",
                                            built_backends()));
}

}  // namespace tpo_cli
