// The gated delta rule's forward and backward as one native call each, for CPU tensors: reference.py's loop over time
// in C++, run per (row, head), instead of the chunked form's ~1,000 small torch ops per PPO minibatch
// (cpu_recurrent.py builds and calls it; docs/performance.md has the timings).
//
// Layout (contiguous): q, k [B, T, H, K]; v [B, T, H, V]; beta, g [B, T, H]; starts [B, T] uint8 (or empty: no
// resets); h0 [B, H, K, V] (or empty: zeros). Per step, per head (a = exp(g)), as reference.py:
//     S0 = starts[t] ? 0 : S;  v_hat = a S0^T k;  u = beta (v - v_hat);  S = a S0 + k u^T;  o = scale S^T q
// The forward keeps the state entering every `block`-th step; the backward recomputes one block's states from it and
// runs back through the block, so what is kept for the backward is T / block states per head, not T.
//
// Two implementations of the same loops: float32 with V = 16, 32 or 64 (hidden 64, 128 or 256 in 4 heads) holds each
// row of a state as one to four GCC vectors of 16 floats, which the compiler maps to the machine's vector registers;
// every other case (float64 for gradcheck, other head sizes) runs plain scalar loops.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../vec16.h"

namespace {

using namespace ham_rl_vec;

// A row of V = 16 R floats (a row of a head's state, or a value): R vectors, with the arithmetic the loops need.
template <int R>
struct Row {
  Float16 x[R];
  Row() : x{} {}
  static Row load(const float* p) {
    Row r;
    for (int i = 0; i < R; ++i) r.x[i] = load16(p + 16 * i);
    return r;
  }
  void store(float* p) const {
    for (int i = 0; i < R; ++i) store16(p + 16 * i, x[i]);
  }
  float sum() const {
    Float16 s = x[0];
    for (int i = 1; i < R; ++i) s += x[i];
    return sum16(s);
  }
};

template <int R>
inline Row<R> operator+(Row<R> a, const Row<R>& b) {
  for (int i = 0; i < R; ++i) a.x[i] += b.x[i];
  return a;
}

template <int R>
inline Row<R> operator-(Row<R> a, const Row<R>& b) {
  for (int i = 0; i < R; ++i) a.x[i] -= b.x[i];
  return a;
}

template <int R>
inline Row<R> operator*(Row<R> a, const Row<R>& b) {
  for (int i = 0; i < R; ++i) a.x[i] *= b.x[i];
  return a;
}

template <int R>
inline Row<R> operator*(float s, Row<R> a) {
  for (int i = 0; i < R; ++i) a.x[i] *= s;
  return a;
}

template <int R>
inline Row<R>& operator+=(Row<R>& a, const Row<R>& b) {
  for (int i = 0; i < R; ++i) a.x[i] += b.x[i];
  return a;
}

// out[i] = <rows[i], x> for the K rows of a head's state (rows of V = 16 R floats, one after another).
template <int R>
inline void row_dots(const Row<R>* rows, const Row<R>& x, int64_t K, float* out) {
  strided_dots(reinterpret_cast<const float*>(rows), 16 * R, reinterpret_cast<const float*>(x.x), 16 * R, K, out);
}

struct Dims {
  int64_t B, T, H, K, V, block, blocks;
  int64_t tok(int64_t b, int64_t t, int64_t h) const { return (b * T + t) * H + h; }
};

// ---- float32, V = 16 R: rows of vectors -------------------------------------------------------------------------
template <int R>
void forward_vec(const Dims& d, const float* q, const float* k, const float* v, const float* beta, const float* g,
                   const uint8_t* starts, const float* h0, float scale, float* o, float* v_hat, float* final_state,
                   float* checkpoints) {
  const int64_t K = d.K, V = 16 * R, KV = K * V;
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<Row<R>> S(K);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H;
      for (int64_t i = 0; i < K; ++i) S[i] = h0 ? Row<R>::load(h0 + bh * KV + i * V) : Row<R>();
      for (int64_t t = 0; t < d.T; ++t) {
        if (starts && starts[b * d.T + t])
          for (int64_t i = 0; i < K; ++i) S[i] = Row<R>();
        if (t % d.block == 0)
          for (int64_t i = 0; i < K; ++i) S[i].store(checkpoints + (bh * d.blocks + t / d.block) * KV + i * V);
        const int64_t tok = d.tok(b, t, h);
        const float* kt = k + tok * K;
        const float* qt = q + tok * K;
        const float a = std::exp(g[tok]);
        Row<R> acc;
        for (int64_t i = 0; i < K; ++i) acc += kt[i] * S[i];
        const Row<R> vh = a * acc;
        const Row<R> u = beta[tok] * (Row<R>::load(v + tok * V) - vh);
        Row<R> out;
        for (int64_t i = 0; i < K; ++i) {
          S[i] = a * S[i] + kt[i] * u;
          out += qt[i] * S[i];
        }
        vh.store(v_hat + tok * V);
        (scale * out).store(o + tok * V);
      }
      for (int64_t i = 0; i < K; ++i) S[i].store(final_state + bh * KV + i * V);
    }
  });
}

