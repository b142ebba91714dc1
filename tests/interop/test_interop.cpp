// The public adaptors: each yields a view on the container's own memory with the right extents,
// rejects a wrong rank, size or memory order with a shape_error naming the shape, and gives the
// same objective as the raw views.

#include <catch2/catch.hpp>

#include <cstdint>
#include <filesystem>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <unistd.h>

#include "support/batch.hpp"
#include "tpo/interop/eigen.hpp"
#include "tpo/interop/span.hpp"
#include "tpo/interop/xtensor.hpp"

namespace interop = tpo::interop;

namespace {
std::string message_of(auto&& f) {
    try {
        f();
    } catch (const tpo::shape_error& e) {
        return e.what();
    }
    return "(no shape_error)";
}
bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }
}  // namespace

TEST_CASE("span and raw-pointer adaptors check sizes and pointers", "[interop]") {
    std::vector<float> z(2 * 3 * 4);
    const auto v = interop::logits(std::span(z), 2, 3, 4);
    CHECK(v.data == z.data());
    CHECK((v.sequences == 2 && v.length == 3 && v.vocab == 4));
    CHECK(interop::logits(z.data(), 2, 3, 4).data == z.data());
    CHECK(contains(message_of([&] { interop::logits(std::span(z), 2, 3, 5); }),
                   "logits: buffer of 24 elements, expected 30 for shape (2, 3, 5)"));
    CHECK(contains(message_of([&] { interop::logits(static_cast<float*>(nullptr), 1, 1, 1); }), "null data pointer"));
    CHECK(contains(message_of([&] { interop::logits(z.data(), 2, -3, 4); }), "negative extent -3"));

    std::vector<std::int32_t> y(6);
    const auto yv = interop::labels(std::span<const std::int32_t>(y), 2, 3);
    CHECK((yv.data == y.data() && yv.sequences == 2 && yv.length == 3));
    CHECK(contains(message_of([&] { interop::labels(std::span(y), 3, 3); }), "expected 9 for shape (3, 3)"));

    std::vector<float> w(6);
    CHECK(interop::token_values(std::span(w), 2, 3).length == 3);

    std::vector<std::uint8_t> img(4 * 5 * 3);
    const auto hwc = interop::image_hwc(std::span(img), 4, 5, 3);
    CHECK(hwc.offset(0, 2, 1, 3) == (1 * 5 + 3) * 3 + 2);
    const auto chw = interop::image_chw(std::span(img), 3, 4, 5);
    CHECK(chw.offset(0, 2, 1, 3) == (2 * 4 + 1) * 5 + 3);
    CHECK(interop::image_nchw(std::span(img), 1, 3, 4, 5).size() == 60);
    CHECK(interop::image_nhwc(std::span(img), 1, 4, 5, 3).size() == 60);
    CHECK(contains(message_of([&] { interop::image_hwc(std::span(img), 4, 4, 3); }), "(H, W, C) = (4, 4, 3)"));
}

TEST_CASE("xtensor adaptors: views on xt::xtensor / xt::xarray with shape and layout checks", "[interop]") {
    xt::xtensor<float, 3> z = xt::zeros<float>({2, 3, 4});
    z(1, 2, 3) = 7.0f;
    const auto v = interop::logits(z);
    CHECK((v.sequences == 2 && v.length == 3 && v.vocab == 4));
    CHECK(v.row(1, 2)[3] == 7.0f);

    const xt::xarray<double> zc = xt::ones<double>({1, 1, 5});  // extent-1 axes have stride 0 in xtensor
    const auto cv = interop::logits(zc);
    static_assert(std::is_same_v<decltype(cv), const tpo::logits_view<const double>>);
    CHECK(cv.vocab == 5);

    xt::xarray<float> wrong_rank = xt::zeros<float>({6, 4});
    CHECK(contains(message_of([&] { interop::logits(wrong_rank); }), "logits: shape (6, 4) has 2 dimensions"));
    xt::xarray<float, xt::layout_type::column_major> column = xt::zeros<float>({2, 3, 4});
    CHECK(contains(message_of([&] { interop::logits(column); }), "not row-major contiguous"));

    xt::xtensor<std::int64_t, 2> y = {{-100, 1, 2}, {3, -100, 0}};
    const auto yv = interop::labels(y);
    CHECK(yv.at(1, 0) == 3);

    xt::xtensor<std::uint8_t, 3> hwc = xt::zeros<std::uint8_t>({4, 5, 3});
    CHECK(interop::image_hwc(hwc).extent[1] == 3);
    CHECK(interop::image_chw(hwc).extent[1] == 4);
    xt::xtensor<float, 4> nchw = xt::zeros<float>({2, 3, 4, 5});
    CHECK(interop::image_nchw(nchw).extent[0] == 2);
    CHECK(interop::image_nhwc(nchw).extent[1] == 5);
}

