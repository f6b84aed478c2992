// Permutohedral lattice on the CPU: build once per image, then filter any number of value channels.
//
// The lattice is returned as plain tensors so it can be built once and passed to every filter call
// (every mean-field iteration, and both directions of autograd):
//   offsets   [N, d+1] int32   vertex (0-based) of each corner of pixel i's enclosing simplex
//   weights   [N, d+1] float32 barycentric weight of each corner
//   neighbors [d+1, M, 2] int32 the two blur neighbours of each vertex along each lattice axis,
//                              1-based with 0 meaning "not in the lattice" (row 0 of the value
//                              buffer is kept at zero, so a missing neighbour adds nothing)
// Splatting streams the pixels in order and scatters into the (cache-sized) vertex buffer, as the
// reference implementation does. To use several threads without atomics and without results that
// depend on the thread count, the pixels are cut into a fixed number of contiguous parts, each part
// splats into its own buffer, and the parts are added in part order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "huge_pages.h"
#include "lattice_checks.h"
#include "permutohedral.h"
#include "simd.h"

namespace deconvseg {
namespace {

using at::Tensor;

// body(begin, end) over [0, n) in blocks of `block` indices, each block taken by whichever thread
// is free next. at::parallel_for hands every thread one fixed share, so one thread that the OS or
// the hypervisor pauses (common on shared cloud cores) holds up the whole step; here the others
// take over its remaining blocks. Which thread runs a block never changes what the block computes.
template <typename F>
void parallel_blocks(int64_t n, int64_t block, const F& body) {
  const int64_t blocks = (n + block - 1) / block;
  const int64_t threads = std::min<int64_t>(blocks, at::get_num_threads());
  if (threads <= 1 || at::in_parallel_region()) {
    if (n > 0) body(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t b = next.fetch_add(1); b < blocks; b = next.fetch_add(1))
      body(b * block, std::min(n, (b + 1) * block));
  });
}

// body(i, i + 1) for every i in [0, n): thread t of T first takes, in order, the indices it owns,
// [t n / T, (t + 1) n / T), then helps with the others' (so a thread the OS pauses is not waited
// for either). The same thread runs the same index call after call, so the buffer an index writes
// stays in that thread's caches: on hosts whose two cores share no L3 cache (chiplets), a buffer
// that changes hands costs a transfer between the caches on every use.
template <typename F>
void parallel_owned(int64_t n, const F& body) {
  const int64_t threads = std::min<int64_t>(n, at::get_num_threads());
  if (threads <= 1 || at::in_parallel_region()) {
    if (n > 0) body(0, n);
    return;
  }
  std::vector<std::atomic<int64_t>> next(threads);
  for (int64_t t = 0; t < threads; ++t) next[t] = t * n / threads;
  at::parallel_for(0, threads, 1, [&](int64_t slot0, int64_t slot1) {
    for (int64_t slot = slot0; slot < slot1; ++slot)
      for (int64_t k = 0; k < threads; ++k) {
        const int64_t t = (slot + k) % threads, end = (t + 1) * n / threads;
        for (int64_t i = next[t].fetch_add(1); i < end; i = next[t].fetch_add(1)) body(i, i + 1);
      }
  });
}

// Open-addressing table from a vertex's d coordinates to its index; indices follow first insertion
// (so they never depend on the capacity). The table doubles when it is half full, so probes stay
// short and always end, and a table that sees few distinct keys stays small enough for the cache
// (an image has far fewer vertices than simplex corners). D > 0 fixes d at compile time, so the
// hash and the key comparison unroll; D = 0 takes it at run time.
template <int D>
class VertexTable {
 public:
  explicit VertexTable(int d, int64_t expected_keys = 0) : d_(D > 0 ? D : d) {
    int64_t cap = 1024;
    while (cap < 2 * expected_keys) cap <<= 1;
    rehash(cap);
    keys_.reserve(expected_keys * d_);
  }

  int32_t insert(const int32_t* key) {
    if (2 * (size() + 1) > static_cast<int64_t>(slots_.size())) rehash(2 * static_cast<int64_t>(slots_.size()));
    uint64_t h = hash(key);
    while (true) {
      int32_t& slot = slots_[h & mask_];
      if (slot < 0) {
        slot = static_cast<int32_t>(size_++);
        for (int i = 0; i < dim(); ++i) keys_.push_back(key[i]);  // a range insert is a memmove call
        return slot;
      }
      if (same(&keys_[static_cast<int64_t>(slot) * dim()], key)) return slot;
      ++h;
    }
  }

  int32_t find(const int32_t* key) const {
    uint64_t h = hash(key);
    while (true) {
      const int32_t slot = slots_[h & mask_];
      if (slot < 0) return -1;
      if (same(&keys_[static_cast<int64_t>(slot) * dim()], key)) return slot;
      ++h;
    }
  }

  // Counted, not keys_.size() / d_: a division by a run-time d on every insert cost more than the
  // probe.
  int64_t size() const { return size_; }
  std::vector<int32_t> take_keys() { return std::move(keys_); }  // [size, d], insertion order; the table is done
  const int32_t* key(int64_t v) const { return &keys_[v * dim()]; }

 private:
  void rehash(int64_t cap) {
    slots_.assign(cap, -1);
    mask_ = cap - 1;
    for (int64_t v = 0; v < size(); ++v) {
      uint64_t h = hash(key(v));
      while (slots_[h & mask_] >= 0) ++h;
      slots_[h & mask_] = static_cast<int32_t>(v);
    }
  }

  // Keys are a few ints: compared without early exits (one branch, not one per coordinate).
  bool same(const int32_t* a, const int32_t* b) const {
    int32_t diff = 0;
    for (int i = 0; i < dim(); ++i) diff |= a[i] ^ b[i];
    return diff == 0;
  }

  // Shared with the CUDA lattice builder (csrc/cuda/crf.cu).
  uint64_t hash(const int32_t* key) const { return lattice::hash_key(key, dim()); }

  int dim() const { return D > 0 ? D : d_; }

  int d_;
  int64_t mask_;
  int64_t size_ = 0;
  std::vector<int32_t> slots_;
  std::vector<int32_t> keys_;
};

#ifdef DSF_HAVE_AVX512_KERNELS
namespace avx512 {

// dst[c * dst_stride + r] = src[r * src_stride + c] for r < rows, c < cols (each at most 16): one
// 16 x 16 block transposed in registers; masked loads and stores do the edges.
DSF_AVX512 inline void transpose16(const float* __restrict src, int64_t src_stride, int rows, int cols,
                                   float* __restrict dst, int64_t dst_stride) {
  const __mmask16 col_mask = static_cast<__mmask16>(cols >= 16 ? 0xFFFFu : (1u << cols) - 1u);
  const __mmask16 row_mask = static_cast<__mmask16>(rows >= 16 ? 0xFFFFu : (1u << rows) - 1u);
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i)
    r[i] = i < rows ? _mm512_maskz_loadu_ps(col_mask, src + i * src_stride) : _mm512_setzero_ps();
  for (int k = 0; k < 8; ++k) {  // per 128-bit lane: elements 4l, 4l+1 (lo) and 4l+2, 4l+3 (hi) of two rows
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {  // r[4k + m], 128-bit lane l: rows 4k .. 4k+3 of column 4l + m
    const __m512d a = _mm512_castps_pd(t[4 * k]), b = _mm512_castps_pd(t[4 * k + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * k + 2]), e = _mm512_castps_pd(t[4 * k + 3]);
    r[4 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, e));
    r[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, e));
  }
  for (int h = 0; h < 2; ++h)  // rows 8h .. 8h+7: columns m, 8+m (t[8h + m]) and 4+m, 12+m (t[8h + 4 + m])
    for (int m = 0; m < 4; ++m) {
      t[8 * h + m] = _mm512_shuffle_f32x4(r[8 * h + m], r[8 * h + 4 + m], 0x88);
      t[8 * h + 4 + m] = _mm512_shuffle_f32x4(r[8 * h + m], r[8 * h + 4 + m], 0xDD);
    }
  for (int m = 0; m < 4; ++m) {  // whole columns: m, 8+m, 4+m, 12+m
    const __m512 col[4] = {_mm512_shuffle_f32x4(t[m], t[8 + m], 0x88), _mm512_shuffle_f32x4(t[m], t[8 + m], 0xDD),
                           _mm512_shuffle_f32x4(t[4 + m], t[12 + m], 0x88),
                           _mm512_shuffle_f32x4(t[4 + m], t[12 + m], 0xDD)};
    const int index[4] = {m, 8 + m, 4 + m, 12 + m};
    for (int j = 0; j < 4; ++j)
      if (index[j] < cols) _mm512_mask_storeu_ps(dst + index[j] * dst_stride, row_mask, col[j]);
  }
}