template <int R>
void backward_vec(const Dims& d, const float* q, const float* k, const float* v, const float* beta, const float* g,
                    const uint8_t* starts, const float* checkpoints, const float* d_o, const float* d_vhat,
                    const float* d_final, float scale, float* dq, float* dk, float* dv, float* dbeta, float* dg,
                    float* dh0) {
  const int64_t K = d.K, V = 16 * R, KV = K * V;
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<Row<R>> states(d.block * K), dS(K);
    std::vector<float> dots(K);  // one set of K row dot products at a time
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H;
      for (int64_t i = 0; i < K; ++i) dS[i] = d_final ? Row<R>::load(d_final + bh * KV + i * V) : Row<R>();
      for (int64_t blk = d.blocks - 1; blk >= 0; --blk) {
        const int64_t t0 = blk * d.block, t1 = std::min(t0 + d.block, d.T);
        // The states entering each step of the block (resets applied), from the block's checkpoint.
        Row<R>* S = states.data();
        for (int64_t i = 0; i < K; ++i) S[i] = Row<R>::load(checkpoints + (bh * d.blocks + blk) * KV + i * V);
        for (int64_t t = t0 + 1; t < t1; ++t) {
          Row<R>* next = states.data() + (t - t0) * K;
          if (starts && starts[b * d.T + t]) {
            for (int64_t i = 0; i < K; ++i) next[i] = Row<R>();
          } else {
            const int64_t tok = d.tok(b, t - 1, h);
            const float* kt = k + tok * K;
            const float a = std::exp(g[tok]);
            Row<R> acc;
            for (int64_t i = 0; i < K; ++i) acc += kt[i] * S[i];
            const Row<R> u = beta[tok] * (Row<R>::load(v + tok * V) - a * acc);
            for (int64_t i = 0; i < K; ++i) next[i] = a * S[i] + kt[i] * u;
          }
          S = next;
        }
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const Row<R>* S0 = states.data() + (t - t0) * K;
          const int64_t tok = d.tok(b, t, h);
          const float* kt = k + tok * K;
          const float a = std::exp(g[tok]), bt = beta[tok];
          Row<R> kS;
          for (int64_t i = 0; i < K; ++i) kS += kt[i] * S0[i];
          const Row<R> e = Row<R>::load(v + tok * V) - a * kS;
          const Row<R> u = bt * e;
          float* dqt = dq + tok * K;
          if (d_o) {  // o = scale (a S0 + k u^T)^T q
            const Row<R> dot = Row<R>::load(d_o + tok * V);
            const float* qt = q + tok * K;
            const float udo = (u * dot).sum();
            row_dots(S0, dot, K, dots.data());
            for (int64_t i = 0; i < K; ++i) {
              dqt[i] = scale * (a * dots[i] + kt[i] * udo);
              dS[i] += (scale * qt[i]) * dot;
            }
          } else {
            std::fill(dqt, dqt + K, 0.0f);
          }
          // S_t = a S0 + k u^T: du = dS^T k, dk = dS u, da = <S0, dS>
          Row<R> du, daV;
          float* dkt = dk + tok * K;
          for (int64_t i = 0; i < K; ++i) {
            du += kt[i] * dS[i];
            daV += S0[i] * dS[i];
          }
          row_dots(dS.data(), u, K, dkt);
          // u = beta (v - v_hat), v_hat = a S0^T k
          const Row<R> de = bt * du;
          de.store(dv + tok * V);
          const Row<R> dvh = (d_vhat ? Row<R>::load(d_vhat + tok * V) : Row<R>()) - de;
          dbeta[tok] = (e * du).sum();
          daV += dvh * kS;
          row_dots(S0, dvh, K, dots.data());
          for (int64_t i = 0; i < K; ++i) {
            dkt[i] += a * dots[i];
            dS[i] = a * (dS[i] + kt[i] * dvh);
          }
          dg[tok] = daV.sum() * a;
          if (starts && starts[b * d.T + t])
            for (int64_t i = 0; i < K; ++i) dS[i] = Row<R>();
        }
      }
      if (dh0)
        for (int64_t i = 0; i < K; ++i) dS[i].store(dh0 + bh * KV + i * V);
    }
  });
}

