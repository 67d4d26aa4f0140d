// Every float through the vector 16-bit stores of the avx512bf16 kernel set (the
// hardware conversions, F16C and AVX512-BF16, with their NaN / denormal fallbacks)
// against rule.h's software conversions, which the sse2 kernel set and the tails use; every half
// through the F16C load. Default MXCSR, then DAZ|FTZ (torch.set_flush_denormal(True)).
// Built and run by test_16bit_conversions.py; prints the mismatch counts, exits 1 on any.
#include <math.h>
#include <stdint.h>
#include <immintrin.h>
#include <cstdio>
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi2,popcnt,prefer-vector-width=512")
#define NEPTUNE_CPU_ISA conversions_check
#define NEPTUNE_CPU_ISA_NAME "conversions_check"
#define NEPTUNE_CPU_WIDTH 16
#define NEPTUNE_CPU_AVX512BF16 1
#include "cpu/kernels.h"
#include "cpu/kernel_body.h"

namespace neptune {
namespace {
template <int D>
uint64_t store_mismatches(uint64_t stride) {
  uint64_t bad = 0;
  for (uint64_t base = 0; base < (1ull << 32); base += 16 * stride) {
    vu x;
    for (int j = 0; j < 16; ++j) x[j] = (uint32_t)(base + j);
    uint16_t out[16];
    VStore<D>::store(out, (vf)x);
    for (int j = 0; j < 16; ++j) bad += out[j] != Elem<D>::store(Lanes<float>::value(x[j]));
  }
  return bad;
}
uint64_t f16_load_mismatches() {
  uint64_t bad = 0;
  for (uint32_t base = 0; base < 65536; base += 16) {
    uint16_t h[16];
    for (int j = 0; j < 16; ++j) h[j] = (uint16_t)(base + j);
    const vf f = VLoad<kF16>::load(h);
    for (int j = 0; j < 16; ++j) bad += Lanes<float>::bits(f[j]) != Lanes<float>::bits(Elem<kF16>::load(h[j]));
  }
  return bad;
}
}  // namespace
}  // namespace neptune

int main() {
  using namespace neptune;
  if (!cpu_has_avx512bf16() || !cpu_has_avx2()) {
    std::printf("SKIP: this CPU lacks AVX512-BF16\n");
    return 0;
  }
  uint64_t total = 0;
  for (int flush = 0; flush < 2; ++flush) {
    _mm_setcsr(flush ? (_mm_getcsr() | 0x8040u) : (_mm_getcsr() & ~0x8040u));
    const uint64_t stride = flush ? 7 : 1;  // every float, then every 7th block of 16
    const uint64_t bf = store_mismatches<kBF16>(stride), h = store_mismatches<kF16>(stride),
                   l = f16_load_mismatches();
    std::printf("%s: bf16 store %llu, fp16 store %llu, fp16 load %llu mismatches\n",
                flush ? "DAZ|FTZ" : "default", (unsigned long long)bf, (unsigned long long)h, (unsigned long long)l);
    total += bf + h + l;
  }
  return total != 0;
}
