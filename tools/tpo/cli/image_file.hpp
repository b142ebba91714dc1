#pragma once
// 8-bit RGB images (PNG, JPEG) through stb (Debian libstb-dev), in memory as HWC.
// Encoding goes to memory first so the file can be written atomically like every other output.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <stb/stb_image.h>
#include <stb/stb_image_write.h>

#include "tpo/io/file.hpp"

#include "cli/inputs.hpp"

namespace tpo_cli {

struct rgb_image {
    int height = 0, width = 0;
    std::vector<std::uint8_t> pixels;  // HWC, C = 3
};

inline bool has_extension(const std::string& path, std::initializer_list<std::string_view> extensions) {
    std::string lower;
    for (char c : path) lower += static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
    for (std::string_view e : extensions)
        if (lower.size() >= e.size() && lower.compare(lower.size() - e.size(), e.size(), e) == 0) return true;
    return false;
}

inline bool is_image_path(const std::string& path) { return has_extension(path, {".png", ".jpg", ".jpeg"}); }

inline rgb_image read_rgb_image(const std::string& path) {
    const std::vector<unsigned char> bytes = tpo::io::read_file(path);
    if (bytes.size() > static_cast<std::size_t>(INT32_MAX))
        throw input_error(tpo::detail::concat(path, ": image: file too large"));
    int w = 0, h = 0, channels = 0;
    // Refuse absurd dimensions before stb allocates for them (a 20-byte PNG can claim 2^31 pixels).
    if (!stbi_info_from_memory(bytes.data(), static_cast<int>(bytes.size()), &w, &h, &channels))
        throw input_error(tpo::detail::concat(path, ": image: cannot decode (", stbi_failure_reason(),
                                              "), expected an 8-bit PNG or JPEG"));
    if (w < 1 || h < 1 || static_cast<long long>(w) * h > (1LL << 28))
        throw input_error(tpo::detail::concat(path, ": image: ", w, "x", h, " pixels, expected at most 2^28"));
    unsigned char* data = stbi_load_from_memory(bytes.data(), static_cast<int>(bytes.size()), &w, &h, &channels, 3);
    if (!data)
        throw input_error(tpo::detail::concat(path, ": image: cannot decode (", stbi_failure_reason(),
                                              "), expected an 8-bit PNG or JPEG"));
    rgb_image img{h, w, std::vector<std::uint8_t>(data, data + static_cast<std::size_t>(w) * h * 3)};
    stbi_image_free(data);
    return img;
}

/// PNG or JPEG (quality 95) by the file's extension.
inline std::string encode_rgb_image(const std::string& path, const rgb_image& img) {
    std::string out;
    auto sink = [](void* context, void* data, int size) {
        static_cast<std::string*>(context)->append(static_cast<const char*>(data), static_cast<std::size_t>(size));
    };
    const int ok = has_extension(path, {".png"})
                       ? stbi_write_png_to_func(sink, &out, img.width, img.height, 3, img.pixels.data(), img.width * 3)
                       : stbi_write_jpg_to_func(sink, &out, img.width, img.height, 3, img.pixels.data(), 95);
    if (!ok) throw input_error(tpo::detail::concat(path, ": image: encoding failed"));
    return out;
}

}  // namespace tpo_cli
