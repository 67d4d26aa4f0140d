// CPU probe: where the time of one Neptune step goes on this machine, without torch.
// Links the real per-ISA kernels (csrc/cpu/set_<isa>.cpp) and times, on one thread:
//   1. each pass with its data in L2 (compute cost per element, best of the repetitions),
//      and (1b) the same for 16-bit params and the bf16 state;
//   2. the same kernels streaming from DRAM, units of one length over 100 MB arrays:
//      one pass (clip 0, no mask: AdamW) against Neptune's look-then-update per unit;
//   3. the same two memory patterns with trivial arithmetic, to separate the cost of the
//      access pattern from the cost of the math;
//   4. reading 1, 3 or 4 of the arrays, or reading and writing them: one core's time goes
//      with the lines it reads, the write-backs come free.
// Build and run with bench/cpu_probe.sh. Numbers are medians of interleaved repetitions.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "cpu/kernels.h"

using namespace neptune;

namespace {

// Arrays offset from each other by a few cache lines, as separate torch tensors are.
float* alloc_floats(int64_t n, int k) {
  // aligned_alloc wants a size that is a multiple of the alignment (C11; ASan's allocator
  // refuses any other size).
  const size_t bytes = ((size_t)n * 4 + 8192 + 4095) / 4096 * 4096;
  char* p = static_cast<char*>(aligned_alloc(4096, bytes));
  if (p == nullptr) {
    std::fprintf(stderr, "cpu_probe: cannot allocate %zu bytes\n", bytes);
    std::exit(1);
  }
  float* f = reinterpret_cast<float*>(p + 64 * (k + 1));
  std::memset(f, 0, (size_t)n * 4);
  return f;
}

struct Arrays {
  int64_t n;
  float *w, *g, *m, *v;
  explicit Arrays(int64_t n_) : n(n_) {
    w = alloc_floats(n, 0);
    g = alloc_floats(n, 1);
    m = alloc_floats(n, 2);
    v = alloc_floats(n, 3);
    std::mt19937 rng(0);
    std::normal_distribution<float> nd;
    for (int64_t i = 0; i < n; ++i) {
      w[i] = 0.05f * nd(rng);
      g[i] = 1e-3f * nd(rng);
      m[i] = 1e-4f * nd(rng);
      v[i] = 1e-6f * std::fabs(nd(rng)) + 1e-12f;
    }
  }
};

// Converts the arrays in place to params of `dtype` and state of `state_dtype` (a 16-bit
// array fills the first half of its buffer; forward, so no float is overwritten unread).
uint16_t to_16(float f, int dtype) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return dtype == kF16 ? (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT) : (uint16_t)(u >> 16);
}
void convert(Arrays& a, int dtype, int state_dtype) {
  const auto conv = [&](float* p, int d) {
    if (d == kF32) return;
    uint16_t* h = reinterpret_cast<uint16_t*>(p);
    for (int64_t i = 0; i < a.n; ++i) h[i] = to_16(p[i], d);
  };
  conv(a.w, dtype);
  conv(a.g, dtype);
  conv(a.m, state_dtype);
  conv(a.v, state_dtype);
}

CpuTensorArgs tensor_args(const Arrays& a, int64_t unit_len, float clip, int cautious, int dtype = kF32,
                          int state_dtype = kF32) {
  CpuTensorArgs t{};
  t.w = a.w;
  t.g = a.g;
  t.m = a.m;
  t.v = a.v;
  t.numel = a.n;
  t.unit_len = unit_len;
  t.dtype = dtype;
  t.state_dtype = state_dtype;
  t.sr_step = 10;
  // lr tiny: the weights barely move however long the probe runs
  t.c = step_consts(/*lr=*/1e-9, /*beta1=*/0.9, /*beta2=*/0.999, /*weight_decay=*/0.0, /*eps=*/1e-8, clip, cautious,
                    /*t=*/10.0, /*gmul=*/1.f);
  return t;
}

// Medians (or minima: best case, for in-cache compute) in ns per element of interleaved
// repetitions of each function.
std::vector<double> interleaved(const std::vector<std::function<void()>>& fns, int64_t elems, int reps,
                                bool minimum = false) {
  std::vector<std::vector<double>> t(fns.size());
  for (auto& f : fns) f();  // warm
  for (int r = 0; r < reps; ++r)
    for (size_t k = 0; k < fns.size(); ++k) {
      const auto t0 = std::chrono::steady_clock::now();
      fns[k]();
      const auto t1 = std::chrono::steady_clock::now();
      t[k].push_back(std::chrono::duration<double, std::nano>(t1 - t0).count() / (double)elems);
    }
  std::vector<double> med;
  for (auto& x : t) {
    std::sort(x.begin(), x.end());
    med.push_back(minimum ? x[0] : x[x.size() / 2]);
  }
  return med;
}

