#pragma once
// A PNG is checked whole before stb decodes it, because stb trusts what it reads: it skips the
// chunk CRCs, inflates without a bound on the output, and expands palette indices beyond the
// palette from uninitialised memory. Here every chunk's CRC is compared, the header's fields and
// the pixel budget are checked, the image data is inflated into a buffer of exactly the size the
// header implies (more or less is an error), the filter type of every row is checked, and a
// palette image's indices are unfiltered and compared with its palette. What reaches stb is then
// a well-formed PNG whose decoding is bounded by its header.

#include <array>
#include <cstdint>
#include <cstdlib>
#include <span>
#include <string>
#include <vector>

#include "cli/image_limits.hpp"

namespace tpo_cli {

namespace png_detail {

inline std::uint32_t crc32(std::span<const unsigned char> bytes) {
    static const std::array<std::uint32_t, 256> table = [] {
        std::array<std::uint32_t, 256> t{};
        for (std::uint32_t n = 0; n < 256; ++n) {
            std::uint32_t c = n;
            for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
            t[n] = c;
        }
        return t;
    }();
    std::uint32_t c = 0xffffffffu;
    for (unsigned char b : bytes) c = table[(c ^ b) & 0xff] ^ (c >> 8);
    return c ^ 0xffffffffu;
}

inline std::uint32_t be32(const unsigned char* p) {
    return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) | p[3];
}

inline std::string chunk_name(std::uint32_t type) {
    std::string s;
    for (int shift = 24; shift >= 0; shift -= 8) {
        const auto c = static_cast<char>((type >> shift) & 0xff);
        s += (c >= 0x20 && c < 0x7f) ? c : '?';
    }
    return s;
}

constexpr std::uint32_t type_of(const char (&s)[5]) {
    return (std::uint32_t(static_cast<unsigned char>(s[0])) << 24) | (std::uint32_t(static_cast<unsigned char>(s[1])) << 16) |
           (std::uint32_t(static_cast<unsigned char>(s[2])) << 8) | std::uint32_t(static_cast<unsigned char>(s[3]));
}

/// Width and height of the seven Adam7 passes (or the one pass of a non-interlaced image).
struct pass_size {
    std::uint64_t width, height;
};

inline std::vector<pass_size> passes(std::uint64_t w, std::uint64_t h, bool interlaced) {
    if (!interlaced) return {{w, h}};
    static constexpr int x0[7] = {0, 4, 0, 2, 0, 1, 0}, y0[7] = {0, 0, 4, 0, 2, 0, 1};
    static constexpr int dx[7] = {8, 8, 4, 4, 2, 2, 1}, dy[7] = {8, 8, 8, 4, 4, 2, 2};
    std::vector<pass_size> p;
    for (int k = 0; k < 7; ++k) {
        const std::uint64_t pw = w > static_cast<std::uint64_t>(x0[k]) ? (w - x0[k] + dx[k] - 1) / dx[k] : 0;
        const std::uint64_t ph = h > static_cast<std::uint64_t>(y0[k]) ? (h - y0[k] + dy[k] - 1) / dy[k] : 0;
        p.push_back({pw, ph});
    }
    return p;
}

}  // namespace png_detail

/// What stb is then asked to decode.
struct png_facts {
    std::uint32_t width = 0, height = 0;
};

