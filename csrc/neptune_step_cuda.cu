// CUDA kernels of neptune_ext::neptune_step_ (placeholder until the CUDA kernel lands).
// Torch-free on purpose: only cuda_runtime.h, so each architecture compiles in seconds.
#include <cuda_runtime.h>

#include "neptune_math.h"

namespace neptune {
__global__ void noop_kernel() {}
cudaError_t cuda_probe(cudaStream_t stream) {
  noop_kernel<<<1, 1, 0, stream>>>();
  return cudaGetLastError();
}
}  // namespace neptune
