// Vectors of 16 floats for the native CPU kernels (kernels/*/cpu_*.cpp, built by kernels/native.py), with the
// arithmetic, loads, sums and exp they need. With AVX-512 a Float16 is one GCC vector of 16 floats, one register.
// Without it, it is a struct of the machine's own vectors (two of 8 floats with AVX or AVX2, four of 4 otherwise):
// GCC lowers a 64-byte vector type on a narrower machine through the stack and general registers, which made the
// delta rule's kernels several times slower on an AVX2 CPU than the same loops over 8-float vectors
// (docs/performance.md). Both forms sum in the same order (halves first), so they give the same values.
// Loads and stores go through memcpy: nothing asks torch's buffers for alignment.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

namespace ham_rl_vec {

typedef float Float8 __attribute__((vector_size(32)));
typedef float Float4 __attribute__((vector_size(16)));
typedef int32_t Int8 __attribute__((vector_size(32)));
typedef int32_t Int4 __attribute__((vector_size(16)));

// exp of every lane: Cephes' expf (2^n times a degree-6 polynomial of the remainder on [-ln 2 / 2, ln 2 / 2]), within
// 2 ulp of std::exp. A NaN stays NaN; below -87.3 it gives 0 (std::exp gives denormals there, under 1.2e-38), above
// 88.37 infinity. F is a GCC vector of floats, I the vector of int32 of the same size.
template <typename F, typename I>
inline F exp_lanes(F x) {
  const F hi = F{} + 88.3762626647949f, lo = F{} - 87.3365447504f;
  const F xc = x > hi ? hi : (x < lo ? lo : x);
  const F fx = xc * 1.44269504088896341f + 0.5f;
  I n = __builtin_convertvector(fx, I);  // truncation; floor below
  n += __builtin_convertvector(n, F) > fx;  // a true comparison is -1
  const F nf = __builtin_convertvector(n, F);
  const F r = xc - nf * 0.693359375f + nf * 2.12194440e-4f;
  F y = 1.9875691500e-4f * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  I bits;
  std::memcpy(&bits, &y, sizeof(bits));
  bits += (n << 23);
  std::memcpy(&y, &bits, sizeof(y));
  y = x < lo ? F{} : y;
  y = x > hi ? F{} + std::numeric_limits<float>::infinity() : y;
  return x == x ? y : x;
}

// The last steps of every sum below, on 8 floats: halves, then halves of the 4 (lanes 0 + 2, 1 + 3).
inline float sum8(const Float8& s8) {
  Float4 a, b;
  std::memcpy(&a, &s8, sizeof(a));
  std::memcpy(&b, reinterpret_cast<const char*>(&s8) + sizeof(a), sizeof(b));
  const Float4 s4 = a + b;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// Lane r of the result is the sum of s[r]'s 8 lanes, for 8 vectors: the last three levels of the transpose-and-add tree
// below (lanes i + 4, then i + 2, then i + 1).
inline Float8 transpose_sum8(const Float8* s) {
  const Int8 lo2 = {0, 1, 2, 3, 8, 9, 10, 11}, lo3 = {0, 1, 4, 5, 8, 9, 12, 13}, lo4 = {0, 2, 4, 6, 8, 10, 12, 14};
  Float8 a[4], b[2];
  for (int j = 0; j < 4; ++j)  // lanes 0-3: 4 partial sums of s[2j], lanes 4-7: of s[2j + 1]
    a[j] = __builtin_shuffle(s[2 * j], s[2 * j + 1], lo2) + __builtin_shuffle(s[2 * j], s[2 * j + 1], lo2 + 4);
  for (int j = 0; j < 2; ++j)  // 2 each of 4 rows
    b[j] = __builtin_shuffle(a[2 * j], a[2 * j + 1], lo3) + __builtin_shuffle(a[2 * j], a[2 * j + 1], lo3 + 2);
  return __builtin_shuffle(b[0], b[1], lo4) + __builtin_shuffle(b[0], b[1], lo4 + 1);
}

#if defined(__AVX512F__)

typedef float Float16 __attribute__((vector_size(64)));
typedef int32_t Int16 __attribute__((vector_size(64)));

inline Float16 load16(const float* p) {
  Float16 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}

inline void store16(float* p, const Float16& r) { std::memcpy(p, &r, sizeof(r)); }

inline Float8 halves(const Float16& r) {  // lane i: r[i] + r[i + 8]
  Float8 lo, hi;
  std::memcpy(&lo, &r, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&r) + sizeof(lo), sizeof(hi));
  return lo + hi;
}

inline Float16 exp16(Float16 x) { return exp_lanes<Float16, Int16>(x); }

#else

#if defined(__AVX__)
constexpr int kLanes = 8;  // one AVX register
typedef Float8 Native;
typedef Int8 NativeInt;
#else
constexpr int kLanes = 4;  // SSE, NEON
typedef Float4 Native;
typedef Int4 NativeInt;
#endif
constexpr int kParts = 16 / kLanes;

// 16 floats as kParts vectors of the machine's width; part j holds lanes kLanes j to kLanes (j + 1) - 1.
struct Float16 {
  Native part[kParts];
};

#define HAM_RL_VEC_BINARY(op)                                                                        \
  inline Float16 operator op(Float16 a, const Float16& b) {                                          \
    for (int j = 0; j < kParts; ++j) a.part[j] = a.part[j] op b.part[j];                             \
    return a;                                                                                        \
  }                                                                                                  \
  inline Float16 operator op(Float16 a, float s) {                                                   \
    for (int j = 0; j < kParts; ++j) a.part[j] = a.part[j] op s;                                     \
    return a;                                                                                        \
  }                                                                                                  \
  inline Float16 operator op(float s, Float16 a) {                                                   \
    for (int j = 0; j < kParts; ++j) a.part[j] = s op a.part[j];                                     \
    return a;                                                                                        \
  }                                                                                                  \
  inline Float16& operator op##=(Float16& a, const Float16& b) { return a = a op b; }                \
  inline Float16& operator op##=(Float16& a, float s) { return a = a op s; }
HAM_RL_VEC_BINARY(+)
HAM_RL_VEC_BINARY(-)
HAM_RL_VEC_BINARY(*)
#undef HAM_RL_VEC_BINARY

// Part by part: one 64-byte copy goes through 16-byte moves into the stack, and the wider loads of the parts that
// follow stall on them.
inline Float16 load16(const float* p) {
  Float16 r;
  for (int j = 0; j < kParts; ++j) std::memcpy(&r.part[j], p + kLanes * j, sizeof(Native));
  return r;
}

inline void store16(float* p, const Float16& r) {
  for (int j = 0; j < kParts; ++j) std::memcpy(p + kLanes * j, &r.part[j], sizeof(Native));
}

inline Float8 halves(const Float16& r) {  // lane i: r[i] + r[i + 8]
#if defined(__AVX__)
  return r.part[0] + r.part[1];
#else
  const Float4 lo = r.part[0] + r.part[2], hi = r.part[1] + r.part[3];
  Float8 s;
  std::memcpy(&s, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&s) + sizeof(lo), &hi, sizeof(hi));
  return s;
#endif
}

