// The HAM layer's per-token work around its two paths in the sequence form (a PPO minibatch), forward and backward, as
// one native call each on float32 CPU tensors (cpu_layer.py builds the autograd functions; reference.py holds the
// PyTorch form they are tested against; kernels/native.py says how they are built). In eager PyTorch this work is some
// 30 small ops forward and 50 backward per minibatch, each a pass over [tokens, hidden] floats.
//
// tokens: from the input projections to what the paths read, per token n and head h:
//     q, k = unit(qkv[n, 0, h]), unit(qkv[n, 1, h])      unit(x) = x / max(|x|, eps)
//     v = qkv[n, 2, h]
//     gates[n, 0, h] = -softplus(z[n, h])                the log decay (softplus linear above 20, as torch's)
//     gates[n, i, h] = sigmoid(z[n, i H + h]), i >= 1    write strength and the readout gates
//     q_attn = q * exp(log_scale[h])                     the attention's query, the temperature folded in
// readout: from the paths' outputs to the output projection's input:
//     x[n, h] = gates[n, r, h] o_rnn[n, h] + gates[n, a, h] o_kv[n, h] + gates[n, l, h] local[n, h]
//     y[n] = x[n] / sqrt(mean(x[n]^2) + eps) * weight    (RMSNorm over the hidden size)
//
// Shapes: qkv [N, 3, H, d]; z and gates [N, G, H]; q_attn, o_rnn, o_kv, local [N, H, d]; log_scale [H]; weight [H d].
// Every tensor contiguous. Sums over tokens (the gradients of log_scale and weight) are kept per thread and added in
// thread order, so a run is deterministic for a given number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../vec16.h"

namespace {

using ham_rl_vec::dot;  // 16 lanes at a time for heads of 16, 32, 64: the scalar sums kept these loops from vectorising
using ham_rl_vec::exp_n;

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

inline float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }

// Partial sums of `width` floats per thread, added up in thread order.
struct PerThread {
  int64_t width;
  std::vector<float> sums;
  explicit PerThread(int64_t w) : width(w), sums(std::max<int64_t>(at::get_num_threads(), 1) * w, 0.0f) {}
  float* mine() { return sums.data() + at::get_thread_num() * width; }
  at::Tensor total(const at::TensorOptions& options) const {
    auto out = at::zeros({width}, options);
    float* o = out.data_ptr<float>();
    for (size_t th = 0; th * width < sums.size(); ++th)
      for (int64_t i = 0; i < width; ++i) o[i] += sums[th * width + i];
    return out;
  }
};

