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

#include "columns.h"
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

// The plan of a segment without a capacity and the candidates the attention reads, as one call: cache_plan.py's
// closed form (plan_cache with capacity 0), seen_candidates and CachePlan.candidates, in plain loops; in PyTorch some
// 40 ops on [B, T, R] masks. Without a capacity only routed tokens are ever visible, so a row's columns are its
// carried-in slots [0, L0) and its tokens (routed ones first, in time order, then the rest as padding). The results,
// padding included, are those of the PyTorch form, element for element.
//
// length [B] int64 (the carried-in cache), L0 its slot count, starts and routed [B, T] bool, multiple: the width the
// candidates are padded to. Returns candidates [B, S] int64 (S a multiple of `multiple`), seen [B, T, S] bool,
// final_source [B, max(1, max length)] int64 and final_length [B] int64.
std::vector<at::Tensor> plan_unbounded(at::Tensor length, int64_t L0, at::Tensor starts, at::Tensor routed,
                                       int64_t multiple) {
  const int64_t B = starts.size(0), T = starts.size(1);
  const int64_t *lp = length.data_ptr<int64_t>();
  const bool *sp = starts.data_ptr<bool>(), *rp = routed.data_ptr<bool>();
  // tokens[b]: the routed steps in time order, then the others; columns: the carried slots, then L0 + those tokens
  std::vector<int64_t> n_routed(B), tokens(B * T), episode(B * T);
  int64_t R = 1;
  for (int64_t b = 0; b < B; ++b) {
    int64_t n = 0, e = 0;
    for (int64_t t = 0; t < T; ++t) {
      e += sp[b * T + t];
      episode[b * T + t] = e;
      if (rp[b * T + t]) tokens[b * T + n++] = t;
    }
    n_routed[b] = n;
    for (int64_t t = 0, m = n; t < T; ++t)
      if (!rp[b * T + t]) tokens[b * T + m++] = t;
    R = std::max(R, n);
  }
  const int64_t C = L0 + R;
  auto visible_at = [&](int64_t b, int64_t t, int64_t c) -> bool {
    const int64_t e = episode[b * T + t];
    if (c < L0) return e == 0 && c < lp[b];
    const int64_t r = c - L0;
    if (r >= n_routed[b]) return false;
    const int64_t tok = tokens[b * T + r];
    return tok <= t && episode[b * T + tok] == e;
  };
  auto column = [&](int64_t b, int64_t c) -> int64_t { return c < L0 ? c : L0 + tokens[b * T + c - L0]; };
  // The columns some token sees, first, in order (then the rest), and the columns the last token sees
  std::vector<int64_t> used(B * C), kept(B * C), n_used(B), n_kept(B);
  int64_t W = 1, Lf = 1;
  for (int64_t b = 0; b < B; ++b) {
    std::vector<char> any(C, 0), last(C, 0);
    for (int64_t c = 0; c < C; ++c) {
      last[c] = visible_at(b, T - 1, c);
      if (c < L0) {  // a carried slot is seen by the carried episode's first token if by any
        any[c] = visible_at(b, 0, c);
      } else if (c - L0 < n_routed[b]) {  // a routed token is seen by itself
        any[c] = 1;
      }
    }
    n_used[b] = ham_rl_columns::chosen_first(any.data(), C, used.data() + b * C);
    n_kept[b] = ham_rl_columns::chosen_first(last.data(), C, kept.data() + b * C);
    W = std::max(W, n_used[b]);
    Lf = std::max(Lf, n_kept[b]);
  }
  const int64_t S = W + (multiple - W % multiple) % multiple;
  auto long_opts = length.options();
  auto candidates = at::empty({B, S}, long_opts);
  auto seen = at::zeros({B, T, S}, starts.options());
  auto final_source = at::empty({B, Lf}, long_opts);
  auto final_length = at::empty({B}, long_opts);
  int64_t *cp = candidates.data_ptr<int64_t>(), *fsp = final_source.data_ptr<int64_t>();
  int64_t* flp = final_length.data_ptr<int64_t>();
  bool* vp = seen.data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < S; ++j) {
      const int64_t c = j < W ? used[b * C + j] : 0;  // padding: column 0 again, never seen
      cp[b * S + j] = column(b, c);
      if (j < W)
        for (int64_t t = 0; t < T; ++t) vp[(b * T + t) * S + j] = visible_at(b, t, c);
    }
    for (int64_t j = 0; j < Lf; ++j) fsp[b * Lf + j] = column(b, kept[b * C + j]);
    flp[b] = n_kept[b];
  }
  return {candidates, seen, final_source, final_length};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ham_rl, m) {
  m.def("plan_capacity", &plan_capacity);
  m.def("plan_unbounded", &plan_unbounded);
}
