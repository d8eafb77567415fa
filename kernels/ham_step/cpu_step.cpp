// The HAM rollout step for B envs as one native call on CPU tensors (cpu_step.py builds and calls it;
// kernels/native.py says how it is built). Two ops:
//
// ham_step: reference.py's ham_step (some 50 small torch ops a step) as one loop over envs. Per env: reset on a start
// flag; per head the gated delta-rule step (v_hat, the write, the RNN readout); the surprise score (cosine: min over
// heads of 1 - cos(v_hat, v); error: the RMS of v - v_hat over all heads; relative: |v - v_hat| / |v| over all
// heads), or the given router score; routed = score >= tau; the slot (append, or at capacity evict the lowest score,
// ties to the oldest, unless the new score is lower than all); the write into the cache, in place; softmax attention
// over the env's cached entries (and the null entry, with a sink); the two gates.
//
// memory_step: HybridMemory's whole step between its input projections and its output projection, for the HAM layer
// with its local convolution path (hybrid.py): the causal short convolution of the local projection with the env's
// history, SiLU; q and k L2-normalised; the gates (log decay -softplus, sigmoids); the ham_step above; the local path
// added through its gate; RMSNorm. About 150 torch ops a step, one call here.
//
// Shapes (float32 unless said): q, k [B, H, K]; v [B, H, V]; beta, g, gate_rnn, gate_attn [B, H]; state [B, H, K, V];
// keys [B, L, H, K], values [B, L, H, V], scores [B, L] and times [B, L] (int64): the cache, which may be a view
// whose rows are strided (a slice of a larger reservation), written in place; length, episode_step [B] int64; start
// [B] bool; router_score [B] or empty; scale [H]; sink [B, H] or empty. Every other tensor is contiguous.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../vec16.h"
#include "slot_rule.h"

