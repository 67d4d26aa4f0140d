// Every debug / test-only op of the CPU library, so that the operator files hold only the
// operators: which CPU kernel sets this machine runs, the CUDA operator's work plan walked
// on the CPU, the table cache's lifetimes, and the SIMT emulator's hooks. (The CUDA
// library's own upload counter, _cuda_table_uploads, lives with its cache in cuda/operator.cpp.)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "cuda/plan.h"
#include "cuda/table_cache.h"
#include "simt/runtime_api.h"

namespace neptune {

int64_t simt_table_uploads();  // simt/operator.cpp

namespace {

// The kernel set a step would run now (sse2, avx2, avx512, avx512bf16).
std::string cpu_isa() { return selected_cpu_kernels().isa; }

// The kernel sets this CPU can run, oldest first: tests and benchmarks ask this instead of
// guessing from the OS's CPU flags (the same checks as NEPTUNE_CPU_ISA's).
std::vector<std::string> cpu_kernel_sets() {
  std::vector<std::string> sets = {cpu_kernels_sse2().isa};
  if (cpu_has_avx2()) sets.push_back(cpu_kernels_avx2().isa);
  if (cpu_has_avx512()) sets.push_back(cpu_kernels_avx512().isa);
  if (cpu_has_avx512bf16()) sets.push_back(cpu_kernels_avx512bf16().isa);
  return sets;
}

// The CUDA operator's work plan (cuda/plan.h) on the CPU, so tests check coverage and int64
// arithmetic without a GPU. Walked exactly as the kernels do: find_owner over the slot /
// long-space prefixes, then slot_work / long_work.
using namespace cuda_plan;

cuda_plan::Plan plan_of(c10::IntArrayRef numels, c10::IntArrayRef unit_lens) {
  TORCH_CHECK(numels.size() == unit_lens.size(), "_cuda_plan: numels and unit_lens differ in length");
  for (size_t i = 0; i < numels.size(); ++i) {
    TORCH_CHECK(numels[i] >= 0 && unit_lens[i] >= 0, "_cuda_plan: negative size at ", i);
    TORCH_CHECK(numels[i] == 0 || (unit_lens[i] > 0 && numels[i] % unit_lens[i] == 0),
                "_cuda_plan: unit_len must divide numel at ", i);
  }
  return make_plan(numels.data(), unit_lens.data(), (int64_t)numels.size());
}

// One row per work item: (launch, block, warp, tensor, kind, unit, elem_begin, elem_end,
// long_index, unit_long_begin, chunks). launch 0 is the main launch (warp = -1 for block-level
// work), launch 1 stands for every launch over long space.
at::Tensor cuda_plan_items(c10::IntArrayRef numels, c10::IntArrayRef unit_lens) {
  const Plan plan = plan_of(numels, unit_lens);
  const int64_t n = (int64_t)plan.tensors.size();
  constexpr int kCols = 11;
  std::vector<int64_t> rows;
  auto push = [&](int64_t launch, int64_t block, int64_t warp, int64_t tensor, const Work& w) {
    const int64_t r[kCols] = {launch, block, warp, tensor, w.kind, w.unit, w.elem_begin, w.elem_end,
                              w.long_index, w.unit_long_begin, w.chunks};
    rows.insert(rows.end(), r, r + kCols);
  };
  for (int64_t b = 0; b < plan.main_blocks; ++b) {
    // As the kernel: the block's first slot decides block-level work.
    const int64_t s0 = b * kWarpsPerBlock;
    const int64_t i0 = find_owner(plan.slot_begins.data(), n, s0);
    const Work w0 = slot_work(plan.tensors[i0], s0);
    if (w0.valid && w0.kind != kWarpUnit) {
      for (int k = 1; k < kWarpsPerBlock; ++k) {  // every warp of the block must agree
        const int64_t ik = find_owner(plan.slot_begins.data(), n, s0 + k);
        const Work wk = slot_work(plan.tensors[ik], s0 + k);
        TORCH_CHECK(ik == i0 && wk.valid && wk.unit == w0.unit && wk.elem_begin == w0.elem_begin &&
                        wk.elem_end == w0.elem_end,
                    "_cuda_plan: block ", b, " mixes work");
      }
      push(0, b, -1, i0, w0);
      continue;
    }
    for (int k = 0; k < kWarpsPerBlock; ++k) {
      const int64_t s = s0 + k;
      const int64_t i = find_owner(plan.slot_begins.data(), n, s);
      const Work w = slot_work(plan.tensors[i], s);
      if (!w.valid) continue;
      TORCH_CHECK(w.kind == kWarpUnit, "_cuda_plan: block ", b, " starts with warp work but warp ", k,
                  " has block-level work");
      push(0, b, k, i, w);
    }
  }
  for (int64_t lb = 0; lb < plan.long_blocks; ++lb) {
    const int64_t i = find_owner(plan.long_begins.data(), n, lb);
    const Work w = long_work(plan.tensors[i], lb);
    TORCH_CHECK(w.valid, "_cuda_plan: long block ", lb, " has no work");
    push(1, lb, -1, i, w);
  }
  const int64_t nrows = (int64_t)rows.size() / kCols;
  at::Tensor out = at::empty({nrows, kCols}, at::TensorOptions().dtype(at::kLong));
  if (nrows > 0) std::memcpy(out.data_ptr<int64_t>(), rows.data(), rows.size() * sizeof(int64_t));
  return out;
}

// [main_blocks, long_blocks, launches per step (steady state), total_slots] and then the
// launch sequence as (kind, role, blocks) triples.
std::vector<int64_t> cuda_plan_info(c10::IntArrayRef numels, c10::IntArrayRef unit_lens, bool clip, bool cautious) {
  const Plan plan = plan_of(numels, unit_lens);
  Launch seq[4];
  const int nl = launch_sequence(plan.main_blocks, plan.long_blocks, (int64_t)plan.tensors.size(), clip ? 1 : 0,
                                 cautious ? 1 : 0, seq);
  std::vector<int64_t> out = {plan.main_blocks, plan.long_blocks, nl, plan.total_slots};
  for (int i = 0; i < nl; ++i) {
    out.push_back(seq[i].kind);
    out.push_back(seq[i].role);
    out.push_back(seq[i].blocks);
  }
  return out;
}

// The table cache's lifetimes, on CPU tables: [a table held by its caller survives the
// eviction of its entry (1/0), entries after 100 tables made during captures, uploads].
std::vector<int64_t> table_cache_check() {
  TableCache cache(4);
  auto host_of = [](int v) { return std::vector<unsigned char>(64, (unsigned char)v); };
  auto get = [&](const std::vector<unsigned char>& host, bool capturing) {
    return cache.get(host, -1, nullptr, capturing, [&]() {
      at::Tensor t = at::empty({64}, at::TensorOptions().dtype(at::kByte));
      std::memcpy(t.data_ptr(), host.data(), 64);
      return t;
    });
  };
  const std::vector<unsigned char> first = host_of(1);
  const at::Tensor held = get(first, false);
  for (int v = 2; v < 12; ++v) get(host_of(v), false);  // evicts `first` (least recently used)
  const int64_t intact = std::memcmp(held.data_ptr(), first.data(), 64) == 0 ? 1 : 0;
  for (int v = 0; v < 100; ++v) get(host_of(100 + v), true);
  return {intact, (int64_t)cache.size(), cache.uploads()};
}

// SIMT emulator hooks: a CUDA error left pending by an "earlier call", and its counters.
void simt_set_pending_error(int64_t code) { simt::set_last_error((cudaError_t)code); }

std::vector<int64_t> simt_stats() {
  const simt::Stats st = simt::stats();
  return {st.launches, st.blocks, st.threads, st.switches};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(neptune_ext, m) {
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("cpu_kernel_sets() -> str[]", &cpu_kernel_sets);
  m.def("_cuda_plan(int[] numels, int[] unit_lens) -> Tensor", &cuda_plan_items);
  m.def("_cuda_plan_info(int[] numels, int[] unit_lens, bool clip, bool cautious) -> int[]", &cuda_plan_info);
  m.def("_table_cache_check() -> int[]", &table_cache_check);
  m.def("_simt_set_pending_error(int code) -> ()", &simt_set_pending_error);
  m.def("_simt_stats() -> int[]", &simt_stats);
  m.def("_simt_table_uploads() -> int", &simt_table_uploads);
}

}  // namespace neptune
