// The .npy reader and writer: round trips of every dtype, the header spellings NumPy produces,
// and a rejection naming the field for every malformed or unsupported file.

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "tpo/io/npy.hpp"

namespace io = tpo::io;

namespace {

std::span<const unsigned char> bytes_of(const std::string& s) {
    return {reinterpret_cast<const unsigned char*>(s.data()), s.size()};
}

/// A .npy file with the given raw header text (padded and terminated here unless `raw`).
std::string file_with(const std::string& dict, const std::string& payload, int version = 1, bool raw = false) {
    std::string header = dict;
    const std::size_t prefix = version == 1 ? 10 : 12;
    if (!raw) {
        while ((prefix + header.size() + 1) % 64) header += ' ';
        header += '\n';
    }
    std::string s = "\x93NUMPY";
    s += static_cast<char>(version);
    s += '\0';
    for (std::size_t i = 0; i < (version == 1 ? 2u : 4u); ++i) s += static_cast<char>((header.size() >> (8 * i)) & 0xff);
    return s + header + payload;
}

std::string message_of(const std::string& file) {
    try {
        io::parse_npy(bytes_of(file), "t.npy");
    } catch (const io::format_error& e) {
        return e.what();
    }
    return "(accepted)";
}

}  // namespace

TEST_CASE("npy: every supported dtype round-trips exactly", "[npy]") {
    const std::vector<std::int64_t> shape{2, 3};
    auto round_trip = [&](auto values) {
        using T = typename decltype(values)::value_type;
        const std::string file = io::encode_npy<T>(shape, std::span<const T>(values));
        CHECK(file.size() % 64 == values.size() * sizeof(T) % 64);  // payload starts on a 64-byte boundary
        const io::npy_array a = io::parse_npy(bytes_of(file), "t.npy");
        CHECK(a.dtype == io::dtype_of<T>());
        CHECK(a.shape == shape);
        REQUIRE(a.holds<T>());
        CHECK(std::memcmp(a.values<T>().data(), values.data(), values.size() * sizeof(T)) == 0);
    };
    round_trip(std::vector<float>{0.f, -1.5f, 3e38f, std::numeric_limits<float>::quiet_NaN(), 1e-45f, -0.f});
    round_trip(std::vector<double>{0., -1.5, 1e308, std::numeric_limits<double>::infinity(), 5e-324, -0.});
    round_trip(std::vector<std::int32_t>{-100, 0, 1, INT32_MAX, INT32_MIN, 7});
    round_trip(std::vector<std::int64_t>{-100, 0, 1, INT64_MAX, INT64_MIN, 7});
    round_trip(std::vector<std::uint8_t>{0, 1, 127, 128, 254, 255});
}