// ---- any V, any floating type ----------------------------------------------------------------------------------------
template <typename scalar_t>
void forward_plain(const Dims& d, const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* beta,
                   const scalar_t* g, const uint8_t* starts, const scalar_t* h0, scalar_t scale, scalar_t* o,
                   scalar_t* v_hat, scalar_t* final_state, scalar_t* checkpoints) {
  const int64_t K = d.K, V = d.V, KV = K * V;
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> u(V);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H;
      scalar_t* S = final_state + bh * KV;
      for (int64_t x = 0; x < KV; ++x) S[x] = h0 ? h0[bh * KV + x] : scalar_t(0);
      for (int64_t t = 0; t < d.T; ++t) {
        if (starts && starts[b * d.T + t]) std::fill(S, S + KV, scalar_t(0));
        if (t % d.block == 0) std::copy(S, S + KV, checkpoints + (bh * d.blocks + t / d.block) * KV);
        const int64_t tok = d.tok(b, t, h);
        const scalar_t *kt = k + tok * K, *qt = q + tok * K, *vt = v + tok * V;
        const scalar_t a = std::exp(g[tok]);
        scalar_t* vh = v_hat + tok * V;
        scalar_t* ot = o + tok * V;
        std::fill(vh, vh + V, scalar_t(0));
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < V; ++j) vh[j] += kt[i] * S[i * V + j];
        for (int64_t j = 0; j < V; ++j) {
          vh[j] *= a;
          u[j] = beta[tok] * (vt[j] - vh[j]);
        }
        std::fill(ot, ot + V, scalar_t(0));
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < V; ++j) {
            S[i * V + j] = a * S[i * V + j] + kt[i] * u[j];
            ot[j] += qt[i] * S[i * V + j];
          }
        for (int64_t j = 0; j < V; ++j) ot[j] *= scale;
      }
    }
  });
}