namespace {

using namespace ham_rl_vec;
using ham_rl_slots::choose_slot;
using ham_rl_slots::nan_min;

// out[0:V] = sum_l w[l] x[l * stride : l * stride + V]; blocks of 16 columns accumulate in a register (a row in
// memory, reloaded every l, made the attention's readout most of the step's time).
inline void weighted_sum(const float* w, const float* x, int64_t stride, int64_t n, int64_t V, float* out) {
  if (V % 16 == 0) {
    for (int64_t c = 0; c < V; c += 16) {
      Float16 acc = {};
      for (int64_t l = 0; l < n; ++l) acc += w[l] * load16(x + l * stride + c);
      store16(out + c, acc);
    }
    return;
  }
  std::fill(out, out + V, 0.0f);
  for (int64_t l = 0; l < n; ++l)
    for (int64_t j = 0; j < V; ++j) out[j] += w[l] * x[l * stride + j];
}

// NaN-propagating min and max, as torch's amin/amax (a NaN anywhere gives NaN).
inline float nan_max(float a, float b) { return (std::isnan(a) || a > b) ? a : b; }

// What stays the same for every env of one call.
struct Step {
  int64_t H, K, V, L;
  const float* state;  // [B, H, K, V] before the step, or nullptr without the RNN path
  float* new_state;    // [B, H, K, V], or nullptr without the RNN path
  float *keys, *values, *scores;
  int64_t* times;
  int64_t ks, vs, ss, ts;  // row strides of the cache tensors
  const float* router;     // [B] or nullptr (surprise score)
  const float* scale;      // [H]
  const float* sink;       // [B, H] or nullptr
  float tau;
  int64_t capacity;
  bool use_rnn, use_attention;
  int64_t score_kind;  // 0 cosine, 1 error, 2 relative
};

struct Scratch {
  std::vector<float> vh, u, logits;
  explicit Scratch(const Step& s) : vh(s.V), u(s.V), logits(s.L + 1) {}
};

// One env's step: q, k [H, K], v [H, V] and the per-head scalars of env b; writes o [H, V] (the gated sum) and returns
// the env's new cache length, its score and whether it was routed.
void env_step(const Step& s, Scratch& w, int64_t b, const float* q, const float* k, const float* v, const float* beta,
              const float* g, const float* gate_rnn, const float* gate_attn, int64_t length, bool start,
              int64_t episode_step, float* o, int64_t& new_length, float& score_out, bool& routed_out) {
  const int64_t H = s.H, K = s.K, V = s.V, KV = K * V;
  const float inf = std::numeric_limits<float>::infinity();
  int64_t len = start ? 0 : length;
  float score = 1.0f;
  std::fill(o, o + H * V, 0.0f);
  if (s.use_rnn) {
    float cos_min = 0.0f, err2 = 0.0f, v2 = 0.0f;
    float* __restrict__ vh = w.vh.data();  // restrict: these never alias S, so the loops over j vectorise
    float* __restrict__ u = w.u.data();
    for (int64_t h = 0; h < H; ++h) {
      const float *qt = q + h * K, *kt = k + h * K, *vt = v + h * V;
      float* __restrict__ S = s.new_state + (b * H + h) * KV;
      if (start) {
        std::fill(S, S + KV, 0.0f);  // a select, not a multiply: a finished episode's NaN does not survive
      } else {
        std::copy(s.state + (b * H + h) * KV, s.state + (b * H + h + 1) * KV, S);
      }
      const float a = std::exp(g[h]), bt = beta[h];
      float dot = 0.0f, n_vh = 0.0f, n_v = 0.0f;
      float* __restrict__ ot = o + h * V;
      if (V % 16 == 0) {
        // Columns are independent in the delta rule but for the four sums, so each block of 16 columns runs from
        // registers: its prediction, its write and its readout, with no store and reload of a partial row.
        Float16 dv = {}, nhv = {}, nvv = {}, ev = {};
        for (int64_t c = 0; c < V; c += 16) {
          Float16 acc = {};
          for (int64_t i = 0; i < K; ++i) acc += kt[i] * load16(S + i * V + c);
          const Float16 vhc = a * acc, vc = load16(vt + c), diff = vc - vhc, uc = bt * diff;
          dv += vhc * vc;
          nhv += vhc * vhc;
          nvv += vc * vc;
          ev += diff * diff;
          Float16 oc = {};
          for (int64_t i = 0; i < K; ++i) {
            const Float16 row = a * load16(S + i * V + c) + kt[i] * uc;
            store16(S + i * V + c, row);
            oc += qt[i] * row;
          }
          store16(ot + c, gate_rnn[h] * oc);
        }
        dot = sum16(dv);
        n_vh = sum16(nhv);
        n_v = sum16(nvv);
        err2 += sum16(ev);
      } else {
        std::fill(vh, vh + V, 0.0f);
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < V; ++j) vh[j] += kt[i] * S[i * V + j];
        for (int64_t j = 0; j < V; ++j) {
          vh[j] *= a;
          u[j] = bt * (vt[j] - vh[j]);
          dot += vh[j] * vt[j];
          n_vh += vh[j] * vh[j];
          n_v += vt[j] * vt[j];
          err2 += (vt[j] - vh[j]) * (vt[j] - vh[j]);
        }
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < V; ++j) {
            S[i * V + j] = a * S[i * V + j] + kt[i] * u[j];
            ot[j] += qt[i] * S[i * V + j];
          }
        for (int64_t j = 0; j < V; ++j) ot[j] *= gate_rnn[h];
      }
      v2 += n_v;
      const float eps = 1e-8f;
      const float c = 1.0f - dot / (std::max(std::sqrt(n_vh), eps) * std::max(std::sqrt(n_v), eps));
      cos_min = h == 0 ? c : nan_min(cos_min, c);
    }
    if (s.score_kind == 1) {
      score = std::sqrt(err2 / static_cast<float>(H * V));
    } else if (s.score_kind == 2) {  // relative: |v - v_hat| / max(|v|, eps) over all heads, as the reference
      score = std::sqrt(err2) / std::max(std::sqrt(v2), 1e-8f);
    } else {
      score = cos_min;
    }
  }
  if (s.router) score = s.router[b];
  const bool routed = score >= s.tau;
  if (s.use_attention) {
    float* keys = s.keys + b * s.ks;
    float* values = s.values + b * s.vs;
    float* scores = s.scores + b * s.ss;
    int64_t* times = s.times + b * s.ts;
    // The slot: append below capacity; at capacity the lowest score goes (ties: the oldest), if the new is higher.
    const auto [slot, stored, full] = choose_slot(scores, times, len, score, routed, s.capacity);
    if (stored) {
      std::copy(k, k + H * K, keys + slot * H * K);
      std::copy(v, v + H * V, values + slot * H * V);
      scores[slot] = score;
      times[slot] = episode_step;
      if (!full) ++len;
    }
    // Softmax attention over the env's len entries (and the null entry with value 0, with a sink).
    for (int64_t h = 0; h < H; ++h) {
      const float* qt = q + h * K;
      const float* sink = s.sink ? s.sink + b * H + h : nullptr;
      float m = -inf;
      float* logits = w.logits.data();
      strided_dots(keys + h * K, H * K, qt, K, len, logits);
      for (int64_t l = 0; l < len; ++l) {
        logits[l] *= s.scale[h];
        m = nan_max(m, logits[l]);
      }
      if (sink) m = nan_max(m, *sink);
      if (len == 0 && !sink) continue;  // nothing to read: o_kv = 0
      m = std::max(m, -1e30f);  // masked_softmax's floor; a NaN stays NaN and makes every weight NaN, as there
      // The sink's logit rides in slot len, so one vector exp covers it with the entries.
      const int64_t n = len + (sink ? 1 : 0);
      if (sink) logits[len] = *sink;
      for (int64_t l = 0; l < n; ++l) logits[l] -= m;
      exp_n(logits, logits, n);
      float total = 0.0f;
      for (int64_t l = 0; l < n; ++l) total += logits[l];
      total = std::max(total, 1e-30f);
      for (int64_t l = 0; l < len; ++l) logits[l] /= total;
      weighted_sum(logits, values + h * V, H * V, len, V, w.vh.data());
      float* ot = o + h * V;
      for (int64_t j = 0; j < V; ++j) ot[j] += gate_attn[h] * w.vh[j];
    }
  }
  new_length = len;
  score_out = score;
  routed_out = routed;
}