TEST_CASE("npy: header spellings NumPy writes or accepts", "[npy]") {
    const std::string four(16, '\0');
    SECTION("versions 2.0 and 3.0") {
        for (int v : {2, 3}) {
            const auto a = io::parse_npy(
                bytes_of(file_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }", four, v)), "t.npy");
            CHECK(a.shape == std::vector<std::int64_t>{2, 2});
        }
    }
    SECTION("keys in any order, double quotes, no trailing comma, Python 2 longs") {
        const auto a = io::parse_npy(
            bytes_of(file_with("{\"shape\": (4L,), \"fortran_order\": False, \"descr\": \"<f4\"}", four)), "t.npy");
        CHECK(a.shape == std::vector<std::int64_t>{4});
    }
    SECTION("scalars, empty arrays, one-byte dtypes in any byte order") {
        CHECK(io::parse_npy(bytes_of(file_with("{'descr': '<i4', 'fortran_order': False, 'shape': (), }",
                                               std::string(4, '\0'))),
                            "t.npy")
                  .shape.empty());
        CHECK(io::parse_npy(bytes_of(file_with("{'descr': '<f8', 'fortran_order': False, 'shape': (0, 5), }", "")),
                            "t.npy")
                  .size() == 0);
        CHECK(io::parse_npy(bytes_of(file_with("{'descr': '<u1', 'fortran_order': False, 'shape': (3,), }",
                                               std::string(3, '\0'))),
                            "t.npy")
                  .dtype == io::npy_dtype::u1);
    }
}

TEST_CASE("npy: hostile or unsupported files are rejected with the file and the field", "[npy]") {
    const std::string ok_dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
    const std::string payload(24, '\0');
    const std::string good = file_with(ok_dict, payload);
    REQUIRE(message_of(good) == "(accepted)");

    struct bad_case {
        std::string file, expected;
    };
    const std::vector<bad_case> cases{
        {"", "t.npy: magic: file too short"},
        {"PK\x03\x04 this is a zip", "t.npy: magic: not a .npy file"},
        {"\x93NUMPY", "t.npy: version: file truncated"},
        {good.substr(0, 9), "t.npy: header length: file truncated"},
        {good.substr(0, 40), "t.npy: header: file truncated: the header needs 118 bytes, 30 present"},
        {good.substr(0, good.size() - 1), "t.npy: data: file truncated: shape (2, 3) of <f4 needs 24 bytes, 23 present"},
        {good + "x", "t.npy: data: 1 bytes after the 24 bytes"},
        {[&] {
             std::string s = good;
             s[6] = 4;
             return s;
         }(),
         "t.npy: version: 4.0 is not supported"},
        {file_with("{'descr': '<f2', 'fortran_order': False, 'shape': (2, 3), }", std::string(12, '\0')),
         "t.npy: descr: '<f2' is not supported (half precision"},
        {file_with("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }", payload),
         "t.npy: descr: '>f4' is not supported (big-endian)"},
        {file_with("{'descr': '<c8', 'fortran_order': False, 'shape': (2, 3), }", payload),
         "t.npy: descr: '<c8' is not supported, expected one of"},
        {file_with("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2, 3), }", payload),
         "t.npy: descr: expected a quoted dtype"},
        {file_with("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", payload),
         "t.npy: fortran_order: True: Fortran-ordered arrays are not supported"},
        {file_with("{'descr': '<f4', 'fortran_order': 0, 'shape': (2, 3), }", payload),
         "t.npy: fortran_order: expected True or False"},
        {file_with("{'descr': '<f4', 'shape': (2, 3), }", payload), "t.npy: fortran_order: missing"},
        {file_with("{'descr': '<f4', 'fortran_order': False, }", payload), "t.npy: shape: missing"},
        {file_with("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", payload),
         "t.npy: descr: appears twice"},
        {file_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'x': 1}", payload),
         "t.npy: header: unexpected key 'x'"},
        {file_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, -3), }", payload),
         "t.npy: shape: expected a non-negative integer"},
        {file_with("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }", payload),
         "t.npy: shape: dimension does not fit in 64 bits"},
        {file_with("{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296, 16), }", payload),
         "t.npy: shape: (4294967296, 4294967296, 16) has too many elements"},
        {file_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3) ", payload),
         "t.npy: header: expected ',' or '}'"},
        {file_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), } junk", payload),
         "t.npy: header: unexpected text after the dictionary"},
        {file_with("{'descr': '<f4\x01', 'fortran_order': False, 'shape': (2, 3), }", payload),
         "t.npy: header: contains a control or non-ASCII byte"},
        {file_with("{'descr': '<f4, 'fortran_order': False, 'shape': (2, 3), }", payload),
         "t.npy: descr: '<f4, ' is not supported"},
        {file_with(std::string(70000, ' '), "", 2, true), "t.npy: header length: 70000 bytes, expected at most 65536"},
    };
    for (const bad_case& c : cases) {
        INFO("expected: " << c.expected);
        const std::string m = message_of(c.file);
        CHECK(m.rfind(c.expected, 0) == 0);
        CHECK(m.find('\n') == std::string::npos);
    }
}

TEST_CASE("npy: files on disk, written atomically", "[npy]") {
    const auto dir = std::filesystem::temp_directory_path() / ("tpo-npy-test-" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir);
    const std::vector<double> v{1.0, 2.0, 3.0};
    const std::vector<std::int64_t> shape{3};
    io::write_npy<double>(dir / "a.npy", shape, std::span<const double>(v));
    CHECK(io::read_npy(dir / "a.npy").values<double>() == v);
    std::size_t files = 0;
    for (const auto& e : std::filesystem::directory_iterator(dir)) files += e.is_regular_file();
    CHECK(files == 1);  // no temporary left behind
    try {
        io::read_npy(dir / "missing.npy");
        FAIL("missing file accepted");
    } catch (const io::file_error& e) {
        CHECK(std::string(e.what()).find("missing.npy: file: does not exist") != std::string::npos);
    }
    CHECK_THROWS_AS(io::write_npy<double>(dir / "no/such/dir/a.npy", shape, std::span<const double>(v)),
                    io::file_error);
    CHECK_THROWS_AS(io::encode_npy<double>(std::vector<std::int64_t>{4}, std::span<const double>(v)),
                    tpo::shape_error);
    std::filesystem::remove_all(dir);
}
