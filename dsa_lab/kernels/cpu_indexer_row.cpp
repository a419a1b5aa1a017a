// A cached decode step's lightning-indexer projection of one position, in one call (dsa_lab/kernels/cpu_indexer_row.py):
// LightningIndexer.project_row's q, k and w without its ~12 torch ops (each a few us of dispatch, and a parallel
// region on a 2-thread CPU, where the arithmetic of one row is ~50 us of weight reads).
//
// Per batch row b of x (B, d_model): q = RoPE(W_q x) per head, k = RoPE(LayerNorm(W_k x)), w = (W_w x) * scale, the
// RoPE as project_row applies RotaryEmbedding.row: out[i] = v[i] * cos[i] + v[swap[i]] * sin[i]. The GEMVs sum in 8
// lanes (FMA on x86 with AVX2), not in torch's order: equal to fp32 rounding. Weights row-major, no bias:
// wq (H_I * d_I, d_model), wk (d_I, d_model), ww (H_I, d_model); ln_w, ln_b, cos, sin (d_I); swap (d_I) int64.
// dims = {B, d_model, H_I, d_I}; out: q (B, H_I, d_I), k (B, d_I), w (B, H_I), contiguous.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

// out[r] = W[r] . x for r < rows (d contiguous elements per row)
void gemv(const float* W, int64_t rows, int64_t d, const float* x, float* out) {
  int64_t r = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if (d % 8 == 0) {
    for (; r + 4 <= rows; r += 4) {  // four rows share the loads of x; four independent accumulator chains
      const float* w0 = W + r * d;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t j = 0; j < d; j += 8) {
        const __m256 xv = _mm256_loadu_ps(x + j);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + j), xv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + d + j), xv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + 2 * d + j), xv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + 3 * d + j), xv, a3);
      }
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
      _mm_storeu_ps(out + r, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
    }
  }
#endif
  for (; r < rows; ++r) {
    const float* wr = W + r * d;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 8 <= d; j += 8)
      for (int i = 0; i < 8; ++i) acc[i] += wr[j + i] * x[j + i];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; j < d; ++j) s += wr[j] * x[j];
    out[r] = s;
  }
}

// v (n) rotated into out: out[i] = v[i] * cos[i] + v[swap[i]] * sin[i]
void rotate(const float* v, const float* cos, const float* sin, const int64_t* swap, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = v[i] * cos[i] + v[swap[i]] * sin[i];
}

// v (n) LayerNorm'd in place: (v - mean) / sqrt(var + eps) * g + b, biased variance
void layer_norm(float* v, int64_t n, const float* g, const float* b, float eps) {
  float mean = 0, var = 0;
  for (int64_t i = 0; i < n; ++i) mean += v[i];
  mean /= static_cast<float>(n);
  for (int64_t i = 0; i < n; ++i) var += (v[i] - mean) * (v[i] - mean);
  const float rstd = 1.0f / std::sqrt(var / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) v[i] = (v[i] - mean) * rstd * g[i] + b[i];
}

}  // namespace

extern "C" {
void dsa_indexer_row_f32(const float* x, const float* wq, const float* wk, const float* ww, const float* ln_w,
                         const float* ln_b, const float* cos, const float* sin, const int64_t* swap,
                         const int64_t* dims, double eps, double scale, float* q, float* k, float* w) {
  const int64_t B = dims[0], d = dims[1], H_I = dims[2], d_I = dims[3];
  std::vector<float> raw(H_I * d_I + d_I);
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * d;
    gemv(wq, H_I * d_I, d, xb, raw.data());
    for (int64_t h = 0; h < H_I; ++h) rotate(raw.data() + h * d_I, cos, sin, swap, d_I, q + (b * H_I + h) * d_I);
    float* kr = raw.data() + H_I * d_I;
    gemv(wk, d_I, d, xb, kr);
    layer_norm(kr, d_I, ln_w, ln_b, static_cast<float>(eps));
    rotate(kr, cos, sin, swap, d_I, k + b * d_I);
    gemv(ww, H_I, d, xb, w + b * H_I);
    for (int64_t h = 0; h < H_I; ++h) w[b * H_I + h] *= static_cast<float>(scale);
  }
}
}
