// The portable level's "vectors": one lane, plain C++ (cpu/kernels.hpp includes this file inside
// the level's namespace where there is no runtime dispatch: other architectures than x86-64, or
// TPO_CPU_NO_DISPATCH). The x86 levels implement the same operations on wider registers.

struct f32 {
    using vec = float;
    static constexpr index_t width = 1;
    static TPO_FORCE_INLINE vec load(const float* p) { return *p; }
    static TPO_FORCE_INLINE vec loadu(const float* p) { return *p; }
    static TPO_FORCE_INLINE void store(float* p, vec v) { *p = v; }
    static TPO_FORCE_INLINE void storeu(float* p, vec v) { *p = v; }
    static TPO_FORCE_INLINE vec set1(float a) { return a; }
    /// p[0] (one lane).
    static TPO_FORCE_INLINE vec gather(const float* p, index_t) { return p[0]; }
    static TPO_FORCE_INLINE vec add(vec a, vec b) { return a + b; }
    static TPO_FORCE_INLINE vec sub(vec a, vec b) { return a - b; }
    static TPO_FORCE_INLINE vec mul(vec a, vec b) { return a * b; }
    static TPO_FORCE_INLINE vec div(vec a, vec b) { return a / b; }
    static TPO_FORCE_INLINE vec sqrt(vec a) { return std::sqrt(a); }
    static TPO_FORCE_INLINE vec fmadd(vec a, vec b, vec c) { return a * b + c; }
    static TPO_FORCE_INLINE vec fnmadd(vec a, vec b, vec c) { return c - a * b; }
    // std::max/std::min: the first operand when either is NaN.
    static TPO_FORCE_INLINE vec max(vec a, vec b) { return a < b ? b : a; }
    static TPO_FORCE_INLINE vec min(vec a, vec b) { return b < a ? b : a; }
    static TPO_FORCE_INLINE float reduce_add(vec v) { return v; }
    static TPO_FORCE_INLINE float reduce_max(vec v) { return v; }
    static TPO_FORCE_INLINE float reduce_min(vec v) { return v; }
    // p · 2^n for integer-valued n in the range the exponentials clamp to.
    static TPO_FORCE_INLINE vec scale(vec p, vec n) { return std::isnan(n) ? n : std::ldexp(p, static_cast<int>(n)); }
    static TPO_FORCE_INLINE vec round(vec x) { return std::nearbyint(x); }
    static TPO_FORCE_INLINE vec floor(vec x) { return std::floor(x); }
    // fast_exp's argument where scale() applies (NaN stays NaN).
    static TPO_FORCE_INLINE vec exp_domain(vec x) { return min(max(x, -104.0f), 89.0f); }
    // 2^t = 2^e · 2^f with f ∈ [0, 1); t ≤ −160 (and −∞) give 0.
    static TPO_FORCE_INLINE void exp2_split(vec t, vec& f, vec& e) {
        t = min(max(t, -160.0f), 127.0f);
        e = std::isnan(t) ? 0.0f : floor(t);
        f = t - e;
    }

    using ivec = std::int32_t;
    static TPO_FORCE_INLINE ivec bits(vec v) { return std::bit_cast<std::int32_t>(v); }
    static TPO_FORCE_INLINE vec from_bits(ivec v) { return std::bit_cast<float>(v); }
    static TPO_FORCE_INLINE ivec to_int(vec v) { return static_cast<std::int32_t>(std::nearbyint(v)); }
    static TPO_FORCE_INLINE vec to_float(ivec v) { return static_cast<float>(v); }
    static TPO_FORCE_INLINE ivec iset1(std::int32_t a) { return a; }
    static TPO_FORCE_INLINE ivec iadd(ivec a, ivec b) {
        return static_cast<std::int32_t>(static_cast<std::uint32_t>(a) + static_cast<std::uint32_t>(b));
    }
    static TPO_FORCE_INLINE ivec isub(ivec a, ivec b) {
        return static_cast<std::int32_t>(static_cast<std::uint32_t>(a) - static_cast<std::uint32_t>(b));
    }
    static TPO_FORCE_INLINE ivec iand(ivec a, ivec b) { return a & b; }
    static TPO_FORCE_INLINE ivec ior(ivec a, ivec b) { return a | b; }
    static TPO_FORCE_INLINE ivec ixor(ivec a, ivec b) { return a ^ b; }
    template <int N>
    static TPO_FORCE_INLINE ivec shift_left(ivec a) { return static_cast<std::int32_t>(static_cast<std::uint32_t>(a) << N); }
    template <int N>
    static TPO_FORCE_INLINE ivec shift_right(ivec a) { return static_cast<std::int32_t>(static_cast<std::uint32_t>(a) >> N); }
    static TPO_FORCE_INLINE vec select_nonzero(ivec which, vec a, vec b) { return which != 0 ? a : b; }
    static TPO_FORCE_INLINE vec select_greater(vec a, vec b, vec yes, vec no) { return a > b ? yes : no; }
};

struct f64 {
    using vec = double;
    static constexpr index_t width = 1;
    static TPO_FORCE_INLINE vec load(const double* p) { return *p; }
    static TPO_FORCE_INLINE vec loadu(const double* p) { return *p; }
    static TPO_FORCE_INLINE void store(double* p, vec v) { *p = v; }
    static TPO_FORCE_INLINE void storeu(double* p, vec v) { *p = v; }
    static TPO_FORCE_INLINE vec set1(double a) { return a; }
    static TPO_FORCE_INLINE vec add(vec a, vec b) { return a + b; }
    static TPO_FORCE_INLINE vec sub(vec a, vec b) { return a - b; }
    static TPO_FORCE_INLINE vec mul(vec a, vec b) { return a * b; }
    static TPO_FORCE_INLINE vec fmadd(vec a, vec b, vec c) { return a * b + c; }
    static TPO_FORCE_INLINE vec fnmadd(vec a, vec b, vec c) { return c - a * b; }
    static TPO_FORCE_INLINE vec max(vec a, vec b) { return a < b ? b : a; }
    static TPO_FORCE_INLINE vec min(vec a, vec b) { return b < a ? b : a; }
    static TPO_FORCE_INLINE double reduce_add(vec v) { return v; }
    static TPO_FORCE_INLINE double reduce_max(vec v) { return v; }
    static TPO_FORCE_INLINE double reduce_min(vec v) { return v; }
    static TPO_FORCE_INLINE vec round(vec x) { return std::nearbyint(x); }
    static TPO_FORCE_INLINE vec scale(vec p, vec n) { return std::isnan(n) ? n : std::ldexp(p, static_cast<int>(n)); }
    static TPO_FORCE_INLINE vec exp_domain(vec x) { return min(max(x, -746.0), 710.0); }
};

TPO_FORCE_INLINE void stream64(char* d, const char* s) { std::memcpy(d, s, 64); }
inline constexpr bool has_stream = false;
TPO_FORCE_INLINE void store_fence() {}
inline constexpr bool has_bf16_narrowing = false;
inline index_t narrow_bf16_vcvt(const float*, index_t, bfloat16*) { return 0; }
