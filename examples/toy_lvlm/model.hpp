#pragma once
// The tiny LVLM, in Eigen, with its hand-written backward pass.
//
//   image (3×16×16) → 36 overlapping 6×6 patches (stride 2, so every 5×5 object lies wholly in one)
//   → per-patch ReLU embedding (D) → mean pool → image feature g = tanh(W_g · pool) (G)
//   decoder: GRU over [token embedding; g], h_0 = tanh(W_h0 g),
//            logits_t = W_o h_t + W_c g + b_o   (predicting token t+1: the causal shift)
//
// The image enters every step twice (GRU input and output), so each token's logits depend on it
// directly: that dependence is what TPO's clean-vs-noisy score measures.
// Batched over sequences (rows); templated on the scalar so the gradient test runs in double.

#include <Eigen/Dense>
#include <cmath>
#include <random>
#include <vector>

#include "world.hpp"

namespace toy {

struct model_shape {
    int patch = 6, stride = 2;
    int features = 48;  // D: per-patch embedding
    int image = 48;     // G: pooled image feature
    int embed = 16;     // token embedding
    int hidden = 64;    // GRU state
    int grid() const { return (image_size - patch) / stride + 1; }
    int patches() const { return grid() * grid(); }
    int patch_dim() const { return channels * patch * patch; }
};

template <class S>
using mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

enum param : int { Wp, bp, Wg, bg, Wh0, bh0, Emb, Wr, Ur, br, Wu, Uu, bu, Wn, Un, bn, bun, Wo, Wc, bo, num_params };

template <class S>
struct parameters {
    std::vector<mat<S>> m;

    static parameters zeros_like(const model_shape& s) {
        parameters p;
        const int D = s.features, G = s.image, E = s.embed, H = s.hidden, V = vocab_size, X = s.embed + s.image;
        const std::pair<int, int> dims[num_params] = {
            {s.patch_dim(), D}, {1, D}, {D, G}, {1, G}, {G, H}, {1, H}, {V, E},
            {X, H}, {H, H}, {1, H}, {X, H}, {H, H}, {1, H}, {X, H}, {H, H}, {1, H}, {1, H},
            {H, V}, {G, V}, {1, V}};
        for (auto [r, c] : dims) p.m.push_back(mat<S>::Zero(r, c));
        return p;
    }
    static parameters random(const model_shape& s, std::uint64_t seed) {
        parameters p = zeros_like(s);
        std::mt19937_64 rng(seed);
        for (int k = 0; k < num_params; ++k) {
            auto& w = p.m[k];
            if (w.rows() == 1) continue;  // biases start at 0
            const double scale = k == Emb ? 0.5 : 1.0 / std::sqrt(static_cast<double>(w.rows()));
            std::normal_distribution<double> n(0.0, scale);
            for (Eigen::Index i = 0; i < w.size(); ++i) w.data()[i] = static_cast<S>(n(rng));
        }
        return p;
    }
    void set_zero() {
        for (auto& w : m) w.setZero();
    }
    std::size_t size() const {
        std::size_t n = 0;
        for (auto& w : m) n += static_cast<std::size_t>(w.size());
        return n;
    }
    S& flat(std::size_t i) {
        for (auto& w : m) {
            if (i < static_cast<std::size_t>(w.size())) return w.data()[i];
            i -= static_cast<std::size_t>(w.size());
        }
        throw std::out_of_range("parameter index");
    }
    template <class T>
    parameters<T> cast() const {
        parameters<T> p;
        for (auto& w : m) p.m.push_back(w.template cast<T>());
        return p;
    }
};

/// Everything the backward pass needs from a forward pass.
template <class S>
struct activations {
    int rows = 0, length = 0;
    mat<S> patches, pre, feat, g;    // encoder
    std::vector<const int*> tokens;  // per row
    std::vector<mat<S>> x, h, r, u, n, m;  // decoder, per step (h has length + 1 entries)
};

template <class S>
class lvlm {
public:
    explicit lvlm(model_shape s = {}) : s_(s) {}
    const model_shape& shape() const { return s_; }

