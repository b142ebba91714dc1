// Standalone demo: corrupt an embedded image, score an embedded batch, print TPO's loss,
// rewards and token weights. `tpo demo` runs the same code.
#include <iostream>

#include "demo/demo.hpp"

int main() { return tpo_demo::run(std::cout); }