Step make_step(const at::Tensor& q, const at::Tensor& v, const at::Tensor& state, at::Tensor& new_state, at::Tensor& keys,
               at::Tensor& values, at::Tensor& scores, at::Tensor& times, double threshold, int64_t capacity,
               const at::Tensor& router_score, bool use_rnn, bool use_attention, const at::Tensor& scale,
               int64_t score_kind, const at::Tensor& sink) {
  return Step{q.size(1), q.size(2), v.size(2), keys.size(1),
              use_rnn ? state.data_ptr<float>() : nullptr, use_rnn ? new_state.data_ptr<float>() : nullptr,
              keys.data_ptr<float>(), values.data_ptr<float>(), scores.data_ptr<float>(), times.data_ptr<int64_t>(),
              keys.stride(0), values.stride(0), scores.stride(0), times.stride(0),
              router_score.numel() ? router_score.data_ptr<float>() : nullptr, scale.data_ptr<float>(),
              sink.numel() ? sink.data_ptr<float>() : nullptr, static_cast<float>(threshold), capacity, use_rnn,
              use_attention, score_kind};
}

inline float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }  // torch's threshold of 20

// x / max(||x||, 1e-12), as l2norm.py, from src into dst (n values).
inline void l2norm(const float* src, float* dst, int64_t n) {
  float sq = 0.0f;
  for (int64_t i = 0; i < n; ++i) sq += src[i] * src[i];
  const float inv = 1.0f / std::max(std::sqrt(sq), 1e-12f);
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * inv;
}

}  // namespace

std::vector<at::Tensor> ham_step(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor beta, at::Tensor g,
                                 at::Tensor gate_rnn, at::Tensor gate_attn, at::Tensor state, at::Tensor keys,
                                 at::Tensor values, at::Tensor scores, at::Tensor times, at::Tensor length,
                                 at::Tensor start, at::Tensor episode_step, double threshold, int64_t capacity,
                                 at::Tensor router_score, bool use_rnn, bool use_attention, at::Tensor scale,
                                 int64_t score_kind, at::Tensor sink) {
  const int64_t B = q.size(0), H = q.size(1), K = q.size(2), V = v.size(2);
  auto o = at::empty({B, H, V}, q.options());
  auto new_state = use_rnn ? at::empty({B, H, K, V}, q.options()) : at::empty({0}, q.options());
  auto new_length = at::empty({B}, length.options());
  auto score_out = at::empty({B}, q.options());
  auto routed_out = at::empty({B}, start.options());
  const Step s = make_step(q, v, state, new_state, keys, values, scores, times, threshold, capacity, router_score,
                           use_rnn, use_attention, scale, score_kind, sink);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *bp = beta.data_ptr<float>(), *gp = g.data_ptr<float>();
  const float *grp = gate_rnn.data_ptr<float>(), *gap = gate_attn.data_ptr<float>();
  const int64_t *len_p = length.data_ptr<int64_t>(), *step_p = episode_step.data_ptr<int64_t>();
  const bool* start_p = start.data_ptr<bool>();
  float* o_p = o.data_ptr<float>();
  int64_t* nl_p = new_length.data_ptr<int64_t>();
  float* score_p = score_out.data_ptr<float>();
  bool* routed_p = routed_out.data_ptr<bool>();
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    Scratch w(s);
    for (int64_t b = begin; b < end; ++b)
      env_step(s, w, b, qp + b * H * K, kp + b * H * K, vp + b * H * V, bp + b * H, gp + b * H, grp + b * H,
               gap + b * H, len_p[b], start_p[b], step_p[b], o_p + b * H * V, nl_p[b], score_p[b], routed_p[b]);
  });
  return {o, new_state, new_length, score_out, routed_out};
}

