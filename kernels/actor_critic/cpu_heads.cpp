// The actor-critic heads' rollout step (reference.py) as one native call, in plain loops: a rollout step runs two
// small MLPs and a categorical sample on a few dozen envs, where each ATen op's dispatch (from Python or C++) costs
// more than its arithmetic (cpu_heads.py).
//
// y [B, N]; actor and critic weights as nn.Linear holds them (w1 [M, N], b1 [M], w2 [A, M], b2 [A]; the critic's A
// is 1); tanh is reference.py's 2 sigmoid(2x) - 1. The sample is at::multinomial's of the probabilities (its draws
// from the default generator, one per row, as torch.multinomial in the reference), or their argmax. Returns (action [B] int64,
// log-prob [B], value [B]).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../vec16.h"

namespace {

// 2 sigmoid(2x) - 1 = 2 / (1 + exp(-2x)) - 1 (reference.py's tanh) of n floats, in place.
void tanh_n(float* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] *= -2.0f;
  ham_rl_vec::exp_n(p, p, n);
  for (int64_t i = 0; i < n; ++i) p[i] = 2.0f / (1.0f + p[i]) - 1.0f;
}

// out = log_softmax(x) over A logits: x - max - log(sum(exp(x - max))); out may be x.
void log_softmax_row(const float* x, float* out, int64_t A) {
  float mx = x[0];
  for (int64_t a = 1; a < A; ++a) mx = std::max(mx, x[a]);
  float sum = 0.0f;
  for (int64_t a = 0; a < A; ++a) sum += std::exp(x[a] - mx);
  const float lse = std::log(sum);
  for (int64_t a = 0; a < A; ++a) out[a] = x[a] - mx - lse;
}

// The index of the largest of A values, the first where several tie, a NaN counting as largest (at::argmax's rule).
int64_t argmax_row(const float* x, int64_t A) {
  int64_t best = 0;
  for (int64_t a = 1; a < A && !std::isnan(x[best]); ++a)
    if (std::isnan(x[a]) || x[a] > x[best]) best = a;
  return best;
}

// A Linear's weight W [M, N] transposed, Wt [N, Mp], and its bias [Mp], both zero past M: Mp is M rounded up to a
// multiple of 16, so that every output is computed 16 at a time.
struct Packed {
  std::vector<float> wt, bias;
  int64_t N, M, Mp;
};

Packed pack(const at::Tensor& w, const at::Tensor& bias) {
  const auto c = w.contiguous(), bc = bias.contiguous();
  const int64_t M = c.size(0), N = c.size(1), Mp = (M + 15) / 16 * 16;
  Packed P{std::vector<float>(N * Mp, 0.0f), std::vector<float>(Mp, 0.0f), N, M, Mp};
  const float *p = c.data_ptr<float>(), *bp = bc.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) P.wt[n * Mp + m] = p[m * N + n];
  std::copy_n(bp, M, P.bias.begin());
  return P;
}

// out[b, m0 + 16 j + i] = bias + x[b, :] W^T for R rows from b and NB blocks of 16 outputs from m0: R x NB
// accumulators side by side (one alone waits out each multiply-add's latency), each summing bias, then n = 0, 1, ...
// in order.
template <int R, int NB>
void linear_tile(const float* x, int64_t ldx, const Packed& P, int64_t m0, float* out) {
  using namespace ham_rl_vec;
  Float16 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = load16(P.bias.data() + m0 + 16 * j);
  for (int64_t n = 0; n < P.N; ++n) {
    const float* w = P.wt.data() + n * P.Mp + m0;
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NB; ++j) acc[r][j] += x[r * ldx + n] * load16(w + 16 * j);
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) store16(out + r * P.Mp + m0 + 16 * j, acc[r][j]);
}

// out[b, :] = act(bias + x[b, :] W^T) for the B rows of x (row stride ldx), into out [B, Mp]: each x[b, n] scales a
// contiguous row of weights, 16 outputs at a time, in tiles of 2 rows x 4 blocks (a hidden layer of 64) or 4 rows x 1
// block (the logits, the value).
void linear_rows(const float* x, int64_t ldx, const Packed& P, int64_t B, bool tanh, float* out) {
  int64_t m0 = 0;
  for (; m0 + 64 <= P.Mp; m0 += 64) {
    int64_t b = 0;
    for (; b + 2 <= B; b += 2) linear_tile<2, 4>(x + b * ldx, ldx, P, m0, out + b * P.Mp);
    for (; b < B; ++b) linear_tile<1, 4>(x + b * ldx, ldx, P, m0, out + b * P.Mp);
  }
  for (; m0 < P.Mp; m0 += 16) {
    int64_t b = 0;
    for (; b + 4 <= B; b += 4) linear_tile<4, 1>(x + b * ldx, ldx, P, m0, out + b * P.Mp);
    for (; b < B; ++b) linear_tile<1, 1>(x + b * ldx, ldx, P, m0, out + b * P.Mp);
  }
  if (tanh)
    for (int64_t b = 0; b < B; ++b) tanh_n(out + b * P.Mp, P.M);
}

