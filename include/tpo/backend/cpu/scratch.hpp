#pragma once
// The CPU backend's scratch memory. The fused lm_head path asks for a few large buffers per step
// (a chunk of C×V logits, and for a 16-bit head a V×H float accumulator) and drops them when the
// step ends. Straight from the C library each would be a fresh mapping every step (glibc maps
// blocks above 32 MiB on their own and unmaps them on free), so every step would fault in and
// zero its pages again, single-threaded, before a product touches them. Blocks of at least
// 1 MiB are therefore kept when their buffer dies and handed to the next buffer they fit, as a
// GPU framework's caching allocator does.
//
// One pool per program, shared by every backend object (trainers and bindings make a backend per
// call). The pool holds (kept and alive together) at most twice the most scratch that was ever
// alive at once: a request no kept block fits first frees the oldest kept blocks until kept +
// alive + the request stays within that bound. Twice, because a step's buffers do not all live at
// once (a small buffer dies before a large one is asked for), so a step needs more distinct blocks
// than its peak; with the peak itself as the bound every step freed and mapped blocks again, and
// a call of another shape in between (its blocks given back last) made the next step free the
// largest ones. Between steps the kept blocks stay mapped; release() returns them.
// The allocator default-initialises (a trivial element is left as it is): backend::cpu zeroes
// what allocate() hands out, on all its threads, and allocate_for_overwrite() leaves alone the
// scratch its caller writes in full before reading.

#include <cstddef>
#include <memory>
#include <mutex>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "tpo/core/config.hpp"

TPO_BEGIN_NAMESPACE
namespace backend::cpu_detail {

class scratch_pool {
public:
    /// Smaller blocks go to operator new and back at once: the C library reuses them cheaply.
    static constexpr std::size_t min_bytes = std::size_t(1) << 20;
    static constexpr std::align_val_t alignment{64};

    scratch_pool() = default;
    scratch_pool(const scratch_pool&) = delete;
    scratch_pool& operator=(const scratch_pool&) = delete;
    ~scratch_pool() { release(); }

    /// A block of at least `bytes` (≥ min_bytes): the smallest kept block of `bytes` to 2·`bytes`,
    /// or a new one.
    void* acquire(std::size_t bytes) {
        std::lock_guard<std::mutex> lock(mutex_);
        std::size_t best = kept_.size();
        for (std::size_t i = 0; i < kept_.size(); ++i)
            if (kept_[i].bytes >= bytes && kept_[i].bytes / 2 <= bytes &&
                (best == kept_.size() || kept_[i].bytes < kept_[best].bytes))
                best = i;
        block b{};
        if (best < kept_.size()) {
            b = kept_[best];
            kept_.erase(kept_.begin() + static_cast<std::ptrdiff_t>(best));
            kept_bytes_ -= b.bytes;
        } else {
            while (!kept_.empty() && kept_bytes_ + alive_bytes_ + bytes > 2 * high_water_) {
                ::operator delete(kept_.front().data, alignment);
                kept_bytes_ -= kept_.front().bytes;
                kept_.erase(kept_.begin());
            }
            b = block{::operator new(bytes, alignment), bytes};
        }
        try {
            alive_.push_back(b);
        } catch (...) {
            ::operator delete(b.data, alignment);
            throw;
        }
        alive_bytes_ += b.bytes;
        if (alive_bytes_ > high_water_) high_water_ = alive_bytes_;
        return b.data;
    }

    /// Takes back a block from acquire() and keeps it.
    void give_back(void* data) noexcept {
        std::lock_guard<std::mutex> lock(mutex_);
        std::size_t i = 0;
        while (i < alive_.size() && alive_[i].data != data) ++i;
        if (i == alive_.size()) return;  // not ours: acquire() hands out every block it makes
        const block b = alive_[i];
        alive_[i] = alive_.back();
        alive_.pop_back();
        alive_bytes_ -= b.bytes;
        try {
            kept_.push_back(b);
            kept_bytes_ += b.bytes;
        } catch (...) {
            ::operator delete(b.data, alignment);
        }
    }

    /// Frees every kept block; returns their bytes. Blocks in use are not touched.
    std::size_t release() noexcept {
        std::lock_guard<std::mutex> lock(mutex_);
        const std::size_t freed = kept_bytes_;
        for (const block& b : kept_) ::operator delete(b.data, alignment);
        kept_.clear();
        kept_bytes_ = 0;
        high_water_ = alive_bytes_;
        return freed;
    }

    /// Bytes of the blocks kept for reuse (not in use).
    std::size_t kept_bytes() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return kept_bytes_;
    }

private:
    struct block {
        void* data;
        std::size_t bytes;
    };
    mutable std::mutex mutex_;
    std::vector<block> kept_;   // oldest first
    std::vector<block> alive_;  // handed out
    std::size_t kept_bytes_ = 0, alive_bytes_ = 0, high_water_ = 0;
};

/// The program's pool. Never destroyed, so buffers that die during static destruction can still
/// return their blocks.
inline scratch_pool& scratch() {
    static scratch_pool* const pool = new scratch_pool();
    return *pool;
}

/// The allocator of the CPU backend's buffers: large blocks through scratch(), small ones through
/// operator new; 64-byte aligned either way.
template <class T>
struct scratch_allocator {
    using value_type = T;

    scratch_allocator() noexcept = default;
    template <class U>
    scratch_allocator(const scratch_allocator<U>&) noexcept {}

    T* allocate(std::size_t n) {
        if (n > static_cast<std::size_t>(-1) / sizeof(T)) throw std::bad_array_new_length();
        const std::size_t bytes = n * sizeof(T);
        if (bytes < scratch_pool::min_bytes) return static_cast<T*>(::operator new(bytes, scratch_pool::alignment));
        return static_cast<T*>(scratch().acquire(bytes));
    }

    /// Default-initialisation: a trivial element is not written (std::vector(n) would zero it).
    template <class U>
    void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
        ::new (static_cast<void*>(p)) U;
    }
    template <class U, class... Args>
    void construct(U* p, Args&&... args) {
        ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
    }

    void deallocate(T* p, std::size_t n) noexcept {
        if (n * sizeof(T) < scratch_pool::min_bytes) ::operator delete(p, scratch_pool::alignment);
        else scratch().give_back(p);
    }

    friend bool operator==(const scratch_allocator&, const scratch_allocator&) noexcept { return true; }
};

/// A vector on scratch_allocator: the CPU backend's buffers and its products' scratch.
template <class T>
using scratch_vector = std::vector<T, scratch_allocator<T>>;

}  // namespace backend::cpu_detail
TPO_END_NAMESPACE
