// The backward of the HAM layer's sequence form as one native call (cpu_sequence.py's autograd node): the output
// projection's and the readout's backward, the attention's (torch's CPU flash attention), the scatter of the
// attention's key and value gradients to their tokens, the delta rule's, the tokens' and the convolution's backward,
// and the three input projections' as two matmuls. The layer's other kernels are called through the dispatcher (each
// lives in its own source); between them are plain loops, where the same steps from Python were some 40 ops, each
// with its dispatch and an interpreter's worth of branches around it.
//
// saved: what cpu_sequence.py's forward keeps, in the order of its save_for_backward; weights: the qkv, local and
// gates projections, the convolution, log_scale, the norm and the output projection, contiguous; dy [B, T, D_out];
// dS, dkeys, dvalues: the final state's gradients (empty: none); r, a, l: the readout's gate channels; L0: the
// carried-in cache's slots. Returns the gradients of x, of the three projections' weights, the gates' bias, the
// convolution's weight and bias, log_scale, the norm's weight, and the output projection's weight and bias.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <vector>

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
  const Tn d_qkvn = at::stack({dq, dk, dv}, 2).view({N, 3, H, d});
  const Tensors tb = tokens_backward.call(d_qkvn, d_gates, dqa.transpose(1, 2).reshape({N, H, d}), qkvn, gates, z,
                                          inv, above, log_scale);
  const Tn &dqkv = tb[0], &dz = tb[1], &d_log_scale = tb[2];
  const Tn d_pre = at::silu_backward(d_local.view({B, T, -1}), pre).contiguous();
  const Tensors cb = conv_backward.call(d_pre, lin, history0, steps, w_conv);

  // The three projections' gradients side by side: one matmul for the input, one for the weights.
  const Tn dz_flat = dz.view({N, -1});
  const Tn d_proj = at::cat({dqkv.view({N, -1}), cb[0].view({N, -1}), dz_flat}, 1);
  const Tn d_x = d_proj.mm(at::cat({w_qkv, w_local, w_gates})).view({B, T, C});
  const Tensors d_w = d_proj.t().mm(x.reshape({N, C})).split_with_sizes({w_qkv.size(0), w_local.size(0), w_gates.size(0)});
  return {d_x, d_w[0], d_w[1], d_w[2], dz_flat.sum(0), cb[2], cb[3], d_log_scale, d_norm, d_out, d_out_bias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ham_rl, m) { m.def("layer_sequence_backward", &layer_sequence_backward); }
