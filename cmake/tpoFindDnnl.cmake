# SPDX-License-Identifier: Apache-2.0
# tpo_find_dnnl(): oneDNN's CMake package (dnnl), looked for quietly, as the target DNNL::dnnl.
# Used by tpo's own build and, installed beside it, by tpoConfig.cmake (the onednn component).
#
# A oneDNN built with its OpenCL GPU runtime (Debian's libdnnl-dev is) has a package config that
# asks for OpenCL as REQUIRED: where OpenCL's development files are missing, loading it fails the
# whole configure, QUIET or not. So the config file is found first, and where it names the OpenCL
# runtime and OpenCL is not found, oneDNN counts as not found (with a status line saying why)
# instead of being loaded.
include_guard(GLOBAL)

macro(tpo_find_dnnl)
    if(NOT TARGET DNNL::dnnl)
        set(_tpo_dnnl_dirs "")
        foreach(_tpo_prefix IN LISTS CMAKE_PREFIX_PATH CMAKE_SYSTEM_PREFIX_PATH)
            foreach(_tpo_lib IN ITEMS lib lib64 "lib/${CMAKE_LIBRARY_ARCHITECTURE}")
                list(APPEND _tpo_dnnl_dirs "${_tpo_prefix}/${_tpo_lib}/cmake/dnnl")
            endforeach()
        endforeach()
        find_file(_tpo_dnnl_config NAMES dnnl-config.cmake dnnlConfig.cmake HINTS "${dnnl_DIR}"
                  PATHS ${_tpo_dnnl_dirs} NO_DEFAULT_PATH NO_CACHE)
        set(_tpo_dnnl_usable TRUE)
        if(_tpo_dnnl_config)
            file(STRINGS "${_tpo_dnnl_config}" _tpo_dnnl_gpu REGEX "^set\\(DNNL_GPU_RUNTIME")
            if(_tpo_dnnl_gpu MATCHES "OCL")
                find_package(OpenCL QUIET)
                if(NOT OpenCL_FOUND)
                    set(_tpo_dnnl_usable FALSE)
                    message(STATUS "tpo: oneDNN's package (${_tpo_dnnl_config}) needs OpenCL's development "
                                   "files, which are not found (Debian: ocl-icd-opencl-dev): oneDNN not used")
                endif()
            endif()
        endif()
        if(_tpo_dnnl_usable)
            find_package(dnnl CONFIG QUIET)
        endif()
        unset(_tpo_dnnl_dirs)
        unset(_tpo_dnnl_config)
        unset(_tpo_dnnl_gpu)
        unset(_tpo_dnnl_usable)
    endif()
endmacro()
