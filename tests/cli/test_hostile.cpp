// Hostile inputs and faults against the tpo tool and its readers: images of other formats and
// corrupt ones (in process, through the same decoder the tool runs, every truncation and a
// corruption of every byte), files that are not regular files, standard output that cannot be
// written, a full disk, the tool killed while it writes, output sets that cannot be placed whole,
// loose numbers, undefined behaviour, and what the tool and the library must agree on. Every run
// must end (a timeout turns a hang into a failure), with exit 0 or 2 and one line on stderr, and
// leave no file that was not asked for. The last test case prints the count.

#include <catch2/catch.hpp>

#include <dirent.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cli/image_file.hpp"
#include "cli/process.hpp"
#include "support/batch.hpp"
#include "tpo/io/npy.hpp"

using namespace tpo_cli_test;
namespace io = tpo::io;

namespace {

/// What the corpus tried and how each input ended.
struct tally {
    long inputs = 0, clean_errors = 0, accepted = 0, silently_accepted_bad = 0, hangs = 0, crashes = 0, leftovers = 0;
} counts;

const fs::path images = fs::path(TPO_TEST_SOURCE_DIR) / "images";

std::vector<unsigned char> bytes_of(const fs::path& p) {
    const std::string s = slurp(p);
    return {s.begin(), s.end()};
}

std::vector<fs::path> image_files(const std::string& prefix, const std::string& ext) {
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(images)) {
        const std::string name = e.path().filename().string();
        if (name.rfind(prefix, 0) == 0 && e.path().extension() == ext) files.push_back(e.path());
    }
    std::sort(files.begin(), files.end());
    return files;
}

/// Decodes in process; "" when accepted (and then the image is as the header says), else the
/// one-line message of the input_error.
std::string decode(const std::vector<unsigned char>& bytes, const std::string& name,
                   const tpo_cli::image_limits& limits = {}) {
    ++counts.inputs;
    try {
        const tpo_cli::rgb_image img = tpo_cli::decode_rgb_image(bytes, name, limits);
        REQUIRE(img.width >= 1);
        REQUIRE(img.height >= 1);
        REQUIRE(static_cast<std::uint64_t>(img.width) * static_cast<std::uint64_t>(img.height) <= limits.max_pixels);
        REQUIRE(img.pixels.size() == static_cast<std::size_t>(img.width) * static_cast<std::size_t>(img.height) * 3);
        ++counts.accepted;
        return "";
    } catch (const tpo_cli::input_error& e) {
        const std::string m = e.what();
        CHECK(m.rfind(name + ": image: ", 0) == 0);
        CHECK(m.find('\n') == std::string::npos);
        ++counts.clean_errors;
        return m;
    }
}

/// Files under `dir` (recursively) whose names are the staged set's temporaries or backups.
std::vector<std::string> temporaries_under(const fs::path& dir) {
    std::vector<std::string> found;
    if (!fs::exists(dir)) return found;
    for (const auto& e : fs::recursive_directory_iterator(dir))
        if (e.path().filename().string().rfind(".tpo-", 0) == 0) found.push_back(e.path().string());
    return found;
}

/// A failed run: exit 2, one line on stderr naming `mention`, nothing on stdout.
void check_clean_error(const run_result& r, const std::string& mention) {
    ++counts.inputs;
    INFO("stderr: " << r.err);
    if (r.status == 128 + SIGKILL) ++counts.hangs;
    if (r.status > 128 && r.status != 128 + SIGKILL) ++counts.crashes;
    CHECK(r.status == 2);
    CHECK(!r.err.empty());
    CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
    CHECK(r.err.find(mention) != std::string::npos);
    CHECK(r.out.empty());
    if (r.status == 2 && r.err.find(mention) != std::string::npos) ++counts.clean_errors;
}

void check_no_leftovers(const fs::path& dir) {
    for (const auto& f : temporaries_under(dir)) UNSCOPED_INFO("left: " << f);
    const auto left = temporaries_under(dir);
    counts.leftovers += static_cast<long>(left.size());
    CHECK(left.empty());
}

template <class T>
void save(const fs::path& p, std::vector<std::int64_t> shape, const std::vector<T>& v) {
    io::write_npy<T>(p, shape, std::span<const T>(v));
}