// In-cache timings: each repetition runs `f` kInCacheReps times over the same arrays.
constexpr int kInCacheReps = 200;
std::function<void()> rep(std::function<void()> f) {
  return [f] {
    for (int i = 0; i < kInCacheReps; ++i) f();
  };
}

// Whole-unit stepping of a tensor as the operator does on one thread.
void step_units(const CpuKernels& k, const CpuTensorArgs& t) {
  const int64_t per_task = std::max<int64_t>(1, (1 << 18) / t.unit_len), units = t.numel / t.unit_len;
  for (int64_t u = 0; u < units; u += per_task) {
    const int64_t ue = std::min(u + per_task, units);
    k.units(t, u, ue, ue < units ? &t : nullptr, ue);
  }
}

// 3. Trivial arithmetic, the two access patterns: one read-modify-write pass, or per unit
// a read of W, G, M and then the read-modify-write.
float g_sink = 0.f;
void rmw(const Arrays& a, int64_t b, int64_t e) {
  float* __restrict w = a.w;
  const float* __restrict g = a.g;
  float* __restrict m = a.m;
  float* __restrict v = a.v;
  for (int64_t i = b; i < e; ++i) {
    const float mi = m[i] * 0.5f + g[i], vi = v[i] * 0.5f + g[i] * g[i];
    m[i] = mi;
    v[i] = vi;
    w[i] -= mi * 1e-9f;
  }
}
float look(const Arrays& a, int64_t b, int64_t e) {
  const float* __restrict w = a.w;
  const float* __restrict g = a.g;
  const float* __restrict m = a.m;
  float acc[16] = {};  // 16 fixed lanes: vectorizes without reassociating a float sum
  int64_t i = b;
  for (; i + 16 <= e; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += w[i + j] * g[i + j] + m[i + j];
  for (int j = 0; i < e; ++i, ++j) acc[j] += w[i] * g[i] + m[i];
  float s = 0.f;
  for (float x : acc) s += x;
  return s;
}

// 4. Reading k of the arrays, or reading and writing them back: what one core's time per
// element is made of (16 fixed lanes so the sums vectorize).
float read_streams(const Arrays& a, int k) {
  const float* p[4] = {a.w, a.g, a.m, a.v};
  float acc[16] = {};
  for (int64_t i = 0; i + 16 <= a.n; i += 16)
    for (int s = 0; s < k; ++s)
      for (int j = 0; j < 16; ++j) acc[j] += p[s][i + j];
  float t = 0.f;
  for (float x : acc) t += x;
  return t;
}
void scale_streams(const Arrays& a, int k) {
  float* __restrict w = a.w;
  float* __restrict m = a.m;
  float* __restrict v = a.v;
  if (k == 1)
    for (int64_t i = 0; i < a.n; ++i) v[i] *= 0.5f;
  else
    for (int64_t i = 0; i < a.n; ++i) {
      w[i] *= 0.5f;
      m[i] *= 0.5f;
      v[i] *= 0.5f;
    }
}

}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 15;
  const bool quick = argc > 2 && std::string(argv[2]) == "quick";  // smoke test: small arrays
  // NEPTUNE_CPU_ISA=sse2|avx2|avx512|avx512bf16 probes that kernel set (this CPU must run it);
  // unset: the best one.
  const char* want = std::getenv("NEPTUNE_CPU_ISA");
  const std::string w = want ? want : "";
  const CpuKernels& k = w == "sse2" ? cpu_kernels_sse2() : w == "avx2" ? cpu_kernels_avx2() : w == "avx512" ? cpu_kernels_avx512()
                        : w == "avx512bf16" ? cpu_kernels_avx512bf16() : cpu_kernels_best();
  std::printf("kernels: %s, one thread\n\n", k.isa);

  std::printf("1. in L2 (8 units), ns per element, best of the repetitions\n");
  std::printf("%8s %8s %12s %8s %8s %12s %12s\n", "unit", "norms", "norms+count", "counts", "update", "units-adamw",
              "units-neptune");
  for (int64_t L : {576, 2304, 4608}) {
    Arrays a(8 * L);
    const CpuTensorArgs nep = tensor_args(a, L, 0.1f, 1), adamw = tensor_args(a, L, 0.f, 0);
    float wq, gq;
    int64_t cnt[2];
    const auto med = interleaved(
        {rep([&] { k.norms(nep, 0, a.n, &wq, &gq, nullptr); }),
         rep([&] { k.norms(nep, 0, a.n, &wq, &gq, cnt); }),
         rep([&] { k.counts(nep, 0, a.n, 0.5f, &cnt[0], &cnt[1]); }),
         rep([&] { k.update(nep, 0, a.n, 1.f, 0.5f); }),
         rep([&] { k.units(adamw, 0, 8, nullptr, 0); }),
         rep([&] { k.units(nep, 0, 8, nullptr, 0); })},
        kInCacheReps * a.n, reps, /*minimum=*/true);
    std::printf("%8lld %8.3f %12.3f %8.3f %8.3f %12.3f %12.3f\n", (long long)L, med[0], med[1], med[2], med[3], med[4],
                med[5]);
  }

  std::printf("\n1b. in L2 by param / state dtype (8 units of 2304), ns per element, best of the repetitions\n");
  std::printf("%-12s %12s %8s %14s\n", "param/state", "norms+count", "update", "units-neptune");
  {
    const int64_t L = 2304;
    const struct {
      const char* name;
      int dtype, state_dtype;
    } kinds[] = {{"fp32/fp32", kF32, kF32}, {"bf16/fp32", kBF16, kF32}, {"fp16/fp32", kF16, kF32},
                 {"fp32/bf16", kF32, kBF16}, {"bf16/bf16", kBF16, kBF16}};
    for (const auto& kd : kinds) {
      Arrays a(8 * L);
      convert(a, kd.dtype, kd.state_dtype);
      const CpuTensorArgs nep = tensor_args(a, L, 0.1f, 1, kd.dtype, kd.state_dtype);
      float wq, gq;
      int64_t cnt[2];
      const auto med = interleaved({rep([&] { k.norms(nep, 0, a.n, &wq, &gq, cnt); }),
                                    rep([&] { k.update(nep, 0, a.n, 1.f, 0.5f); }),
                                    rep([&] { k.units(nep, 0, 8, nullptr, 0); })},
                                   kInCacheReps * a.n, reps, /*minimum=*/true);
      std::printf("%-12s %12.3f %8.3f %14.3f\n", kd.name, med[0], med[1], med[2]);
    }
  }

  const int64_t n = quick ? (1 << 22) : (25 << 20);
  std::printf("\n2-3. streaming from DRAM (%lld MB per array), ns per element, medians\n", (long long)(n * 4 >> 20));
  std::printf("%8s %12s %14s %7s %14s %14s %7s\n", "unit", "kernel-1pass", "kernel-neptune", "ratio", "trivial-1pass",
              "trivial-2pass", "ratio");
  Arrays a(n);
  for (int64_t L : {256, 576, 1024, 2304, 4608}) {
    const int64_t nl = n / L * L;
    const CpuTensorArgs nep = tensor_args(a, L, 0.1f, 1), adamw = tensor_args(a, L, 0.f, 0);
    CpuTensorArgs nep_l = nep, adamw_l = adamw;
    nep_l.numel = adamw_l.numel = nl;
    const auto med = interleaved({[&] { step_units(k, adamw_l); }, [&] { step_units(k, nep_l); },
                                  [&] { rmw(a, 0, nl); },
                                  [&] {
                                    for (int64_t u = 0; u < nl; u += L) {
                                      g_sink += look(a, u, u + L);
                                      rmw(a, u, u + L);
                                    }
                                  }},
                                 nl, reps);
    std::printf("%8lld %12.3f %14.3f %7.2f %14.3f %14.3f %7.2f\n", (long long)L, med[0], med[1], med[1] / med[0], med[2],
                med[3], med[3] / med[2]);
  }

  std::printf("\n4. one core on the same arrays, ns per element, medians\n");
  {
    const auto med = interleaved({[&] { g_sink += read_streams(a, 1); }, [&] { g_sink += read_streams(a, 3); },
                                  [&] { g_sink += read_streams(a, 4); }, [&] { scale_streams(a, 1); },
                                  [&] { scale_streams(a, 3); }},
                                 a.n, reps);
    std::printf("read 1 array %.3f, read 3 %.3f, read 4 %.3f; read+write 1 %.3f, read+write 3 %.3f\n", med[0], med[1],
                med[2], med[3], med[4]);
  }
  return g_sink == 12345.f;  // keep the looks alive
}
