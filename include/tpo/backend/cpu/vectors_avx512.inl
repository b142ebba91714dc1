// The avx512 level's vectors: 512-bit AVX-512 F/DQ/BW/VL (cpu/kernels.hpp includes this file
// inside the level's namespace and target options). See vectors_scalar.inl for what each
// operation means. The exponentials apply their power of two with vscalefps, which also rounds
// subnormal results correctly, and take 2^t's fraction with vreduceps (cpu/kernels.inl).

struct f32 {
    using vec = __m512;
    static constexpr index_t width = 16;
    static TPO_FORCE_INLINE vec load(const float* p) { return _mm512_load_ps(p); }
    static TPO_FORCE_INLINE vec loadu(const float* p) { return _mm512_loadu_ps(p); }
    static TPO_FORCE_INLINE void store(float* p, vec v) { _mm512_store_ps(p, v); }
    static TPO_FORCE_INLINE void storeu(float* p, vec v) { _mm512_storeu_ps(p, v); }
    static TPO_FORCE_INLINE vec set1(float a) { return _mm512_set1_ps(a); }
    /// p[0], p[stride], …, p[15·stride] (stride·15 fits an int).
    static TPO_FORCE_INLINE vec gather(const float* p, index_t stride) {
        const __m512i lanes = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                 _mm512_set1_epi32(static_cast<int>(stride)));
        return _mm512_i32gather_ps(lanes, p, 4);
    }
    static TPO_FORCE_INLINE vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
    static TPO_FORCE_INLINE vec sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
    static TPO_FORCE_INLINE vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
    static TPO_FORCE_INLINE vec div(vec a, vec b) { return _mm512_div_ps(a, b); }
    static TPO_FORCE_INLINE vec sqrt(vec a) { return _mm512_sqrt_ps(a); }
    static TPO_FORCE_INLINE vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
    static TPO_FORCE_INLINE vec fnmadd(vec a, vec b, vec c) { return _mm512_fnmadd_ps(a, b, c); }
    static TPO_FORCE_INLINE vec max(vec a, vec b) { return _mm512_max_ps(b, a); }
    static TPO_FORCE_INLINE vec min(vec a, vec b) { return _mm512_min_ps(b, a); }
    static TPO_FORCE_INLINE float reduce_add(vec v) { return _mm512_reduce_add_ps(v); }
    static TPO_FORCE_INLINE float reduce_max(vec v) { return _mm512_reduce_max_ps(v); }
    static TPO_FORCE_INLINE float reduce_min(vec v) { return _mm512_reduce_min_ps(v); }
    // p · 2^floor(n); n = −∞ gives 0.
    static TPO_FORCE_INLINE vec scale(vec p, vec n) { return _mm512_scalef_ps(p, n); }
    static TPO_FORCE_INLINE vec round(vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
    static TPO_FORCE_INLINE vec floor(vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
    // Clamped at −104 (below it exp(x) is under half the smallest subnormal), which keeps r finite
    // for −∞; scalef saturates above.
    static TPO_FORCE_INLINE vec exp_domain(vec x) { return max(x, set1(-104.0f)); }
    // imm 0x09: no fraction bits kept, round down, precision exception suppressed: f = t − floor(t);
    // scale() floors t itself and takes −∞ to 0.
    static TPO_FORCE_INLINE void exp2_split(vec t, vec& f, vec& e) {
        f = _mm512_reduce_ps(t, 0x09);
        e = t;
    }

    using ivec = __m512i;
    static TPO_FORCE_INLINE ivec bits(vec v) { return _mm512_castps_si512(v); }
    static TPO_FORCE_INLINE vec from_bits(ivec v) { return _mm512_castsi512_ps(v); }
    static TPO_FORCE_INLINE ivec to_int(vec v) { return _mm512_cvtps_epi32(v); }
    static TPO_FORCE_INLINE vec to_float(ivec v) { return _mm512_cvtepi32_ps(v); }
    static TPO_FORCE_INLINE ivec iset1(std::int32_t a) { return _mm512_set1_epi32(a); }
    static TPO_FORCE_INLINE ivec iadd(ivec a, ivec b) { return _mm512_add_epi32(a, b); }
    static TPO_FORCE_INLINE ivec isub(ivec a, ivec b) { return _mm512_sub_epi32(a, b); }
    static TPO_FORCE_INLINE ivec iand(ivec a, ivec b) { return _mm512_and_si512(a, b); }
    static TPO_FORCE_INLINE ivec ior(ivec a, ivec b) { return _mm512_or_si512(a, b); }
    static TPO_FORCE_INLINE ivec ixor(ivec a, ivec b) { return _mm512_xor_si512(a, b); }
    template <int N>
    static TPO_FORCE_INLINE ivec shift_left(ivec a) { return _mm512_slli_epi32(a, N); }
    template <int N>
    static TPO_FORCE_INLINE ivec shift_right(ivec a) { return _mm512_srli_epi32(a, N); }
    static TPO_FORCE_INLINE vec select_nonzero(ivec which, vec a, vec b) {
        return _mm512_mask_blend_ps(_mm512_test_epi32_mask(which, which), b, a);
    }
    static TPO_FORCE_INLINE vec select_greater(vec a, vec b, vec yes, vec no) {
        return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), no, yes);
    }
};

