// Neptune CPU kernels for any CPU: SSE2 on x86-64, 4-wide vectors (generic vectors elsewhere;
// see cpu/kernel_body.h). The baseline of x86-64: no target pragma.
#include "cpu/kernels.h"
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#define NEPTUNE_CPU_ISA sse2
#define NEPTUNE_CPU_ISA_NAME "sse2"
#define NEPTUNE_CPU_WIDTH 4
#include "cpu/kernel_body.h"
