// The avx2 level's vectors: 256-bit AVX2 with FMA (cpu/kernels.hpp includes this file inside the
// level's namespace and target options). See vectors_scalar.inl for what each operation means.

struct f32 {
    using vec = __m256;
    static constexpr index_t width = 8;
    static TPO_FORCE_INLINE vec load(const float* p) { return _mm256_load_ps(p); }
    static TPO_FORCE_INLINE vec loadu(const float* p) { return _mm256_loadu_ps(p); }
    static TPO_FORCE_INLINE void store(float* p, vec v) { _mm256_store_ps(p, v); }
    static TPO_FORCE_INLINE void storeu(float* p, vec v) { _mm256_storeu_ps(p, v); }
    static TPO_FORCE_INLINE vec set1(float a) { return _mm256_set1_ps(a); }
    /// p[0], p[stride], …, p[7·stride] (stride·7 fits an int).
    static TPO_FORCE_INLINE vec gather(const float* p, index_t stride) {
        const __m256i lanes = _mm256_mullo_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0),
                                                 _mm256_set1_epi32(static_cast<int>(stride)));
        return _mm256_i32gather_ps(p, lanes, 4);
    }
    static TPO_FORCE_INLINE vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
    static TPO_FORCE_INLINE vec sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
    static TPO_FORCE_INLINE vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
    static TPO_FORCE_INLINE vec div(vec a, vec b) { return _mm256_div_ps(a, b); }
    static TPO_FORCE_INLINE vec sqrt(vec a) { return _mm256_sqrt_ps(a); }
    static TPO_FORCE_INLINE vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
    static TPO_FORCE_INLINE vec fnmadd(vec a, vec b, vec c) { return _mm256_fnmadd_ps(a, b, c); }
    static TPO_FORCE_INLINE vec max(vec a, vec b) { return _mm256_max_ps(b, a); }
    static TPO_FORCE_INLINE vec min(vec a, vec b) { return _mm256_min_ps(b, a); }
    static TPO_FORCE_INLINE __m128 halves_add(vec v) { return _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)); }
    static TPO_FORCE_INLINE float reduce_add(vec v) {
        const __m128 q = halves_add(v), pairs = _mm_add_ps(q, _mm_movehl_ps(q, q));
        return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
    }
    static TPO_FORCE_INLINE float reduce_max(vec v) {
        const __m128 q = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        const __m128 pairs = _mm_max_ps(q, _mm_movehl_ps(q, q));
        return _mm_cvtss_f32(_mm_max_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
    }
    static TPO_FORCE_INLINE float reduce_min(vec v) {
        const __m128 q = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        const __m128 pairs = _mm_min_ps(q, _mm_movehl_ps(q, q));
        return _mm_cvtss_f32(_mm_min_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
    }
    static TPO_FORCE_INLINE vec scale(vec p, vec n) {
        const __m256i k = _mm256_cvtps_epi32(n), k1 = _mm256_srai_epi32(k, 1), k2 = _mm256_sub_epi32(k, k1);
        const __m256i bias = _mm256_set1_epi32(127);
        const vec s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, bias), 23));
        const vec s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k2, bias), 23));
        return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
    }
    static TPO_FORCE_INLINE vec round(vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
    static TPO_FORCE_INLINE vec floor(vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
    static TPO_FORCE_INLINE vec exp_domain(vec x) { return min(max(x, set1(-104.0f)), set1(89.0f)); }
    static TPO_FORCE_INLINE void exp2_split(vec t, vec& f, vec& e) {
        t = min(max(t, set1(-160.0f)), set1(127.0f));
        e = floor(t);
        f = _mm256_sub_ps(t, e);
    }

    using ivec = __m256i;
    static TPO_FORCE_INLINE ivec bits(vec v) { return _mm256_castps_si256(v); }
    static TPO_FORCE_INLINE vec from_bits(ivec v) { return _mm256_castsi256_ps(v); }
    static TPO_FORCE_INLINE ivec to_int(vec v) { return _mm256_cvtps_epi32(v); }
    static TPO_FORCE_INLINE vec to_float(ivec v) { return _mm256_cvtepi32_ps(v); }
    static TPO_FORCE_INLINE ivec iset1(std::int32_t a) { return _mm256_set1_epi32(a); }
    static TPO_FORCE_INLINE ivec iadd(ivec a, ivec b) { return _mm256_add_epi32(a, b); }
    static TPO_FORCE_INLINE ivec isub(ivec a, ivec b) { return _mm256_sub_epi32(a, b); }
    static TPO_FORCE_INLINE ivec iand(ivec a, ivec b) { return _mm256_and_si256(a, b); }
    static TPO_FORCE_INLINE ivec ior(ivec a, ivec b) { return _mm256_or_si256(a, b); }
    static TPO_FORCE_INLINE ivec ixor(ivec a, ivec b) { return _mm256_xor_si256(a, b); }
    template <int N>
    static TPO_FORCE_INLINE ivec shift_left(ivec a) { return _mm256_slli_epi32(a, N); }
    template <int N>
    static TPO_FORCE_INLINE ivec shift_right(ivec a) { return _mm256_srli_epi32(a, N); }
    static TPO_FORCE_INLINE vec select_nonzero(ivec which, vec a, vec b) {
        return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_cmpeq_epi32(which, _mm256_setzero_si256())));
    }
    static TPO_FORCE_INLINE vec select_greater(vec a, vec b, vec yes, vec no) {
        return _mm256_blendv_ps(no, yes, _mm256_cmp_ps(a, b, _CMP_GT_OQ));
    }
};

