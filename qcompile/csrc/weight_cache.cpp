// Packing a weight costs far more than the kernel call that reads it (oneDNN reorders an int8
// matrix into its blocked layout; the VNNI kernel interleaves 16 x 4 blocks), so each kernel packs
// a weight once and keeps the result beside the weight's identity. The graph itself holds plain
// int8 tensors: it prints, verifies and saves like any other, and nothing packed is ever saved.
//
// An entry holds a weak reference to its weight (the cache never keeps a model's weights alive)
// and the version counters of the weight and the tensors packed with it: torch bumps a tensor's
// version on every in-place write, so a weight changed after packing is packed again rather than
// read stale.

#include "weight_cache.h"

#include <atomic>

namespace qcompile {
namespace {

std::atomic<int64_t> made{0};

uint32_t version(const at::Tensor& tensor) {
  return tensor.defined() ? tensor.unsafeGetTensorImpl()->version_counter().current_version() : 0;
}

std::vector<std::pair<const c10::TensorImpl*, uint32_t>> identities(at::TensorList tensors) {
  std::vector<std::pair<const c10::TensorImpl*, uint32_t>> found;
  for (const at::Tensor& tensor : tensors) {
    found.emplace_back(tensor.defined() ? tensor.unsafeGetTensorImpl() : nullptr, version(tensor));
  }
  return found;
}

// Every cache, for packed_weights(): the kernels' caches are statics that live as long as the process.
std::vector<WeightCache*>& caches() {
  static std::vector<WeightCache*> all;
  return all;
}

std::mutex& caches_mutex() {
  static std::mutex mutex;
  return mutex;
}

}  // namespace

WeightCache::WeightCache() {
  std::lock_guard<std::mutex> lock(caches_mutex());
  caches().push_back(this);
}

Packed WeightCache::get(const at::Tensor& weight, at::TensorList also, const std::function<Packed()>& pack) {
  const c10::TensorImpl* key = weight.unsafeGetTensorImpl();
  auto also_keys = identities(also);
  std::lock_guard<std::mutex> lock(mutex_);
  const auto found = entries_.find(key);
  if (found != entries_.end() && !found->second.weight.expired() && found->second.weight_version == version(weight) &&
      found->second.also == also_keys) {
    return found->second.packed;
  }
  Packed packed = pack();
  made.fetch_add(1);
  entries_.erase(key);
  drop_dead();
  entries_.emplace(key, Entry{c10::weak_intrusive_ptr<c10::TensorImpl>(weight.getIntrusivePtr()), version(weight),
                              std::move(also_keys), packed});
  return packed;
}

void WeightCache::drop_dead() {
  for (auto it = entries_.begin(); it != entries_.end();) {
    it = it->second.weight.expired() ? entries_.erase(it) : std::next(it);
  }
}

int64_t WeightCache::sweep() {
  std::lock_guard<std::mutex> lock(mutex_);
  drop_dead();
  return static_cast<int64_t>(entries_.size());
}

int64_t packs_made() { return made.load(); }

int64_t packed_weights() {
  std::lock_guard<std::mutex> lock(caches_mutex());
  int64_t live = 0;
  for (WeightCache* cache : caches()) live += cache->sweep();
  return live;
}

}  // namespace qcompile