template <class T>
void save_batch(const fs::path& dir, const tpo_test::batch_data<T>& b) {
    for (auto [side, d] : {std::pair{"chosen", &b.chosen}, std::pair{"rejected", &b.rejected}}) {
        const std::vector<std::int64_t> shape{d->pairs, d->length, d->vocab};
        save(dir / ("policy_" + std::string(side) + ".npy"), shape, d->policy);
        save(dir / ("reference_" + std::string(side) + ".npy"), shape, d->reference);
        save(dir / ("policy_" + std::string(side) + "_noisy.npy"), shape, d->policy_noisy);
        save(dir / ("reference_" + std::string(side) + "_noisy.npy"), shape, d->reference_noisy);
        save(dir / ("labels_" + std::string(side) + ".npy"), {d->pairs, d->length}, d->labels);
    }
}

const char* const grad_names[4] = {"grad_policy_chosen.npy", "grad_policy_rejected.npy",
                                   "grad_policy_chosen_noisy.npy", "grad_policy_rejected_noisy.npy"};

/// Distinct old contents in place of the four gradients, to prove they survive a failed run.
std::vector<std::string> plant_old_gradients(const fs::path& dir) {
    fs::create_directories(dir);
    std::vector<std::string> old;
    for (int k = 0; k < 4; ++k) {
        old.push_back("previous gradient " + std::to_string(k) + "\n");
        io::write_file_atomically(dir / grad_names[k], old.back());
    }
    return old;
}

void check_old_gradients(const fs::path& dir, const std::vector<std::string>& old) {
    for (int k = 0; k < 4; ++k) CHECK(slurp(dir / grad_names[k]) == old[static_cast<std::size_t>(k)]);
    std::size_t files = 0;
    for (const auto& e : fs::directory_iterator(dir)) {
        (void)e;
        ++files;
    }
    CHECK(files == 4);
}

}  // namespace

// --- 1. Only PNG and JPEG reach a decoder ---------------------------------------------------

TEST_CASE("hostile: files of other formats named .png or .jpg are refused, never decoded", "[hostile][image]") {
    temp_dir dir;
    // A Radiance HDR whose RLE scanline is cut short: Debian's stb loops forever on it.
    std::string hdr = "#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 2 +X 16\n";
    hdr += std::string("\x02\x02\x00\x10\x81", 5);
    const std::vector<std::pair<std::string, std::string>> others = {
        {"hdr", hdr},
        {"gif", std::string("GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01"
                            "\x00\x00\x02\x02D\x01\x00;", 35)},
        {"bmp", std::string("BM\x3a\x00\x00\x00\x00\x00\x00\x00\x36\x00\x00\x00\x28\x00\x00\x00\x01\x00\x00\x00\x01"
                            "\x00\x00\x00\x01\x00\x18\x00", 30) + std::string(28, '\0')},
        {"pnm", "P6\n2 2\n255\n" + std::string(12, '\x7f')},
        {"psd", std::string("8BPS\x00\x01", 6) + std::string(40, '\0')},
        {"tga", std::string("\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x02\x00\x18\x00", 18) +
                    std::string(12, '\x40')},
        {"pic", std::string("\x53\x80\xf6\x34", 4) + std::string(88, 'P')},
        {"npy", io::encode_npy<float>(std::vector<std::int64_t>{3, 2, 2}, std::vector<float>(12, 0.5f))},
        {"empty", ""},
    };
    for (const auto& [kind, content] : others)
        for (const std::string ext : {".png", ".jpg"}) {
            const fs::path in = dir / (kind + ext);
            io::write_file_atomically(in, content);
            INFO(in);
            check_clean_error(run_tool({"corrupt", "--in", in.string(), "--out", (dir / ("out" + ext)).string()},
                                       {.timeout_seconds = 20}),
                              "image: no PNG or JPEG signature");
            CHECK(!fs::exists(dir / ("out" + ext)));
        }
    // A real PNG named .jpg and a real JPEG named .png: the name and the content must agree.
    fs::copy_file(images / "valid_rgb.png", dir / "photo.jpg");
    check_clean_error(run_tool({"corrupt", "--in", (dir / "photo.jpg").string(), "--out", (dir / "o.jpg").string()}),
                      "the content is a PNG, expected a JPEG as the name says");
    fs::copy_file(images / "valid_baseline.jpg", dir / "photo.png");
    check_clean_error(run_tool({"corrupt", "--in", (dir / "photo.png").string(), "--out", (dir / "o.png").string()}),
                      "the content is a JPEG, expected a PNG as the name says");
    check_no_leftovers(dir.path);
}

// --- 2. Image inputs must be regular files ----------------------------------------------------

