// `mpirun -np R tpo loss --dir DIR --vocab-parallel mpi`: for R = 1..4, the JSON and every
// gradient file equal the single-process tool's on the same directory (logits and fused inputs,
// float64 and float32), and a bad directory makes every rank exit with status 2, one line on
// standard error, no file.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <tpo/io/npy.hpp>

namespace fs = std::filesystem;

namespace {

struct temp_dir {
    fs::path path;
    temp_dir() {
        std::string tmpl = (fs::temp_directory_path() / "tpo-mpi-tool-XXXXXX").string();
        REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
        path = tmpl;
    }
    ~temp_dir() {
        std::error_code ec;
        fs::remove_all(path, ec);
    }
};

std::string slurp(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
}

struct run_result {
    int status;
    std::string out, err;
};

/// The tool's lines of standard error (mpirun adds its own notice when a rank exits non-zero).
std::string tool_lines(const std::string& err) {
    std::istringstream in(err);
    std::string line, out;
    while (std::getline(in, line))
        if (line.rfind("tpo: ", 0) == 0) out += line + "\n";
    return out;
}

/// Runs the tool (under mpirun with `ranks` > 0), killed after 60 s.
run_result run(const std::string& args, int ranks, const fs::path& work) {
    static int counter = 0;
    const fs::path out = work / ("out" + std::to_string(counter)), err = work / ("err" + std::to_string(counter++));
    std::string command = "timeout 60 ";
    if (ranks > 0) command += std::string(TPO_MPIEXEC) + " -np " + std::to_string(ranks) + " " TPO_MPIEXEC_FLAGS " ";
    command += std::string(TPO_TOOL_PATH) + " " + args + " >" + out.string() + " 2>" + err.string();
    const int status = std::system(command.c_str());
    return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(out), slurp(err)};
}

/// The tool's JSON: key → numbers (a scalar is one number).
std::map<std::string, std::vector<double>> parse_json(const std::string& text) {
    std::map<std::string, std::vector<double>> result;
    std::size_t i = 0;
    while ((i = text.find('"', i)) != std::string::npos) {
        const std::size_t end = text.find('"', i + 1);
        const std::string key = text.substr(i + 1, end - i - 1);
        std::size_t p = text.find(':', end) + 1;
        const std::size_t stop = text.find_first_of("\"", p);
        const std::string body = text.substr(p, stop == std::string::npos ? std::string::npos : stop - p);
        std::vector<double> values;
        for (std::size_t q = 0; q < body.size();) {
            if (body.compare(q, 4, "null") == 0) {
                values.push_back(std::nan(""));
                q += 4;
                continue;
            }
            char* after = nullptr;
            const double v = std::strtod(body.c_str() + q, &after);
            if (after != body.c_str() + q) {
                values.push_back(v);
                q = static_cast<std::size_t>(after - body.c_str());
            } else {
                ++q;
            }
        }
        result[key] = values;
        i = stop == std::string::npos ? text.size() : stop;
    }
    return result;
}

bool close(double a, double b, double tol, double scale) {
    return std::abs(a - b) <= tol * (std::abs(b) + scale);
}

