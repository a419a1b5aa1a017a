// Token-level sparse attention on CPU without materialising the gathered keys/values (dsa_lab/kernels/cpu_sparse.py).
//
// One call handles the queries [t0, t1) (the backward's pass B: the keys [s0, s1)) of every batch row for the KV heads
// [g0, g1) (and their query heads), single-threaded: Python runs one call per worker thread
// (ctypes releases the GIL), so this file needs no OpenMP runtime beside torch's. Per query t and KV head g, each
// selected key/value row is fetched from the (B, Hkv, L, D) tables once (prefetched), straight into the dot products
// of the G = H / Hkv query heads of its group, which re-read it from L1 (MHA: G = 1; GQA; MQA: Hkv = 1): keys four at
// a time per head (dot4), each head's out_h summed in registers (head_values), the softmax's exp in vector lanes
// (exp_inplace). Nothing of size (L, K, D) exists. The backward either scatters into per-worker dK/dV tables (GQA) or
// runs two passes that write no random row (MHA): dq query by query, dK/dV key by key (see "Two backwards").
//
// Layouts (elements; the last dim contiguous):
//   q, do  (B, H, L, D)  strides qs = {b, h, t}       k (B, Hkv, L, D)  ks     v (B, Hkv, L, Dv)  vs
//   idx    (B, L, K) int64 contiguous, -1 = invalid slot (the selection contract: only invalid slots are -1)
//   out    (B, H, L, Dv) contiguous   lse (B, H, L) contiguous (+inf for a row with no valid slot: p = 0, out = 0)
//   probs  (B, H, L, K) contiguous or null
//   dq     (B, H, L, D) contiguous    delta (B, H, L) contiguous    dk (B, Hkv, L, D), dv (B, Hkv, L, Dv) contiguous
//   dk_acc (B, L, Hkv, D), dv_acc (B, L, Hkv, Dv) contiguous (token-major), private to the call's worker (scatter)
//   off (B, L + 1) int64, queries (B, L * K) int32: the selection inverted (invert_selection)
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

// four dot products a . b[c] at once, each with dot()'s arithmetic (the same lanes, the same tree sum: the same bits);
// interleaved they are eight independent FMA chains instead of one dot's two
template <typename T>
inline void dot4(const T* __restrict a, const T* const* b, int64_t n, T* out) {
  typedef typename Half<T>::V V;
  constexpr int64_t W = 2 * sizeof(V) / sizeof(T);
  V l0 = {}, h0 = {}, l1 = {}, h1 = {}, l2 = {}, h2 = {}, l3 = {}, h3 = {};
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    V xl, xh, y;
    std::memcpy(&xl, a + i, sizeof(V));
    std::memcpy(&xh, a + i + W / 2, sizeof(V));
#define DSA_LANES(c, lo, hi)                             \
    std::memcpy(&y, b[c] + i, sizeof(V));                \
    lo += xl * y;                                        \
    std::memcpy(&y, b[c] + i + W / 2, sizeof(V));        \
    hi += xh * y;
    DSA_LANES(0, l0, h0) DSA_LANES(1, l1, h1) DSA_LANES(2, l2, h2) DSA_LANES(3, l3, h3)
#undef DSA_LANES
  }
  T acc[4] = {0, 0, 0, 0};
  for (int c = 0; c < 4; ++c)
    for (int64_t e = i; e < n; ++e) acc[c] += a[e] * b[c][e];
  out[0] = acc[0] + sum_halves<T>(l0, h0);
  out[1] = acc[1] + sum_halves<T>(l1, h1);
  out[2] = acc[2] + sum_halves<T>(l2, h2);
  out[3] = acc[3] + sum_halves<T>(l3, h3);
}

// the rows of slots j0 .. j0 + 3 (base + s * stride); `standin` (any readable row) for an invalid slot or one past K,
// whose result the caller drops
template <typename T, typename I>
inline void slot_rows(const I* sel, int64_t j0, int64_t K, const T* base, int64_t stride, const T* standin,
                      const T** rows) {
  for (int c = 0; c < 4; ++c) {
    const int64_t s = j0 + c < K ? sel[j0 + c] : -1;
    rows[c] = s < 0 ? standin : base + s * stride;
  }
}

