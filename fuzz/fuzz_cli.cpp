// libFuzzer target: the tpo tool's flag parsing and input validation, through the same
// tpo_cli::run() that main() calls.
//
// Input layout: byte 0 picks which input file of a valid example batch is replaced; the bytes up to
// the first NUL are the command line (split at spaces; "{D}" stands for the batch directory, "{O}"
// for an output directory); the bytes after the NUL become the replaced file's content.
// Properties checked beyond "no crash, no sanitizer report": the exit status is 0 or 2; a failure
// prints exactly one line; no temporary (partial) output file is ever left behind.
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "cli/run.hpp"
#include "tpo/io/npy.hpp"

namespace fs = std::filesystem;

namespace {

const char* const input_names[] = {
    "policy_chosen",        "policy_rejected",        "reference_chosen",        "reference_rejected",
    "policy_chosen_noisy",  "policy_rejected_noisy",  "reference_chosen_noisy",  "reference_rejected_noisy",
    "labels_chosen",        "labels_rejected",        "image",
};
constexpr int input_count = sizeof input_names / sizeof input_names[0];

struct workspace {
    fs::path dir, out;
    std::vector<std::string> valid;  // the valid content of each input file

    workspace() {
        char tmpl[] = "/tmp/tpo-fuzz-XXXXXX";
        if (!::mkdtemp(tmpl)) std::abort();
        dir = tmpl;
        out = dir / "out";
        fs::create_directories(out);
        fs::create_directories(dir / "cwd");
        fs::current_path(dir / "cwd");  // relative output paths stay inside the workspace
        // A valid TPO batch: P = 2, chosen L = 3, rejected L = 4, V = 5.
        auto logits = [](std::int64_t length, float offset) {
            std::vector<float> z(static_cast<std::size_t>(2 * length * 5));
            for (std::size_t i = 0; i < z.size(); ++i) z[i] = offset + 0.25f * static_cast<float>(i % 7) - 0.5f;
            const std::vector<std::int64_t> shape{2, length, 5};
            return tpo::io::encode_npy<float>(shape, std::span<const float>(z));
        };
        for (int k = 0; k < 8; ++k) valid.push_back(logits(k % 2 ? 4 : 3, 0.1f * static_cast<float>(k)));
        const std::vector<std::int64_t> yc{-100, 1, 4, -100, 0, 2}, yr{-100, 3, 3, 1, 2, -100, 4, 0};
        const std::vector<std::int64_t> sc{2, 3}, sr{2, 4};
        valid.push_back(tpo::io::encode_npy<std::int64_t>(sc, std::span<const std::int64_t>(yc)));
        valid.push_back(tpo::io::encode_npy<std::int64_t>(sr, std::span<const std::int64_t>(yr)));
        std::vector<float> image(2 * 3 * 4 * 5);
        for (std::size_t i = 0; i < image.size(); ++i) image[i] = static_cast<float>(i % 11) / 10.0f;
        const std::vector<std::int64_t> si{2, 3, 4, 5};
        valid.push_back(tpo::io::encode_npy<float>(si, std::span<const float>(image)));
        for (int k = 0; k < input_count; ++k) write(k, valid[k]);
    }
    ~workspace() {
        std::error_code ec;
        fs::current_path(fs::temp_directory_path(), ec);
        fs::remove_all(dir, ec);
    }
    fs::path path(int k) const { return dir / (std::string(input_names[k]) + ".npy"); }

    /// Puts the workspace back as it was (a fuzzed command may write anywhere inside it), so every
    /// input runs from the same state.
    void reset() const {
        for (const fs::path& d : {out, dir / "cwd"})
            for (const auto& e : fs::directory_iterator(d)) fs::remove_all(e.path());
        for (const auto& e : fs::directory_iterator(dir)) {
            const fs::path p = e.path();
            if (p == out || p == dir / "cwd") continue;
            int k = 0;
            while (k < input_count && p != path(k)) ++k;
            if (k == input_count) {
                fs::remove_all(p);
                continue;
            }
            const std::vector<unsigned char> now = e.is_regular_file() ? tpo::io::read_file(p)
                                                                       : std::vector<unsigned char>{};
            if (!e.is_regular_file() || std::string(now.begin(), now.end()) != valid[k]) {
                fs::remove_all(p);
                write(k, valid[k]);
            }
        }
        for (int k = 0; k < input_count; ++k)
            if (!fs::exists(path(k))) write(k, valid[k]);
    }
    void write(int k, const std::string& content) const { tpo::io::write_file_atomically(path(k), content); }
};

bool leftover_temporaries(const fs::path& root) {
    for (const auto& e : fs::recursive_directory_iterator(root))
        if (e.path().filename().string().find(".tpo-") != std::string::npos) return true;
    return false;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    static const workspace ws;
    if (size < 1 || size > 8192) return 0;
    const int which = data[0] % input_count;
    const char* begin = reinterpret_cast<const char*>(data + 1);
    const char* end = reinterpret_cast<const char*>(data + size);
    const char* nul = static_cast<const char*>(std::memchr(begin, 0, static_cast<std::size_t>(end - begin)));
    const std::string command(begin, nul ? nul : end);
    const bool replace = nul && nul + 1 < end;

    std::vector<std::string> args;
    std::string token;
    auto flush = [&] {
        if (!token.empty()) args.push_back(token);
        token.clear();
    };
    for (char c : command) {
        if (c == ' ' || c == '\n') flush();
        else token += c;
    }
    flush();
    if (args.size() > 48) return 0;
    for (std::string& a : args) {
        // Never let a fuzzed path escape the workspace.
        if (a.find("..") != std::string::npos || (!a.empty() && a[0] == '/') || a.find("=/") != std::string::npos)
            return 0;
        for (auto [key, value] : {std::pair<std::string, std::string>{"{D}", ws.dir.string()}, {"{O}", ws.out.string()}})
            for (std::size_t p; (p = a.find(key)) != std::string::npos;) a.replace(p, key.size(), value);
    }

    if (replace) ws.write(which, std::string(nul + 1, end));
    std::ostringstream out, err;
    const int status = tpo_cli::run(args, out, err);

    if (status != 0 && status != 2) std::abort();
    const std::string message = err.str();
    if (status == 2 && (message.empty() || message.back() != '\n' || message.find('\n') != message.size() - 1))
        std::abort();
    if (leftover_temporaries(ws.dir)) std::abort();
    ws.reset();
    return 0;
}
