// Neptune CPU kernels for the avx2 instruction set (see neptune_step_cpu_kernel.h).
// Headers come before the target pragma so no shared inline code is built for avx2.
#include "neptune_step_cpu.h"
#if defined(__x86_64__)
#include <immintrin.h>
#pragma GCC target("avx2,fma,f16c,bmi2,popcnt")
#define NEPTUNE_CPU_ISA avx2
#define NEPTUNE_CPU_ISA_NAME "avx2"
#define NEPTUNE_CPU_WIDTH 8
#include "neptune_step_cpu_kernel.h"
#else
// Not x86-64: this instruction set does not exist; the dispatcher never selects it.
namespace neptune {
const CpuKernels& cpu_kernels_avx2() { return cpu_kernels_scalar(); }
}  // namespace neptune
#endif
