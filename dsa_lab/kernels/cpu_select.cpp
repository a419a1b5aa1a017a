// The indexer's score -> top-k selection of one query chunk, fused on CPU (dsa_lab/kernels/cpu_select.py).
//
// After the per-head GEMM (torch) has written a chunk's per-head scores, one pass per query row t does the rest of
// `index_scores` + `select_top_k`: score[s] = sum_h w[t, h] * relu(per_head[t, h, s]) over the row's allowed keys
// s in [lo, hi] = [sinks, t - window] (sinks = window = 0: every past key), then its top-K keys in the reference's
// order — descending (score as float32, position), i.e. ties toward the most recent key — written as positions,
// the rest of the row -1 / invalid. No (c, S) score tensor, no masks, no int64 key tensors: one row buffer.
//
// Layouts (elements, contiguous): per_head (B, c, H_I, S) in P (float, double, or bf16 as uint16_t);
// w (B, c, H_I) and the summed scores in T (float or double); idx (B, c, K) int64 and valid (B, c, K) bool (uint8),
// rows of query positions start .. start + c - 1, batch rows `out_batch` elements apart (a (B, L, K) selection's
// rows [start, start + c): L * K). dims = {B, c, H_I, S, K, start, sinks, window, out_batch}.
//
// Top-K, exact: a bar from the row's blocks of BLOCK keys — the K-th largest block maximum, which K keys reach, so
// the K-th best key reaches it too — keeps only the keys at or above it as candidates (~K of them on random scores;
// more only where scores tie at the bar), and one nth_element + sort of their (score, position) keys gives the K
// best in order.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

namespace {

inline float to_float(uint16_t bf16) {  // bf16 bits -> the float they round from
  const uint32_t u = static_cast<uint32_t>(bf16) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float to_float(float x) { return x; }
inline double to_float(double x) { return x; }

// the reference's key (sparse_attention.score_position_key): order-preserving float32 bits high, position low
inline int64_t position_key(float score, int64_t s) {
  score += 0.0f;  // -0.0 -> +0.0
  int32_t bits;
  std::memcpy(&bits, &score, sizeof bits);
  bits ^= (bits >> 31) & 0x7FFFFFFF;  // negative floats: reverse their magnitude order
  return (static_cast<int64_t>(bits) << 32) | static_cast<int64_t>(static_cast<uint32_t>(s));
}

// row scores sc[s - lo] = sum_h w[h] * relu(ph[h][s]) for s in [lo, hi]
template <typename P, typename T>
void row_scores(const P* ph, const T* w, int64_t H_I, int64_t S, int64_t lo, int64_t hi, T* sc) {
  const int64_t n = hi - lo + 1;
  for (int64_t i = 0; i < n; ++i) sc[i] = 0;
  for (int64_t h = 0; h < H_I; ++h) {
    const P* row = ph + h * S + lo;
    const T wh = w[h];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T x = static_cast<T>(to_float(row[i]));
      sc[i] += wh * (x > 0 ? x : T(0));
    }
  }
}

constexpr int64_t BLOCK = 8;  // keys per block of the threshold's block maxima

// the top-K (score, position) keys of sc[0..n) (positions lo..lo+n-1), descending, into keys (size min(K, n))
template <typename T>
void row_top_k(const T* sc, int64_t n, int64_t lo, int64_t K, std::vector<int64_t>& keys, std::vector<float>& maxima) {
  const auto greater = std::greater<int64_t>();
  const int64_t nb = n / BLOCK;  // full blocks; the last n % BLOCK keys are always candidates
  keys.clear();
  for (int64_t i = nb * BLOCK; i < n; ++i) keys.push_back(position_key(float(sc[i]), lo + i));
  if (nb <= K) {
    for (int64_t i = 0; i < nb * BLOCK; ++i) keys.push_back(position_key(float(sc[i]), lo + i));
  } else {  // the bar: the K-th largest block maximum (K keys reach it, so the K-th best key does)
    maxima.resize(2 * nb);  // [0, nb): each block's maximum; [nb, 2 nb): a copy that nth_element reorders
    for (int64_t blk = 0; blk < nb; ++blk) {
      float m = float(sc[blk * BLOCK]);
      for (int64_t i = 1; i < BLOCK; ++i) m = std::max(m, float(sc[blk * BLOCK + i]));
      maxima[blk] = maxima[nb + blk] = m;
    }
    std::nth_element(maxima.begin() + nb, maxima.begin() + nb + (K - 1), maxima.end(), std::greater<float>());
    const float bar = maxima[nb + K - 1];
    for (int64_t blk = 0; blk < nb; ++blk) {
      if (maxima[blk] < bar) continue;  // no key of this block reaches the bar
      for (int64_t i = blk * BLOCK; i < (blk + 1) * BLOCK; ++i) {
        const float f = float(sc[i]);
        if (f >= bar) keys.push_back(position_key(f, lo + i));
      }
    }
  }
  if (static_cast<int64_t>(keys.size()) > K) {
    std::nth_element(keys.begin(), keys.begin() + (K - 1), keys.end(), greater);
    keys.resize(K);
  }
  std::sort(keys.begin(), keys.end(), greater);  // descending
}

template <typename P, typename T>
void select_chunk(const P* per_head, const T* w, int64_t* idx, uint8_t* valid, const int64_t* dims) {
  const int64_t B = dims[0], c = dims[1], H_I = dims[2], S = dims[3], K = dims[4], start = dims[5], sinks = dims[6],
                window = dims[7], out_batch = dims[8];
  std::vector<T> sc(S);
  std::vector<int64_t> keys;
  std::vector<float> maxima;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t r = 0; r < c; ++r) {
      const int64_t t = start + r, lo = sinks, hi = t - window;
      int64_t* out = idx + b * out_batch + r * K;
      uint8_t* ok = valid + b * out_batch + r * K;
      int64_t n = 0;
      if (hi >= lo) {
        row_scores(per_head + (b * c + r) * H_I * S, w + (b * c + r) * H_I, H_I, S, lo, hi, sc.data());
        row_top_k(sc.data(), hi - lo + 1, lo, K, keys, maxima);
        n = static_cast<int64_t>(keys.size());
        for (int64_t j = 0; j < n; ++j) out[j] = static_cast<int64_t>(static_cast<uint32_t>(keys[j]));
      }
      for (int64_t j = 0; j < K; ++j) ok[j] = j < n;
      for (int64_t j = n; j < K; ++j) out[j] = -1;
    }
  }
}

}  // namespace

extern "C" {
void dsa_select_f32(const float* per_head, const float* w, int64_t* idx, uint8_t* valid, const int64_t* dims) {
  select_chunk(per_head, w, idx, valid, dims);
}
void dsa_select_f64(const double* per_head, const double* w, int64_t* idx, uint8_t* valid, const int64_t* dims) {
  select_chunk(per_head, w, idx, valid, dims);
}
void dsa_select_bf16(const uint16_t* per_head, const float* w, int64_t* idx, uint8_t* valid, const int64_t* dims) {
  select_chunk(per_head, w, idx, valid, dims);
}
}