TEST_CASE("hostile: an image that is a device, a FIFO, a directory or a symlink loop is refused at once",
          "[hostile][image]") {
    temp_dir dir;
    fs::create_symlink("/dev/zero", dir / "zero.png");
    REQUIRE(::mkfifo((dir / "fifo.png").c_str(), 0600) == 0);
    fs::create_directory(dir / "folder.png");
    fs::create_symlink(dir / "loop_b.png", dir / "loop_a.png");
    fs::create_symlink(dir / "loop_a.png", dir / "loop_b.png");
    const std::vector<std::pair<std::string, std::string>> cases = {
        {"zero.png", "file: is a character device, expected a regular file"},
        {"fifo.png", "file: is a FIFO, expected a regular file"},
        {"folder.png", "file: is a directory, expected a regular file"},
        {"loop_a.png", "Too many levels of symbolic links: a symbolic link loop?"},
    };
    for (const auto& [name, mention] : cases)
        for (const std::string command : {"corrupt", "loss"}) {
            INFO(name << " via " << command);
            if (command == "corrupt") {
                check_clean_error(run_tool({"corrupt", "--in", (dir / name).string(), "--out",
                                            (dir / "out.png").string()},
                                           {.timeout_seconds = 20}),
                                  mention);
            } else {
                // The same reader serves the .npy inputs.
                fs::create_directories(dir / "d");
                fs::remove(dir / "d/policy_chosen.npy");
                fs::create_symlink(dir / name, dir / "d/policy_chosen.npy");
                check_clean_error(run_tool({"loss", "--dir", (dir / "d").string()}, {.timeout_seconds = 20}), mention);
            }
        }
    CHECK(!fs::exists(dir / "out.png"));
}

// --- 3. Pixel budget, corrupt images --------------------------------------------------------

TEST_CASE("hostile: images beyond the pixel budget or corrupt are refused with the reason", "[hostile][image]") {
    const std::vector<std::pair<std::string, std::string>> cases = {
        {"huge.png", "16384x16384 = 268435456 pixels, more than the budget of 33554432 (raise it with --max-pixels)"},
        {"huge.jpg", "16384x16384 = 268435456 pixels, more than the budget of 33554432 (raise it with --max-pixels)"},
        {"bad_crc.png", "chunk IDAT at byte 33: CRC mismatch"},
        {"truncated_stream.png", "IDAT: the compressed data is corrupt, truncated or inflates to more than the 440 bytes"},
        {"zlib_bomb.png", "IDAT: the compressed data is corrupt, truncated or inflates to more than the 440 bytes"},
        {"bad_palette_index.png", "palette index 3 at row 4, column 7 is outside the 2-entry palette"},
        {"bad_palette_index_i.png", "palette index 3 at row 2, column 3 of an interlaced pass is outside"},
        {"truncated.jpg", "scan 1: the entropy-coded data ends early (the file is corrupt or truncated)"},
        {"truncated_with_eoi.jpg", "scan 1: the entropy-coded data ends early"},
    };
    temp_dir dir;
    for (const auto& [name, mention] : cases) {
        INFO(name);
        const std::string ext = fs::path(name).extension().string();
        check_clean_error(run_tool({"corrupt", "--in", (images / name).string(), "--out", (dir / ("o" + ext)).string()},
                                   {.timeout_seconds = 20}),
                          mention);
        CHECK_THAT(decode(bytes_of(images / name), name), Catch::Contains(mention));
    }
    // Raising the budget does not make a damaged JPEG acceptable: its data cannot fill 16384².
    check_clean_error(run_tool({"corrupt", "--in", (images / "huge.jpg").string(), "--out", (dir / "o.jpg").string(),
                                "--max-pixels", "268435456"}),
                      "scan 1: the entropy-coded data ends early");
    // The budget is the flag's: a 37x29 image (1073 pixels) against a budget of 1000.
    check_clean_error(run_tool({"corrupt", "--in", (images / "valid_baseline.jpg").string(), "--out",
                                (dir / "o.jpg").string(), "--max-pixels", "1000"}),
                      "37x29 = 1073 pixels, more than the budget of 1000");
    check_clean_error(run_tool({"corrupt", "--in", (images / "valid_baseline.jpg").string(), "--out",
                                (dir / "o.jpg").string(), "--max-pixels", "0"}),
                      "--max-pixels: 0 is out of range, expected 1 to 1073741824");
    CHECK(files_under(dir.path).empty());
}

