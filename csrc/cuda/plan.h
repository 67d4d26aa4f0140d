// The CUDA operator's work plan: which block / warp of which launch steps which unit or
// chunk of which tensor. Torch-free and host-callable, so the exact index arithmetic the
// kernels run is tested on the CPU (debug_ops.cpp, tests/test_cuda_plan.py).
//
// Work is counted in warp "slots"; a block of the main launch owns kWarpsPerBlock slots.
//  - warp units (unit_len <= kWarpMaxLen): one slot (warp) per unit, so one block packs
//    several units, of one or of several tensors.
//  - block units (<= kBlockMaxLen): a whole block per unit (kWarpsPerBlock slots, block
//    aligned so that a block never mixes kinds).
//  - chunked units (longer): split into chunks_per_unit chunks, a block each; their norm
//    and count partials are summed in chunk order by the next launch (deterministic).
// Chunk blocks also have a dense index in "long space" for the launches after the main one.
// Everything is int64: offsets, sizes and slot indices.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define NEPTUNE_PLAN_HD __host__ __device__ __forceinline__
#else
#define NEPTUNE_PLAN_HD inline
#endif

#if !defined(__CUDA_ARCH__)
#include <vector>
#endif

namespace neptune {
namespace cuda_plan {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = kThreads / kWarpSize;
// A warp walks up to 2048 elements (64 per lane); longer units get a block.
constexpr int64_t kWarpMaxLen = 2048;
// A block walks a unit up to 16384 elements (64 per thread) while it stays in L1/L2.
constexpr int64_t kBlockMaxLen = 16384;
// Chunks of long units: at least kMinChunk elements, a multiple of kChunkAlign (keeps
// 16-byte alignment of every chunk start when the unit start is aligned), and at most
// kMaxChunksPerUnit chunks so that summing a unit's partials stays cheap for every block.
constexpr int64_t kMinChunk = 16384;
constexpr int64_t kChunkAlign = 2048;
constexpr int64_t kMaxChunksPerUnit = 1024;

enum Kind : int32_t { kEmpty = 0, kWarpUnit = 1, kBlockUnit = 2, kChunked = 3 };

// Roles of a chunk block, in launch order (norm and count only when clip / cautious).
enum Role : int32_t { kRoleNorm = 0, kRoleCount = 1, kRoleUpdate = 2 };

struct TensorPlan {
  int64_t numel;
  int64_t unit_len;
  int64_t n_units;
  int64_t chunk_len;        // kChunked only
  int64_t chunks_per_unit;  // kChunked only
  int64_t slot_begin;       // first slot in the main launch
  int64_t n_slots;
  int64_t long_begin;       // first chunk block in long space
  int64_t n_long;
  int32_t kind;
  int32_t pad_;
};

NEPTUNE_PLAN_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Kind and per-tensor sizes; slot_begin / long_begin are set by make_plan.
NEPTUNE_PLAN_HD TensorPlan classify(int64_t numel, int64_t unit_len) {
  TensorPlan p = {};
  p.numel = numel;
  p.unit_len = unit_len;
  if (numel <= 0 || unit_len <= 0) {
    p.kind = kEmpty;
    return p;
  }
  p.n_units = numel / unit_len;
  if (unit_len <= kWarpMaxLen) {
    p.kind = kWarpUnit;
    p.n_slots = p.n_units;
  } else if (unit_len <= kBlockMaxLen) {
    p.kind = kBlockUnit;
    p.n_slots = p.n_units * kWarpsPerBlock;
  } else {
    p.kind = kChunked;
    int64_t cl = ceil_div(unit_len, kMaxChunksPerUnit);
    cl = ceil_div(cl, kChunkAlign) * kChunkAlign;
    p.chunk_len = cl < kMinChunk ? kMinChunk : cl;
    p.chunks_per_unit = ceil_div(unit_len, p.chunk_len);
    p.n_long = p.n_units * p.chunks_per_unit;
    p.n_slots = p.n_long * kWarpsPerBlock;
  }
  return p;
}

// Largest i in [0, n) with begins[i] <= x (begins non-decreasing, begins[0] <= x).
// Zero-width entries share their successor's begin, so the result owns x when anyone does.
NEPTUNE_PLAN_HD int64_t find_owner(const int64_t* begins, int64_t n, int64_t x) {
  int64_t lo = 0, hi = n;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (begins[mid] <= x)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

// One piece of work: elements [elem_begin, elem_end) of unit `unit`.
struct Work {
  int32_t valid;
  int32_t kind;
  int64_t unit;
  int64_t elem_begin, elem_end;
  int64_t long_index;       // kChunked: this chunk's block in long space
  int64_t unit_long_begin;  // kChunked: the unit's first chunk in long space
  int64_t chunks;           // kChunked: chunks of the unit
};

// Chunk `j` (0-based within the tensor) of a chunked tensor.
NEPTUNE_PLAN_HD Work chunk_work(const TensorPlan& p, int64_t j) {
  Work w = {};
  w.valid = 1;
  w.kind = kChunked;
  w.unit = j / p.chunks_per_unit;
  const int64_t c = j - w.unit * p.chunks_per_unit;
  const int64_t ub = w.unit * p.unit_len;
  w.elem_begin = ub + c * p.chunk_len;
  const int64_t e = w.elem_begin + p.chunk_len, ue = ub + p.unit_len;
  w.elem_end = e < ue ? e : ue;
  w.long_index = p.long_begin + j;
  w.unit_long_begin = p.long_begin + w.unit * p.chunks_per_unit;
  w.chunks = p.chunks_per_unit;
  return w;
}

// Work of main-launch slot `slot` given its owner's plan. For block units and chunks all
// kWarpsPerBlock slots of the block return the same work.
NEPTUNE_PLAN_HD Work slot_work(const TensorPlan& p, int64_t slot) {
  Work w = {};
  const int64_t local = slot - p.slot_begin;
  if (p.kind == kEmpty || local < 0 || local >= p.n_slots) return w;
  if (p.kind == kChunked) return chunk_work(p, local / kWarpsPerBlock);
  w.valid = 1;
  w.kind = p.kind;
  w.unit = p.kind == kWarpUnit ? local : local / kWarpsPerBlock;
  w.elem_begin = w.unit * p.unit_len;
  w.elem_end = w.elem_begin + p.unit_len;
  w.long_index = -1;
  return w;
}

// Work of block `lb` of a launch after the main one (long space) given its owner's plan.
NEPTUNE_PLAN_HD Work long_work(const TensorPlan& p, int64_t lb) {
  const int64_t j = lb - p.long_begin;
  if (p.kind != kChunked || j < 0 || j >= p.n_long) return Work{};
  return chunk_work(p, j);
}

// The launches of one step, in stream order.
enum LaunchKind : int32_t { kLaunchMain = 0, kLaunchLong = 1, kLaunchSteps = 2 };
struct Launch {
  int32_t kind;
  int32_t role;     // kLaunchMain: role of chunk blocks; kLaunchLong: role of all blocks
  int64_t blocks;
};

// Roles a chunked unit goes through: norm partials (clip), count partials (cautious), update.
NEPTUNE_PLAN_HD int chunk_roles(int need_norm, int need_count, int32_t* roles) {
  int n = 0;
  if (need_norm) roles[n++] = kRoleNorm;
  if (need_count) roles[n++] = kRoleCount;
  roles[n++] = kRoleUpdate;
  return n;
}

constexpr int kStepsThreads = 256;

// At most 4 launches: main, up to two long passes, the step counters.
NEPTUNE_PLAN_HD int launch_sequence(int64_t main_blocks, int64_t long_blocks, int64_t n_tensors, int need_norm,
                                    int need_count, Launch* out) {
  int32_t roles[3];
  const int nr = chunk_roles(need_norm, need_count, roles);
  int n = 0;
  if (main_blocks > 0) out[n++] = Launch{kLaunchMain, roles[0], main_blocks};
  if (long_blocks > 0)
    for (int r = 1; r < nr; ++r) out[n++] = Launch{kLaunchLong, roles[r], long_blocks};
  if (n_tensors > 0) out[n++] = Launch{kLaunchSteps, 0, ceil_div(n_tensors, kStepsThreads)};
  return n;
}

#if !defined(__CUDA_ARCH__)
struct Plan {
  std::vector<TensorPlan> tensors;
  std::vector<int64_t> slot_begins;  // for find_owner over the main launch
  std::vector<int64_t> long_begins;  // for find_owner over long space
  int64_t total_slots = 0;
  int64_t main_blocks = 0;
  int64_t long_blocks = 0;
};

inline Plan make_plan(const int64_t* numels, const int64_t* unit_lens, int64_t n) {
  Plan plan;
  plan.tensors.resize(n);
  plan.slot_begins.resize(n);
  plan.long_begins.resize(n);
  int64_t slot = 0, lb = 0;
  for (int64_t i = 0; i < n; ++i) {
    TensorPlan p = classify(numels[i], unit_lens[i]);
    // Block-level work starts on a block boundary so that no block mixes kinds.
    if (p.kind == kBlockUnit || p.kind == kChunked) slot = ceil_div(slot, kWarpsPerBlock) * kWarpsPerBlock;
    p.slot_begin = slot;
    p.long_begin = lb;
    slot += p.n_slots;
    lb += p.n_long;
    plan.tensors[i] = p;
    plan.slot_begins[i] = p.slot_begin;
    plan.long_begins[i] = p.long_begin;
  }
  plan.total_slots = slot;
  plan.main_blocks = ceil_div(slot, kWarpsPerBlock);
  plan.long_blocks = lb;
  return plan;
}
#endif

}  // namespace cuda_plan
}  // namespace neptune
