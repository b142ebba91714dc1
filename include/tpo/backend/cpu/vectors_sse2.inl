// The baseline level's vectors on x86-64: 128-bit SSE2 (cpu/kernels.hpp includes this file inside
// the level's namespace). Every operation the kernels use, for float and double lanes; see
// vectors_scalar.inl for what each one means.

struct f32 {
    using vec = __m128;
    static constexpr index_t width = 4;
    static TPO_FORCE_INLINE vec load(const float* p) { return _mm_load_ps(p); }
    static TPO_FORCE_INLINE vec loadu(const float* p) { return _mm_loadu_ps(p); }
    static TPO_FORCE_INLINE void store(float* p, vec v) { _mm_store_ps(p, v); }
    static TPO_FORCE_INLINE void storeu(float* p, vec v) { _mm_storeu_ps(p, v); }
    static TPO_FORCE_INLINE vec set1(float a) { return _mm_set1_ps(a); }
    /// p[0], p[stride], p[2·stride], p[3·stride].
    static TPO_FORCE_INLINE vec gather(const float* p, index_t stride) {
        return _mm_set_ps(p[3 * stride], p[2 * stride], p[stride], p[0]);
    }
    static TPO_FORCE_INLINE vec add(vec a, vec b) { return _mm_add_ps(a, b); }
    static TPO_FORCE_INLINE vec sub(vec a, vec b) { return _mm_sub_ps(a, b); }
    static TPO_FORCE_INLINE vec mul(vec a, vec b) { return _mm_mul_ps(a, b); }
    static TPO_FORCE_INLINE vec div(vec a, vec b) { return _mm_div_ps(a, b); }
    static TPO_FORCE_INLINE vec sqrt(vec a) { return _mm_sqrt_ps(a); }
    static TPO_FORCE_INLINE vec fmadd(vec a, vec b, vec c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
    static TPO_FORCE_INLINE vec fnmadd(vec a, vec b, vec c) { return _mm_sub_ps(c, _mm_mul_ps(a, b)); }
    // maxps/minps return their second operand when either is NaN: std::max/std::min's rule.
    static TPO_FORCE_INLINE vec max(vec a, vec b) { return _mm_max_ps(b, a); }
    static TPO_FORCE_INLINE vec min(vec a, vec b) { return _mm_min_ps(b, a); }
    static TPO_FORCE_INLINE float reduce_add(vec v) {
        const vec pairs = _mm_add_ps(v, _mm_movehl_ps(v, v));
        return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
    }
    static TPO_FORCE_INLINE float reduce_max(vec v) {
        const vec pairs = _mm_max_ps(v, _mm_movehl_ps(v, v));
        return _mm_cvtss_f32(_mm_max_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
    }
    static TPO_FORCE_INLINE float reduce_min(vec v) {
        const vec pairs = _mm_min_ps(v, _mm_movehl_ps(v, v));
        return _mm_cvtss_f32(_mm_min_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
    }

    // 2^n for integer-valued n in [−160, 127], applied in two exact halves so that subnormal
    // results are rounded once.
    static TPO_FORCE_INLINE vec scale(vec p, vec n) {
        const __m128i k = _mm_cvtps_epi32(n), k1 = _mm_srai_epi32(k, 1), k2 = _mm_sub_epi32(k, k1);
        const __m128i bias = _mm_set1_epi32(127);
        const vec s1 = _mm_castsi128_ps(_mm_slli_epi32(_mm_add_epi32(k1, bias), 23));
        const vec s2 = _mm_castsi128_ps(_mm_slli_epi32(_mm_add_epi32(k2, bias), 23));
        return _mm_mul_ps(_mm_mul_ps(p, s1), s2);
    }
    // Nearest integer (ties to even, the default rounding mode), for |x| < 2^31.
    static TPO_FORCE_INLINE vec round(vec x) { return _mm_cvtepi32_ps(_mm_cvtps_epi32(x)); }
    // floor(x) for |x| < 2^31.
    static TPO_FORCE_INLINE vec floor(vec x) {
        const vec t = _mm_cvtepi32_ps(_mm_cvttps_epi32(x));
        return _mm_sub_ps(t, _mm_and_ps(_mm_cmpgt_ps(t, x), _mm_set1_ps(1.0f)));
    }
    // The argument of fast_exp clamped to where scale() applies: [−104, 89] (NaN stays NaN).
    static TPO_FORCE_INLINE vec exp_domain(vec x) { return min(max(x, set1(-104.0f)), set1(89.0f)); }
    // t split for 2^t = 2^e · 2^f, f ∈ [0, 1); t ≤ −160 (and −∞) give 2^t = 0.
    static TPO_FORCE_INLINE void exp2_split(vec t, vec& f, vec& e) {
        t = min(max(t, set1(-160.0f)), set1(127.0f));
        e = floor(t);
        f = _mm_sub_ps(t, e);
    }

    // For the noise generator's logarithm and sine: integer views of the lanes.
    using ivec = __m128i;
    static TPO_FORCE_INLINE ivec bits(vec v) { return _mm_castps_si128(v); }
    static TPO_FORCE_INLINE vec from_bits(ivec v) { return _mm_castsi128_ps(v); }
    static TPO_FORCE_INLINE ivec to_int(vec v) { return _mm_cvtps_epi32(v); }
    static TPO_FORCE_INLINE vec to_float(ivec v) { return _mm_cvtepi32_ps(v); }
    static TPO_FORCE_INLINE ivec iset1(std::int32_t a) { return _mm_set1_epi32(a); }
    static TPO_FORCE_INLINE ivec iadd(ivec a, ivec b) { return _mm_add_epi32(a, b); }
    static TPO_FORCE_INLINE ivec isub(ivec a, ivec b) { return _mm_sub_epi32(a, b); }
    static TPO_FORCE_INLINE ivec iand(ivec a, ivec b) { return _mm_and_si128(a, b); }
    static TPO_FORCE_INLINE ivec ior(ivec a, ivec b) { return _mm_or_si128(a, b); }
    static TPO_FORCE_INLINE ivec ixor(ivec a, ivec b) { return _mm_xor_si128(a, b); }
    template <int N>
    static TPO_FORCE_INLINE ivec shift_left(ivec a) { return _mm_slli_epi32(a, N); }
    template <int N>
    static TPO_FORCE_INLINE ivec shift_right(ivec a) { return _mm_srli_epi32(a, N); }
    // Lanes of a where `which` is nonzero, of b elsewhere.
    static TPO_FORCE_INLINE vec select_nonzero(ivec which, vec a, vec b) {
        const vec mask = _mm_castsi128_ps(_mm_xor_si128(_mm_cmpeq_epi32(which, _mm_setzero_si128()), _mm_set1_epi32(-1)));
        return _mm_or_ps(_mm_and_ps(mask, a), _mm_andnot_ps(mask, b));
    }
    // Lanes of a where a > b, of c elsewhere.
    static TPO_FORCE_INLINE vec select_greater(vec a, vec b, vec yes, vec no) {
        const vec mask = _mm_cmpgt_ps(a, b);
        return _mm_or_ps(_mm_and_ps(mask, yes), _mm_andnot_ps(mask, no));
    }
};

struct f64 {
    using vec = __m128d;
    static constexpr index_t width = 2;
    static TPO_FORCE_INLINE vec load(const double* p) { return _mm_load_pd(p); }
    static TPO_FORCE_INLINE vec loadu(const double* p) { return _mm_loadu_pd(p); }
    static TPO_FORCE_INLINE void store(double* p, vec v) { _mm_store_pd(p, v); }
    static TPO_FORCE_INLINE void storeu(double* p, vec v) { _mm_storeu_pd(p, v); }
    static TPO_FORCE_INLINE vec set1(double a) { return _mm_set1_pd(a); }
    static TPO_FORCE_INLINE vec add(vec a, vec b) { return _mm_add_pd(a, b); }
    static TPO_FORCE_INLINE vec sub(vec a, vec b) { return _mm_sub_pd(a, b); }
    static TPO_FORCE_INLINE vec mul(vec a, vec b) { return _mm_mul_pd(a, b); }
    static TPO_FORCE_INLINE vec fmadd(vec a, vec b, vec c) { return _mm_add_pd(_mm_mul_pd(a, b), c); }
    static TPO_FORCE_INLINE vec fnmadd(vec a, vec b, vec c) { return _mm_sub_pd(c, _mm_mul_pd(a, b)); }
    static TPO_FORCE_INLINE vec max(vec a, vec b) { return _mm_max_pd(b, a); }
    static TPO_FORCE_INLINE vec min(vec a, vec b) { return _mm_min_pd(b, a); }
    static TPO_FORCE_INLINE double reduce_add(vec v) { return _mm_cvtsd_f64(_mm_add_sd(v, _mm_unpackhi_pd(v, v))); }
    static TPO_FORCE_INLINE double reduce_max(vec v) { return _mm_cvtsd_f64(_mm_max_sd(v, _mm_unpackhi_pd(v, v))); }
    static TPO_FORCE_INLINE double reduce_min(vec v) { return _mm_cvtsd_f64(_mm_min_sd(v, _mm_unpackhi_pd(v, v))); }

    // Adding 1.5·2^52 rounds |x| < 2^51 to an integer (ties to even) in the low bits.
    static TPO_FORCE_INLINE vec round(vec x) {
        const vec magic = _mm_set1_pd(0x1.8p52);
        return _mm_sub_pd(_mm_add_pd(x, magic), magic);
    }
    // 2^n for integer-valued n in [−1100, 1100], in two exact halves (see f32::scale).
    static TPO_FORCE_INLINE vec scale(vec p, vec n) {
        const vec magic = _mm_set1_pd(0x1.8p52);
        const vec n1 = round(_mm_mul_pd(n, _mm_set1_pd(0.5))), n2 = _mm_sub_pd(n, n1);
        const __m128i bias = _mm_set1_epi64x(1023);
        // The low bits of n + 1.5·2^52 hold n; shifted into the exponent field, the rest drops out.
        const vec s1 = _mm_castsi128_pd(_mm_slli_epi64(_mm_add_epi64(_mm_castpd_si128(_mm_add_pd(n1, magic)), bias), 52));
        const vec s2 = _mm_castsi128_pd(_mm_slli_epi64(_mm_add_epi64(_mm_castpd_si128(_mm_add_pd(n2, magic)), bias), 52));
        return _mm_mul_pd(_mm_mul_pd(p, s1), s2);
    }
    static TPO_FORCE_INLINE vec exp_domain(vec x) { return min(max(x, set1(-746.0)), set1(710.0)); }
};

TPO_FORCE_INLINE void stream64(char* d, const char* s) {
    for (int k = 0; k < 4; ++k)
        _mm_stream_si128(reinterpret_cast<__m128i*>(d + 16 * k), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 16 * k)));
}
inline constexpr bool has_stream = true;
TPO_FORCE_INLINE void store_fence() { _mm_sfence(); }
inline constexpr bool has_bf16_narrowing = false;
inline index_t narrow_bf16_vcvt(const float*, index_t, bfloat16*) { return 0; }