// scores of KV head g's query heads for one query: sc[h*K + j] = scale * q_h . k[s_j] (-inf at invalid slots), keys
// four at a time (dot4); the key and value rows are prefetched PREFETCH slots ahead for the PV sums that follow
template <typename T>
void group_scores(const Dims& n, int64_t g, const T* qt, const int64_t* qs, const T* kb, const int64_t* ks,
                  const T* vb, const int64_t* vs, const int64_t* sel, T scale, T* sc) {
  const T* kg = kb + g * ks[1];
  for (int64_t j = 0; j < n.K && j < PREFETCH; ++j)
    if (sel[j] >= 0) prefetch_row(kg + sel[j] * ks[2], n.D, 0);
  for (int64_t j0 = 0; j0 < n.K; j0 += 4) {
    const T* rows[4];
    slot_rows(sel, j0, n.K, kg, ks[2], qt, rows);  // an invalid slot is scored -inf below
    for (int64_t j = j0 + PREFETCH; j < j0 + 4 + PREFETCH && j < n.K; ++j)
      if (sel[j] >= 0) {
        prefetch_row(kg + sel[j] * ks[2], n.D, 0);
        prefetch_row(vb + g * vs[1] + sel[j] * vs[2], n.Dv, 0);
      }
    for (int64_t h = g * n.G; h < (g + 1) * n.G; ++h) {
      T d[4];
      dot4(qt + h * qs[1], rows, n.D, d);
      for (int c = 0; c < 4 && j0 + c < n.K; ++c)
        sc[h * n.K + j0 + c] = sel[j0 + c] < 0 ? -std::numeric_limits<T>::infinity() : scale * d[c];
    }
  }
}

// out_h = sum_j p[j] v[s_j] for one head (out: Dv): the sums of up to 8 vectors of out held in registers over all
// the keys; per element the same FMAs in the same (key) order as an axpy per key (the same bits)
template <typename T>
void head_values(const T* p, const T* vg, int64_t row_stride, const int64_t* sel, int64_t K, int64_t Dv, T* out) {
  typedef typename Half<T>::V V;
  constexpr int64_t W = sizeof(V) / sizeof(T), C = 8;
  int64_t e = 0;
  for (; e + C * W <= Dv; e += C * W) {
    V a0 = {}, a1 = {}, a2 = {}, a3 = {}, a4 = {}, a5 = {}, a6 = {}, a7 = {};
    for (int64_t j = 0; j < K; ++j) {
      if (sel[j] < 0) continue;
      const T* x = vg + sel[j] * row_stride + e;
      const V pv = V{} + p[j];
      V y;
#define DSA_ACC(c, a) std::memcpy(&y, x + (c) * W, sizeof(V)); a += pv * y;
      DSA_ACC(0, a0) DSA_ACC(1, a1) DSA_ACC(2, a2) DSA_ACC(3, a3)
      DSA_ACC(4, a4) DSA_ACC(5, a5) DSA_ACC(6, a6) DSA_ACC(7, a7)
#undef DSA_ACC
    }
    const V all[C] = {a0, a1, a2, a3, a4, a5, a6, a7};
    std::memcpy(out + e, all, sizeof(all));
  }
  for (; e < Dv; ++e) {  // the FMA spelled out: GCC -O3 fused only some of these sums as written `a += p * v`
    T a = 0;
    for (int64_t j = 0; j < K; ++j)
      if (sel[j] >= 0) a = std::fma(p[j], vg[sel[j] * row_stride + e], a);
    out[e] = a;
  }
}

