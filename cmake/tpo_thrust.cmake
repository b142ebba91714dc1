# Thrust (NVIDIA CCCL) for the Thrust backend (include/tpo/backend/thrust.hpp).
#
# Defines, where the parts are found (and says why where they are not):
#   tpo_thrust_omp    INTERFACE target: Thrust with THRUST_DEVICE_SYSTEM=OMP, for g++
#   tpo_thrust_tbb    INTERFACE target: Thrust with THRUST_DEVICE_SYSTEM=TBB, for g++
#   tpo_thrust_cuda   INTERFACE target: Thrust with the CUDA device system, for nvcc
#                     (only when the CUDA language was enabled, see the top-level CMakeLists.txt)
# CCCL ships with the CUDA toolkit (its CMake package lives in <toolkit>/lib/cmake or lib64/cmake);
# nothing is downloaded.
include_guard(GLOBAL)

find_package(CUDAToolkit QUIET)
set(_tpo_thrust_hints /usr/local/cuda/lib/cmake /usr/local/cuda/lib64/cmake)
if(CUDAToolkit_BIN_DIR)
    list(PREPEND _tpo_thrust_hints "${CUDAToolkit_BIN_DIR}/../lib/cmake" "${CUDAToolkit_BIN_DIR}/../lib64/cmake")
endif()
find_package(Thrust CONFIG QUIET HINTS ${_tpo_thrust_hints})

set(TPO_HAVE_THRUST_OMP OFF)
set(TPO_HAVE_THRUST_TBB OFF)
set(TPO_HAVE_THRUST_CUDA OFF)
if(NOT Thrust_FOUND)
    message(STATUS "tpo: Thrust (CCCL, part of the CUDA toolkit) not found: Thrust backend tests skipped")
    return()
endif()

# Each system is probed separately, so a missing TBB only skips the TBB build.
find_package(OpenMP QUIET COMPONENTS CXX)
if(OpenMP_CXX_FOUND)
    thrust_create_target(tpo_thrust_omp HOST CPP DEVICE OMP)
    set(TPO_HAVE_THRUST_OMP ON)
else()
    message(STATUS "tpo: OpenMP not found: Thrust OpenMP backend tests skipped")
endif()

find_package(TBB QUIET CONFIG)
if(TBB_FOUND)
    thrust_create_target(tpo_thrust_tbb HOST CPP DEVICE TBB)
    set(TPO_HAVE_THRUST_TBB ON)
else()
    message(STATUS "tpo: TBB not found (Debian: libtbb-dev): Thrust TBB backend tests skipped")
endif()

if(CMAKE_CUDA_COMPILER)
    thrust_create_target(tpo_thrust_cuda HOST CPP DEVICE CUDA)
    set(TPO_HAVE_THRUST_CUDA ON)
endif()