// -> qkvn [N, 3, H, d] (q and k unit, v copied), gates [N, G, H], q_attn [N, H, d], inv [N, 2, H] (1 / max(|x|, eps)
// of q and k), above [N, 2, H] uint8 (|x| > eps: where the backward has its radial term)
std::vector<at::Tensor> tokens_forward(at::Tensor qkv, at::Tensor z, at::Tensor log_scale, double eps_) {
  const int64_t N = qkv.size(0), H = qkv.size(2), d = qkv.size(3), G = z.size(1);
  const float eps = static_cast<float>(eps_);
  auto qkvn = at::empty_like(qkv), gates = at::empty_like(z), q_attn = at::empty({N, H, d}, qkv.options());
  auto inv = at::empty({N, 2, H}, qkv.options()), above = at::empty({N, 2, H}, qkv.options().dtype(at::kByte));
  const float *x = qkv.data_ptr<float>(), *zp = z.data_ptr<float>(), *ls = log_scale.data_ptr<float>();
  float *y = qkvn.data_ptr<float>(), *gp = gates.data_ptr<float>(), *qa = q_attn.data_ptr<float>();
  float* ip = inv.data_ptr<float>();
  uint8_t* ap = above.data_ptr<uint8_t>();
  std::vector<float> scale(H);
  for (int64_t h = 0; h < H; ++h) scale[h] = std::exp(ls[h]);
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t part = 0; part < 2; ++part)
        for (int64_t h = 0; h < H; ++h) {
          const float* xi = x + ((n * 3 + part) * H + h) * d;
          float* yi = y + ((n * 3 + part) * H + h) * d;
          const float norm = std::sqrt(dot(xi, xi, d));
          const float r = 1.0f / (norm > eps || std::isnan(norm) ? norm : eps);  // clamp_min keeps a NaN
          if (d == 16) {  // the trainer's heads: the loops below as one vector each
            const ham_rl_vec::Float16 unit = ham_rl_vec::load16(xi) * r;
            ham_rl_vec::store16(yi, unit);
            if (part == 0) ham_rl_vec::store16(qa + (n * H + h) * d, unit * scale[h]);
          } else {
            for (int64_t j = 0; j < d; ++j) yi[j] = xi[j] * r;
            if (part == 0)
              for (int64_t j = 0; j < d; ++j) qa[(n * H + h) * d + j] = yi[j] * scale[h];
          }
          ip[(n * 2 + part) * H + h] = r;
          ap[(n * 2 + part) * H + h] = norm > eps;
        }
      std::copy(x + (n * 3 + 2) * H * d, x + (n * 3 + 3) * H * d, y + (n * 3 + 2) * H * d);
      float* g = gp + n * G * H;
      const float* zn = zp + n * G * H;
      for (int64_t h = 0; h < H; ++h) g[h] = -softplus(zn[h]);
      for (int64_t i = H; i < G * H; ++i) g[i] = -zn[i];
      exp_n(g + H, g + H, (G - 1) * H);
      for (int64_t i = H; i < G * H; ++i) g[i] = 1.0f / (1.0f + g[i]);  // sigmoid(z) = 1 / (1 + exp(-z))
    }
  });
  return {qkvn, gates, q_attn, inv, above};
}

// tokens_backward's q and k rows of token n for heads of 16, a row a vector (its loop below, unrolled).
inline void unit_rows_backward16(int64_t n, int64_t H, const float* dy, const float* dqa, const float* y,
                                 const float* ip, const uint8_t* ap, const float* scale, float* acc, float* dx) {
  using namespace ham_rl_vec;
  for (int64_t part = 0; part < 2; ++part)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t row = ((n * 3 + part) * H + h) * 16;
      const Float16 yi = load16(y + row);
      Float16 total = load16(dy + row);
      if (part == 0 && dqa) {
        const Float16 dq2 = load16(dqa + (n * H + h) * 16);
        total += dq2 * scale[h];
        acc[h] += sum16(dq2 * yi) * scale[h];
      }
      const float radial = ap[(n * 2 + part) * H + h] ? sum16(yi * total) : 0.0f;
      store16(dx + row, (total - yi * radial) * ip[(n * 2 + part) * H + h]);
    }
}

