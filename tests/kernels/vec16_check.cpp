// Checks kernels/vec16.h in whichever form the compiler flags select (one 16-lane vector with AVX-512, two of 8 with
// AVX, four of 4 otherwise) against scalar loops; tests/kernels/test_vec16.py builds and runs it per form. Prints
// "lanes=<n>" and exits 0, or prints the first mismatch and exits 1.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>

#include "vec16.h"

using namespace ham_rl_vec;

static int failures = 0;

static void expect(bool ok, const char* what, int i, double got, double want) {
  if (!ok && failures++ == 0) std::printf("mismatch in %s at %d: got %.9g, want %.9g\n", what, i, got, want);
}

// The order both forms sum in: lanes i and i + 8, then i and i + 4, then (0 + 2) + (1 + 3).
static float sum_in_order(const float* x) {
  float s8[8], s4[4];
  for (int i = 0; i < 8; ++i) s8[i] = x[i] + x[i + 8];
  for (int i = 0; i < 4; ++i) s4[i] = s8[i] + s8[i + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

int main() {
#if defined(__AVX512F__)
  const int lanes = 16;
#elif defined(__AVX__)
  const int lanes = 8;
#else
  const int lanes = 4;
#endif
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  float x[16 * 17], out[16];
  for (float& e : x) e = normal(rng) * 10.0f;

  // loads, stores and the arithmetic, lane by lane
  const Float16 a = load16(x), b = load16(x + 16);
  Float16 c = 2.0f * a - b * a + 1.0f;
  c += a;
  c -= 0.5f;
  c *= b;
  store16(out, c);
  for (int i = 0; i < 16; ++i) {
    const float want = ((2.0f * x[i] - x[16 + i] * x[i] + 1.0f) + x[i] - 0.5f) * x[16 + i];
    expect(out[i] == want, "arithmetic", i, out[i], want);
  }
  Float16 zero = {};
  store16(out, zero);
  for (int i = 0; i < 16; ++i) expect(out[i] == 0.0f, "zero init", i, out[i], 0.0);

  // sums: sum16 in the documented order, transpose_sum16 lane r equal to sum16 of row r
  Float16 rows[16];
  for (int r = 0; r < 16; ++r) rows[r] = load16(x + 16 * r);
  store16(out, transpose_sum16(rows));
  for (int r = 0; r < 16; ++r) {
    const float want = sum_in_order(x + 16 * r);
    expect(sum16(rows[r]) == want, "sum16", r, sum16(rows[r]), want);
    expect(out[r] == want, "transpose_sum16", r, out[r], want);
  }

  // strided dots (17 rows: one block of 16 and a tail), against dot
  float dots[17];
  strided_dots(x, 16, x + 16, 16, 17, dots);
  for (int r = 0; r < 17; ++r) {
    double want = 0.0;
    for (int i = 0; i < 16; ++i) want += double(x[16 * r + i]) * x[16 + i];
    expect(std::fabs(dots[r] - want) <= 1e-4 * (1.0 + std::fabs(want)), "strided_dots", r, dots[r], want);
  }

  // exp: within 2 ulp in range, 0 below -87.34, infinity above 88.38, NaN kept
  for (int block = 0; block < 64; ++block) {
    float in[16];
    for (int i = 0; i < 16; ++i) in[i] = -87.0f + 175.0f * float(block * 16 + i) / 1023.0f;
    if (block == 0) {
      in[0] = NAN;
      in[1] = -100.0f;
      in[2] = 100.0f;
      in[3] = 0.0f;
    }
    store16(out, exp16(load16(in)));
    for (int i = 0; i < 16; ++i) {
      const float want = std::exp(in[i]);
      bool ok;
      if (std::isnan(in[i])) ok = std::isnan(out[i]);
      else if (in[i] < -87.3365447504f) ok = out[i] == 0.0f;
      else if (in[i] > 88.3762626647949f) ok = std::isinf(out[i]);
      else ok = std::fabs(out[i] - want) <= 2.5e-7f * want;
      expect(ok, "exp16", block * 16 + i, out[i], want);
    }
  }
  if (failures) return 1;
  std::printf("lanes=%d\n", lanes);
  return 0;
}
