#pragma once
// The backend a test executable runs on. The same test sources are compiled once per backend
// (tests/CMakeLists.txt: tpo_add_backend_tests), so a new backend gets every test by adding one
// line there; tests that compare with the oracle use tpo::backend::reference explicitly.

#include <tpo/backend/reference.hpp>

#ifndef TPO_TEST_BACKEND_HEADER
#  define TPO_TEST_BACKEND_HEADER <tpo/backend/reference.hpp>
#endif
#ifndef TPO_TEST_BACKEND
#  define TPO_TEST_BACKEND tpo::backend::reference
#endif

#include TPO_TEST_BACKEND_HEADER

namespace tpo_test {
using tested_backend = TPO_TEST_BACKEND;
#define TPO_TEST_STRINGIFY2(x) #x
#define TPO_TEST_STRINGIFY(x) TPO_TEST_STRINGIFY2(x)
inline constexpr const char* tested_backend_name = TPO_TEST_STRINGIFY(TPO_TEST_BACKEND);
}  // namespace tpo_test
