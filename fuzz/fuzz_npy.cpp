// libFuzzer target: the .npy parser on arbitrary bytes.
// Properties checked beyond "no crash, no sanitizer report": every rejection is a format_error
// with a one-line message naming the file; every accepted array survives encode → parse unchanged.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>

#include "tpo/io/npy.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const std::span<const unsigned char> bytes(data, size);
    tpo::io::npy_array a;
    try {
        a = tpo::io::parse_npy(bytes, "fuzz.npy");
    } catch (const tpo::io::format_error& e) {
        const std::string m = e.what();
        if (m.rfind("fuzz.npy: ", 0) != 0 || m.find('\n') != std::string::npos) std::abort();
        return 0;
    }
    const std::string again = tpo::io::encode_npy(a);
    const tpo::io::npy_array b =
        tpo::io::parse_npy(std::span<const unsigned char>(reinterpret_cast<const unsigned char*>(again.data()),
                                                          again.size()),
                           "round-trip.npy");
    if (b.dtype != a.dtype || b.shape != a.shape || b.data != a.data) {
        // NaN payloads compare unequal as values; compare the bytes instead.
        const std::string a_bytes = tpo::io::encode_npy(a), b_bytes = tpo::io::encode_npy(b);
        if (a_bytes != b_bytes) std::abort();
    }
    return 0;
}
