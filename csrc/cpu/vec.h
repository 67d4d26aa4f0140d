// The CPU kernels' vector layer, compiled once per kernel set (included by
// cpu/kernel_body.h after the set's `#pragma GCC target`): native vectors of
// NEPTUNE_CPU_WIDTH floats (GCC vector extensions: 16 lanes on AVX-512, 8 on AVX2, 4 on
// SSE2), their Lanes<vf> primitives for rule.h, the 16-lane sums whose order is the same on
// every set, and the loads / stores of each storage type (float32, bfloat16, half; the
// state's stochastic rounding). Conversions are rule.h's; the hardware ones (F16C,
// AVX512-BF16) are fast paths that give the same bits.
// (g++ does not define __AVX2__ etc. after `#pragma GCC target`: the set's file says.)

namespace neptune {
namespace {

// Fixed-width lane accumulators: the summation order depends on the unit alone, not on
// the vector width of the kernel set or on the thread that runs it. A reduction keeps
// kLanes logical lanes in kRegs registers; vectors wider than the hardware would be
// lowered lane by lane.
constexpr int kLanes = 16;
constexpr int kWidth = NEPTUNE_CPU_WIDTH;
constexpr int kRegs = kLanes / kWidth;
typedef float vf __attribute__((vector_size(4 * kWidth)));
typedef uint32_t vu __attribute__((vector_size(4 * kWidth)));
typedef int32_t vi __attribute__((vector_size(4 * kWidth)));  // a vector comparison's result
typedef uint16_t vh __attribute__((vector_size(2 * kWidth)));

inline float lane_sum(const float* a) {
  float t[kLanes / 2];
  for (int j = 0; j < kLanes / 2; ++j) t[j] = a[j] + a[j + kLanes / 2];
  for (int j = 0; j < 4; ++j) t[j] = t[j] + t[j + 4];
  for (int j = 0; j < 2; ++j) t[j] = t[j] + t[j + 2];
  return t[0] + t[1];
}

// The mask of the rule's comparisons (agrees, active): AVX-512 and AVX2 compare into a bit
// mask and popcount it on the integer units, leaving the vector units to the arithmetic.
#if NEPTUNE_CPU_WIDTH == 16
struct vmask {
  __mmask16 k;
};
#elif NEPTUNE_CPU_WIDTH == 8
struct vmask {
  __m256 v;
};
#elif defined(__x86_64__)
struct vmask {
  __m128 v;
};
constexpr int kPopcount4[16] = {0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4};  // SSE2 has no popcnt
#else
struct vmask {
  vi v;
};
#endif

}  // namespace

// Every member is inlined: the kernel sets of one vector width (avx512, avx512bf16) must
// never share an out-of-line copy built for the other.
template <> struct Lanes<vf> {
  using U = vu;
  using Mask = vmask;
  static NEPTUNE_HD_MEMBER vu bits(vf f) { return (vu)f; }
  static NEPTUNE_HD_MEMBER vf value(vu u) { return (vf)u; }
  static NEPTUNE_HD_MEMBER vu select(vi m, vu a, vu b) { return ((vu)m & a) | (~(vu)m & b); }
  static NEPTUNE_HD_MEMBER vf sqrt(vf x) {
#if NEPTUNE_CPU_WIDTH == 16
    return (vf)_mm512_sqrt_ps((__m512)x);
#elif NEPTUNE_CPU_WIDTH == 8
    return (vf)_mm256_sqrt_ps((__m256)x);
#elif defined(__x86_64__)
    return (vf)_mm_sqrt_ps((__m128)x);
#else
    vf r;
    for (int j = 0; j < kWidth; ++j) r[j] = __builtin_sqrtf(x[j]);
    return r;
#endif
  }
  // As Lanes<float>: x > 0 ordered (NaN is not), x != 0 unordered (NaN is).
  static NEPTUNE_HD_MEMBER vmask gt0(vf x) {
#if NEPTUNE_CPU_WIDTH == 16
    return {_mm512_cmp_ps_mask((__m512)x, _mm512_setzero_ps(), _CMP_GT_OQ)};
#elif NEPTUNE_CPU_WIDTH == 8
    return {_mm256_cmp_ps((__m256)x, _mm256_setzero_ps(), _CMP_GT_OQ)};
#elif defined(__x86_64__)
    return {_mm_cmpgt_ps((__m128)x, _mm_setzero_ps())};
#else
    return {x > 0.f};
#endif
  }
  static NEPTUNE_HD_MEMBER vmask ne0(vf x) {
#if NEPTUNE_CPU_WIDTH == 16
    return {_mm512_cmp_ps_mask((__m512)x, _mm512_setzero_ps(), _CMP_NEQ_UQ)};
#elif NEPTUNE_CPU_WIDTH == 8
    return {_mm256_cmp_ps((__m256)x, _mm256_setzero_ps(), _CMP_NEQ_UQ)};
#elif defined(__x86_64__)
    return {_mm_cmpneq_ps((__m128)x, _mm_setzero_ps())};
#else
    return {x != 0.f};
#endif
  }
  static NEPTUNE_HD_MEMBER vf one_if(vmask m) {
#if NEPTUNE_CPU_WIDTH == 16
    return (vf)_mm512_maskz_mov_ps(m.k, _mm512_set1_ps(1.f));
#else
    return (vf)((vu)m.v & 0x3F800000u);  // the bits of 1.f
#endif
  }
  // Lanes set in m.
  static NEPTUNE_HD_MEMBER int count(vmask m) {
#if NEPTUNE_CPU_WIDTH == 16
    return __builtin_popcount(m.k);
#elif NEPTUNE_CPU_WIDTH == 8
    return __builtin_popcount(_mm256_movemask_ps(m.v));
#elif defined(__x86_64__)
    return kPopcount4[_mm_movemask_ps(m.v)];
#else
    int n = 0;
    for (int j = 0; j < kWidth; ++j) n += m.v[j] != 0;
    return n;
#endif
  }
};

namespace {

// Lanes where a or b is NaN, as a bit mask (0: none).
inline unsigned unordered_lanes(vf a, vf b) {
#if NEPTUNE_CPU_WIDTH == 16
  return _mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_UNORD_Q);
#elif NEPTUNE_CPU_WIDTH == 8
  return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps((__m256)a, (__m256)b, _CMP_UNORD_Q));
#elif defined(__x86_64__)
  return (unsigned)_mm_movemask_ps(_mm_cmpunord_ps((__m128)a, (__m128)b));
#else
  unsigned r = 0;
  for (int j = 0; j < kWidth; ++j) r |= (unsigned)(a[j] != a[j] || b[j] != b[j]) << j;
  return r;
#endif
}

