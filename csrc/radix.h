// Block-granular radix index over token ids: which KV slots (llama.cpp sequence ids) hold which
// prompt prefixes. The native twin of hera_core/native/radix.py (PyRadixIndex), which is the reference:
// every operation, every return value and every tie-break here is the same as there.
//
// Each node below the root is one block of `block_size` token ids; a node's prefix is the
// concatenation of the blocks on its root path. Invariants (check_invariants() throws
// InvariantError when one fails):
//  - the holders of a node are a subset of its parent's (a slot holds a path from the root), and a
//    slot holds at most one child of any node (a KV sequence has one token per position);
//  - bytes_held = n_blocks * block_size * bytes_per_token <= byte_budget after every operation;
//  - a node with ref > 0 (pinned by a running request) is never evicted and never loses its last
//    holder;
//  - no two leaves share last_access (an operation touches one root path, which ends in one leaf at
//    most), so LRU order is total; the depth/key tie-break is defensive, as in the twin.
//
// Not thread-safe: the Python binding serializes calls with a mutex.
#pragma once

#include <cstdint>
#include <set>
#include <stdexcept>
#include <unordered_map>
#include <utility>
#include <vector>

namespace hera {

// A violated invariant (a bug here, never a caller mistake); Python sees AssertionError.
class InvariantError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

// One block's KV that a slot must drop because its block was evicted.
struct RadixEvicted {
  int64_t slot;   // KV sequence id holding the evicted block
  int64_t start;  // first token position dropped (block depth * block_size)
  int64_t n;      // tokens dropped (block_size)
};

class RadixIndex {
 public:
  // std::invalid_argument (ValueError) unless block_size >= 1, bytes_per_token >= 1,
  // 1 <= max_slots <= 64 and byte_budget >= one block (block_size * bytes_per_token bytes).
  RadixIndex(int64_t block_size, int64_t bytes_per_token, int64_t byte_budget, int64_t max_slots = 64);
  // The LRU set's comparator points back at this object: neither copyable nor movable.
  RadixIndex(const RadixIndex&) = delete;
  RadixIndex& operator=(const RadixIndex&) = delete;

  // Longest cached block-aligned prefix of tokens[0, n): (tokens matched, holder slot or -1).
  // The holder is the lowest slot holding the deepest matched block. Touches the path (LRU).
  std::pair<int64_t, int64_t> match(const int32_t* tokens, int64_t n);

  // Record that `slot` holds the full blocks of tokens[0, n), evicting LRU unpinned leaves to fit.
  // Blocks the slot held that differ from `tokens` at the same position (and all after them) are
  // dropped from it first, as truncate() would; blocks beyond the end of `tokens` on the same path
  // stay. The path being inserted is protected; if the budget cannot fit it all, only the leading
  // blocks that fit are recorded. Returns what was evicted, leaves in eviction order, holders of
  // each in slot order.
  std::vector<RadixEvicted> insert(const int32_t* tokens, int64_t n, int64_t slot);

  // `slot` now holds only its first n_tokens tokens: it leaves every block beyond them.
  // std::invalid_argument, and no change, if a locked block would be left with no holder.
  void truncate(int64_t slot, int64_t n_tokens);

  // Pin the cached blocks of tokens[0, n) (a running request); returns how many were pinned.
  int64_t lock(const int32_t* tokens, int64_t n);

  // Undo lock(): unpin the first n_blocks blocks of tokens[0, n) (std::invalid_argument if any of
  // them is missing or not pinned; nothing changes then).
  void release(const int32_t* tokens, int64_t n, int64_t n_blocks);

  // Free at least n_bytes (or all that can be freed) from LRU unpinned leaves.
  std::vector<RadixEvicted> evict(int64_t n_bytes);

  // How many blocks `slot` holds (its path length).
  int64_t slot_blocks(int64_t slot) const;

  // Walks the whole tree; throws InvariantError naming the first invariant that does not hold.
  void check_invariants() const;

