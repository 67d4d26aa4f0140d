// Neptune CPU kernels for the avx512 instruction set (see neptune_step_cpu_kernel.h).
// Headers come before the target pragma so no shared inline code is built for avx512.
#include "neptune_step_cpu.h"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2,prefer-vector-width=512")
#define NEPTUNE_CPU_ISA avx512
#define NEPTUNE_CPU_ISA_NAME "avx512"
#include "neptune_step_cpu_kernel.h"