// a * b rounded on its own. GCC implements _mm512_mul_ps as plain vector arithmetic and may fuse it
// with a following add into an FMA (one rounding instead of two); the explicit-rounding form is
// never fused, so the products round exactly as the scalar code's do.
DSF_AVX512 inline __m512 mul_exact(__m512 a, __m512 b) {
  return _mm512_mul_round_ps(a, b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// lattice::enclosing_simplex_fixed<D> for 16 points at once, one point per lane, with the same
// float operations in the same order (so the same bits: tests compare it with the scalar code).
//   f [16, D] features; scale [D]; key [16, D+1, D] out; bary [16, D+1] out; prev [D+1, D] the
//   corners of the point before the first; same [D+1] out: bit p of same[r] is set when point p's
//   corner r equals the previous point's corner r.
template <int D>
DSF_AVX512 void enclosing_simplex16(const float* __restrict f, const float* __restrict scale, int32_t* __restrict key,
                                    float* __restrict bary, const int32_t* __restrict prev, uint16_t* __restrict same) {
  constexpr int D1 = D + 1;
  const __m512i one = _mm512_set1_epi32(1), zero_i = _mm512_setzero_si512();
  __m512 elevated[D1];
  __m512 sm = _mm512_setzero_ps();
  // In and out through 16 x 16 register transposes: Zen 4 runs gathers and, above all, scatters
  // an element at a time.
  alignas(64) float ft[D * 16];  // [D, 16]: the features, one row per coordinate
  transpose16(f, D, 16, D, ft, 16);
  for (int j = D; j > 0; --j) {
    const __m512 cf = mul_exact(_mm512_load_ps(ft + (j - 1) * 16), _mm512_set1_ps(scale[j - 1]));
    elevated[j] = _mm512_sub_ps(sm, mul_exact(_mm512_set1_ps(static_cast<float>(j)), cf));
    sm = _mm512_add_ps(sm, cf);
  }
  elevated[0] = sm;
  const __m512 down = _mm512_set1_ps(1.0f / static_cast<float>(D1));
  const __m512 up = _mm512_set1_ps(static_cast<float>(D1));
  __m512i rem0[D1], rank[D1];
  __m512i sum = zero_i;
  for (int i = 0; i < D1; ++i) {
    const __m512 x = mul_exact(down, elevated[i]);
    const __m512i t = _mm512_cvttps_epi32(x);
    const __m512 r = _mm512_sub_ps(x, _mm512_cvtepi32_ps(t));
    __m512i rd = _mm512_mask_add_epi32(t, _mm512_cmp_ps_mask(r, _mm512_set1_ps(0.5f), _CMP_GE_OQ), t, one);
    rd = _mm512_mask_sub_epi32(rd, _mm512_cmp_ps_mask(r, _mm512_set1_ps(-0.5f), _CMP_LE_OQ), rd, one);
    rem0[i] = _mm512_cvttps_epi32(mul_exact(_mm512_cvtepi32_ps(rd), up));
    sum = _mm512_add_epi32(sum, rd);
    rank[i] = zero_i;
  }
  __m512 residual[D1];
  for (int i = 0; i < D1; ++i) residual[i] = _mm512_sub_ps(elevated[i], _mm512_cvtepi32_ps(rem0[i]));
  for (int i = 0; i < D; ++i)
    for (int j = i + 1; j < D1; ++j) {
      const __mmask16 lt = _mm512_cmp_ps_mask(residual[i], residual[j], _CMP_LT_OQ);
      rank[i] = _mm512_mask_add_epi32(rank[i], lt, rank[i], one);
      rank[j] = _mm512_mask_add_epi32(rank[j], static_cast<__mmask16>(~lt), rank[j], one);
    }
  const __m512i d1 = _mm512_set1_epi32(D1), dd = _mm512_set1_epi32(D);
  for (int i = 0; i < D1; ++i) {
    rank[i] = _mm512_add_epi32(rank[i], sum);
    const __mmask16 low = _mm512_cmplt_epi32_mask(rank[i], zero_i);
    const __mmask16 high = _mm512_cmpgt_epi32_mask(rank[i], dd);
    rank[i] = _mm512_mask_add_epi32(rank[i], low, rank[i], d1);
    rem0[i] = _mm512_mask_add_epi32(rem0[i], low, rem0[i], d1);
    rank[i] = _mm512_mask_sub_epi32(rank[i], high, rank[i], d1);
    rem0[i] = _mm512_mask_sub_epi32(rem0[i], high, rem0[i], d1);
  }
  // b[d - rank[i]] += v; b[d - rank[i] + 1] -= v, in the scalar code's order of i.
  __m512 b[D1 + 1];
  for (int k = 0; k <= D1; ++k) b[k] = _mm512_setzero_ps();
  for (int i = 0; i < D1; ++i) {
    const __m512 v = mul_exact(_mm512_sub_ps(elevated[i], _mm512_cvtepi32_ps(rem0[i])), down);
    for (int k = 0; k <= D1; ++k) {
      const __mmask16 plus = _mm512_cmpeq_epi32_mask(rank[i], _mm512_set1_epi32(D - k));
      const __mmask16 minus = _mm512_cmpeq_epi32_mask(rank[i], _mm512_set1_epi32(D - k + 1));
      b[k] = _mm512_mask_add_ps(b[k], plus, b[k], v);
      b[k] = _mm512_mask_sub_ps(b[k], minus, b[k], v);
    }
  }
  b[0] = _mm512_add_ps(b[0], _mm512_add_ps(_mm512_set1_ps(1.0f), b[D1]));
  alignas(64) int32_t kt[D1 * D * 16];  // [D1 * D, 16]: coordinate i of corner r in row r * D + i
  alignas(64) float bt[D1 * 16];        // [D1, 16]
  for (int r = 0; r < D1; ++r) {
    for (int i = 0; i < D; ++i) {
      const __mmask16 le = _mm512_cmple_epi32_mask(rank[i], _mm512_set1_epi32(D - r));
      const __m512i k = _mm512_mask_blend_epi32(le, _mm512_add_epi32(rem0[i], _mm512_set1_epi32(r - D1)),
                                                _mm512_add_epi32(rem0[i], _mm512_set1_epi32(r)));
      _mm512_store_si512(kt + (r * D + i) * 16, k);
    }
    _mm512_store_ps(bt + r * 16, b[r]);
  }
  // Which corners repeat the previous point's (lane p against lane p - 1, lane 0 against prev).
  for (int r = 0; r < D1; ++r) {
    __mmask16 eq = 0xFFFF;
    for (int i = 0; i < D; ++i) {
      const __m512i cur = _mm512_load_si512(kt + (r * D + i) * 16);
      const __m512i before = _mm512_alignr_epi32(cur, _mm512_set1_epi32(prev[r * D + i]), 15);
      eq &= _mm512_cmpeq_epi32_mask(cur, before);
    }
    same[r] = eq;
  }
  // The keys move as float bit patterns: loads, shuffles and stores never change bits.
  for (int j0 = 0; j0 < D1 * D; j0 += 16)
    transpose16(reinterpret_cast<const float*>(kt + j0 * 16), 16, std::min(16, D1 * D - j0), 16,
                reinterpret_cast<float*>(key + j0), D1 * D);
  transpose16(bt, 16, D1, 16, bary, D1);
}

using Simplex16Fn = void (*)(const float*, const float*, int32_t*, float*, const int32_t*, uint16_t*);

// The 16-point simplex for d = 2, 3 or 5, or null.
inline Simplex16Fn enclosing_simplex16_for(int d) {
  if (!cpu_has_avx512()) return nullptr;
  return d == 2 ? &enclosing_simplex16<2> : d == 3 ? &enclosing_simplex16<3> : d == 5 ? &enclosing_simplex16<5> : nullptr;
}

}  // namespace avx512
#endif

#ifdef DSF_HAVE_AVX512_KERNELS
namespace avx2 {

// Lanes [0, count) set (count clamped to 0..8), as an AVX2 mask.
DSF_AVX2 inline __m256i lane_mask(int64_t count) {
  const int c = static_cast<int>(std::min<int64_t>(std::max<int64_t>(count, 0), 8));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// dst[c * dst_stride + r] = src[r * src_stride + c] for r < rows, c < cols (each at most 8): one 8 x 8
// block transposed in registers, with masked loads and stores at the edges (nothing outside the
// block is read or written).
DSF_AVX2 inline void transpose8(const float* __restrict src, int64_t src_stride, int rows, int cols,
                                float* __restrict dst, int64_t dst_stride) {
  const __m256i col_mask = lane_mask(cols), row_mask = lane_mask(rows);
  __m256 r[8], t[8];
  // Masked stores are slow on AMD cores (microcoded): whole rows and columns take plain ones.
  for (int i = 0; i < 8; ++i)
    r[i] = i >= rows  ? _mm256_setzero_ps()
           : cols == 8 ? _mm256_loadu_ps(src + i * src_stride)
                       : _mm256_maskload_ps(src + i * src_stride, col_mask);
  for (int k = 0; k < 4; ++k) {  // per 128-bit lane: elements 2j, 2j+1 of two rows, interleaved
    t[2 * k] = _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int h = 0; h < 2; ++h)  // per 128-bit lane: column m of rows 4h .. 4h+3 (and column m + 4 above)
    for (int k = 0; k < 2; ++k) {
      r[4 * h + 2 * k] = _mm256_shuffle_ps(t[4 * h + k], t[4 * h + 2 + k], _MM_SHUFFLE(1, 0, 1, 0));
      r[4 * h + 2 * k + 1] = _mm256_shuffle_ps(t[4 * h + k], t[4 * h + 2 + k], _MM_SHUFFLE(3, 2, 3, 2));
    }
  const auto store = [&](int col, __m256 x) DSF_AVX2 {
    if (col >= cols) return;
    if (rows == 8)
      _mm256_storeu_ps(dst + col * dst_stride, x);
    else
      _mm256_maskstore_ps(dst + col * dst_stride, row_mask, x);
  };
  for (int m = 0; m < 4; ++m) {  // columns m (low lanes of both halves) and m + 4 (high lanes)
    store(m, _mm256_permute2f128_ps(r[m], r[4 + m], 0x20));
    store(m + 4, _mm256_permute2f128_ps(r[m], r[4 + m], 0x31));
  }
}

// a * b rounded on its own: the empty asm makes the product a value GCC must materialise, so it is
// never fused with a following add into an FMA (AVX2 has no explicit-rounding multiply).
DSF_AVX2 inline __m256 mul_exact(__m256 a, __m256 b) {
  __m256 p = _mm256_mul_ps(a, b);
  asm("" : "+x"(p));
  return p;
}

// avx512::enclosing_simplex16 for eight points (one a lane), with the same float operations in the
// same order (so the same bits as lattice::enclosing_simplex_fixed<D>); the comparisons give lane
// masks, applied with blends where AVX-512 has masked operations. same[r]: bits 0..7.
template <int D>
DSF_AVX2 void enclosing_simplex8(const float* __restrict f, const float* __restrict scale, int32_t* __restrict key,
                                 float* __restrict bary, const int32_t* __restrict prev, uint16_t* __restrict same) {
  constexpr int D1 = D + 1;
  const __m256i zero_i = _mm256_setzero_si256();
  __m256 elevated[D1];
  __m256 sm = _mm256_setzero_ps();
  alignas(32) float ft[D * 8];  // [D, 8]: the features, one row per coordinate
  transpose8(f, D, 8, D, ft, 8);
  for (int j = D; j > 0; --j) {
    const __m256 cf = mul_exact(_mm256_load_ps(ft + (j - 1) * 8), _mm256_set1_ps(scale[j - 1]));
    elevated[j] = _mm256_sub_ps(sm, mul_exact(_mm256_set1_ps(static_cast<float>(j)), cf));
    sm = _mm256_add_ps(sm, cf);
  }
  elevated[0] = sm;
  const __m256 down = _mm256_set1_ps(1.0f / static_cast<float>(D1));
  const __m256 up = _mm256_set1_ps(static_cast<float>(D1));
  __m256i rem0[D1], rank[D1];
  __m256i sum = zero_i;
  for (int i = 0; i < D1; ++i) {
    const __m256 x = mul_exact(down, elevated[i]);
    const __m256i t = _mm256_cvttps_epi32(x);
    const __m256 r = _mm256_sub_ps(x, _mm256_cvtepi32_ps(t));
    // Compare masks are -1 where true: t + 1 where r >= 0.5, t - 1 where r <= -0.5.
    const __m256i ge = _mm256_castps_si256(_mm256_cmp_ps(r, _mm256_set1_ps(0.5f), _CMP_GE_OQ));
    const __m256i le = _mm256_castps_si256(_mm256_cmp_ps(r, _mm256_set1_ps(-0.5f), _CMP_LE_OQ));
    const __m256i rd = _mm256_add_epi32(_mm256_sub_epi32(t, ge), le);
    rem0[i] = _mm256_cvttps_epi32(mul_exact(_mm256_cvtepi32_ps(rd), up));
    sum = _mm256_add_epi32(sum, rd);
    rank[i] = zero_i;
  }
  __m256 residual[D1];
  for (int i = 0; i < D1; ++i) residual[i] = _mm256_sub_ps(elevated[i], _mm256_cvtepi32_ps(rem0[i]));
  for (int i = 0; i < D; ++i)
    for (int j = i + 1; j < D1; ++j) {
      const __m256i lt = _mm256_castps_si256(_mm256_cmp_ps(residual[i], residual[j], _CMP_LT_OQ));
      rank[i] = _mm256_sub_epi32(rank[i], lt);                                      // +1 where lt
      rank[j] = _mm256_add_epi32(rank[j], _mm256_add_epi32(lt, _mm256_set1_epi32(1)));  // +1 where not
    }
  const __m256i d1 = _mm256_set1_epi32(D1), dd = _mm256_set1_epi32(D);
  for (int i = 0; i < D1; ++i) {
    rank[i] = _mm256_add_epi32(rank[i], sum);
    const __m256i low = _mm256_cmpgt_epi32(zero_i, rank[i]);
    const __m256i high = _mm256_cmpgt_epi32(rank[i], dd);
    const __m256i shift = _mm256_sub_epi32(_mm256_and_si256(low, d1), _mm256_and_si256(high, d1));
    rank[i] = _mm256_add_epi32(rank[i], shift);
    rem0[i] = _mm256_add_epi32(rem0[i], shift);
  }
  // b[d - rank[i]] += v; b[d - rank[i] + 1] -= v, in the scalar code's order of i.
  __m256 b[D1 + 1];
  for (int k = 0; k <= D1; ++k) b[k] = _mm256_setzero_ps();
  for (int i = 0; i < D1; ++i) {
    const __m256 v = mul_exact(_mm256_sub_ps(elevated[i], _mm256_cvtepi32_ps(rem0[i])), down);
    for (int k = 0; k <= D1; ++k) {
      const __m256 plus = _mm256_castsi256_ps(_mm256_cmpeq_epi32(rank[i], _mm256_set1_epi32(D - k)));
      const __m256 minus = _mm256_castsi256_ps(_mm256_cmpeq_epi32(rank[i], _mm256_set1_epi32(D - k + 1)));
      b[k] = _mm256_blendv_ps(b[k], _mm256_add_ps(b[k], v), plus);
      b[k] = _mm256_blendv_ps(b[k], _mm256_sub_ps(b[k], v), minus);
    }
  }
  b[0] = _mm256_add_ps(b[0], _mm256_add_ps(_mm256_set1_ps(1.0f), b[D1]));
  alignas(32) int32_t kt[D1 * D * 8];  // [D1 * D, 8]: coordinate i of corner r in row r * D + i
  alignas(32) float bt[D1 * 8];        // [D1, 8]
  for (int r = 0; r < D1; ++r) {
    for (int i = 0; i < D; ++i) {
      const __m256i gt = _mm256_cmpgt_epi32(rank[i], _mm256_set1_epi32(D - r));
      const __m256i k = _mm256_blendv_epi8(_mm256_add_epi32(rem0[i], _mm256_set1_epi32(r)),
                                           _mm256_add_epi32(rem0[i], _mm256_set1_epi32(r - D1)), gt);
      _mm256_store_si256(reinterpret_cast<__m256i*>(kt + (r * D + i) * 8), k);
    }
    _mm256_store_ps(bt + r * 8, b[r]);
  }
  // Which corners repeat the previous point's (lane p against lane p - 1, lane 0 against prev).
  const __m256i up_one = _mm256_setr_epi32(0, 0, 1, 2, 3, 4, 5, 6);
  for (int r = 0; r < D1; ++r) {
    __m256i eq = _mm256_set1_epi32(-1);
    for (int i = 0; i < D; ++i) {
      const __m256i cur = _mm256_load_si256(reinterpret_cast<const __m256i*>(kt + (r * D + i) * 8));
      const __m256i before =
          _mm256_blend_epi32(_mm256_permutevar8x32_epi32(cur, up_one), _mm256_set1_epi32(prev[r * D + i]), 0x01);
      eq = _mm256_and_si256(eq, _mm256_cmpeq_epi32(cur, before));
    }
    same[r] = static_cast<uint16_t>(_mm256_movemask_ps(_mm256_castsi256_ps(eq)));
  }
  // The keys move as float bit patterns: loads, shuffles and stores never change bits.
  for (int j0 = 0; j0 < D1 * D; j0 += 8)
    transpose8(reinterpret_cast<const float*>(kt + j0 * 8), 8, std::min(8, D1 * D - j0), 8,
               reinterpret_cast<float*>(key + j0), D1 * D);
  transpose8(bt, 8, D1, 8, bary, D1);
}

// Sixteen points as two runs of eight: the interface of avx512::enclosing_simplex16.
template <int D>
DSF_AVX2 void enclosing_simplex16(const float* __restrict f, const float* __restrict scale, int32_t* __restrict key,
                                  float* __restrict bary, const int32_t* __restrict prev, uint16_t* __restrict same) {
  constexpr int D1 = D + 1;
  uint16_t hi[D1];
  enclosing_simplex8<D>(f, scale, key, bary, prev, same);
  enclosing_simplex8<D>(f + 8 * D, scale, key + 8 * D1 * D, bary + 8 * D1, key + 7 * D1 * D, hi);
  for (int r = 0; r < D1; ++r) same[r] = static_cast<uint16_t>(same[r] | hi[r] << 8);
}

// The sixteen-point simplex for d = 2, 3 or 5 with AVX2, or null.
inline avx512::Simplex16Fn enclosing_simplex16_for(int d) {
  if (!cpu_has_avx2()) return nullptr;
  return d == 2 ? &enclosing_simplex16<2> : d == 3 ? &enclosing_simplex16<3> : d == 5 ? &enclosing_simplex16<5> : nullptr;
}

}  // namespace avx2
#endif

// The lattice of N points of D features (D > 0 fixed at compile time, D = 0 any d).
template <int D>
std::tuple<Tensor, Tensor, Tensor> build_lattice(const Tensor& features, int d_runtime) {
  const int64_t N = features.size(0);
  const int d = D > 0 ? D : d_runtime;
  const float* f = features.const_data_ptr<float>();
  {
    // Lattice coordinates are int32: beyond 1e6 standard deviations they could overflow. One
    // vectorised min/max pass answers both checks: NaN propagates into both, an infinity is one.
    const auto [lo_t, hi_t] = at::aminmax(features);
    const float lo = lo_t.item<float>(), hi = hi_t.item<float>();
    TORCH_CHECK_VALUE(std::isfinite(lo) && std::isfinite(hi), "features must be finite (found NaN or Inf)");
    TORCH_CHECK_VALUE(std::fabs(lo) <= 1e6f && std::fabs(hi) <= 1e6f, "features must lie within +-1e6 (they are "
                      "positions divided by standard deviations; is a standard deviation tiny?)");
  }
  const int D1 = d + 1;

  float scale[lattice::kMaxDim];
  for (int i = 0; i < d; ++i) scale[i] = lattice::axis_scale(i, d);

  // 1. Every pixel's simplex, and vertex numbering in first-occurrence (pixel, corner) order, so it
  //    never depends on threads: a fixed number of contiguous chunks of pixels find their simplices
  //    and number their own corners in parallel (the keys never leave the chunk's table); then the
  //    chunks' distinct keys are entered into the global table in chunk order (which reproduces
  //    the sequential first-occurrence order), and every entry is mapped to its global index.
  constexpr int64_t kChunks = 16;
  auto chunk_begin = [&](int64_t c) { return c * N / kChunks; };
  // The outputs come from the caching allocator (huge_pages.h): a lattice per image, every image the
  // same size, would otherwise fault in ~10 MB of fresh pages per build.
  Tensor weights = empty_output({N, D1}, at::kFloat, at::MemoryFormat::Contiguous);
  float* w = weights.mutable_data_ptr<float>();
  Tensor offsets = empty_output({N, D1}, at::kInt, at::MemoryFormat::Contiguous);
  int32_t* off = offsets.mutable_data_ptr<int32_t>();
  std::vector<std::vector<int32_t>> chunk_keys(kChunks);  // each chunk's distinct keys, local order
#ifdef DSF_HAVE_AVX512_KERNELS
  avx512::Simplex16Fn simplex16 = avx512::enclosing_simplex16_for(d);
  if (!simplex16) simplex16 = avx2::enclosing_simplex16_for(d);
#else
  const void* simplex16 = nullptr;
#endif
  constexpr int64_t kGroup = 16;  // pixels whose simplices are found together
  parallel_blocks(kChunks, 1, [&](int64_t c0, int64_t c1) {
    // The previous pixel's corners, then a group's: [1 + kGroup, d+1, d].
    std::vector<int32_t> key_buf((1 + kGroup) * D1 * d);
    int32_t* group = key_buf.data() + D1 * d;
    for (int64_t c = c0; c < c1; ++c) {
      // Sized for one distinct vertex in eight corners (photographs have under one in twenty), so
      // the table does not rehash its way up from the minimum; it still grows if needed.
      VertexTable<D> local(d, (chunk_begin(c + 1) - chunk_begin(c)) * D1 / 8);
      const int64_t begin = chunk_begin(c), end = chunk_begin(c + 1);
      for (int64_t g = begin; g < end; g += kGroup) {
        const int64_t n = std::min(kGroup, end - g);
        // Neighbouring pixels often share simplex corners, and a shared corner has the same
        // remainder r, so it sits at the same position among the previous pixel's corners:
        // check that first, before hashing. The 16-point kernels make that check themselves.
#ifdef DSF_HAVE_AVX512_KERNELS
        if (simplex16 && n == kGroup) {
          uint16_t same[lattice::kMaxDim + 1];
          simplex16(f + g * d, scale, group, w + g * D1, key_buf.data(), same);
          for (int64_t p = 0; p < n; ++p) {
            const int64_t i = g + p;
            for (int r = 0; r < D1; ++r)
              off[i * D1 + r] = (same[r] >> p & 1) && i > begin ? off[(i - 1) * D1 + r]
                                                                 : local.insert(group + (p * D1 + r) * d);
          }
        } else
#endif
        {
          for (int64_t p = 0; p < n; ++p)
            lattice::enclosing_simplex_fixed<D>(f + (g + p) * d, d, scale, group + p * D1 * d, w + (g + p) * D1);
          for (int64_t p = 0; p < n; ++p) {
            const int64_t i = g + p;
            const int32_t* keys = group + p * D1 * d;
            const int32_t* prev = keys - D1 * d;
            for (int r = 0; r < D1; ++r) {
              const int32_t* key = keys + r * d;
              int32_t diff = 0;  // one branch per corner, not one per coordinate
              for (int k = 0; k < d; ++k) diff |= key[k] ^ prev[r * d + k];
              off[i * D1 + r] = diff == 0 && i > begin ? off[(i - 1) * D1 + r] : local.insert(key);
            }
          }
        }
        std::copy(group + (n - 1) * D1 * d, group + n * D1 * d, key_buf.data());
      }
      chunk_keys[c] = local.take_keys();
    }
  });
  int64_t at_most = 0;  // the chunks' distinct keys together: the whole image has at most as many
  for (const auto& k : chunk_keys) at_most += static_cast<int64_t>(k.size()) / d;
  VertexTable<D> table(d, at_most);
  std::vector<std::vector<int32_t>> to_global(kChunks);
  for (int64_t c = 0; c < kChunks; ++c) {
    const int64_t n = static_cast<int64_t>(chunk_keys[c].size()) / d;
    to_global[c].resize(n);
    for (int64_t u = 0; u < n; ++u) to_global[c][u] = table.insert(chunk_keys[c].data() + u * d);
  }
  at::parallel_for(0, kChunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t e = chunk_begin(c) * D1; e < chunk_begin(c + 1) * D1; ++e) off[e] = to_global[c][off[e]];
  });
  const int64_t M = table.size();

  // 3. Blur neighbours along each axis j: all coordinates -1 (resp. +1) except axis j, which moves
  //    by +d (resp. -d); the implicit last coordinate makes axis d "all coordinates -1 / +1".
  //    The two moves are inverse translations: u = n1(v) exactly when v = n2(u). So one lookup per
  //    vertex and axis fills both: v's first neighbour and u's second (each u is some one v's n1,
  //    so no two threads write the same entry; entries nobody writes stay 0, "not in the lattice").
  Tensor neighbors = empty_output({D1, M, 2}, at::kInt, at::MemoryFormat::Contiguous);
  int32_t* nb = neighbors.mutable_data_ptr<int32_t>();
  std::memset(nb, 0, neighbors.nbytes());
  parallel_blocks(M, 1024, [&](int64_t begin, int64_t end) {
    int32_t n1[lattice::kMaxDim], n2[lattice::kMaxDim];
    for (int64_t v = begin; v < end; ++v) {
      const int32_t* key = table.key(v);
      for (int j = 0; j <= d; ++j) {
        lattice::blur_neighbor_keys(key, d, j, n1, n2);
        const int32_t u = table.find(n1);
        nb[(j * M + v) * 2] = u + 1;
        if (u >= 0) nb[(j * M + u) * 2 + 1] = static_cast<int32_t>(v) + 1;
      }
    }
  });

  return {offsets, weights, neighbors};
}

