// The cache plan of a segment with a capacity (cache_plan.py's _plan_with_capacity) as one native call: the step
// form's slot rule (reference.choose_slot: append below capacity; at capacity the lowest score goes, ties to the
// oldest, unless the new score is lower than all) replayed over the T tokens of each row on integer slot maps. In
// PyTorch that replay is a loop over time of some 15 ops a step: 0.3 s for a 1,002-step minibatch of 4 rows.
//
// scores [B, L0] float32, times [B, L0] int64 and length [B] int64: the carried-in cache; starts [B, T] bool; steps
// [B, T] int64; score [B, T] float32 (the router's); routed [B, T] bool. Returns visible [B, T, L0 + T] bool (column
// c is in row b's cache after token t: carried slot c, or token c - L0), final_source [B, max(1, max length)] int64
// (the candidate each final slot holds, 0 past the row's length) and final_length [B] int64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "slot_rule.h"

namespace {

std::vector<at::Tensor> plan_capacity(at::Tensor scores, at::Tensor times, at::Tensor length, at::Tensor starts,
                                      at::Tensor steps, at::Tensor score, at::Tensor routed, int64_t capacity) {
  const int64_t B = starts.size(0), T = starts.size(1), L0 = times.size(1), n_cand = L0 + T;
  const int64_t width = capacity + 1, carried = std::min(L0, width);
  auto visible = at::zeros({B, T, n_cand}, starts.options().dtype(at::kBool));
  auto final_length = at::empty({B}, length.options());
  std::vector<int64_t> sources(B * width);
  const float *sc = scores.data_ptr<float>(), *sp = score.data_ptr<float>();
  const int64_t *tp = times.data_ptr<int64_t>(), *lp = length.data_ptr<int64_t>(), *stp = steps.data_ptr<int64_t>();
  const bool *starts_p = starts.data_ptr<bool>(), *rp = routed.data_ptr<bool>();
  bool* vp = visible.data_ptr<bool>();
  int64_t* flp = final_length.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> slot_score(width);
    std::vector<int64_t> slot_time(width);
    for (int64_t b = begin; b < end; ++b) {
      int64_t* source = sources.data() + b * width;
      for (int64_t l = 0; l < width; ++l) {
        source[l] = l < carried ? l : n_cand;
        slot_score[l] = l < carried ? sc[b * L0 + l] : 0.0f;
        slot_time[l] = l < carried ? tp[b * L0 + l] : 0;
      }
      int64_t len = lp[b];
      for (int64_t t = 0; t < T; ++t) {
        if (starts_p[b * T + t]) len = 0;
        const float s = sp[b * T + t];
        const auto [slot, stored, full] =
            ham_rl_slots::choose_slot(slot_score.data(), slot_time.data(), len, s, rp[b * T + t], capacity);
        if (stored) {
          source[slot] = L0 + t;
          slot_score[slot] = s;
          slot_time[slot] = stp[b * T + t];
          if (!full) ++len;
        }
        bool* row = vp + (b * T + t) * n_cand;
        for (int64_t l = 0; l < len; ++l) row[source[l]] = true;
      }
      flp[b] = len;
    }
  });
  int64_t used = 1;
  for (int64_t b = 0; b < B; ++b) used = std::max(used, flp[b]);
  auto final_source = at::zeros({B, used}, length.options());
  int64_t* fsp = final_source.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t l = 0; l < std::min(flp[b], used); ++l) fsp[b * used + l] = sources[b * width + l];
  return {visible, final_source, final_length};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ham_rl, m) { m.def("plan_capacity", &plan_capacity); }
