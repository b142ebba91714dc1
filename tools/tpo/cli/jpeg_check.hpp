#pragma once
// A JPEG is checked whole before stb decodes it, because stb fills whatever data is missing with
// zeros: a truncated file, or a header declaring more blocks than the entropy-coded data holds,
// decodes to garbage without an error. Here the marker structure is walked (one baseline,
// extended or progressive Huffman frame of 8-bit samples, as stb supports; an EOI marker at the
// end), the pixel budget and the number of scans are checked, and every scan's entropy-coded data
// is Huffman-decoded (no dequantisation, no IDCT): each block must decode from the bytes that are
// there, with valid codes, coefficient indices and DC values, no byte left over before the next
// marker, and restart markers in sequence. Progressive scans must follow the successive-
// approximation rules. The work is bounded by the pixel budget times the number of scans.

#include <algorithm>
#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "cli/image_limits.hpp"

namespace tpo_cli {

namespace jpeg_detail {

struct huffman_table {
    bool defined = false;
    std::array<std::int32_t, 17> max_code{};  // largest code of each length, -1 when none
    std::array<std::int32_t, 17> offset{};    // index of the first value of each length, minus its first code
    std::array<unsigned char, 256> values{};
    std::array<std::uint16_t, 256> fast{};  // by the next 8 bits: (length << 8) | value of a code of <= 8 bits, or 0
};

struct component {
    int id = 0, h = 1, v = 1;
    std::uint64_t blocks_wide = 0, blocks_high = 0;  // of the component itself
    std::vector<std::uint64_t> nonzero;               // AC coefficients seen nonzero, one bit each, per block
    std::array<int, 64> coefficient_bits{};           // successive approximation state (-1: not yet coded)
    bool in_a_scan = false;
};

/// Reads the entropy-coded bits of a scan: stuffed bytes unstuffed, stopping at any marker. Bits
/// are kept in a 64-bit buffer, so a Huffman code is usually decoded from one look-up.
class bit_reader {
public:
    bit_reader(std::span<const unsigned char> bytes, std::size_t pos) : bytes_(bytes), pos_(pos) {}

    /// One bit; false when the data ends here (a marker or the end of the file).
    bool bit(int& out) {
        if (count_ == 0 && !fill()) return false;
        --count_;
        out = static_cast<int>((buffer_ >> count_) & 1);
        return true;
    }
    bool bits(int n, int& out) {
        if (count_ < n) fill();
        if (count_ < n) return false;
        count_ -= n;
        out = static_cast<int>((buffer_ >> count_) & ((std::uint64_t{1} << n) - 1));
        return true;
    }
    /// The next `n` bits without consuming them, when that many are there.
    bool peek(int n, unsigned& out) {
        if (count_ < n) fill();
        if (count_ < n) return false;
        out = static_cast<unsigned>((buffer_ >> (count_ - n)) & ((std::uint64_t{1} << n) - 1));
        return true;
    }
    void skip(int n) { count_ -= n; }
    /// Drops the unread bits of the current byte (the padding before a marker) and gives back
    /// the whole bytes that were buffered but not read, stuffed pairs counting two.
    void align() {
        for (int i = 0; i < count_ / 8; ++i) pos_ -= ((widths_ >> i) & 1) ? 2 : 1;
        count_ = 0;
        widths_ = 0;
    }
    std::size_t position() const { return pos_; }
    void seek(std::size_t pos) {
        pos_ = pos;
        count_ = 0;
        widths_ = 0;
    }

private:
    /// Adds whole bytes to the buffer up to 64 bits, stopping before a marker.
    bool fill() {
        bool any = false;
        while (count_ <= 56 && pos_ < bytes_.size()) {
            const unsigned char b = bytes_[pos_];
            bool stuffed = false;
            if (b == 0xff) {
                if (pos_ + 1 >= bytes_.size() || bytes_[pos_ + 1] != 0x00) break;  // a marker
                stuffed = true;
            }
            widths_ = (widths_ << 1) | (stuffed ? 1u : 0u);
            pos_ += stuffed ? 2 : 1;
            buffer_ = (buffer_ << 8) | b;
            count_ += 8;
            any = true;
        }
        return any;
    }

