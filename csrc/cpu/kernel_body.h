// The CPU memory traversal of one Neptune step, compiled once per instruction set:
// cpu/set_<isa>.cpp sets `#pragma GCC target(...)`, defines NEPTUNE_CPU_ISA and
// includes this file. Everything here has internal linkage so that code compiled for
// AVX-512 can never be picked by the linker for a caller on an older CPU.
// Math is rule.h; this file only walks memory. Build with -ffp-contract=off so
// every ISA build gives bitwise the same result (lane-wise sums, no FMA contraction).

#if !defined(NEPTUNE_CPU_ISA) || !defined(NEPTUNE_CPU_WIDTH)
#error "define NEPTUNE_CPU_ISA (sse2, avx2, avx512, avx512bf16) and NEPTUNE_CPU_WIDTH before including this file"
#endif

namespace neptune {
namespace {

// Fixed-width lane accumulators: the summation order depends on the unit alone, not on
// the vector width of the ISA or on the thread that runs it.
constexpr int kLanes = 16;

inline float bits_to_f(uint32_t u) { return __builtin_bit_cast(float, u); }
inline uint32_t f_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

template <int D> struct Elem;

template <> struct Elem<kF32> {
  using T = float;
  static float load(T x) { return x; }
  static T store(float f) { return f; }
};

// bfloat16: the upper half of a float; stores round to nearest even, NaN stays NaN.
template <> struct Elem<kBF16> {
  using T = uint16_t;
  static float load(T x) { return bits_to_f((uint32_t)x << 16); }
  static T store(float f) {
    const uint32_t u = f_to_bits(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (f != f) ? (uint16_t)0x7FC0u : (uint16_t)rounded;
  }
};

// IEEE half, branch-free so loops vectorize (the FP16 library's algorithm, as in c10).
template <> struct Elem<kF16> {
  using T = uint16_t;
  static float load(T h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = bits_to_f((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_to_f((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t r = two_w < (1u << 27) ? f_to_bits(denormalized) : f_to_bits(normalized);
    return bits_to_f(sign | r);
  }
  static T store(float f) {
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = f_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = bits_to_f((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f_to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
  }
};

inline float lane_sum(const float* a) {
  float t[kLanes / 2];
  for (int j = 0; j < kLanes / 2; ++j) t[j] = a[j] + a[j + kLanes / 2];
  for (int j = 0; j < 4; ++j) t[j] = t[j] + t[j + 4];
  for (int j = 0; j < 2; ++j) t[j] = t[j] + t[j + 2];
  return t[0] + t[1];
}

// Native vectors (GCC vector extensions): 16 lanes on AVX-512, 8 on AVX2, 4 on SSE2.
// A reduction keeps kLanes logical lanes in kRegs registers, so the summation order is
// the same on every ISA; vectors wider than the hardware would be lowered lane by lane.
// (g++ does not define __AVX2__ etc. after `#pragma GCC target`: the ISA file says.)
constexpr int kWidth = NEPTUNE_CPU_WIDTH;
constexpr int kRegs = kLanes / kWidth;
typedef float vf __attribute__((vector_size(4 * kWidth)));
typedef uint32_t vu __attribute__((vector_size(4 * kWidth)));
typedef uint16_t vh __attribute__((vector_size(2 * kWidth)));

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

template <int D> struct VLoad;
template <> struct VLoad<kF32> {
  static vf load(const float* p) {
    vf r;
    __builtin_memcpy(&r, p, sizeof(r));
    return r;
  }
};
template <> struct VLoad<kBF16> {
  static vf load(const uint16_t* p) { return (vf)(load_u16(p) << 16); }
};
template <> struct VLoad<kF16> {
  static vf load(const uint16_t* p) {
#if NEPTUNE_CPU_WIDTH == 16  // F16C: the emulation's bits (see VStore<kF16>)
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif NEPTUNE_CPU_WIDTH == 8
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    const vu w = load_u16(p) << 16;
    const vu sign = w & 0x80000000u;
    const vu two_w = w + w;
    const vf normalized = (vf)((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const vf denormalized = (vf)((two_w >> 17) | (126u << 23)) - 0.5f;
    const vu r = (two_w < (1u << 27)) ? (vu)denormalized : (vu)normalized;
    return (vf)(sign | r);
#endif
  }
};

inline vu select(vu mask, vu a, vu b) { return (mask & a) | (~mask & b); }

template <int D> struct VStore;
template <> struct VStore<kF32> {
  static void store(float* p, vf x) { __builtin_memcpy(p, &x, sizeof(x)); }
};
// AVX512-BF16's conversion rounds to nearest even too, but flushes denormals and keeps NaN
// payloads: vectors holding either (never seen in training) take the emulation, so every
// kernel set stores the same bits (tests/conversions_exhaustive.cpp: every float, with and
// without DAZ/FTZ).
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
    const vu u = (vu)f;
    const vu rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    store_u16(p, select((vu)(f != f), (vu){} + 0x7FC0u, rounded));
  }
};
// F16C's conversion rounds to nearest even as the emulation does (the same bits for every
// non-NaN float, with and without DAZ/FTZ: tests/conversions_exhaustive.cpp) but keeps NaN
// payloads: vectors with a NaN take the emulation. Its loads give the emulation's bits.
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
    vf base = ((vf)((vu)f & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
    const vu w = (vu)f;
    const vu shl1_w = w + w;
    const vu sign = w & 0x80000000u;
    vu bias = shl1_w & 0xFF000000u;
    bias = select((vu)(bias < 0x71000000u), (vu){} + 0x71000000u, bias);
    base = (vf)((bias >> 1) + 0x07800000u) + base;
    const vu bits = (vu)base;
    const vu nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    store_u16(p, (sign >> 16) | select((vu)(shl1_w > 0xFF000000u), (vu){} + 0x7E00u, nonsign));
  }
};

inline vf vsqrt(vf x) {
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

// Lane counts of x > 0 (kGt0; ordered: NaN is not) and x != 0 (kNe0; unordered: NaN is),
// as the scalar agrees() / active() count them. AVX-512 and AVX2 compare into a bit mask
// and popcount it on the integer units, leaving the vector units to the arithmetic.
enum CountIf { kGt0, kNe0 };
#if NEPTUNE_CPU_WIDTH == 4 && defined(__x86_64__)
constexpr int kPopcount4[16] = {0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4};  // SSE2 has no popcnt
#endif
template <CountIf P>
inline int count_lanes(vf x) {
#if NEPTUNE_CPU_WIDTH == 16
  return __builtin_popcount(_mm512_cmp_ps_mask((__m512)x, _mm512_setzero_ps(), P == kGt0 ? _CMP_GT_OQ : _CMP_NEQ_UQ));
#elif NEPTUNE_CPU_WIDTH == 8
  return __builtin_popcount(
      _mm256_movemask_ps(_mm256_cmp_ps((__m256)x, _mm256_setzero_ps(), P == kGt0 ? _CMP_GT_OQ : _CMP_NEQ_UQ)));
#elif defined(__x86_64__)
  const __m128 z = _mm_setzero_ps();
  return kPopcount4[_mm_movemask_ps(P == kGt0 ? _mm_cmpgt_ps((__m128)x, z) : _mm_cmpneq_ps((__m128)x, z))];
#else
  int n = 0;
  for (int j = 0; j < kWidth; ++j) n += P == kGt0 ? x[j] > 0.f : x[j] != 0.f;
  return n;
#endif
}

// exp_avg / exp_avg_sq storage: float32, or bfloat16 with deterministic stochastic
// rounding (rule.h's sr_hash / bf16_round_stochastic, vectorized here bit for bit;
// one hash per element rounds both moments).
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

template <> struct State<kBF16> {
  using T = uint16_t;
  static vf vload(const T* p) { return VLoad<kBF16>::load(p); }
  static float load(const T* p) { return Elem<kBF16>::load(*p); }
  static vu round(vf f, vu bits16) {
    const vu rounded = ((vu)f + bits16) >> 16;
    return select((vu)(f != f), (vu){} + 0x7FC0u, rounded);
  }
  // Elements index .. index + kWidth - 1 of their unit.
  static void vstore2(T* mp, T* vp, int64_t index, vf m, vf v, uint32_t step) {
    vu iota;
    for (int j = 0; j < kWidth; ++j) iota[j] = (uint32_t)j;
    const uint32_t lo0 = (uint32_t)index, hi0 = (uint32_t)((uint64_t)index >> 32);
    const vu lo = ((vu){} + lo0) + iota;
    vu x;
    if (__builtin_expect(lo0 <= 0xFFFFFFFFu - (kWidth - 1), 1)) {  // no carry into hi: one key for all lanes
      x = lo ^ ((hi0 * 0x85EBCA6Bu) ^ (step * 0x9E3779B9u));
    } else {
      const vu hi = ((vu){} + hi0) - (vu)(lo < lo0);
      x = lo ^ (hi * 0x85EBCA6Bu) ^ (step * 0x9E3779B9u);
    }
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    if (__builtin_expect(unordered_lanes(m, v) != 0, 0)) {  // NaN moments (NaN gradients)
      store_u16(mp, round(m, x & 0xFFFFu));
      store_u16(vp, round(v, x >> 16));
      return;
    }
    const vu rm = (vu)m + (x & 0xFFFFu), rv = (vu)v + (x >> 16);
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
    *mp = bf16_round_stochastic(m, x & 0xFFFFu);
    *vp = bf16_round_stochastic(v, x >> 16);
  }
};

// Software prefetch of the unit this thread steps next (maybe in another tensor), paced
// over the passes of the current one: pass k of P fetches slice k of the next unit,
// spread evenly over its own iterations. With several short passes per unit, DRAM would
// otherwise idle during the in-cache passes (each unit a latency-bound burst of misses).
struct Prefetcher {
  const char* w = nullptr;
  const char* g = nullptr;
  const char* m = nullptr;
  const char* v = nullptr;
  int64_t elem_size = 0;   // of the next unit's param and grad
  int64_t state_size = 0;  // of its exp_avg and exp_avg_sq
  int64_t len = 0;        // of the next unit
  int64_t begin = 0, cur = 0, end = 0;
  float per_elem = 0.f;   // next-unit elements to fetch per element of this pass

  void target(const CpuTensorArgs& a, int64_t unit) {
    elem_size = a.dtype == kF32 ? 4 : 2;
    const int64_t off = unit * a.unit_len;
    w = static_cast<const char*>(a.w) + off * elem_size;
    g = static_cast<const char*>(a.g) + off * elem_size;
    state_size = a.state_dtype == kF32 ? 4 : 2;
    m = static_cast<const char*>(a.m) + off * state_size;
    v = static_cast<const char*>(a.v) + off * state_size;
    len = a.unit_len;
  }
  // This pass fetches next-unit elements [b, e), spread over the pass at `per` of them
  // per element processed (callers precompute the cuts: no divisions per unit).
  void slice(int64_t b, int64_t e, float per) {
    begin = cur = b;
    end = e;
    per_elem = per;
  }
  // `done` elements of the current pass are processed.
  void advance(int64_t done) {
    if (w == nullptr) return;
    int64_t to = begin + (int64_t)((float)done * per_elem);
    to = to < end ? to : end;
    for (; cur < to; cur += 16) {
      __builtin_prefetch(w + cur * elem_size, 0, 3);
      __builtin_prefetch(g + cur * elem_size, 0, 3);
      __builtin_prefetch(m + cur * state_size, 0, 3);
      __builtin_prefetch(v + cur * state_size, 0, 3);
    }
  }
  void flush() {
    if (w == nullptr) return;
    per_elem = 0.f;
    begin = end;
    advance(0);
  }
};

// Squared norms of W and of the rule's gradient over [b, e). With COUNT, also the
// agreement counts for a clip factor of exactly 1 (g * 1 == g, so they are bitwise what
// counts_t would give with s = 1): when the unit turns out unclipped, the counts pass is
// saved. `counts` = {n_agree, n_active}, added to. UNIT_G: gmul == 1, so g * gmul == g and
// the multiply is skipped (bitwise the same).
template <int D, int S, int COUNT, int UNIT_G>
void norms_t(const CpuTensorArgs& a, int64_t b, int64_t e, float* w_sq, float* g_sq, int64_t* counts,
             Prefetcher& pf) {
  using E = Elem<D>;
  using St = State<S>;
  const typename E::T* __restrict w = static_cast<const typename E::T*>(a.w);
  const typename E::T* __restrict g = static_cast<const typename E::T*>(a.g);
  const typename St::T* __restrict mp = static_cast<const typename St::T*>(a.m);
  const StepConsts c = a.c;
  const float gmul = c.gmul;
  vf aw[kRegs] = {}, ag[kRegs] = {};
  int64_t sa = 0, sb = 0;
  int64_t i = b;
  for (; i + kLanes <= e; i += kLanes) {
    pf.advance(i - b);
    for (int r = 0; r < kRegs; ++r) {
      const vf x = VLoad<D>::load(w + i + r * kWidth);
      const vf y = UNIT_G ? VLoad<D>::load(g + i + r * kWidth) : VLoad<D>::load(g + i + r * kWidth) * gmul;
      aw[r] += x * x;
      ag[r] += y * y;
      if (COUNT) {
        const vf m = c.beta1 * St::vload(mp + i + r * kWidth) + c.one_minus_beta1 * y;
        sa += count_lanes<kGt0>(m * y);
        sb += count_lanes<kNe0>(y);
      }
    }
  }
  float lw[kLanes], lg[kLanes];
  __builtin_memcpy(lw, aw, sizeof(lw));
  __builtin_memcpy(lg, ag, sizeof(lg));
  for (int j = 0; i < e; ++i, ++j) {
    const float x = E::load(w[i]);
    const float y = E::load(g[i]) * gmul;
    lw[j] += x * x;
    lg[j] += y * y;
    if (COUNT) {
      const float m = c.beta1 * St::load(mp + i) + c.one_minus_beta1 * y;
      sa += agrees(m, y);
      sb += active(y);
    }
  }
  *w_sq = lane_sum(lw);
  *g_sq = lane_sum(lg);
  if (COUNT) {
    counts[0] += sa;
    counts[1] += sb;
  }
  pf.flush();
}

// Agreement and activity counts over [b, e) for clip factor s, without writing anything:
// the moment is recomputed exactly as the update pass will compute it.
template <int D, int S>
void counts_t(const CpuTensorArgs& a, int64_t b, int64_t e, float s, int64_t* n_agree,
              int64_t* n_active, Prefetcher& pf) {
  using E = Elem<D>;
  using St = State<S>;
  const typename E::T* __restrict gp = static_cast<const typename E::T*>(a.g);
  const typename St::T* __restrict mp = static_cast<const typename St::T*>(a.m);
  const StepConsts c = a.c;
  int64_t sa = 0, sb = 0;
  int64_t i = b;
  for (; i + kWidth <= e; i += kWidth) {
    pf.advance(i - b);
    const vf g = (VLoad<D>::load(gp + i) * c.gmul) * s;
    const vf m = c.beta1 * St::vload(mp + i) + c.one_minus_beta1 * g;
    sa += count_lanes<kGt0>(m * g);
    sb += count_lanes<kNe0>(g);
  }
  for (; i < e; ++i) {
    const float g = grad_in(E::load(gp[i]), c) * s;
    const float m = c.beta1 * St::load(mp + i) + c.one_minus_beta1 * g;
    sa += agrees(m, g);
    sb += active(g);
  }
  *n_agree += sa;
  *n_active += sb;
  pf.flush();
}

// The streaming pass: read W, G, M, V once, write W, M, V once. The vector body is the
// same arithmetic as rule.h's element_step (used for the tail), op for op.
// UNIT_G: gmul == 1 and s == 1, so the gradient is used as stored (bitwise the same).
// ubase is the first element of the unit: stochastic-rounding bits are keyed by the index
// within the unit, so a row shard stepped alone rounds as the whole tensor does (property 5).
template <int D, int S, int CAUTIOUS, int UNIT_G>
void update_t(const CpuTensorArgs& a, int64_t b, int64_t e, int64_t ubase, float s, float rho, Prefetcher& pf) {
  using E = Elem<D>;
  using St = State<S>;
  typename E::T* __restrict wp = static_cast<typename E::T*>(a.w);
  const typename E::T* __restrict gp = static_cast<const typename E::T*>(a.g);
  typename St::T* __restrict mp = static_cast<typename St::T*>(a.m);
  typename St::T* __restrict vp = static_cast<typename St::T*>(a.v);
  const uint32_t sr = a.sr_step;
  StepConsts c = a.c;
  c.cautious = CAUTIOUS;
  const float step = unit_step_size(c, rho);
  int64_t i = b;
  for (; i + kWidth <= e; i += kWidth) {
    pf.advance(i - b);
    const vf g = UNIT_G ? VLoad<D>::load(gp + i) : (VLoad<D>::load(gp + i) * c.gmul) * s;
    vf m = St::vload(mp + i);
    vf v = St::vload(vp + i);
    m = c.beta1 * m + c.one_minus_beta1 * g;
    v = c.beta2 * v + c.one_minus_beta2 * g * g;
    const vf delta = (m * step) / (vsqrt(v) + c.eps_hat);
    const vf decayed = VLoad<D>::load(wp + i) * c.decay;
    // keep is 1.f or 0.f per lane: the mask multiplies, as in element_step
    const vf w = CAUTIOUS ? decayed - delta * (vf)((vu)(m * g > 0.f) & f_to_bits(1.f)) : decayed - delta;
    St::vstore2(mp + i, vp + i, i - ubase, m, v, sr);
    VStore<D>::store(wp + i, w);
  }
  for (; i < e; ++i) {
    float m = St::load(mp + i), v = St::load(vp + i);
    const float w = element_step(E::load(wp[i]), E::load(gp[i]), m, v, s, step, c);
    St::store2(mp + i, vp + i, i - ubase, m, v, sr);
    wp[i] = E::store(w);
  }
  pf.flush();
}

template <int D, int S>
void update_d(const CpuTensorArgs& a, int64_t b, int64_t e, int64_t ubase, float s, float rho, Prefetcher& pf) {
  const bool unit_g = a.c.gmul == 1.f && s == 1.f;
  if (a.c.cautious)
    unit_g ? update_t<D, S, 1, 1>(a, b, e, ubase, s, rho, pf) : update_t<D, S, 1, 0>(a, b, e, ubase, s, rho, pf);
  else
    unit_g ? update_t<D, S, 0, 1>(a, b, e, ubase, s, rho, pf) : update_t<D, S, 0, 0>(a, b, e, ubase, s, rho, pf);
}

template <int D, int S, int COUNT>
void norms_d(const CpuTensorArgs& a, int64_t b, int64_t e, float* w_sq, float* g_sq, int64_t* counts,
             Prefetcher& pf) {
  if (a.c.gmul == 1.f)
    norms_t<D, S, COUNT, 1>(a, b, e, w_sq, g_sq, counts, pf);
  else
    norms_t<D, S, COUNT, 0>(a, b, e, w_sq, g_sq, counts, pf);
}

// Whole units, each stepped while its data is in cache: norms, counts, update, while
// the next unit is prefetched (the following one in this tensor, or `after`: the first
// unit of the thread's next task, often in another tensor, where the hardware
// prefetchers lose the stream anyway).
template <int D, int S>
void units_t(const CpuTensorArgs& a, int64_t ub, int64_t ue, const CpuTensorArgs* after, int64_t after_unit) {
  const int64_t L = a.unit_len;
  const bool clip = a.c.clip > 0.f, cautious = a.c.cautious != 0;
  const int passes = 1 + (clip ? 1 : 0) + (cautious ? 1 : 0);
  // Pass k prefetches next-unit elements [cut[k], cut[k + 1]); the update pass, the rest.
  int64_t cut[4];
  for (int k = 0; k <= passes; ++k) cut[k] = L * k / passes;
  const float inv_len = 1.f / (float)L;
  for (int64_t u = ub; u < ue; ++u) {
    const int64_t b = u * L, e = b + L;
    Prefetcher pf;
    if (u + 1 < ue) {
      if (passes > 1) pf.target(a, u + 1);  // one pass streams by itself
    } else if (after != nullptr) {
      pf.target(*after, after_unit);
    }
    int k = 0;
    float s = 1.f;
    int64_t counts[2] = {0, 0};
    bool counted = false;
    if (clip) {
      float w_sq, g_sq;
      pf.slice(cut[k], cut[k + 1], (float)(cut[k + 1] - cut[k]) * inv_len);
      ++k;
      if (cautious) {
        norms_d<D, S, 1>(a, b, e, &w_sq, &g_sq, counts, pf);
      } else {
        norms_d<D, S, 0>(a, b, e, &w_sq, &g_sq, counts, pf);
      }
      s = clip_factor(w_sq, g_sq, a.c.clip);
      counted = s == 1.f;
    }
    float rho = 1.f;
    if (cautious) {
      if (!counted) {  // clipped: count again with the real s
        counts[0] = counts[1] = 0;
        pf.slice(cut[k], cut[k + 1], (float)(cut[k + 1] - cut[k]) * inv_len);
        ++k;
        counts_t<D, S>(a, b, e, s, &counts[0], &counts[1], pf);
      }
      rho = rho_floor(counts[0], counts[1], 1);
    }
    pf.slice(cut[k], cut[passes], (float)(cut[passes] - cut[k]) * inv_len);  // what is left
    update_d<D, S>(a, b, e, b, s, rho, pf);
  }
}

// Dispatch on the param and state dtypes at the entry points.
#define NEPTUNE_DTYPE_SWITCH(t, FN, ...)                                        \
  switch ((t).dtype * 2 + ((t).state_dtype == kBF16 ? 1 : 0)) {               \
    case kBF16 * 2: FN<kBF16, kF32>(__VA_ARGS__); break;                      \
    case kBF16 * 2 + 1: FN<kBF16, kBF16>(__VA_ARGS__); break;                 \
    case kF16 * 2: FN<kF16, kF32>(__VA_ARGS__); break;                        \
    case kF16 * 2 + 1: FN<kF16, kBF16>(__VA_ARGS__); break;                   \
    case kF32 * 2 + 1: FN<kF32, kBF16>(__VA_ARGS__); break;                   \
    default: FN<kF32, kF32>(__VA_ARGS__); break;                              \
  }

template <int D, int S>
void norms_plain(const CpuTensorArgs& t, int64_t b, int64_t e, float* w_sq, float* g_sq, int64_t* counts) {
  Prefetcher none;  // long units stream by themselves
  int64_t unused[2];
  if (counts != nullptr)
    norms_d<D, S, 1>(t, b, e, w_sq, g_sq, counts, none);
  else
    norms_d<D, S, 0>(t, b, e, w_sq, g_sq, unused, none);
}
template <int D, int S>
void counts_plain(const CpuTensorArgs& t, int64_t b, int64_t e, float s, int64_t* n_agree, int64_t* n_active) {
  Prefetcher none;
  counts_t<D, S>(t, b, e, s, n_agree, n_active, none);
}
template <int D, int S>
void update_plain(const CpuTensorArgs& t, int64_t b, int64_t e, float s, float rho) {
  Prefetcher none;
  update_d<D, S>(t, b, e, b - b % t.unit_len, s, rho, none);
}

void units_entry(const CpuTensorArgs& t, int64_t ub, int64_t ue, const CpuTensorArgs* after,
                 int64_t after_unit) {
  NEPTUNE_DTYPE_SWITCH(t, units_t, t, ub, ue, after, after_unit)
}
void norms_entry(const CpuTensorArgs& t, int64_t b, int64_t e, float* w_sq, float* g_sq, int64_t* counts) {
  NEPTUNE_DTYPE_SWITCH(t, norms_plain, t, b, e, w_sq, g_sq, counts)
}
void counts_entry(const CpuTensorArgs& t, int64_t b, int64_t e, float s, int64_t* n_agree,
                  int64_t* n_active) {
  NEPTUNE_DTYPE_SWITCH(t, counts_plain, t, b, e, s, n_agree, n_active)
}
void update_entry(const CpuTensorArgs& t, int64_t b, int64_t e, float s, float rho) {
  NEPTUNE_DTYPE_SWITCH(t, update_plain, t, b, e, s, rho)
}
#undef NEPTUNE_DTYPE_SWITCH

}  // namespace

#define NEPTUNE_CAT2(a, b) a##b
#define NEPTUNE_CAT(a, b) NEPTUNE_CAT2(a, b)
const CpuKernels& NEPTUNE_CAT(cpu_kernels_, NEPTUNE_CPU_ISA)() {
  static const CpuKernels k = {NEPTUNE_CPU_ISA_NAME, units_entry, norms_entry, counts_entry,
                               update_entry};
  return k;
}

}  // namespace neptune
