// Keras 3's Adam update of one contiguous run of elements (keras/src/optimizers/adam.py):
//   m += (g - m) * c1;  v += (g*g - v) * c2;  w -= (m * alpha) / (sqrt(v) + eps)
// the same float32 operations in the same order per element, so bit-identical to Keras; shared by
// fused_adam.cc and mpi_allreduce.cc (the sharded synchronous step). Built without FMA contraction
// or fast-math (labtools/opbuild.py).
#ifndef LABTOOLS_ADAM_UPDATE_H_
#define LABTOOLS_ADAM_UPDATE_H_
#include <cmath>
#include <cstdint>

// One clone per vector width (AVX-512, AVX2, SSE2), chosen when the library loads: wider lanes do the
// same IEEE float32 operations on each element, so every clone gives the same bits.
__attribute__((target_clones("avx512f", "avx2", "default")))
static double adam_update(const float* g, float* w, float* mp, float* vp, int64_t n, float alpha,
                          float c1, float c2, float eps) {
  double sumsq = 0.0;  // a statistic, not state: its summation order may differ from TF's
#pragma omp simd reduction(+ : sumsq)
  for (int64_t i = 0; i < n; ++i) {  // SIMD lanes do IEEE float32 math, element by element
    const float gi = g[i];
    sumsq += static_cast<double>(gi) * gi;
    const float mi = mp[i] + (gi - mp[i]) * c1;
    const float vi = vp[i] + (gi * gi - vp[i]) * c2;
    mp[i] = mi;
    vp[i] = vi;
    w[i] = w[i] - (mi * alpha) / (std::sqrt(vi) + eps);
  }
  return sumsq;
}

#endif  // LABTOOLS_ADAM_UPDATE_H_