  int64_t block_size() const { return block_size_; }
  int64_t bytes_per_token() const { return bytes_per_token_; }
  int64_t byte_budget() const { return byte_budget_; }
  int64_t max_slots() const { return max_slots_; }
  int64_t block_bytes() const { return block_bytes_; }
  int64_t n_blocks() const { return n_blocks_; }
  int64_t bytes_held() const { return n_blocks_ * block_bytes_; }
  int64_t evictions() const { return evictions_; }
  int64_t matched_tokens() const { return matched_tokens_; }

 private:
  static constexpr int32_t kNone = -1;  // "no node" in every index field
  static constexpr int32_t kRoot = 0;   // the root is pool entry 0 and is never freed

  struct Node {
    int32_t parent = kNone;          // pool index of the parent; kNone for the root
    int32_t next_same_hash = kNone;  // next node in this node's lookup_ chain (same hash), or kNone
    int64_t depth = -1;              // block index: covers tokens [depth*block_size, (depth+1)*block_size); -1 = root
    uint64_t holders = 0;            // bit s set: slot s's KV holds this block at those positions
    int64_t ref = 0;                 // pins by running requests; > 0 means never evict
    uint64_t last_access = 0;        // logical clock (one tick per match/insert/lock) of the last touch
    uint64_t hash = 0;               // hash of (parent, block tokens): this node's key in lookup_
    std::vector<int32_t> children;   // pool indices of the children, unordered (order never shows)
    bool in_lru = false;             // member of lru_ (a leaf with ref == 0)
    bool live = false;               // in use; false while on the free list
  };

  // Orders evictable leaves as the twin's linear scan does: last_access, then depth, then the
  // block's tokens lexicographically; the pool index only makes the order strict.
  struct LruLess {
    const RadixIndex* self;
    bool operator()(int32_t a, int32_t b) const;
  };

  const int32_t* key(int32_t i) const { return keys_.data() + static_cast<size_t>(i) * block_size_; }
  uint64_t hash_block(int32_t parent, const int32_t* block) const;
  bool key_equal(int32_t i, const int32_t* block) const;
  int32_t find_child(int32_t parent, const int32_t* block) const;
  int32_t slot_child(int32_t node, uint64_t bit) const;  // the child on the slot's path, or kNone
  int32_t add_child(int32_t parent, const int32_t* block);
  void remove_leaf(int32_t i);
  void sync_lru(int32_t i);                 // put i in lru_ iff it is an unpinned leaf
  void touch(int32_t i, uint64_t now);      // last_access = now, keeping lru_ ordered
  void add_ref(int32_t i, int64_t delta);   // ref += delta, keeping lru_ in sync
  std::vector<int32_t> path(const int32_t* tokens, int64_t n) const;
  void drop_holder(int32_t i, uint64_t bit);
  void evict_bytes(int64_t n_bytes, std::vector<RadixEvicted>& out);
  void check_slot(int64_t slot) const;

  int64_t block_size_;       // tokens per block (node)
  int64_t bytes_per_token_;  // KV bytes one token occupies (all layers, K and V)
  int64_t byte_budget_;      // most bytes the held blocks may occupy
  int64_t max_slots_;        // slots are 0..max_slots-1 (a bit each in Node::holders)
  int64_t block_bytes_;      // block_size * bytes_per_token

  std::vector<Node> nodes_;       // the node pool; entry 0 is the root
  std::vector<int32_t> keys_;     // block_size token ids per pool entry (entry i at i*block_size)
  std::vector<int32_t> free_;     // pool entries free for reuse (a stack)
  // (parent, block) hash -> first node of the chain with that hash. One hash lookup per block
  // instead of comparing the block against every sibling; the chain handles 64-bit collisions.
  std::unordered_map<uint64_t, int32_t> lookup_;
  // The unpinned leaves in eviction order, so each eviction takes O(log n) instead of the twin's
  // scan of the whole tree (which costs O(n) per evicted block).
  std::set<int32_t, LruLess> lru_;

  uint64_t clock_ = 0;          // logical clock, ticks once per match/insert/lock
  int64_t n_blocks_ = 0;        // live nodes below the root
  int64_t evictions_ = 0;       // blocks evicted to stay under the budget (insert) or by evict()
  int64_t matched_tokens_ = 0;  // total tokens found by match(): the cache's hits
};

}  // namespace hera
