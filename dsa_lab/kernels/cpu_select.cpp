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
//
// dsa_decode_row_* (a cached decode step's one new row, see decode_row below) fuses the GEMM in too: the per-head
// dot products of the query with each cached key, then the same row score and top-K.
#include <algorithm>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#include <cmath>
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
#if defined(__FMA__)
      sc[i] = std::fma(wh, x > 0 ? x : T(0), sc[i]);  // as the fused scoring (score_block) sums the heads
#else
      sc[i] += wh * (x > 0 ? x : T(0));
#endif
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

// a row's selection: the positions of its (score, position) keys, then -1 / invalid up to K
inline void write_row(const std::vector<int64_t>& keys, int64_t K, int64_t* out, uint8_t* ok) {
  const int64_t n = static_cast<int64_t>(keys.size());
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<int64_t>(static_cast<uint32_t>(keys[j]));
  for (int64_t j = 0; j < K; ++j) ok[j] = j < n;
  for (int64_t j = n; j < K; ++j) out[j] = -1;
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
      keys.clear();
      if (hi >= lo) {
        row_scores(per_head + (b * c + r) * H_I * S, w + (b * c + r) * H_I, H_I, S, lo, hi, sc.data());
        row_top_k(sc.data(), hi - lo + 1, lo, K, keys, maxima);
      }
      write_row(keys, K, out, ok);
    }
  }
}

