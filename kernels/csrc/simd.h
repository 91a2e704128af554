// SIMD vectors of pixels for the CPU kernels (gn_cpu.cpp, ba_cpu.cpp): GCC vector extensions, so the
// baseline x86-64 SSE2 build vectorises without -march flags. Vec<S, N> overloads the arithmetic and
// the three helpers gn.h's branch-free masking calls (gn_gt, gn_and, gn_select), so gn.h's and ba.h's
// per-pixel functions run on kLanes pixels at a time; invalid pixels are masked, not branched over.
#pragma once

#include <cstring>
#include <utility>

namespace gn_simd {

// N lanes of S. Arithmetic is element-wise; a scalar operand is broadcast (implicit constructor).
template <typename S, int N>
struct Vec {
  typedef S V __attribute__((vector_size(N * sizeof(S))));
  V v;
  Vec() = default;
  Vec(S s) : v(V{} + s) {}  // NOLINT(google-explicit-constructor): broadcast
  static Vec raw(V x) {
    Vec r;
    r.v = x;
    return r;
  }
  static Vec load(const S* p) {
    Vec r;
    std::memcpy(&r.v, p, sizeof(V));
    return r;
  }
  void store(S* p) const { std::memcpy(p, &v, sizeof(V)); }
  S operator[](int i) const { return v[i]; }
  friend Vec operator+(Vec a, Vec b) { return raw(a.v + b.v); }
  friend Vec operator-(Vec a, Vec b) { return raw(a.v - b.v); }
  friend Vec operator*(Vec a, Vec b) { return raw(a.v * b.v); }
  friend Vec operator/(Vec a, Vec b) { return raw(a.v / b.v); }
  friend Vec operator-(Vec a) { return raw(-a.v); }
  Vec& operator+=(Vec b) {
    v += b.v;
    return *this;
  }
};

template <typename S, int N>
struct Mask {
  typedef decltype(typename Vec<S, N>::V{} > typename Vec<S, N>::V{}) M;
  M m;
};

// The helpers gn.h calls for its branch-free masking (found by argument-dependent lookup).
template <typename S, int N>
inline Mask<S, N> gn_gt(Vec<S, N> a, Vec<S, N> b) {
  return {a.v > b.v};
}
template <typename S, int N>
inline Mask<S, N> gn_and(Mask<S, N> a, Mask<S, N> b) {
  return {a.m & b.m};
}
template <typename S, int N>
inline Vec<S, N> gn_select(Mask<S, N> c, Vec<S, N> a, Vec<S, N> b) {
  return Vec<S, N>::raw(c.m ? a.v : b.v);
}

// De-interleave 2N values (pairs) at p into the first and second elements of each pair, and back.
template <typename S, int N, int... I>
inline void load_pairs_impl(const S* p, Vec<S, N>& first, Vec<S, N>& second, std::integer_sequence<int, I...>) {
  using Idx = typename Mask<S, N>::M;
  const Vec<S, N> lo = Vec<S, N>::load(p), hi = Vec<S, N>::load(p + N);
  first.v = __builtin_shuffle(lo.v, hi.v, Idx{(2 * I)...});
  second.v = __builtin_shuffle(lo.v, hi.v, Idx{(2 * I + 1)...});
}
template <typename S, int N>
inline void load_pairs(const S* p, Vec<S, N>& first, Vec<S, N>& second) {
  load_pairs_impl(p, first, second, std::make_integer_sequence<int, N>{});
}
template <typename S, int N, int... I>
inline void store_pairs_impl(S* p, Vec<S, N> first, Vec<S, N> second, std::integer_sequence<int, I...>) {
  using Idx = typename Mask<S, N>::M;
  Vec<S, N>::raw(__builtin_shuffle(first.v, second.v, Idx{((I % 2) * N + I / 2)...})).store(p);
  Vec<S, N>::raw(__builtin_shuffle(first.v, second.v, Idx{((I % 2) * N + N / 2 + I / 2)...})).store(p + N);
}
template <typename S, int N>
inline void store_pairs(S* p, Vec<S, N> first, Vec<S, N> second) {
  store_pairs_impl(p, first, second, std::make_integer_sequence<int, N>{});
}

// 16 bytes: one SSE2 register (4 float or 2 double lanes).
template <typename S>
constexpr int kLanes = 16 / sizeof(S);

// Adds the lanes of acc[0..n) in double into out[0..n), then zeroes acc.
template <typename S, int N>
inline void flush(Vec<S, N>* acc, int n, double* out) {
  for (int s = 0; s < n; ++s) {
    double t = 0;
    for (int l = 0; l < N; ++l) t += static_cast<double>(acc[s][l]);
    out[s] += t;
    acc[s] = Vec<S, N>(S(0));
  }
}

}  // namespace gn_simd
