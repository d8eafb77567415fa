// The HAM rollout step for B envs as one native call on CPU tensors: reference.py's ham_step (some 50 small torch ops
// a step) as one loop over envs (cpu_step.py builds and calls it; kernels/native.py says how it is built).
//
// Per env, as reference.py: reset on a start flag; per head the gated delta-rule step (v_hat, the write, the RNN
// readout); the surprise score (cosine: min over heads of 1 - cos(v_hat, v); error: the RMS of v - v_hat over all
// heads), or the given router score; routed = score >= tau; the slot (append, or at capacity evict the lowest score,
// ties to the oldest, unless the new score is lower than all); the write into the cache, in place; softmax attention
// over the env's cached entries (and the null entry, with a sink); the two gates.
//
// Shapes (float32 unless said): q, k [B, H, K]; v [B, H, V]; beta, g, gate_rnn, gate_attn [B, H]; state [B, H, K, V];
// keys [B, L, H, K], values [B, L, H, V], scores [B, L] and times [B, L] (int64): the cache, which may be a view
// whose rows are strided (a slice of a larger reservation), written in place; length, episode_step [B] int64; start
// [B] bool; router_score [B] or empty; scale [H]; sink [B, H] or empty. Every other tensor is contiguous.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

// NaN-propagating min and max, as torch's amin/amax (a NaN anywhere gives NaN).
inline float nan_min(float a, float b) { return (std::isnan(a) || a < b) ? a : b; }
inline float nan_max(float a, float b) { return (std::isnan(a) || a > b) ? a : b; }

}  // namespace