    /// Teacher-forced forward over `rows` sequences of `length` input tokens each (row-major
    /// `tokens`, any padding token allowed), writing logits `(rows, length, V)` row-major — the
    /// layout tpo's logits_view expects.
    void forward(const parameters<S>& p, const float* images, const int* tokens, int rows, int length, S* logits,
                 activations<S>* cache) const {
        activations<S> local;
        activations<S>& a = cache ? *cache : local;
        encode(p, images, rows, a);
        a.rows = rows;
        a.length = length;
        a.x.assign(length, {});
        a.r.assign(length, {});
        a.u.assign(length, {});
        a.n.assign(length, {});
        a.m.assign(length, {});
        a.h.assign(length + 1, {});
        a.h[0] = tanh_of((a.g * p.m[Wh0]).rowwise() + p.m[bh0].row(0));
        const mat<S> image_logits = (a.g * p.m[Wc]).rowwise() + p.m[bo].row(0);
        std::vector<int> step_tokens(rows);
        for (int t = 0; t < length; ++t) {
            for (int b = 0; b < rows; ++b) step_tokens[b] = tokens[b * length + t];
            step(p, a.g, a.h[t], step_tokens.data(), a.x[t], a.r[t], a.u[t], a.n[t], a.m[t], a.h[t + 1]);
            const mat<S> z = a.h[t + 1] * p.m[Wo] + image_logits;
            for (int b = 0; b < rows; ++b)
                for (int v = 0; v < vocab_size; ++v) logits[(static_cast<std::size_t>(b) * length + t) * vocab_size + v] = z(b, v);
        }
        a.tokens.clear();
        for (int b = 0; b < rows; ++b) a.tokens.push_back(tokens + b * length);
    }

    /// Accumulates ∂L/∂θ into `grad` given ∂L/∂logits in the forward's layout.
    void backward(const parameters<S>& p, const activations<S>& a, const S* dlogits, parameters<S>& grad) const {
        const int R = a.rows, L = a.length, H = s_.hidden, E = s_.embed;
        mat<S> dg = mat<S>::Zero(R, s_.image);
        mat<S> dh = mat<S>::Zero(R, H);
        mat<S> dz(R, vocab_size);
        for (int t = L - 1; t >= 0; --t) {
            for (int b = 0; b < R; ++b)
                for (int v = 0; v < vocab_size; ++v) dz(b, v) = dlogits[(static_cast<std::size_t>(b) * L + t) * vocab_size + v];
            grad.m[Wo].noalias() += a.h[t + 1].transpose() * dz;
            grad.m[Wc].noalias() += a.g.transpose() * dz;
            grad.m[bo].row(0) += dz.colwise().sum();
            dh.noalias() += dz * p.m[Wo].transpose();
            dg.noalias() += dz * p.m[Wc].transpose();
            // GRU step backward: h' = (1−u)⊙n + u⊙h, n = tanh(xW_n + b_n + r⊙m), m = hU_n + b_un.
            const mat<S>& h = a.h[t];
            const mat<S>& r = a.r[t];
            const mat<S>& u = a.u[t];
            const mat<S>& n = a.n[t];
            const mat<S> dn = dh.cwiseProduct((S(1) - u.array()).matrix());
            const mat<S> du = dh.cwiseProduct(h - n);
            mat<S> dh_prev = dh.cwiseProduct(u);
            const mat<S> dan = dn.cwiseProduct((S(1) - n.array().square()).matrix());
            const mat<S> dr = dan.cwiseProduct(a.m[t]);
            const mat<S> dm = dan.cwiseProduct(r);
            const mat<S> dau = du.cwiseProduct((u.array() * (S(1) - u.array())).matrix());
            const mat<S> dar = dr.cwiseProduct((r.array() * (S(1) - r.array())).matrix());
            const mat<S>& x = a.x[t];
            grad.m[Wn].noalias() += x.transpose() * dan;
            grad.m[Wu].noalias() += x.transpose() * dau;
            grad.m[Wr].noalias() += x.transpose() * dar;
            grad.m[Un].noalias() += h.transpose() * dm;
            grad.m[Uu].noalias() += h.transpose() * dau;
            grad.m[Ur].noalias() += h.transpose() * dar;
            grad.m[bn].row(0) += dan.colwise().sum();
            grad.m[bun].row(0) += dm.colwise().sum();
            grad.m[bu].row(0) += dau.colwise().sum();
            grad.m[br].row(0) += dar.colwise().sum();
            dh_prev.noalias() += dm * p.m[Un].transpose();
            dh_prev.noalias() += dau * p.m[Uu].transpose();
            dh_prev.noalias() += dar * p.m[Ur].transpose();
            mat<S> dx = dan * p.m[Wn].transpose();
            dx.noalias() += dau * p.m[Wu].transpose();
            dx.noalias() += dar * p.m[Wr].transpose();
            for (int b = 0; b < R; ++b) grad.m[Emb].row(a.tokens[b][t]) += dx.row(b).head(E);
            dg += dx.rightCols(s_.image);
            dh = std::move(dh_prev);
        }
        // h_0 = tanh(g W_h0 + b_h0)
        const mat<S> dah0 = dh.cwiseProduct((S(1) - a.h[0].array().square()).matrix());
        grad.m[Wh0].noalias() += a.g.transpose() * dah0;
        grad.m[bh0].row(0) += dah0.colwise().sum();
        dg.noalias() += dah0 * p.m[Wh0].transpose();
        // g = tanh(feat W_g + b_g), feat = mean over patches of relu(patches W_p + b_p)
        const mat<S> dag = dg.cwiseProduct((S(1) - a.g.array().square()).matrix());
        grad.m[Wg].noalias() += a.feat.transpose() * dag;
        grad.m[bg].row(0) += dag.colwise().sum();
        const mat<S> dfeat = dag * p.m[Wg].transpose();
        const int K = s_.patches();
        mat<S> dpre(a.pre.rows(), a.pre.cols());
        for (int b = 0; b < R; ++b)
            for (int k = 0; k < K; ++k)
                for (int d = 0; d < s_.features; ++d)
                    dpre(b * K + k, d) = a.pre(b * K + k, d) > S(0) ? dfeat(b, d) / S(K) : S(0);
        grad.m[Wp].noalias() += a.patches.transpose() * dpre;
        grad.m[bp].row(0) += dpre.colwise().sum();
    }

