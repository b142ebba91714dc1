import os

from conan import ConanFile
from conan.tools.build import can_run
from conan.tools.cmake import CMake, cmake_layout


class TpoTestPackage(ConanFile):
    settings = "os", "arch", "compiler", "build_type"
    generators = "CMakeDeps", "CMakeToolchain"

    def requirements(self):
        self.requires(self.tested_reference_str)

    def layout(self):
        cmake_layout(self)

    def build(self):
        cmake = CMake(self)
        tested = self.dependencies[self.tested_reference_str.split("/")[0]]
        cmake.configure(variables={
            "TPO_TEST_CPU": bool(tested.options.with_cpu),
            "TPO_TEST_XTENSOR": bool(tested.options.with_xtensor),
            "TPO_TEST_TBB": bool(tested.options.with_tbb),
        })
        cmake.build()

    def test(self):
        if can_run(self):
            self.run(os.path.join(self.cpp.build.bindir, "test_package"), env="conanrun")
