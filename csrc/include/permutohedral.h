// Permutohedral-lattice math (Adams, Baek & Davis 2010; the variant in Krähenbühl & Koltun's dense
// CRF code): elevating a d-dimensional feature onto the hyperplane of the (d+1)-dimensional lattice,
// finding its enclosing simplex and its barycentric weights. __host__ __device__ so the CPU tests
// cover the code a GPU build runs. All arithmetic is float32, as in the reference implementation,
// so the simplices chosen agree with it point for point.
#pragma once
#include <cmath>
#include <cstdint>

#include "hd.h"

namespace deconvseg {
namespace lattice {

// Largest feature dimension the fixed-size scratch arrays below support.
constexpr int kMaxDim = 32;

// Scale of feature axis i (0-based): the lattice's unit spacing then corresponds to a Gaussian of
// standard deviation 1 in feature space.
DSF_HD float axis_scale(int i, int d) {
  // Rounded to float in two steps, as the reference implementation does, so scales agree bit for bit.
  const float inv_std = static_cast<float>(sqrt(2.0 / 3.0) * (d + 1));
  return static_cast<float>(1.0 / sqrt(static_cast<double>((i + 2) * (i + 1))) * inv_std);
}

// a * b, never fused with a following add into an FMA. nvcc contracts a * b + c into one FMA by
// default (one rounding instead of two) and host compilers here do not, which would let the GPU pick
// a different simplex than the CPU for points near a boundary; __fmul_rn is never contracted.
DSF_HD float mul_no_fma(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// roundf (halves away from zero) for |x| < 2^31, inline: on the CPU roundf is a libm call.
// x - trunc(x) is exact in float, so the halfway test is exact too.
DSF_HD int32_t round_half_away(float x) {
  const int32_t t = static_cast<int32_t>(x);
  const float r = x - static_cast<float>(t);
  return r >= 0.5f ? t + 1 : (r <= -0.5f ? t - 1 : t);
}

// The simplex enclosing feature f[0..d): for each of its d+1 vertices (remainder r = 0..d), the
// first d lattice coordinates key[r*d .. r*d+d) and the barycentric weight bary[r].
// kD > 0 fixes d at compile time (every loop unrolls; several times faster for the common d = 2
// and d = 5); kD = 0 takes d_runtime. Both compute the same bits.
template <int kD>
DSF_HD void enclosing_simplex_fixed(const float* f, int d_runtime, const float* scale, int32_t* key, float* bary) {
  const int d = kD > 0 ? kD : d_runtime;
  float elevated[kMaxDim + 1];
  int32_t rem0[kMaxDim + 1];
  int32_t rank[kMaxDim + 1];
  float b[kMaxDim + 2];
  // Elevate: y = E f, with the coordinates summing to zero.
  float sm = 0.f;
  for (int j = d; j > 0; --j) {
    const float cf = mul_no_fma(f[j - 1], scale[j - 1]);
    elevated[j] = sm - mul_no_fma(static_cast<float>(j), cf);
    sm += cf;
  }
  elevated[0] = sm;
  // Nearest remainder-0 lattice point, by rounding each coordinate to a multiple of d+1.
  const float down = 1.0f / static_cast<float>(d + 1);
  const float up = static_cast<float>(d + 1);
  int32_t sum = 0;
  for (int i = 0; i <= d; ++i) {
    const int32_t rd = round_half_away(down * elevated[i]);
    rem0[i] = static_cast<int32_t>(static_cast<float>(rd) * up);
    sum += rd;
    rank[i] = 0;
  }
  // Rank of each coordinate's residual: which simplex of the cell the point lies in.
  // Branch-free: the comparisons are data-dependent coin flips a branch predictor would miss.
  float residual[kMaxDim + 1];
  for (int i = 0; i <= d; ++i) residual[i] = elevated[i] - static_cast<float>(rem0[i]);
  for (int i = 0; i < d; ++i) {
    for (int j = i + 1; j <= d; ++j) {
      const int32_t lt = residual[i] < residual[j];
      rank[i] += lt;
      rank[j] += 1 - lt;
    }
  }
  // The rounded point may be off the hyperplane (coordinates not summing to 0): walk it back.
  for (int i = 0; i <= d; ++i) {
    rank[i] += sum;
    if (rank[i] < 0) {
      rank[i] += d + 1;
      rem0[i] += d + 1;
    } else if (rank[i] > d) {
      rank[i] -= d + 1;
      rem0[i] -= d + 1;
    }
  }
  for (int i = 0; i <= d + 1; ++i) b[i] = 0.f;
  for (int i = 0; i <= d; ++i) {
    const float v = mul_no_fma(elevated[i] - rem0[i], down);
    b[d - rank[i]] += v;
    b[d - rank[i] + 1] -= v;
  }
  b[0] += 1.0f + b[d + 1];
  // Vertex r of the simplex is rem0 + the canonical offset of remainder r, read through rank.
  for (int r = 0; r <= d; ++r) {
    for (int i = 0; i < d; ++i) key[r * d + i] = rem0[i] + (rank[i] <= d - r ? r : r - (d + 1));
    bary[r] = b[r];
  }
}

// Hash of a vertex's d lattice coordinates, for open-addressing tables indexed by `hash & mask`.
// Coordinates are small integers that vary together, so the hash must mix well: a plain
// multiplicative hash with a power-of-two mask gave long linear-probing runs on megapixel images.
// The key is first reduced to sum_i key[i] C^(i+1) mod 2^64 (distinct powers of an odd C, so
// small key differences do not cancel), then mixed by a xor-shift-multiply round. The powers do
// not depend on the key: the products are independent and only their sum is a chain. The Horner
// form (h + key[i]) * C chained d multiplies, and a second mixing round, ahead of every table
// probe; dropping them took the CPU build of the VOC photo's bilateral lattice from 17.4-18.2 to
// 16.2-17.3 ms at one thread (BENCHMARKS.md, "... a fifth time"). Vertex numbers follow first
// occurrence on both devices, so the hash changes no output, only how fast the tables are.
DSF_HD uint64_t hash_key(const int32_t* key, int d) {
  constexpr uint64_t kC = 0x9E3779B97F4A7C15ULL;
  uint64_t h = 0, power = kC;
  for (int i = 0; i < d; ++i) {
    h += static_cast<uint32_t>(key[i]) * power;
    power *= kC;
  }
  h ^= h >> 32;
  h *= 0xBF58476D1CE4E5B9ULL;
  return h ^ (h >> 29);
}

// The two blur neighbours of the vertex `key` (d coordinates) along lattice axis j (0..d), written
// to n1[0..d) and n2[0..d): all coordinates -1 (resp. +1) except axis j, which moves by +d (resp.
// -d); the implicit last coordinate makes axis d "all coordinates -1 / +1".
DSF_HD void blur_neighbor_keys(const int32_t* key, int d, int j, int32_t* n1, int32_t* n2) {
  for (int k = 0; k < d; ++k) {
    n1[k] = key[k] - 1;
    n2[k] = key[k] + 1;
  }
  if (j < d) {
    n1[j] = key[j] + d;
    n2[j] = key[j] - d;
  }
}

DSF_HD void enclosing_simplex(const float* f, int d, const float* scale, int32_t* key, float* bary) {
  enclosing_simplex_fixed<0>(f, d, scale, key, bary);
}

// The lattice filter's normalising constant for dimension d (from the reference implementation).
DSF_HD float slice_alpha(int d) { return 1.0f / (1.0f + powf(2.0f, -static_cast<float>(d))); }

}  // namespace lattice
}  // namespace deconvseg