inline Float16 exp16(Float16 x) {
  for (int j = 0; j < kParts; ++j) x.part[j] = exp_lanes<Native, NativeInt>(x.part[j]);
  return x;
}

#endif

inline float sum16(const Float16& r) { return sum8(halves(r)); }  // 3 vector adds and 3 scalar ones, not 15 adds

// Lane i of the result is the sum of p[i]'s 16 lanes: 16 horizontal sums as a transpose-and-add tree (4 levels: lanes
// i + 8, i + 4, i + 2, i + 1), where 16 separate sums take some 130 instructions.
inline Float16 transpose_sum16(const Float16* p) {
#if defined(__AVX512F__)  // the same tree in 16-lane registers
  const Int16 lo1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const Int16 lo2 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const Int16 lo3 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  const Int16 lo4 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  Float16 a[8], b[4], c[2];
  for (int j = 0; j < 8; ++j)  // lanes 0-7: 8 partial sums of p[2j], lanes 8-15: of p[2j + 1]
    a[j] = __builtin_shuffle(p[2 * j], p[2 * j + 1], lo1) + __builtin_shuffle(p[2 * j], p[2 * j + 1], lo1 + 8);
  for (int j = 0; j < 4; ++j)  // 4 partial sums each of 4 rows
    b[j] = __builtin_shuffle(a[2 * j], a[2 * j + 1], lo2) + __builtin_shuffle(a[2 * j], a[2 * j + 1], lo2 + 4);
  for (int j = 0; j < 2; ++j)  // 2 each of 8 rows
    c[j] = __builtin_shuffle(b[2 * j], b[2 * j + 1], lo3) + __builtin_shuffle(b[2 * j], b[2 * j + 1], lo3 + 2);
  return __builtin_shuffle(c[0], c[1], lo4) + __builtin_shuffle(c[0], c[1], lo4 + 1);
#else
  Float8 s[16];
  for (int j = 0; j < 16; ++j) s[j] = halves(p[j]);
  const Float8 lo = transpose_sum8(s), hi = transpose_sum8(s + 8);
  Float16 r;
  std::memcpy(&r, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&r) + sizeof(lo), &hi, sizeof(hi));
  return r;
#endif
}

// sum_i a[i] b[i]; 16 at a time where n is a multiple of 16 (heads of 16, 32, 64), else scalar.
inline float dot(const float* a, const float* b, int64_t n) {
  if (n % 16 == 0) {
    Float16 acc = {};
    for (int64_t i = 0; i < n; i += 16) acc += load16(a + i) * load16(b + i);
    return sum16(acc);
  }
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// out[l] = <x[l * stride : l * stride + K], q> for l < n (a head's logits over its cache entries, the rows of a state
// against a vector): blocks of 16 rows through transpose_sum16 where K is a multiple of 16.
inline void strided_dots(const float* x, int64_t stride, const float* q, int64_t K, int64_t n, float* out) {
  int64_t l0 = 0;
  if (K % 16 == 0) {
    for (; l0 + 16 <= n; l0 += 16) {
      Float16 p[16];
      for (int j = 0; j < 16; ++j) {
        const float* xl = x + (l0 + j) * stride;
        Float16 acc = load16(xl) * load16(q);
        for (int64_t c = 16; c < K; c += 16) acc += load16(xl + c) * load16(q + c);
        p[j] = acc;
      }
      store16(out + l0, transpose_sum16(p));
    }
  }
  for (int64_t l = l0; l < n; ++l) out[l] = dot(x + l * stride, q, K);
}

// dst[i] = exp(src[i]) for n values, 16 at a time; the tail through a padded vector (same function, same values).
inline void exp_n(const float* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store16(dst + i, exp16(load16(src + i)));
  if (i < n) {
    float tmp[16] = {};
    std::memcpy(tmp, src + i, (n - i) * sizeof(float));
    const Float16 e = exp16(load16(tmp));
    std::memcpy(dst + i, &e, (n - i) * sizeof(float));
  }
}

}  // namespace ham_rl_vec