// HybridMemory's step from its three input projections to the RMSNorm before its output projection (the HAM layer
// with conv_path="local", the convolution not folded): qkv [B, 3 H D] (q, k, v blocks), local [B, H D] (the local
// path's projection, before the convolution), gates [B, 5 H] (log decay, beta, RNN gate, attention gate, local gate
// logits, in that order), history [B, C - 1, H D] (the local projections of the env's last C - 1 steps), conv_weight
// [C, H D], conv_bias [H D], norm_weight [H D]; the rest as ham_step. Returns (RMSNorm output [B, H D], new state,
// new history, new length, score, routed).
std::vector<at::Tensor> memory_step(at::Tensor qkv, at::Tensor local, at::Tensor gates, at::Tensor history,
                                    at::Tensor conv_weight, at::Tensor conv_bias, at::Tensor state, at::Tensor keys,
                                    at::Tensor values, at::Tensor scores, at::Tensor times, at::Tensor length,
                                    at::Tensor start, at::Tensor episode_step, double threshold, int64_t capacity,
                                    at::Tensor scale, int64_t score_kind, at::Tensor sink, at::Tensor norm_weight,
                                    double norm_eps) {
  const int64_t B = qkv.size(0), H = state.size(1), D = state.size(2), HD = H * D, C = conv_weight.size(0);
  auto q = at::empty({B, H, D}, qkv.options()), k = at::empty({B, H, D}, qkv.options());
  auto out = at::empty({B, HD}, qkv.options());
  auto new_state = at::empty({B, H, D, D}, qkv.options());
  auto new_history = at::empty({B, C - 1, HD}, qkv.options());
  auto new_length = at::empty({B}, length.options());
  auto score_out = at::empty({B}, qkv.options());
  auto routed_out = at::empty({B}, start.options());
  const Step s = make_step(q, q, state, new_state, keys, values, scores, times, threshold, capacity,
                           at::empty({0}, qkv.options()), true, true, scale, score_kind, sink);
  const float *qkv_p = qkv.data_ptr<float>(), *loc_p = local.data_ptr<float>(), *z_p = gates.data_ptr<float>();
  const float *hist_p = history.data_ptr<float>(), *cw = conv_weight.data_ptr<float>(), *cb = conv_bias.data_ptr<float>();
  const float* nw = norm_weight.data_ptr<float>();
  const int64_t *len_p = length.data_ptr<int64_t>(), *step_p = episode_step.data_ptr<int64_t>();
  const bool* start_p = start.data_ptr<bool>();
  float *q_p = q.data_ptr<float>(), *k_p = k.data_ptr<float>(), *out_p = out.data_ptr<float>();
  float* nh_p = new_history.data_ptr<float>();
  int64_t* nl_p = new_length.data_ptr<int64_t>();
  float* score_p = score_out.data_ptr<float>();
  bool* routed_p = routed_out.data_ptr<bool>();
  const float eps = static_cast<float>(norm_eps);
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    Scratch w(s);
    std::vector<float> gv(5 * H), o(HD), pre(HD), silu_exp(HD);  // silu_exp: exp(-pre) of the local path
    for (int64_t b = begin; b < end; ++b) {
      const float* xq = qkv_p + b * 3 * HD;
      for (int64_t h = 0; h < H; ++h) {
        l2norm(xq + h * D, q_p + (b * H + h) * D, D);
        l2norm(xq + HD + h * D, k_p + (b * H + h) * D, D);
      }
      const float* z = z_p + b * 5 * H;
      for (int64_t h = 0; h < H; ++h) gv[h] = -softplus(z[h]);
      for (int64_t i = H; i < 5 * H; ++i) gv[i] = -z[i];
      exp_n(gv.data() + H, gv.data() + H, 4 * H);
      for (int64_t i = H; i < 5 * H; ++i) gv[i] = 1.0f / (1.0f + gv[i]);  // sigmoid(z) = 1 / (1 + exp(-z))
      // gv: [0, H) log decay, then beta, RNN gate, attention gate, local gate
      env_step(s, w, b, q_p + b * HD, k_p + b * HD, xq + 2 * HD, gv.data() + H, gv.data(), gv.data() + 2 * H,
               gv.data() + 3 * H, len_p[b], start_p[b], step_p[b], o.data(), nl_p[b], score_p[b], routed_p[b]);
      // The local path: SiLU(bias + sum_j w_j x_{t-j}), lags before the episode's start 0 (selected, not multiplied:
      // a finished episode's NaN in the history must not leak), through its gate.
      const float* xl = loc_p + b * HD;
      const float* hist = hist_p + b * (C - 1) * HD;
      const int64_t t = step_p[b];
      for (int64_t c = 0; c < HD; ++c) pre[c] = cb[c] + xl[c] * cw[c];
      for (int64_t j = 1; j < C && j <= t; ++j) {
        const float *xj = hist + (C - 1 - j) * HD, *wj = cw + j * HD;
        for (int64_t c = 0; c < HD; ++c) pre[c] += xj[c] * wj[c];
      }
      for (int64_t c = 0; c < HD; ++c) silu_exp[c] = -pre[c];
      exp_n(silu_exp.data(), silu_exp.data(), HD);
      for (int64_t c = 0; c < HD; ++c) o[c] += gv[4 * H + c / D] * (pre[c] / (1.0f + silu_exp[c]));
      float* nh = nh_p + b * (C - 1) * HD;
      for (int64_t r = 0; r + 1 < C - 1; ++r) std::copy(hist + (r + 1) * HD, hist + (r + 2) * HD, nh + r * HD);
      if (C > 1) std::copy(xl, xl + HD, nh + (C - 2) * HD);
      // RMSNorm: o * rsqrt(mean(o^2) + eps) * weight
      float sq = 0.0f;
      for (int64_t c = 0; c < HD; ++c) sq += o[c] * o[c];
      const float r = 1.0f / std::sqrt(sq / static_cast<float>(HD) + eps);
      for (int64_t c = 0; c < HD; ++c) out_p[b * HD + c] = o[c] * r * nw[c];
    }
  });
  return {out, new_state, new_history, new_length, score_out, routed_out};
}