std::tuple<Tensor, Tensor, Tensor> permutohedral_lattice_cpu(const Tensor& features_in) {
  lattice::check_features(features_in);
  const Tensor features = features_in.contiguous();
  const int d = static_cast<int>(features.size(1));
  switch (d) {  // dense_crf's kernels: (x, y), (x, y, t), (x, y, r, g, b), (x, y, t, r, g, b)
    case 2: return build_lattice<2>(features, d);
    case 3: return build_lattice<3>(features, d);
    case 5: return build_lattice<5>(features, d);
    case 6: return build_lattice<6>(features, d);
    default: return build_lattice<0>(features, d);
  }
}

// Splats cut the pixels into this many contiguous parts, each with its own vertex buffer. Fixed, so
// that the order of every sum is the same whatever the number of threads.
constexpr int64_t kSplatParts = 8;

// Part p holds pixels [part_begin(p), part_begin(p + 1)): the fixed partition every splat uses. Each
// half of the parts shrinks, 8 : 4 : 2 : 1 (N/8 per part on average). parallel_owned gives each of
// two threads one half, and a thread that finishes first takes the other's next part: the parts
// left at the end of a pass are then the small ones, and the wait at the pass's end is short. With
// equal parts a thread idled for up to one eighth of a pass; at two threads on the VOC photo the
// threads' summed idle time in the mean field's passes went from 68-140 ms to 53-73 ms per 21 calls
// (six alternating runs).
inline int64_t part_begin(int64_t p, int64_t N) {
  static constexpr int64_t kStart[kSplatParts + 1] = {0, 8, 12, 14, 15, 23, 27, 29, 30};
  return kStart[p] * N / kStart[kSplatParts];
}

// A lattice's tensors, validated and made contiguous, as raw pointers.
struct LatticeView {
  int64_t N = 0, M = 0, D1 = 0;
  const int32_t *off = nullptr, *nb = nullptr;
  const float* w = nullptr;
  // Buffer rows [part_lo[p], part_hi[p]) hold every vertex part p's pixels touch. Vertices are
  // numbered in pixel order, so a part's vertices are mostly a narrow band; adding the parts reads
  // (and re-zeroes) only each part's band.
  int64_t part_lo[kSplatParts] = {}, part_hi[kSplatParts] = {};
  std::vector<Tensor> keep;  // owns the contiguous copies
};

// The smallest and largest of x[0, n), starting from lo and hi. Multiversioned: the baseline
// x86-64 build has no packed 32-bit min/max, and this runs over every lattice index on every call.
DSF_MULTIVERSION void min_max(const int32_t* __restrict x, int64_t n, int32_t& lo, int32_t& hi) {
  int32_t a = lo, b = hi;
  for (int64_t i = 0; i < n; ++i) {
    a = std::min(a, x[i]);
    b = std::max(b, x[i]);
  }
  lo = a;
  hi = b;
}

// Lattice tensors are ordinary op inputs: every index is checked once here, so the kernels below
// can trust them and never read or write out of bounds.
LatticeView view_lattice(const Tensor& offsets, const Tensor& weights, const Tensor& neighbors) {
  const int64_t D1 = lattice::check_lattice_tensors(offsets, weights, neighbors);
  LatticeView L;
  L.N = offsets.size(0);
  L.M = neighbors.size(1);
  L.D1 = D1;
  L.keep = {offsets.contiguous(), weights.contiguous(), neighbors.contiguous()};
  L.off = L.keep[0].const_data_ptr<int32_t>();
  L.w = L.keep[1].const_data_ptr<float>();
  L.nb = L.keep[2].const_data_ptr<int32_t>();
  const int64_t M = L.M;
  // One min/max pass over the offsets gives both each part's band and the range check; min/max
  // reductions vectorise (a flag written from the loop would not).
  int32_t part_min[kSplatParts], part_max[kSplatParts];
  at::parallel_for(0, kSplatParts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      int32_t lo = std::numeric_limits<int32_t>::max(), hi = std::numeric_limits<int32_t>::min();
      const int64_t first = part_begin(p, L.N) * D1;
      min_max(L.off + first, part_begin(p + 1, L.N) * D1 - first, lo, hi);
      part_min[p] = lo;
      part_max[p] = hi;
    }
  });
  bool off_ok = true;
  for (int64_t p = 0; p < kSplatParts; ++p) {
    if (part_max[p] < part_min[p]) {  // a part with no pixels (some are, for N < 30)
      L.part_lo[p] = L.part_hi[p] = 0;
      continue;
    }
    off_ok = off_ok && part_min[p] >= 0 && part_max[p] <= M - 1;
    L.part_lo[p] = static_cast<int64_t>(part_min[p]) + 1;
    L.part_hi[p] = static_cast<int64_t>(part_max[p]) + 2;
  }
  TORCH_CHECK_VALUE(off_ok, "offsets hold out-of-range vertices (expected 0..", M - 1, ")");
  const int64_t n_nb = D1 * M * 2;
  std::atomic<bool> nb_ok{true};
  at::parallel_for(0, n_nb, 1 << 16, [&](int64_t begin, int64_t end) {
    int32_t lo = 0, hi = 0;
    min_max(L.nb + begin, end - begin, lo, hi);
    if (lo < 0 || hi > M) nb_ok = false;
  });
  TORCH_CHECK_VALUE(nb_ok.load(), "neighbors hold out-of-range vertices (expected 0..", M, ")");
  return L;
}

// Channels are padded to a whole number of half-registers (kBlock: 8 floats, 32 bytes), so every
// inner loop has a fixed trip count and no scalar remainder -- with 21 labels a remainder loop would
// otherwise run 5 of every 21 channels one at a time. Half, not whole, AVX-512 registers: 21 labels
// pad to 24, not 32, a quarter less memory traffic in every splat, blur and slice (and on cores that
// execute 512-bit operations as two 256-bit halves, a quarter less arithmetic too).
template <typename T>
constexpr int64_t kLanes = 64 / sizeof(T);
template <typename T>
constexpr int64_t kBlock = kLanes<T> / 2;

// Few channels (the normalisation's filter of a constant image has one) are not padded: an 8-wide
// block would do 8 times the work. Loops below then run over exactly Cp elements.
template <typename T>
int64_t padded(int64_t c) { return c <= 2 ? c : (c + kBlock<T> - 1) / kBlock<T> * kBlock<T>; }

// body(c) for c in [0, Cp), in fixed-width runs the compiler turns into whole vectors: full
// registers when Cp is a multiple of kLanes, else half registers when it is a multiple of kBlock,
// else one element at a time (Cp <= 2).
template <typename T, typename Body>
__attribute__((always_inline)) inline void for_lanes(int64_t Cp, Body&& body) {
  if (Cp % kLanes<T> == 0) {
    for (int64_t c0 = 0; c0 < Cp; c0 += kLanes<T>)
      for (int64_t c = c0; c < c0 + kLanes<T>; ++c) body(c);
  } else if (Cp % kBlock<T> == 0) {
    for (int64_t c0 = 0; c0 < Cp; c0 += kBlock<T>)
      for (int64_t c = c0; c < c0 + kBlock<T>; ++c) body(c);
  } else {
    for (int64_t c = 0; c < Cp; ++c) body(c);
  }
}

// acc[0:Cp] += we * src[0:Cp].
template <typename T>
__attribute__((always_inline)) inline void axpy(T* __restrict acc, const T* __restrict src, T we, int64_t Cp) {
  for_lanes<T>(Cp, [&](int64_t c) { acc[c] += we * src[c]; });
}

// Splat pixels [begin, end) into buf ([M+1, Cp], rows 1.. zeroed by the caller): buf[v+1] +=
// weight * (scale[pixel] * in[pixel]); scale may be null. The product order is the reference
// implementation's (it scales the values first, then splats).
template <typename T>
DSF_MULTIVERSION void splat_pixels(const T* __restrict in, const T* __restrict scale, const int32_t* __restrict off,
                                   const float* __restrict w, int64_t D1, int64_t Cp, int64_t begin, int64_t end,
                                   T* __restrict buf) {
  if (Cp == 1 && !scale) {  // one channel (the normalisation's constant image): no per-corner loop setup
    for (int64_t i = begin; i < end; ++i) {
      const T v = in[i];
      const int32_t* o = off + i * D1;
      const float* wi = w + i * D1;
      for (int64_t r = 0; r < D1; ++r) buf[static_cast<int64_t>(o[r]) + 1] += static_cast<T>(wi[r]) * v;
    }
    return;
  }
  std::vector<T> scaled(Cp);
  for (int64_t i = begin; i < end; ++i) {
    const T* src = in + i * Cp;
    if (scale) {
      const T s = scale[i];
      for (int64_t c = 0; c < Cp; ++c) scaled[c] = s * src[c];
      src = scaled.data();
    }
    for (int64_t r = 0; r < D1; ++r)
      axpy<T>(buf + (static_cast<int64_t>(off[i * D1 + r]) + 1) * Cp, src, static_cast<T>(w[i * D1 + r]), Cp);
  }
}

// Row v of each part whose band [lo[p], hi[p]) holds it, in part order, into with[]; returns how many.
template <typename T>
inline int parts_holding(T* parts, int64_t part_stride, const int64_t* lo, const int64_t* hi, int64_t Cp, int64_t v,
                         T** with) {
  int n = 0;
  for (int64_t p = 0; p < kSplatParts; ++p)
    if (v >= lo[p] && v < hi[p]) with[n++] = parts + p * part_stride + v * Cp;
  return n;
}

// out[v] = sum of parts[p][v] for p = 0..P-1, in that order, for rows [begin, end); a part is read
// only within its band [lo[p], hi[p]) (outside it the part is zero, and adding zeros changes no
// bits). The parts are zeroed as they are read, ready for the next splat (no separate clearing pass).
// out may be one of the parts (each row is stored after its reads), so neither pointer is restrict.
template <typename T>
DSF_MULTIVERSION void add_parts(T* parts, int64_t part_stride, const int64_t* lo, const int64_t* hi, int64_t Cp,
                                int64_t begin, int64_t end, T* out) {
  // Each block of labels is summed in registers over the parts whose band holds the row: plain
  // copy loops here became a memmove and a memset call per row and part.
  constexpr int64_t B = kBlock<T>;
  for (int64_t v = begin; v < end; ++v) {
    T* with[kSplatParts];
    const int n = parts_holding(parts, part_stride, lo, hi, Cp, v, with);
    T* dst = out + v * Cp;
    auto sum = [&](int64_t c0, auto width) {
      constexpr int64_t W = decltype(width)::value;
      T acc[W] = {};
      for (int j = 0; j < n; ++j) {
        T* part = with[j] + c0;
        for (int64_t c = 0; c < W; ++c) {
          acc[c] = j == 0 ? part[c] : acc[c] + part[c];
          part[c] = T(0);
        }
      }
      for (int64_t c = 0; c < W; ++c) dst[c0 + c] = acc[c];
    };
    if (Cp % B == 0)
      for (int64_t c0 = 0; c0 < Cp; c0 += B) sum(c0, std::integral_constant<int64_t, B>{});
    else
      for (int64_t c0 = 0; c0 < Cp; ++c0) sum(c0, std::integral_constant<int64_t, 1>{});
  }
}

// One blur pass along an axis: dst[v+1] = src[v+1] + (src[n1] + src[n2]) / 2.
template <typename T>
DSF_MULTIVERSION void blur_range(const T* __restrict src, const int32_t* __restrict nbj, int64_t Cp, int64_t begin,
                                 int64_t end, T* __restrict dst) {
  for (int64_t v = begin; v < end; ++v) {
    const int64_t n1 = nbj[v * 2], n2 = nbj[v * 2 + 1];
    const T* o = src + (v + 1) * Cp;
    const T* p1 = src + n1 * Cp;
    const T* p2 = src + n2 * Cp;
    T* out = dst + (v + 1) * Cp;
    for_lanes<T>(Cp, [&](int64_t c) { out[c] = o[c] + T(0.5) * (p1[c] + p2[c]); });
  }
}

#ifdef DSF_HAVE_AVX512_KERNELS
namespace avx512 {

// blur_range and add_parts for float rows of a multiple of 8 (every padded label count): full
// registers, then a half register, written out per row (the portable loops ran Cp / 8 rounds of a
// half register per row, in a loop the compiler does not unroll). Same operations, same bits.
// Lanes<16> (a full register) and Lanes<8> (a half) give the two widths one interface.
template <int W>
struct Lanes {
  static constexpr bool kFull = W == 16;
  using V = std::conditional_t<kFull, __m512, __m256>;
  DSF_AVX512 static V load(const float* p) {
    if constexpr (kFull) return _mm512_loadu_ps(p); else return _mm256_loadu_ps(p);
  }
  DSF_AVX512 static void store(float* p, V v) {
    if constexpr (kFull) _mm512_storeu_ps(p, v); else _mm256_storeu_ps(p, v);
  }
  DSF_AVX512 static V add(V a, V b) {
    if constexpr (kFull) return _mm512_add_ps(a, b); else return _mm256_add_ps(a, b);
  }
  DSF_AVX512 static V mul(V a, V b) {
    if constexpr (kFull) return _mm512_mul_ps(a, b); else return _mm256_mul_ps(a, b);
  }
  DSF_AVX512 static V set1(float x) {
    if constexpr (kFull) return _mm512_set1_ps(x); else return _mm256_set1_ps(x);
  }
};

// One register's worth of labels from c on: out = o + 0.5 * (p1 + p2).
template <class R>
DSF_AVX512 __attribute__((always_inline)) inline void blur_lanes(const float* o, const float* p1, const float* p2,
                                                                 int64_t c, float* out) {
  R::store(out + c, R::add(R::load(o + c), R::mul(R::set1(0.5f), R::add(R::load(p1 + c), R::load(p2 + c)))));
}

DSF_AVX512 void blur_rows(const float* __restrict src, const int32_t* __restrict nbj, int64_t Cp, int64_t begin,
                          int64_t end, float* __restrict dst) {
  const int64_t full = Cp / 16 * 16;
  for (int64_t v = begin; v < end; ++v) {
    const float* o = src + (v + 1) * Cp;
    const float* p1 = src + static_cast<int64_t>(nbj[v * 2]) * Cp;
    const float* p2 = src + static_cast<int64_t>(nbj[v * 2 + 1]) * Cp;
    float* out = dst + (v + 1) * Cp;
    for (int64_t c = 0; c < full; c += 16) blur_lanes<Lanes<16>>(o, p1, p2, c, out);
    if (full < Cp) blur_lanes<Lanes<8>>(o, p1, p2, full, out);
  }
}

// One register's worth of labels from c on: dst = the n rows' sum, in order (0 if n = 0), each row
// zeroed after its read.
template <class R>
DSF_AVX512 __attribute__((always_inline)) inline void add_lanes(float* const* with, int n, int64_t c, float* dst) {
  const typename R::V zero = R::set1(0.f);
  typename R::V acc = zero;
  for (int j = 0; j < n; ++j) {
    acc = j == 0 ? R::load(with[j] + c) : R::add(acc, R::load(with[j] + c));
    R::store(with[j] + c, zero);
  }
  R::store(dst + c, acc);
}

DSF_AVX512 void add_rows(float* parts, int64_t part_stride, const int64_t* lo, const int64_t* hi, int64_t Cp,
                         int64_t begin, int64_t end, float* out) {
  const int64_t full = Cp / 16 * 16;
  for (int64_t v = begin; v < end; ++v) {
    float* with[kSplatParts];
    const int n = parts_holding(parts, part_stride, lo, hi, Cp, v, with);
    for (int64_t c = 0; c < full; c += 16) add_lanes<Lanes<16>>(with, n, c, out + v * Cp);
    if (full < Cp) add_lanes<Lanes<8>>(with, n, full, out + v * Cp);
  }
}

}  // namespace avx512

