// Block-granular radix index: see radix.h, and hera_core/native/radix.py for the reference twin.
#include "radix.h"

#include <algorithm>
#include <cassert>
#include <cstring>
#include <limits>
#include <string>

namespace hera {

namespace {

// splitmix64's finalizer: a cheap mixer whose output bits all depend on every input bit.
inline uint64_t mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

inline int lowest_bit(uint64_t x) { return __builtin_ctzll(x); }

}  // namespace

RadixIndex::RadixIndex(int64_t block_size, int64_t bytes_per_token, int64_t byte_budget, int64_t max_slots)
    : block_size_(block_size),
      bytes_per_token_(bytes_per_token),
      byte_budget_(byte_budget),
      max_slots_(max_slots),
      block_bytes_(0),
      lru_(LruLess{this}) {
  if (block_size < 1) throw std::invalid_argument("block_size must be >= 1, got " + std::to_string(block_size));
  if (bytes_per_token < 1) {
    throw std::invalid_argument("bytes_per_token must be >= 1, got " + std::to_string(bytes_per_token));
  }
  if (max_slots < 1 || max_slots > 64) {
    throw std::invalid_argument("max_slots must be in 1..64, got " + std::to_string(max_slots));
  }
  if (block_size > std::numeric_limits<int64_t>::max() / bytes_per_token) {
    throw std::invalid_argument("block_size x bytes_per_token overflows int64");
  }
  block_bytes_ = block_size * bytes_per_token;
  if (byte_budget < block_bytes_) {
    throw std::invalid_argument("byte_budget " + std::to_string(byte_budget) + " is smaller than one block (" +
                                std::to_string(block_size) + " tokens x " + std::to_string(bytes_per_token) +
                                " bytes = " + std::to_string(block_bytes_) + ")");
  }
  nodes_.emplace_back();  // the root
  nodes_[kRoot].live = true;
  keys_.resize(static_cast<size_t>(block_size_));  // the root's (unused) key slot keeps indexing uniform
}

// --- helpers ----------------------------------------------------------------------------------

bool RadixIndex::LruLess::operator()(int32_t a, int32_t b) const {
  const Node& x = self->nodes_[a];
  const Node& y = self->nodes_[b];
  if (x.last_access != y.last_access) return x.last_access < y.last_access;
  if (x.depth != y.depth) return x.depth < y.depth;
  const int32_t* ka = self->key(a);
  const int32_t* kb = self->key(b);
  const int32_t* end = ka + self->block_size_;
  const auto diff = std::mismatch(ka, end, kb);
  if (diff.first != end) return *diff.first < *diff.second;
  return a < b;
}

uint64_t RadixIndex::hash_block(int32_t parent, const int32_t* block) const {
  uint64_t h = mix(static_cast<uint64_t>(parent) + 0x9e3779b97f4a7c15ULL);
  for (int64_t j = 0; j < block_size_; ++j) {
    h = mix(h ^ static_cast<uint32_t>(block[j]));
  }
  return h;
}

bool RadixIndex::key_equal(int32_t i, const int32_t* block) const {
  return std::memcmp(key(i), block, static_cast<size_t>(block_size_) * sizeof(int32_t)) == 0;
}

int32_t RadixIndex::find_child(int32_t parent, const int32_t* block) const {
  const auto it = lookup_.find(hash_block(parent, block));
  if (it == lookup_.end()) return kNone;
  for (int32_t i = it->second; i != kNone; i = nodes_[i].next_same_hash) {
    if (nodes_[i].parent == parent && key_equal(i, block)) return i;
  }
  return kNone;
}

int32_t RadixIndex::slot_child(int32_t node, uint64_t bit) const {
  for (const int32_t c : nodes_[node].children) {
    if (nodes_[c].holders & bit) return c;
  }
  return kNone;
}

int32_t RadixIndex::add_child(int32_t parent, const int32_t* block) {
  int32_t i;
  if (!free_.empty()) {
    i = free_.back();
    free_.pop_back();
  } else {
    if (nodes_.size() >= static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
      throw std::length_error("radix index: more than 2^31 blocks");
    }
    i = static_cast<int32_t>(nodes_.size());
    nodes_.emplace_back();
    keys_.resize(keys_.size() + static_cast<size_t>(block_size_));
  }
  std::memcpy(keys_.data() + static_cast<size_t>(i) * block_size_, block,
              static_cast<size_t>(block_size_) * sizeof(int32_t));
  Node& n = nodes_[i];
  assert(!n.live && !n.in_lru && n.children.empty());
  n.parent = parent;
  n.depth = nodes_[parent].depth + 1;
  n.holders = 0;
  n.ref = 0;
  n.last_access = 0;
  n.hash = hash_block(parent, block);
  n.live = true;
  const auto [it, fresh] = lookup_.try_emplace(n.hash, i);
  n.next_same_hash = fresh ? kNone : it->second;
  if (!fresh) it->second = i;
  nodes_[parent].children.push_back(i);
  ++n_blocks_;
  sync_lru(parent);  // no longer a leaf
  sync_lru(i);
  return i;
}

void RadixIndex::remove_leaf(int32_t i) {
  Node& n = nodes_[i];
  assert(n.live && i != kRoot && n.children.empty() && n.ref == 0);
  if (n.in_lru) {
    lru_.erase(i);
    n.in_lru = false;
  }
  // Unlink from the hash chain.
  const auto it = lookup_.find(n.hash);
  assert(it != lookup_.end());
  if (it->second == i) {
    if (n.next_same_hash == kNone) {
      lookup_.erase(it);
    } else {
      it->second = n.next_same_hash;
    }
  } else {
    int32_t p = it->second;
    while (nodes_[p].next_same_hash != i) p = nodes_[p].next_same_hash;
    nodes_[p].next_same_hash = n.next_same_hash;
  }
  auto& siblings = nodes_[n.parent].children;
  const auto pos = std::find(siblings.begin(), siblings.end(), i);
  assert(pos != siblings.end());
  *pos = siblings.back();
  siblings.pop_back();
  const int32_t parent = n.parent;
  n.live = false;
  n.parent = kNone;
  n.next_same_hash = kNone;
  n.holders = 0;
  free_.push_back(i);
  --n_blocks_;
  sync_lru(parent);  // may have become an unpinned leaf
}

void RadixIndex::sync_lru(int32_t i) {
  Node& n = nodes_[i];
  const bool want = i != kRoot && n.live && n.children.empty() && n.ref == 0;
  if (want == n.in_lru) return;
  if (want) {
    lru_.insert(i);
  } else {
    lru_.erase(i);
  }
  n.in_lru = want;
}

void RadixIndex::touch(int32_t i, uint64_t now) {
  Node& n = nodes_[i];
  if (n.last_access == now) return;
  if (n.in_lru) lru_.erase(i);  // its sort key changes: take it out first
  n.last_access = now;
  if (n.in_lru) lru_.insert(i);
}

void RadixIndex::add_ref(int32_t i, int64_t delta) {
  nodes_[i].ref += delta;
  assert(nodes_[i].ref >= 0);
  sync_lru(i);
}

std::vector<int32_t> RadixIndex::path(const int32_t* tokens, int64_t n) const {
  std::vector<int32_t> out;
  int32_t node = kRoot;
  for (int64_t b = 0; b + block_size_ <= n; b += block_size_) {
    node = find_child(node, tokens + b);
    if (node == kNone) break;
    out.push_back(node);
  }
  return out;
}

void RadixIndex::check_slot(int64_t slot) const {
  if (slot < 0 || slot >= max_slots_) {
    throw std::invalid_argument("slot must be in 0.." + std::to_string(max_slots_ - 1) + ", got " +
                                std::to_string(slot));
  }
}

void RadixIndex::drop_holder(int32_t i, uint64_t bit) {
  std::vector<int32_t> chain;  // the slot's path below and including i
  for (int32_t n = i; n != kNone; n = slot_child(n, bit)) chain.push_back(n);
  for (const int32_t n : chain) {
    if (nodes_[n].holders == bit && nodes_[n].ref > 0) {
      throw std::invalid_argument("slot " + std::to_string(lowest_bit(bit)) +
                                  " is the last holder of a locked block; release it first");
    }
  }
  for (const int32_t n : chain) nodes_[n].holders &= ~bit;
  for (auto it = chain.rbegin(); it != chain.rend(); ++it) {  // children before parents
    if (nodes_[*it].holders == 0) remove_leaf(*it);
  }
}

void RadixIndex::evict_bytes(int64_t n_bytes, std::vector<RadixEvicted>& out) {
  int64_t freed = 0;
  while (freed < n_bytes && !lru_.empty()) {
    const int32_t leaf = *lru_.begin();
    const Node& n = nodes_[leaf];
    const int64_t start = n.depth * block_size_;
    for (uint64_t h = n.holders; h != 0; h &= h - 1) {
      out.push_back({lowest_bit(h), start, block_size_});
    }
    remove_leaf(leaf);
    ++evictions_;
    freed += block_bytes_;
  }
}

// --- operations -------------------------------------------------------------------------------

std::pair<int64_t, int64_t> RadixIndex::match(const int32_t* tokens, int64_t n) {
  const std::vector<int32_t> p = path(tokens, n);
  const uint64_t now = ++clock_;
  for (const int32_t i : p) touch(i, now);
  if (p.empty()) return {0, -1};
  const int64_t matched = static_cast<int64_t>(p.size()) * block_size_;
  matched_tokens_ += matched;
  const uint64_t holders = nodes_[p.back()].holders;
  assert(holders != 0);
  return {matched, lowest_bit(holders)};
}

std::vector<RadixEvicted> RadixIndex::insert(const int32_t* tokens, int64_t n, int64_t slot) {
  check_slot(slot);
  const uint64_t bit = uint64_t{1} << slot;
  const int64_t n_full = n / block_size_ * block_size_;  // tokens in full blocks
  // Where the slot's current path diverges from `tokens`, if it does (checked before any change).
  int32_t node = kRoot;
  for (int64_t b = 0; b < n_full; b += block_size_) {
    const int32_t next = slot_child(node, bit);
    if (next == kNone) break;
    if (!key_equal(next, tokens + b)) {
      drop_holder(next, bit);  // throws, changing nothing, if that would orphan a locked block
      break;
    }
    node = next;
  }
  const uint64_t now = ++clock_;
  std::vector<RadixEvicted> evicted;
  node = kRoot;
  for (int64_t b = 0; b < n_full; b += block_size_) {
    int32_t child = find_child(node, tokens + b);
    if (child == kNone) {
      if (bytes_held() > byte_budget_ - block_bytes_) {
        add_ref(node, 1);  // protect the path built so far
        evict_bytes(bytes_held() - (byte_budget_ - block_bytes_), evicted);
        add_ref(node, -1);
        if (bytes_held() > byte_budget_ - block_bytes_) break;
      }
      child = add_child(node, tokens + b);
    }
    nodes_[child].holders |= bit;
    touch(child, now);
    node = child;
  }
  return evicted;
}

void RadixIndex::truncate(int64_t slot, int64_t n_tokens) {
  check_slot(slot);
  if (n_tokens < 0) throw std::invalid_argument("n_tokens must be >= 0, got " + std::to_string(n_tokens));
  const uint64_t bit = uint64_t{1} << slot;
  const int64_t keep = n_tokens / block_size_;
  for (int32_t next = slot_child(kRoot, bit); next != kNone; next = slot_child(next, bit)) {
    if (nodes_[next].depth >= keep) {
      drop_holder(next, bit);
      break;
    }
  }
}

int64_t RadixIndex::lock(const int32_t* tokens, int64_t n) {
  const std::vector<int32_t> p = path(tokens, n);
  const uint64_t now = ++clock_;
  for (const int32_t i : p) {
    touch(i, now);
    add_ref(i, 1);
  }
  return static_cast<int64_t>(p.size());
}

void RadixIndex::release(const int32_t* tokens, int64_t n, int64_t n_blocks) {
  if (n_blocks < 0) throw std::invalid_argument("n_blocks must be >= 0, got " + std::to_string(n_blocks));
  const std::vector<int32_t> p = path(tokens, n);
  bool ok = static_cast<int64_t>(p.size()) >= n_blocks;
  for (int64_t k = 0; ok && k < n_blocks; ++k) ok = nodes_[p[k]].ref > 0;
  if (!ok) throw std::invalid_argument("release of blocks that are not locked");
  for (int64_t k = 0; k < n_blocks; ++k) add_ref(p[k], -1);
}

std::vector<RadixEvicted> RadixIndex::evict(int64_t n_bytes) {
  if (n_bytes < 0) throw std::invalid_argument("n_bytes must be >= 0, got " + std::to_string(n_bytes));
  std::vector<RadixEvicted> out;
  evict_bytes(n_bytes, out);
  return out;
}

int64_t RadixIndex::slot_blocks(int64_t slot) const {
  check_slot(slot);
  const uint64_t bit = uint64_t{1} << slot;
  int64_t count = 0;
  for (int32_t next = slot_child(kRoot, bit); next != kNone; next = slot_child(next, bit)) ++count;
  return count;
}

void RadixIndex::check_invariants() const {
  auto require = [](bool ok, const char* what) {
    if (!ok) throw InvariantError(std::string("radix index invariant violated: ") + what);
  };
  require(bytes_held() <= byte_budget_, "bytes_held exceeds byte_budget");
  const uint64_t slot_mask = max_slots_ == 64 ? ~uint64_t{0} : (uint64_t{1} << max_slots_) - 1;
  int64_t count = 0, leaves_unpinned = 0;
  std::set<uint64_t> leaf_clocks;
  std::vector<int32_t> stack{kRoot};
  while (!stack.empty()) {
    const int32_t i = stack.back();
    stack.pop_back();
    const Node& n = nodes_[i];
    uint64_t seen = 0;
    for (const int32_t c : n.children) {
      const Node& ch = nodes_[c];
      ++count;
      require(ch.live && ch.parent == i, "child not live or linked under the wrong parent");
      require(find_child(i, key(c)) == c, "child not found under its own key");
      require(ch.hash == hash_block(i, key(c)), "stale hash");
      require(ch.holders != 0, "a block has no holder");
      require(i == kRoot || (ch.holders & ~n.holders) == 0, "holders not a subset of the parent's");
      require((ch.holders & seen) == 0, "a slot holds two children of one block");
      require((ch.holders & ~slot_mask) == 0, "a holder bit beyond max_slots");
      require(ch.ref >= 0 && ch.last_access <= clock_, "bad pin count or clock");
      require(ch.depth == n.depth + 1, "bad depth");
      seen |= ch.holders;
      const bool evictable = ch.children.empty() && ch.ref == 0;
      require(ch.in_lru == evictable && (lru_.count(c) == 1) == evictable, "LRU set out of sync");
      if (ch.children.empty()) require(leaf_clocks.insert(ch.last_access).second, "two leaves share a last_access");
      leaves_unpinned += evictable;
      stack.push_back(c);
    }
  }
  require(count == n_blocks_, "n_blocks does not count the nodes");
  require(static_cast<int64_t>(lru_.size()) == leaves_unpinned, "LRU set holds extra nodes");
  require(nodes_.size() == 1 + static_cast<size_t>(n_blocks_) + free_.size(), "pool entries leaked");
  for (const int32_t f : free_) require(!nodes_[f].live && !nodes_[f].in_lru, "a free pool entry is in use");
  size_t chained = 0;
  for (const auto& [h, head] : lookup_) {
    for (int32_t i = head; i != kNone; i = nodes_[i].next_same_hash) {
      require(nodes_[i].live && nodes_[i].hash == h, "hash chain holds a dead or misfiled node");
      ++chained;
    }
  }
  require(chained == static_cast<size_t>(n_blocks_), "hash chains do not hold every node once");
}

}  // namespace hera
