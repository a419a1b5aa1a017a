// Token-level sparse attention on CPU without materialising the gathered keys/values (dsa_lab/kernels/cpu_sparse.py).
//
// One call handles the queries [t0, t1) of every batch row for the KV heads [g0, g1) (and their query heads),
// single-threaded: Python runs one call per worker thread
// (ctypes releases the GIL), so this file needs no OpenMP runtime beside torch's. Per query t and KV head g, each
// selected key/value row is read ONCE from the (B, Hkv, L, D) tables, straight inside the dot products, and used
// by all G = H / Hkv query heads of its group (MHA: G = 1; GQA; MQA: Hkv = 1). Nothing of size (L, K, D) exists.
//
// Layouts (elements; the last dim contiguous):
//   q, do  (B, H, L, D)  strides qs = {b, h, t}       k (B, Hkv, L, D)  ks     v (B, Hkv, L, Dv)  vs
//   idx    (B, L, K) int64 contiguous, -1 = invalid slot (the selection contract: only invalid slots are -1)
//   out    (B, H, L, Dv) contiguous   lse (B, H, L) contiguous (+inf for a row with no valid slot: p = 0, out = 0)
//   probs  (B, H, L, K) contiguous or null
//   dq     (B, H, L, D) contiguous    dk_acc (B, L, Hkv, D), dv_acc (B, L, Hkv, Dv) contiguous (token-major), private
//          to the call's worker (the caller adds the workers' accumulators)
// k and v are fastest token-major ((B, L, Hkv, D) memory passed as strides of a (B, Hkv, L, D) view): a selected token
// is then one contiguous row for all its KV heads.
// dims = {B, H, Hkv, L, D, Dv, K}
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// a . b sums in the lanes of a 64-byte vector (lane l: elements l, l + W, l + 2W, ... by FMA), then a tree sum of its
// halves (lane l + lane l + W/2, ...), all in registers. The lanes are held as two 32-byte halves: as ONE 64-byte
// vector type, GCC spilled it to the stack every iteration on a CPU without 64-byte registers (AVX2), 3x slower
// there (2026-12-07); as an array on the stack the lanes' sum was a chain of store-forwarded scalar adds. The sums
// (and so every output bit) are those of the 64-byte vector's.
typedef float F8 __attribute__((vector_size(32)));
typedef float F4 __attribute__((vector_size(16)));
typedef float F2 __attribute__((vector_size(8)));
typedef double D4 __attribute__((vector_size(32)));
typedef double D2 __attribute__((vector_size(16)));

// the sum of v's two halves, lane by lane: lane l + lane l + N/2 (__builtin_shufflevector in GCC >= 12 and clang;
// older compilers copy the halves out, the same sums at ~1.4x the backward's time)
template <typename Half, typename Whole>
inline Half halves(const Whole& v) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  if constexpr (sizeof(Whole) / sizeof(v[0]) == 8)
    return __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  else if constexpr (sizeof(Whole) / sizeof(v[0]) == 4)
    return __builtin_shufflevector(v, v, 0, 1) + __builtin_shufflevector(v, v, 2, 3);
#endif
  Half lo, hi;
  std::memcpy(&lo, &v, sizeof(Half));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
  return lo + hi;
}

// the 32-byte half of T's 64-byte lanes
template <typename T> struct Half;
template <> struct Half<float> { typedef F8 V; };
template <> struct Half<double> { typedef D4 V; };

// the tree sum of the 64-byte lanes (lo: lanes 0..W/2-1, hi: the rest)
template <typename T>
inline T sum_halves(typename Half<T>::V lo, typename Half<T>::V hi) {
  if constexpr (sizeof(T) == 4) {
    const F2 c = halves<F2>(halves<F4>(lo + hi));
    return c[0] + c[1];
  } else {
    const D2 b = halves<D2>(lo + hi);
    return b[0] + b[1];
  }
}

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  typedef typename Half<T>::V V;
  constexpr int64_t W = 2 * sizeof(V) / sizeof(T);  // lanes of the 64-byte vector the sums are defined on
  V lo = {}, hi = {};
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    V xl, xh, yl, yh;
    std::memcpy(&xl, a + i, sizeof(V));  // unaligned vector loads
    std::memcpy(&xh, a + i + W / 2, sizeof(V));
    std::memcpy(&yl, b + i, sizeof(V));
    std::memcpy(&yh, b + i + W / 2, sizeof(V));
    lo += xl * yl;
    hi += xh * yh;
  }
  T acc = 0;
  for (; i < n; ++i) acc += a[i] * b[i];
  return acc + sum_halves<T>(lo, hi);
}