    /// Greedy decoding from BOS until "." or max_length tokens; returns the captions.
    std::vector<caption> generate(const parameters<S>& p, const float* images, int rows) const {
        return decode(p, images, rows, [](const auto& z) {
            Eigen::Index best;
            z.maxCoeff(&best);
            return static_cast<int>(best);
        });
    }

    /// Ancestral sampling at `temperature` (> 0) from BOS until "." or max_length tokens.
    std::vector<caption> sample(const parameters<S>& p, const float* images, int rows, std::mt19937_64& rng,
                                double temperature = 1.0) const {
        std::vector<double> prob(vocab_size);
        return decode(p, images, rows, [&](const auto& z) {
            const double top = static_cast<double>(z.maxCoeff());
            for (int v = 0; v < vocab_size; ++v) prob[v] = std::exp((static_cast<double>(z(v)) - top) / temperature);
            return std::discrete_distribution<int>(prob.begin(), prob.end())(rng);
        });
    }

private:
    /// Decodes every row from BOS, choosing each next token with `choose(logit row)`.
    template <class Choose>
    std::vector<caption> decode(const parameters<S>& p, const float* images, int rows, Choose&& choose) const {
        activations<S> a;
        encode(p, images, rows, a);
        mat<S> h = tanh_of((a.g * p.m[Wh0]).rowwise() + p.m[bh0].row(0));
        const mat<S> image_logits = (a.g * p.m[Wc]).rowwise() + p.m[bo].row(0);
        std::vector<caption> out(rows, caption{bos});
        std::vector<int> current(rows, bos);
        std::vector<bool> done(rows, false);
        mat<S> x, r, u, n, m, next;
        for (int t = 0; t + 1 < max_length; ++t) {
            step(p, a.g, h, current.data(), x, r, u, n, m, next);
            h = next;
            const mat<S> z = h * p.m[Wo] + image_logits;
            bool all = true;
            for (int b = 0; b < rows; ++b) {
                if (done[b]) continue;
                current[b] = choose(z.row(b));
                out[b].push_back(current[b]);
                done[b] = current[b] == stop;
                all = all && done[b];
            }
            if (all) break;
        }
        return out;
    }

    static mat<S> tanh_of(const mat<S>& x) { return x.array().tanh().matrix(); }
    static mat<S> sigmoid_of(const mat<S>& x) { return (S(1) / (S(1) + (-x.array()).exp())).matrix(); }

