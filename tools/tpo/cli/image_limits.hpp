#pragma once
// The pixel budget of the image reader: what an image may cost before any decoder runs.

#include <cstdint>
#include <string>

#include "cli/inputs.hpp"

namespace tpo_cli {

struct image_limits {
    /// Width × height at most; `tpo corrupt --max-pixels` raises or lowers it.
    std::uint64_t max_pixels = std::uint64_t{1} << 25;  // 33554432, e.g. 8192 × 4096
    /// Progressive JPEGs decode one scan at a time over the whole image: more scans than any
    /// encoder writes (libjpeg's progressive script has 10) would multiply the work.
    int max_jpeg_scans = 64;

    /// The largest file the budget allows: 16-bit RGBA stored uncompressed, a filter byte per row,
    /// plus 1 MiB for ancillary chunks or JPEG segments.
    std::uint64_t max_file_bytes() const { return max_pixels * 8 + max_pixels / 8 + (std::uint64_t{1} << 20); }
};

inline void check_pixel_budget(const std::string& path, std::uint64_t width, std::uint64_t height,
                               const image_limits& limits) {
    if (width * height > limits.max_pixels)
        throw input_error(tpo::detail::concat(path, ": image: ", width, "x", height, " = ", width * height,
                                              " pixels, more than the budget of ", limits.max_pixels,
                                              " (raise it with --max-pixels)"));
}

}  // namespace tpo_cli
