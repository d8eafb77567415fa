// The HAM layer's sequence form as two native calls, the forward and the backward of cpu_sequence.py's autograd node.
//
// Forward: the three input projections (declining, with an empty result, where one of them, the carried-in state or
// the attention's temperature is not finite: the op-by-op path contains that), the short convolution, the tokens'
// norms and gates, the delta rule, the router's score, the cache plan and the candidates each token reads, torch's
// CPU flash attention over them, the readout, the output projection and the cache after the segment. Backward: the
// same in reverse, the attention's key and value gradients scattered to their tokens, the three input projections'
// gradients accumulated into the input's in place. The layer's other kernels are called through the dispatcher (each lives in its own source);
// between them are plain loops, where the same steps from Python were some 80 ops, each with its dispatch and an
// interpreter's worth of branches around it.
//
// Forward: x [B, T, C]; weights: qkv, local, gates, gates' bias, conv, conv's bias, log_scale, norm, out, out's bias;
// starts [B, T] bool; steps [B, T] int64; S0 [B, H, d, d] (empty: none); history0 [B, K - 1, D]; the carried-in
// cache (keys, values [B, L0, H, d], scores [B, L0], times [B, L0] int64, length [B] int64); tau (0-dim); capacity;
// score_kind (cpu_step.py's numbering); heads; r, a, l: the readout's gate channels; eps: the norm's; block: the delta
// rule's checkpoint spacing. Returns y, the state after the segment (S, history, keys, values, scores, times,
// length) and what the backward reads, in its order; or nothing.
//
// Backward: saved as the forward returned it; weights: qkv, local, gates, conv, log_scale, norm, out, contiguous; dy
// [B, T, D_out]; dS, dkeys, dvalues: the final state's gradients (empty: none); r, a, l; L0: the carried-in cache's
// slots; block. Returns the gradients of x, of the three projections' weights, the gates' bias, the convolution's
// weight and bias, log_scale, the norm's weight, and the output projection's weight and bias.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../ham_step/columns.h"

namespace {

using Tensors = std::vector<at::Tensor>;
using Tn = at::Tensor;

// dst [B, T, H, d] (contiguous) += the rows of src that belong to the segment's tokens: src[b, j] (src [B, S, H, d],
// or [B, H, S, d] with heads_first) goes to token index[b, j] - L0; a carried-in slot (index < L0) needs no gradient.
void add_to_tokens(Tn& dst, const Tn& src, const Tn& index, int64_t L0, bool heads_first) {
  const int64_t B = index.size(0), S = index.size(1), T = dst.size(1), H = dst.size(2), d = dst.size(3);
  const auto ix = index.accessor<int64_t, 2>();
  const auto sa = src.accessor<float, 4>();
  float* out = dst.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < S; ++j) {
      const int64_t t = ix[b][j] - L0;
      if (t < 0) continue;
      for (int64_t h = 0; h < H; ++h) {
        float* o = out + ((b * T + t) * H + h) * d;
        for (int64_t i = 0; i < d; ++i) o[i] += heads_first ? sa[b][h][j][i] : sa[b][j][h][i];
      }
    }
}

// rows of src [B, L, H, d] (contiguous) picked by index [B, S] -> [B, S, H, d]
Tn gather_rows(const Tn& src, const Tn& index) {
  const int64_t B = index.size(0), S = index.size(1), L = src.size(1), row = src.size(2) * src.size(3);
  auto out = at::empty({B, S, src.size(2), src.size(3)}, src.options());
  const float* sp = src.data_ptr<float>();
  const int64_t* ip = index.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < S; ++j)
      std::copy_n(sp + (b * L + ip[b * S + j]) * row, row, op + (b * S + j) * row);
  return out;
}

// cache_plan.seen_candidates: the columns of visible [B, T, C] some token sees, first and in order (then the rest),
// W = max(1, most used) of them padded with column 0 to a multiple of `multiple`; (index [B, S], seen [B, T, S]).
Tensors seen_columns(const Tn& visible, int64_t multiple) {
  const int64_t B = visible.size(0), T = visible.size(1), C = visible.size(2);
  const bool* vp = visible.data_ptr<bool>();
  std::vector<int64_t> order(B * C);
  int64_t W = 1;
  for (int64_t b = 0; b < B; ++b) {
    std::vector<char> any(C, 0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) any[c] |= vp[(b * T + t) * C + c];
    W = std::max(W, ham_rl_columns::chosen_first(any.data(), C, order.data() + b * C));
  }
  const int64_t S = W + (multiple - W % multiple) % multiple;
  auto index = at::zeros({B, S}, visible.options().dtype(at::kLong));
  auto seen = at::zeros({B, T, S}, visible.options());
  int64_t* ip = index.data_ptr<int64_t>();
  bool* sp = seen.data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < W; ++j) {
      const int64_t c = order[b * C + j];
      ip[b * S + j] = c;
      for (int64_t t = 0; t < T; ++t) sp[(b * T + t) * S + j] = vp[(b * T + t) * C + c];
    }
  return {index, seen};
}

