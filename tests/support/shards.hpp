#pragma once
// The whole batch and a rank's share of it, for the distributed tests (MPI ranks, c10d ranks as
// threads): vocabulary shards of logits and heads, blocks of pairs, and the rows to compare.

#include <cstdint>
#include <random>
#include <vector>

#include <tpo/dist/sharded.hpp>
#include <tpo/tpo.hpp>

#include "support/batch.hpp"
#include "support/hidden.hpp"

namespace tpo_test::shards {

using tpo::index_t;

/// Columns [offset, offset + size) of every row of a (rows × vocab) tensor.
template <class T>
std::vector<T> columns(const std::vector<T>& full, index_t vocab, index_t offset, index_t size) {
    std::vector<T> out;
    if (full.empty()) return out;
    const index_t rows = static_cast<index_t>(full.size()) / vocab;
    for (index_t r = 0; r < rows; ++r)
        out.insert(out.end(), full.begin() + r * vocab + offset, full.begin() + r * vocab + offset + size);
    return out;
}

/// Rows [first, first + count) of a (rows × width) tensor.
template <class T>
std::vector<T> row_block(const std::vector<T>& full, index_t width, index_t first, index_t count) {
    if (full.empty()) return {};
    return std::vector<T>(full.begin() + first * width, full.begin() + (first + count) * width);
}

/// Rows [first, first + count) of a (rows × width) tensor in double, times `scale`.
template <class T>
std::vector<double> scaled_rows(const std::vector<T>& v, index_t width, index_t first, index_t count, double scale = 1.0) {
    std::vector<double> out;
    for (index_t i = first * width; i < (first + count) * width; ++i) out.push_back(scale * tpo::widen<double>(v[i]));
    return out;
}

/// A logits batch's share of the vocabulary: every tensor's columns of the shard.
template <class T>
batch_data<T> slice(const batch_data<T>& d, const tpo::dist::vocab_shard& s) {
    batch_data<T> out = d;
    for (auto* side : {&out.chosen, &out.rejected}) {
        for (int k = 0; k < 4; ++k) side->tensor(k) = columns(side->tensor(k), d.chosen.vocab, s.offset, s.size);
        side->vocab = s.size;
    }
    return out;
}

/// A hidden-state batch's share of the vocabulary: the heads' rows of the shard.
template <class T>
hidden::hidden_data<T> hidden_slice(const hidden::hidden_data<T>& d, const tpo::dist::vocab_shard& s) {
    hidden::hidden_data<T> out = d;
    out.vocab = s.size;
    out.weight = row_block(d.weight, d.hidden, s.offset, s.size);
    out.reference_weight = row_block(d.reference_weight, d.hidden, s.offset, s.size);
    out.bias = row_block(d.bias, 1, s.offset, s.size);
    out.reference_bias = row_block(d.reference_bias, 1, s.offset, s.size);
    return out;
}

/// A random logits batch in T, the same on every rank for the same seed.
template <class T>
batch_data<T> make_batch(std::uint64_t seed, index_t pairs, index_t lw, index_t ll, index_t vocab) {
    std::mt19937_64 rng(seed);
    return convert<T>(random_batch<double>(rng, pairs, lw, ll, vocab));
}

}  // namespace tpo_test::shards