// The two-layer head: y [B, N] -> out [B, Ap] (A outputs, then padding).
std::vector<float> head(const float* y, int64_t B, int64_t N, const at::Tensor& w1, const at::Tensor& b1,
                        const at::Tensor& w2, const at::Tensor& b2) {
  const Packed P1 = pack(w1, b1), P2 = pack(w2, b2);
  std::vector<float> hidden(B * P1.Mp), out(B * P2.Mp);
  linear_rows(y, N, P1, B, true, hidden.data());
  linear_rows(hidden.data(), P1.Mp, P2, B, false, out.data());
  return out;
}

}  // namespace

std::vector<at::Tensor> actor_critic_step(at::Tensor y, at::Tensor actor_w1, at::Tensor actor_b1, at::Tensor actor_w2,
                                          at::Tensor actor_b2, at::Tensor critic_w1, at::Tensor critic_b1,
                                          at::Tensor critic_w2, at::Tensor critic_b2, bool deterministic) {
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == at::kFloat, "actor_critic_step: y must be float32 [B, N]");
  TORCH_CHECK(critic_w2.size(0) == 1, "actor_critic_step: the critic has one output");
  const auto yc = y.contiguous();
  const int64_t B = yc.size(0), N = yc.size(1), A = actor_w2.size(0);
  const int64_t Ap = (A + 15) / 16 * 16, Vp = 16;  // the rows' strides in logits and values
  const std::vector<float> logits = head(yc.data_ptr<float>(), B, N, actor_w1, actor_b1, actor_w2, actor_b2);
  const std::vector<float> values = head(yc.data_ptr<float>(), B, N, critic_w1, critic_b1, critic_w2, critic_b2);
  auto logp_all = at::empty({B, A}, y.options());
  float* lp = logp_all.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) log_softmax_row(logits.data() + b * Ap, lp + b * A, A);
  auto action = at::empty({B}, y.options().dtype(at::kLong));
  int64_t* act = action.data_ptr<int64_t>();
  if (deterministic) {
    for (int64_t b = 0; b < B; ++b) act[b] = argmax_row(lp + b * A, A);
  } else {
    // at::multinomial(probs, 1)'s own algorithm, without its half-dozen checking ops: q ~ Exp(1) from the default
    // generator, then argmax(probs / q), so the draws and the actions are torch.multinomial's.
    at::NoGradGuard no_grad;
    const at::Tensor probs = logp_all.exp(), q = at::empty_like(probs).exponential_(1.0);
    const float* pp = probs.data_ptr<float>();
    float* qp = q.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      float sum = 0.0f;
      for (int64_t a = 0; a < A; ++a) {
        const float p = pp[b * A + a];
        TORCH_CHECK(p >= 0.0f && p < INFINITY, "probability tensor contains either `inf`, `nan` or element < 0");
        sum += p;
        qp[b * A + a] = p / qp[b * A + a];
      }
      TORCH_CHECK(sum > 0.0f, "invalid multinomial distribution (sum of probabilities <= 0)");
      act[b] = argmax_row(qp + b * A, A);
    }
  }
  auto logp = at::empty({B}, y.options()), value = at::empty({B}, y.options());
  float *lo = logp.data_ptr<float>(), *vo = value.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    lo[b] = lp[b * A + act[b]];
    vo[b] = values[b * Vp];
  }
  return {action, logp, value};
}

// ---- the update: log-probs, entropies and values of given actions, with a hand-written backward -------------------
// The matmuls are at::mm / at::addmm (MKL, as nn.Linear's); everything between them is one loop over the rows.

namespace {

// d/dx of tanh_n from its output t, times the incoming gradient g: g (1 - t^2), in place in g.
void tanh_backward_in_place(at::Tensor& g, const at::Tensor& t) {
  float* gp = g.data_ptr<float>();
  const float* tp = t.data_ptr<float>();
  const int64_t n = g.numel();
  for (int64_t i = 0; i < n; ++i) gp[i] *= 1.0f - tp[i] * tp[i];
}

}  // namespace