TEST_CASE("hostile: every truncation and a corruption of every byte of a PNG is refused", "[hostile][image]") {
    for (const fs::path& file : image_files("valid_", ".png")) {
        const std::vector<unsigned char> good = bytes_of(file);
        const std::string name = file.filename().string();
        INFO(name);
        REQUIRE(decode(good, name).empty());
        for (std::size_t n = 0; n < good.size(); ++n) {
            const std::string m = decode(std::vector<unsigned char>(good.begin(), good.begin() + static_cast<long>(n)), name);
            if (m.empty()) ++counts.silently_accepted_bad;
            CHECK(!m.empty());
        }
        // Every byte of a PNG is covered by its signature or a chunk's CRC: no change goes unseen.
        for (std::size_t i = 0; i < good.size(); ++i) {
            std::vector<unsigned char> bad = good;
            bad[i] ^= static_cast<unsigned char>(1u << (i % 8));
            const std::string m = decode(bad, name);
            if (m.empty()) ++counts.silently_accepted_bad;
            CHECK(!m.empty());
        }
    }
}

TEST_CASE("hostile: truncations and corruptions of JPEGs end in a clean error or a whole image", "[hostile][image]") {
    std::mt19937_64 rng(18);
    for (const fs::path& file : image_files("valid_", ".jpg")) {
        const std::vector<unsigned char> good = bytes_of(file);
        const std::string name = file.filename().string();
        INFO(name);
        REQUIRE(decode(good, name).empty());
        // A JPEG that is cut anywhere has lost its EOI marker, at least.
        for (std::size_t n = 0; n < good.size(); ++n) {
            const std::string m = decode(std::vector<unsigned char>(good.begin(), good.begin() + static_cast<long>(n)), name);
            if (m.empty()) ++counts.silently_accepted_bad;
            CHECK(!m.empty());
        }
        // Entropy-coded data has no checksum: a changed bit may still be a valid image. Either way
        // the decoder stays within the file and the budget (the sanitizer build checks the rest).
        for (std::size_t i = 0; i < good.size(); ++i) {
            std::vector<unsigned char> bad = good;
            bad[i] ^= static_cast<unsigned char>(1u << (i % 8));
            decode(bad, name);
        }
        for (int k = 0; k < 200; ++k) {
            std::vector<unsigned char> bad = good;
            const int edits = 1 + static_cast<int>(rng() % 8);
            for (int e = 0; e < edits; ++e) bad[rng() % bad.size()] = static_cast<unsigned char>(rng());
            decode(bad, name);
        }
    }
}

// --- 4, 8. Standard output that cannot be written; the reasons given --------------------------

TEST_CASE("hostile: a failed write to standard output exits 2 with the reason and places no file",
          "[hostile][output]") {
    std::mt19937_64 rng(4);
    const auto b = tpo_test::random_batch<float>(rng, 2, 4, 3, 6, 2.0, 0.0);
    temp_dir dir;
    save_batch(dir.path, b);
    const fs::path grads = dir / "grads";
    const auto old = plant_old_gradients(grads);
    const std::vector<std::string> args{"loss", "--dir", dir.path.string(), "--grad-dir", grads.string()};
    check_clean_error(run_tool(args, {.stdout_path = "/dev/full"}),
                      "tpo: standard output: write failed (No space left on device)");
    check_old_gradients(grads, old);
    check_clean_error(run_tool(args, {.close_stdout = true}), "tpo: standard output: write failed (Bad file descriptor)");
    check_old_gradients(grads, old);
    check_no_leftovers(dir.path);
    // --help and demo print through the same checked output.
    check_clean_error(run_tool({"--help"}, {.stdout_path = "/dev/full"}), "standard output: write failed");
}