// kernels/ham_step/reference.py's surprise_score, the same ops: 0 cosine, 1 error, 2 relative
Tn router_score(const Tn& v_hat, const Tn& v, int64_t kind) {
  if (kind == 1) return (v - v_hat).square().mean({-2, -1}).sqrt();
  if (kind == 2) return (v - v_hat).square().sum({-2, -1}).sqrt() / v.square().sum({-2, -1}).sqrt().clamp_min(1e-8);
  const double eps = 1e-8;
  const Tn cos = (v_hat * v).sum(-1) /
                 (at::linalg_vector_norm(v_hat, 2, {-1}).clamp_min(eps) * at::linalg_vector_norm(v, 2, {-1}).clamp_min(eps));
  return (1.0 - cos).amin(-1);
}

bool finite(const Tn& t) { return t.numel() == 0 || std::isfinite(t.sum().item<float>()); }

Tensors layer_sequence_forward(Tn x, Tensors w, Tn starts, Tn steps, Tn S0, Tn history0, Tn keys0, Tn values0,
                               Tn scores0, Tn times0, Tn length0, Tn tau, int64_t capacity, int64_t score_kind,
                               int64_t H, int64_t r, int64_t a, int64_t l, double eps, int64_t block) {
  static const auto conv_forward =
      c10::Dispatcher::singleton().findSchemaOrThrow("ham_rl::conv_forward", "").typed<Tensors(Tn, Tn, Tn, Tn, Tn)>();
  static const auto tokens_forward = c10::Dispatcher::singleton()
                                         .findSchemaOrThrow("ham_rl::layer_tokens_forward", "")
                                         .typed<Tensors(Tn, Tn, Tn, double)>();
  static const auto gdr_forward = c10::Dispatcher::singleton()
                                      .findSchemaOrThrow("ham_rl::gdr_forward", "")
                                      .typed<Tensors(Tn, Tn, Tn, Tn, Tn, Tn, Tn, double, int64_t)>();
  static const auto plan_unbounded = c10::Dispatcher::singleton()
                                         .findSchemaOrThrow("ham_rl::plan_unbounded", "")
                                         .typed<Tensors(Tn, int64_t, Tn, Tn, int64_t)>();
  static const auto plan_capacity = c10::Dispatcher::singleton()
                                        .findSchemaOrThrow("ham_rl::plan_capacity", "")
                                        .typed<Tensors(Tn, Tn, Tn, Tn, Tn, Tn, Tn, int64_t)>();
  static const auto readout_forward = c10::Dispatcher::singleton()
                                          .findSchemaOrThrow("ham_rl::layer_readout_forward", "")
                                          .typed<Tensors(Tn, Tn, Tn, Tn, Tn, int64_t, int64_t, int64_t, double)>();
  const Tn &w_qkv = w[0], &w_local = w[1], &w_gates = w[2], &b_gates = w[3], &w_conv = w[4], &b_conv = w[5];
  const Tn &log_scale = w[6], &w_norm = w[7], &w_out = w[8], &b_out = w[9];
  const int64_t B = x.size(0), T = x.size(1), N = B * T, L0 = keys0.size(1);
  const Tn qkv = at::linear(x, w_qkv), lin = at::linear(x, w_local), z3 = at::linear(x, w_gates, b_gates);
  for (const Tn* t : std::initializer_list<const Tn*>{&qkv, &lin, &z3, &S0, &keys0, &values0})
    if (!finite(*t)) return {};
  if (!finite(log_scale.exp())) return {};  // q and k are unit (or 0): the attention's query is finite where this is
  const int64_t D = lin.size(2), d = D / H, G = z3.size(2) / H;
  const Tn z = z3.view({N, G, H});

  const Tensors conv = conv_forward.call(lin, history0, steps, w_conv, b_conv);
  const Tn &pre = conv[0], &history = conv[1];
  const Tn local = at::silu(pre);
  const Tensors tok = tokens_forward.call(qkv.view({N, 3, H, d}), z, log_scale, 1e-12);
  const Tn &qkvn = tok[0], &gates = tok[1], &q_attn = tok[2], &inv = tok[3], &above = tok[4];
  const Tn qkvn5 = qkvn.view({B, T, 3, H, d}), gates4 = gates.view({B, T, G, H});
  const Tn q = qkvn5.select(2, 0).contiguous(), k = qkvn5.select(2, 1).contiguous(), v = qkvn5.select(2, 2).contiguous();
  const Tn g = gates4.select(2, 0).contiguous(), beta = gates4.select(2, 1).contiguous();
  const Tn st = starts.to(at::kByte).contiguous();
  const Tensors rnn = gdr_forward.call(q, k, v, beta, g, st, S0, 1.0, block);
  const Tn &o_rnn = rnn[0], &v_hat = rnn[1], &S = rnn[2], &checkpoints = rnn[3];

  const Tn score = router_score(v_hat, v, score_kind);  // [B, T]
  const Tn routed = score >= tau;
  Tn cand, seen, src, final_length;
  if (capacity == 0) {
    const Tensors plan = plan_unbounded.call(length0, L0, starts, routed, 16);
    cand = plan[0], seen = plan[1], src = plan[2], final_length = plan[3];
  } else {
    const Tensors plan = plan_capacity.call(scores0, times0, length0, starts, steps, score, routed, capacity);
    const Tensors cols = seen_columns(plan[0], 16);
    cand = cols[0], seen = cols[1], src = plan[1], final_length = plan[2];
  }
  const Tn keys_all = L0 ? at::cat({keys0, k}, 1) : k, values_all = L0 ? at::cat({values0, v}, 1) : v;
  const Tn keys = gather_rows(keys_all, cand), values = gather_rows(values_all, cand);  // [B, S, H, d]
  // What F.scaled_dot_product_attention does on CPU with a bool mask, with the log-sum-exp kept for the backward.
  const Tn mask = at::zeros(seen.sizes(), x.options()).masked_fill_(seen.logical_not(), -INFINITY).unsqueeze(1);
  const Tn qa = q_attn.view({B, T, H, d}).transpose(1, 2), ka = keys.transpose(1, 2), va = values.transpose(1, 2);
  const auto [o_att, lse] = at::_scaled_dot_product_flash_attention_for_cpu(qa, ka, va, 0.0, false, mask, 1.0);
  const Tn anything = seen.any(-1);  // [B, T]; a token that sees nothing reads 0 (older torch gave NaN there)
  const Tn o_kv = at::where(anything.view({B, 1, T, 1}), o_att, 0.0).transpose(1, 2).reshape({N, H, d});
  const Tensors ro = readout_forward.call(o_rnn.view({N, H, d}), o_kv, local.view({N, H, d}), gates, w_norm, r, a, l, eps);
  const Tn &y_norm = ro[0], &rstd = ro[1];
  const Tn y = at::linear(y_norm, w_out, b_out).view({B, T, -1});

  const Tn score_c = score.to(scores0.scalar_type());
  const Tn scores_f = (L0 ? at::cat({scores0, score_c}, 1) : score_c).gather(1, src);
  const Tn times_f = (L0 ? at::cat({times0, steps}, 1) : steps).gather(1, src);
  return {y, S, history, gather_rows(keys_all, src), gather_rows(values_all, src), scores_f, times_f, final_length,
          x, lin, history0, steps, pre, qkvn, gates, z, inv, above, q, k, v, beta, g, st, checkpoints, cand, src,
          mask, anything, qa, ka, va, o_att, lse, o_rnn, o_kv, local, y_norm, rstd};
}

