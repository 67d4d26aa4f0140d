// Kernels written to be wrong, one per kind of bug the SIMT emulator must catch
// (tests/test_simt_emulator.py runs each by name and checks the report). Prints
// "OK <hash of the output>" or "ERROR <the emulator's message>".
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "simt/dialect.h"

namespace {

constexpr int kN = 256;
float g_out[4 * kN];

__global__ void shfl_after_exit(float* out) {  // lanes past 16 return before the shuffle
  const int lane = threadIdx.x % 32;
  if (lane >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

__global__ void shfl_absent_lanes(float* out) {  // launched with 48 threads: warp 1 has 16
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (float)threadIdx.x, 16);
}

__global__ void shfl_outside_mask(float* out) {  // lane 3 reads lane 19, not in the mask
  const unsigned lane = threadIdx.x % 32;
  if (lane < 16) out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, (float)lane, lane == 3 ? 16 : 1);
}

__global__ void shfl_not_in_own_mask(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.f, 1);  // lanes 16-31 are not in the mask
}

__global__ void barrier_after_exit(float* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

__global__ void different_barriers(float* out) {
  if (threadIdx.x < 64) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

__device__ __forceinline__ void sync_here() { __syncthreads(); }
__global__ void same_line_other_copy(float* out) {  // one source line, two inlined copies
  if (threadIdx.x < 64)
    sync_here();
  else
    sync_here();
  out[threadIdx.x] = 1.f;
}

__global__ void shuffle_meets_barrier(float* out) {  // half a warp at a barrier
  float x = 1.f;
  if (threadIdx.x % 32 < 16) __syncthreads();
  else x = __shfl_xor_sync(0xffffffffu, x, 1);
  out[threadIdx.x] = x;
}

__global__ void misaligned_vector(float* out) {
  const float4 q = reinterpret_cast<const float4*>(out + 1)[threadIdx.x];
  out[threadIdx.x] = q.x;
}

__global__ void shared_read_before_write(float* out) {  // reads a slot no thread wrote
  NEPTUNE_SHARED(float, buf, kN);
  buf[threadIdx.x] = (float)threadIdx.x;
  __syncthreads();
  out[blockIdx.x * kN + threadIdx.x] = buf[(threadIdx.x + 1) % kN] + (threadIdx.x == 0 ? buf[kN - 1] * 0.f : 0.f);
}

__global__ void shared_missing_barrier(float* out) {  // a write and a read of another thread's slot, unsynchronised
  NEPTUNE_SHARED(float, buf, kN);
  buf[threadIdx.x] = (float)(blockIdx.x * kN + threadIdx.x);
  out[blockIdx.x * kN + threadIdx.x] = buf[kN - 1 - threadIdx.x];
}

__global__ void blocks_race(float* out) {  // block b reads what block b + 1 writes in the same launch
  out[blockIdx.x * kN + threadIdx.x] = (float)blockIdx.x;
  if (blockIdx.x + 1 < gridDim.x) out[blockIdx.x * kN + threadIdx.x] += out[(blockIdx.x + 1) * kN + threadIdx.x];
}

__global__ void correct_reduction(float* out) {  // a clean block sum: every schedule agrees
  NEPTUNE_SHARED(float, part, 8);
  float x = (float)(blockIdx.x * kN + threadIdx.x) * 0.1f;
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = x;
  __syncthreads();
  float s = 0.f;
  for (int k = 0; k < 8; ++k) s += part[k];
  out[blockIdx.x * kN + threadIdx.x] = s;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return 2;
  const std::string k = argv[1];
  simt::ScheduleScope order(atoi(argv[2]));
  for (float& f : g_out) f = -1.f;
  float* out = reinterpret_cast<float*>(((uintptr_t)g_out + 15) & ~(uintptr_t)15);
  try {
    if (k == "shfl_after_exit") NEPTUNE_LAUNCH(shfl_after_exit, 1, 64, nullptr, out);
    else if (k == "shfl_absent_lanes") NEPTUNE_LAUNCH(shfl_absent_lanes, 1, 48, nullptr, out);
    else if (k == "shfl_outside_mask") NEPTUNE_LAUNCH(shfl_outside_mask, 1, 32, nullptr, out);
    else if (k == "shfl_not_in_own_mask") NEPTUNE_LAUNCH(shfl_not_in_own_mask, 1, 32, nullptr, out);
    else if (k == "barrier_after_exit") NEPTUNE_LAUNCH(barrier_after_exit, 1, 128, nullptr, out);
    else if (k == "different_barriers") NEPTUNE_LAUNCH(different_barriers, 1, 128, nullptr, out);
    else if (k == "same_line_other_copy") NEPTUNE_LAUNCH(same_line_other_copy, 1, 128, nullptr, out);
    else if (k == "shuffle_meets_barrier") NEPTUNE_LAUNCH(shuffle_meets_barrier, 1, 32, nullptr, out);
    else if (k == "misaligned_vector") NEPTUNE_LAUNCH(misaligned_vector, 1, 32, nullptr, out);
    else if (k == "shared_read_before_write") NEPTUNE_LAUNCH(shared_read_before_write, 2, 255, nullptr, out);
    else if (k == "shared_missing_barrier") NEPTUNE_LAUNCH(shared_missing_barrier, 2, kN, nullptr, out);
    else if (k == "blocks_race") NEPTUNE_LAUNCH(blocks_race, 4, kN, nullptr, out);
    else if (k == "correct_reduction") NEPTUNE_LAUNCH(correct_reduction, 4, kN, nullptr, out);
    else if (k == "bad_config") NEPTUNE_LAUNCH(correct_reduction, 1, 2048, nullptr, out);
    else return 2;
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
      printf("ERROR launch: %s\n", cudaGetErrorName(err));
      return 3;
    }
  } catch (const std::exception& e) {
    printf("ERROR %s\n", e.what());
    return 3;
  }
  uint64_t h = 1469598103934665603ull;
  const unsigned char* b = reinterpret_cast<const unsigned char*>(out);
  for (size_t i = 0; i < 4 * kN * sizeof(float) - 16; ++i) h = (h ^ b[i]) * 1099511628211ull;
  int nans = 0;
  for (int i = 0; i < 4 * kN - 4; ++i) nans += std::isnan(out[i]);
  printf("OK %016llx nans=%d\n", (unsigned long long)h, nans);
  return 0;
}
