// cache_plan.py's _chosen_first for one row, for the native kernels: cpu_plan.cpp orders a segment's columns by it
// (those some token sees, those the last token keeps), cpu_sequence.cpp the columns of a capacity plan. One order, so
// the native plans give the PyTorch plan's tensors element for element.
#pragma once

#include <cstdint>

namespace ham_rl_columns {

// The columns c < n with chosen[c], in order, then the others, in order, written to order[0, n); returns how many
// were chosen.
inline int64_t chosen_first(const char* chosen, int64_t n, int64_t* order) {
  int64_t k = 0;
  for (int64_t c = 0; c < n; ++c)
    if (chosen[c]) order[k++] = c;
  for (int64_t c = 0, i = k; c < n; ++c)
    if (!chosen[c]) order[i++] = c;
  return k;
}

}  // namespace ham_rl_columns