// exp over a row, in place. fp32: glibc's expf four lanes at once where every lane has |x| < 88 (its algorithm, ARM's
// optimized-routines e_expf.c, with the FMAs of glibc's FMA build: each lane gets expf(x)'s bits on such a CPU), the
// rest lane by lane through std::exp; fp64: std::exp
namespace expf_lanes {
constexpr uint64_t TAB[32] = {  // bits of 2^(i/32) - (i << 47)
    0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f, 0x3fef9301d0125b51,
    0x3fef72b83c7d517b, 0x3fef54873168b9aa, 0x3fef387a6e756238, 0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715, 0x3feef1a7373aa9cb, 0x3feedea64c123422, 0x3feece086061892d,
    0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429, 0x3feea47eb03a5585,
    0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74, 0x3feea11473eb0187, 0x3feea589994cce13,
    0x3feeace5422aa0db, 0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d,
    0x3feee89f995ad3ad, 0x3feeff76f2fb5e47, 0x3fef199bdd85529c, 0x3fef3720dcef9069,
    0x3fef5818dcfba487, 0x3fef7c97337b9b5f, 0x3fefa4afa2a490da, 0x3fefd0765b6e4540};
constexpr double INV_LN2_N = 0x1.71547652b82fep+5, SHIFT = 0x1.8p+52;
constexpr double C0 = 0x1.c6af84b912394p-20, C1 = 0x1.ebfce50fac4f3p-13, C2 = 0x1.62e42ff0c52d6p-6;
typedef int64_t I4 __attribute__((vector_size(32)));
typedef int32_t I4s __attribute__((vector_size(16)));

inline D4 fma4(D4 a, D4 b, D4 c) {
  D4 r;
  for (int i = 0; i < 4; ++i) r[i] = __builtin_fma(a[i], b[i], c[i]);
  return r;
}

inline F4 exp4(F4 x) {  // every lane |x| < 88
  const D4 xd = __builtin_convertvector(x, D4);
  D4 kd = fma4(D4{} + INV_LN2_N, xd, D4{} + SHIFT);
  I4 ki;
  std::memcpy(&ki, &kd, sizeof(ki));
  kd -= SHIFT;
  const D4 r = fma4(D4{} + INV_LN2_N, xd, -kd);
  I4 t = {int64_t(TAB[ki[0] & 31]), int64_t(TAB[ki[1] & 31]), int64_t(TAB[ki[2] & 31]), int64_t(TAB[ki[3] & 31])};
  t += ki << 47;
  D4 s;
  std::memcpy(&s, &t, sizeof(s));
  const D4 z = fma4(D4{} + C0, r, D4{} + C1);
  const D4 y = fma4(z, r * r, fma4(D4{} + C2, r, D4{} + 1.0)) * s;
  return __builtin_convertvector(y, F4);
}
}  // namespace expf_lanes

inline void exp_inplace(double* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = std::exp(x[j]);
}

inline void exp_inplace(float* x, int64_t n) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    F4 v;
    std::memcpy(&v, x + j, sizeof(v));
    expf_lanes::I4s bits;
    std::memcpy(&bits, &v, sizeof(bits));
    const expf_lanes::I4s top = (bits >> 20) & 0x7ff;  // glibc's fast path: top12(|x|) < top12(88.0f)
    if (top[0] < 0x42b && top[1] < 0x42b && top[2] < 0x42b && top[3] < 0x42b) {
      v = expf_lanes::exp4(v);
      std::memcpy(x + j, &v, sizeof(v));
    } else {
      for (int64_t i = j; i < j + 4; ++i) x[i] = std::exp(x[i]);
    }
  }
  for (; j < n; ++j) x[j] = std::exp(x[j]);
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
    for (int64_t j = 0; j < n.K; ++j) row[j] -= m;
    exp_inplace(row, n.K);
    T l = 0;
    for (int64_t j = 0; j < n.K; ++j) l += row[j];
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
  std::vector<T> sc(n.H * n.K), lse_h(n.H);
  for (int64_t b = 0; b < n.B; ++b) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t* sel = idx + (b * n.L + t) * n.K;
      const T* qt = q + b * qs[0] + t * qs[2];
      const T *kb = k + b * ks[0], *vb = v + b * vs[0];
      for (int64_t g = r.g0; g < r.g1; ++g)
        group_scores(n, g, qt, qs, kb, ks, vb, vs, sel, static_cast<T>(scale), sc.data());
      softmax_rows(n, r, sc.data(), lse_h.data());
      for (int64_t h = r.h0; h < r.h1; ++h) {
        const int64_t row = (b * n.H + h) * n.L + t;
        head_values(sc.data() + h * n.K, vb + (h / n.G) * vs[1], vs[2], sel, n.K, n.Dv, out + row * n.Dv);
        lse[row] = lse_h[h];
        if (probs)
          for (int64_t j = 0; j < n.K; ++j) probs[row * n.K + j] = sc[h * n.K + j];
      }
    }
  }
}

// Two backwards, the same bits on one worker (every sum in the order of a loop over queries ascending):
// - scatter (GQA, MQA): query by query, dq, and dS q / p dO added to the selected rows of a worker's dK/dV tables —
//   one random read-modify-write per slot and KV head, shared by the G query heads of its group;
// - two passes (MHA, G = 1: there that write is per head): (A) query by query, dq and delta = dO . out only; (B) key
//   by key, dK and dV of each key from the queries that selected it (the selection inverted: invert_selection), its
//   rows summed in place; both recompute p = exp(scale q . k - lse) and dO . v, and neither writes a random row.

