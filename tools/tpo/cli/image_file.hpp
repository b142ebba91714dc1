#pragma once
// 8-bit RGB images (PNG, JPEG) in memory as HWC.
//
// Only PNG and JPEG reach a decoder, chosen by the file's signature (the extension must agree):
// stb_image is compiled here with those two decoders alone (STBI_ONLY_PNG, STBI_ONLY_JPEG), as
// static functions of this program, not Debian's libstb with every format it knows. Before stb
// runs, the file is checked whole (cli/png_check.hpp, cli/jpeg_check.hpp): a regular file within
// the size the pixel budget implies, a header within the budget, and data that is complete and
// uncorrupted, so decoding is bounded and never invents pixels. Encoding goes to memory first so
// the file can be written atomically like every other output.

#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <vector>

// stb as static functions of this translation unit: only the PNG and JPEG decoders, from memory.
#define STB_IMAGE_STATIC
#define STB_IMAGE_IMPLEMENTATION
#define STBI_ONLY_PNG
#define STBI_ONLY_JPEG
#define STBI_NO_STDIO
#include <stb/stb_image.h>
#define STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_IMPLEMENTATION
#define STBI_WRITE_NO_STDIO
#include <stb/stb_image_write.h>

#include "tpo/io/file.hpp"

#include "cli/image_limits.hpp"
#include "cli/inputs.hpp"
#include "cli/jpeg_check.hpp"
#include "cli/png_check.hpp"

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

enum class image_format { png, jpeg, other };

/// The format the first bytes say, whatever the name says.
inline image_format sniff_image(std::span<const unsigned char> bytes) {
    static constexpr unsigned char png[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    if (bytes.size() >= 8 && std::memcmp(bytes.data(), png, 8) == 0) return image_format::png;
    if (bytes.size() >= 3 && bytes[0] == 0xff && bytes[1] == 0xd8 && bytes[2] == 0xff) return image_format::jpeg;
    return image_format::other;
}

/// A short name for what a file that is neither PNG nor JPEG seems to be, for the message.
inline std::string what_it_looks_like(std::span<const unsigned char> b) {
    auto starts = [&](std::string_view s) { return b.size() >= s.size() && std::memcmp(b.data(), s.data(), s.size()) == 0; };
    if (b.empty()) return "an empty file";
    if (starts("GIF87a") || starts("GIF89a")) return "a GIF";
    if (starts("BM")) return "a BMP";
    if (starts("8BPS")) return "a PSD";
    if (starts("#?RADIANCE") || starts("#?RGBE")) return "a Radiance HDR";
    if (b.size() >= 2 && b[0] == 'P' && b[1] >= '1' && b[1] <= '7') return "a PNM";
    if (starts("\x93NUMPY")) return "a .npy";
    if (starts("RIFF")) return "a RIFF (WebP?)";
    if (starts("II*") || starts("MM\0*")) return "a TIFF";
    return "neither PNG nor JPEG";
}

/// Decodes the PNG or JPEG in `bytes` (named `path` in messages) after checking it whole.
inline rgb_image decode_rgb_image(std::span<const unsigned char> bytes, const std::string& path,
                                  const image_limits& limits) {
    const image_format format = sniff_image(bytes);
    if (format == image_format::other)
        throw input_error(tpo::detail::concat(path, ": image: no PNG or JPEG signature (the file is ",
                                              what_it_looks_like(bytes), "), expected an 8-bit PNG or JPEG"));
    const bool named_png = has_extension(path, {".png"}), named_jpeg = has_extension(path, {".jpg", ".jpeg"});
    if ((named_png && format != image_format::png) || (named_jpeg && format != image_format::jpeg))
        throw input_error(tpo::detail::concat(path, ": image: the content is a ",
                                              format == image_format::png ? "PNG" : "JPEG", ", expected a ",
                                              named_png ? "PNG" : "JPEG", " as the name says"));
    if (bytes.size() > static_cast<std::size_t>(INT32_MAX))
        throw input_error(tpo::detail::concat(path, ": image: ", bytes.size(), " bytes, more than the decoder handles"));
    std::uint32_t width = 0, height = 0;
    if (format == image_format::png) {
        const png_facts f = check_png(bytes, path, limits, [](unsigned char* out, int out_size, const unsigned char* in,
                                                              int in_size) {
            return stbi_zlib_decode_buffer(reinterpret_cast<char*>(out), out_size, reinterpret_cast<const char*>(in),
                                           in_size);
        });
        width = f.width;
        height = f.height;
    } else {
        const jpeg_facts f = check_jpeg(bytes, path, limits);
        width = f.width;
        height = f.height;
    }
    int w = 0, h = 0, channels = 0;
    unsigned char* data = stbi_load_from_memory(bytes.data(), static_cast<int>(bytes.size()), &w, &h, &channels, 3);
    if (!data)
        throw input_error(tpo::detail::concat(path, ": image: cannot decode (", stbi_failure_reason(), "), expected an 8-bit ",
                                              format == image_format::png ? "PNG" : "JPEG"));
    if (static_cast<std::uint32_t>(w) != width || static_cast<std::uint32_t>(h) != height) {
        stbi_image_free(data);
        throw input_error(tpo::detail::concat(path, ": image: decoded as ", w, "x", h, ", the header says ", width, "x",
                                              height));
    }
    rgb_image img{h, w, std::vector<std::uint8_t>(data, data + static_cast<std::size_t>(w) * static_cast<std::size_t>(h) * 3)};
    stbi_image_free(data);
    return img;
}

/// Reads and decodes an image file: a regular file of at most what the pixel budget implies.
inline rgb_image read_rgb_image(const std::string& path, const image_limits& limits) {
    const std::vector<unsigned char> bytes = tpo::io::read_file(path, limits.max_file_bytes());
    return decode_rgb_image(bytes, path, limits);
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
