// Vectors of 16 floats for the native CPU kernels (kernels/*/cpu_*.cpp, built by kernels/native.py): GCC vector
// extensions, which the compiler maps to the machine's registers (one AVX-512 register, two AVX2 ones, four NEON).
// Loads and stores go through memcpy: nothing asks torch's buffers for alignment.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

namespace ham_rl_vec {

typedef float Float16 __attribute__((vector_size(64)));
typedef float Float8 __attribute__((vector_size(32)));
typedef float Float4 __attribute__((vector_size(16)));
typedef int32_t Int16 __attribute__((vector_size(64)));

inline Float16 load16(const float* p) {
  Float16 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}

inline void store16(float* p, const Float16& r) { std::memcpy(p, &r, sizeof(r)); }

inline float sum16(const Float16& r) {  // a tree of halves: 3 vector adds and 3 scalar ones, not 15 scalar adds
  Float8 lo, hi;
  std::memcpy(&lo, &r, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&r) + sizeof(lo), sizeof(hi));
  const Float8 s8 = lo + hi;
  Float4 a, b;
  std::memcpy(&a, &s8, sizeof(a));
  std::memcpy(&b, reinterpret_cast<const char*>(&s8) + sizeof(a), sizeof(b));
  const Float4 s4 = a + b;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// Lane i of the result is the sum of p[i]'s 16 lanes: 16 horizontal sums as a transpose-and-add tree (4 levels, 15
// vector adds and 30 two-source shuffles), where 16 separate sums take some 130 instructions.
inline Float16 transpose_sum16(const Float16* p) {
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

// exp of 16 floats at once: Cephes' expf (2^n times a degree-6 polynomial of the remainder on [-ln 2 / 2, ln 2 / 2]),
// within 2 ulp of std::exp. A NaN stays NaN; below -87.3 it gives 0 (std::exp gives denormals there, under 1.2e-38),
// above 88.37 infinity.
inline Float16 exp16(Float16 x) {
  const Float16 hi = Float16{} + 88.3762626647949f, lo = Float16{} - 87.3365447504f;
  const Float16 xc = x > hi ? hi : (x < lo ? lo : x);
  const Float16 fx = xc * 1.44269504088896341f + 0.5f;
  Int16 n = __builtin_convertvector(fx, Int16);  // truncation; floor below
  n += __builtin_convertvector(n, Float16) > fx;  // a true comparison is -1
  const Float16 nf = __builtin_convertvector(n, Float16);
  const Float16 r = xc - nf * 0.693359375f + nf * 2.12194440e-4f;
  Float16 y = 1.9875691500e-4f * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  Int16 bits;
  std::memcpy(&bits, &y, sizeof(bits));
  bits += (n << 23);
  std::memcpy(&y, &bits, sizeof(y));
  y = x < lo ? Float16{} : y;
  y = x > hi ? Float16{} + std::numeric_limits<float>::infinity() : y;
  return x == x ? y : x;
}

}  // namespace ham_rl_vec