// one query's gradients for KV head g's query heads: their rows of dq_t (dq at the query: rows L * D apart) written;
// with dkb/dvb (token-major (L, Hkv, D) tables of the worker) also dS q and p dO added to the selected rows (the
// scatter backward), without them pass A. Per head: the probabilities and dO . v of all K keys first (dot4, the exp
// four lanes at once: p and dp (K) are scratch), then dS in place of dp, dq's row summed in registers (head_values)
template <typename T>
void query_gradients(const Dims& n, int64_t g, const T* qt, const int64_t* qs, const T* dot_, const int64_t* ds_,
                     const T* kb, const int64_t* ks, const T* vb, const int64_t* vs, const int64_t* sel,
                     const T* lse_t, const T* delta, T scale, T* dq_t, T* dkb, T* dvb, T* p, T* dp) {
  const T *kg = kb + g * ks[1], *vg = vb + g * vs[1];
  for (int64_t h = g * n.G; h < (g + 1) * n.G; ++h) {
    const T *qh = qt + h * qs[1], *doh = dot_ + h * ds_[1];
    for (int64_t j0 = 0; j0 < n.K; j0 += 4) {
      const T *krows[4], *vrows[4];
      slot_rows(sel, j0, n.K, kg, ks[2], qh, krows);  // invalid slots are skipped below
      slot_rows(sel, j0, n.K, vg, vs[2], doh, vrows);
      for (int64_t j = j0 + PREFETCH; h == g * n.G && j < j0 + 4 + PREFETCH && j < n.K; ++j)
        if (sel[j] >= 0) {
          prefetch_row(kg + sel[j] * ks[2], n.D, 0);
          prefetch_row(vg + sel[j] * vs[2], n.Dv, 0);
          if (dkb) {
            prefetch_row(dkb + (sel[j] * n.Hkv + g) * n.D, n.D, 1);
            prefetch_row(dvb + (sel[j] * n.Hkv + g) * n.Dv, n.Dv, 1);
          }
        }
      T d[4], e[4];
      dot4(qh, krows, n.D, d);
      dot4(doh, vrows, n.Dv, e);
      for (int c = 0; c < 4 && j0 + c < n.K; ++c) {
        p[j0 + c] = scale * d[c] - lse_t[h];
        dp[j0 + c] = e[c];
      }
    }
    exp_inplace(p, n.K);
    for (int64_t j = 0; j < n.K; ++j) dp[j] = p[j] * (dp[j] - delta[h]) * scale;  // dS
    head_values(dp, kg, ks[2], sel, n.K, n.D, dq_t + h * n.L * n.D);  // dq_h = sum_j dS_j k[s_j], in registers
    for (int64_t j = 0; dkb && j < n.K; ++j)  // the scatter: the selected rows of the worker's dK/dV tables
      if (sel[j] >= 0) {
        axpy(dp[j], qh, dkb + (sel[j] * n.Hkv + g) * n.D, n.D);
        axpy(p[j], doh, dvb + (sel[j] * n.Hkv + g) * n.Dv, n.Dv);
      }
  }
}

// the queries [t0, t1): dq and delta written; with dk_acc/dv_acc ((B, L, Hkv, D) token-major, the worker's own) the
// scatter backward's dK/dV added there too, else pass A
template <typename T>
void backward_queries(const T* q, const T* k, const T* v, const int64_t* idx, const T* out, const T* lse,
                      const T* dout, T* dq, T* delta_out, T* dk_acc, T* dv_acc, const int64_t* dims,
                      const int64_t* qs, const int64_t* ks, const int64_t* vs, const int64_t* dos, int64_t t0,
                      int64_t t1, int64_t g0, int64_t g1, double scale) {
  const Dims n(dims);
  const Heads r(n, g0, g1);
  std::vector<T> delta(n.H), lse_t(n.H), p(n.K), dp(n.K);
  for (int64_t b = 0; b < n.B; ++b) {
    for (int64_t t = t0; t < t1; ++t) {
      const T* qt = q + b * qs[0] + t * qs[2];
      const T* dot_ = dout + b * dos[0] + t * dos[2];
      for (int64_t h = r.h0; h < r.h1; ++h) {
        const int64_t row = (b * n.H + h) * n.L + t;
        delta_out[row] = delta[h] = dot(dot_ + h * dos[1], out + row * n.Dv, n.Dv);
        lse_t[h] = lse[row];
      }
      for (int64_t g = r.g0; g < r.g1; ++g)
        query_gradients(n, g, qt, qs, dot_, dos, k + b * ks[0], ks, v + b * vs[0], vs, idx + (b * n.L + t) * n.K,
                        lse_t.data(), delta.data(), static_cast<T>(scale), dq + (b * n.H * n.L + t) * n.D,
                        dk_acc ? dk_acc + b * n.L * n.Hkv * n.D : nullptr,
                        dv_acc ? dv_acc + b * n.L * n.Hkv * n.Dv : nullptr, p.data(), dp.data());
    }
  }
}