// Gradients of tokens_forward's inputs from those of its outputs (d_qattn may be empty: no attention gradient).
// -> dqkv [N, 3, H, d], dz [N, G, H], dlog_scale [H]
std::vector<at::Tensor> tokens_backward(at::Tensor d_qkvn, at::Tensor d_gates, at::Tensor d_qattn, at::Tensor qkvn,
                                        at::Tensor gates, at::Tensor z, at::Tensor inv, at::Tensor above,
                                        at::Tensor log_scale) {
  const int64_t N = qkvn.size(0), H = qkvn.size(2), d = qkvn.size(3), G = z.size(1);
  auto dqkv = at::empty_like(qkvn), dz = at::empty_like(z);
  const float *dy = d_qkvn.data_ptr<float>(), *dg = d_gates.data_ptr<float>();
  const float* dqa = d_qattn.numel() ? d_qattn.data_ptr<float>() : nullptr;
  const float *y = qkvn.data_ptr<float>(), *gp = gates.data_ptr<float>(), *zp = z.data_ptr<float>();
  const float *ip = inv.data_ptr<float>(), *ls = log_scale.data_ptr<float>();
  const uint8_t* ap = above.data_ptr<uint8_t>();
  float *dx = dqkv.data_ptr<float>(), *dzp = dz.data_ptr<float>();
  std::vector<float> scale(H);
  for (int64_t h = 0; h < H; ++h) scale[h] = std::exp(ls[h]);
  PerThread dls(H);
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    float* acc = dls.mine();
    std::vector<float> total(d);
    for (int64_t n = begin; n < end; ++n) {
      if (d == 16) {  // the trainer's heads: each row one vector, the same operations in the same order as below
        unit_rows_backward16(n, H, dy, dqa, y, ip, ap, scale.data(), acc, dx);
      } else {
        for (int64_t part = 0; part < 2; ++part)
          for (int64_t h = 0; h < H; ++h) {
            const int64_t row = ((n * 3 + part) * H + h) * d;
            const float* yi = y + row;
            for (int64_t j = 0; j < d; ++j) total[j] = dy[row + j];
            if (part == 0 && dqa) {  // q_attn = q exp(log_scale)
              const float* dq2 = dqa + (n * H + h) * d;
              for (int64_t j = 0; j < d; ++j) total[j] += dq2[j] * scale[h];
              acc[h] += dot(dq2, yi, d) * scale[h];
            }
            const float radial = ap[(n * 2 + part) * H + h] ? dot(yi, total.data(), d) : 0.0f;
            const float r = ip[(n * 2 + part) * H + h];
            for (int64_t j = 0; j < d; ++j) dx[row + j] = (total[j] - yi[j] * radial) * r;
          }
      }
      std::copy(dy + (n * 3 + 2) * H * d, dy + (n * 3 + 3) * H * d, dx + (n * 3 + 2) * H * d);
      for (int64_t h = 0; h < H; ++h) {  // d(-softplus(z))/dz = -sigmoid(z), -1 where softplus is linear
        const float zz = zp[n * G * H + h];
        dzp[n * G * H + h] = -dg[n * G * H + h] * (zz > 20.0f ? 1.0f : sigmoid(zz));
      }
      for (int64_t i = H; i < G * H; ++i) {
        const float s = gp[n * G * H + i];
        dzp[n * G * H + i] = dg[n * G * H + i] * (1.0f - s) * s;
      }
    }
  });
  return {dqkv, dz, dls.total(qkvn.options())};
}

struct ReadoutArgs {
  int64_t N, H, d, G, r, a, l;
};

ReadoutArgs readout_args(const at::Tensor& o_rnn, const at::Tensor& gates, int64_t r, int64_t a, int64_t l) {
  return {o_rnn.size(0), o_rnn.size(1), o_rnn.size(2), gates.size(1), r, a, l};
}

// The gated sum of the three paths for token n into x [H d].
inline void gated_sum(const ReadoutArgs& s, int64_t n, const float* orn, const float* okv, const float* loc,
                      const float* gp, float* x) {
  for (int64_t h = 0; h < s.H; ++h) {
    const float* g = gp + n * s.G * s.H + h;
    const float gr = g[s.r * s.H], ga = g[s.a * s.H], gl = g[s.l * s.H];
    const int64_t row = (n * s.H + h) * s.d;
    for (int64_t j = 0; j < s.d; ++j) x[h * s.d + j] = gr * orn[row + j] + ga * okv[row + j] + gl * loc[row + j];
  }
}

