# SPDX-License-Identifier: Apache-2.0
# vcpkg port of tpo, in the form vcpkg's registry takes: the sources of a release tag on GitHub.
# Filled in when a release is submitted (docs/packaging.md, "vcpkg"):
#   REPO     the GitHub owner/name the release is published under (also vcpkg.json's homepage);
#   REF      the release's tag: v followed by vcpkg.json's version-semver;
#   SHA512   of that tag's archive: 0 until then; `vcpkg install tpo` fails and prints the actual
#            hash, which goes here.
# For local testing, scripts/vcpkg-overlay writes the same port reading this repository at a commit.
vcpkg_from_github(
    OUT_SOURCE_PATH SOURCE_PATH
    REPO OWNER/tpo
    REF "v${VERSION}"
    SHA512 0
    HEAD_REF main
)

# tpo is header-only: one release configure/install, no debug tree.
set(VCPKG_BUILD_TYPE release)
# scripts/check-packaging runs plain cmake with exactly the -D lines below (it reads them from here).
vcpkg_cmake_configure(
    SOURCE_PATH "${SOURCE_PATH}"
    OPTIONS
        -DTPO_BUILD_TESTS=OFF
        -DTPO_BUILD_EXAMPLES=OFF
        -DTPO_BUILD_BENCHMARKS=OFF
        -DTPO_INSTALL=ON
        -DTPO_INSTALL_CMAKEDIR=share/tpo
)
vcpkg_cmake_install()
vcpkg_cmake_config_fixup(PACKAGE_NAME tpo CONFIG_PATH share/tpo)

# CMake's install puts the licence in share/doc/tpo; vcpkg wants it as share/tpo/copyright.
file(REMOVE_RECURSE "${CURRENT_PACKAGES_DIR}/debug" "${CURRENT_PACKAGES_DIR}/lib" "${CURRENT_PACKAGES_DIR}/share/doc")
file(INSTALL "${CMAKE_CURRENT_LIST_DIR}/usage" DESTINATION "${CURRENT_PACKAGES_DIR}/share/${PORT}")
vcpkg_install_copyright(FILE_LIST "${SOURCE_PATH}/LICENSE")
