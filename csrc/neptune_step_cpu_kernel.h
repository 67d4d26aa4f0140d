// The CPU memory traversal of one Neptune step, compiled once per instruction set:
// neptune_step_cpu_<isa>.cpp sets `#pragma GCC target(...)`, defines NEPTUNE_CPU_ISA and
// includes this file. Everything here has internal linkage so that code compiled for
// AVX-512 can never be picked by the linker for a caller on an older CPU.
// Math is neptune_math.h; this file only walks memory. Build with -ffp-contract=off so
// every ISA build gives bitwise the same result (lane-wise sums, no FMA contraction).

#ifndef NEPTUNE_CPU_ISA
#error "define NEPTUNE_CPU_ISA (scalar, avx2, avx512) before including this file"
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

// Squared norms of W and of the rule's gradient over [b, e).
template <int D>
void norms_t(const CpuTensorArgs& a, int64_t b, int64_t e, float* w_sq, float* g_sq) {
  using E = Elem<D>;
  const typename E::T* __restrict w = static_cast<const typename E::T*>(a.w);
  const typename E::T* __restrict g = static_cast<const typename E::T*>(a.g);
  const float gmul = a.c.gmul;
  float aw[kLanes] = {}, ag[kLanes] = {};
  int64_t i = b;
  for (; i + kLanes <= e; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float x = E::load(w[i + j]);
      const float y = E::load(g[i + j]) * gmul;
      aw[j] += x * x;
      ag[j] += y * y;
    }
  }
  for (int j = 0; i < e; ++i, ++j) {
    const float x = E::load(w[i]);
    const float y = E::load(g[i]) * gmul;
    aw[j] += x * x;
    ag[j] += y * y;
  }
  *w_sq = lane_sum(aw);
  *g_sq = lane_sum(ag);
}

// Agreement and activity counts over [b, e) (e - b < 2^31), without writing anything:
// the moment is recomputed exactly as the update pass will compute it.
template <int D>
void counts_t(const CpuTensorArgs& a, int64_t b, int64_t e, float s, int64_t* n_agree,
              int64_t* n_active) {
  using E = Elem<D>;
  const typename E::T* __restrict gp = static_cast<const typename E::T*>(a.g);
  const float* __restrict mp = a.m;
  const StepConsts c = a.c;
  int32_t ca[kLanes] = {}, cb[kLanes] = {};
  int64_t i = b;
  for (; i + kLanes <= e; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float g = grad_in(E::load(gp[i + j]), c) * s;
      const float m = c.beta1 * mp[i + j] + c.one_minus_beta1 * g;
      ca[j] += agrees(m, g);
      cb[j] += active(g);
    }
  }
  for (int j = 0; i < e; ++i, ++j) {
    const float g = grad_in(E::load(gp[i]), c) * s;
    const float m = c.beta1 * mp[i] + c.one_minus_beta1 * g;
    ca[j] += agrees(m, g);
    cb[j] += active(g);
  }
  int64_t sa = 0, sb = 0;
  for (int j = 0; j < kLanes; ++j) {
    sa += ca[j];
    sb += cb[j];
  }
  *n_agree += sa;
  *n_active += sb;
}

// The streaming pass: read W, G, M, V once, write W, M, V once.
template <int D, int CAUTIOUS>
void update_t(const CpuTensorArgs& a, int64_t b, int64_t e, float s, float rho) {
  using E = Elem<D>;
  typename E::T* __restrict wp = static_cast<typename E::T*>(a.w);
  const typename E::T* __restrict gp = static_cast<const typename E::T*>(a.g);
  float* __restrict mp = a.m;
  float* __restrict vp = a.v;
  StepConsts c = a.c;
  c.cautious = CAUTIOUS;
  for (int64_t i = b; i < e; ++i) {
    float m = mp[i], v = vp[i];
    const float w = element_step(E::load(wp[i]), E::load(gp[i]), m, v, s, rho, c);
    mp[i] = m;
    vp[i] = v;
    wp[i] = E::store(w);
  }
}

template <int D>
void update_d(const CpuTensorArgs& a, int64_t b, int64_t e, float s, float rho) {
  if (a.c.cautious)
    update_t<D, 1>(a, b, e, s, rho);
  else
    update_t<D, 0>(a, b, e, s, rho);
}

// Whole units, each stepped while its data is in cache: norms, counts, update.
template <int D>
void units_t(const CpuTensorArgs& a, int64_t ub, int64_t ue) {
  const int64_t L = a.unit_len;
  for (int64_t u = ub; u < ue; ++u) {
    const int64_t b = u * L, e = b + L;
    float s = 1.f;
    if (a.c.clip > 0.f) {
      float w_sq, g_sq;
      norms_t<D>(a, b, e, &w_sq, &g_sq);
      s = clip_factor(w_sq, g_sq, a.c.clip);
    }
    float rho = 1.f;
    if (a.c.cautious) {
      int64_t n_agree = 0, n_active = 0;
      counts_t<D>(a, b, e, s, &n_agree, &n_active);
      rho = rho_floor(n_agree, n_active, 1);
    }
    update_d<D>(a, b, e, s, rho);
  }
}

// Dispatch on the param dtype at the entry points.
#define NEPTUNE_DTYPE_SWITCH(dtype, FN, ...) \
  switch (dtype) {                           \
    case kBF16: FN<kBF16>(__VA_ARGS__); break; \
    case kF16: FN<kF16>(__VA_ARGS__); break;   \
    default: FN<kF32>(__VA_ARGS__); break;     \
  }

void units_entry(const CpuTensorArgs& t, int64_t ub, int64_t ue) {
  NEPTUNE_DTYPE_SWITCH(t.dtype, units_t, t, ub, ue)
}
void norms_entry(const CpuTensorArgs& t, int64_t b, int64_t e, float* w_sq, float* g_sq) {
  NEPTUNE_DTYPE_SWITCH(t.dtype, norms_t, t, b, e, w_sq, g_sq)
}
void counts_entry(const CpuTensorArgs& t, int64_t b, int64_t e, float s, int64_t* n_agree,
                  int64_t* n_active) {
  NEPTUNE_DTYPE_SWITCH(t.dtype, counts_t, t, b, e, s, n_agree, n_active)
}
void update_entry(const CpuTensorArgs& t, int64_t b, int64_t e, float s, float rho) {
  NEPTUNE_DTYPE_SWITCH(t.dtype, update_d, t, b, e, s, rho)
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