// -> y [N, H d], rstd [N] (1 / sqrt(mean(x^2) + eps), kept for the backward)
std::vector<at::Tensor> readout_forward(at::Tensor o_rnn, at::Tensor o_kv, at::Tensor local, at::Tensor gates,
                                        at::Tensor weight, int64_t r, int64_t a, int64_t l, double eps) {
  const ReadoutArgs s = readout_args(o_rnn, gates, r, a, l);
  const int64_t D = s.H * s.d;
  auto y = at::empty({s.N, D}, o_rnn.options()), rstd = at::empty({s.N}, o_rnn.options());
  const float *orn = o_rnn.data_ptr<float>(), *okv = o_kv.data_ptr<float>(), *loc = local.data_ptr<float>();
  const float *gp = gates.data_ptr<float>(), *w = weight.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  at::parallel_for(0, s.N, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> x(D);
    for (int64_t n = begin; n < end; ++n) {
      gated_sum(s, n, orn, okv, loc, gp, x.data());
      const float rs = 1.0f / std::sqrt(dot(x.data(), x.data(), D) / D + static_cast<float>(eps));
      rp[n] = rs;
      for (int64_t i = 0; i < D; ++i) yp[n * D + i] = x[i] * rs * w[i];
    }
  });
  return {y, rstd};
}

// -> d_o_rnn, d_o_kv, d_local [N, H, d], d_gates [N, G, H] (zero but for the three readout gates), d_weight [H d]
std::vector<at::Tensor> readout_backward(at::Tensor dy, at::Tensor o_rnn, at::Tensor o_kv, at::Tensor local,
                                         at::Tensor gates, at::Tensor weight, at::Tensor rstd, int64_t r, int64_t a,
                                         int64_t l) {
  const ReadoutArgs s = readout_args(o_rnn, gates, r, a, l);
  const int64_t D = s.H * s.d;
  auto d_rnn = at::empty_like(o_rnn), d_kv = at::empty_like(o_kv), d_local = at::empty_like(local);
  auto d_gates = at::zeros_like(gates);
  const float *dyp = dy.data_ptr<float>(), *orn = o_rnn.data_ptr<float>(), *okv = o_kv.data_ptr<float>();
  const float *loc = local.data_ptr<float>(), *gp = gates.data_ptr<float>(), *w = weight.data_ptr<float>();
  const float* rp = rstd.data_ptr<float>();
  float *drn = d_rnn.data_ptr<float>(), *dkv = d_kv.data_ptr<float>(), *dlc = d_local.data_ptr<float>();
  float* dgp = d_gates.data_ptr<float>();
  PerThread dw(D);
  at::parallel_for(0, s.N, 64, [&](int64_t begin, int64_t end) {
    float* acc = dw.mine();
    std::vector<float> x(D), dx(D);
    for (int64_t n = begin; n < end; ++n) {
      gated_sum(s, n, orn, okv, loc, gp, x.data());
      const float rs = rp[n];
      for (int64_t i = 0; i < D; ++i) {
        const float g = dyp[n * D + i];
        acc[i] += g * (x[i] * rs);
        dx[i] = g * w[i];
      }
      const float c = dot(dx.data(), x.data(), D) * rs / D;  // mean of d(xhat) xhat
      for (int64_t i = 0; i < D; ++i) dx[i] = rs * (dx[i] - x[i] * rs * c);
      for (int64_t h = 0; h < s.H; ++h) {
        const float* g = gp + n * s.G * s.H + h;
        float* dg = dgp + n * s.G * s.H + h;
        const float gr = g[s.r * s.H], ga = g[s.a * s.H], gl = g[s.l * s.H];
        const int64_t row = (n * s.H + h) * s.d;
        const float* e = dx.data() + h * s.d;
        for (int64_t j = 0; j < s.d; ++j) {
          drn[row + j] = gr * e[j];
          dkv[row + j] = ga * e[j];
          dlc[row + j] = gl * e[j];
        }
        dg[s.r * s.H] = dot(e, orn + row, s.d);
        dg[s.a * s.H] = dot(e, okv + row, s.d);
        dg[s.l * s.H] = dot(e, loc + row, s.d);
      }
    }
  });
  return {d_rnn, d_kv, d_local, d_gates, dw.total(o_rnn.options())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ham_rl, m) {
  m.def("layer_tokens_forward", &tokens_forward);
  m.def("layer_tokens_backward", &tokens_backward);
  m.def("layer_readout_forward", &readout_forward);
  m.def("layer_readout_backward", &readout_backward);
}