template <typename scalar_t>
void backward_plain(const Dims& d, const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* beta,
                    const scalar_t* g, const uint8_t* starts, const scalar_t* checkpoints, const scalar_t* d_o,
                    const scalar_t* d_vhat, const scalar_t* d_final, scalar_t scale, scalar_t* dq, scalar_t* dk,
                    scalar_t* dv, scalar_t* dbeta, scalar_t* dg, scalar_t* dh0) {
  const int64_t K = d.K, V = d.V, KV = K * V;
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> states(d.block * KV), dS(KV), kS(V), e(V), u(V), du(V), dvh(V);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H;
      for (int64_t x = 0; x < KV; ++x) dS[x] = d_final ? d_final[bh * KV + x] : scalar_t(0);
      for (int64_t blk = d.blocks - 1; blk >= 0; --blk) {
        const int64_t t0 = blk * d.block, t1 = std::min(t0 + d.block, d.T);
        scalar_t* S = states.data();
        std::copy(checkpoints + (bh * d.blocks + blk) * KV, checkpoints + (bh * d.blocks + blk + 1) * KV, S);
        for (int64_t t = t0 + 1; t < t1; ++t) {
          scalar_t* next = states.data() + (t - t0) * KV;
          if (starts && starts[b * d.T + t]) {
            std::fill(next, next + KV, scalar_t(0));
          } else {
            const int64_t tok = d.tok(b, t - 1, h);
            const scalar_t *kt = k + tok * K, *vt = v + tok * V;
            const scalar_t a = std::exp(g[tok]);
            std::fill(kS.begin(), kS.end(), scalar_t(0));
            for (int64_t i = 0; i < K; ++i)
              for (int64_t j = 0; j < V; ++j) kS[j] += kt[i] * S[i * V + j];
            for (int64_t j = 0; j < V; ++j) u[j] = beta[tok] * (vt[j] - a * kS[j]);
            for (int64_t i = 0; i < K; ++i)
              for (int64_t j = 0; j < V; ++j) next[i * V + j] = a * S[i * V + j] + kt[i] * u[j];
          }
          S = next;
        }
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const scalar_t* S0 = states.data() + (t - t0) * KV;
          const int64_t tok = d.tok(b, t, h);
          const scalar_t *kt = k + tok * K, *vt = v + tok * V;
          const scalar_t a = std::exp(g[tok]), bt = beta[tok];
          std::fill(kS.begin(), kS.end(), scalar_t(0));
          for (int64_t i = 0; i < K; ++i)
            for (int64_t j = 0; j < V; ++j) kS[j] += kt[i] * S0[i * V + j];
          for (int64_t j = 0; j < V; ++j) {
            e[j] = vt[j] - a * kS[j];
            u[j] = bt * e[j];
          }
          scalar_t* dqt = dq + tok * K;
          if (d_o) {
            const scalar_t *dot = d_o + tok * V, *qt = q + tok * K;
            scalar_t udo = 0;
            for (int64_t j = 0; j < V; ++j) udo += u[j] * dot[j];
            for (int64_t i = 0; i < K; ++i) {
              scalar_t acc = 0;
              for (int64_t j = 0; j < V; ++j) {
                acc += S0[i * V + j] * dot[j];
                dS[i * V + j] += scale * qt[i] * dot[j];
              }
              dqt[i] = scale * (a * acc + kt[i] * udo);
            }
          } else {
            std::fill(dqt, dqt + K, scalar_t(0));
          }
          std::fill(du.begin(), du.end(), scalar_t(0));
          scalar_t da = 0;
          scalar_t* dkt = dk + tok * K;
          for (int64_t i = 0; i < K; ++i) {
            scalar_t acc = 0;
            for (int64_t j = 0; j < V; ++j) {
              du[j] += kt[i] * dS[i * V + j];
              acc += dS[i * V + j] * u[j];
              da += S0[i * V + j] * dS[i * V + j];
            }
            dkt[i] = acc;
          }
          scalar_t db = 0;
          for (int64_t j = 0; j < V; ++j) {
            const scalar_t de = bt * du[j];
            db += e[j] * du[j];
            dv[tok * V + j] = de;
            dvh[j] = (d_vhat ? d_vhat[tok * V + j] : scalar_t(0)) - de;
            da += dvh[j] * kS[j];
          }
          for (int64_t i = 0; i < K; ++i) {
            scalar_t acc = 0;
            for (int64_t j = 0; j < V; ++j) {
              acc += S0[i * V + j] * dvh[j];
              dS[i * V + j] = a * (dS[i * V + j] + kt[i] * dvh[j]);
            }
            dkt[i] += a * acc;
          }
          dbeta[tok] = db;
          dg[tok] = da * a;
          if (starts && starts[b * d.T + t]) std::fill(dS.begin(), dS.end(), scalar_t(0));
        }
      }
      if (dh0) std::copy(dS.begin(), dS.end(), dh0 + bh * KV);
    }
  });
}

Dims dims(const at::Tensor& q, const at::Tensor& v, int64_t block) {
  TORCH_CHECK(q.dim() == 4 && v.dim() == 4, "q and v must be [B, T, H, K] and [B, T, H, V]");
  TORCH_CHECK(block > 0, "block must be positive");
  const int64_t T = q.size(1);
  return Dims{q.size(0), T, q.size(2), q.size(3), v.size(3), block, std::max<int64_t>((T + block - 1) / block, 1)};
}

template <typename scalar_t>
const scalar_t* ptr_or_null(const at::Tensor& t) {
  return t.numel() ? t.data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
scalar_t* ptr(at::Tensor& t) {
  return t.data_ptr<scalar_t>();
}

}  // namespace

