// A build without CUDA: the module says so where a CUDA array arrives (the callers check
// built_with_cuda() first and name the array).

#include "corrupt.hpp"
#include "engine.hpp"

namespace tpo_python {

bool built_with_cuda() { return false; }

std::unique_ptr<engine> make_cuda_engine(const tpo::objective_options&, std::uintptr_t, int) {
    throw tpo::error("this package was built without CUDA");
}

void corrupt_cuda(const corruption&, const image_ref&, const image_ref&, std::uintptr_t, int) {
    throw tpo::error("this package was built without CUDA");
}

}  // namespace tpo_python