namespace avx2 {

// The same two row operations for machines without AVX-512: one eight-lane register at a time
// (the portable loops' eight-float blocks compile to a loop with a bound check per block). Same
// operations, same bits.
DSF_AVX2 void blur_rows(const float* __restrict src, const int32_t* __restrict nbj, int64_t Cp, int64_t begin,
                        int64_t end, float* __restrict dst) {
  const __m256 half = _mm256_set1_ps(0.5f);
  for (int64_t v = begin; v < end; ++v) {
    const float* o = src + (v + 1) * Cp;
    const float* p1 = src + static_cast<int64_t>(nbj[v * 2]) * Cp;
    const float* p2 = src + static_cast<int64_t>(nbj[v * 2 + 1]) * Cp;
    float* out = dst + (v + 1) * Cp;
    for (int64_t c = 0; c < Cp; c += 8) {
      const __m256 sum = _mm256_add_ps(_mm256_loadu_ps(p1 + c), _mm256_loadu_ps(p2 + c));
      _mm256_storeu_ps(out + c, _mm256_add_ps(_mm256_loadu_ps(o + c), _mm256_mul_ps(half, sum)));
    }
  }
}

DSF_AVX2 void add_rows(float* parts, int64_t part_stride, const int64_t* lo, const int64_t* hi, int64_t Cp,
                       int64_t begin, int64_t end, float* out) {
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t v = begin; v < end; ++v) {
    float* with[kSplatParts];
    const int n = parts_holding(parts, part_stride, lo, hi, Cp, v, with);
    for (int64_t c = 0; c < Cp; c += 8) {
      __m256 acc = zero;
      for (int j = 0; j < n; ++j) {
        acc = j == 0 ? _mm256_loadu_ps(with[j] + c) : _mm256_add_ps(acc, _mm256_loadu_ps(with[j] + c));
        _mm256_storeu_ps(with[j] + c, zero);
      }
      _mm256_storeu_ps(out + v * Cp + c, acc);
    }
  }
}

}  // namespace avx2

// The vectorised blur and add rows for float rows of Cp labels on this machine: AVX-512's, else
// AVX2's; nulls (the portable loops) when Cp is not a whole number of half registers or the CPU has
// neither.
struct FloatRowKernels {
  void (*blur)(const float*, const int32_t*, int64_t, int64_t, int64_t, float*) = nullptr;
  void (*add)(float*, int64_t, const int64_t*, const int64_t*, int64_t, int64_t, int64_t, float*) = nullptr;
};
inline FloatRowKernels float_row_kernels(int64_t Cp) {
  if (Cp % 8 != 0) return {};
  if (cpu_has_avx512()) return {&avx512::blur_rows, &avx512::add_rows};
  if (cpu_has_avx2()) return {&avx2::blur_rows, &avx2::add_rows};
  return {};
}
#endif

// out[0:Cp] = sum over pixel i's simplex corners of (weight * buf[vertex+1]) * alpha.
template <typename T>
inline void slice_one(const T* __restrict buf, const LatticeView& L, int64_t i, int64_t Cp, T alpha, T* __restrict out) {
  for (int64_t c = 0; c < Cp; ++c) out[c] = T(0);
  for (int64_t r = 0; r < L.D1; ++r) {
    const int64_t vtx = L.off[i * L.D1 + r];
    const T we = L.w[i * L.D1 + r];
    const T* src = buf + (vtx + 1) * Cp;
    for_lanes<T>(Cp, [&](int64_t c) { out[c] += we * src[c] * alpha; });
  }
}

template <typename T>
DSF_MULTIVERSION void slice_range(const T* __restrict buf, const LatticeView& L, int64_t Cp, T alpha, int64_t begin,
                                  int64_t end, T* __restrict out) {
  if (Cp == 1) {  // the normalisation's constant image: a register sum, not a store-to-load chain, with
                  // the lattice's pointers in registers (through slice_one they were reloaded per pixel)
    const int32_t* __restrict off = L.off;
    const float* __restrict w = L.w;
    const int64_t D1 = L.D1;
    for (int64_t i = begin; i < end; ++i) {
      T acc = T(0);
      for (int64_t r = 0; r < D1; ++r)
        acc += static_cast<T>(w[i * D1 + r]) * buf[static_cast<int64_t>(off[i * D1 + r]) + 1] * alpha;
      out[i] = acc;
    }
    return;
  }
  for (int64_t i = begin; i < end; ++i) slice_one(buf, L, i, Cp, alpha, out + i * Cp);
}

// Splat `in` [N, Cp] (times scale[N], if given) and blur it along every axis. `bufs` holds the
// per-part splat buffers and the two blur buffers; returns the buffer that holds the result.
template <typename T>
struct VertexBuffers {
  Tensor parts, a, b;
  int64_t rows, Cp;
  VertexBuffers(const LatticeView& L, int64_t Cp_, at::ScalarType dtype) : rows(L.M + 1), Cp(Cp_) {
    // Only each part's band is ever written or read: zero that once (add_parts leaves it zero after
    // every use); pages outside the bands are never touched.
    parts = at::detail::empty_generic({kSplatParts, rows, Cp}, &HugePageAllocator::instance(),
                                      c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, std::nullopt);
    at::parallel_for(0, kSplatParts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        if (L.part_hi[p] > L.part_lo[p]) parts[p].narrow(0, L.part_lo[p], L.part_hi[p] - L.part_lo[p]).zero_();
    });
    a = empty_output({rows, Cp}, dtype, at::MemoryFormat::Contiguous);
    b = empty_output({rows, Cp}, dtype, at::MemoryFormat::Contiguous);
  }
};


// Splat `in` [N, Cp] (times scale[N], if given) into the per-part buffers, pixels in order.
template <typename T>
void splat_parts(const LatticeView& L, const T* in, const T* scale, VertexBuffers<T>& bufs) {
  const int64_t stride = bufs.rows * bufs.Cp;
  T* parts = bufs.parts.template mutable_data_ptr<T>();
  parallel_owned(kSplatParts, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      splat_pixels<T>(in, scale, L.off, L.w, L.D1, bufs.Cp, part_begin(p, L.N), part_begin(p + 1, L.N),
                      parts + p * stride);
  });
}

// How far (in rows) blur step `step` of L reaches: the largest |neighbour row - row| of its axis
// (neighbour 0, "none", excepted); stops counting once past `cap`.
inline int64_t blur_reach(const LatticeView& L, int axis, int64_t cap) {
  const int32_t* nb = L.nb + static_cast<int64_t>(axis) * L.M * 2;
  int64_t reach = 0;
  for (int64_t v0 = 0; v0 < L.M && reach <= cap; v0 += 4096) {
    const int64_t v1 = std::min(L.M, v0 + 4096);
    int64_t r = 0;
    for (int64_t v = v0; v < v1; ++v)
      for (int s = 0; s < 2; ++s) {
        const int64_t n = nb[v * 2 + s];
        const int64_t gap = n == 0 ? 0 : n > v + 1 ? n - v - 1 : v + 1 - n;
        r = gap > r ? gap : r;
      }
    reach = std::max(reach, r);
  }
  return reach;
}

// One lattice's add and blur, as stages over its buffer rows: stage 0 adds the parts into a (all
// rows), stage s = 1..D1 blurs along the (s-1)-th axis of the order (rows 1..M; row 0 is the zero
// "no neighbour" row), from a into b for odd s, from b into a for even s.
template <typename T>
struct ReduceBlur {
  const LatticeView* lat = nullptr;
  VertexBuffers<T>* buf = nullptr;
  T* a = nullptr;
  T* b = nullptr;
  bool reverse = false;
  // The bands stage 0 adds: the lattice's, or after prefold(F, ...) those of the parts it left.
  int64_t lo[kSplatParts] = {}, hi[kSplatParts] = {};
  void set_bands() {
    std::copy(lat->part_lo, lat->part_lo + kSplatParts, lo);
    std::copy(lat->part_hi, lat->part_hi + kSplatParts, hi);
  }
  int64_t rows() const { return buf->rows; }
  int64_t stages() const { return lat->D1 + 1; }
  const T* result() const { return lat->D1 % 2 ? b : a; }
  // Stage s over rows [begin, end): float_row_kernels' rows where there are some, else the portable
  // loops. Stage 0 adds the parts (within the bands lo, hi) into a.
  void run(int s, int64_t begin, int64_t end) const {
    if (s == 0) {
      add(lo, hi, begin, end, a);
      return;
    }
    const int d = static_cast<int>(lat->D1 - 1), step = s - 1;
    const int32_t* nbj = lat->nb + static_cast<int64_t>(reverse ? d - step : step) * lat->M * 2;
    // blur_range's vertex v is buffer row v + 1.
#ifdef DSF_HAVE_AVX512_KERNELS
    if constexpr (std::is_same_v<T, float>) {
      if (const auto blur = float_row_kernels(buf->Cp).blur) {
        blur(s % 2 ? a : b, nbj, buf->Cp, begin - 1, end - 1, s % 2 ? b : a);
        return;
      }
    }
#endif
    blur_range<T>(s % 2 ? a : b, nbj, buf->Cp, begin - 1, end - 1, s % 2 ? b : a);
  }
  // out[v] = the sum, in part order, of the parts whose band [blo[p], bhi[p]) holds row v, for rows
  // [begin, end); the parts are cleared as they are read.
  void add(const int64_t* blo, const int64_t* bhi, int64_t begin, int64_t end, T* out) const {
    T* parts = buf->parts.template mutable_data_ptr<T>();
    const int64_t stride = buf->rows * buf->Cp;
#ifdef DSF_HAVE_AVX512_KERNELS
    if constexpr (std::is_same_v<T, float>) {
      if (const auto add_rows = float_row_kernels(buf->Cp).add) {
        add_rows(parts, stride, blo, bhi, buf->Cp, begin, end, out);
        return;
      }
    }
#endif
    add_parts<T>(parts, stride, blo, bhi, buf->Cp, begin, end, out);
  }
  int64_t first_row(int s) const { return s == 0 ? 0 : 1; }
  // The pre-fold: parts [0, F) are summed, in part order, into part F - 1 over rows [begin, end)
  // of their bands' union and cleared, as stage 0 would read them; stage 0 then reads part F - 1
  // over that union in their place, which continues the same sums in the same order, so gives the
  // same bits. (A union row no part held gets +0, and +0 + x is x for every splat sum x: a sum that
  // starts at +0 is never -0.) fold_bands(F) sets stage 0's bands so and returns the union
  // [u0, u1) (empty when u0 >= u1); prefold(F, begin, end) then folds rows [begin, end) of it.
  std::pair<int64_t, int64_t> fold_bands(int64_t F) {
    int64_t u0 = rows(), u1 = 0;
    for (int64_t p = 0; p < F; ++p) {
      if (lat->part_hi[p] > lat->part_lo[p]) u0 = std::min(u0, lat->part_lo[p]);
      u1 = std::max(u1, lat->part_hi[p]);
    }
    set_bands();
    for (int64_t p = 0; p + 1 < F; ++p) lo[p] = hi[p] = 0;
    lo[F - 1] = u1 > u0 ? u0 : 0;
    hi[F - 1] = u1 > u0 ? u1 : 0;
    return {u0, u1};
  }
  void prefold(int64_t F, int64_t begin, int64_t end) const {
    int64_t flo[kSplatParts] = {}, fhi[kSplatParts] = {};
    std::copy(lat->part_lo, lat->part_lo + F, flo);
    std::copy(lat->part_hi, lat->part_hi + F, fhi);
    add(flo, fhi, begin, end, buf->parts.template mutable_data_ptr<T>() + (F - 1) * buf->rows * buf->Cp);
  }
};

// A lattice whose vertices are numbered so that every blur neighbour is near (the appearance-free
// lattice of a pixel grid: a few image rows' worth of vertices) can run all its stages in one
// sweep on one thread, each stage a fixed distance behind the one before: the rows in flight stay in
// the core's L2 cache, where d + 2 passes over the whole buffers go to memory (a mean-field pass
// streams tens of MB between two blurs and leaves none of the buffers in cache).
// Stage s may compute row r once stage s-1 has finished the rows r reads (its neighbours within
// reach of the axis) and has no row left that still reads the row s overwrites (stage s writes the
// buffer stage s-1 reads, for s >= 2): lag[s] = that distance. Returns false when the reach is too
// long for a sweep to pay (over a quarter of the rows in all).
inline bool sweep_lags(const LatticeView& L, bool reverse, std::vector<int64_t>& lag) {
  const int d = static_cast<int>(L.D1 - 1);
  const int64_t budget = L.M / 4;
  std::vector<int64_t> reach(L.D1);
  int64_t total = 0;
  for (int step = 0; step < L.D1; ++step) {
    reach[step] = blur_reach(L, reverse ? d - step : step, budget);
    total += reach[step];
    if (total > budget) return false;
  }
  lag.assign(L.D1 + 1, 0);
  lag[1] = reach[0];
  for (int s = 2; s <= L.D1; ++s) lag[s] = std::max(reach[s - 2], reach[s - 1]);
  return true;
}

// How reduce_blur_all runs each of K lattices: its sweep's lags, or empty for phases (below). The
// threads that will run it: a sweep is one thread's work, so with several threads lattices sweep
// only if that leaves phases or enough sweeps to keep every thread busy.
using BlurPlan = std::vector<std::vector<int64_t>>;
inline BlurPlan plan_blur(const LatticeView* const* lats, int64_t K, bool reverse, int64_t threads) {
  BlurPlan plan(K);
  if (threads > 1 && K < 2) return plan;
  int64_t swept = 0;
  for (int64_t k = 0; k < K; ++k) swept += sweep_lags(*lats[k], reverse, plan[k]);
  if (threads > 1 && swept == K && swept < threads) plan.assign(K, {});
  return plan;
}

// The threads a step may use: one inside a parallel region (a batch's image on its thread), else all.
inline int64_t free_threads() { return at::in_parallel_region() ? 1 : at::get_num_threads(); }

// The sweep: every stage advances by up to 256 rows per round, as far as its lag allows.
template <typename T>
void sweep(const ReduceBlur<T>& rb, const std::vector<int64_t>& lag) {
  const int S = static_cast<int>(rb.stages());
  const int64_t R = rb.rows();
  std::vector<int64_t> done(S);
  for (int s = 0; s < S; ++s) done[s] = rb.first_row(s);
  while (done[S - 1] < R) {
    for (int s = 0; s < S; ++s) {
      const int64_t limit = s == 0 || done[s - 1] == R ? R : std::max<int64_t>(0, done[s - 1] - lag[s]);
      const int64_t end = std::min(limit, done[s] + 256);
      if (end > done[s]) {
        rb.run(s, done[s], end);
        done[s] = end;
      }
    }
  }
}

