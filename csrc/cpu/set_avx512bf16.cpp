// Neptune CPU kernels for AVX-512 with AVX512-BF16 (see cpu/kernel_body.h): the
// avx512 set, with bf16 params stored by the hardware conversion.
// Only C and intrinsics headers come before the target pragma: everything included after it
// has internal linkage or is always inlined, so no code built for avx512bf16 is shared with callers
// elsewhere (the linker could pick it for a CPU without avx512bf16).
#include <math.h>
#include <stdint.h>
#if defined(__x86_64__)
#include <immintrin.h>
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi2,popcnt,prefer-vector-width=512")
#define NEPTUNE_CPU_ISA avx512bf16
#define NEPTUNE_CPU_ISA_NAME "avx512bf16"
#define NEPTUNE_CPU_WIDTH 16
#define NEPTUNE_CPU_AVX512BF16 1
#include "cpu/kernels.h"
#include "cpu/kernel_body.h"
#else
// Not x86-64: this instruction set does not exist; the dispatcher never selects it.
#include "cpu/kernels.h"
namespace neptune {
const CpuKernels& cpu_kernels_avx512bf16() { return cpu_kernels_sse2(); }
}  // namespace neptune
#endif
