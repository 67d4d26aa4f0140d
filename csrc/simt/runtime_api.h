// The part of the CUDA runtime API that the host side of the CUDA operator uses, for the
// SIMT emulator (NEPTUNE_SIMT builds): error codes, streams, the last-error slot. Everything
// here is internal (static or hidden), so that it never binds to, or shadows, a real
// libcudart loaded in the same process.
#pragma once

#include <stdint.h>

struct simt_stream_;
typedef simt_stream_* cudaStream_t;

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

namespace simt __attribute__((visibility("hidden"))) {

// The emulated runtime's last-error slot (per host thread), as cudaGetLastError reads it.
cudaError_t take_last_error();
cudaError_t peek_last_error();
void set_last_error(cudaError_t err);
const char* error_name(cudaError_t err);

// Order of blocks in a launch and of threads between synchronisation points: 0 ascending,
// 1 descending, k >= 2 a random order seeded by k. Per host thread; RAII setter.
int schedule();
class ScheduleScope {
 public:
  explicit ScheduleScope(int schedule);
  ~ScheduleScope();
  ScheduleScope(const ScheduleScope&) = delete;
  ScheduleScope& operator=(const ScheduleScope&) = delete;

 private:
  int saved_;
};

// Counters since the process started (for tests and reports).
struct Stats {
  int64_t launches, blocks, threads, switches;
};
Stats stats();

}  // namespace simt

static inline cudaError_t cudaGetLastError() { return simt::take_last_error(); }
static inline cudaError_t cudaPeekAtLastError() { return simt::peek_last_error(); }
static inline const char* cudaGetErrorName(cudaError_t err) { return simt::error_name(err); }
static inline const char* cudaGetErrorString(cudaError_t err) { return simt::error_name(err); }