inline void spin_pause() {
#if defined(__x86_64__) && defined(__GNUC__)
  _mm_pause();
#endif
}

// For each of K lattices: add its parts in part order (clearing them) and blur along every axis;
// out[k] = the buffer that holds lattice k's result. Lattices with near neighbours sweep (above),
// each on one thread; the others run in phases -- the adds, then blur axis 0, 1, ... -- each a set
// of row blocks that any thread takes, a phase starting once the one before is complete (no
// barrier). With fewer sweeps than threads, a thread that sweeps does not join the phases
// afterwards: a phase's rows pass from thread to thread, and on dense_crf's VOC photo at two
// threads that cost more than the help gave (mean field 44-45 against 44-47 ms when the two cores
// share an L3, 67-68 against 74-76 ms when they do not). Which thread computes a row never
// changes its bits.
template <typename T>
void reduce_blur_all(const LatticeView* const* lats, VertexBuffers<T>* const* bufs, int64_t K, bool reverse,
                     const BlurPlan& plan, const T** out) {
  std::vector<ReduceBlur<T>> rbs(K);
  for (int64_t k = 0; k < K; ++k) {
    rbs[k] = {lats[k], bufs[k], bufs[k]->a.template mutable_data_ptr<T>(),
              bufs[k]->b.template mutable_data_ptr<T>(), reverse};
    rbs[k].set_bands();
    // Row 0 of both buffers is the zero "no neighbour" row (it only ever received no splats).
    std::memset(rbs[k].b, 0, bufs[k]->Cp * sizeof(T));
  }
  const int64_t threads = free_threads();
  std::vector<int64_t> swept, phased;
  for (int64_t k = 0; k < K; ++k) (plan[k].empty() ? phased : swept).push_back(k);
  // Phase p holds stage p of every phased lattice that has it, in blocks of 256 rows (512 for the
  // adds); first[p][j] is the index of phased lattice j's first block in phase p.
  int max_stages = 0;
  for (int64_t k : phased) max_stages = std::max(max_stages, static_cast<int>(rbs[k].stages()));
  std::vector<std::vector<int64_t>> first(max_stages, std::vector<int64_t>(phased.size() + 1, 0));
  auto block_of = [](int p) -> int64_t { return p == 0 ? 512 : 256; };
  for (int p = 0; p < max_stages; ++p)
    for (size_t j = 0; j < phased.size(); ++j) {
      const ReduceBlur<T>& rb = rbs[phased[j]];
      const int64_t n = p < rb.stages() ? rb.rows() - rb.first_row(p) : 0;
      first[p][j + 1] = first[p][j] + (n + block_of(p) - 1) / block_of(p);
    }
  // Phased lattice j's pre-fold (threads > 1 only, below): parts [0, F) folded up to row
  // folded[j] of the union fold[j] of their bands.
  int64_t F = 0;
  std::vector<std::pair<int64_t, int64_t>> fold(phased.size());
  std::vector<std::atomic<int64_t>> folded(phased.size());
  auto run_block = [&](int p, int64_t blk) {
    const std::vector<int64_t>& f = first[p];
    const size_t j = std::upper_bound(f.begin(), f.end(), blk) - f.begin() - 1;
    const ReduceBlur<T>& rb = rbs[phased[j]];
    const int64_t begin = rb.first_row(p) + (blk - f[j]) * block_of(p);
    const int64_t end = std::min(rb.rows(), begin + block_of(p));
    if (p == 0 && F > 0) {
      const int64_t need = std::min(end, fold[j].second);
      while (folded[j].load(std::memory_order_acquire) < need) spin_pause();
    }
    rb.run(p, begin, end);
  };
  if (threads <= 1) {
    for (int64_t k : swept) sweep(rbs[k], plan[k]);
    for (int p = 0; p < max_stages; ++p)
      for (int64_t blk = 0; blk < first[p].back(); ++blk) run_block(p, blk);
  } else {
    std::atomic<int64_t> next_sweep{0};
    std::vector<std::atomic<int64_t>> next(max_stages), done(max_stages);
    for (int p = 0; p < max_stages; ++p) next[p] = done[p] = 0;
    const int64_t S = static_cast<int64_t>(swept.size());
    // With a sweep on slot 0 and the phases on other slots, slot 0 first pre-folds every phased
    // lattice's parts [0, F), the ones parallel_owned hands its thread: they are in that core's
    // caches, and the adds then fetch one buffer from it instead of F. Ten iterations on the VOC
    // photo at two threads, on two cores without a shared L3 (AVX-512): mean field 66 -> 50 ms; on
    // two that share one (AVX2), no change beyond the noise.
    if (S >= 1 && S < threads && !phased.empty() && kSplatParts / threads >= 2) F = kSplatParts / threads;
    for (size_t j = 0; j < phased.size(); ++j) {
      if (F > 0) fold[j] = rbs[phased[j]].fold_bands(F);
      folded[j] = fold[j].first;
    }
    at::parallel_for(0, threads, 1, [&](int64_t slot0, int64_t slot1) {
      bool phases = false;  // whether this thread works on the phases
      for (int64_t slot = slot0; slot < slot1; ++slot) {
        if (S < threads) {  // a sweep per slot, the remaining slots on the phases
          if (slot == 0 && F > 0)
            for (size_t j = 0; j < phased.size(); ++j) {
              for (int64_t r = fold[j].first, u = fold[j].second; r < u; r += 512) {
                rbs[phased[j]].prefold(F, r, std::min(u, r + 512));
                folded[j].store(std::min(u, r + 512), std::memory_order_release);
              }
            }
          if (slot < S)
            sweep(rbs[swept[slot]], plan[swept[slot]]);
          else
            phases = true;
        } else {  // as many sweeps as threads or more: take them as they come, then the phases
          for (int64_t t = next_sweep.fetch_add(1); t < S; t = next_sweep.fetch_add(1))
            sweep(rbs[swept[t]], plan[swept[t]]);
          phases = true;
        }
      }
      if (!phases) return;
      for (int p = 0; p < max_stages; ++p) {
        const int64_t blocks = first[p].back();
        for (int64_t blk = next[p].fetch_add(1); blk < blocks; blk = next[p].fetch_add(1)) {
          run_block(p, blk);
          done[p].fetch_add(1, std::memory_order_acq_rel);
        }
        while (done[p].load(std::memory_order_acquire) < blocks) spin_pause();
      }
    });
  }
  for (int64_t k = 0; k < K; ++k) out[k] = rbs[k].result();
}

// reduce_blur_all of one lattice; returns the buffer that holds the result.
template <typename T>
const T* reduce_blur(const LatticeView& L, bool reverse, VertexBuffers<T>& bufs) {
  const LatticeView* lat = &L;
  VertexBuffers<T>* buf = &bufs;
  const T* out = nullptr;
  reduce_blur_all<T>(&lat, &buf, 1, reverse, plan_blur(&lat, 1, reverse, free_threads()), &out);
  return out;
}

// Copies N rows of `from` (from_cols wide) into `to` (to_cols wide), zero-filling extra columns.
template <typename T>
void copy_rows(const T* from, int64_t from_cols, T* to, int64_t to_cols, int64_t N) {
  const int64_t n = std::min(from_cols, to_cols);
  at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(to + i * to_cols, from + i * from_cols, n * sizeof(T));
      if (to_cols > n) std::memset(to + i * to_cols + n, 0, (to_cols - n) * sizeof(T));
    }
  });
}

// Splat values [N, C] (times scale[N], if given) and blur them, with the label axis padded to
// bufs.Cp (the padding columns are zero); returns the blurred [M+1, Cp] buffer, owned by bufs.
template <typename T>
const T* splat_blur_padded(const Tensor& values_in, const T* scale, const LatticeView& L, bool reverse,
                           VertexBuffers<T>& bufs) {
  const int64_t N = values_in.size(0), C = values_in.size(1), Cp = bufs.Cp;
  const Tensor values = values_in.contiguous();
  Tensor in = values;
  if (Cp != C) {
    in = empty_output({N, Cp}, values.scalar_type(), at::MemoryFormat::Contiguous);
    copy_rows<T>(values.const_data_ptr<T>(), C, in.mutable_data_ptr<T>(), Cp, N);
  }
  splat_parts<T>(L, in.const_data_ptr<T>(), scale, bufs);
  return reduce_blur<T>(L, reverse, bufs);
}

// values [N, C] -> [N, C]: alpha * slice(blur(splat(values))), computed in T (float or double).
template <typename T>
Tensor filter_impl(const Tensor& values, const LatticeView& L, bool reverse) {
  const int64_t N = values.size(0), C = values.size(1), Cp = padded<T>(C);
  const auto dtype = values.scalar_type();
  VertexBuffers<T> bufs(L, Cp, dtype);
  const T* blurred = splat_blur_padded<T>(values, nullptr, L, reverse, bufs);
  Tensor out_p = empty_output({N, Cp}, dtype, at::MemoryFormat::Contiguous);
  const T alpha = static_cast<T>(lattice::slice_alpha(static_cast<int>(L.D1 - 1)));
  parallel_blocks(N, 256, [&](int64_t begin, int64_t end) {
    slice_range<T>(blurred, L, Cp, alpha, begin, end, out_p.mutable_data_ptr<T>());
  });
  if (Cp == C) return out_p;
  Tensor out = empty_output({N, C}, dtype, at::MemoryFormat::Contiguous);
  copy_rows<T>(out_p.const_data_ptr<T>(), Cp, out.mutable_data_ptr<T>(), C, N);
  return out;
}

Tensor permutohedral_filter_cpu(const Tensor& values, const Tensor& offsets, const Tensor& weights,
                                const Tensor& neighbors, bool reverse) {
  const LatticeView L = view_lattice(offsets, weights, neighbors);
  lattice::check_values(values, L.N);
  if (values.numel() == 0) return empty_output(values.sizes(), values.scalar_type(), at::MemoryFormat::Contiguous);
  if (values.scalar_type() == at::kDouble) return filter_impl<double>(values, L, reverse);
  return filter_impl<float>(values, L, reverse);
}

template <typename T>
Tensor splat_blur_impl(const Tensor& values, const T* scale, const LatticeView& L, bool reverse) {
  const int64_t C = values.size(1), Cp = padded<T>(C);
  VertexBuffers<T> bufs(L, Cp, values.scalar_type());
  const T* blurred = splat_blur_padded<T>(values, scale, L, reverse, bufs);
  Tensor out = at::empty({L.M + 1, C}, values.options());
  copy_rows<T>(blurred, Cp, out.mutable_data_ptr<T>(), C, L.M + 1);
  return out;
}

Tensor permutohedral_splat_blur_cpu(const Tensor& values, const std::optional<Tensor>& scale_in,
                                    const Tensor& offsets, const Tensor& weights, const Tensor& neighbors,
                                    bool reverse) {
  const LatticeView L = view_lattice(offsets, weights, neighbors);
  lattice::check_values(values, L.N);
  lattice::check_scale(scale_in, L.N, values);
  const Tensor scale = scale_in.has_value() ? scale_in->contiguous() : Tensor();
  if (values.size(1) == 0) return at::zeros({L.M + 1, 0}, values.options());
  if (values.scalar_type() == at::kDouble)
    return splat_blur_impl<double>(values, scale.defined() ? scale.const_data_ptr<double>() : nullptr, L, reverse);
  return splat_blur_impl<float>(values, scale.defined() ? scale.const_data_ptr<float>() : nullptr, L, reverse);
}

// 2^f for f in [-0.5, 0.5]: the degree-6 polynomial's coefficients, highest power first. Shared by
// exp_approx and its AVX-512 versions, which evaluate it in the same order (so the same bits).
constexpr int kExp2Degree = 6;
constexpr float kExp2Poly[kExp2Degree + 1] = {1.5403530393381606e-4f, 1.3333558146428443e-3f,
                                              9.6181291076284772e-3f, 5.5504108664821580e-2f,
                                              2.4022650695910071e-1f, 6.9314718055994531e-1f, 1.0f};

// exp for the softmax, vectorisable: 2^(x log2 e) split into 2^n * 2^f, f in [-0.5, 0.5], with a
// degree-6 polynomial for 2^f (relative error < 2e-7, about the rounding of float32 itself).
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float y = x * 1.44269504088896341f;
  const float n = std::nearbyint(y);
  const float f = y - n;
  float p = kExp2Poly[0];
  for (int j = 1; j < kExp2Degree + 1; ++j) p = p * f + kExp2Poly[j];
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<int32_t>(n) << 23;
  std::memcpy(&p, &bits, sizeof(bits));
  return p;
}

// The mean-field update of pixels [begin, end), fused: slice every kernel's blurred buffer, scale by
// its post-normalisation, apply its compatibility, add the logits, softmax, write Q. Everything runs
// over the padded label axis (Lp): padding logits are -1e30, so their exp is 0 and their Q is 0.
//   logits [N, Lp]; q [N, Lp]; bufs[k] the blurred [M_k+1, Lp] buffers; post [K, N];
//   compat [K, Lp, Lp] zero-padded, diagonal [K, Lp] its diagonals (diag[k] set: only the diagonal
//   is non-zero).
DSF_MULTIVERSION void mean_field_update(const std::vector<LatticeView>& lats, const std::vector<const float*>& bufs,
                                        const float* __restrict post, const float* __restrict compat,
                                        const float* __restrict diagonal, const std::vector<char>& diag,
                                        const float* __restrict logits, int64_t N,
                                        int64_t L, int64_t Lp, int64_t begin, int64_t end, float* __restrict q) {
  constexpr int64_t V = kLanes<float>;
  std::vector<float> fbuf(Lp), tbuf(Lp);
  float* __restrict f = fbuf.data();
  float* __restrict t = tbuf.data();
  const int64_t K = static_cast<int64_t>(lats.size());
  std::vector<float> alphas(K);
  for (int64_t k = 0; k < K; ++k) alphas[k] = lattice::slice_alpha(static_cast<int>(lats[k].D1 - 1));
  for (int64_t i = begin; i < end; ++i) {
    for (int64_t c = 0; c < Lp; ++c) t[c] = logits[i * Lp + c];
    for (int64_t k = 0; k < K; ++k) {
      slice_one(bufs[k], lats[k], i, Lp, alphas[k], f);
      const float s = post[k * N + i];
      const float* ck = compat + k * Lp * Lp;
      if (diag[k]) {
        const float* dk = diagonal + k * Lp;  // ck's diagonal, contiguous so the loop vectorises
        for (int64_t c0 = 0; c0 < Lp; c0 += V)
          for (int64_t c = c0; c < c0 + V; ++c) t[c] -= dk[c] * (f[c] * s);
      } else {
        for (int64_t c = 0; c < Lp; ++c) f[c] *= s;
        for (int64_t l = 0; l < L; ++l) {
          float acc = 0.f;
          for (int64_t m0 = 0; m0 < Lp; m0 += V)
            for (int64_t m = m0; m < m0 + V; ++m) acc += ck[l * Lp + m] * f[m];
          t[l] -= acc;
        }
      }
    }
    // Max and sum as V independent lanes, then a tree: a single running scalar would chain every
    // label through one register (and float reductions do not vectorise by themselves).
    float lane[V];
    for (int64_t c = 0; c < V; ++c) lane[c] = t[c];
    for (int64_t c0 = V; c0 < Lp; c0 += V)
      for (int64_t c = 0; c < V; ++c) lane[c] = lane[c] > t[c0 + c] ? lane[c] : t[c0 + c];
    for (int64_t w = V / 2; w >= 1; w /= 2)
      for (int64_t c = 0; c < w; ++c) lane[c] = lane[c] > lane[c + w] ? lane[c] : lane[c + w];
    const float mx = lane[0];
    for (int64_t c = 0; c < V; ++c) lane[c] = 0.f;
    for (int64_t c0 = 0; c0 < Lp; c0 += V)
      for (int64_t c = 0; c < V; ++c) {
        const float e = c0 + c < L ? exp_approx(t[c0 + c] - mx) : 0.f;
        t[c0 + c] = e;
        lane[c] += e;
      }
    for (int64_t w = V / 2; w >= 1; w /= 2)
      for (int64_t c = 0; c < w; ++c) lane[c] += lane[c + w];
    const float inv = 1.0f / lane[0];
    float* qi = q + i * Lp;
    for (int64_t c0 = 0; c0 < Lp; c0 += V)
      for (int64_t c = c0; c < c0 + V; ++c) qi[c] = t[c] * inv;
  }
}

