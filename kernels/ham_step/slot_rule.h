// The step form's cache slot rule (reference.py's choose_slot) for the native kernels: cpu_step.cpp applies it to an
// env's live cache at every rollout step, cpu_plan.cpp replays it over a segment for the sequence form. One rule,
// so the two forms keep the same slots.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace ham_rl_slots {

// min that keeps a NaN, as torch's amin does.
inline float nan_min(float a, float b) { return (std::isnan(a) || a < b) ? a : b; }

struct SlotChoice {
  int64_t slot;  // where the entry goes: len (append) or the evicted slot
  bool stored;   // whether it is written at all
  bool full;     // whether the cache was at capacity (a store then does not grow it)
};

// Below capacity (or unbounded, capacity <= 0) a routed entry is appended. At capacity it replaces the entry with the
// lowest score (ties: the smallest time, the oldest), unless its own score is lower than all of them. scores and
// times: the len live slots of one env's cache.
inline SlotChoice choose_slot(const float* scores, const int64_t* times, int64_t len, float score, bool routed,
                              int64_t capacity) {
  if (capacity <= 0) return {len, routed, false};
  const bool full = len >= capacity;
  float min_score = std::numeric_limits<float>::infinity();
  for (int64_t l = 0; l < len; ++l) min_score = nan_min(min_score, scores[l]);
  int64_t victim = 0, oldest = std::numeric_limits<int64_t>::max();
  for (int64_t l = 0; l < len; ++l)
    if (scores[l] == min_score && times[l] < oldest) {
      oldest = times[l];
      victim = l;
    }
  const bool stored = routed && (!full || score >= min_score);
  return {(stored && full) ? victim : len, stored, full};
}

}  // namespace ham_rl_slots