template <typename T>
inline void axpy(T a, const T* __restrict x, T* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

struct Dims {
  int64_t B, H, Hkv, L, D, Dv, K, G;
  explicit Dims(const int64_t* d) : B(d[0]), H(d[1]), Hkv(d[2]), L(d[3]), D(d[4]), Dv(d[5]), K(d[6]), G(d[1] / d[2]) {}
};

// the KV heads [g0, g1) a call works on and their query heads [h0, h1): a call over all its queries for a few KV
// heads at a time keeps those heads' K/V rows (and dK/dV rows) cache-resident while its random rows are read
struct Heads {
  int64_t g0, g1, h0, h1;
  Heads(const Dims& n, int64_t g0_, int64_t g1_) : g0(g0_), g1(g1_), h0(g0_ * n.G), h1(g1_ * n.G) {}
};

// scores (H, K) of one query: sc[h*K + j] = scale * q_h . k[s_j] (one read of row k[s_j] per KV head, used by its G
// query heads); -inf at invalid slots. Keys j outer, heads inner: with token-major k a selected token is one
// contiguous (Hkv, D) row, prefetched PREFETCH slots ahead.
constexpr int64_t PREFETCH = 4;

template <typename T>
inline void prefetch_row(const T* row, int64_t n, int rw) {
  for (int64_t i = 0; i < n; i += 64 / sizeof(T)) rw ? __builtin_prefetch(row + i, 1) : __builtin_prefetch(row + i);
}

template <typename T>
void query_scores(const Dims& n, const Heads& r, const T* qt, const int64_t* qs, const T* kb, const int64_t* ks,
                  const int64_t* sel, T scale, T* sc) {
  for (int64_t j = 0; j < n.K; ++j) {
    const int64_t s = sel[j];
    if (j + PREFETCH < n.K && sel[j + PREFETCH] >= 0)
      for (int64_t g = r.g0; g < r.g1; ++g) prefetch_row(kb + g * ks[1] + sel[j + PREFETCH] * ks[2], n.D, 0);
    for (int64_t h = r.h0; h < r.h1; ++h)
      sc[h * n.K + j] = s < 0 ? -std::numeric_limits<T>::infinity()
                              : scale * dot(qt + h * qs[1], kb + (h / n.G) * ks[1] + s * ks[2], n.D);
  }
}

// in place: sc (H, K) -> probabilities of the heads in r; writes their lse (+inf and p = 0 when no slot is valid)
template <typename T>
void softmax_rows(const Dims& n, const Heads& r, T* sc, T* lse_h) {
  const T inf = std::numeric_limits<T>::infinity();
  for (int64_t h = r.h0; h < r.h1; ++h) {
    T* row = sc + h * n.K;
    T m = -inf;
    for (int64_t j = 0; j < n.K; ++j) m = row[j] > m ? row[j] : m;
    if (m == -inf) {
      for (int64_t j = 0; j < n.K; ++j) row[j] = 0;
      lse_h[h] = inf;
      continue;
    }
    T l = 0;
    for (int64_t j = 0; j < n.K; ++j) {
      row[j] = std::exp(row[j] - m);
      l += row[j];
    }
    for (int64_t j = 0; j < n.K; ++j) row[j] /= l;
    lse_h[h] = m + std::log(l);
  }
}

template <typename T>
void forward(const T* q, const T* k, const T* v, const int64_t* idx, T* out, T* lse, T* probs, const int64_t* dims,
             const int64_t* qs, const int64_t* ks, const int64_t* vs, int64_t t0, int64_t t1, int64_t g0, int64_t g1,
             double scale) {
  const Dims n(dims);
  const Heads r(n, g0, g1);
  std::vector<T> sc(n.H * n.K), acc(n.H * n.Dv), lse_h(n.H);
  for (int64_t b = 0; b < n.B; ++b) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t* sel = idx + (b * n.L + t) * n.K;
      const T* qt = q + b * qs[0] + t * qs[2];
      query_scores(n, r, qt, qs, k + b * ks[0], ks, sel, static_cast<T>(scale), sc.data());
      softmax_rows(n, r, sc.data(), lse_h.data());
      for (int64_t e = r.h0 * n.Dv; e < r.h1 * n.Dv; ++e) acc[e] = 0;
      const T* vb = v + b * vs[0];
      for (int64_t j = 0; j < n.K; ++j) {  // out_h = sum_j p[h, j] v[s_j]: keys outer, heads inner (one row read)
        const int64_t s = sel[j];
        if (s < 0) continue;
        if (j + PREFETCH < n.K && sel[j + PREFETCH] >= 0)
          for (int64_t g = r.g0; g < r.g1; ++g) prefetch_row(vb + g * vs[1] + sel[j + PREFETCH] * vs[2], n.Dv, 0);
        for (int64_t h = r.h0; h < r.h1; ++h)
          axpy(sc[h * n.K + j], vb + (h / n.G) * vs[1] + s * vs[2], &acc[h * n.Dv], n.Dv);
      }
      for (int64_t h = r.h0; h < r.h1; ++h) {
        const int64_t row = (b * n.H + h) * n.L + t;
        for (int64_t e = 0; e < n.Dv; ++e) out[row * n.Dv + e] = acc[h * n.Dv + e];
        lse[row] = lse_h[h];
        if (probs)
          for (int64_t j = 0; j < n.K; ++j) probs[row * n.K + j] = sc[h * n.K + j];
      }
    }
  }
}