TEST_CASE("hostile: a full disk (a small tmpfs) fails cleanly, with the reason, and leaves the old outputs",
          "[hostile][output]") {
    temp_dir dir;
    const fs::path mnt = dir / "small";
    fs::create_directories(mnt);
    if (::mount("tpo-test", mnt.c_str(), "tmpfs", 0, "size=256k") != 0) {
        const std::string why = std::strerror(errno);
        std::printf("hostile: full-disk test skipped: cannot mount a tmpfs here (%s)\n", why.c_str());
        WARN("full-disk test skipped: cannot mount a tmpfs (" << why << ")");
        return;
    }
    struct unmount {
        fs::path p;
        ~unmount() { ::umount2(p.c_str(), MNT_DETACH); }
    } guard{mnt};
    std::mt19937_64 rng(5);
    // Four gradients of 2 x 4 x 12000 floats (384 KB each) cannot fit in 256 KiB.
    const auto b = tpo_test::random_batch<float>(rng, 2, 4, 4, 12000, 2.0, 0.0);
    save_batch(dir.path, b);
    const fs::path grads = mnt / "grads";
    const auto old = plant_old_gradients(grads);
    check_clean_error(run_tool({"loss", "--dir", dir.path.string(), "--grad-dir", grads.string()}),
                      "output: write failed (No space left on device)");
    check_old_gradients(grads, old);
    check_no_leftovers(mnt);
    // The same for named temporaries, and for standard output redirected to the full disk.
    check_clean_error(run_tool({"loss", "--dir", dir.path.string(), "--grad-dir", grads.string()},
                               {.environment = {"TPO_TEMPORARY_FILES=named"}}),
                      "output: write failed (No space left on device)");
    check_old_gradients(grads, old);
    check_no_leftovers(mnt);
    {
        std::string filler(64 << 10, 'x');
        std::FILE* f = std::fopen((mnt / "filler").c_str(), "wb");
        REQUIRE(f);
        while (std::fwrite(filler.data(), 1, filler.size(), f) == filler.size() && std::fflush(f) == 0) {
        }
        std::fclose(f);
    }
    check_clean_error(run_tool({"loss", "--dir", dir.path.string()}, {.stdout_path = (mnt / "loss.json").string()}),
                      "tpo: standard output: write failed (No space left on device)");
}

TEST_CASE("hostile: an output name of 251 bytes is written (temporaries have short names of their own)",
          "[hostile][output]") {
    temp_dir dir;
    std::vector<float> x(3 * 4 * 4, 0.5f);
    save(dir / "x.npy", {3, 4, 4}, x);
    const std::string name = std::string(247, 'n') + ".npy";
    REQUIRE(name.size() == 251);
    const run_result r = run_tool({"corrupt", "--in", (dir / "x.npy").string(), "--out", (dir / name).string()});
    ++counts.inputs;
    INFO(r.err);
    CHECK(r.status == 0);
    CHECK(fs::exists(dir / name));
    check_no_leftovers(dir.path);
}

// --- 6. All or nothing ------------------------------------------------------------------------

TEST_CASE("hostile: when one gradient cannot be placed, none is and the previous set stays", "[hostile][output]") {
    std::mt19937_64 rng(6);
    const auto b = tpo_test::random_batch<float>(rng, 2, 4, 3, 6, 2.0, 0.0);
    temp_dir dir;
    save_batch(dir.path, b);
    const fs::path grads = dir / "grads";
    for (int blocked = 0; blocked < 4; ++blocked) {
        for (const std::string kind : {"unnamed", "named"}) {
            INFO("blocked " << grad_names[blocked] << ", " << kind << " temporaries");
            fs::remove_all(grads);
            const auto old = plant_old_gradients(grads);
            fs::remove(grads / grad_names[blocked]);
            fs::create_directories(grads / grad_names[blocked] / "inside");
            check_clean_error(run_tool({"loss", "--dir", dir.path.string(), "--grad-dir", grads.string()},
                                       {.environment = {"TPO_TEMPORARY_FILES=" + kind}}),
                              std::string(grad_names[blocked]) + ": output: exists and is a directory");
            for (int k = 0; k < 4; ++k)
                if (k != blocked) CHECK(slurp(grads / grad_names[k]) == old[static_cast<std::size_t>(k)]);
            check_no_leftovers(dir.path);
        }
    }
}

TEST_CASE("hostile: a rename that fails mid-commit puts back every file already placed", "[hostile][output]") {
    temp_dir dir;
    for (int k = 0; k < 3; ++k) io::write_file_atomically(dir / ("f" + std::to_string(k)), "old " + std::to_string(k));
    io::staged_files set(io::temporaries::named);
    for (int k = 0; k < 3; ++k) set.add(dir / ("f" + std::to_string(k)), "new " + std::to_string(k));
    // The third file's temporary disappears before the commit: its rename fails after the first
    // two are in place.
    std::vector<fs::path> temps;
    for (const auto& e : fs::directory_iterator(dir.path))
        if (e.path().filename().string().rfind(".tpo-tmp-", 0) == 0) temps.push_back(e.path());
    REQUIRE(temps.size() == 3);
    std::sort(temps.begin(), temps.end(), [](const fs::path& a, const fs::path& b) {
        return fs::last_write_time(a) < fs::last_write_time(b) ||
               (fs::last_write_time(a) == fs::last_write_time(b) && a < b);
    });
    // Which temporary is the third file's: the one holding "new 2".
    for (const fs::path& t : temps)
        if (slurp(t) == "new 2") fs::remove(t);
    CHECK_THROWS_WITH(set.commit(), Catch::Contains("f2: output: cannot rename into place (No such file or directory)"));
    for (int k = 0; k < 3; ++k) CHECK(slurp(dir / ("f" + std::to_string(k))) == "old " + std::to_string(k));
    check_no_leftovers(dir.path);
    ++counts.inputs;
    ++counts.clean_errors;
}