#ifdef DSF_HAVE_AVX512_KERNELS
// One kernel's share of a block of the mean-field iteration.
struct MeanFieldKernel {
  const int32_t* off = nullptr;     // [N, D1] simplex corners
  const float* w = nullptr;         // [N, D1] barycentric weights
  int64_t D1 = 0;
  const float* blurred = nullptr;   // [M+1, Lp] this iteration's blurred buffer, or null: no message
  const float* post = nullptr;      // [N] normalisation after slicing
  const float* pre = nullptr;       // [N] normalisation before splatting
  float alpha = 0.f;                // the lattice's slice constant
  const float* diag = nullptr;      // [Lp] the compat's diagonal, or null if it is not diagonal
  const float* compat_t = nullptr;  // [Lp, Lp] the compat transposed: row m is its column m
  float* parts = nullptr;           // [M+1, Lp] this part's splat buffer, or null for no splat
};

// Prefetch p[0, count) into the nearest cache only (non-temporal), line by line.
template <typename T>
inline void prefetch_nta(const T* p, int64_t count) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < count * static_cast<int64_t>(sizeof(T)); b += 64) _mm_prefetch(c + b, _MM_HINT_NTA);
}

using MeanFieldBlockFn = void (*)(const MeanFieldKernel*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t,
                                  float*, bool);

namespace avx512 {

// exp_approx's range reduction and polynomial on sixteen (or, for a half register, eight) lanes, for
// x <= 0 (the softmax's arguments): 2^n is applied with scalef, which goes smoothly to 0 for very
// negative n, so no clamp and no exponent-field arithmetic are needed (padding labels of -1e30 give
// exactly 0). Both widths do the same operations lane by lane, so give the same bits.
DSF_AVX512 inline __m512 exp_nonpositive_ps(__m512 x) {
  const __m512 y = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, n);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int j = 1; j < kExp2Degree + 1; ++j) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[j]));
  return _mm512_scalef_ps(p, n);
}

DSF_AVX512 inline __m256 exp_nonpositive_ps(__m256 x) {
  const __m256 y = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(y, n);
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
  for (int j = 1; j < kExp2Degree + 1; ++j) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[j]));
  return _mm256_scalef_ps(p, n);
}

// One kernel's message subtracted from the logits (t, th) of pixel i: slice its blurred buffer at
// the pixel's D1 corners, scale by alpha * post, apply the compatibility. D > 0 fixes the number of
// corners at compile time (the loops unroll); D = 0 reads it from kk. Same operations, same order,
// so the same bits either way.
template <int NZ, bool TAIL, int D>
DSF_AVX512 __attribute__((always_inline)) inline void subtract_message(const MeanFieldKernel& kk, int64_t i, int64_t L,
                                                                       __m512* t, __m256& th, float* f) {
  constexpr int NA = NZ > 0 ? NZ : 1;
  constexpr int64_t Lp = 16 * NZ + (TAIL ? 8 : 0), T0 = 16 * NZ;
  const int64_t D1 = D > 0 ? D : kk.D1;
  const int32_t* o = kk.off + i * D1;
  const float* wt = kk.w + i * D1;
  __m512 acc[NA];
  __m256 acch = _mm256_setzero_ps();
  for (int v = 0; v < NZ; ++v) acc[v] = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int64_t r = 0; r < D1; ++r) {
    const float* row = kk.blurred + (static_cast<int64_t>(o[r]) + 1) * Lp;
    const __m512 wr = _mm512_set1_ps(wt[r]);
    for (int v = 0; v < NZ; ++v) acc[v] = _mm512_fmadd_ps(wr, _mm512_loadu_ps(row + 16 * v), acc[v]);
    if constexpr (TAIL) acch = _mm256_fmadd_ps(_mm512_castps512_ps256(wr), _mm256_loadu_ps(row + T0), acch);
  }
  const __m512 s = _mm512_set1_ps(kk.alpha * kk.post[i]);
  const __m256 sh = _mm512_castps512_ps256(s);
  if (kk.diag) {
    for (int v = 0; v < NZ; ++v)
      t[v] = _mm512_fnmadd_ps(_mm512_loadu_ps(kk.diag + 16 * v), _mm512_mul_ps(acc[v], s), t[v]);
    if constexpr (TAIL) th = _mm256_fnmadd_ps(_mm256_loadu_ps(kk.diag + T0), _mm256_mul_ps(acch, sh), th);
  } else {
    for (int v = 0; v < NZ; ++v) _mm512_store_ps(f + 16 * v, _mm512_mul_ps(acc[v], s));
    if constexpr (TAIL) _mm256_store_ps(f + T0, _mm256_mul_ps(acch, sh));
    for (int64_t m = 0; m < L; ++m) {
      const __m512 fm = _mm512_set1_ps(f[m]);
      const float* col = kk.compat_t + m * Lp;
      for (int v = 0; v < NZ; ++v) t[v] = _mm512_fnmadd_ps(fm, _mm512_loadu_ps(col + 16 * v), t[v]);
      if constexpr (TAIL) th = _mm256_fnmadd_ps(_mm512_castps512_ps256(fm), _mm256_loadu_ps(col + T0), th);
    }
  }
}

// Splat pixel i's Q (e, eh) times pre into one kernel's part buffer at its D1 corners (D as above).
template <int NZ, bool TAIL, int D>
DSF_AVX512 __attribute__((always_inline)) inline void splat_q(const MeanFieldKernel& kk, int64_t i, const __m512* e,
                                                              __m256 eh) {
  constexpr int NA = NZ > 0 ? NZ : 1;
  constexpr int64_t Lp = 16 * NZ + (TAIL ? 8 : 0), T0 = 16 * NZ;
  const int64_t D1 = D > 0 ? D : kk.D1;
  const int32_t* o = kk.off + i * D1;
  const float* wt = kk.w + i * D1;
  const __m512 s = _mm512_set1_ps(kk.pre[i]);
  __m512 sv[NA];
  for (int v = 0; v < NZ; ++v) sv[v] = _mm512_mul_ps(s, e[v]);
  const __m256 svh = _mm256_mul_ps(_mm512_castps512_ps256(s), eh);
#pragma GCC unroll 8
  for (int64_t r = 0; r < D1; ++r) {
    float* row = kk.parts + (static_cast<int64_t>(o[r]) + 1) * Lp;
    const __m512 wr = _mm512_set1_ps(wt[r]);
    for (int v = 0; v < NZ; ++v)
      _mm512_storeu_ps(row + 16 * v, _mm512_fmadd_ps(wr, sv[v], _mm512_loadu_ps(row + 16 * v)));
    if constexpr (TAIL)
      _mm256_storeu_ps(row + T0, _mm256_fmadd_ps(_mm512_castps512_ps256(wr), svh, _mm256_loadu_ps(row + T0)));
  }
}

