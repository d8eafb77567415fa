// PPO's clipped loss of one minibatch (reference.py) as one native call: the loss, its parts and statistics, and the
// loss's gradient with respect to the new log-probs, entropies and values, in two loops over the tokens. As torch ops
// it is some 25 ops forward and as many autograd nodes back, on a few hundred numbers each.
//
// newlogprob, entropy, newvalue, logprob, advantages, returns, values: [n] float32. Returns stats [6] float32 (loss,
// pg_loss, v_loss, entropy_loss, approx_kl, clipfrac) and grads [3, n] float32 (d loss / d newlogprob, entropy,
// newvalue). Sums run in double. torch.max's gradient splits a tie in halves, and clamp's passes at its bounds; both
// are kept, so that the gradient is the reference's wherever the two sides of a max are equal (every ratio inside
// the clip range).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// Share of a max's gradient that goes to its first argument: all of it, none, or half on a tie.
inline float first_share(float a, float b) { return a > b ? 1.0f : (a < b ? 0.0f : 0.5f); }

std::vector<at::Tensor> ppo_loss_forward(at::Tensor newlogprob, at::Tensor entropy, at::Tensor newvalue,
                                         at::Tensor logprob, at::Tensor advantages, at::Tensor returns,
                                         at::Tensor values, double clip_coef, double ent_coef, double vf_coef,
                                         bool norm_adv, bool clip_vloss) {
  const int64_t n = newlogprob.numel();
  const float *lp = newlogprob.data_ptr<float>(), *ent = entropy.data_ptr<float>(), *v = newvalue.data_ptr<float>();
  const float *old_lp = logprob.data_ptr<float>(), *adv = advantages.data_ptr<float>();
  const float *ret = returns.data_ptr<float>(), *old_v = values.data_ptr<float>();
  auto stats = at::empty({6}, newlogprob.options());
  auto grads = at::empty({3, n}, newlogprob.options());
  float *d_lp = grads.data_ptr<float>(), *d_ent = d_lp + n, *d_v = d_lp + 2 * n;
  double mean = 0.0, inv_std = 1.0;
  if (norm_adv) {
    for (int64_t i = 0; i < n; ++i) mean += adv[i];
    mean /= n;
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) ss += (adv[i] - mean) * (adv[i] - mean);
    inv_std = 1.0 / (std::sqrt(ss / (n - 1)) + 1e-8);  // torch.std: the unbiased estimate (NaN for one token)
  }
  const float c = static_cast<float>(clip_coef), lo = 1.0f - c, hi = 1.0f + c;
  const float scale = 1.0f / n;
  double pg_sum = 0.0, v_sum = 0.0, ent_sum = 0.0, kl_sum = 0.0, clipped = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const float logratio = lp[i] - old_lp[i], ratio = std::exp(logratio);
    kl_sum += (ratio - 1.0f) - logratio;
    clipped += std::fabs(ratio - 1.0f) > c;
    const float a = norm_adv ? static_cast<float>((adv[i] - mean) * inv_std) : adv[i];
    const float pg1 = -a * ratio, pg2 = -a * std::clamp(ratio, lo, hi);
    pg_sum += std::max(pg1, pg2);
    const float share = first_share(pg1, pg2), inside = (ratio >= lo && ratio <= hi) ? 1.0f : 0.0f;
    d_lp[i] = -a * (share + (1.0f - share) * inside) * ratio * scale;
    ent_sum += ent[i];
    d_ent[i] = static_cast<float>(-ent_coef) * scale;
    const float err = v[i] - ret[i], unclipped = err * err;
    if (clip_vloss) {
      const float dv = v[i] - old_v[i], vc = old_v[i] + std::clamp(dv, -c, c), err_c = vc - ret[i];
      const float clipped_sq = err_c * err_c, vshare = first_share(unclipped, clipped_sq);
      const float inside_v = (dv >= -c && dv <= c) ? 1.0f : 0.0f;
      v_sum += std::max(unclipped, clipped_sq);
      d_v[i] = static_cast<float>(vf_coef) * scale * (vshare * err + (1.0f - vshare) * err_c * inside_v);
    } else {
      v_sum += unclipped;
      d_v[i] = static_cast<float>(vf_coef) * scale * err;
    }
  }
  const double pg_loss = pg_sum / n, v_loss = 0.5 * v_sum / n, entropy_loss = ent_sum / n;
  float* s = stats.data_ptr<float>();
  s[0] = static_cast<float>(pg_loss - ent_coef * entropy_loss + v_loss * vf_coef);
  s[1] = static_cast<float>(pg_loss);
  s[2] = static_cast<float>(v_loss);
  s[3] = static_cast<float>(entropy_loss);
  s[4] = static_cast<float>(kl_sum / n);
  s[5] = static_cast<float>(clipped / n);
  return {stats, grads};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ham_rl, m) { m.def("ppo_loss_forward", &ppo_loss_forward); }
