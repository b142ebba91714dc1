// libFuzzer target: the tpo tool's image reader (PNG and JPEG) on arbitrary bytes, through the same
// decode_rgb_image() that `tpo corrupt` calls: signature, whole-file checks (cli/png_check.hpp,
// cli/jpeg_check.hpp), then stb's PNG/JPEG decoders.
// Properties checked beyond "no crash, no sanitizer report, no hang": every rejection is an
// input_error with one line naming the file; every accepted image is as large as its header says,
// within the pixel budget, with three bytes per pixel.
#include <cstdint>
#include <cstdlib>
#include <span>
#include <string>

#include "cli/image_file.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const std::span<const unsigned char> bytes(data, size);
    // The name agrees with the content where there is a signature, so the decoders are reached.
    const std::string name =
        tpo_cli::sniff_image(bytes) == tpo_cli::image_format::jpeg ? "fuzz.jpg" : "fuzz.png";
    tpo_cli::image_limits limits;
    limits.max_pixels = std::uint64_t{1} << 20;  // small enough for many executions a second
    try {
        const tpo_cli::rgb_image img = tpo_cli::decode_rgb_image(bytes, name, limits);
        if (img.width < 1 || img.height < 1) std::abort();
        if (static_cast<std::uint64_t>(img.width) * static_cast<std::uint64_t>(img.height) > limits.max_pixels)
            std::abort();
        if (img.pixels.size() != static_cast<std::size_t>(img.width) * static_cast<std::size_t>(img.height) * 3)
            std::abort();
    } catch (const tpo_cli::input_error& e) {
        const std::string m = e.what();
        if (m.rfind(name + ": image: ", 0) != 0 || m.find('\n') != std::string::npos) std::abort();
    }
    return 0;
}
