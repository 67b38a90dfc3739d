// Packed forms of weight tensors, made on first use and kept while the weight lives (weight_cache.cpp).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdint>
#include <functional>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace qcompile {

// What a kernel keeps of one weight: its packed tensors (a oneDNN blocked layout, VNNI blocks and
// column sums, float32 scales), in the order the kernel's pack function returns them.
using Packed = std::vector<at::Tensor>;

// One kernel's cache, keyed by the weight tensor's identity. An entry is made again when the weight
// was written in place since it was packed (its version counter moved) or when the tensor it was
// made for died and another took its address; entries of dead weights are dropped on every insert
// and every count.
class WeightCache {
 public:
  WeightCache();

  // The packed form of `weight`, from `pack` on a miss. `also` (a weight scale, its zero points) is
  // part of what was packed: an entry made with other tensors there (an undefined one counts as
  // none), or an older version of one, is a miss.
  Packed get(const at::Tensor& weight, at::TensorList also, const std::function<Packed()>& pack);

  // Drops the entries of dead weights; returns how many live ones remain.
  int64_t sweep();

 private:
  struct Entry {
    c10::weak_intrusive_ptr<c10::TensorImpl> weight;
    uint32_t weight_version;
    std::vector<std::pair<const c10::TensorImpl*, uint32_t>> also;  // each one's identity and version
    Packed packed;
  };

  void drop_dead();  // the caller holds mutex_

  std::mutex mutex_;
  std::unordered_map<const c10::TensorImpl*, Entry> entries_;
};

// How many packs all caches have made, and how many live weights they hold packed: what tests read
// to see that a weight is packed once, packed again after an in-place write, and released after it.
int64_t packs_made();
int64_t packed_weights();

}  // namespace qcompile