// Prefill with the GEMM fused in (dsa_score_select_f32; x86 with AVX2 + FMA): the per-head dot products of a tile
// of query rows with every allowed key, in registers, as the GEMM sums them — each lane one FMA chain over d = 0 ..
// D - 1 (MKL's sgemm on x86 gives these bits: tests/test_cpu_select.py) — then ReLU, the head weights summed in head
// order as row_scores does, and the row's top-K as row_top_k: no (c, H_I, S) per-head scores written and read back.
// Layouts (float, elements): q (B, c, H_I, D) rows `q_batch` apart per batch; kt (B, D, S) the keys transposed, rows
// `ldk` apart, batches `k_batch` apart; w (B, c, H_I) batches `w_batch` apart; idx/valid as select_chunk's.
// dims = {B, c, H_I, D, S, K, start, sinks, window, out_batch, q_batch, k_batch, ldk, w_batch}.
#if defined(__AVX512F__)
typedef __m512 VecF;
constexpr int64_t LANES = 16, TILE_ROWS = 2;  // 16 accumulators + 4 row sums of 32 registers
inline VecF vzero() { return _mm512_setzero_ps(); }
inline VecF vload(const float* p) { return _mm512_loadu_ps(p); }
inline VecF vload_first(const float* p, int64_t m) {  // lanes [0, m) of p, 0 beyond (nothing past them is read)
  return m >= LANES ? vload(p) : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (m > 0 ? m : 0)) - 1), p);
}
inline VecF vset1(float x) { return _mm512_set1_ps(x); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
inline VecF vrelu(VecF x) { return _mm512_max_ps(x, _mm512_setzero_ps()); }  // NaN -> 0, as x > 0 ? x : 0
inline void vstore(float* p, VecF v) { _mm512_storeu_ps(p, v); }
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 VecF;
constexpr int64_t LANES = 8, TILE_ROWS = 1;  // 8 accumulators + 2 row sums of 16 registers
inline VecF vzero() { return _mm256_setzero_ps(); }
inline VecF vload(const float* p) { return _mm256_loadu_ps(p); }
inline VecF vload_first(const float* p, int64_t m) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return m >= LANES ? vload(p) : _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(int(m)), lanes));
}
inline VecF vset1(float x) { return _mm256_set1_ps(x); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline VecF vrelu(VecF x) { return _mm256_max_ps(x, _mm256_setzero_ps()); }
inline void vstore(float* p, VecF v) { _mm256_storeu_ps(p, v); }
#endif
#if defined(__AVX2__) && defined(__FMA__)
constexpr int64_t FUSED_LANES = LANES;

// the rows' sums sv[r][0..1] (keys i < m of kt's first 2 * LANES columns; 0 at the others) += heads h0 .. h0 + NH - 1:
// w * relu(q_h . k); TAIL: m < 2 * LANES, nothing past key m - 1 is read
template <int64_t NH, bool TAIL>
inline void add_heads(const float* const* q, const float* const* w, int64_t h0, int64_t D, const float* kt,
                      int64_t ldk, int64_t m, VecF (&sv)[TILE_ROWS][2]) {
  VecF acc[TILE_ROWS][NH][2];
  for (int64_t r = 0; r < TILE_ROWS; ++r)
    for (int64_t h = 0; h < NH; ++h) acc[r][h][0] = acc[r][h][1] = vzero();
  for (int64_t d = 0; d < D; ++d) {
    const float* row = kt + d * ldk;
    const VecF k0 = TAIL ? vload_first(row, m) : vload(row);
    const VecF k1 = TAIL ? vload_first(row + LANES, m - LANES) : vload(row + LANES);
    for (int64_t r = 0; r < TILE_ROWS; ++r)
      for (int64_t h = 0; h < NH; ++h) {
        const VecF qd = vset1(q[r][(h0 + h) * D + d]);
        acc[r][h][0] = vfma(qd, k0, acc[r][h][0]);
        acc[r][h][1] = vfma(qd, k1, acc[r][h][1]);
      }
  }
  for (int64_t r = 0; r < TILE_ROWS; ++r)
    for (int64_t h = 0; h < NH; ++h) {
      const VecF wh = vset1(w[r][h0 + h]);
      sv[r][0] = vfma(wh, vrelu(acc[r][h][0]), sv[r][0]);
      sv[r][1] = vfma(wh, vrelu(acc[r][h][1]), sv[r][1]);
    }
}

// sc[r * ld + i] = row r's score of key i of kt for the tile's TILE_ROWS rows (q[r], w[r]), keys i < m (m <= 2 *
// LANES); written up to the block's end (sc's rows have 2 * LANES spare columns), the heads in order, four at a time
template <bool TAIL>
inline void score_block(const float* const* q, const float* const* w, int64_t H_I, int64_t D, const float* kt,
                        int64_t ldk, int64_t m, float* sc, int64_t ld) {
  VecF sv[TILE_ROWS][2];
  for (int64_t r = 0; r < TILE_ROWS; ++r) sv[r][0] = sv[r][1] = vzero();
  int64_t h = 0;
  for (; h + 4 <= H_I; h += 4) add_heads<4, TAIL>(q, w, h, D, kt, ldk, m, sv);
  switch (H_I - h) {
    case 3: add_heads<3, TAIL>(q, w, h, D, kt, ldk, m, sv); break;
    case 2: add_heads<2, TAIL>(q, w, h, D, kt, ldk, m, sv); break;
    case 1: add_heads<1, TAIL>(q, w, h, D, kt, ldk, m, sv); break;
  }
  for (int64_t r = 0; r < TILE_ROWS; ++r) {
    vstore(sc + r * ld, sv[r][0]);
    vstore(sc + r * ld + LANES, sv[r][1]);
  }
}

// the tile's row scores of keys i < n of kt, blocks of 2 * LANES keys
void score_tile(const float* const* q, const float* const* w, int64_t H_I, int64_t D, const float* kt, int64_t ldk,
                int64_t n, float* sc, int64_t ld) {
  int64_t i = 0;
  for (; i + 2 * LANES <= n; i += 2 * LANES) score_block<false>(q, w, H_I, D, kt + i, ldk, 2 * LANES, sc + i, ld);
  if (i < n) score_block<true>(q, w, H_I, D, kt + i, ldk, n - i, sc + i, ld);
}

constexpr int64_t KEY_BLOCK = 512;  // keys per block of kt (D rows: 128 KB at D 64) that every row of a chunk scores

void score_select_chunk(const float* q, const float* kt, const float* w, int64_t* idx, uint8_t* valid,
                        const int64_t* dims) {
  const int64_t B = dims[0], c = dims[1], H_I = dims[2], D = dims[3], K = dims[5], start = dims[6],
                sinks = dims[7], window = dims[8], out_batch = dims[9], q_batch = dims[10], k_batch = dims[11],
                ldk = dims[12], w_batch = dims[13];
  const int64_t lo = sinks, ld = dims[4] + 2 * LANES;  // a row's keys and a block's spare columns
  std::vector<float> sc((c + TILE_ROWS) * ld);  // (c, ld) row scores; a tile past the last row writes the spare rows
  std::vector<int64_t> keys;
  std::vector<float> maxima;
  for (int64_t b = 0; b < B; ++b) {
    const float* kb = kt + b * k_batch + lo;
    for (int64_t i0 = 0; i0 < start + c - window - lo; i0 += KEY_BLOCK) {  // key blocks outer: kt's block stays cached
      for (int64_t r0 = 0; r0 < c; r0 += TILE_ROWS) {
        const int64_t rows = std::min(TILE_ROWS, c - r0);
        const int64_t n = std::min(start + r0 + rows - window - lo, i0 + KEY_BLOCK) - i0;  // the tile's keys here
        if (n <= 0) continue;
        const float* qr[TILE_ROWS];
        const float* wr[TILE_ROWS];
        for (int64_t r = 0; r < TILE_ROWS; ++r) {  // a tile past the chunk's last row repeats it (scored, dropped)
          const int64_t row = r0 + std::min(r, rows - 1);
          qr[r] = q + b * q_batch + row * H_I * D;
          wr[r] = w + b * w_batch + row * H_I;
        }
        score_tile(qr, wr, H_I, D, kb + i0, ldk, n, sc.data() + r0 * ld + i0, ld);
      }
    }
    for (int64_t r = 0; r < c; ++r) {
      const int64_t hi = start + r - window;
      keys.clear();
      if (hi >= lo) row_top_k(sc.data() + r * ld, hi - lo + 1, lo, K, keys, maxima);
      write_row(keys, K, idx + b * out_batch + r * K, valid + b * out_batch + r * K);
    }
  }
}
#else
constexpr int64_t FUSED_LANES = 0;  // no fused scoring here: chunked_select keeps the GEMM
#endif

// A cached decode step's one new row, its GEMM fused too: q (B, H_I, D) of the query at position T - 1 over the cached
// keys k (B rows `k_batch` elements apart, T keys of D contiguous elements, in P), w (B, H_I) -> idx/valid (B, K),
// batch rows K apart. Per key s: the H_I dot products q_h . k_s (float, 8 lanes then their sum: not the GEMM's
// summation order; bf16 keys: rounded to bf16 as the bf16 GEMM's output is), each checked for NaN, then the row
// score as row_scores makes it, over [sinks, T - 1 - window];
// the top-K as row_top_k. dims = {B, H_I, D, T, K, sinks, window, k_batch}. Returns the number of NaN dot products
// and weights (0: none).
typedef float v8f __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline v8f load8(const uint16_t* p) {
  v8f v;
  for (int i = 0; i < 8; ++i) v[i] = to_float(p[i]);
  return v;
}
inline float lane_sum(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// the dot products of heads h0 .. h0 + 3 (D a multiple of 8) with two keys k0, k1: eight independent accumulator
// chains that share the query loads, fused multiply-adds where the CPU has them (x86 AVX2 + FMA, one horizontal
// pass per key for its four sums) -> out0[0..4), out1[0..4)
#if defined(__AVX2__) && defined(__FMA__)
inline __m128 sum_lanes4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
template <typename P>
inline void dots4x2(const float* q, const P* k0, const P* k1, int64_t D, float* out0, float* out1) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 x = load8(k0 + d), y = load8(k1 + d);
    __m256 qh = _mm256_loadu_ps(q + d);
    a0 = _mm256_fmadd_ps(qh, x, a0), b0 = _mm256_fmadd_ps(qh, y, b0);
    qh = _mm256_loadu_ps(q + D + d);
    a1 = _mm256_fmadd_ps(qh, x, a1), b1 = _mm256_fmadd_ps(qh, y, b1);
    qh = _mm256_loadu_ps(q + 2 * D + d);
    a2 = _mm256_fmadd_ps(qh, x, a2), b2 = _mm256_fmadd_ps(qh, y, b2);
    qh = _mm256_loadu_ps(q + 3 * D + d);
    a3 = _mm256_fmadd_ps(qh, x, a3), b3 = _mm256_fmadd_ps(qh, y, b3);
  }
  _mm_storeu_ps(out0, sum_lanes4(a0, a1, a2, a3));
  _mm_storeu_ps(out1, sum_lanes4(b0, b1, b2, b3));
}
#else
template <typename P>
inline void dots4x2(const float* q, const P* k0, const P* k1, int64_t D, float* out0, float* out1) {
  v8f a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
  for (int64_t d = 0; d < D; d += 8) {
    const v8f x = load8(k0 + d), y = load8(k1 + d);
    v8f qh = load8(q + d);
    a0 += qh * x, b0 += qh * y;
    qh = load8(q + D + d);
    a1 += qh * x, b1 += qh * y;
    qh = load8(q + 2 * D + d);
    a2 += qh * x, b2 += qh * y;
    qh = load8(q + 3 * D + d);
    a3 += qh * x, b3 += qh * y;
  }
  out0[0] = lane_sum(a0), out0[1] = lane_sum(a1), out0[2] = lane_sum(a2), out0[3] = lane_sum(a3);
  out1[0] = lane_sum(b0), out1[1] = lane_sum(b1), out1[2] = lane_sum(b2), out1[3] = lane_sum(b3);
}
#endif

