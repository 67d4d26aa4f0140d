// Neptune CPU kernels for the avx2 instruction set (see cpu/kernel_body.h).
// Only C and intrinsics headers come before the target pragma: everything included after it
// has internal linkage or is always inlined, so no code built for avx2 is shared with callers
// elsewhere (the linker could pick it for a CPU without avx2).
#include <math.h>
#include <stdint.h>
#if defined(__x86_64__)
#include <immintrin.h>
#pragma GCC target("avx2,fma,f16c,bmi2,popcnt")
#define NEPTUNE_CPU_ISA avx2
#define NEPTUNE_CPU_ISA_NAME "avx2"
#define NEPTUNE_CPU_WIDTH 8
#include "cpu/kernels.h"
#include "cpu/kernel_body.h"
#else
// Not x86-64: this instruction set does not exist; the dispatcher never selects it.
#include "cpu/kernels.h"
namespace neptune {
const CpuKernels& cpu_kernels_avx2() { return cpu_kernels_sse2(); }
}  // namespace neptune
#endif