// the selection inverted, per batch row b: the queries that select key s, ascending, are
// queries[b * L * K + off[b * (L + 1) + s] .. + off[b * (L + 1) + s + 1]) (a query twice where it holds s twice)
void invert_selection(const int64_t* idx, const int64_t* dims, int64_t* off, int32_t* queries) {
  const Dims n(dims);
  for (int64_t b = 0; b < n.B; ++b) {
    int64_t* o = off + b * (n.L + 1);
    int32_t* list = queries + b * n.L * n.K;
    const int64_t* sel = idx + b * n.L * n.K;
    for (int64_t s = 0; s <= n.L; ++s) o[s] = 0;
    for (int64_t j = 0; j < n.L * n.K; ++j)
      if (sel[j] >= 0) ++o[sel[j] + 1];
    for (int64_t s = 0; s < n.L; ++s) o[s + 1] += o[s];
    std::vector<int64_t> at(o, o + n.L);
    for (int64_t t = 0; t < n.L; ++t)
      for (int64_t j = 0; j < n.K; ++j)
        if (sel[t * n.K + j] >= 0) list[at[sel[t * n.K + j]]++] = static_cast<int32_t>(t);
  }
}

constexpr int64_t KEY_BLOCK = 16;  // listed queries per block of pass B: their q and dO rows stay in L1 for the updates

// pass B for key s and KV head g: dk_s (D), dv_s (Dv) summed in place from the m queries `list` that select s. Per
// block of listed queries: each query head's probabilities and dO . v (dot4 of the key's own rows against four
// queries' rows; p, dp (G, KEY_BLOCK) scratch), then per query and head the two updates
template <typename T>
void key_gradients(const Dims& n, int64_t g, const T* k_s, const T* v_s, const T* qb, const int64_t* qs,
                   const T* dob, const int64_t* dos, const T* lse_b, const T* delta_b, const int32_t* list, int64_t m,
                   T scale, T* dk_s, T* dv_s, T* p, T* dp) {
  for (int64_t e = 0; e < n.D; ++e) dk_s[e] = 0;
  for (int64_t e = 0; e < n.Dv; ++e) dv_s[e] = 0;
  for (int64_t n0 = 0; n0 < m; n0 += KEY_BLOCK) {
    const int64_t nb = m - n0 < KEY_BLOCK ? m - n0 : KEY_BLOCK;
    for (int64_t hg = 0; hg < n.G; ++hg) {
      const int64_t h = g * n.G + hg;
      const T *qh = qb + h * qs[1], *doh = dob + h * dos[1];
      for (int64_t c0 = 0; c0 < nb; c0 += 4) {
        const T *qrows[4], *drows[4];
        slot_rows(list + n0, c0, nb, qh, qs[2], k_s, qrows);  // the key's own rows stand in past the block's end
        slot_rows(list + n0, c0, nb, doh, dos[2], v_s, drows);
        for (int64_t a = n0 + c0 + PREFETCH; a < n0 + c0 + 4 + PREFETCH && a < m; ++a) {
          prefetch_row(qh + list[a] * qs[2], n.D, 0);
          prefetch_row(doh + list[a] * dos[2], n.Dv, 0);
        }
        T d[4], e[4];
        dot4(k_s, qrows, n.D, d);
        dot4(v_s, drows, n.Dv, e);
        for (int c = 0; c < 4 && c0 + c < nb; ++c) {
          p[hg * KEY_BLOCK + c0 + c] = scale * d[c] - lse_b[h * n.L + list[n0 + c0 + c]];
          dp[hg * KEY_BLOCK + c0 + c] = e[c];
        }
      }
      exp_inplace(p + hg * KEY_BLOCK, nb);
    }
    for (int64_t c = 0; c < nb; ++c) {
      const int64_t i = list[n0 + c];
      for (int64_t hg = 0; hg < n.G; ++hg) {
        const int64_t h = g * n.G + hg;
        const T pc = p[hg * KEY_BLOCK + c];
        axpy(pc * (dp[hg * KEY_BLOCK + c] - delta_b[h * n.L + i]) * scale, qb + h * qs[1] + i * qs[2], dk_s, n.D);
        axpy(pc, dob + h * dos[1] + i * dos[2], dv_s, n.Dv);
      }
    }
  }
}