struct f64 {
    using vec = __m512d;
    static constexpr index_t width = 8;
    static TPO_FORCE_INLINE vec load(const double* p) { return _mm512_load_pd(p); }
    static TPO_FORCE_INLINE vec loadu(const double* p) { return _mm512_loadu_pd(p); }
    static TPO_FORCE_INLINE void store(double* p, vec v) { _mm512_store_pd(p, v); }
    static TPO_FORCE_INLINE void storeu(double* p, vec v) { _mm512_storeu_pd(p, v); }
    static TPO_FORCE_INLINE vec set1(double a) { return _mm512_set1_pd(a); }
    static TPO_FORCE_INLINE vec add(vec a, vec b) { return _mm512_add_pd(a, b); }
    static TPO_FORCE_INLINE vec sub(vec a, vec b) { return _mm512_sub_pd(a, b); }
    static TPO_FORCE_INLINE vec mul(vec a, vec b) { return _mm512_mul_pd(a, b); }
    static TPO_FORCE_INLINE vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_pd(a, b, c); }
    static TPO_FORCE_INLINE vec fnmadd(vec a, vec b, vec c) { return _mm512_fnmadd_pd(a, b, c); }
    static TPO_FORCE_INLINE vec max(vec a, vec b) { return _mm512_max_pd(b, a); }
    static TPO_FORCE_INLINE vec min(vec a, vec b) { return _mm512_min_pd(b, a); }
    static TPO_FORCE_INLINE double reduce_add(vec v) { return _mm512_reduce_add_pd(v); }
    static TPO_FORCE_INLINE double reduce_max(vec v) { return _mm512_reduce_max_pd(v); }
    static TPO_FORCE_INLINE double reduce_min(vec v) { return _mm512_reduce_min_pd(v); }
    static TPO_FORCE_INLINE vec round(vec x) { return _mm512_roundscale_pd(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
    static TPO_FORCE_INLINE vec scale(vec p, vec n) { return _mm512_scalef_pd(p, n); }
    static TPO_FORCE_INLINE vec exp_domain(vec x) { return min(max(x, set1(-746.0)), set1(710.0)); }
};

TPO_FORCE_INLINE void stream64(char* d, const char* s) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d), _mm512_loadu_si512(s));
}
inline constexpr bool has_stream = true;
TPO_FORCE_INLINE void store_fence() { _mm_sfence(); }

// vcvtne2ps2bf16 rounds and quiets NaN exactly as narrow_bf16_scalar, one instruction per 32
// values instead of about seven per 16, but it reads float subnormals as zero: 32 values holding
// one take the scalar loop. Called only where the CPU has AVX-512 BF16 (cpu_has_bf16()); returns
// how many values it narrowed.
inline constexpr bool has_bf16_narrowing = true;
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16"))) inline index_t narrow_bf16_vcvt(
    const float* src, index_t n, bfloat16* dst) {
    constexpr int subnormal = 0x20;  // vfpclassps category
    index_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m512 low = _mm512_loadu_ps(src + i), high = _mm512_loadu_ps(src + i + 16);
        if ((_mm512_fpclass_ps_mask(low, subnormal) | _mm512_fpclass_ps_mask(high, subnormal)) != 0)
            narrow_bf16_scalar(src + i, 32, dst + i);
        else
            _mm512_storeu_si512(static_cast<void*>(dst + i), (__m512i)_mm512_cvtne2ps_pbh(high, low));
    }
    return i;
}
