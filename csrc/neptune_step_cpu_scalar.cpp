// Neptune CPU kernels for any CPU: SSE2 on x86-64 (see neptune_step_cpu_kernel.h).
#include "neptune_step_cpu.h"
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#define NEPTUNE_CPU_ISA scalar
#define NEPTUNE_CPU_ISA_NAME "scalar"
#define NEPTUNE_CPU_WIDTH 4
#include "neptune_step_cpu_kernel.h"
