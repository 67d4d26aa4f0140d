// Neptune CPU kernels for AVX-512 with AVX512-BF16 (see cpu/kernel_body.h): the
// avx512 set, with bf16 params stored by the hardware conversion.
// Headers come before the target pragma so no shared inline code is built for it.
#include "cpu/kernels.h"
#if defined(__x86_64__)
#include <immintrin.h>
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi2,popcnt,prefer-vector-width=512")
#define NEPTUNE_CPU_ISA avx512bf16
#define NEPTUNE_CPU_ISA_NAME "avx512bf16"
#define NEPTUNE_CPU_WIDTH 16
#define NEPTUNE_CPU_AVX512BF16 1
#include "cpu/kernel_body.h"
#else
// Not x86-64: this instruction set does not exist; the dispatcher never selects it.
namespace neptune {
const CpuKernels& cpu_kernels_avx512bf16() { return cpu_kernels_sse2(); }
}  // namespace neptune
#endif
