// Neptune CPU kernels for the avx2 instruction set (see cpu/kernel_body.h).
// Headers come before the target pragma so no shared inline code is built for avx2.
#include "cpu/kernels.h"
#if defined(__x86_64__)
#include <immintrin.h>
#pragma GCC target("avx2,fma,f16c,bmi2,popcnt")
#define NEPTUNE_CPU_ISA avx2
#define NEPTUNE_CPU_ISA_NAME "avx2"
#define NEPTUNE_CPU_WIDTH 8
#include "cpu/kernel_body.h"
#else
// Not x86-64: this instruction set does not exist; the dispatcher never selects it.
namespace neptune {
const CpuKernels& cpu_kernels_avx2() { return cpu_kernels_sse2(); }
}  // namespace neptune
#endif
