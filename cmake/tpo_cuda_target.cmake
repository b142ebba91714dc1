# tpo_cuda_target(TARGET): the settings every CUDA target of tpo shares.
#   C++20 for nvcc too (the headers need it; CMake 3.25 has no CUDA20 dialect for nvcc 13, hence the flag); --expt-relaxed-constexpr because device code calls
#   constexpr host functions of the standard library (std::numeric_limits); diagnostic 554 is nvcc
#   noting that a view's conversion to its own const type is never used for logits_view<const T>.
include_guard(GLOBAL)
find_package(CUDAToolkit REQUIRED)

function(tpo_cuda_target target)
    target_link_libraries(${target} PRIVATE tpo_thrust_cuda CUDA::cudart CUDA::cublas)
    target_compile_options(${target} PRIVATE
        $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20 --expt-relaxed-constexpr -diag-suppress=554 -Xcompiler=-Wall>)
endfunction()
