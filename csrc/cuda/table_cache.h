// The device tables of the CUDA operator (cuda/launch_args.h), cached by content: a
// training loop steps the same tensors every time, so from the second step on a step is
// just its launches. Shared by the real backend and the emulated one (CPU tables).
//
// Lifetimes:
//  - get() returns the table as a tensor that owns it: it stays valid while the caller
//    holds it, even if another thread evicts the entry meanwhile (the caller holds it
//    until its launches are enqueued; the caching allocator then frees in stream order).
//  - A table made while the stream is being captured into a CUDA graph is never cached:
//    it is allocated from the graph's memory pool, so the graph owns it and frees it when
//    it is destroyed, and eager calls can never reuse a table that only the graph fills.
//  - Eager tables are evicted least recently used first, beyond `max_entries`.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstring>
#include <functional>
#include <mutex>
#include <vector>

namespace neptune {

class TableCache {
 public:
  explicit TableCache(size_t max_entries) : max_entries_(max_entries) {}

  // upload(): a new device tensor holding `host`, in stream order on `stream`.
  at::Tensor get(const std::vector<unsigned char>& host, int64_t device, const void* stream, bool capturing,
                 const std::function<at::Tensor()>& upload) {
    if (capturing) {
      at::Tensor table = upload();
      std::lock_guard<std::mutex> lock(mu_);
      ++uploads_;
      return table;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (Entry& e : entries_) {
        if (e.device != device || e.stream != stream || e.host.size() != host.size()) continue;
        if (std::memcmp(e.host.data(), host.data(), host.size()) != 0) continue;
        e.last_use = ++clock_;
        return e.table;  // a new reference: valid after the lock is released
      }
    }
    at::Tensor table = upload();  // outside the lock: other devices and streams proceed
    std::lock_guard<std::mutex> lock(mu_);
    ++uploads_;
    while (entries_.size() >= max_entries_) evict_oldest();
    entries_.push_back(Entry{device, stream, ++clock_, host, table});
    return table;
  }

  size_t size() const {
    std::lock_guard<std::mutex> lock(mu_);
    return entries_.size();
  }
  int64_t uploads() const {
    std::lock_guard<std::mutex> lock(mu_);
    return uploads_;
  }

 private:
  struct Entry {
    int64_t device;
    const void* stream;
    uint64_t last_use;
    std::vector<unsigned char> host;
    at::Tensor table;
  };

  void evict_oldest() {
    size_t victim = 0;
    for (size_t k = 1; k < entries_.size(); ++k)
      if (entries_[k].last_use < entries_[victim].last_use) victim = k;
    at::Tensor& t = entries_[victim].table;
    // A CPU table (the emulated backend) that nobody else holds is poisoned as it is freed,
    // so that a reader of a freed table would read garbage, deterministically.
    if (t.defined() && t.is_cpu() && t.use_count() == 1) std::memset(t.data_ptr(), 0xFF, (size_t)t.nbytes());
    entries_.erase(entries_.begin() + (std::ptrdiff_t)victim);
  }

  const size_t max_entries_;
  mutable std::mutex mu_;
  std::vector<Entry> entries_;
  uint64_t clock_ = 0;
  int64_t uploads_ = 0;
};

}  // namespace neptune