    std::span<const unsigned char> bytes_;
    std::size_t pos_;
    std::uint64_t buffer_ = 0;
    std::uint64_t widths_ = 0;  // one bit per buffered byte, the newest lowest: 1 for a stuffed pair
    int count_ = 0;
};

}  // namespace jpeg_detail

struct jpeg_facts {
    std::uint32_t width = 0, height = 0;
    int components = 0;
};

/// Checks the JPEG `bytes` (signature already matched); throws input_error naming `path`.
inline jpeg_facts check_jpeg(std::span<const unsigned char> bytes, const std::string& path, const image_limits& limits) {
    using namespace jpeg_detail;
    auto fail = [&](const std::string& what) -> void { throw input_error(tpo::detail::concat(path, ": image: ", what)); };
    auto corrupt = [&](const std::string& what) -> void {
        fail(tpo::detail::concat(what, " (the file is corrupt or truncated)"));
    };
    jpeg_facts facts;
    std::array<huffman_table, 4> dc_tables{}, ac_tables{};
    std::vector<component> comps;
    bool have_frame = false, progressive = false, seen_end = false;
    int restart_interval = 0, scans = 0, hmax = 1, vmax = 1;
    std::size_t pos = 2;  // after SOI

    auto u16 = [&](std::size_t at) { return (std::size_t{bytes[at]} << 8) | bytes[at + 1]; };

    while (!seen_end) {
        // A marker: 0xFF, any number of fill bytes 0xFF, then the code.
        if (pos >= bytes.size()) fail("truncated: the file ends before the EOI marker");
        if (bytes[pos] != 0xff)
            corrupt(tpo::detail::concat("byte ", pos, ": ", int(bytes[pos]), " where a marker was expected"));
        while (pos < bytes.size() && bytes[pos] == 0xff) ++pos;
        if (pos >= bytes.size()) fail("truncated: the file ends before the EOI marker");
        const int marker = bytes[pos++];
        const std::size_t marker_at = pos - 2;
        if (marker == 0xd9) {  // EOI
            seen_end = true;
            break;
        }
        if (marker == 0x01 || (marker >= 0xd0 && marker <= 0xd7)) continue;  // TEM, a stray RSTn: no segment
        if (marker == 0xd8 || marker == 0x00)
            corrupt(tpo::detail::concat("unexpected marker ", marker, " at byte ", marker_at));
        if (bytes.size() - pos < 2) fail("truncated: the file ends inside a segment header");
        const std::size_t length = u16(pos);
        if (length < 2) corrupt(tpo::detail::concat("segment ", marker, " at byte ", marker_at, ": length ", length));
        if (bytes.size() - pos < length)
            fail(tpo::detail::concat("truncated: segment ", marker, " at byte ", marker_at, " needs ", length,
                                     " bytes, ", bytes.size() - pos, " present"));
        const std::span<const unsigned char> seg = bytes.subspan(pos + 2, length - 2);
        const std::size_t next = pos + length;

        if (marker == 0xc0 || marker == 0xc1 || marker == 0xc2) {  // SOF0/1/2: Huffman, 8-bit
            if (have_frame) corrupt("a second frame header (SOF)");
            have_frame = true;
            progressive = marker == 0xc2;
            if (seg.size() < 6) corrupt("SOF: segment too short");
            if (seg[0] != 8) fail(tpo::detail::concat("SOF: ", int(seg[0]), "-bit samples, expected 8-bit"));
            facts.height = static_cast<std::uint32_t>((seg[1] << 8) | seg[2]);
            facts.width = static_cast<std::uint32_t>((seg[3] << 8) | seg[4]);
            facts.components = seg[5];
            if (facts.height == 0 || facts.width == 0)
                fail(tpo::detail::concat("SOF: ", facts.width, "x", facts.height,
                                         " pixels, expected both sides at least 1 (DNL is not supported)"));
            if (facts.components != 1 && facts.components != 3 && facts.components != 4)
                fail(tpo::detail::concat("SOF: ", facts.components, " components, expected 1, 3 or 4"));
            if (seg.size() != 6 + 3 * static_cast<std::size_t>(facts.components))
                corrupt(tpo::detail::concat("SOF: length ", length, " for ", facts.components, " components"));
            check_pixel_budget(path, facts.width, facts.height, limits);
            for (int c = 0; c < facts.components; ++c) {
                component k;
                k.id = seg[6 + 3 * c];
                k.h = seg[7 + 3 * c] >> 4;
                k.v = seg[7 + 3 * c] & 15;
                if (k.h < 1 || k.h > 4 || k.v < 1 || k.v > 4 || seg[8 + 3 * c] > 3)
                    corrupt(tpo::detail::concat("SOF: component ", k.id, " has sampling ", k.h, "x", k.v,
                                                " or quantisation table ", int(seg[8 + 3 * c])));
                for (const component& other : comps)
                    if (other.id == k.id) corrupt(tpo::detail::concat("SOF: component id ", k.id, " twice"));
                k.coefficient_bits.fill(-1);
                comps.push_back(k);
                hmax = std::max(hmax, k.h);
                vmax = std::max(vmax, k.v);
            }
            for (component& k : comps) {
                const std::uint64_t w = (std::uint64_t{facts.width} * k.h + hmax - 1) / hmax;
                const std::uint64_t h = (std::uint64_t{facts.height} * k.v + vmax - 1) / vmax;
                k.blocks_wide = (w + 7) / 8;
                k.blocks_high = (h + 7) / 8;
                if (progressive) k.nonzero.assign(static_cast<std::size_t>(k.blocks_wide * k.blocks_high), 0);
            }
        } else if (marker >= 0xc3 && marker <= 0xcf && marker != 0xc4 && marker != 0xc8 && marker != 0xcc) {
            fail(tpo::detail::concat("SOF", marker - 0xc0,
                                     ": lossless, hierarchical or arithmetic-coded JPEG is not supported, expected "
                                     "baseline or progressive"));
        } else if (marker == 0xc4) {  // DHT
            std::size_t i = 0;
            while (i < seg.size()) {
                if (seg.size() - i < 17) corrupt("DHT: segment too short");
                const int table_class = seg[i] >> 4, id = seg[i] & 15;
                if (table_class > 1 || id > 3) corrupt(tpo::detail::concat("DHT: table class ", table_class, " id ", id));
                huffman_table t;
                std::size_t total = 0;
                std::array<int, 17> counts{};
                for (int l = 1; l <= 16; ++l) total += counts[l] = seg[i + l];
                if (total > 256 || seg.size() - i - 17 < total) corrupt("DHT: table larger than its segment");
                std::int32_t code = 0;
                std::size_t k = 0;
                for (int l = 1; l <= 16; ++l) {
                    t.offset[l] = static_cast<std::int32_t>(k) - code;
                    code += counts[l];
                    k += static_cast<std::size_t>(counts[l]);
                    t.max_code[l] = counts[l] ? code - 1 : -1;
                    if (code > (1 << l)) corrupt("DHT: more codes than a prefix code of those lengths holds");
                    code <<= 1;
                }
                for (std::size_t v = 0; v < total; ++v) t.values[v] = seg[i + 17 + v];
                for (int l = 1, first = 0, k2 = 0; l <= 8; ++l) {
                    for (int c = 0; c < counts[l]; ++c, ++k2)
                        for (int suffix = 0; suffix < (1 << (8 - l)); ++suffix)
                            t.fast[static_cast<std::size_t>(((first + c) << (8 - l)) | suffix)] =
                                static_cast<std::uint16_t>((l << 8) | t.values[static_cast<std::size_t>(k2)]);
                    first = (first + counts[l]) << 1;
                }
                t.defined = true;
                (table_class == 0 ? dc_tables : ac_tables)[static_cast<std::size_t>(id)] = t;
                i += 17 + total;
            }
        } else if (marker == 0xdb) {  // DQT
            std::size_t i = 0;
            while (i < seg.size()) {
                const int precision = seg[i] >> 4, id = seg[i] & 15;
                const std::size_t size = precision ? 128 : 64;
                if (precision > 1 || id > 3 || seg.size() - i - 1 < size) corrupt("DQT: malformed table");
                i += 1 + size;
            }
        } else if (marker == 0xdd) {  // DRI
            if (seg.size() != 2) corrupt("DRI: length");
            restart_interval = static_cast<int>((seg[0] << 8) | seg[1]);
        } else if (marker == 0xda) {  // SOS
            if (!have_frame) corrupt("SOS before the frame header (SOF)");
            if (++scans > limits.max_jpeg_scans)
                fail(tpo::detail::concat("more than ", limits.max_jpeg_scans,
                                         " scans, expected a baseline or progressive JPEG with fewer"));
            if (seg.empty()) corrupt("SOS: empty");
            const int ns = seg[0];
            if (ns < 1 || ns > 4 || seg.size() != 4 + 2 * static_cast<std::size_t>(ns)) corrupt("SOS: malformed header");
            std::vector<component*> in_scan;
            std::vector<int> dc_id, ac_id;
            for (int j = 0; j < ns; ++j) {
                component* found = nullptr;
                for (component& k : comps)
                    if (k.id == seg[1 + 2 * j]) found = &k;
                if (!found) corrupt(tpo::detail::concat("SOS: component ", int(seg[1 + 2 * j]), " is not in the frame"));
                for (component* other : in_scan)
                    if (other == found) corrupt("SOS: a component twice in one scan");
                in_scan.push_back(found);
                dc_id.push_back(seg[2 + 2 * j] >> 4);
                ac_id.push_back(seg[2 + 2 * j] & 15);
            }
            const int ss = seg[1 + 2 * ns], se = seg[2 + 2 * ns], ah = seg[3 + 2 * ns] >> 4, al = seg[3 + 2 * ns] & 15;
            if (!progressive) {
                if (ss != 0 || se != 63 || ah != 0 || al != 0) corrupt("SOS: spectral selection of a sequential scan");
                for (component* k : in_scan) {
                    if (k->in_a_scan) corrupt(tpo::detail::concat("component ", k->id, " in two sequential scans"));
                    k->in_a_scan = true;
                }
            } else {
                if (ss > se || se > 63 || (ss == 0 && se != 0) || (ss > 0 && ns != 1) || al > 13)
                    corrupt(tpo::detail::concat("SOS: progressive scan with Ss ", ss, ", Se ", se, ", ", ns,
                                                " components"));
                for (component* k : in_scan) {
                    if (ss > 0 && k->coefficient_bits[0] < 0)
                        corrupt(tpo::detail::concat("component ", k->id, ": AC scan before its DC scan"));
                    for (int c = ss; c <= se; ++c) {
                        const int expected = k->coefficient_bits[static_cast<std::size_t>(c)];
                        if (ah == 0 ? expected >= 0 : (expected != ah || al != ah - 1))
                            corrupt(tpo::detail::concat("component ", k->id, ", coefficient ", c,
                                                        ": successive approximation out of order"));
                        k->coefficient_bits[static_cast<std::size_t>(c)] = al;
                    }
                    k->in_a_scan = true;
                }
            }
            for (int j = 0; j < ns; ++j) {
                const bool needs_dc = ss == 0 && ah == 0, needs_ac = se > 0;
                if ((needs_dc && (dc_id[j] > 3 || !dc_tables[static_cast<std::size_t>(dc_id[j])].defined)) ||
                    (needs_ac && (ac_id[j] > 3 || !ac_tables[static_cast<std::size_t>(ac_id[j])].defined)))
                    corrupt(tpo::detail::concat("SOS: component ", in_scan[static_cast<std::size_t>(j)]->id,
                                                " uses a Huffman table that was not defined"));
            }

            // The entropy-coded data, block by block.
            bit_reader in(bytes, next);
            auto decode = [&](const huffman_table& t, int& symbol) {
                unsigned next = 0;
                if (in.peek(8, next) && t.fast[next]) {
                    in.skip(t.fast[next] >> 8);
                    symbol = t.fast[next] & 0xff;
                    return;
                }
                std::int32_t code = 0;
                for (int l = 1; l <= 16; ++l) {
                    int b = 0;
                    if (!in.bit(b)) corrupt(tpo::detail::concat("scan ", scans, ": the entropy-coded data ends early"));
                    code = (code << 1) | b;
                    if (code <= t.max_code[l]) {
                        symbol = t.values[static_cast<std::size_t>(code + t.offset[l])];
                        return;
                    }
                }
                corrupt(tpo::detail::concat("scan ", scans, ": an invalid Huffman code"));
            };
            auto receive = [&](int n) {
                int v = 0;
                if (n && !in.bits(n, v)) corrupt(tpo::detail::concat("scan ", scans, ": the entropy-coded data ends early"));
                return n ? (v < (1 << (n - 1)) ? v - (1 << n) + 1 : v) : 0;
            };
            auto receive_raw = [&](int n) {
                int v = 0;
                if (n && !in.bits(n, v)) corrupt(tpo::detail::concat("scan ", scans, ": the entropy-coded data ends early"));
                return static_cast<long>(v);
            };
            std::vector<long> dc_prediction(in_scan.size(), 0);
            long eob_run = 0;
            auto block = [&](std::size_t j, component& k, std::uint64_t bx, std::uint64_t by) {
                const huffman_table& dct = dc_tables[static_cast<std::size_t>(dc_id[j] & 3)];
                const huffman_table& act = ac_tables[static_cast<std::size_t>(ac_id[j] & 3)];
                const bool inside = bx < k.blocks_wide && by < k.blocks_high;
                std::uint64_t* nz = progressive && inside ? &k.nonzero[static_cast<std::size_t>(by * k.blocks_wide + bx)]
                                                          : nullptr;
                if (ss == 0) {
                    if (ah == 0) {
                        int t = 0;
                        decode(dct, t);
                        if (t > 11) corrupt(tpo::detail::concat("scan ", scans, ": DC difference of ", t, " bits"));
                        dc_prediction[j] += receive(t);
                        if (dc_prediction[j] < -2047 || dc_prediction[j] > 2047)
                            corrupt(tpo::detail::concat("scan ", scans, ": DC coefficient ", dc_prediction[j],
                                                        " outside the 8-bit range"));
                    } else {
                        receive(1);
                    }
                    if (progressive) return;
                    // Sequential: the AC coefficients follow.
                    for (int c = 1; c < 64;) {
                        int rs = 0;
                        decode(act, rs);
                        const int r = rs >> 4, s = rs & 15;
                        if (s == 0) {
                            if (r != 15) break;
                            c += 16;
                            continue;
                        }
                        if (s > 10 || c + r > 63)
                            corrupt(tpo::detail::concat("scan ", scans, ": AC coefficient ", c + r, " of ", s, " bits"));
                        receive(s);
                        c += r + 1;
                    }
                    return;
                }
                // Progressive AC scans (one component, not interleaved).
                int c = ss;
                if (ah == 0) {
                    if (eob_run > 0) {
                        --eob_run;
                        return;
                    }
                    for (; c <= se;) {
                        int rs = 0;
                        decode(act, rs);
                        const int r = rs >> 4, s = rs & 15;
                        if (s == 0) {
                            if (r < 15) {
                                eob_run = (1L << r) - 1 + receive_raw(r);
                                break;
                            }
                            c += 16;
                            continue;
                        }
                        if (s > 10 || c + r > se)
                            corrupt(tpo::detail::concat("scan ", scans, ": AC coefficient ", c + r, " of ", s, " bits"));
                        receive(s);
                        c += r;
                        if (nz) *nz |= std::uint64_t{1} << c;
                        ++c;
                    }
                    return;
                }
                // Refinement: correction bits for coefficients already nonzero, new ones of size 1.
                auto known = [&](int at) { return nz && ((*nz >> at) & 1); };
                if (eob_run == 0) {
                    for (; c <= se; ++c) {
                        int rs = 0;
                        decode(act, rs);
                        int r = rs >> 4;
                        const int s = rs & 15;
                        if (s == 0 && r < 15) {
                            eob_run = (1L << r) + receive_raw(r);
                            break;
                        }
                        if (s != 0 && s != 1) corrupt(tpo::detail::concat("scan ", scans, ": refinement of ", s, " bits"));
                        if (s) receive(1);
                        for (; c <= se; ++c) {
                            if (known(c)) {
                                receive(1);
                            } else if (--r < 0) {
                                break;
                            }
                        }
                        if (s) {
                            if (c > se) corrupt(tpo::detail::concat("scan ", scans, ": refinement past the band"));
                            if (nz) *nz |= std::uint64_t{1} << c;
                        }
                    }
                }
                if (eob_run > 0) {
                    for (; c <= se; ++c)
                        if (known(c)) receive(1);
                    --eob_run;
                }
            };

            const std::uint64_t mcus_wide = (std::uint64_t{facts.width} + 8 * hmax - 1) / (8 * hmax);
            const std::uint64_t mcus_high = (std::uint64_t{facts.height} + 8 * vmax - 1) / (8 * vmax);
            const std::uint64_t units = ns == 1 ? in_scan[0]->blocks_wide * in_scan[0]->blocks_high : mcus_wide * mcus_high;
            int expected_restart = 0;
            for (std::uint64_t u = 0; u < units; ++u) {
                if (restart_interval && u > 0 && u % static_cast<std::uint64_t>(restart_interval) == 0) {
                    in.align();
                    std::size_t at = in.position();
                    if (at + 1 >= bytes.size() || bytes[at] != 0xff || bytes[at + 1] != 0xd0 + expected_restart)
                        corrupt(tpo::detail::concat("scan ", scans, ": restart marker ", expected_restart,
                                                    " missing at byte ", at));
                    expected_restart = (expected_restart + 1) & 7;
                    in.seek(at + 2);
                    std::fill(dc_prediction.begin(), dc_prediction.end(), 0);
                    eob_run = 0;
                }
                if (ns == 1) {
                    component& k = *in_scan[0];
                    block(0, k, u % k.blocks_wide, u / k.blocks_wide);
                } else {
                    const std::uint64_t mx = u % mcus_wide, my = u / mcus_wide;
                    for (std::size_t j = 0; j < in_scan.size(); ++j) {
                        component& k = *in_scan[j];
                        for (int y = 0; y < k.v; ++y)
                            for (int x = 0; x < k.h; ++x)
                                block(j, k, mx * static_cast<std::uint64_t>(k.h) + static_cast<std::uint64_t>(x),
                                      my * static_cast<std::uint64_t>(k.v) + static_cast<std::uint64_t>(y));
                    }
                }
            }
            in.align();
            pos = in.position();
            if (pos >= bytes.size()) fail("truncated: the file ends after a scan, before the EOI marker");
            if (bytes[pos] != 0xff)
                corrupt(tpo::detail::concat("scan ", scans, ": bytes left over after its last block, at byte ", pos));
            continue;
        }
        // APPn, COM and the other segments carry nothing the pixels depend on.
        pos = next;
    }
    if (!have_frame) corrupt("no frame header (SOF)");
    if (scans == 0) corrupt("no scan (SOS): the image has no data");
    for (const component& k : comps)
        if (!k.in_a_scan || (progressive && k.coefficient_bits[0] < 0))
            corrupt(tpo::detail::concat("component ", k.id, " has no ", progressive ? "DC " : "", "scan"));
    // Bytes after EOI are not part of the image and are ignored, as other decoders do.
    return facts;
}

}  // namespace tpo_cli