void check_same_output(const run_result& single, const run_result& sharded, const fs::path& single_grads,
                       const fs::path& sharded_grads, double tol) {
    REQUIRE(single.status == 0);
    INFO(sharded.err);
    REQUIRE(sharded.status == 0);
    CHECK(sharded.err.empty());
    const auto a = parse_json(single.out), b = parse_json(sharded.out);
    REQUIRE(!a.empty());
    REQUIRE(a.size() == b.size());
    for (const auto& [key, values] : a) {
        INFO(key);
        REQUIRE(b.count(key) == 1);
        REQUIRE(b.at(key).size() == values.size());
        for (std::size_t i = 0; i < values.size(); ++i) CHECK(close(b.at(key)[i], values[i], tol, 1.0));
    }
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(single_grads)) names.push_back(e.path().filename().string());
    std::vector<std::string> other;
    for (const auto& e : fs::directory_iterator(sharded_grads)) other.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    std::sort(other.begin(), other.end());
    CHECK(names == other);
    for (const std::string& name : names) {
        INFO(name);
        tpo::io::npy_array x = tpo::io::read_npy(single_grads / name), y = tpo::io::read_npy(sharded_grads / name);
        REQUIRE(x.shape == y.shape);
        REQUIRE(x.dtype == y.dtype);
        auto compare = [&](auto element) {
            using T = decltype(element);
            const auto& u = x.values<T>();
            const auto& v = y.values<T>();
            double scale = 0;
            for (T e : u) scale = std::max(scale, std::abs(static_cast<double>(e)));
            int bad = 0;
            for (std::size_t i = 0; i < u.size(); ++i) bad += close(v[i], u[i], tol, 1e-2 * scale) ? 0 : 1;
            CHECK(bad == 0);
        };
        if (x.dtype == tpo::io::npy_dtype::f8) compare(double{});
        else compare(float{});
    }
}

template <class T>
void write(const fs::path& p, std::vector<std::int64_t> shape, const std::vector<T>& v) {
    tpo::io::write_npy<T>(p, shape, std::span<const T>(v));
}

template <class T>
std::vector<T> normal(std::mt19937_64& rng, std::size_t n, double scale) {
    std::normal_distribution<double> d(0, scale);
    std::vector<T> v(n);
    for (T& x : v) x = static_cast<T>(d(rng));
    return v;
}

std::vector<std::int64_t> labels(std::mt19937_64& rng, std::size_t n, std::int64_t vocab) {
    std::uniform_int_distribution<std::int64_t> y(0, vocab - 1);
    std::uniform_real_distribution<double> u(0, 1);
    std::vector<std::int64_t> v(n);
    for (auto& x : v) x = u(rng) < 0.25 ? -100 : y(rng);
    return v;
}

/// A TPO logits directory: (P, L, V) policy and reference logits with their noisy twins.
template <class T>
void logits_dir(const fs::path& dir, std::int64_t vocab) {
    fs::create_directories(dir);
    std::mt19937_64 rng(41);
    const std::int64_t P = 2;
    for (auto [side, L] : {std::pair{"chosen", std::int64_t{5}}, std::pair{"rejected", std::int64_t{4}}}) {
        const auto n = static_cast<std::size_t>(P * L * vocab);
        for (const char* model : {"policy_", "reference_"}) {
            write<T>(dir / (std::string(model) + side + ".npy"), {P, L, vocab}, normal<T>(rng, n, 2.0));
            write<T>(dir / (std::string(model) + side + "_noisy.npy"), {P, L, vocab}, normal<T>(rng, n, 2.0));
        }
        write<std::int64_t>(dir / (std::string("labels_") + side + ".npy"), {P, L}, labels(rng, P * L, vocab));
    }
}

/// A TPO fused directory: hidden states, lm_head + bias, the reference as its own states and head.
template <class T>
void fused_dir(const fs::path& dir, std::int64_t vocab) {
    fs::create_directories(dir);
    std::mt19937_64 rng(43);
    const std::int64_t P = 2, H = 6;
    for (const char* head : {"lm_head", "reference_lm_head"}) {
        write<T>(dir / (std::string(head) + ".npy"), {vocab, H}, normal<T>(rng, vocab * H, 0.6));
        write<T>(dir / (std::string(head) + "_bias.npy"), {vocab}, normal<T>(rng, vocab, 0.5));
    }
    for (auto [side, L] : {std::pair{"chosen", std::int64_t{5}}, std::pair{"rejected", std::int64_t{3}}}) {
        for (const char* model : {"policy_hidden_", "reference_hidden_"}) {
            write<T>(dir / (std::string(model) + side + ".npy"), {P, L, H}, normal<T>(rng, P * L * H, 1.0));
            write<T>(dir / (std::string(model) + side + "_noisy.npy"), {P, L, H}, normal<T>(rng, P * L * H, 1.0));
        }
        write<std::int64_t>(dir / (std::string("labels_") + side + ".npy"), {P, L}, labels(rng, P * L, vocab));
    }
}