std::vector<at::Tensor> gdr_forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor beta, at::Tensor g,
                                    at::Tensor starts, at::Tensor h0, double scale, int64_t block) {
  const Dims d = dims(q, v, block);
  auto o = at::empty_like(v), v_hat = at::empty_like(v);
  auto state = at::empty({d.B, d.H, d.K, d.V}, q.options());
  auto checkpoints = at::empty({d.B, d.H, d.blocks, d.K, d.V}, q.options());
  const uint8_t* st = ptr_or_null<uint8_t>(starts);
  auto vec = d.V == 16 ? forward_vec<1> : d.V == 32 ? forward_vec<2> : d.V == 64 ? forward_vec<4> : nullptr;
  if (q.scalar_type() == at::kFloat && vec != nullptr) {
    vec(d, ptr<float>(q), ptr<float>(k), ptr<float>(v), ptr<float>(beta), ptr<float>(g), st,
                  ptr_or_null<float>(h0), static_cast<float>(scale), ptr<float>(o), ptr<float>(v_hat), ptr<float>(state),
                  ptr<float>(checkpoints));
  } else {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "gdr_forward", [&] {
      forward_plain<scalar_t>(d, ptr<scalar_t>(q), ptr<scalar_t>(k), ptr<scalar_t>(v), ptr<scalar_t>(beta),
                              ptr<scalar_t>(g), st, ptr_or_null<scalar_t>(h0), static_cast<scalar_t>(scale),
                              ptr<scalar_t>(o), ptr<scalar_t>(v_hat), ptr<scalar_t>(state), ptr<scalar_t>(checkpoints));
    });
  }
  return {o, v_hat, state, checkpoints};
}

std::vector<at::Tensor> gdr_backward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor beta, at::Tensor g,
                                     at::Tensor starts, at::Tensor checkpoints, at::Tensor d_o, at::Tensor d_vhat,
                                     at::Tensor d_final, double scale, int64_t block, bool want_dh0) {
  const Dims d = dims(q, v, block);
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  auto dbeta = at::empty_like(beta), dg = at::empty_like(g);
  auto dh0 = want_dh0 ? at::empty({d.B, d.H, d.K, d.V}, q.options()) : at::empty({0}, q.options());
  const uint8_t* st = ptr_or_null<uint8_t>(starts);
  auto vec = d.V == 16 ? backward_vec<1> : d.V == 32 ? backward_vec<2> : d.V == 64 ? backward_vec<4> : nullptr;
  if (q.scalar_type() == at::kFloat && vec != nullptr) {
    vec(d, ptr<float>(q), ptr<float>(k), ptr<float>(v), ptr<float>(beta), ptr<float>(g), st,
                   ptr<float>(checkpoints), ptr_or_null<float>(d_o), ptr_or_null<float>(d_vhat), ptr_or_null<float>(d_final),
                   static_cast<float>(scale), ptr<float>(dq), ptr<float>(dk), ptr<float>(dv), ptr<float>(dbeta),
                   ptr<float>(dg), want_dh0 ? ptr<float>(dh0) : nullptr);
  } else {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "gdr_backward", [&] {
      backward_plain<scalar_t>(d, ptr<scalar_t>(q), ptr<scalar_t>(k), ptr<scalar_t>(v), ptr<scalar_t>(beta),
                               ptr<scalar_t>(g), st, ptr<scalar_t>(checkpoints), ptr_or_null<scalar_t>(d_o),
                               ptr_or_null<scalar_t>(d_vhat), ptr_or_null<scalar_t>(d_final), static_cast<scalar_t>(scale),
                               ptr<scalar_t>(dq), ptr<scalar_t>(dk), ptr<scalar_t>(dv), ptr<scalar_t>(dbeta),
                               ptr<scalar_t>(dg), want_dh0 ? ptr<scalar_t>(dh0) : nullptr);
    });
  }
  return {dq, dk, dv, dbeta, dg, dh0};
}

TORCH_LIBRARY_FRAGMENT(ham_rl, m) {
  m.def("gdr_forward", &gdr_forward);
  m.def("gdr_backward", &gdr_backward);
}