// one query's gradients: dq_t (H, D) written; the rows of its selected keys in dk_acc (L, Hkv, D), dv_acc (L, Hkv, Dv)
// (token-major, the call's batch row) accumulated. Keys outer, heads inner: each selected row read once.
template <typename T>
void backward_query(const Dims& n, const Heads& r, const T* qt, const int64_t* qs, const T* dot_, const int64_t* ds_,
                    const T* kb, const int64_t* ks, const T* vb, const int64_t* vs, const int64_t* sel, const T* lse_t,
                    const T* delta, T scale, T* dq_t, T* dkb, T* dvb) {
  for (int64_t j = 0; j < n.K; ++j) {
    const int64_t s = sel[j];
    if (s < 0) continue;
    if (j + PREFETCH < n.K && sel[j + PREFETCH] >= 0) {
      const int64_t sn = sel[j + PREFETCH];
      for (int64_t g = r.g0; g < r.g1; ++g) {
        prefetch_row(kb + g * ks[1] + sn * ks[2], n.D, 0);
        prefetch_row(vb + g * vs[1] + sn * vs[2], n.Dv, 0);
      }
      prefetch_row(dkb + (sn * n.Hkv + r.g0) * n.D, (r.g1 - r.g0) * n.D, 1);
      prefetch_row(dvb + (sn * n.Hkv + r.g0) * n.Dv, (r.g1 - r.g0) * n.Dv, 1);
    }
    for (int64_t h = r.h0; h < r.h1; ++h) {
      const int64_t g = h / n.G;
      const T* krow = kb + g * ks[1] + s * ks[2];
      const T* vrow = vb + g * vs[1] + s * vs[2];
      const T* qh = qt + h * qs[1];
      const T* doh = dot_ + h * ds_[1];
      const T p = std::exp(scale * dot(qh, krow, n.D) - lse_t[h]);
      const T dsc = p * (dot(doh, vrow, n.Dv) - delta[h]) * scale;
      axpy(dsc, krow, dq_t + h * n.D, n.D);
      axpy(dsc, qh, dkb + (s * n.Hkv + g) * n.D, n.D);
      axpy(p, doh, dvb + (s * n.Hkv + g) * n.Dv, n.Dv);
    }
  }
}