/// Checks the PNG `bytes` (signature already matched); throws input_error naming `path`.
/// `inflate(out, out_size, in, in_size)` is a zlib decoder writing at most out_size bytes and
/// returning how many it wrote, or -1 (stb's stbi_zlib_decode_buffer).
template <class Inflate>
png_facts check_png(std::span<const unsigned char> bytes, const std::string& path, const image_limits& limits,
                    Inflate&& inflate) {
    using namespace png_detail;
    auto fail = [&](const std::string& what) -> void { throw input_error(tpo::detail::concat(path, ": image: ", what)); };
    constexpr std::uint32_t IHDR = type_of("IHDR"), PLTE = type_of("PLTE"), IDAT = type_of("IDAT"),
                            IEND = type_of("IEND");
    png_facts facts;
    int depth = 0, color = 0, interlace = 0;
    std::size_t palette_entries = 0;
    bool seen_header = false, seen_palette = false, seen_end = false;
    int idat_state = 0;  // 0: none yet, 1: in the IDAT run, 2: after it
    std::vector<unsigned char> data;
    std::size_t pos = 8;
    while (!seen_end) {
        if (bytes.size() - pos < 8)
            fail(tpo::detail::concat("truncated: the file ends at byte ", bytes.size(), " inside the chunk headers, ",
                                     seen_header ? "before IEND" : "before IHDR", ", expected a complete PNG"));
        const std::uint32_t length = be32(bytes.data() + pos), type = be32(bytes.data() + pos + 4);
        const std::string name = chunk_name(type);
        if (length > 0x7fffffffu) fail(tpo::detail::concat("chunk ", name, ": length ", length, ", expected at most 2^31 - 1"));
        for (int shift = 24; shift >= 0; shift -= 8) {
            const unsigned char c = (type >> shift) & 0xff;
            if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z')))
                fail(tpo::detail::concat("chunk at byte ", pos, ": type '", name, "' is not four letters (corrupt file)"));
        }
        if (bytes.size() - pos - 8 < std::uint64_t{length} + 4)
            fail(tpo::detail::concat("truncated: chunk ", name, " at byte ", pos, " needs ", std::uint64_t{length} + 12,
                                     " bytes, ", bytes.size() - pos, " present"));
        const std::span<const unsigned char> body = bytes.subspan(pos + 8, length);
        const std::uint32_t stored = be32(bytes.data() + pos + 8 + length);
        const std::uint32_t computed = crc32(bytes.subspan(pos + 4, std::size_t{length} + 4));
        if (stored != computed)
            fail(tpo::detail::concat("chunk ", name, " at byte ", pos, ": CRC mismatch (stored ", stored, ", computed ",
                                     computed, "): the file is corrupt"));
        if (!seen_header && type != IHDR) fail(tpo::detail::concat("first chunk is ", name, ", expected IHDR"));
        if (idat_state == 1 && type != IDAT) idat_state = 2;
        if (type == IHDR) {
            if (seen_header) fail("a second IHDR chunk (corrupt file)");
            seen_header = true;
            if (length != 13) fail(tpo::detail::concat("IHDR: length ", length, ", expected 13"));
            facts.width = be32(body.data());
            facts.height = be32(body.data() + 4);
            depth = body[8];
            color = body[9];
            interlace = body[12];
            if (facts.width == 0 || facts.height == 0 || facts.width > 0x7fffffffu || facts.height > 0x7fffffffu)
                fail(tpo::detail::concat("IHDR: ", facts.width, "x", facts.height,
                                         " pixels, expected each side in [1, 2^31 - 1]"));
            const bool depth_ok = (color == 0 && (depth == 1 || depth == 2 || depth == 4 || depth == 8 || depth == 16)) ||
                                  (color == 3 && (depth == 1 || depth == 2 || depth == 4 || depth == 8)) ||
                                  ((color == 2 || color == 4 || color == 6) && (depth == 8 || depth == 16));
            if (!depth_ok)
                fail(tpo::detail::concat("IHDR: colour type ", color, " with bit depth ", depth,
                                         " is not a valid PNG combination"));
            if (body[10] != 0) fail(tpo::detail::concat("IHDR: compression method ", int(body[10]), ", expected 0"));
            if (body[11] != 0) fail(tpo::detail::concat("IHDR: filter method ", int(body[11]), ", expected 0"));
            if (interlace > 1) fail(tpo::detail::concat("IHDR: interlace method ", interlace, ", expected 0 or 1"));
            check_pixel_budget(path, facts.width, facts.height, limits);
        } else if (type == PLTE) {
            if (seen_palette) fail("a second PLTE chunk (corrupt file)");
            if (idat_state != 0) fail("PLTE after IDAT (corrupt file)");
            if (color == 0 || color == 4) fail(tpo::detail::concat("PLTE in a greyscale image (colour type ", color, ")"));
            seen_palette = true;
            palette_entries = length / 3;
            if (length % 3 != 0 || palette_entries < 1 || palette_entries > 256 ||
                (color == 3 && palette_entries > (std::size_t{1} << depth)))
                fail(tpo::detail::concat("PLTE: ", length, " bytes, expected 3 per entry and 1 to ",
                                         color == 3 ? (std::size_t{1} << depth) : 256, " entries"));
        } else if (type == IDAT) {
            if (idat_state == 2) fail("IDAT chunks not consecutive (corrupt file)");
            if (color == 3 && !seen_palette) fail("IDAT before PLTE in a palette image (corrupt file)");
            idat_state = 1;
            data.insert(data.end(), body.begin(), body.end());
        } else if (type == IEND) {
            if (length != 0) fail(tpo::detail::concat("IEND: length ", length, ", expected 0"));
            seen_end = true;
        } else if (!(type & 0x20000000u)) {  // critical chunks have an uppercase first letter
            fail(tpo::detail::concat("critical chunk ", name, " is not supported"));
        }
        pos += std::size_t{length} + 12;
    }
    if (idat_state == 0) fail("no IDAT chunk: the image has no pixel data");
    // Bytes after IEND are not part of the image and are ignored, as other decoders do.

    // The exact size of the filtered scanlines the header implies.
    const int channels = color == 0 ? 1 : color == 2 ? 3 : color == 3 ? 1 : color == 4 ? 2 : 4;
    const std::uint64_t bits = std::uint64_t(channels) * depth;
    const auto sizes = passes(facts.width, facts.height, interlace == 1);
    std::uint64_t expected = 0;
    for (const auto& p : sizes)
        if (p.width && p.height) expected += p.height * (1 + (p.width * bits + 7) / 8);
    if (expected >= 0x7fffffffu)
        fail(tpo::detail::concat(expected, " bytes of image data, more than the decoder handles (2^31 - 2)"));
    std::vector<unsigned char> raw(static_cast<std::size_t>(expected) + 1);
    const int got = inflate(raw.data(), static_cast<int>(raw.size()), data.data(), static_cast<int>(data.size()));
    if (got < 0)
        fail(tpo::detail::concat("IDAT: the compressed data is corrupt, truncated or inflates to more than the ", expected,
                                 " bytes a ", facts.width, "x", facts.height, " image needs"));
    if (static_cast<std::uint64_t>(got) > expected)
        fail(tpo::detail::concat("IDAT: the data inflates to more than the ", expected, " bytes a ", facts.width, "x",
                                 facts.height, " image needs (corrupt file)"));
    if (static_cast<std::uint64_t>(got) < expected)
        fail(tpo::detail::concat("IDAT: truncated: the data inflates to ", got, " bytes, a ", facts.width, "x",
                                 facts.height, " image needs ", expected));

    // Filter types, and for palette images the indices (unfiltered: filters work on bytes, and
    // a palette pixel never spans more than a byte, so the "previous pixel" is one byte back).
    const std::size_t bpp = static_cast<std::size_t>((bits + 7) / 8);
    std::size_t offset = 0;
    std::vector<unsigned char> prior, row;
    for (const auto& p : sizes) {
        if (!p.width || !p.height) continue;
        const std::size_t stride = static_cast<std::size_t>((p.width * bits + 7) / 8);
        prior.assign(stride, 0);
        for (std::uint64_t y = 0; y < p.height; ++y, offset += stride + 1) {
            const unsigned char filter = raw[offset];
            if (filter > 4)
                fail(tpo::detail::concat("IDAT: row ", y, " has filter type ", int(filter), ", expected 0 to 4"));
            if (color != 3) continue;
            row.assign(raw.begin() + static_cast<std::ptrdiff_t>(offset + 1),
                       raw.begin() + static_cast<std::ptrdiff_t>(offset + 1 + stride));
            for (std::size_t i = 0; i < stride; ++i) {
                const int a = i >= bpp ? row[i - bpp] : 0, b = prior[i], c = i >= bpp ? prior[i - bpp] : 0;
                int predictor = 0;
                switch (filter) {
                case 1: predictor = a; break;
                case 2: predictor = b; break;
                case 3: predictor = (a + b) / 2; break;
                case 4: {
                    const int pa = std::abs(b - c), pb = std::abs(a - c), pc = std::abs(a + b - 2 * c);
                    predictor = (pa <= pb && pa <= pc) ? a : (pb <= pc ? b : c);
                    break;
                }
                default: break;
                }
                row[i] = static_cast<unsigned char>(row[i] + predictor);
            }
            for (std::uint64_t x = 0; x < p.width; ++x) {
                const std::uint64_t bit = x * static_cast<std::uint64_t>(depth);
                const unsigned index = (row[static_cast<std::size_t>(bit / 8)] >> (8 - depth - bit % 8)) & ((1u << depth) - 1);
                if (index >= palette_entries)
                    fail(tpo::detail::concat("palette index ", index, " at row ", y, ", column ", x,
                                             interlace ? " of an interlaced pass" : "", " is outside the ",
                                             palette_entries, "-entry palette (corrupt file)"));
            }
            prior.swap(row);
        }
    }
    return facts;
}

}  // namespace tpo_cli