// y [N, D], actions [N] int64 -> (logp [N], entropy [N], value [N], then what the backward keeps: the actor's and the
// critic's hidden activations [N, M], the log-probabilities and the probabilities [N, A]).
std::vector<at::Tensor> actor_critic_evaluate_forward(at::Tensor y, at::Tensor actions, at::Tensor actor_w1,
                                                      at::Tensor actor_b1, at::Tensor actor_w2, at::Tensor actor_b2,
                                                      at::Tensor critic_w1, at::Tensor critic_b1, at::Tensor critic_w2,
                                                      at::Tensor critic_b2) {
  at::NoGradGuard no_grad;
  auto ha = at::addmm(actor_b1, y, actor_w1.t());
  tanh_n(ha.data_ptr<float>(), ha.numel());
  auto hc = at::addmm(critic_b1, y, critic_w1.t());
  tanh_n(hc.data_ptr<float>(), hc.numel());
  auto lp = at::addmm(actor_b2, ha, actor_w2.t()).contiguous();
  const auto vout = at::addmm(critic_b2, hc, critic_w2.t());
  const int64_t N = lp.size(0), A = lp.size(1);
  auto logp = at::empty({N}, y.options()), ent = at::empty({N}, y.options()), value = at::empty({N}, y.options());
  auto probs = at::empty({N, A}, y.options());
  float* pp = probs.data_ptr<float>();
  float *lpp = lp.data_ptr<float>(), *lo = logp.data_ptr<float>(), *eo = ent.data_ptr<float>();
  const float* vp = vout.data_ptr<float>();
  float* vo = value.data_ptr<float>();
  const int64_t* act = actions.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    float* x = lpp + n * A;
    log_softmax_row(x, x, A);
    float h = 0.0f;
    for (int64_t a = 0; a < A; ++a) {
      pp[n * A + a] = std::exp(x[a]);
      h -= pp[n * A + a] * x[a];
    }
    TORCH_CHECK(act[n] >= 0 && act[n] < A, "actor_critic_evaluate: action ", act[n], " outside [0, ", A, ")");
    lo[n] = x[act[n]];
    eo[n] = h;
    vo[n] = vp[n];
  }
  return {logp, ent, value, ha, hc, lp, probs};
}

// The gradients of y and of the eight weights from those of logp, entropy and value (each [N], or empty for zero).
std::vector<at::Tensor> actor_critic_evaluate_backward(at::Tensor d_logp, at::Tensor d_ent, at::Tensor d_value,
                                                       at::Tensor y, at::Tensor actions, at::Tensor ha, at::Tensor hc,
                                                       at::Tensor lp, at::Tensor probs, at::Tensor ent,
                                                       at::Tensor actor_w1, at::Tensor actor_w2,
                                                       at::Tensor critic_w1, at::Tensor critic_w2) {
  at::NoGradGuard no_grad;
  const int64_t N = lp.size(0), A = lp.size(1);
  // d logits: logp = lp[act] gives d (onehot - p); entropy H = -sum p lp gives -p (lp + H) per logit.
  auto d_logits = at::empty({N, A}, lp.options());
  auto d_vout = at::empty({N, 1}, lp.options());
  const float *lpp = lp.data_ptr<float>(), *dl = d_logp.numel() ? d_logp.data_ptr<float>() : nullptr;
  const float *de = d_ent.numel() ? d_ent.data_ptr<float>() : nullptr, *dv = d_value.numel() ? d_value.data_ptr<float>() : nullptr;
  const int64_t* act = actions.data_ptr<int64_t>();
  float *dz = d_logits.data_ptr<float>(), *dvo = d_vout.data_ptr<float>();
  const float *pp = probs.data_ptr<float>(), *hp = ent.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    const float *x = lpp + n * A, *p = pp + n * A;
    float* g = dz + n * A;
    const float gl = dl ? dl[n] : 0.0f, ge = de ? de[n] : 0.0f;
    for (int64_t a = 0; a < A; ++a) g[a] = gl * ((a == act[n] ? 1.0f : 0.0f) - p[a]) - ge * p[a] * (x[a] + hp[n]);
    dvo[n] = dv ? dv[n] : 0.0f;
  }
  auto d_actor_w2 = at::mm(d_logits.t(), ha), d_actor_b2 = d_logits.sum(0);
  auto d_ha = at::mm(d_logits, actor_w2);
  tanh_backward_in_place(d_ha, ha);
  auto d_critic_w2 = at::mm(d_vout.t(), hc), d_critic_b2 = d_vout.sum(0);
  auto d_hc = at::mm(d_vout, critic_w2);
  tanh_backward_in_place(d_hc, hc);
  auto d_actor_w1 = at::mm(d_ha.t(), y), d_actor_b1 = d_ha.sum(0);
  auto d_critic_w1 = at::mm(d_hc.t(), y), d_critic_b1 = d_hc.sum(0);
  auto dy = at::mm(d_ha, actor_w1);
  dy.addmm_(d_hc, critic_w1);
  return {dy, d_actor_w1, d_actor_b1, d_actor_w2, d_actor_b2, d_critic_w1, d_critic_b1, d_critic_w2, d_critic_b2};
}

TORCH_LIBRARY_FRAGMENT(ham_rl, m) {
  m.def("actor_critic_step", &actor_critic_step);
  m.def("actor_critic_evaluate_forward", &actor_critic_evaluate_forward);
  m.def("actor_critic_evaluate_backward", &actor_critic_evaluate_backward);
}