std::vector<at::Tensor> ham_step(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor beta, at::Tensor g,
                                 at::Tensor gate_rnn, at::Tensor gate_attn, at::Tensor state, at::Tensor keys,
                                 at::Tensor values, at::Tensor scores, at::Tensor times, at::Tensor length,
                                 at::Tensor start, at::Tensor episode_step, double threshold, int64_t capacity,
                                 at::Tensor router_score, bool use_rnn, bool use_attention, at::Tensor scale,
                                 int64_t score_kind, at::Tensor sink) {
  const int64_t B = q.size(0), H = q.size(1), K = q.size(2), V = v.size(2);
  const int64_t KV = K * V;
  auto o = at::zeros({B, H, V}, q.options());
  auto new_state = use_rnn ? at::empty({B, H, K, V}, q.options()) : at::empty({0}, q.options());
  auto new_length = at::empty({B}, length.options());
  auto score_out = at::empty({B}, q.options());
  auto routed_out = at::empty({B}, start.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *bp = beta.data_ptr<float>(), *gp = g.data_ptr<float>();
  const float *grp = gate_rnn.data_ptr<float>(), *gap = gate_attn.data_ptr<float>();
  const float* sp = use_rnn ? state.data_ptr<float>() : nullptr;
  float* nsp = use_rnn ? new_state.data_ptr<float>() : nullptr;
  float *keys_p = keys.data_ptr<float>(), *values_p = values.data_ptr<float>(), *scores_p = scores.data_ptr<float>();
  int64_t* times_p = times.data_ptr<int64_t>();
  const int64_t ks = keys.stride(0), vs = values.stride(0), ss = scores.stride(0), ts = times.stride(0);
  const int64_t L = keys.size(1);
  const int64_t *len_p = length.data_ptr<int64_t>(), *step_p = episode_step.data_ptr<int64_t>();
  const bool* start_p = start.data_ptr<bool>();
  const float* router_p = router_score.numel() ? router_score.data_ptr<float>() : nullptr;
  const float* scale_p = scale.data_ptr<float>();
  const float* sink_p = sink.numel() ? sink.data_ptr<float>() : nullptr;
  float* o_p = o.data_ptr<float>();
  int64_t* nl_p = new_length.data_ptr<int64_t>();
  float* score_p = score_out.data_ptr<float>();
  bool* routed_p = routed_out.data_ptr<bool>();
  const float tau = static_cast<float>(threshold);
  const float inf = std::numeric_limits<float>::infinity();

  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> vh(V), u(V), logits(L + 1);
    for (int64_t b = begin; b < end; ++b) {
      int64_t len = start_p[b] ? 0 : len_p[b];
      float score = 1.0f;
      if (use_rnn) {
        float cos_min = 0.0f, err2 = 0.0f;
        for (int64_t h = 0; h < H; ++h) {
          const int64_t bh = b * H + h;
          const float *qt = qp + bh * K, *kt = kp + bh * K, *vt = vp + bh * V;
          float* S = nsp + bh * KV;
          if (start_p[b]) {
            std::fill(S, S + KV, 0.0f);  // a select, not a multiply: a finished episode's NaN does not survive
          } else {
            std::copy(sp + bh * KV, sp + (bh + 1) * KV, S);
          }
          const float a = std::exp(gp[bh]), bt = bp[bh];
          std::fill(vh.begin(), vh.end(), 0.0f);
          for (int64_t i = 0; i < K; ++i)
            for (int64_t j = 0; j < V; ++j) vh[j] += kt[i] * S[i * V + j];
          float dot = 0.0f, n_vh = 0.0f, n_v = 0.0f;
          for (int64_t j = 0; j < V; ++j) {
            vh[j] *= a;
            u[j] = bt * (vt[j] - vh[j]);
            dot += vh[j] * vt[j];
            n_vh += vh[j] * vh[j];
            n_v += vt[j] * vt[j];
            err2 += (vt[j] - vh[j]) * (vt[j] - vh[j]);
          }
          float* ot = o_p + bh * V;
          const float gr = grp[bh];
          for (int64_t j = 0; j < V; ++j) ot[j] = 0.0f;
          for (int64_t i = 0; i < K; ++i)
            for (int64_t j = 0; j < V; ++j) {
              S[i * V + j] = a * S[i * V + j] + kt[i] * u[j];
              ot[j] += qt[i] * S[i * V + j];
            }
          for (int64_t j = 0; j < V; ++j) ot[j] *= gr;
          const float eps = 1e-8f;
          const float c = 1.0f - dot / (std::max(std::sqrt(n_vh), eps) * std::max(std::sqrt(n_v), eps));
          cos_min = h == 0 ? c : nan_min(cos_min, c);
        }
        score = score_kind == 1 ? std::sqrt(err2 / static_cast<float>(H * V)) : cos_min;
      }
      if (router_p) score = router_p[b];
      const bool routed = score >= tau;
      score_p[b] = score;
      routed_p[b] = routed;
      if (use_attention) {
        // The slot: append below capacity; at capacity the lowest score goes (ties: the oldest), if the new is higher.
        int64_t slot = len;
        bool stored = routed;
        bool full = false;
        if (capacity > 0) {
          full = len >= capacity;
          float min_score = inf;
          for (int64_t l = 0; l < len; ++l) min_score = nan_min(min_score, scores_p[b * ss + l]);
          int64_t victim = 0, oldest = std::numeric_limits<int64_t>::max();
          for (int64_t l = 0; l < len; ++l)
            if (scores_p[b * ss + l] == min_score && times_p[b * ts + l] < oldest) {
              oldest = times_p[b * ts + l];
              victim = l;
            }
          stored = routed && (!full || score >= min_score);
          slot = (stored && full) ? victim : len;
        }
        if (stored) {
          std::copy(kp + b * H * K, kp + (b + 1) * H * K, keys_p + b * ks + slot * H * K);
          std::copy(vp + b * H * V, vp + (b + 1) * H * V, values_p + b * vs + slot * H * V);
          scores_p[b * ss + slot] = score;
          times_p[b * ts + slot] = step_p[b];
          if (!full) ++len;
        }
        // Softmax attention over the env's len entries (and the null entry with value 0, with a sink).
        for (int64_t h = 0; h < H; ++h) {
          const int64_t bh = b * H + h;
          const float* qt = qp + bh * K;
          const float sc = scale_p[h];
          float m = -inf;
          for (int64_t l = 0; l < len; ++l) {
            const float* kl = keys_p + b * ks + (l * H + h) * K;
            float dot = 0.0f;
            for (int64_t i = 0; i < K; ++i) dot += kl[i] * qt[i];
            logits[l] = dot * sc;
            m = nan_max(m, logits[l]);
          }
          if (sink_p) m = nan_max(m, sink_p[bh]);
          if (len == 0 && !sink_p) continue;  // nothing to read: o_kv = 0
          m = std::max(m, -1e30f);  // masked_softmax's floor; a NaN stays NaN and makes every weight NaN, as there
          float total = sink_p ? std::exp(sink_p[bh] - m) : 0.0f;
          for (int64_t l = 0; l < len; ++l) {
            logits[l] = std::exp(logits[l] - m);
            total += logits[l];
          }
          total = std::max(total, 1e-30f);
          std::fill(vh.begin(), vh.end(), 0.0f);
          for (int64_t l = 0; l < len; ++l) {
            const float w = logits[l] / total;
            const float* vl = values_p + b * vs + (l * H + h) * V;
            for (int64_t j = 0; j < V; ++j) vh[j] += w * vl[j];
          }
          float* ot = o_p + bh * V;
          const float ga = gap[bh];
          for (int64_t j = 0; j < V; ++j) ot[j] += ga * vh[j];
        }
      }
      nl_p[b] = len;
    }
  });
  return {o, new_state, new_length, score_out, routed_out};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("ham_step", &ham_step, "HAM rollout step for B envs (CPU)"); }