void compare_runs(const fs::path& dir, const fs::path& work, const std::string& flags, double tol) {
    const fs::path single_grads = work / "single";
    const run_result single = run("loss --dir " + dir.string() + " --grad-dir " + single_grads.string() + flags, 0, work);
    for (int ranks = 1; ranks <= 4; ++ranks) {
        INFO(ranks << " ranks, " << dir << flags);
        const fs::path grads = work / ("ranks" + std::to_string(ranks));
        const run_result sharded = run("loss --dir " + dir.string() + " --vocab-parallel mpi --grad-dir " +
                                           grads.string() + flags,
                                       ranks, work);
        check_same_output(single, sharded, single_grads, grads, tol);
        fs::remove_all(grads);
    }
    fs::remove_all(single_grads);
}

}  // namespace

TEST_CASE("tpo loss --vocab-parallel mpi equals the single-process run: logits", "[tool]") {
    temp_dir work;
    logits_dir<double>(work.path / "f8", 13);
    compare_runs(work.path / "f8", work.path, "", 1e-12);
    compare_runs(work.path / "f8", work.path, " --score prob --use-weighting --logit-softcap 4", 1e-12);
    logits_dir<float>(work.path / "f4", 11);
    compare_runs(work.path / "f4", work.path, " --backend cpu", 1e-5);
}

TEST_CASE("tpo loss --vocab-parallel mpi equals the single-process run: hidden states and lm_head", "[tool]") {
    temp_dir work;
    fused_dir<double>(work.path / "f8", 11);
    compare_runs(work.path / "f8", work.path, "", 1e-12);
    compare_runs(work.path / "f8", work.path, " --method dpo --loss sigmoid,sft --chunk-tokens 2", 1e-12);
    fused_dir<float>(work.path / "f4", 9);
    compare_runs(work.path / "f4", work.path, " --backend cpu", 1e-5);
}

TEST_CASE("tpo loss --vocab-parallel mpi: bad input is exit status 2 on every rank, one line, no file", "[tool]") {
    temp_dir work;
    const fs::path dir = work.path / "bad";
    logits_dir<double>(dir, 7);
    write<std::int64_t>(dir / "labels_rejected.npy", {2, 4}, {1, 2, 3, 4, 5, 6, 7, 1});  // 7 is outside [0, 7)
    const fs::path grads = work.path / "grads";
    const run_result single = run("loss --dir " + dir.string() + " --grad-dir " + grads.string(), 0, work.path);
    REQUIRE(single.status == 2);
    for (int ranks = 1; ranks <= 4; ++ranks) {
        INFO(ranks << " ranks");
        const run_result r = run("loss --dir " + dir.string() + " --vocab-parallel mpi --grad-dir " + grads.string(),
                                 ranks, work.path);
        CHECK(r.status == 2);
        CHECK(r.out.empty());
        CHECK(tool_lines(r.err) == single.err);  // one line, rank 0's, the single-process message
        CHECK(!fs::exists(grads));
    }
    SECTION("a vocabulary smaller than the number of ranks") {
        const fs::path tiny = work.path / "tiny";
        logits_dir<double>(tiny, 2);
        const run_result r = run("loss --dir " + tiny.string() + " --vocab-parallel mpi", 3, work.path);
        CHECK(r.status == 2);
        const std::string lines = tool_lines(r.err);
        CHECK(lines.find("expected at least one per rank (3 ranks)") != std::string::npos);
        CHECK(std::count(lines.begin(), lines.end(), '\n') == 1);
    }
    SECTION("a flag value other than mpi") {
        const run_result r = run("loss --dir " + dir.string() + " --vocab-parallel nccl", 2, work.path);
        CHECK(r.status == 2);
        const std::string lines = tool_lines(r.err);
        CHECK(lines.find("--vocab-parallel") != std::string::npos);
        CHECK(std::count(lines.begin(), lines.end(), '\n') == 1);
    }
}
