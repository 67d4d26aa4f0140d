// Neptune CPU kernels for the scalar instruction set (see neptune_step_cpu_kernel.h).
// Headers come before the target pragma so no shared inline code is built for scalar.
#include "neptune_step_cpu.h"

#define NEPTUNE_CPU_ISA scalar
#define NEPTUNE_CPU_ISA_NAME "scalar"
#include "neptune_step_cpu_kernel.h"
