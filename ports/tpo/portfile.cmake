# SPDX-License-Identifier: Apache-2.0
# Overlay port for tpo, built from the repository this port lives in:
#   vcpkg install tpo --overlay-ports=<tpo>/ports
# tpo is header-only: one release configure/install, no debug tree.
set(VCPKG_BUILD_TYPE release)
get_filename_component(SOURCE_PATH "${CMAKE_CURRENT_LIST_DIR}/../.." ABSOLUTE)

# scripts/check-packaging runs plain cmake with exactly the -D lines below (it reads them from here).
vcpkg_cmake_configure(
    SOURCE_PATH "${SOURCE_PATH}"
    OPTIONS
        -DTPO_BUILD_TESTS=OFF
        -DTPO_BUILD_EXAMPLES=OFF
        -DTPO_BUILD_BENCHMARKS=OFF
        -DTPO_INSTALL_CMAKEDIR=share/tpo
)
vcpkg_cmake_install()
vcpkg_cmake_config_fixup(PACKAGE_NAME tpo CONFIG_PATH share/tpo)

file(REMOVE_RECURSE "${CURRENT_PACKAGES_DIR}/debug" "${CURRENT_PACKAGES_DIR}/lib")
file(INSTALL "${CMAKE_CURRENT_LIST_DIR}/usage" DESTINATION "${CURRENT_PACKAGES_DIR}/share/${PORT}")
vcpkg_install_copyright(FILE_LIST "${SOURCE_PATH}/LICENSE")
