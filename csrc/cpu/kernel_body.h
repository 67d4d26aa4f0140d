// The CPU memory traversal of one Neptune step, compiled once per kernel set:
// cpu/set_<isa>.cpp sets `#pragma GCC target(...)`, defines NEPTUNE_CPU_ISA and
// includes this file. Everything here has internal linkage so that code compiled for
// AVX-512 can never be picked by the linker for a caller on an older CPU.
// The rule is rule.h's, on floats (the tails) and on vectors (cpu/vec.h); this file only
// walks memory. Build with -ffp-contract=off so every kernel set gives bitwise the same
// result (lane-wise sums, no FMA contraction).

#if !defined(NEPTUNE_CPU_ISA) || !defined(NEPTUNE_CPU_WIDTH)
#error "define NEPTUNE_CPU_ISA (sse2, avx2, avx512, avx512bf16) and NEPTUNE_CPU_WIDTH before including this file"
#endif

#include "cpu/vec.h"

namespace neptune {
namespace {

using VL = Lanes<vf>;

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
// counts_span would give with s = 1): when the unit turns out unclipped, the counts pass is
// saved. `counts` = {n_agree, n_active}, added to. UNIT_G: gmul == 1, so g * gmul == g and
// the multiply is skipped (bitwise the same).
template <int D, int S, int COUNT, int UNIT_G>
void norms_span(const CpuTensorArgs& a, int64_t b, int64_t e, float* w_sq, float* g_sq, int64_t* counts,
                Prefetcher& pf) {
  using E = Elem<D>;
  using St = State<S>;
  const typename E::T* __restrict w = static_cast<const typename E::T*>(a.w);
  const typename E::T* __restrict g = static_cast<const typename E::T*>(a.g);
  const typename St::T* __restrict mp = static_cast<const typename St::T*>(a.m);
  const StepConsts c = a.c;
  vf aw[kRegs] = {}, ag[kRegs] = {};
  int64_t sa = 0, sb = 0;
  int64_t i = b;
  for (; i + kLanes <= e; i += kLanes) {
    pf.advance(i - b);
    for (int r = 0; r < kRegs; ++r) {
      const vf x = VLoad<D>::load(w + i + r * kWidth);
      const vf y = UNIT_G ? VLoad<D>::load(g + i + r * kWidth) : grad_in(VLoad<D>::load(g + i + r * kWidth), c);
      aw[r] += x * x;
      ag[r] += y * y;
      if (COUNT) {
        const vf m = exp_avg_next(St::vload(mp + i + r * kWidth), y, c);
        sa += VL::count(agrees(m, y));
        sb += VL::count(active(y));
      }
    }
  }
  float lw[kLanes], lg[kLanes];
  __builtin_memcpy(lw, aw, sizeof(lw));
  __builtin_memcpy(lg, ag, sizeof(lg));
  for (int j = 0; i < e; ++i, ++j) {
    const float x = E::load(w[i]);
    const float y = grad_in(E::load(g[i]), c);
    lw[j] += x * x;
    lg[j] += y * y;
    if (COUNT) {
      const float m = exp_avg_next(St::load(mp + i), y, c);
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
void counts_span(const CpuTensorArgs& a, int64_t b, int64_t e, float s, int64_t* n_agree, int64_t* n_active,
                 Prefetcher& pf) {
  using E = Elem<D>;
  using St = State<S>;
  const typename E::T* __restrict gp = static_cast<const typename E::T*>(a.g);
  const typename St::T* __restrict mp = static_cast<const typename St::T*>(a.m);
  const StepConsts c = a.c;
  int64_t sa = 0, sb = 0;
  int64_t i = b;
  for (; i + kWidth <= e; i += kWidth) {
    pf.advance(i - b);
    const vf g = unit_grad(VLoad<D>::load(gp + i), s, c);
    const vf m = exp_avg_next(St::vload(mp + i), g, c);
    sa += VL::count(agrees(m, g));
    sb += VL::count(active(g));
  }
  for (; i < e; ++i) {
    const float g = unit_grad(E::load(gp[i]), s, c);
    const float m = exp_avg_next(St::load(mp + i), g, c);
    sa += agrees(m, g);
    sb += active(g);
  }
  *n_agree += sa;
  *n_active += sb;
  pf.flush();
}

// The streaming pass: read W, G, M, V once, write W, M, V once; rule.h's element_step on
// vectors, then on the tail's floats. CAUTIOUS and UNIT_G fixed at compile time
// (UNIT_G: gmul == 1 and s == 1, so the gradient is used as stored, bitwise the same).
// ubase is the first element of the unit: stochastic-rounding bits are keyed by the index
// within the unit, so a row shard stepped alone rounds as the whole tensor does
// (docs/rule.md, property 5).
template <int D, int S, int CAUTIOUS, int UNIT_G>
void update_span(const CpuTensorArgs& a, int64_t b, int64_t e, int64_t ubase, float s, float rho, Prefetcher& pf) {
  using E = Elem<D>;
  using St = State<S>;
  typename E::T* __restrict wp = static_cast<typename E::T*>(a.w);
  const typename E::T* __restrict gp = static_cast<const typename E::T*>(a.g);
  typename St::T* __restrict mp = static_cast<typename St::T*>(a.m);
  typename St::T* __restrict vp = static_cast<typename St::T*>(a.v);
  const uint32_t sr = a.sr_step;
  StepConsts c = a.c;
  c.cautious = CAUTIOUS;  // a constant inside element_step
  const float step = unit_step_size(c, rho);
  int64_t i = b;
  for (; i + kWidth <= e; i += kWidth) {
    pf.advance(i - b);
    const vf g = UNIT_G ? VLoad<D>::load(gp + i) : unit_grad(VLoad<D>::load(gp + i), s, c);
    vf m = St::vload(mp + i);
    vf v = St::vload(vp + i);
    const vf w = element_step(VLoad<D>::load(wp + i), g, m, v, step, c);
    St::vstore2(mp + i, vp + i, i - ubase, m, v, sr);
    VStore<D>::store(wp + i, w);
  }
  for (; i < e; ++i) {
    float m = St::load(mp + i), v = St::load(vp + i);
    const float w = element_step(E::load(wp[i]), unit_grad(E::load(gp[i]), s, c), m, v, step, c);
    St::store2(mp + i, vp + i, i - ubase, m, v, sr);
    wp[i] = E::store(w);
  }
  pf.flush();
}

// update_span with CAUTIOUS and UNIT_G picked at run time.
template <int D, int S>
void update_span_any(const CpuTensorArgs& a, int64_t b, int64_t e, int64_t ubase, float s, float rho,
                     Prefetcher& pf) {
  const bool unit_g = a.c.gmul == 1.f && s == 1.f;
  if (a.c.cautious)
    unit_g ? update_span<D, S, 1, 1>(a, b, e, ubase, s, rho, pf) : update_span<D, S, 1, 0>(a, b, e, ubase, s, rho, pf);
  else
    unit_g ? update_span<D, S, 0, 1>(a, b, e, ubase, s, rho, pf) : update_span<D, S, 0, 0>(a, b, e, ubase, s, rho, pf);
}

// norms_span with UNIT_G picked at run time.
template <int D, int S, int COUNT>
void norms_span_any(const CpuTensorArgs& a, int64_t b, int64_t e, float* w_sq, float* g_sq, int64_t* counts,
                    Prefetcher& pf) {
  if (a.c.gmul == 1.f)
    norms_span<D, S, COUNT, 1>(a, b, e, w_sq, g_sq, counts, pf);
  else
    norms_span<D, S, COUNT, 0>(a, b, e, w_sq, g_sq, counts, pf);
}

// Whole units, each stepped while its data is in cache: norms, counts, update, while
// the next unit is prefetched (the following one in this tensor, or `after`: the first
// unit of the thread's next task, often in another tensor, where the hardware
// prefetchers lose the stream anyway).
template <int D, int S>
void step_units(const CpuTensorArgs& a, int64_t ub, int64_t ue, const CpuTensorArgs* after, int64_t after_unit) {
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
        norms_span_any<D, S, 1>(a, b, e, &w_sq, &g_sq, counts, pf);
      } else {
        norms_span_any<D, S, 0>(a, b, e, &w_sq, &g_sq, counts, pf);
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
        counts_span<D, S>(a, b, e, s, &counts[0], &counts[1], pf);
      }
      rho = rho_floor(counts[0], counts[1], 1);
    }
    pf.slice(cut[k], cut[passes], (float)(cut[passes] - cut[k]) * inv_len);  // what is left
    update_span_any<D, S>(a, b, e, b, s, rho, pf);
  }
}

// The kernel set's entry points (CpuKernels): the param and state dtypes picked at run time.
// fn(DS{}) runs with DS::D, DS::S the tensor's param and state dtypes.
template <int D_, int S_> struct Dtypes {
  static constexpr int D = D_, S = S_;
};
template <class Fn>
void with_dtypes(const CpuTensorArgs& t, Fn&& fn) {
  switch (t.dtype * 2 + (t.state_dtype == kBF16 ? 1 : 0)) {
    case kBF16 * 2: fn(Dtypes<kBF16, kF32>{}); break;
    case kBF16 * 2 + 1: fn(Dtypes<kBF16, kBF16>{}); break;
    case kF16 * 2: fn(Dtypes<kF16, kF32>{}); break;
    case kF16 * 2 + 1: fn(Dtypes<kF16, kBF16>{}); break;
    case kF32 * 2 + 1: fn(Dtypes<kF32, kBF16>{}); break;
    default: fn(Dtypes<kF32, kF32>{}); break;
  }
}

void units_entry(const CpuTensorArgs& t, int64_t ub, int64_t ue, const CpuTensorArgs* after, int64_t after_unit) {
  with_dtypes(t, [&](auto ds) { step_units<decltype(ds)::D, decltype(ds)::S>(t, ub, ue, after, after_unit); });
}
// Pieces of long units: no prefetching (long units stream by themselves).
void norms_entry(const CpuTensorArgs& t, int64_t b, int64_t e, float* w_sq, float* g_sq, int64_t* counts) {
  with_dtypes(t, [&](auto ds) {
    Prefetcher none;
    int64_t unused[2];
    if (counts != nullptr)
      norms_span_any<decltype(ds)::D, decltype(ds)::S, 1>(t, b, e, w_sq, g_sq, counts, none);
    else
      norms_span_any<decltype(ds)::D, decltype(ds)::S, 0>(t, b, e, w_sq, g_sq, unused, none);
  });
}
void counts_entry(const CpuTensorArgs& t, int64_t b, int64_t e, float s, int64_t* n_agree, int64_t* n_active) {
  with_dtypes(t, [&](auto ds) {
    Prefetcher none;
    counts_span<decltype(ds)::D, decltype(ds)::S>(t, b, e, s, n_agree, n_active, none);
  });
}
void update_entry(const CpuTensorArgs& t, int64_t b, int64_t e, float s, float rho) {
  with_dtypes(t, [&](auto ds) {
    Prefetcher none;
    update_span_any<decltype(ds)::D, decltype(ds)::S>(t, b, e, b - b % t.unit_len, s, rho, none);
  });
}

}  // namespace

#define NEPTUNE_CAT2(a, b) a##b
#define NEPTUNE_CAT(a, b) NEPTUNE_CAT2(a, b)
const CpuKernels& NEPTUNE_CAT(cpu_kernels_, NEPTUNE_CPU_ISA)() {
  static const CpuKernels k = {NEPTUNE_CPU_ISA_NAME, units_entry, norms_entry, counts_entry, update_entry};
  return k;
}

}  // namespace neptune