template <typename T>
void backward(const T* q, const T* k, const T* v, const int64_t* idx, const T* out, const T* lse, const T* dout,
              T* dq, T* dk_acc, T* dv_acc, const int64_t* dims, const int64_t* qs, const int64_t* ks,
              const int64_t* vs, const int64_t* dos, int64_t t0, int64_t t1, int64_t g0, int64_t g1, double scale) {
  const Dims n(dims);
  const Heads r(n, g0, g1);
  std::vector<T> dq_t(n.H * n.D), delta(n.H), lse_t(n.H);
  for (int64_t b = 0; b < n.B; ++b) {
    for (int64_t t = t0; t < t1; ++t) {
      const T* qt = q + b * qs[0] + t * qs[2];
      const T* dot_ = dout + b * dos[0] + t * dos[2];
      for (int64_t h = r.h0; h < r.h1; ++h) {
        const int64_t row = (b * n.H + h) * n.L + t;
        delta[h] = dot(dot_ + h * dos[1], out + row * n.Dv, n.Dv);
        lse_t[h] = lse[row];
      }
      for (int64_t i = r.h0 * n.D; i < r.h1 * n.D; ++i) dq_t[i] = 0;
      backward_query(n, r, qt, qs, dot_, dos, k + b * ks[0], ks, v + b * vs[0], vs, idx + (b * n.L + t) * n.K,
                     lse_t.data(), delta.data(), static_cast<T>(scale), dq_t.data(),
                     dk_acc + b * n.Hkv * n.L * n.D, dv_acc + b * n.Hkv * n.L * n.Dv);
      for (int64_t h = r.h0; h < r.h1; ++h)
        for (int64_t e = 0; e < n.D; ++e) dq[((b * n.H + h) * n.L + t) * n.D + e] = dq_t[h * n.D + e];
    }
  }
}

}  // namespace

extern "C" {
void dsa_sparse_fwd_f32(const float* q, const float* k, const float* v, const int64_t* idx, float* out, float* lse,
                        float* probs, const int64_t* dims, const int64_t* qs, const int64_t* ks, const int64_t* vs,
                        int64_t t0, int64_t t1, int64_t g0, int64_t g1, double scale) {
  forward(q, k, v, idx, out, lse, probs, dims, qs, ks, vs, t0, t1, g0, g1, scale);
}
void dsa_sparse_fwd_f64(const double* q, const double* k, const double* v, const int64_t* idx, double* out,
                        double* lse, double* probs, const int64_t* dims, const int64_t* qs, const int64_t* ks,
                        const int64_t* vs, int64_t t0, int64_t t1, int64_t g0, int64_t g1, double scale) {
  forward(q, k, v, idx, out, lse, probs, dims, qs, ks, vs, t0, t1, g0, g1, scale);
}
void dsa_sparse_bwd_f32(const float* q, const float* k, const float* v, const int64_t* idx, const float* out,
                        const float* lse, const float* dout, float* dq, float* dk_acc, float* dv_acc,
                        const int64_t* dims, const int64_t* qs, const int64_t* ks, const int64_t* vs,
                        const int64_t* dos, int64_t t0, int64_t t1, int64_t g0, int64_t g1, double scale) {
  backward(q, k, v, idx, out, lse, dout, dq, dk_acc, dv_acc, dims, qs, ks, vs, dos, t0, t1, g0, g1, scale);
}
void dsa_sparse_bwd_f64(const double* q, const double* k, const double* v, const int64_t* idx, const double* out,
                        const double* lse, const double* dout, double* dq, double* dk_acc, double* dv_acc,
                        const int64_t* dims, const int64_t* qs, const int64_t* ks, const int64_t* vs,
                        const int64_t* dos, int64_t t0, int64_t t1, int64_t g0, int64_t g1, double scale) {
  backward(q, k, v, idx, out, lse, dout, dq, dk_acc, dv_acc, dims, qs, ks, vs, dos, t0, t1, g0, g1, scale);
}
}