// 16-bit storage widened to / narrowed from 32-bit lanes: one instruction on AVX-512
// and AVX2 (GCC's generic __builtin_convertvector splits and recombines halves).
inline vu load_u16(const uint16_t* p) {
#if NEPTUNE_CPU_WIDTH == 16
  return (vu)_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif NEPTUNE_CPU_WIDTH == 8
  return (vu)_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vh h;
  __builtin_memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, vu);
#endif
}

// `x` holds values < 2^16 in each 32-bit lane.
inline void store_u16(uint16_t* p, vu x) {
#if NEPTUNE_CPU_WIDTH == 16
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16((__m512i)x));
#elif NEPTUNE_CPU_WIDTH == 8
  const __m256i v = (__m256i)x;
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
#else
  const vh h = __builtin_convertvector(x, vh);
  __builtin_memcpy(p, &h, sizeof(h));
#endif
}

// One element of a param / grad (the scalar tails): float32, or 16 bits rounded to nearest.
template <int D> struct Elem;
template <> struct Elem<kF32> {
  using T = float;
  static float load(T x) { return x; }
  static T store(float f) { return f; }
};
template <> struct Elem<kBF16> {
  using T = uint16_t;
  static float load(T x) { return bf16_bits_to_f32<float>(x); }
  static T store(float f) { return (T)f32_to_bf16_rn(f); }
};
template <> struct Elem<kF16> {
  using T = uint16_t;
  static float load(T h) { return f16_bits_to_f32<float>(h); }
  static T store(float f) { return (T)f32_to_f16_rn(f); }
};

// kWidth elements of a param / grad.
template <int D> struct VLoad;
template <> struct VLoad<kF32> {
  static vf load(const float* p) {
    vf r;
    __builtin_memcpy(&r, p, sizeof(r));
    return r;
  }
};
template <> struct VLoad<kBF16> {
  static vf load(const uint16_t* p) { return bf16_bits_to_f32<vf>(load_u16(p)); }
};
template <> struct VLoad<kF16> {
  static vf load(const uint16_t* p) {
#if NEPTUNE_CPU_WIDTH == 16  // F16C: the software conversion's bits (see VStore<kF16>)
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif NEPTUNE_CPU_WIDTH == 8
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    return f16_bits_to_f32<vf>(load_u16(p));
#endif
  }
};

