// Kernels for the SIMT emulator under AddressSanitizer (tests/test_simt_asan.py), each run
// by name; prints "OK" when it ran through. Built with -fsanitize=address: the emulator's
// fiber switches must be announced to ASan (csrc/simt/scheduler.cpp), or
//  - after_throw: a kernel that throws while other threads wait inside frames with
//    poisoned redzones leaves them on the fiber stacks, and the next kernel's locals there
//    are reported as a stack-buffer-underflow that is not one;
//  - stack_overflow: a real overflow of a local in a kernel is reported, but its address
//    is "a wild pointer", with no frame and no variable named.
#include <cstdio>
#include <stdexcept>
#include <string>

#include "simt/dialect.h"

namespace {

float g_out[256];

__attribute__((noinline)) void wait_in_frame(int t) {
  volatile char pad[48];  // a local with redzones around it, live across the barrier
  pad[0] = (char)t;
  if (t == 0) throw std::runtime_error("thread 0 throws");
  __syncthreads();
  pad[1] = pad[0];
}
__global__ void throws_while_others_wait(float* out) {
  wait_in_frame((int)threadIdx.x);
  out[threadIdx.x] = 1.f;
}

__attribute__((noinline)) float big_local(int t) {
  volatile float big[512];
  for (int i = 0; i < 512; ++i) big[i] = (float)(i + t);
  float s = 0.f;
  for (int i = 0; i < 512; i += 7) s += big[i];
  return s;
}
__global__ void uses_its_stack(float* out) { out[threadIdx.x] = big_local((int)threadIdx.x); }

__attribute__((noinline)) float overflow_local(int t) {
  volatile float a[8];
  for (int i = 0; i <= t; ++i) a[i] = (float)i;  // thread 8 writes a[8]
  return a[0];
}
__global__ void stack_overflow(float* out) { out[threadIdx.x] = overflow_local((int)threadIdx.x % 9); }

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  const std::string k = argv[1];
  if (k == "after_throw") {
    simt::ScheduleScope order(1);  // descending: threads 31..1 wait at the barrier, then thread 0 throws
    try {
      NEPTUNE_LAUNCH(throws_while_others_wait, 1, 32, nullptr, g_out);
      return 1;
    } catch (const std::exception& e) {
      printf("caught: %s\n", e.what());
    }
    NEPTUNE_LAUNCH(uses_its_stack, 1, 32, nullptr, g_out);
  } else if (k == "stack_overflow") {
    NEPTUNE_LAUNCH(stack_overflow, 1, 32, nullptr, g_out);
  } else {
    return 2;
  }
  printf("OK\n");
  return 0;
}