// HybridMemory's whole step, x [B, input] to y [B, H D]: its projections (qkv_weight [3 H D, input], local_weight
// [H D, input], gates_weight [5 H, input] and gates_bias, out_weight [H D, H D] and out_bias; the biases may be None)
// as at::linear, the calls its nn.Linear modules make, around memory_step, with the attention's temperature as its log
// (log_scale [H]), the routed steps added to `stored` and the envs to `seen` (0-dim float64 counts, in place); so a
// rollout step is one call from Python, not a dozen ops. Returns (y, then memory_step's returns after its output).
std::vector<at::Tensor> layer_step(at::Tensor x, at::Tensor qkv_weight, at::Tensor local_weight, at::Tensor gates_weight,
                                   std::optional<at::Tensor> gates_bias, at::Tensor out_weight,
                                   std::optional<at::Tensor> out_bias, at::Tensor history, at::Tensor conv_weight,
                                   at::Tensor conv_bias, at::Tensor state, at::Tensor keys, at::Tensor values,
                                   at::Tensor scores, at::Tensor times, at::Tensor length, at::Tensor start,
                                   at::Tensor episode_step, double threshold, int64_t capacity, at::Tensor log_scale,
                                   int64_t score_kind, std::optional<at::Tensor> sink, at::Tensor norm_weight,
                                   double norm_eps, at::Tensor stored, at::Tensor seen) {
  at::NoGradGuard no_grad;
  auto r = memory_step(at::linear(x, qkv_weight), at::linear(x, local_weight), at::linear(x, gates_weight, gates_bias),
                       history, conv_weight, conv_bias, state, keys, values, scores, times, length, start, episode_step,
                       threshold, capacity, log_scale.exp(), score_kind,
                       sink.has_value() ? sink->contiguous() : at::empty({0}, x.options()), norm_weight, norm_eps);
  r[0] = at::linear(r[0], out_weight, out_bias);
  const bool* routed = r[5].data_ptr<bool>();
  int64_t count = 0;
  for (int64_t b = 0; b < r[5].numel(); ++b) count += routed[b];
  *stored.data_ptr<double>() += static_cast<double>(count);
  *seen.data_ptr<double>() += static_cast<double>(r[5].numel());
  return r;
}

TORCH_LIBRARY_FRAGMENT(ham_rl, m) {
  m.def("ham_step", &ham_step);
  m.def("memory_step", &memory_step);
  m.def("layer_step", &layer_step);
}