template <int D> struct VStore;
template <> struct VStore<kF32> {
  static void store(float* p, vf x) { __builtin_memcpy(p, &x, sizeof(x)); }
};
// AVX512-BF16's conversion rounds to nearest even too, but flushes denormals and keeps NaN
// payloads: vectors holding either (never seen in training) take the software conversion,
// so every kernel set stores the same bits (tests/conversions_exhaustive.cpp: every float,
// with and without DAZ/FTZ).
// Integer compares find them: vfpclassps misses denormals under DAZ.
template <> struct VStore<kBF16> {
  static void store(uint16_t* p, vf f) {
#if defined(NEPTUNE_CPU_AVX512BF16)
    const vu mag = (vu)f & 0x7FFFFFFFu;
    const __mmask16 denormal = _mm512_cmplt_epu32_mask((__m512i)(mag - 1u), _mm512_set1_epi32(0x7FFFFF));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask((__m512i)mag, _mm512_set1_epi32(0x7F800000));
    if (__builtin_expect((denormal | nan) == 0, 1)) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh((__m512)f));
      return;
    }
#endif
    store_u16(p, f32_to_bf16_rn(f));
  }
};
// F16C's conversion rounds to nearest even as the software one does (the same bits for
// every non-NaN float, with and without DAZ/FTZ: tests/conversions_exhaustive.cpp) but
// keeps NaN payloads: vectors with a NaN take the software conversion. Its loads give the
// software conversion's bits.
template <> struct VStore<kF16> {
  static void store(uint16_t* p, vf f) {
#if NEPTUNE_CPU_WIDTH == 16
    if (__builtin_expect(_mm512_fpclass_ps_mask((__m512)f, 0x81) == 0, 1)) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph((__m512)f, _MM_FROUND_TO_NEAREST_INT));
      return;
    }
#elif NEPTUNE_CPU_WIDTH == 8
    if (__builtin_expect(_mm256_movemask_ps(_mm256_cmp_ps((__m256)f, (__m256)f, _CMP_UNORD_Q)) == 0, 1)) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph((__m256)f, _MM_FROUND_TO_NEAREST_INT));
      return;
    }
#endif
    store_u16(p, f32_to_f16_rn(f));
  }
};

// exp_avg / exp_avg_sq storage: float32, or bfloat16 with rule.h's deterministic stochastic
// rounding (bf16 state; one hash per element rounds both moments).
template <int S> struct State;
template <> struct State<kF32> {
  using T = float;
  static vf vload(const T* p) { return VLoad<kF32>::load(p); }
  static float load(const T* p) { return *p; }
  static void vstore2(T* mp, T* vp, int64_t, vf m, vf v, uint32_t) {
    VStore<kF32>::store(mp, m);
    VStore<kF32>::store(vp, v);
  }
  static void store2(T* mp, T* vp, int64_t, float m, float v, uint32_t) {
    *mp = m;
    *vp = v;
  }
};
template <> struct State<kBF16> {
  using T = uint16_t;
  static vf vload(const T* p) { return VLoad<kBF16>::load(p); }
  static float load(const T* p) { return Elem<kBF16>::load(*p); }
  // Elements index .. index + kWidth - 1 of their unit.
  static void vstore2(T* mp, T* vp, int64_t index, vf m, vf v, uint32_t step) {
    vu iota;
    for (int j = 0; j < kWidth; ++j) iota[j] = (uint32_t)j;
    const uint32_t lo0 = (uint32_t)index, hi0 = (uint32_t)((uint64_t)index >> 32);
    const vu lo = ((vu){} + lo0) + iota;
    vu x;
    if (__builtin_expect(lo0 <= 0xFFFFFFFFu - (kWidth - 1), 1)) {  // no carry into hi: one hi for all lanes
      x = sr_mix(sr_key(lo, hi0, step));
    } else {
      const vu hi = ((vu){} + hi0) - (vu)(lo < lo0);
      x = sr_mix(sr_key(lo, hi, step));
    }
    if (__builtin_expect(unordered_lanes(m, v) != 0, 0)) {  // NaN moments (NaN gradients)
      store_u16(mp, bf16_round_stochastic(m, x & 0xFFFFu));
      store_u16(vp, bf16_round_stochastic(v, x >> 16));
      return;
    }
    const vu rm = bf16_stochastic_upper(m, x & 0xFFFFu), rv = bf16_stochastic_upper(v, x >> 16);
#if NEPTUNE_CPU_WIDTH == 16
    // The upper halves of both in one permute: exp_avg's 16 in the low 256 bits, exp_avg_sq's above.
    const __m512i idx = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27,
                                         25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    const __m512i both = _mm512_permutex2var_epi16((__m512i)rm, idx, (__m512i)rv);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(mp), _mm512_castsi512_si256(both));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(vp), _mm512_extracti64x4_epi64(both, 1));
#else
    store_u16(mp, rm >> 16);
    store_u16(vp, rv >> 16);
#endif
  }
  static void store2(T* mp, T* vp, int64_t index, float m, float v, uint32_t step) {
    const uint32_t x = sr_hash((uint64_t)index, step);
    *mp = (T)bf16_round_stochastic(m, x & 0xFFFFu);
    *vp = (T)bf16_round_stochastic(v, x >> 16);
  }
};

}  // namespace
}  // namespace neptune