Tensors layer_sequence_backward(Tensors s, Tensors w, Tn dy, Tn dS, Tn dkeys, Tn dvalues, int64_t r, int64_t a,
                                int64_t l, int64_t L0, int64_t block) {
  static const auto readout_backward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ham_rl::layer_readout_backward", "")
          .typed<Tensors(Tn, Tn, Tn, Tn, Tn, Tn, Tn, int64_t, int64_t, int64_t)>();
  static const auto gdr_backward = c10::Dispatcher::singleton()
                                       .findSchemaOrThrow("ham_rl::gdr_backward", "")
                                       .typed<Tensors(Tn, Tn, Tn, Tn, Tn, Tn, Tn, Tn, Tn, Tn, double, int64_t, bool)>();
  static const auto tokens_backward = c10::Dispatcher::singleton()
                                          .findSchemaOrThrow("ham_rl::layer_tokens_backward", "")
                                          .typed<Tensors(Tn, Tn, Tn, Tn, Tn, Tn, Tn, Tn, Tn)>();
  static const auto conv_backward =
      c10::Dispatcher::singleton().findSchemaOrThrow("ham_rl::conv_backward", "").typed<Tensors(Tn, Tn, Tn, Tn, Tn)>();
  const Tn &x = s[0], &lin = s[1], &history0 = s[2], &steps = s[3], &pre = s[4], &qkvn = s[5], &gates = s[6];
  const Tn &z = s[7], &inv = s[8], &above = s[9], &q = s[10], &k = s[11], &v = s[12], &beta = s[13], &g = s[14];
  const Tn &st = s[15], &checkpoints = s[16], &index = s[17], &src = s[18], &mask = s[19], &anything = s[20];
  const Tn &qa = s[21], &ka = s[22], &va = s[23], &o_att = s[24], &lse = s[25], &o_rnn = s[26], &o_kv = s[27];
  const Tn &local = s[28], &y_norm = s[29], &rstd = s[30];
  const Tn &w_qkv = w[0], &w_local = w[1], &w_gates = w[2], &w_conv = w[3], &log_scale = w[4], &w_norm = w[5];
  const Tn& w_out = w[6];
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), H = q.size(2), d = q.size(3), N = B * T;
  const int64_t G = gates.size(1);

  const Tn dyf = dy.reshape({N, -1});
  const Tn d_out = dyf.t().mm(y_norm), d_out_bias = dyf.sum(0), d_ynorm = dyf.mm(w_out);
  const Tensors rb = readout_backward.call(d_ynorm, o_rnn.view({N, H, d}), o_kv, local.view({N, H, d}), gates, w_norm,
                                           rstd, r, a, l);
  const Tn &do_rnn = rb[0], &do_kv = rb[1], &d_local = rb[2], &d_norm = rb[4];
  Tn d_gates = rb[3];  // [N, G, H], zeros outside the three readout channels

  // A token that sees nothing read 0, not the attention's output: its gradient stops there.
  const Tn do_att = at::where(anything.view({B, T, 1, 1}), do_kv.view({B, T, H, d}), 0.0).transpose(1, 2);
  const auto [dqa, dka, dva] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
      do_att, qa, ka, va, o_att, lse, 0.0, false, mask, 1.0);

  const Tn empty = x.new_empty({0});
  Tensors gb = gdr_backward.call(q, k, v, beta, g, st, checkpoints, do_rnn.view({B, T, H, d}), empty,
                                 dS.numel() ? dS.contiguous() : empty, 1.0, block, false);
  Tn &dq = gb[0], &dk = gb[1], &dv = gb[2], &dbeta = gb[3], &dg = gb[4];
  add_to_tokens(dk, dka, index, L0, true);
  add_to_tokens(dv, dva, index, L0, true);
  if (dkeys.numel()) add_to_tokens(dk, dkeys, src, L0, false);
  if (dvalues.numel()) add_to_tokens(dv, dvalues, src, L0, false);
  {  // the delta rule's gates: the log decay in channel 0, beta in channel 1
    float* dgp = d_gates.data_ptr<float>();
    const float *dg_p = dg.data_ptr<float>(), *db_p = dbeta.data_ptr<float>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t h = 0; h < H; ++h) {
        dgp[(n * G + 0) * H + h] += dg_p[n * H + h];
        dgp[(n * G + 1) * H + h] += db_p[n * H + h];
      }
  }
  Tn d_qkvn = at::empty({N, 3, H, d}, x.options());  // [dq, dk, dv] per token (at::stack's copy, as a loop)
  {
    const float* parts[3] = {dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>()};
    float* out = d_qkvn.data_ptr<float>();
    const int64_t row = H * d;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t p = 0; p < 3; ++p) std::copy_n(parts[p] + n * row, row, out + (n * 3 + p) * row);
  }
  const Tensors tb = tokens_backward.call(d_qkvn, d_gates, dqa.transpose(1, 2).reshape({N, H, d}), qkvn, gates, z,
                                          inv, above, log_scale);
  const Tn &dqkv = tb[0], &dz = tb[1], &d_log_scale = tb[2];
  const Tn d_pre = at::silu_backward(d_local.view({B, T, -1}), pre).contiguous();
  const Tensors cb = conv_backward.call(d_pre, lin, history0, steps, w_conv);

  // The three projections' gradients: the input's summed into one output, each weight's its own matmul.
  const Tn dz_flat = dz.view({N, -1}), dqkv_flat = dqkv.view({N, -1}), dlin_flat = cb[0].view({N, -1});
  const Tn xf = x.reshape({N, C});
  Tn d_x = dqkv_flat.mm(w_qkv);
  d_x.addmm_(dlin_flat, w_local).addmm_(dz_flat, w_gates);
  d_x = d_x.view({B, T, C});
  const Tensors d_w = {dqkv_flat.t().mm(xf), dlin_flat.t().mm(xf), dz_flat.t().mm(xf)};
  return {d_x, d_w[0], d_w[1], d_w[2], dz_flat.sum(0), cb[2], cb[3], d_log_scale, d_norm, d_out, d_out_bias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ham_rl, m) {
  m.def("layer_sequence_forward", &layer_sequence_forward);
  m.def("layer_sequence_backward", &layer_sequence_backward);
}