// The sixteen horizontal reductions of rows[0..15] (each 16 floats) at once: lane p of the result
// is the max (kMax) or the sum of rows[p]'s lanes. The lanes are paired as _mm512_reduce_add_ps
// pairs them -- j with j + 8, then j + 4, j + 2, j + 1 -- so an add gives the same bits as that
// reduction of each row; but a tree over sixteen rows needs 45 shuffles and ops where sixteen
// single-row reductions need over a hundred, each a chain the next pixel waits on.
template <bool kMax>
DSF_AVX512 __attribute__((always_inline)) inline __m512 reduce16_rows(const float* rows) {
  const auto op = [](__m512 a, __m512 b) DSF_AVX512 { return kMax ? _mm512_max_ps(a, b) : _mm512_add_ps(a, b); };
  __m512 z[8], w[4], v[2];
  for (int k = 0; k < 8; ++k) {  // j with j + 8: two rows per register, one in each half
    const __m512 a = _mm512_load_ps(rows + 32 * k), b = _mm512_load_ps(rows + 32 * k + 16);
    z[k] = op(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int k = 0; k < 4; ++k)  // j with j + 4: a row in each quarter
    w[k] = op(_mm512_shuffle_f32x4(z[2 * k], z[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
              _mm512_shuffle_f32x4(z[2 * k], z[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int k = 0; k < 2; ++k)  // j with j + 2: two rows in each quarter
    v[k] = op(_mm512_shuffle_ps(w[2 * k], w[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
              _mm512_shuffle_ps(w[2 * k], w[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // j with j + 1: lane 4q + i now holds row 4i + q; put row p in lane p.
  const __m512 r = op(_mm512_shuffle_ps(v[0], v[1], _MM_SHUFFLE(2, 0, 2, 0)),
                      _mm512_shuffle_ps(v[0], v[1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
}

// The fused update of mean_field_update, sixteen pixels at a time, with the label axis in registers
// -- NZ full registers of 16 labels, then, if TAIL, one half register of 8 (Lp = 16 NZ + 8 TAIL) --
// and the next iteration's splat done in the same pass. Per tile of sixteen pixels:
//   1. each pixel's logits less its messages, kept in the tile, and their lane-wise max;
//   2. the sixteen maxima reduced together, then each pixel's exps and their lane-wise sum;
//   3. the sixteen sums reduced together and inverted with one vector division, then each pixel's
//      Q: splatted for the next iteration and, on the last pass, written out.
// One pixel's softmax is a chain of dependent steps (reduce, exp, reduce, divide, scale) too long
// for the core to overlap with the next pixel's; in tiles the reductions and the division are
// shared and the exps of different pixels run side by side: about an eighth faster (10 iterations
// on a VOC photo, one thread), same bits.
// The logits are unpadded rows of L floats (masked loads); Q goes straight into the op's output,
// sixteen pixels at a time: as rows if out_rows (point-major), else transposed (label-major).
//   logits [N, L]; out [N, L] (out_rows) or [L, N] written for pixels [begin, end), or null.
// The half register's lanes do what lanes 16 NZ .. 16 NZ + 7 of a full one would, and its max and
// sum enter the full-width reductions with the padding a full register would hold there (-1e30 for
// the max, exp(-1e30) = 0 for the sum), so Q has the same bits as with Lp rounded up to 16.
// DA, DB > 0: exactly two kernels, with DA and DB simplex corners (dense_crf's Gaussian and
// bilateral kernels). The kernels are then copied into locals, which no store through a row pointer
// can alias, so their fields stay in registers, and every corner loop unrolls: about a fifth faster
// than the general form (DA = DB = 0: any number of kernels and corners), with the same bits.
template <int NZ, bool TAIL, int DA, int DB>
DSF_AVX512 void mean_field_block(const MeanFieldKernel* ks, int64_t K, const float* __restrict logits, int64_t L,
                                 int64_t N, int64_t begin, int64_t end, float* __restrict out, bool out_rows) {
  constexpr bool kTwo = DA > 0 && DB > 0;
  constexpr int64_t Lp = 16 * NZ + (TAIL ? 8 : 0);
  constexpr int NA = NZ > 0 ? NZ : 1;  // array sizes (an unused register when NZ = 0)
  constexpr int64_t T0 = 16 * NZ;      // the half register's first label
  const MeanFieldKernel ka = ks[0], kb = kTwo ? ks[1] : ks[0];
  __mmask16 live[NA];
  for (int v = 0; v < NA; ++v) {
    const int64_t rem = L - 16 * v;
    live[v] = v >= NZ || rem <= 0 ? __mmask16(0)
              : rem >= 16        ? __mmask16(0xFFFF)
                                 : static_cast<__mmask16>((1u << rem) - 1u);
  }
  const int64_t tail_rem = L - T0;
  const __mmask8 live_tail =
      tail_rem >= 8 ? __mmask8(0xFF) : tail_rem <= 0 ? __mmask8(0) : static_cast<__mmask8>((1u << tail_rem) - 1u);
  alignas(64) float f[Lp];
  alignas(64) float tile[16 * Lp];     // [16 pixels, Lp]: logits less messages, then exps, then Q
  alignas(64) float lanes[16 * 16];    // [16 pixels, 16 lanes]: lane-wise maxima, then sums
  alignas(64) float top[16], inv[16];  // per pixel: the max, 1 / the sum
  const __m512 lowest = _mm512_set1_ps(-1e30f);  // padding: never the max, exps to 0
  const __m256 lowest_h = _mm256_set1_ps(-1e30f);
  for (int64_t i0 = begin; i0 < end; i0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, end - i0));
    // The tile after next's logits, corners and weights, fetched with a non-temporal hint: these
    // streams are read once a pass and should not push the vertex rows, read many times, out of the
    // L2 cache. About 3 % off dense_crf at 2 threads.
    if (i0 + 48 <= end) {
      prefetch_nta(logits + (i0 + 32) * L, 16 * L);
      for (int64_t k = 0; k < K; ++k) {
        prefetch_nta(ks[k].off + (i0 + 32) * ks[k].D1, 16 * ks[k].D1);
        prefetch_nta(ks[k].w + (i0 + 32) * ks[k].D1, 16 * ks[k].D1);
      }
    }
    // 1. Logits less messages (pass -1, with no blurred buffers, computes Q0: no messages yet).
    for (int p = 0; p < n; ++p) {
      const int64_t i = i0 + p;
      __m512 t[NA];
      __m256 th = lowest_h;
      for (int v = 0; v < NZ; ++v) t[v] = _mm512_mask_loadu_ps(lowest, live[v], logits + i * L + 16 * v);
      if constexpr (TAIL) th = _mm256_mask_loadu_ps(lowest_h, live_tail, logits + i * L + T0);
      if constexpr (kTwo) {
        if (ka.blurred) subtract_message<NZ, TAIL, DA>(ka, i, L, t, th, f);
        if (kb.blurred) subtract_message<NZ, TAIL, DB>(kb, i, L, t, th, f);
      } else {
        for (int64_t k = 0; k < K; ++k)
          if (ks[k].blurred) subtract_message<NZ, TAIL, 0>(ks[k], i, L, t, th, f);
      }
      // The half register joins the max in the lower half of a full one.
      __m512 mx = NZ > 0 ? t[0] : lowest;
      for (int v = 1; v < NZ; ++v) mx = _mm512_max_ps(mx, t[v]);
      if constexpr (TAIL) mx = _mm512_max_ps(mx, _mm512_insertf32x8(lowest, th, 0));
      float* row = tile + p * Lp;
      for (int v = 0; v < NZ; ++v) _mm512_storeu_ps(row + 16 * v, t[v]);
      if constexpr (TAIL) _mm256_storeu_ps(row + T0, th);
      _mm512_store_ps(lanes + 16 * p, mx);
    }
    for (int p = n; p < 16; ++p) _mm512_store_ps(lanes + 16 * p, lowest);  // rows past the end
    _mm512_store_ps(top, reduce16_rows<true>(lanes));
    // 2. Exps, and their lane-wise sums (the half register in the lower half).
    for (int p = 0; p < n; ++p) {
      float* row = tile + p * Lp;
      const __m512 tp = _mm512_set1_ps(top[p]);
      __m512 sum = _mm512_setzero_ps();
      for (int v = 0; v < NZ; ++v) {
        const __m512 e = exp_nonpositive_ps(_mm512_sub_ps(_mm512_loadu_ps(row + 16 * v), tp));
        _mm512_storeu_ps(row + 16 * v, e);
        sum = _mm512_add_ps(sum, e);
      }
      if constexpr (TAIL) {
        const __m256 eh = exp_nonpositive_ps(_mm256_sub_ps(_mm256_loadu_ps(row + T0), _mm512_castps512_ps256(tp)));
        _mm256_storeu_ps(row + T0, eh);
        sum = _mm512_add_ps(sum, _mm512_zextps256_ps512(eh));
      }
      _mm512_store_ps(lanes + 16 * p, sum);
    }
    for (int p = n; p < 16; ++p) _mm512_store_ps(lanes + 16 * p, _mm512_set1_ps(1.0f));
    _mm512_store_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.0f), reduce16_rows<false>(lanes)));
    // 3. Q: splatted for the next iteration, kept in the tile for the output on the last pass.
    for (int p = 0; p < n; ++p) {
      const int64_t i = i0 + p;
      float* row = tile + p * Lp;
      const __m512 s = _mm512_set1_ps(inv[p]);
      __m512 e[NA];
      __m256 eh = _mm256_setzero_ps();
      for (int v = 0; v < NZ; ++v) e[v] = _mm512_mul_ps(_mm512_loadu_ps(row + 16 * v), s);
      if constexpr (TAIL) eh = _mm256_mul_ps(_mm256_loadu_ps(row + T0), _mm512_castps512_ps256(s));
      if (out) {
        for (int v = 0; v < NZ; ++v) _mm512_storeu_ps(row + 16 * v, e[v]);
        if constexpr (TAIL) _mm256_storeu_ps(row + T0, eh);
      }
      if constexpr (kTwo) {
        if (ka.parts) splat_q<NZ, TAIL, DA>(ka, i, e, eh);
        if (kb.parts) splat_q<NZ, TAIL, DB>(kb, i, e, eh);
      } else {
        for (int64_t k = 0; k < K; ++k)
          if (ks[k].parts) splat_q<NZ, TAIL, 0>(ks[k], i, e, eh);
      }
    }
    if (out && out_rows) {
      for (int p = 0; p < n; ++p) std::memcpy(out + (i0 + p) * L, tile + p * Lp, L * sizeof(float));
    } else if (out) {
      for (int64_t c0 = 0; c0 < L; c0 += 16)
        transpose16(tile + c0, Lp, n, static_cast<int>(std::min<int64_t>(16, L - c0)), out + c0 * N + i0, N);
    }
  }
}

template <int DA, int DB>
MeanFieldBlockFn mean_field_block_width(int64_t Lp) {
  switch (Lp) {
    case 8: return &mean_field_block<0, true, DA, DB>;
    case 16: return &mean_field_block<1, false, DA, DB>;
    case 24: return &mean_field_block<1, true, DA, DB>;
    case 32: return &mean_field_block<2, false, DA, DB>;
    case 40: return &mean_field_block<2, true, DA, DB>;
    case 48: return &mean_field_block<3, false, DA, DB>;
    case 56: return &mean_field_block<3, true, DA, DB>;
    case 64: return &mean_field_block<4, false, DA, DB>;
    default: return nullptr;
  }
}

// The register-resident update for Lp = 8, 16, ..., 64 labels (a multiple of 8), or null; the
// form with fixed corners for dense_crf's kernel pairs: image (x, y) and (x, y, r, g, b), video
// (x, y, t) and (x, y, t, r, g, b). Kernel corner counts are D1s.
inline MeanFieldBlockFn mean_field_block_for(int64_t Lp, const std::vector<int64_t>& D1s) {
  if (!cpu_has_avx512()) return nullptr;
  if (D1s.size() == 2 && D1s[0] == 3 && D1s[1] == 6) return mean_field_block_width<3, 6>(Lp);
  if (D1s.size() == 2 && D1s[0] == 4 && D1s[1] == 7) return mean_field_block_width<4, 7>(Lp);
  return mean_field_block_width<0, 0>(Lp);
}

}  // namespace avx512
#endif

#ifdef DSF_HAVE_AVX512_KERNELS
namespace avx2 {

// The AVX2 form of avx512::mean_field_block, for machines without AVX-512: eight labels a register
// (Lp = 8 NV, up to 64), tiles of eight pixels, the same three steps (see there). Its sums run in
// another order than the AVX-512 kernel's (eight lanes, not sixteen) and its exp clamps as
// exp_approx does, so Q agrees with the other paths to rounding, not to the bit; it is deterministic
// and independent of the thread count like them.

// exp_approx on eight lanes for x <= 0 (the softmax's arguments), in the same steps (the polynomial
// with fused multiply-adds).
DSF_AVX2 inline __m256 exp_nonpositive_ps(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 y = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(y, n);
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
  for (int j = 1; j < kExp2Degree + 1; ++j) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[j]));
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}

// The eight horizontal reductions of rows[0..7] (each 8 floats) at once: lane p of the result is the
// max (kMax) or the sum of rows[p]'s lanes, pairing lane j with j + 4, then j + 2, then j + 1.
template <bool kMax>
DSF_AVX2 __attribute__((always_inline)) inline __m256 reduce8_rows(const float* rows) {
  const auto op = [](__m256 a, __m256 b) DSF_AVX2 { return kMax ? _mm256_max_ps(a, b) : _mm256_add_ps(a, b); };
  __m256 z[4], w[2];
  for (int k = 0; k < 4; ++k) {  // j with j + 4: row 2k in the low half, row 2k + 1 in the high half
    const __m256 a = _mm256_load_ps(rows + 16 * k), b = _mm256_load_ps(rows + 16 * k + 8);
    z[k] = op(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  }
  for (int k = 0; k < 2; ++k)  // j with j + 2: per half, two lanes of each of two rows
    w[k] = op(_mm256_shuffle_ps(z[2 * k], z[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
              _mm256_shuffle_ps(z[2 * k], z[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // j with j + 1: lanes now hold rows 0, 2, 4, 6 (low half) and 1, 3, 5, 7 (high half).
  const __m256 r = op(_mm256_shuffle_ps(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                      _mm256_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm256_permutevar8x32_ps(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// One kernel's message subtracted from pixel i's logits t (NV registers); D > 0 fixes the corners.
template <int NV, int D>
DSF_AVX2 __attribute__((always_inline)) inline void subtract_message(const MeanFieldKernel& kk, int64_t i, int64_t L,
                                                                     __m256* t, float* f) {
  constexpr int64_t Lp = 8 * NV;
  const int64_t D1 = D > 0 ? D : kk.D1;
  const int32_t* o = kk.off + i * D1;
  const float* wt = kk.w + i * D1;
  __m256 acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = _mm256_setzero_ps();
#pragma GCC unroll 8
  for (int64_t r = 0; r < D1; ++r) {
    const float* row = kk.blurred + (static_cast<int64_t>(o[r]) + 1) * Lp;
    const __m256 wr = _mm256_set1_ps(wt[r]);
    for (int v = 0; v < NV; ++v) acc[v] = _mm256_fmadd_ps(wr, _mm256_loadu_ps(row + 8 * v), acc[v]);
  }
  const __m256 s = _mm256_set1_ps(kk.alpha * kk.post[i]);
  if (kk.diag) {
    for (int v = 0; v < NV; ++v)
      t[v] = _mm256_fnmadd_ps(_mm256_loadu_ps(kk.diag + 8 * v), _mm256_mul_ps(acc[v], s), t[v]);
  } else {
    for (int v = 0; v < NV; ++v) _mm256_store_ps(f + 8 * v, _mm256_mul_ps(acc[v], s));
    for (int64_t m = 0; m < L; ++m) {
      const __m256 fm = _mm256_set1_ps(f[m]);
      const float* col = kk.compat_t + m * Lp;
      for (int v = 0; v < NV; ++v) t[v] = _mm256_fnmadd_ps(fm, _mm256_loadu_ps(col + 8 * v), t[v]);
    }
  }
}

// Splat pixel i's Q (e) times pre into one kernel's part buffer at its corners (D as above).
template <int NV, int D>
DSF_AVX2 __attribute__((always_inline)) inline void splat_q(const MeanFieldKernel& kk, int64_t i, const __m256* e) {
  constexpr int64_t Lp = 8 * NV;
  const int64_t D1 = D > 0 ? D : kk.D1;
  const int32_t* o = kk.off + i * D1;
  const float* wt = kk.w + i * D1;
  const __m256 s = _mm256_set1_ps(kk.pre[i]);
  __m256 sv[NV];
  for (int v = 0; v < NV; ++v) sv[v] = _mm256_mul_ps(s, e[v]);
#pragma GCC unroll 8
  for (int64_t r = 0; r < D1; ++r) {
    float* row = kk.parts + (static_cast<int64_t>(o[r]) + 1) * Lp;
    const __m256 wr = _mm256_set1_ps(wt[r]);
    for (int v = 0; v < NV; ++v)
      _mm256_storeu_ps(row + 8 * v, _mm256_fmadd_ps(wr, sv[v], _mm256_loadu_ps(row + 8 * v)));
  }
}

// avx512::mean_field_block with eight-lane registers (same arguments; DA, DB as there).
template <int NV, int DA, int DB>
DSF_AVX2 void mean_field_block(const MeanFieldKernel* ks, int64_t K, const float* __restrict logits, int64_t L,
                               int64_t N, int64_t begin, int64_t end, float* __restrict out, bool out_rows) {
  constexpr bool kTwo = DA > 0 && DB > 0;
  constexpr int64_t Lp = 8 * NV;
  const MeanFieldKernel ka = ks[0], kb = kTwo ? ks[1] : ks[0];
  const __m256i live = lane_mask(L - 8 * (NV - 1));  // the last register's labels
  alignas(32) float f[Lp];
  alignas(32) float tile[8 * Lp];   // [8 pixels, Lp]: logits less messages, then exps, then Q
  alignas(32) float lanes[8 * 8];   // [8 pixels, 8 lanes]: lane-wise maxima, then sums
  alignas(32) float top[8], inv[8];  // per pixel: the max, 1 / the sum
  const __m256 lowest = _mm256_set1_ps(-1e30f);  // padding: never the max
  for (int64_t i0 = begin; i0 < end; i0 += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, end - i0));
    if (i0 + 24 <= end) {  // the tile after next's streams, as in the AVX-512 kernel
      prefetch_nta(logits + (i0 + 16) * L, 8 * L);
      for (int64_t k = 0; k < K; ++k) {
        prefetch_nta(ks[k].off + (i0 + 16) * ks[k].D1, 8 * ks[k].D1);
        prefetch_nta(ks[k].w + (i0 + 16) * ks[k].D1, 8 * ks[k].D1);
      }
    }
    // 1. Logits less messages, and each pixel's lane-wise max.
    for (int p = 0; p < n; ++p) {
      const int64_t i = i0 + p;
      __m256 t[NV];
      // Lp rounds L up to 8, so only the last register can be partial.
      for (int v = 0; v + 1 < NV; ++v) t[v] = _mm256_loadu_ps(logits + i * L + 8 * v);
      t[NV - 1] = _mm256_blendv_ps(lowest, _mm256_maskload_ps(logits + i * L + 8 * (NV - 1), live),
                                   _mm256_castsi256_ps(live));
      if constexpr (kTwo) {
        if (ka.blurred) subtract_message<NV, DA>(ka, i, L, t, f);
        if (kb.blurred) subtract_message<NV, DB>(kb, i, L, t, f);
      } else {
        for (int64_t k = 0; k < K; ++k)
          if (ks[k].blurred) subtract_message<NV, 0>(ks[k], i, L, t, f);
      }
      __m256 mx = t[0];
      for (int v = 1; v < NV; ++v) mx = _mm256_max_ps(mx, t[v]);
      for (int v = 0; v < NV; ++v) _mm256_store_ps(tile + p * Lp + 8 * v, t[v]);
      _mm256_store_ps(lanes + 8 * p, mx);
    }
    for (int p = n; p < 8; ++p) _mm256_store_ps(lanes + 8 * p, lowest);  // rows past the end
    _mm256_store_ps(top, reduce8_rows<true>(lanes));
    // 2. Exps (padding labels set to 0: the clamp leaves them a tiny positive), lane-wise sums.
    for (int p = 0; p < n; ++p) {
      float* row = tile + p * Lp;
      const __m256 tp = _mm256_set1_ps(top[p]);
      __m256 sum = _mm256_setzero_ps();
      for (int v = 0; v < NV; ++v) {
        __m256 e = exp_nonpositive_ps(_mm256_sub_ps(_mm256_load_ps(row + 8 * v), tp));
        if (v + 1 == NV) e = _mm256_and_ps(e, _mm256_castsi256_ps(live));
        _mm256_store_ps(row + 8 * v, e);
        sum = _mm256_add_ps(sum, e);
      }
      _mm256_store_ps(lanes + 8 * p, sum);
    }
    for (int p = n; p < 8; ++p) _mm256_store_ps(lanes + 8 * p, _mm256_set1_ps(1.0f));
    _mm256_store_ps(inv, _mm256_div_ps(_mm256_set1_ps(1.0f), reduce8_rows<false>(lanes)));
    // 3. Q: splatted for the next iteration, kept in the tile for the output on the last pass.
    for (int p = 0; p < n; ++p) {
      const int64_t i = i0 + p;
      float* row = tile + p * Lp;
      const __m256 s = _mm256_set1_ps(inv[p]);
      __m256 e[NV];
      for (int v = 0; v < NV; ++v) e[v] = _mm256_mul_ps(_mm256_load_ps(row + 8 * v), s);
      if (out)
        for (int v = 0; v < NV; ++v) _mm256_store_ps(row + 8 * v, e[v]);
      if constexpr (kTwo) {
        if (ka.parts) splat_q<NV, DA>(ka, i, e);
        if (kb.parts) splat_q<NV, DB>(kb, i, e);
      } else {
        for (int64_t k = 0; k < K; ++k)
          if (ks[k].parts) splat_q<NV, 0>(ks[k], i, e);
      }
    }
    if (out && out_rows) {
      for (int p = 0; p < n; ++p) std::memcpy(out + (i0 + p) * L, tile + p * Lp, L * sizeof(float));
    } else if (out) {
      for (int64_t c0 = 0; c0 < L; c0 += 8)
        transpose8(tile + c0, Lp, n, static_cast<int>(std::min<int64_t>(8, L - c0)), out + c0 * N + i0, N);
    }
  }
}

template <int DA, int DB>
MeanFieldBlockFn mean_field_block_width(int64_t Lp) {
  switch (Lp) {
    case 8: return &mean_field_block<1, DA, DB>;
    case 16: return &mean_field_block<2, DA, DB>;
    case 24: return &mean_field_block<3, DA, DB>;
    case 32: return &mean_field_block<4, DA, DB>;
    case 40: return &mean_field_block<5, DA, DB>;
    case 48: return &mean_field_block<6, DA, DB>;
    case 56: return &mean_field_block<7, DA, DB>;
    case 64: return &mean_field_block<8, DA, DB>;
    default: return nullptr;
  }
}

// As avx512::mean_field_block_for, when the machine has AVX2 (and FMA).
inline MeanFieldBlockFn mean_field_block_for(int64_t Lp, const std::vector<int64_t>& D1s) {
  if (!cpu_has_avx2()) return nullptr;
  if (D1s.size() == 2 && D1s[0] == 3 && D1s[1] == 6) return mean_field_block_width<3, 6>(Lp);
  if (D1s.size() == 2 && D1s[0] == 4 && D1s[1] == 7) return mean_field_block_width<4, 7>(Lp);
  return mean_field_block_width<0, 0>(Lp);
}

}  // namespace avx2
#endif

// Whether every float of x[0, n) is finite: NaN's and Inf's exponent bits are all ones, and only
// those carry into bit 31 when one more is added to the exponent field (integer ops: they vectorise).
DSF_MULTIVERSION bool all_finite(const float* __restrict x, int64_t n) {
  uint32_t carry = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof(bits));
    carry |= (bits & 0x7f800000u) + 0x00800000u;
  }
  return (carry & 0x80000000u) == 0;
}

// Mean-field inference of one point set with K Gaussian kernels, one pass over the points per
// iteration on top of each kernel's splat and blur. logits [L, N]: label-major (contiguous, a
// unary's own layout) or point_major (the transpose of a contiguous [N, L], pydensecrf's); lats:
// the K lattices, validated; pre / post [K, N] per-point normalisation before splatting / after
// slicing; compat [K, L, L], subtracted (Potts of weight w is -w * I). Writes Q [L, N] to o, in the
// logits' layout. Inside a parallel region (one point set per thread) every step runs on the
// calling thread alone, with the same bits.
void mean_field_points(const float* lg, bool point_major, int64_t L, int64_t N, const std::vector<LatticeView>& lats,
                       const float* pre_p, const float* post_p, const float* cp, int64_t iterations, float* o) {
  const int64_t K = static_cast<int64_t>(lats.size());
#ifdef DSF_HAVE_AVX512_KERNELS
  // Labels held in registers through the whole update when they fit in up to four AVX-512 vectors
  // (eight AVX2 ones); the label axis is then padded to 8 floats.
  std::vector<int64_t> corners;
  for (const LatticeView& lat : lats) corners.push_back(lat.D1);
  const int64_t L8 = (L + kBlock<float> - 1) / kBlock<float> * kBlock<float>;
  const bool wide = cpu_has_avx512();
  const MeanFieldBlockFn fast_block =
      wide ? avx512::mean_field_block_for(L8, corners) : avx2::mean_field_block_for(L8, corners);
#else
  const bool fast_block = false;
#endif
  // Whole vector blocks here: the portable update has no small-width path and reduces across full
  // registers of lanes.
  const int64_t unit = fast_block ? kBlock<float> : kLanes<float>;
  const int64_t Lp = (L + unit - 1) / unit * unit;
  // Zero-padded [K, Lp, Lp] compatibility, and which kernels are diagonal (Potts).
  std::vector<float> cpad(K * Lp * Lp, 0.f), cdiag(K * Lp, 0.f);
  std::vector<char> diag(K, 1);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t l = 0; l < L; ++l)
      for (int64_t m = 0; m < L; ++m) {
        const float v = cp[(k * L + l) * L + m];
        cpad[(k * Lp + l) * Lp + m] = v;
        if (l == m) cdiag[k * Lp + l] = v;
        if (l != m && v != 0.f) diag[k] = 0;
      }
  // Point-major logits and Q, rows of ls floats: unpadded for the register-resident update, else
  // padded to Lp with logits of -1e30, which never win the max and exp to 0.
  const int64_t ls = fast_block ? L : Lp;
  // Point-major logits given unpadded are used as they are.
  const bool own_rows = !(point_major && ls == L);
  Tensor lp = own_rows ? empty_output({N, ls}, at::kFloat, at::MemoryFormat::Contiguous) : Tensor();
  // Q [N, Lp] of the portable path (the register-resident one writes out directly).
  Tensor q = fast_block ? Tensor() : empty_output({N, ls}, at::kFloat, at::MemoryFormat::Contiguous);
  const float* lpp = own_rows ? lp.const_data_ptr<float>() : lg;
  float* qp = q.defined() ? q.mutable_data_ptr<float>() : nullptr;
  // The logits are checked for NaN and Inf where they are first read: in the copy to rows (the block
  // just written, from L1), or in a pass of their own when they are used in place.
  std::atomic<bool> finite{true};
  if (!own_rows) {
    at::parallel_for(0, N, 8192, [&](int64_t i0, int64_t i1) {
      if (!all_finite(lg + i0 * L, (i1 - i0) * L)) finite = false;
    });
  } else {
    float* rows = lp.mutable_data_ptr<float>();
    // Label-major logits are transposed in blocks of 64 points, so each label's read is a contiguous
    // run and the written rows stay in L1; with AVX-512 (AVX2), in 16 x 16 (8 x 8) blocks in registers.
    at::parallel_for(0, (N + 63) / 64, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * 64, i1 = std::min(N, i0 + 64);
        if (point_major) {  // padded copies of the rows
          for (int64_t i = i0; i < i1; ++i)
            for (int64_t c = 0; c < ls; ++c) rows[i * ls + c] = c < L ? lg[i * L + c] : -1e30f;
        } else {
#ifdef DSF_HAVE_AVX512_KERNELS
          if (fast_block) {  // unpadded rows (ls = L), in 16 x 16 (AVX-512) or 8 x 8 blocks
            const int64_t tb = wide ? 16 : 8;
            const auto transpose = wide ? &avx512::transpose16 : &avx2::transpose8;
            // With at least tb labels the last block of labels ends at L and overlaps the one before
            // (those labels are written twice, the same values): every block then fills whole
            // registers, and writes its rows with plain stores, not masked ones (microcoded and slow
            // on AMD cores; with 21 labels they were a third of the blocks).
            for (int64_t j0 = i0; j0 < i1; j0 += tb)
              for (int64_t c0 = 0; c0 < L; c0 += tb) {
                const int64_t c = L >= tb ? std::min(c0, L - tb) : c0;
                transpose(lg + c * N + j0, N, static_cast<int>(std::min(tb, L - c)),
                          static_cast<int>(std::min(tb, i1 - j0)), rows + j0 * ls + c, ls);
              }
          } else
#endif
          {
            for (int64_t c = 0; c < ls; ++c)
              for (int64_t i = i0; i < i1; ++i) rows[i * ls + c] = c < L ? lg[c * N + i] : -1e30f;
          }
        }
        if (!all_finite(rows + i0 * ls, (i1 - i0) * ls)) finite = false;  // padding is finite
      }
    });
  }
  TORCH_CHECK_VALUE(finite.load(), "unary must be finite: the logits hold NaN or Inf");
  std::vector<VertexBuffers<float>> vbufs;
  for (int64_t k = 0; k < K && iterations > 0; ++k) vbufs.emplace_back(lats[k], Lp, at::kFloat);
#ifdef DSF_HAVE_AVX512_KERNELS
  std::vector<float> ctrans(K * Lp * Lp, 0.f);  // [K, Lp, Lp] each compat transposed
  std::vector<MeanFieldKernel> fast_kernels(K);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t l = 0; l < L; ++l)
      for (int64_t m = 0; m < L; ++m) ctrans[(k * Lp + m) * Lp + l] = cpad[(k * Lp + l) * Lp + m];
    MeanFieldKernel& kk = fast_kernels[k];
    kk.off = lats[k].off;
    kk.w = lats[k].w;
    kk.D1 = lats[k].D1;
    kk.post = post_p + k * N;
    kk.pre = pre_p + k * N;
    kk.alpha = lattice::slice_alpha(static_cast<int>(lats[k].D1 - 1));
    kk.diag = diag[k] ? cdiag.data() + k * Lp : nullptr;
    kk.compat_t = ctrans.data() + k * Lp * Lp;
  }
#endif
  // Pass -1 computes Q0 = softmax(logits) (the update with no messages); pass it >= 0 is iteration
  // it. Every pass but the last also splats its Q for the next one.
  const std::vector<LatticeView> no_lats;
  std::vector<const float*> blurred(K, nullptr);
  std::vector<const LatticeView*> lat_ptrs;
  std::vector<VertexBuffers<float>*> buf_ptrs;
  for (int64_t k = 0; k < K && iterations > 0; ++k) {
    lat_ptrs.push_back(&lats[k]);
    buf_ptrs.push_back(&vbufs[k]);
  }
  const BlurPlan plan = plan_blur(lat_ptrs.data(), static_cast<int64_t>(lat_ptrs.size()), false, free_threads());
  for (int64_t it = -1; it < iterations; ++it) {
    const bool slice = it >= 0;
    if (slice) reduce_blur_all<float>(lat_ptrs.data(), buf_ptrs.data(), K, false, plan, blurred.data());
    // One task per splat part: update a block of pixels, then splat the new Q rows (still in
    // cache) into that part for the next iteration. The slices read the blurred buffers and the
    // splats write the part buffers, so nothing is read and written at once; each part receives
    // its pixels in order, as in splat_parts, so the sums are the same bits.
    const bool splat_next = it + 1 < iterations;
    parallel_owned(kSplatParts, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
#ifdef DSF_HAVE_AVX512_KERNELS
        if (fast_block) {
          std::vector<MeanFieldKernel> ks(K);
          for (int64_t k = 0; k < K; ++k) {
            ks[k] = fast_kernels[k];
            ks[k].blurred = blurred[k];
            ks[k].parts = splat_next ? vbufs[k].parts.mutable_data_ptr<float>() + p * vbufs[k].rows * Lp : nullptr;
          }
          fast_block(ks.data(), K, lpp, L, N, part_begin(p, N), part_begin(p + 1, N), splat_next ? nullptr : o,
                     point_major);
          continue;
        }
#endif
        const int64_t hi = part_begin(p + 1, N);
        for (int64_t lo = part_begin(p, N); lo < hi; lo += 256) {
          const int64_t end = std::min(hi, lo + 256);
          mean_field_update(slice ? lats : no_lats, blurred, post_p, cpad.data(), cdiag.data(),
                            diag, lpp, N, L, Lp, lo, end, qp);
          for (int64_t k = 0; k < K && splat_next; ++k)
            splat_pixels<float>(qp, pre_p + k * N, lats[k].off, lats[k].w, lats[k].D1, Lp, lo, end,
                                vbufs[k].parts.mutable_data_ptr<float>() + p * vbufs[k].rows * Lp);
        }
      }
    });
  }
  if (fast_block) return;  // written by the last pass
  if (point_major) {
    copy_rows<float>(qp, ls, o, L, N);
    return;
  }
  at::parallel_for(0, (N + 63) / 64, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * 64, i1 = std::min(N, i0 + 64);
      for (int64_t l = 0; l < L; ++l)
        for (int64_t i = i0; i < i1; ++i) o[l * N + i] = qp[i * ls + l];
    }
  });
}

// The checks of the mean-field ops' arguments: logits [L, N] (per image), lattices (3 tensors per
// kernel), pre / post [K, N] float32 ([B, K, N] for a batch of B > 0 images), compat [K, L, L]
// float32. Returns each image's K lattices, validated.
std::vector<std::vector<LatticeView>> check_mean_field(int64_t B, int64_t L, int64_t N, at::TensorList lattices,
                                                       const Tensor& pre, const Tensor& post, const Tensor& compat,
                                                       int64_t iterations) {
  const int64_t images = std::max<int64_t>(B, 1);
  TORCH_CHECK_VALUE(lattices.size() % (3 * images) == 0 && !lattices.empty(), "lattices must hold 3 tensors per kernel",
                    B > 0 ? " per image" : "", ", got ", lattices.size());
  TORCH_CHECK_VALUE(iterations >= 0, "iterations must be non-negative, got ", iterations);
  const int64_t K = static_cast<int64_t>(lattices.size()) / (3 * images);
  const std::vector<int64_t> sizes = B > 0 ? std::vector<int64_t>{B, K, N} : std::vector<int64_t>{K, N};
  const char* shape = B > 0 ? "[B, K, N]" : "[K, N]";
  TORCH_CHECK_VALUE(pre.sizes() == at::IntArrayRef(sizes) && pre.scalar_type() == at::kFloat,
                    "pre must be a float32 ", shape, " tensor");
  TORCH_CHECK_VALUE(post.sizes() == at::IntArrayRef(sizes) && post.scalar_type() == at::kFloat,
                    "post must be a float32 ", shape, " tensor");
  TORCH_CHECK_VALUE(compat.sizes() == at::IntArrayRef({K, L, L}) && compat.scalar_type() == at::kFloat,
                    "compat must be a float32 [K, L, L] tensor");
  std::vector<std::vector<LatticeView>> lats(images);
  for (int64_t b = 0; b < images; ++b)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t t = 3 * (b * K + k);
      lats[b].push_back(view_lattice(lattices[t], lattices[t + 1], lattices[t + 2]));
      TORCH_CHECK_VALUE(lats[b].back().N == N, "lattice ", k, B > 0 ? " of image " + std::to_string(b) : "", " has ",
                        lats[b].back().N, " points, logits have ", N);
    }
  return lats;
}

// Whether logits [..., L, N] are point-major: the transpose of a contiguous [..., N, L].
bool point_major_layout(const Tensor& logits) {
  return !logits.is_contiguous() && logits.transpose(-2, -1).is_contiguous();
}

// Q shaped like logits [..., L, N]: contiguous, or (point_major) the transpose of a contiguous [..., N, L].
Tensor empty_q(const Tensor& logits, bool point_major) {
  std::vector<int64_t> sizes = logits.sizes().vec();
  if (!point_major) return empty_output(sizes, at::kFloat, at::MemoryFormat::Contiguous);
  std::swap(sizes[sizes.size() - 2], sizes[sizes.size() - 1]);
  return empty_output(sizes, at::kFloat, at::MemoryFormat::Contiguous).transpose(-2, -1);
}

// logits [L, N] float32, label-major or point-major (see mean_field_points); Q [L, N] in the same layout.
Tensor dense_crf_mean_field_cpu(const Tensor& logits_in, at::TensorList lattices, const Tensor& pre_in,
                                const Tensor& post_in, const Tensor& compat_in, int64_t iterations) {
  TORCH_CHECK_VALUE(logits_in.dim() == 2 && logits_in.scalar_type() == at::kFloat,
                    "logits must be a float32 [L, N] tensor");
  const int64_t L = logits_in.size(0), N = logits_in.size(1);
  const std::vector<LatticeView> lats = check_mean_field(0, L, N, lattices, pre_in, post_in, compat_in, iterations)[0];
  const bool point_major = point_major_layout(logits_in);
  const Tensor logits = point_major ? logits_in : logits_in.contiguous(), pre = pre_in.contiguous(),
               post = post_in.contiguous(), compat = compat_in.contiguous();
  Tensor out = empty_q(logits_in, point_major);
  mean_field_points(logits.const_data_ptr<float>(), point_major, L, N, lats, pre.const_data_ptr<float>(),
                    post.const_data_ptr<float>(), compat.const_data_ptr<float>(), iterations,
                    out.mutable_data_ptr<float>());
  return out;
}

// B point sets (a batch of images) at once: logits [B, L, N] float32; lattices: 3 tensors per kernel
// per image, image-major (image b's kernel k at 3 (b K + k)); pre / post [B, K, N]; compat [K, L, L],
// shared. Returns Q [B, L, N] in the logits' layout, each image's exactly what dense_crf_mean_field
// gives it.
// Images run in rounds of one per thread, each on its thread alone: no barrier inside an image's
// ~130 parallel steps, and each core's caches hold its own image's vertex rows. Images left over
// (B not a multiple of the thread count) run one at a time on all threads.
Tensor dense_crf_mean_field_batch_cpu(const Tensor& logits_in, at::TensorList lattices, const Tensor& pre_in,
                                      const Tensor& post_in, const Tensor& compat_in, int64_t iterations) {
  TORCH_CHECK_VALUE(logits_in.dim() == 3 && logits_in.scalar_type() == at::kFloat,
                    "logits must be a float32 [B, L, N] tensor");
  const int64_t B = logits_in.size(0), L = logits_in.size(1), N = logits_in.size(2);
  if (B == 0) {
    TORCH_CHECK_VALUE(iterations >= 0, "iterations must be non-negative, got ", iterations);
    return empty_output({0, L, N}, at::kFloat, at::MemoryFormat::Contiguous);
  }
  const std::vector<std::vector<LatticeView>> lats =
      check_mean_field(B, L, N, lattices, pre_in, post_in, compat_in, iterations);
  const int64_t K = static_cast<int64_t>(lats[0].size());
  // Each image label-major, or each point-major (the [B, L, N] transpose of a contiguous [B, N, L]:
  // a channels_last unary); Q comes back in the same layout.
  const bool point_major = point_major_layout(logits_in);
  const Tensor logits = point_major ? logits_in : logits_in.contiguous(), pre = pre_in.contiguous(),
               post = post_in.contiguous(), compat = compat_in.contiguous();
  Tensor out = empty_q(logits_in, point_major);
  const float* lg = logits.const_data_ptr<float>();
  const float *pre_p = pre.const_data_ptr<float>(), *post_p = post.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  auto image = [&](int64_t b) {
    mean_field_points(lg + b * L * N, point_major, L, N, lats[b], pre_p + b * K * N, post_p + b * K * N,
                      compat.const_data_ptr<float>(), iterations, o + b * L * N);
  };
  const int64_t threads = free_threads();
  const int64_t together = threads > 1 ? B / threads * threads : 0;
  parallel_blocks(together, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) image(b);
  });
  for (int64_t b = together; b < B; ++b) image(b);
  return out;
}

}  // namespace
}  // namespace deconvseg

TORCH_LIBRARY_IMPL(deconvseg, CPU, m) {
  m.impl("permutohedral_lattice", &deconvseg::permutohedral_lattice_cpu);
  m.impl("permutohedral_filter", &deconvseg::permutohedral_filter_cpu);
  m.impl("permutohedral_splat_blur", &deconvseg::permutohedral_splat_blur_cpu);
  m.impl("dense_crf_mean_field", &deconvseg::dense_crf_mean_field_cpu);
  m.impl("dense_crf_mean_field_batch", &deconvseg::dense_crf_mean_field_batch_cpu);
}
