// Keras 3's Adam update of one contiguous run of elements (keras/src/optimizers/adam.py):
//   m += (g - m) * c1;  v += (g*g - v) * c2;  w -= (m * alpha) / (sqrt(v) + eps)
// the same float32 operations in the same order per element, so bit-identical to Keras; shared by
// fused_adam.cc and mpi_allreduce.cc (the sharded synchronous step). Built without FMA contraction
// or fast-math (labtools/opbuild.py).
#ifndef LABTOOLS_ADAM_UPDATE_H_
#define LABTOOLS_ADAM_UPDATE_H_
#include <cmath>
#include <cstdint>

// One element: m, v and w updated in place; returns g*g (for the gradient norm).
static inline __attribute__((always_inline)) double adam_element(const float gi, float* w, float* mp, float* vp,
                                                                 const float alpha, const float c1, const float c2,
                                                                 const float eps) {
  const float mi = *mp + (gi - *mp) * c1;
  const float vi = *vp + (gi * gi - *vp) * c2;
  *mp = mi;
  *vp = vi;
  *w = *w - (mi * alpha) / (std::sqrt(vi) + eps);
  return static_cast<double>(gi) * gi;
}

// On x86-64, one clone per vector width (AVX-512, AVX2, SSE2), chosen when the library loads: wider
// lanes do the same IEEE float32 operations on each element, so every clone gives the same bits.
// Elsewhere (aarch64: NEON is always there) the compiler's own vectorisation, one version. The sum of
// g*g is a statistic, not state: its summation order may differ from TensorFlow's.
#if defined(__x86_64__)
#define LABTOOLS_LANES __attribute__((target_clones("avx512f", "avx2", "default"), unused))
#else
#define LABTOOLS_LANES __attribute__((unused))
#endif

LABTOOLS_LANES
static double adam_update(const float* g, float* w, float* mp, float* vp, int64_t n, float alpha,
                          float c1, float c2, float eps) {
  double sumsq = 0.0;
#pragma omp simd reduction(+ : sumsq)
  for (int64_t i = 0; i < n; ++i) sumsq += adam_element(g[i], w + i, mp + i, vp + i, alpha, c1, c2, eps);
  return sumsq;
}

// The same on the sum of two gradients, a + b (one float32 addition, as MPI's sum of two), without
// writing the sum out first.
LABTOOLS_LANES
static double adam_update_sum2(const float* a, const float* b, float* w, float* mp, float* vp, int64_t n,
                               float alpha, float c1, float c2, float eps) {
  double sumsq = 0.0;
#pragma omp simd reduction(+ : sumsq)
  for (int64_t i = 0; i < n; ++i) sumsq += adam_element(a[i] + b[i], w + i, mp + i, vp + i, alpha, c1, c2, eps);
  return sumsq;
}

#endif  // LABTOOLS_ADAM_UPDATE_H_