// --- 7. Killed while writing ------------------------------------------------------------------

namespace {

/// True once the process has a file of `dir` open (an unnamed temporary shows as "dir/#N (deleted)").
bool writing_into(pid_t pid, const fs::path& dir) {
    const std::string fd_dir = "/proc/" + std::to_string(pid) + "/fd";
    DIR* d = ::opendir(fd_dir.c_str());
    if (!d) return false;
    bool found = false;
    const std::string prefix = dir.string() + "/";
    while (dirent* e = ::readdir(d)) {
        char target[4096];
        const ssize_t n = ::readlink((fd_dir + "/" + e->d_name).c_str(), target, sizeof target - 1);
        if (n <= 0) continue;
        target[n] = '\0';
        if (std::string(target).rfind(prefix, 0) == 0) found = true;
    }
    ::closedir(d);
    return found;
}

}  // namespace

TEST_CASE("hostile: killed during a large gradient write, the tool leaves no file and the old set intact",
          "[hostile][signal]") {
    std::mt19937_64 rng(7);
    // Four gradients of 1 x 8 x 500000 floats, 16 MB each: the writes take long enough to be hit.
    const auto b = tpo_test::random_batch<float>(rng, 1, 8, 8, 500000, 2.0, 0.0);
    temp_dir dir;
    save_batch(dir.path, b);
    const fs::path grads = dir / "grads";
    struct fault {
        int signal;
        const char* temporaries;
    };
    for (const fault f : {fault{SIGKILL, "unnamed"}, fault{SIGTERM, "unnamed"}, fault{SIGTERM, "named"},
                          fault{SIGINT, "named"}, fault{SIGHUP, "named"}}) {
        INFO("signal " << f.signal << ", " << f.temporaries << " temporaries");
        fs::remove_all(grads);
        const auto old = plant_old_gradients(grads);
        process p = start_tool({"loss", "--dir", dir.path.string(), "--grad-dir", grads.string()},
                               {.environment = {std::string("TPO_TEMPORARY_FILES=") + f.temporaries}});
        bool hit = false;
        for (int spins = 0; spins < 200000000 && !hit; ++spins) {
            if (writing_into(p.pid, grads)) hit = true;
            if (::waitpid(p.pid, nullptr, WNOHANG) != 0 && !hit) break;
        }
        REQUIRE(hit);  // the kill lands while a gradient is being written
        ::kill(p.pid, f.signal);
        const run_result r = finish_tool(p);
        ++counts.inputs;
        CHECK(r.status == 128 + f.signal);
        CHECK(r.out.empty());
        check_old_gradients(grads, old);
        check_no_leftovers(dir.path);
    }
}

// --- 9. One number grammar ----------------------------------------------------------------------

