// Standalone driver for the emulator's self-tests (tests/test_simt_emulator.py): runs a
// (possibly mutated) copy of csrc/cuda/kernels.cu, given as NEPTUNE_KERNEL_SOURCE, on
// a fixed mixed case under one schedule, and prints a hash of every output byte, or the
// emulator's error. Torch-free, so that each mutant compiles in seconds.
#define NEPTUNE_SIMT 1

#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "simt/dialect.h"

#include NEPTUNE_KERNEL_SOURCE

using namespace neptune;

namespace {

struct Spec {
  int64_t rows, cols;  // unit = one row (rows == 0: a 1-D tensor of `cols` elements)
  int dtype, state_dtype;
  int w_offset;  // elements: shifts the param (and grad) against the state's alignment
};

uint64_t g_rng = 0x243F6A8885A308D3ull;
float uniform() {  // [-1, 1), deterministic
  g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
  return (float)((int64_t)(g_rng >> 11) - (int64_t)(1ull << 52)) / (float)(1ull << 52);
}

uint16_t to16(float f, int dtype) {
  return dtype == kBF16 ? __bfloat16_as_ushort(__float2bfloat16_rn(f)) : __half_as_ushort(__float2half_rn(f));
}

struct Buffers {
  std::vector<std::vector<unsigned char>> w, g, m, v;
  std::vector<float> steps;
};

uint64_t fnv(uint64_t h, const void* p, size_t n) {
  const unsigned char* b = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

// One step of the case; returns the hash of every output.
uint64_t run_case(const std::vector<Spec>& specs, int clip_on, int cautious) {
  const int64_t n = (int64_t)specs.size();
  Buffers B;
  B.steps.assign((size_t)n, 4.f);
  std::vector<int64_t> numels(n), unit_lens(n);
  std::vector<DevTensor> dev((size_t)n);
  for (int64_t i = 0; i < n; ++i) {
    const Spec& s = specs[(size_t)i];
    numels[i] = s.rows == 0 ? s.cols : s.rows * s.cols;
    unit_lens[i] = s.cols;
    const size_t pe = s.dtype == kF32 ? 4 : 2, se = s.state_dtype == kF32 ? 4 : 2;
    const size_t off = (size_t)s.w_offset * pe;
    B.w.emplace_back(numels[i] * pe + off + 16);
    B.g.emplace_back(numels[i] * pe + off + 16);
    B.m.emplace_back(numels[i] * se + 16);
    B.v.emplace_back(numels[i] * se + 16);
    // 16-byte aligned bases (vector data of std::vector<unsigned char> may not be)
    auto base = [](std::vector<unsigned char>& b) {
      return reinterpret_cast<unsigned char*>(((uintptr_t)b.data() + 15) & ~(uintptr_t)15);
    };
    unsigned char* w = base(B.w.back()) + off;
    unsigned char* g = base(B.g.back()) + off;
    unsigned char* m = base(B.m.back());
    unsigned char* v = base(B.v.back());
    for (int64_t k = 0; k < numels[i]; ++k) {
      const float wf = uniform(), gf = (k % 17 == 3) ? 0.f : uniform() * 0.1f * (1 + (k / s.cols) % 5);
      const float mf = uniform() * 0.02f, vf = std::fabs(uniform()) * 1e-3f + 1e-8f;
      if (s.dtype == kF32) {
        memcpy(w + 4 * k, &wf, 4);
        memcpy(g + 4 * k, &gf, 4);
      } else {
        const uint16_t a = to16(wf, s.dtype), b = to16(gf, s.dtype);
        memcpy(w + 2 * k, &a, 2);
        memcpy(g + 2 * k, &b, 2);
      }
      if (s.state_dtype == kF32) {
        memcpy(m + 4 * k, &mf, 4);
        memcpy(v + 4 * k, &vf, 4);
      } else {
        const uint16_t a = to16(mf, kBF16), b = to16(vf, kBF16);
        memcpy(m + 2 * k, &a, 2);
        memcpy(v + 2 * k, &b, 2);
      }
    }
    DevTensor& t = dev[(size_t)i];
    memset(&t, 0, sizeof t);
    t.w = numels[i] ? w : nullptr;
    t.g = numels[i] ? g : nullptr;
    t.m = numels[i] ? m : nullptr;
    t.v = numels[i] ? v : nullptr;
    t.step = &B.steps[(size_t)i];
    t.dtype = s.dtype;
    t.state_dtype = s.state_dtype;
  }
  const cuda_plan::Plan plan = cuda_plan::make_plan(numels.data(), unit_lens.data(), n);
  std::vector<unsigned char> host((size_t)table_bytes(n));
  bool bf16_state = false;
  for (int64_t i = 0; i < n; ++i) {
    dev[(size_t)i].plan = plan.tensors[(size_t)i];
    bf16_state = bf16_state || dev[(size_t)i].state_dtype == kBF16;
  }
  memcpy(host.data(), dev.data(), n * sizeof(DevTensor));
  memcpy(host.data() + n * sizeof(DevTensor), plan.slot_begins.data(), n * 8);
  memcpy(host.data() + n * (sizeof(DevTensor) + 8), plan.long_begins.data(), n * 8);
  std::vector<unsigned char> table(host.size() + 16, 0xFF);
  unsigned char* tb = reinterpret_cast<unsigned char*>(((uintptr_t)table.data() + 15) & ~(uintptr_t)15);
  if (neptune_cuda_upload(tb, host.data(), (int64_t)host.size(), nullptr, nullptr) != cudaSuccess)
    throw std::runtime_error("upload launch failed");
  std::vector<float> norm_partials((size_t)(2 * plan.long_blocks + 1), NAN);
  std::vector<unsigned long long> count_partials((size_t)(2 * plan.long_blocks + 1), ~0ull);
  StepArgs a;
  memset(&a, 0, sizeof a);
  a.tensors = reinterpret_cast<const DevTensor*>(tb);
  a.slot_begins = reinterpret_cast<const int64_t*>(tb + n * sizeof(DevTensor));
  a.long_begins = reinterpret_cast<const int64_t*>(tb + n * (sizeof(DevTensor) + 8));
  a.n_tensors = n;
  a.beta1 = 0.9;
  a.beta2 = 0.999;
  a.weight_decay = 0.05;
  a.eps = 1e-8;
  a.clip = clip_on ? 0.1 : 0.0;
  a.lr = 1e-2;
  a.norm_partials = norm_partials.data();
  a.count_partials = count_partials.data();
  a.cautious = cautious;
  a.bf16_state = bf16_state;
  if (neptune_cuda_step(a, plan.main_blocks, plan.long_blocks, nullptr) != cudaSuccess)
    throw std::runtime_error("step launch failed");
  uint64_t h = 1469598103934665603ull;
  for (int64_t i = 0; i < n; ++i) {
    const DevTensor& t = dev[(size_t)i];
    const size_t pe = t.dtype == kF32 ? 4 : 2, se = t.state_dtype == kF32 ? 4 : 2;
    if (numels[i]) {
      h = fnv(h, t.w, numels[i] * pe);
      h = fnv(h, t.m, numels[i] * se);
      h = fnv(h, t.v, numels[i] * se);
    }
    h = fnv(h, &B.steps[(size_t)i], 4);
  }
  return h;
}

}  // namespace

int main(int argc, char** argv) {
  const int schedule = argc > 1 ? atoi(argv[1]) : 0;
  simt::ScheduleScope order(schedule);
  // fp32 state only (the kernels without the bf16-state paths), then with bf16 state.
  const std::vector<Spec> fp32_state = {
      {5, 1031, kF32, kF32, 0},   // warp units, rows not 16-byte aligned
      {0, 7, kF32, kF32, 0},      // a unit shorter than a warp
      {4, 5000, kBF16, kF32, 0},  // block units
      {2, 40000, kF32, kF32, 0},  // chunked units (3 chunks each)
      {0, 333, kF32, kF32, 1},    // param misaligned against its state: scalar path
      {0, 0, kF32, kF32, 0},      // empty
  };
  const std::vector<Spec> bf16_state = {
      {3, 1500, kF16, kBF16, 0},
      {0, 20000, kF32, kBF16, 0},
      {0, 45, kBF16, kF32, 0},
  };
  try {
    uint64_t h = run_case(fp32_state, 1, 1);
    h ^= run_case(bf16_state, 1, 1) * 31;
    h ^= run_case(fp32_state, 0, 1) * 37;  // no clip: the chunked path without its norm launch
    printf("HASH %016llx\n", (unsigned long long)h);
    return 0;
  } catch (const std::exception& e) {
    printf("ERROR %s\n", e.what());
    return 3;
  }
}