template <typename P>
inline float dot1(const float* q, const P* ks, int64_t D) {
  float dot = 0;
  for (int64_t d = 0; d < D; ++d) dot += q[d] * to_float(ks[d]);
  return dot;
}

inline float round_bf16(float x) {  // x rounded to bf16 (to nearest, ties to even), as a float; NaN stays NaN
  if (x != x) return x;
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000u;
  std::memcpy(&x, &u, sizeof x);
  return x;
}
inline float gemm_output(float dot, float) { return dot; }
inline float gemm_output(float dot, uint16_t) { return round_bf16(dot); }  // the bf16 GEMM writes bf16 scores

// sc[s] = the row score of keys s < T; -> the number of NaN per-head scores among them
template <typename P>
int64_t score_keys(const float* q, const P* k, const float* w, int64_t H_I, int64_t D, int64_t T, float* sc) {
  const int64_t H4 = D % 8 ? 0 : H_I / 4 * 4;
  std::vector<float> dots(2 * H_I);
  int64_t nans = 0;
  for (int64_t s = 0; s < T; s += 2) {  // keys s and s + 1 (the last one twice when T is odd)
    const P* k0 = k + s * D;
    const P* k1 = s + 1 < T ? k0 + D : k0;
    for (int64_t h = 0; h < H4; h += 4) dots4x2(q + h * D, k0, k1, D, dots.data() + h, dots.data() + H_I + h);
    for (int64_t h = H4; h < H_I; ++h) dots[h] = dot1(q + h * D, k0, D), dots[H_I + h] = dot1(q + h * D, k1, D);
    for (int64_t j = 0; j < 2 && s + j < T; ++j) {
      const float* dj = dots.data() + j * H_I;
      float score = 0;
      for (int64_t h = 0; h < H_I; ++h) {
        const float x = gemm_output(dj[h], P());
        nans += x != x;
        score += w[h] * (x > 0 ? x : 0.0f);
      }
      sc[s + j] = score;
    }
  }
  return nans;
}