TEST_CASE("hostile: every numeric flag reads decimal numbers as Python's float() and int() do, without stripping",
          "[hostile][numbers]") {
    std::mt19937_64 rng(9);
    const auto b = tpo_test::random_batch<double>(rng, 2, 4, 3, 5, 2.0, 0.0);
    temp_dir dir;
    save_batch(dir.path, b);
    std::vector<float> x(3 * 4 * 4, 0.5f);
    save(dir / "x.npy", {3, 4, 4}, x);
    auto loss = [&](std::vector<std::string> extra) {
        std::vector<std::string> args{"loss", "--dir", dir.path.string()};
        args.insert(args.end(), extra.begin(), extra.end());
        return run_tool(args);
    };
    auto corrupt = [&](std::vector<std::string> extra) {
        std::vector<std::string> args{"corrupt", "--in", (dir / "x.npy").string(), "--out", (dir / "y.npy").string()};
        args.insert(args.end(), extra.begin(), extra.end());
        return run_tool(args);
    };
    const std::vector<std::pair<std::vector<std::string>, std::string>> refused = {
        {{"--beta", "0x10"}, "flag --beta: '0x10' is not a decimal number"},
        {{"--beta", " 0.1"}, "flag --beta: ' 0.1' is not a decimal number"},
        {{"--beta", "0.1 "}, "flag --beta: '0.1 ' is not a decimal number"},
        {{"--beta", "1e400"}, "flag --beta: '1e400' is inf, expected a finite number"},
        {{"--beta", "nan"}, "flag --beta: 'nan' is nan, expected a finite number"},
        {{"--beta", "1__0"}, "flag --beta: '1__0' is not a decimal number"},
        {{"--beta", "1e-400"}, "beta = 0, expected a finite value > 0"},  // 0.0, as Python reads it
        {{"--a", "-0.5"}, "a = -0.5, expected a finite margin >= 0"},
        {{"--loss", "sigmoid,sft", "--loss-weights", "1,-0.5"}, "weight of sft is -0.5, expected a finite value >= 0"},
        {{"--loss", "sigmoid,sft", "--loss-weights", "1,0x1"}, "loss_weights: '0x1' is not a decimal number"},
        {{"--loss", "sigmoid,sft", "--loss-weights", "1, 2"}, "loss_weights: ' 2' is not a decimal number"},
        {{"--f-alpha-divergence-coef", "-0.5"}, "f_alpha_divergence_coef = -0.5, expected a finite value >= 0"},
        {{"--label-smoothing", "0.6"}, "label_smoothing = 0.6 for loss sigmoid, expected 0 <= label_smoothing <= 0.5"},
        {{"--ld-alpha", "2"}, "ld_alpha = 2, expected 0 <= ld_alpha <= 1"},
        {{"--ignore-index", "-100.0"}, "flag --ignore-index: '-100.0' is not a decimal integer"},
        {{"--ignore-index", "99999999999999999999"}, "is out of range, expected -9223372036854775808 to"},
    };
    for (const auto& [flags, mention] : refused) {
        INFO(flags[0] << " " << flags[1]);
        check_clean_error(loss(flags), mention);
    }
    const std::vector<std::pair<std::vector<std::string>, std::string>> refused_corrupt = {
        {{"--seed", "-1"}, "flag --seed: -1 is out of range, expected 0 to 18446744073709551615"},
        {{"--seed", "0x10"}, "flag --seed: '0x10' is not a decimal integer"},
        {{"--steps", " 5"}, "flag --steps: ' 5' is not a decimal integer"},
        {{"--step", "1e2"}, "flag --step: '1e2' is not a decimal integer"},
        {{"--beta-start", "1e-320", "--beta-end", "-1"}, "beta"},
    };
    for (const auto& [flags, mention] : refused_corrupt) {
        INFO(flags[0] << " " << flags[1]);
        check_clean_error(corrupt(flags), mention);
    }
    // Accepted as Python accepts them: a sign, underscores between digits, a subnormal.
    for (const std::vector<std::string>& flags :
         {std::vector<std::string>{"--beta", "+0.25"}, {"--beta", "1_0.5e-1"}, {"--label-smoothing", "1e-320"},
          {"--beta", ".5"}, {"--beta", "5."}, {"--f-alpha-divergence-coef", "0"}}) {
        INFO(flags[0] << " " << flags[1]);
        const run_result r = loss(flags);
        ++counts.inputs;
        CHECK(r.status == 0);
        CHECK(r.err.empty());
    }
    const run_result plus = loss({"--beta", "+0.25"}), plain = loss({"--beta", "0.25"});
    CHECK(plus.out == plain.out);
    const run_result seed = corrupt({"--seed", "1_000", "--step", "+7"});
    CHECK(seed.status == 0);
}

// --- 10. No undefined behaviour on extreme shapes ---------------------------------------------

