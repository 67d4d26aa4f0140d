// The CUDA kernels and launches of csrc/cuda/kernels.cu, unchanged, compiled by the
// host compiler against the SIMT emulator's CUDA dialect (dialect.h): the CUDA operator's
// whole device side runs on the CPU, for tests (torch.ops.neptune_ext._neptune_step_simt_).
// Built with -ffp-contract=off, as nvcc with --fmad=false.
#define NEPTUNE_SIMT 1

#include <climits>
#include <cmath>
#include <cstring>
#include <vector>

#include "simt/dialect.h"

// Internal to the library that includes it: never confused with the real CUDA build's
// neptune_cuda_step / neptune_cuda_upload when both are loaded.
#pragma GCC visibility push(hidden)
#include "cuda/kernels.cu"
#pragma GCC visibility pop