template <typename P>
int64_t decode_row(const float* q, const P* k, const float* w, int64_t* idx, uint8_t* valid, const int64_t* dims) {
  const int64_t B = dims[0], H_I = dims[1], D = dims[2], T = dims[3], K = dims[4], sinks = dims[5],
                window = dims[6], k_batch = dims[7];
  const int64_t lo = sinks, hi = T - 1 - window;
  std::vector<float> sc(T > 0 ? T : 1);
  std::vector<int64_t> keys;
  std::vector<float> maxima;
  int64_t nans = 0;
  for (int64_t b = 0; b < B; ++b) {
    const float* qb = q + b * H_I * D;
    const float* wb = w + b * H_I;
    for (int64_t h = 0; h < H_I; ++h) nans += wb[h] != wb[h];
    nans += score_keys(qb, k + b * k_batch, wb, H_I, D, T, sc.data());
    keys.clear();
    if (hi >= lo) row_top_k(sc.data() + lo, hi - lo + 1, lo, K, keys, maxima);
    write_row(keys, K, idx + b * K, valid + b * K);
  }
  return nans;
}

}  // namespace

extern "C" {
int64_t dsa_decode_row_f32(const float* q, const float* k, const float* w, int64_t* idx, uint8_t* valid,
                           const int64_t* dims) {
  return decode_row(q, k, w, idx, valid, dims);
}
int64_t dsa_decode_row_bf16(const float* q, const uint16_t* k, const float* w, int64_t* idx, uint8_t* valid,
                            const int64_t* dims) {
  return decode_row(q, k, w, idx, valid, dims);
}
int64_t dsa_fused_lanes() { return FUSED_LANES; }
// q (rows, D) . kt (D, n) -> out (rows, n), each dot one FMA chain over d = 0 .. D - 1: the fused scoring's sums, for
// cpu_select's check that torch's GEMM sums the same way here. dims = {rows, D, n}
void dsa_head_dots_f32(const float* q, const float* kt, float* out, const int64_t* dims) {
  const int64_t rows = dims[0], D = dims[1], n = dims[2];
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) {
      float dot = 0;
      for (int64_t d = 0; d < D; ++d) dot = std::fma(q[r * D + d], kt[d * n + i], dot);
      out[r * n + i] = dot;
    }
}
#if defined(__AVX2__) && defined(__FMA__)
void dsa_score_select_f32(const float* q, const float* kt, const float* w, int64_t* idx, uint8_t* valid,
                          const int64_t* dims) {
  score_select_chunk(q, kt, w, idx, valid, dims);
}
#endif
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