TEST_CASE("hostile: corrupt on a .npy of shape (0, 2^62, 2^62, 3, 4, 4) is refused without overflow",
          "[hostile][numbers]") {
    temp_dir dir;
    const std::int64_t big = std::int64_t{1} << 62;
    const std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (0, " + std::to_string(big) + ", " +
                               std::to_string(big) + ", 3, 4, 4), }";
    std::string padded = header;
    while ((10 + padded.size() + 1) % 64) padded += ' ';
    padded += '\n';
    std::string file = "\x93NUMPY\x01";
    file += '\0';
    file += static_cast<char>(padded.size() & 0xff);
    file += static_cast<char>(padded.size() >> 8);
    io::write_file_atomically(dir / "empty.npy", file + padded);
    check_clean_error(run_tool({"corrupt", "--in", (dir / "empty.npy").string(), "--out", (dir / "o.npy").string()}),
                      "has no element, expected at least one (..., C, H, W) image");
    CHECK(!fs::exists(dir / "o.npy"));
}

// --- 11. What the library and the tool agree on -------------------------------------------------

TEST_CASE("hostile: rows that are not scored are not read by the tool, as by the library", "[hostile][agree]") {
    std::mt19937_64 rng(11);
    auto b = tpo_test::random_batch<double>(rng, 2, 5, 4, 6, 2.0, 0.0);
    // Sequence 1 of the chosen side masks position 3: its row t = 2 is not scored; position 0 is
    // never scored with the shift, whatever its label.
    b.chosen.labels[1 * 5 + 3] = -100;
    b.chosen.labels[0] = 77;
    temp_dir dir;
    for (int k = 0; k < 4; ++k) b.chosen.tensor(k)[static_cast<std::size_t>((1 * 5 + 2) * 6 + 1)] = std::nan("");
    b.chosen.policy[static_cast<std::size_t>((0 * 5 + 4) * 6)] = INFINITY;  // the last row: never scored
    save_batch(dir.path, b);
    const run_result r = run_tool({"loss", "--dir", dir.path.string()});
    ++counts.inputs;
    INFO(r.err);
    REQUIRE(r.status == 0);
    tpo::backend::reference backend;
    const tpo::objective_result expected = tpo::evaluate(backend, tpo::objective_options{}, b.batch());
    CHECK(r.out.find("\"loss\": " + [&] {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%.17g", expected.loss);
        return std::string(buf);
    }()) != std::string::npos);
    // A NaN in a row that is scored is an error for both, naming the file and the element.
    b.chosen.policy_noisy[static_cast<std::size_t>((1 * 5 + 1) * 6 + 4)] = std::nan("");
    save_batch(dir.path, b);
    check_clean_error(run_tool({"loss", "--dir", dir.path.string()}),
                      "policy_chosen_noisy.npy: data: element [1, 1, 4] is nan, expected finite logits");
    CHECK_THROWS_WITH(tpo::evaluate(backend, tpo::objective_options{}, b.batch()),
                      Catch::Contains("chosen policy noisy logits at sequence 1, position 2: the row holds a NaN"));
}

TEST_CASE("hostile: a sequence with no scored token is legitimate: score 0, zero rewards, reported as 0 tokens",
          "[hostile][agree]") {
    std::mt19937_64 rng(12);
    auto b = tpo_test::random_batch<double>(rng, 2, 4, 3, 5, 2.0, 0.0);
    for (int t = 0; t < 4; ++t) b.chosen.labels[static_cast<std::size_t>(t)] = -100;  // chosen sequence 0
    for (int t = 0; t < 3; ++t) b.rejected.labels[static_cast<std::size_t>(t)] = -100;  // rejected sequence 0
    temp_dir dir;
    save_batch(dir.path, b);
    const run_result r = run_tool({"loss", "--dir", dir.path.string()});
    ++counts.inputs;
    INFO(r.err);
    REQUIRE(r.status == 0);
    CHECK(r.out.find("\"chosen_tokens\": [0, 3]") != std::string::npos);
    CHECK(r.out.find("\"rejected_tokens\": [0, 2]") != std::string::npos);
    tpo::backend::reference backend;
    const auto result = tpo::evaluate(backend, tpo::objective_options{}, b.batch());
    CHECK(result.chosen_rewards[0] == 0.0);
    CHECK(result.rejected_rewards[0] == 0.0);
    CHECK(result.losses[0] == Approx(std::log(2.0)).epsilon(1e-15));
}

TEST_CASE("hostile: the count", "[hostile][count]") {
    std::printf("hostile corpus: %ld inputs tried, %ld clean errors, %ld accepted, %ld silently accepted bad inputs, "
                "%ld hangs, %ld crashes, %ld leftover files\n",
                counts.inputs, counts.clean_errors, counts.accepted, counts.silently_accepted_bad, counts.hangs,
                counts.crashes, counts.leftovers);
    CHECK(counts.silently_accepted_bad == 0);
    CHECK(counts.hangs == 0);
    CHECK(counts.crashes == 0);
    CHECK(counts.leftovers == 0);
}