TEST_CASE("xtensor adaptors give the same objective as raw views", "[interop]") {
    std::mt19937_64 rng(21);
    const auto b = tpo_test::random_batch<float>(rng, 2, 5, 4, 6);
    auto to_x = [](const std::vector<float>& v, std::size_t s, std::size_t l, std::size_t voc) {
        return xt::xtensor<float, 3>(xt::adapt(v, std::vector<std::size_t>{s, l, voc}));
    };
    auto labels_x = [](const std::vector<std::int64_t>& v, std::size_t s, std::size_t l) {
        return xt::xtensor<std::int64_t, 2>(xt::adapt(v, std::vector<std::size_t>{s, l}));
    };
    const auto pc = to_x(b.chosen.policy, 2, 5, 6), pcn = to_x(b.chosen.policy_noisy, 2, 5, 6),
               rc = to_x(b.chosen.reference, 2, 5, 6), rcn = to_x(b.chosen.reference_noisy, 2, 5, 6),
               pr = to_x(b.rejected.policy, 2, 4, 6), prn = to_x(b.rejected.policy_noisy, 2, 4, 6),
               rr = to_x(b.rejected.reference, 2, 4, 6), rrn = to_x(b.rejected.reference_noisy, 2, 4, 6);
    const auto yc = labels_x(b.chosen.labels, 2, 5), yr = labels_x(b.rejected.labels, 2, 4);
    tpo::preference_batch<float, std::int64_t> xb;
    xb.chosen = {interop::logits(pc), interop::logits(pcn), interop::logits(rc), interop::logits(rcn),
                 interop::labels(yc), {}};
    xb.rejected = {interop::logits(pr), interop::logits(prn), interop::logits(rr), interop::logits(rrn),
                   interop::labels(yr), {}};
    tpo::backend::reference backend;
    const tpo::objective_options o;
    const auto from_x = tpo::evaluate(backend, o, xb);
    const auto from_raw = tpo::evaluate(backend, o, b.batch());
    CHECK(from_x.loss == from_raw.loss);
    CHECK(from_x.losses == from_raw.losses);
}

TEST_CASE("xtensor .npy load and save go through the validating reader", "[interop]") {
    const auto dir = std::filesystem::temp_directory_path() / ("tpo-interop-" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir);
    const xt::xarray<double> a = {{1.5, -2.0, 3.25}, {4.0, 5.0, 6.0}};
    interop::save_npy(dir / "a.npy", a);
    const xt::xarray<double> back = interop::load_npy<double>(dir / "a.npy");
    CHECK(back == a);
    interop::save_npy(dir / "t.npy", xt::transpose(a));  // an expression, written in C order
    const auto t = interop::load_npy<double>(dir / "t.npy");
    CHECK(t.shape()[0] == 3);
    CHECK(t(2, 1) == 6.0);
    try {
        interop::load_npy<float>(dir / "a.npy");
        FAIL("dtype mismatch accepted");
    } catch (const tpo::io::format_error& e) {
        CHECK(contains(e.what(), "a.npy: descr: <f8, expected '<f4'"));
    }
    std::filesystem::remove_all(dir);
}

TEST_CASE("Eigen adaptors: row-major matrices, maps and tensors", "[interop]") {
    using row_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    row_matrix m = row_matrix::Zero(6, 4);  // S = 2 sequences of L = 3 rows
    m(4, 1) = 2.5f;
    const auto v = interop::logits(m, 2);
    CHECK((v.sequences == 2 && v.length == 3 && v.vocab == 4));
    CHECK(v.row(1, 1)[1] == 2.5f);
    CHECK(contains(message_of([&] { interop::logits(m, 4); }), "6 rows cannot be split into 4 sequences"));

    Eigen::MatrixXf column_major = Eigen::MatrixXf::Zero(6, 4);
    CHECK(contains(message_of([&] { interop::logits(column_major, 2); }), "not row-major contiguous"));
    Eigen::VectorXf single = Eigen::VectorXf::Zero(5);  // one column: both orders coincide
    CHECK(interop::logits(single, 5).vocab == 1);

    std::vector<double> buffer(2 * 3 * 4);
    Eigen::Map<Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> map(buffer.data(), 6, 4);
    CHECK(interop::logits(map, 2).data == buffer.data());
    auto block = m.block(0, 0, 6, 2);  // rows padded by the parent's stride
    CHECK(contains(message_of([&] { interop::logits(block, 2); }), "not row-major contiguous"));

    Eigen::Matrix<std::int64_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> y(2, 3);
    y << -100, 1, 2, 3, 0, -100;
    CHECK(interop::labels(y).at(1, 0) == 3);
    Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> w = Eigen::MatrixXf::Ones(2, 3);
    CHECK(interop::token_values(w).length == 3);

    Eigen::Tensor<float, 3, Eigen::RowMajor> t(2, 3, 4);
    t.setZero();
    t(1, 2, 3) = 9.0f;
    const auto tv = interop::logits(t);
    CHECK(tv.row(1, 2)[3] == 9.0f);
    Eigen::TensorMap<Eigen::Tensor<double, 3, Eigen::RowMajor>> tm(buffer.data(), 2, 3, 4);
    CHECK(interop::logits(tm).data == buffer.data());
    Eigen::Tensor<std::int32_t, 2, Eigen::RowMajor> ty(2, 3);
    CHECK(interop::labels(ty).length == 3);

    Eigen::Tensor<std::uint8_t, 3, Eigen::RowMajor> img(4, 5, 3);
    CHECK(interop::image_hwc(img).extent[2] == 4);
    CHECK(interop::image_chw(img).extent[1] == 4);
    Eigen::Tensor<float, 4, Eigen::RowMajor> batch(2, 3, 4, 5);
    CHECK(interop::image_nchw(batch).extent[3] == 5);
    CHECK(interop::image_nhwc(batch).extent[1] == 5);
}
