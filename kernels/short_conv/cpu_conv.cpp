// The causal short convolution's forward and backward (ham_rl/memory/short_conv.py, the truth) as one native call
// each on CPU tensors: about 10 torch ops forward and 20 backward on [B, T, C] tensors, one loop each here, and
// SiLU
// (cpu_conv.py builds and calls it; kernels/native.py says how it is built).
//
// Per token: pre = bias + sum_j w_j x_{t-j}, the lags before the episode's start (steps_t < j) left out (selected,
// not multiplied by 0: a finished episode's NaN in the history must not leak). The SiLU on top, and its derivative in
// the backward, are torch's own vectorised ops (cpu_conv.py): a scalar exp per element here cost more than the rest.
// Shapes (float32, contiguous): x [B, T, C]; history [B, K - 1, C], the inputs before x; steps [B, T] int64;
// weight [K, C]; bias [C].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

// Row s of [history, x] (s < K - 1: history), as short_conv.py's `padded`.
inline const float* padded_row(const float* hist, const float* x, int64_t s, int64_t K, int64_t C) {
  return s < K - 1 ? hist + s * C : x + (s - (K - 1)) * C;
}

}  // namespace

// (pre [B, T, C], new history [B, K - 1, C])
std::vector<at::Tensor> conv_forward(at::Tensor x, at::Tensor history, at::Tensor steps, at::Tensor weight,
                                     at::Tensor bias) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), K = weight.size(0);
  auto pre = at::empty_like(x);
  auto new_history = at::empty({B, K - 1, C}, x.options());
  const float *xp = x.data_ptr<float>(), *hp = history.data_ptr<float>(), *w = weight.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  const int64_t* sp = steps.data_ptr<int64_t>();
  float *pp = pre.data_ptr<float>(), *nh = new_history.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float *xb = xp + b * T * C, *hb = hp + b * (K - 1) * C;
      for (int64_t t = 0; t < T; ++t) {
        float* __restrict__ pr = pp + (b * T + t) * C;
        const float* xt = xb + t * C;
        for (int64_t c = 0; c < C; ++c) pr[c] = bp[c] + xt[c] * w[c];
        const int64_t age = sp[b * T + t];
        for (int64_t j = 1; j < K && j <= age; ++j) {
          const float* lag = padded_row(hb, xb, K - 1 + t - j, K, C);
          for (int64_t c = 0; c < C; ++c) pr[c] += lag[c] * w[j * C + c];
        }
      }
      for (int64_t r = 0; r < K - 1; ++r) {  // the last K - 1 rows of [history, x]
        const float* src = padded_row(hb, xb, T + r, K, C);
        std::copy(src, src + C, nh + (b * (K - 1) + r) * C);
      }
    }
  });
  return {pre, new_history};
}

// (dx [B, T, C], dhistory [B, K - 1, C], dweight [K, C], dbias [C]) from the gradient of pre
std::vector<at::Tensor> conv_backward(at::Tensor dpre, at::Tensor x, at::Tensor history, at::Tensor steps,
                                      at::Tensor weight) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), K = weight.size(0);
  auto dx = at::zeros_like(x), dhistory = at::zeros({B, K - 1, C}, x.options());
  const float *dpp = dpre.data_ptr<float>(), *xp = x.data_ptr<float>();
  const float *hp = history.data_ptr<float>(), *w = weight.data_ptr<float>();
  const int64_t* sp = steps.data_ptr<int64_t>();
  float *dxp = dx.data_ptr<float>(), *dhp = dhistory.data_ptr<float>();
  // Per-thread partial sums of dweight and dbias, added up after the loop (rows of different threads never meet).
  const int64_t threads = std::max<int64_t>(at::get_num_threads(), 1);
  std::vector<float> partial(threads * (K + 1) * C, 0.0f);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    float* acc = partial.data() + at::get_thread_num() * (K + 1) * C;  // [K] dweight rows, then dbias
    for (int64_t b = begin; b < end; ++b) {
      const float *xb = xp + b * T * C, *hb = hp + b * (K - 1) * C;
      float *dxb = dxp + b * T * C, *dhb = dhp + b * (K - 1) * C;
      for (int64_t t = 0; t < T; ++t) {
        const float* dp = dpp + (b * T + t) * C;
        for (int64_t c = 0; c < C; ++c) acc[K * C + c] += dp[c];
        const int64_t age = sp[b * T + t];
        for (int64_t j = 0; j < K && j <= age; ++j) {
          const int64_t s_row = K - 1 + t - j;
          const float* lag = padded_row(hb, xb, s_row, K, C);
          float* dlag = s_row < K - 1 ? dhb + s_row * C : dxb + (s_row - (K - 1)) * C;
          for (int64_t c = 0; c < C; ++c) {
            dlag[c] += dp[c] * w[j * C + c];
            acc[j * C + c] += dp[c] * lag[c];
          }
        }
      }
    }
  });
  auto dweight = at::zeros({K, C}, x.options()), dbias = at::zeros({C}, x.options());
  float *dw = dweight.data_ptr<float>(), *db = dbias.data_ptr<float>();
  for (int64_t th = 0; th < threads; ++th) {
    const float* acc = partial.data() + th * (K + 1) * C;
    for (int64_t i = 0; i < K * C; ++i) dw[i] += acc[i];
    for (int64_t c = 0; c < C; ++c) db[c] += acc[K * C + c];
  }
  return {dx, dhistory, dweight, dbias};
}

TORCH_LIBRARY_FRAGMENT(ham_rl, m) {
  m.def("conv_forward", &conv_forward);
  m.def("conv_backward", &conv_backward);
}