    void encode(const parameters<S>& p, const float* images, int rows, activations<S>& a) const {
        const int K = s_.patches(), P = s_.patch, grid = s_.grid();
        a.patches.resize(static_cast<Eigen::Index>(rows) * K, s_.patch_dim());
        for (int b = 0; b < rows; ++b)
            for (int gy = 0; gy < grid; ++gy)
                for (int gx = 0; gx < grid; ++gx) {
                    S* row = a.patches.row(static_cast<Eigen::Index>(b) * K + gy * grid + gx).data();
                    for (int c = 0; c < channels; ++c)
                        for (int dy = 0; dy < P; ++dy)
                            for (int dx = 0; dx < P; ++dx)
                                *row++ = static_cast<S>(images[static_cast<std::size_t>(b) * pixels +
                                                               (c * image_size + gy * s_.stride + dy) * image_size +
                                                               gx * s_.stride + dx]);
                }
        a.pre = (a.patches * p.m[Wp]).rowwise() + p.m[bp].row(0);
        a.feat = mat<S>::Zero(rows, s_.features);
        for (int b = 0; b < rows; ++b)
            for (int k = 0; k < K; ++k) a.feat.row(b) += a.pre.row(b * K + k).cwiseMax(S(0));
        a.feat /= S(K);
        a.g = tanh_of((a.feat * p.m[Wg]).rowwise() + p.m[bg].row(0));
    }

    void step(const parameters<S>& p, const mat<S>& g, const mat<S>& h, const int* tokens, mat<S>& x, mat<S>& r,
              mat<S>& u, mat<S>& n, mat<S>& m, mat<S>& next) const {
        const int R = static_cast<int>(g.rows());
        x.resize(R, s_.embed + s_.image);
        for (int b = 0; b < R; ++b) x.row(b).head(s_.embed) = p.m[Emb].row(tokens[b]);
        x.rightCols(s_.image) = g;
        r = sigmoid_of((x * p.m[Wr] + h * p.m[Ur]).rowwise() + p.m[br].row(0));
        u = sigmoid_of((x * p.m[Wu] + h * p.m[Uu]).rowwise() + p.m[bu].row(0));
        m = (h * p.m[Un]).rowwise() + p.m[bun].row(0);
        n = tanh_of((x * p.m[Wn] + r.cwiseProduct(m)).rowwise() + p.m[bn].row(0));
        next = (S(1) - u.array()).matrix().cwiseProduct(n) + u.cwiseProduct(h);
    }

    model_shape s_;
};

/// Adam (Kingma & Ba) with optional gradient-norm clipping.
template <class S>
class adam {
public:
    adam(const parameters<S>& like, double lr, double clip = 1.0)
        : m_(like), v_(like), lr_(lr), clip_(clip) {
        m_.set_zero();
        v_.set_zero();
    }
    void set_lr(double lr) { lr_ = lr; }
    void step(parameters<S>& p, const parameters<S>& g) {
        ++t_;
        double norm2 = 0;
        for (auto& w : g.m) norm2 += static_cast<double>(w.squaredNorm());
        const double scale = clip_ > 0 && std::sqrt(norm2) > clip_ ? clip_ / std::sqrt(norm2) : 1.0;
        const double c1 = 1 - std::pow(b1_, t_), c2 = 1 - std::pow(b2_, t_);
        for (std::size_t k = 0; k < p.m.size(); ++k) {
            auto gs = (g.m[k].array() * static_cast<S>(scale));
            m_.m[k].array() = static_cast<S>(b1_) * m_.m[k].array() + static_cast<S>(1 - b1_) * gs;
            v_.m[k].array() = static_cast<S>(b2_) * v_.m[k].array() + static_cast<S>(1 - b2_) * gs.square();
            p.m[k].array() -= static_cast<S>(lr_) * (m_.m[k].array() / static_cast<S>(c1)) /
                              ((v_.m[k].array() / static_cast<S>(c2)).sqrt() + static_cast<S>(1e-8));
        }
    }

private:
    parameters<S> m_, v_;
    double lr_, clip_;
    double b1_ = 0.9, b2_ = 0.999;
    int t_ = 0;
};

}  // namespace toy
