# SPDX-License-Identifier: Apache-2.0
# tpo_find_eigen3([REQUIRED | DEPENDENCY]): Eigen 3.4 up to any 5.x, as the target Eigen3::Eigen.
# Used by tpo's own build and, installed beside it, by tpoConfig.cmake. REQUIRED fails the
# configure when neither is found; DEPENDENCY (inside a package config) goes through
# find_dependency, so a failure makes the calling find_package fail with Eigen's own message;
# without either it only looks, quietly.
#
# Two look-ups, because no single version request accepts both ends:
#  - Eigen 3.4.1 and 5.x ship a version file that understands a range across major versions;
#  - Eigen 3.4.0's (Debian 12's) is CMake's SameMajorVersion file, which rejects any range whose
#    ends differ in major version and accepts a plain "3.4"; Eigen 5's rejects a plain "3.4".
include_guard(GLOBAL)
include(CMakeFindDependencyMacro)

macro(tpo_find_eigen3)
    if(NOT TARGET Eigen3::Eigen)
        find_package(Eigen3 3.4...<6 QUIET NO_MODULE)
    endif()
    if(NOT TARGET Eigen3::Eigen)
        if("${ARGN}" STREQUAL "DEPENDENCY")
            find_dependency(Eigen3 3.4 NO_MODULE)
        elseif("${ARGN}" STREQUAL "REQUIRED")
            find_package(Eigen3 3.4 REQUIRED NO_MODULE)
        else()
            find_package(Eigen3 3.4 QUIET NO_MODULE)
        endif()
    endif()
endmacro()
