#pragma once
// The fused head's float products at the avx2 and avx512 levels: tiles of C (at most 256×256), a
// line of them per task, += op(A)·op(B) over a k span, in the level's vector registers whatever
// flags the translation unit was built with (the code: f32_line in cpu/kernels.inl, compiled per
// level like the other kernels). Eigen's product takes its vector width from those flags, so a
// consumer built for a baseline ISA would multiply in SSE2 (docs/performance.md).
//
// A block of C (8 rows × 32 columns with AVX-512, 6 × 16 with AVX2) lives in registers while k
// runs: per k, two vectors of B and one broadcast of A per row feed two fused multiply-adds per
// row. k goes in blocks of 512. For each block the operand a line of tiles shares is packed once:
// B into panels of a tile's columns ([k][columns], zeros past the tile's columns) that the row
// panels of A pass over; A is read in place where it is stored by rows, and copied into [k][rows]
// panels where it is stored transposed (the head's gradient, Gᵀ·H) or the panel runs past the
// tile's rows. With AVX-512 the block asks for B's and A's next lines into L1 a few iterations
// ahead. Each value of C is C plus, per k block, one chain of fused multiply-adds in k order: a
// sum that depends on the tile alone, so results are bit-identical for any thread count and at
// both levels, as the rest of cpu/matmul.hpp.

#include "tpo/backend/cpu/scratch.hpp"
#include "tpo/core/config.hpp"
#include "tpo/core/views.hpp"

TPO_BEGIN_NAMESPACE
namespace backend::cpu_detail {

inline constexpr index_t f32_block = 256;  // the largest m and n of one tile
inline constexpr index_t f32_depth = 512;  // k block

/// Where a tile of C goes: its first value and row stride.
template <class Acc>
struct tile_target {
    Acc* c;
    index_t ldc;
};
using f32_target = tile_target<float>;

/// One thread's packed operands for one k block: the tile's rows of A (with room for the last
/// row panel's padding) and its columns of B; and, for 16-bit operands only, the blocks of A and
/// B widened to float before they are packed (sized on first use).
struct f32_scratch {
    static constexpr index_t a_rows = f32_block + 8;
    scratch_vector<float> a = scratch_vector<float>(static_cast<std::size_t>(a_rows * f32_depth));
    scratch_vector<float> b = scratch_vector<float>(static_cast<std::size_t>(f32_block * f32_depth));
    scratch_vector<float> wide_a, wide_b;
};

}  // namespace backend::cpu_detail
TPO_END_NAMESPACE