// pass B over the keys [s0, s1) and KV heads [g0, g1): dk (B, Hkv, L, D), dv (B, Hkv, L, Dv) contiguous, written
template <typename T>
void backward_keys(const T* q, const T* k, const T* v, const T* lse, const T* delta, const T* dout,
                   const int64_t* off, const int32_t* queries, T* dk, T* dv, const int64_t* dims, const int64_t* qs,
                   const int64_t* ks, const int64_t* vs, const int64_t* dos, int64_t s0, int64_t s1, int64_t g0,
                   int64_t g1, double scale) {
  const Dims n(dims);
  std::vector<T> p(n.G * KEY_BLOCK), dp(n.G * KEY_BLOCK);
  for (int64_t b = 0; b < n.B; ++b) {
    const int64_t* o = off + b * (n.L + 1);
    const int32_t* list = queries + b * n.L * n.K;
    for (int64_t s = s0; s < s1; ++s)
      for (int64_t g = g0; g < g1; ++g)
        key_gradients(n, g, k + b * ks[0] + g * ks[1] + s * ks[2], v + b * vs[0] + g * vs[1] + s * vs[2],
                      q + b * qs[0], qs, dout + b * dos[0], dos, lse + b * n.H * n.L, delta + b * n.H * n.L,
                      list + o[s], o[s + 1] - o[s], static_cast<T>(scale), dk + ((b * n.Hkv + g) * n.L + s) * n.D,
                      dv + ((b * n.Hkv + g) * n.L + s) * n.Dv, p.data(), dp.data());
  }
}

}  // namespace

extern "C" {
// exp over n floats in place, as the softmax takes it (tests compare it with the C library's expf)
void dsa_exp_f32(float* x, int64_t n) { exp_inplace(x, n); }
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
void dsa_invert_selection(const int64_t* idx, const int64_t* dims, int64_t* off, int32_t* queries) {
  invert_selection(idx, dims, off, queries);
}
#define DSA_BACKWARD(T, kind)                                                                                        \
  void dsa_sparse_bwd_queries_##kind(const T* q, const T* k, const T* v, const int64_t* idx, const T* out,          \
                                     const T* lse, const T* dout, T* dq, T* delta, T* dk_acc, T* dv_acc,           \
                                     const int64_t* dims, const int64_t* qs, const int64_t* ks, const int64_t* vs, \
                                     const int64_t* dos, int64_t t0, int64_t t1, int64_t g0, int64_t g1,           \
                                     double scale) {                                                               \
    backward_queries(q, k, v, idx, out, lse, dout, dq, delta, dk_acc, dv_acc, dims, qs, ks, vs, dos, t0, t1, g0,  \
                     g1, scale);                                                                                   \
  }                                                                                                                  \
  void dsa_sparse_bwd_keys_##kind(const T* q, const T* k, const T* v, const T* lse, const T* delta, const T* dout, \
                                  const int64_t* off, const int32_t* queries, T* dk, T* dv, const int64_t* dims,    \
                                  const int64_t* qs, const int64_t* ks, const int64_t* vs, const int64_t* dos,     \
                                  int64_t s0, int64_t s1, int64_t g0, int64_t g1, double scale) {                  \
    backward_keys(q, k, v, lse, delta, dout, off, queries, dk, dv, dims, qs, ks, vs, dos, s0, s1, g0, g1, scale);  \
  }
DSA_BACKWARD(float, f32)
DSA_BACKWARD(double, f64)
#undef DSA_BACKWARD
}
