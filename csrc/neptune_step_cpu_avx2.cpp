// Neptune CPU kernels for the avx2 instruction set (see neptune_step_cpu_kernel.h).
// Headers come before the target pragma so no shared inline code is built for avx2.
#include "neptune_step_cpu.h"
#pragma GCC target("avx2,fma,f16c,bmi2")
#define NEPTUNE_CPU_ISA avx2
#define NEPTUNE_CPU_ISA_NAME "avx2"
#include "neptune_step_cpu_kernel.h"