struct f64 {
    using vec = __m256d;
    static constexpr index_t width = 4;
    static TPO_FORCE_INLINE vec load(const double* p) { return _mm256_load_pd(p); }
    static TPO_FORCE_INLINE vec loadu(const double* p) { return _mm256_loadu_pd(p); }
    static TPO_FORCE_INLINE void store(double* p, vec v) { _mm256_store_pd(p, v); }
    static TPO_FORCE_INLINE void storeu(double* p, vec v) { _mm256_storeu_pd(p, v); }
    static TPO_FORCE_INLINE vec set1(double a) { return _mm256_set1_pd(a); }
    static TPO_FORCE_INLINE vec add(vec a, vec b) { return _mm256_add_pd(a, b); }
    static TPO_FORCE_INLINE vec sub(vec a, vec b) { return _mm256_sub_pd(a, b); }
    static TPO_FORCE_INLINE vec mul(vec a, vec b) { return _mm256_mul_pd(a, b); }
    static TPO_FORCE_INLINE vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_pd(a, b, c); }
    static TPO_FORCE_INLINE vec fnmadd(vec a, vec b, vec c) { return _mm256_fnmadd_pd(a, b, c); }
    static TPO_FORCE_INLINE vec max(vec a, vec b) { return _mm256_max_pd(b, a); }
    static TPO_FORCE_INLINE vec min(vec a, vec b) { return _mm256_min_pd(b, a); }
    static TPO_FORCE_INLINE double reduce_add(vec v) {
        const __m128d q = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
        return _mm_cvtsd_f64(_mm_add_sd(q, _mm_unpackhi_pd(q, q)));
    }
    static TPO_FORCE_INLINE double reduce_max(vec v) {
        const __m128d q = _mm_max_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
        return _mm_cvtsd_f64(_mm_max_sd(q, _mm_unpackhi_pd(q, q)));
    }
    static TPO_FORCE_INLINE double reduce_min(vec v) {
        const __m128d q = _mm_min_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
        return _mm_cvtsd_f64(_mm_min_sd(q, _mm_unpackhi_pd(q, q)));
    }
    static TPO_FORCE_INLINE vec round(vec x) { return _mm256_round_pd(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
    static TPO_FORCE_INLINE vec scale(vec p, vec n) {
        const vec magic = _mm256_set1_pd(0x1.8p52);
        const vec n1 = round(_mm256_mul_pd(n, _mm256_set1_pd(0.5))), n2 = _mm256_sub_pd(n, n1);
        const __m256i bias = _mm256_set1_epi64x(1023);
        const vec s1 = _mm256_castsi256_pd(
            _mm256_slli_epi64(_mm256_add_epi64(_mm256_castpd_si256(_mm256_add_pd(n1, magic)), bias), 52));
        const vec s2 = _mm256_castsi256_pd(
            _mm256_slli_epi64(_mm256_add_epi64(_mm256_castpd_si256(_mm256_add_pd(n2, magic)), bias), 52));
        return _mm256_mul_pd(_mm256_mul_pd(p, s1), s2);
    }
    static TPO_FORCE_INLINE vec exp_domain(vec x) { return min(max(x, set1(-746.0)), set1(710.0)); }
};

TPO_FORCE_INLINE void stream64(char* d, const char* s) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + 32), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 32)));
}
inline constexpr bool has_stream = true;
TPO_FORCE_INLINE void store_fence() { _mm_sfence(); }
inline constexpr bool has_bf16_narrowing = false;
inline index_t narrow_bf16_vcvt(const float*, index_t, bfloat16*) { return 0; }
