// Max-pooling with switches, max-unpooling and both backwards on the CPU.
//
// Kernels see exactly two layouts: contiguous NCHW and contiguous NHWC (channels_last); the op
// entry points make other inputs contiguous in the layout torch would pick for the output.
//  * NCHW kernels work one output row at a time: the window taps become unit- or two-strided sweeps
//    along the row, which the compiler vectorises, and a row of maxima stays in L1.
//  * NHWC kernels work one pixel at a time, vectorised along the channels.
//  * Unpooling and the pool backward are "scatters" of pooled values to their switches. When windows
//    do not overlap, every pooled row owns a band of output rows, so a task zeroes its band and fills
//    it in one pass (each output byte is written once, and no two tasks touch the same band).
//    Overlapping windows, and flat switches that leave their window, go through a sequential
//    per-plane loop instead: torch's own order, so the last writer wins and sums are added in
//    window order. Both paths are deterministic for any thread count.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "huge_pages.h"
#include "pooling_geometry.h"
#include "simd.h"

namespace deconvseg {
namespace {

using at::Tensor;


struct Geometry {
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
};

SwitchFormat parse_format(c10::string_view name) {
  if (name == "flat") return SwitchFormat::Flat;
  if (name == "window") return SwitchFormat::Window;
  if (name == "packed") return SwitchFormat::Packed;
  TORCH_CHECK_VALUE(false, "index_format must be one of 'flat', 'window', 'packed', got '",
                    std::string(name), "'");
}

Geometry check_geometry(at::IntArrayRef kernel_size, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, SwitchFormat fmt) {
  TORCH_CHECK_VALUE(kernel_size.size() == 2, "kernel_size must have 2 elements");
  TORCH_CHECK_VALUE(stride.size() == 2, "stride must have 2 elements");
  TORCH_CHECK_VALUE(padding.size() == 2, "padding must have 2 elements");
  TORCH_CHECK_VALUE(dilation.size() == 2, "dilation must have 2 elements");
  Geometry g{kernel_size[0], kernel_size[1], stride[0], stride[1],
             padding[0],     padding[1],     dilation[0], dilation[1]};
  TORCH_CHECK_VALUE(g.kh > 0 && g.kw > 0, "kernel_size must be positive, got (", g.kh, ", ", g.kw, ")");
  TORCH_CHECK_VALUE(g.sh > 0 && g.sw > 0, "stride must be positive, got (", g.sh, ", ", g.sw, ")");
  TORCH_CHECK_VALUE(g.dh > 0 && g.dw > 0, "dilation must be positive, got (", g.dh, ", ", g.dw, ")");
  TORCH_CHECK_VALUE(g.ph >= 0 && g.pw >= 0, "padding must be non-negative, got (", g.ph, ", ", g.pw, ")");
  TORCH_CHECK_VALUE(g.ph <= g.kh / 2 && g.pw <= g.kw / 2,
                    "padding should be at most half of kernel_size, got padding (", g.ph, ", ", g.pw,
                    ") for kernel_size (", g.kh, ", ", g.kw, ")");
  if (fmt == SwitchFormat::Window) {
    TORCH_CHECK_VALUE(g.kh * g.kw <= 256, "index_format='window' stores a uint8 window position and "
                      "needs kernel_size with at most 256 taps (16x16), got (", g.kh, ", ", g.kw, ")");
  }
  if (fmt == SwitchFormat::Packed) {
    TORCH_CHECK_VALUE(g.kh == 2 && g.kw == 2,
                      "index_format='packed' stores 2 bits per switch and needs kernel_size (2, 2), got (",
                      g.kh, ", ", g.kw, ")");
  }
  return g;
}

void check_float_input(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be a 4-D [N, C, H, W] tensor, got ", t.dim(), " dims");
  const auto st = t.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                    name, " must be float32, float64, float16 or bfloat16, got ", st);
}

at::ScalarType switch_dtype(SwitchFormat fmt) {
  return fmt == SwitchFormat::Flat ? at::kLong : at::kByte;
}

std::vector<int64_t> switch_shape(int64_t n, int64_t c, int64_t h, int64_t w, SwitchFormat fmt) {
  return {n, c, h, fmt == SwitchFormat::Packed ? packed_width(w) : w};
}

void check_indices(const Tensor& indices, const Tensor& ref, SwitchFormat fmt, int64_t hp, int64_t wp) {
  TORCH_CHECK_VALUE(indices.scalar_type() == switch_dtype(fmt), "indices must be ",
                    fmt == SwitchFormat::Flat ? "int64" : "uint8", " for index_format='",
                    fmt == SwitchFormat::Flat ? "flat" : (fmt == SwitchFormat::Window ? "window" : "packed"),
                    "', got ", indices.scalar_type());
  const auto want = switch_shape(ref.size(0), ref.size(1), hp, wp, fmt);
  TORCH_CHECK_VALUE(indices.sizes() == at::IntArrayRef(want), "indices must have shape ", at::IntArrayRef(want),
                    " to match the pooled tensor, got ", indices.sizes());
}

// Position of each window tap relative to the window's first tap: row offset i*dh, column j*dw.
struct TapTable {
  std::vector<int64_t> di, dj;
  TapTable(const Geometry& g) : di(g.kh * g.kw), dj(g.kh * g.kw) {
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j) {
        di[i * g.kw + j] = i * g.dh;
        dj[i * g.kw + j] = j * g.dw;
      }
  }
};

// ---------------------------------------------------------------------------------------------
// AVX-512 row kernels for the case that dominates SegNet and DeconvNet: float32, NCHW, 2x2 windows,
// stride 2, no padding. Sixteen pooled columns per step; the two input rows are de-interleaved into
// the four taps with permutes. Picked at run time, so the library still runs on CPUs without
// AVX-512: AVX2 forms of the unpool and backward rows follow (about four times the portable loops'
// speed on window and packed switches), and the portable loops below take over elsewhere.
// ---------------------------------------------------------------------------------------------
#ifdef DSF_HAVE_AVX512_KERNELS
namespace avx512 {

DSF_AVX512 inline __mmask16 lanes(int64_t rem) {
  return rem >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << rem) - 1u);
}

// Taps of 16 windows from rows r0/r1 (32 floats each, masked past 2*rem): e = even columns, o = odd.
struct Taps { __m512 e0, o0, e1, o1; };

DSF_AVX512 inline Taps load_taps(const float* r0, const float* r1, int64_t rem) {
  const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
  const __mmask16 lo = lanes(2 * rem), hi = lanes(2 * rem - 16 > 0 ? 2 * rem - 16 : 0);
  const __m512 a0 = _mm512_maskz_loadu_ps(lo, r0), a1 = _mm512_maskz_loadu_ps(hi, r0 + 16);
  const __m512 b0 = _mm512_maskz_loadu_ps(lo, r1), b1 = _mm512_maskz_loadu_ps(hi, r1 + 16);
  return {_mm512_permutex2var_ps(a0, ev, a1), _mm512_permutex2var_ps(a0, od, a1),
          _mm512_permutex2var_ps(b0, ev, b1), _mm512_permutex2var_ps(b0, od, b1)};
}

// Per-lane left shifts that place column ow = 4q + t at bits 2t of its packed byte.
DSF_AVX512 inline __m512i packed_shifts() {
  return _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6);
}

DSF_AVX512 void pool_row(const float* r0, const float* r1, int64_t n, float* dst, SwitchFormat fmt, void* sw,
                         int64_t base, int64_t W) {
  const __m512i lane2 = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
  const __m512i Wv = _mm512_set1_epi64(W);
  for (int64_t ow = 0; ow < n; ow += 16) {
    const int64_t rem = n - ow < 16 ? n - ow : 16;
    const __mmask16 live = lanes(rem);
    const Taps t4 = load_taps(r0 + 2 * ow, r1 + 2 * ow, rem);
    // torch's scan: (0,0), (0,1), (1,0), (1,1); strictly greater or NaN replaces.
    __m512 m = t4.e0;
    __m512i t = _mm512_setzero_si512();
    __mmask16 k = _mm512_cmp_ps_mask(t4.o0, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(t4.o0, t4.o0, _CMP_UNORD_Q);
    m = _mm512_mask_mov_ps(m, k, t4.o0);
    t = _mm512_mask_mov_epi32(t, k, _mm512_set1_epi32(1));
    k = _mm512_cmp_ps_mask(t4.e1, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(t4.e1, t4.e1, _CMP_UNORD_Q);
    m = _mm512_mask_mov_ps(m, k, t4.e1);
    t = _mm512_mask_mov_epi32(t, k, _mm512_set1_epi32(2));
    k = _mm512_cmp_ps_mask(t4.o1, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(t4.o1, t4.o1, _CMP_UNORD_Q);
    m = _mm512_mask_mov_ps(m, k, t4.o1);
    t = _mm512_mask_mov_epi32(t, k, _mm512_set1_epi32(3));
    _mm512_mask_storeu_ps(dst + ow, live, m);
    if (fmt == SwitchFormat::Window) {
      _mm_mask_storeu_epi8(static_cast<uint8_t*>(sw) + ow, live, _mm512_cvtepi32_epi8(t));
    } else if (fmt == SwitchFormat::Packed) {
      // Dead lanes hold code 0 (masked loads read zeros), so the unused high bits stay 0.
      const __m128i b = _mm512_cvtepi32_epi8(_mm512_sllv_epi32(t, packed_shifts()));
      __m128i y = _mm_or_si128(b, _mm_srli_epi32(b, 8));
      y = _mm_or_si128(y, _mm_srli_epi32(y, 16));
      const __mmask16 bytes = lanes((rem + 3) / 4);
      _mm_mask_storeu_epi8(static_cast<uint8_t*>(sw) + ow / 4, bytes, _mm_cvtepi32_epi8(y));
    } else {
      int64_t* out = static_cast<int64_t*>(sw) + ow;
      for (int half = 0; half < 2; ++half) {
        const __m512i th = _mm512_cvtepi32_epi64(half == 0 ? _mm512_castsi512_si256(t) : _mm512_extracti64x4_epi64(t, 1));
        __m512i v = _mm512_add_epi64(_mm512_set1_epi64(base + 2 * (ow + 8 * half)), lane2);
        v = _mm512_add_epi64(v, _mm512_and_si512(th, _mm512_set1_epi64(1)));
        v = _mm512_mask_add_epi64(v, _mm512_test_epi64_mask(th, _mm512_set1_epi64(2)), v, Wv);
        _mm512_mask_storeu_epi64(out + 8 * half, static_cast<__mmask8>(live >> (8 * half)), v);
      }
    }
  }
}

// Which tap each of 16 pooled lanes points at: k[c] has the lanes whose switch is tap c. A flat
// switch outside its window sets none of the four bits.
DSF_AVX512 inline void tap_masks(SwitchFormat fmt, const void* sw, int64_t ow, int64_t rem, int64_t base, int64_t W,
                                 __mmask16 k[4]) {
  const __mmask16 live = lanes(rem);
  if (fmt == SwitchFormat::Flat) {
    const int64_t* idx = static_cast<const int64_t*>(sw) + ow;
    const __m512i lane2 = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
    __mmask16 km[4] = {0, 0, 0, 0};
    const int64_t want[4] = {0, 1, W, W + 1};
    for (int half = 0; half < 2; ++half) {
      const __mmask8 l8 = static_cast<__mmask8>(live >> (8 * half));
      const __m512i i = _mm512_maskz_loadu_epi64(l8, idx + 8 * half);
      const __m512i rel = _mm512_sub_epi64(
          i, _mm512_add_epi64(_mm512_set1_epi64(base + 2 * (ow + 8 * half)), lane2));
      for (int c = 0; c < 4; ++c)
        km[c] |= static_cast<__mmask16>(
            static_cast<unsigned>(_mm512_mask_cmpeq_epi64_mask(l8, rel, _mm512_set1_epi64(want[c]))) << (8 * half));
    }
    for (int c = 0; c < 4; ++c) k[c] = km[c];
    return;
  }
  __m512i codes;
  if (fmt == SwitchFormat::Window) {
    codes = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, static_cast<const uint8_t*>(sw) + ow));
  } else {
    const __m128i bytes = _mm_maskz_loadu_epi8(lanes((rem + 3) / 4), static_cast<const uint8_t*>(sw) + ow / 4);
    const __m128i spread = _mm_shuffle_epi8(bytes, _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
    codes = _mm512_and_si512(_mm512_srlv_epi32(_mm512_cvtepu8_epi32(spread), packed_shifts()), _mm512_set1_epi32(3));
  }
  for (int c = 0; c < 4; ++c) k[c] = _mm512_mask_cmpeq_epi32_mask(live, codes, _mm512_set1_epi32(c));
}


// Unpool / pool backward of one pooled row into output rows o0, o1. False when a switch is not a
// tap of its window (the caller then reruns the plane sequentially, or raises).
DSF_AVX512 bool scatter_row(const float* src, SwitchFormat fmt, const void* sw, int64_t n, int64_t base, int64_t W,
                            float* o0, float* o1) {
  const __m512i il_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i il_hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  bool ok = true;
  for (int64_t ow = 0; ow < n; ow += 16) {
    const int64_t rem = n - ow < 16 ? n - ow : 16;
    const __mmask16 live = lanes(rem);
    __mmask16 k[4];
    tap_masks(fmt, sw, ow, rem, base, W, k);
    ok &= static_cast<__mmask16>(k[0] | k[1] | k[2] | k[3]) == live;
    const __m512 v = _mm512_maskz_loadu_ps(live, src + ow);
    for (int r = 0; r < 2; ++r) {
      const __m512 even = _mm512_maskz_mov_ps(k[2 * r], v), odd = _mm512_maskz_mov_ps(k[2 * r + 1], v);
      float* o = (r == 0 ? o0 : o1) + 2 * ow;
      _mm512_mask_storeu_ps(o, lanes(2 * rem), _mm512_permutex2var_ps(even, il_lo, odd));
      _mm512_mask_storeu_ps(o + 16, lanes(2 * rem - 16 > 0 ? 2 * rem - 16 : 0), _mm512_permutex2var_ps(even, il_hi, odd));
    }
  }
  return ok;
}

// Unpool backward of one pooled row: each lane reads the gradient at its switch.
DSF_AVX512 bool gather_row(const float* g0, const float* g1, SwitchFormat fmt, const void* sw, int64_t n,
                           int64_t base, int64_t W, float* dst) {
  bool ok = true;
  for (int64_t ow = 0; ow < n; ow += 16) {
    const int64_t rem = n - ow < 16 ? n - ow : 16;
    const __mmask16 live = lanes(rem);
    __mmask16 k[4];
    tap_masks(fmt, sw, ow, rem, base, W, k);
    ok &= static_cast<__mmask16>(k[0] | k[1] | k[2] | k[3]) == live;
    const Taps t4 = load_taps(g0 + 2 * ow, g1 + 2 * ow, rem);
    __m512 r = _mm512_maskz_mov_ps(k[0], t4.e0);
    r = _mm512_mask_mov_ps(r, k[1], t4.o0);
    r = _mm512_mask_mov_ps(r, k[2], t4.e1);
    r = _mm512_mask_mov_ps(r, k[3], t4.o1);
    _mm512_mask_storeu_ps(dst + ow, live, r);
  }
  return ok;
}

}  // namespace avx512

// ---------------------------------------------------------------------------------------------
// The AVX2 forms of tap_masks and gather_row, for CPUs without AVX-512: eight pooled columns a
// step, lane masks instead of mask registers; the columns past the last multiple of eight go to the
// portable loop.
// ---------------------------------------------------------------------------------------------
namespace avx2 {

// k[c]: all ones in the lanes (of eight pooled columns from ow) whose switch is tap c.
DSF_AVX2 inline void tap_masks(SwitchFormat fmt, const void* sw, int64_t ow, int64_t base, int64_t W, __m256i k[4]) {
  if (fmt == SwitchFormat::Flat) {
    const int64_t* idx = static_cast<const int64_t*>(sw) + ow;
    const int64_t want[4] = {0, 1, W, W + 1};
    __m256i rel[2];
    for (int half = 0; half < 2; ++half)  // index less the window's first tap, columns 4 half ..
      rel[half] = _mm256_sub_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + 4 * half)),
                                   _mm256_add_epi64(_mm256_set1_epi64x(base + 2 * (ow + 4 * half)),
                                                    _mm256_setr_epi64x(0, 2, 4, 6)));
    for (int c = 0; c < 4; ++c) {
      const __m256i w = _mm256_set1_epi64x(want[c]);
      // Two 64-bit masks to one of eight 32-bit lanes: the low halves of each, in order.
      const __m256i m = _mm256_castps_si256(_mm256_shuffle_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi64(rel[0], w)),
                                                              _mm256_castsi256_ps(_mm256_cmpeq_epi64(rel[1], w)),
                                                              _MM_SHUFFLE(2, 0, 2, 0)));
      k[c] = _mm256_permute4x64_epi64(m, _MM_SHUFFLE(3, 1, 2, 0));
    }
    return;
  }
  __m256i codes;
  if (fmt == SwitchFormat::Window) {
    codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(sw) + ow)));
  } else {  // two bytes of four codes each (bits 2t of byte q: column 4q + t)
    uint16_t two;
    std::memcpy(&two, static_cast<const uint8_t*>(sw) + ow / 4, sizeof(two));
    const __m256i spread = _mm256_setr_epi32(two & 0xFF, two & 0xFF, two & 0xFF, two & 0xFF, two >> 8, two >> 8,
                                             two >> 8, two >> 8);
    codes = _mm256_and_si256(_mm256_srlv_epi32(spread, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6)),
                             _mm256_set1_epi32(3));
  }
  for (int c = 0; c < 4; ++c) k[c] = _mm256_cmpeq_epi32(codes, _mm256_set1_epi32(c));
}

// avx512::gather_row with eight lanes: columns [0, n - n % 8) here, the rest by gather_2x2_row.
DSF_AVX2 bool gather_row_body(const float* g0, const float* g1, SwitchFormat fmt, const void* sw, int64_t n,
                              int64_t base, int64_t W, float* dst) {
  __m256i ok = _mm256_set1_epi32(-1);
  for (int64_t ow = 0; ow + 8 <= n; ow += 8) {
    __m256i k[4];
    tap_masks(fmt, sw, ow, base, W, k);
    ok = _mm256_and_si256(ok, _mm256_or_si256(_mm256_or_si256(k[0], k[1]), _mm256_or_si256(k[2], k[3])));
    // Even and odd columns of the two rows: shuffles pick them per 128-bit half, a permute orders them.
    const __m256 a0 = _mm256_loadu_ps(g0 + 2 * ow), a1 = _mm256_loadu_ps(g0 + 2 * ow + 8);
    const __m256 b0 = _mm256_loadu_ps(g1 + 2 * ow), b1 = _mm256_loadu_ps(g1 + 2 * ow + 8);
    const auto order = [](__m256 x) DSF_AVX2 {
      return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(x), _MM_SHUFFLE(3, 1, 2, 0)));
    };
    const __m256 e0 = order(_mm256_shuffle_ps(a0, a1, _MM_SHUFFLE(2, 0, 2, 0)));
    const __m256 o0 = order(_mm256_shuffle_ps(a0, a1, _MM_SHUFFLE(3, 1, 3, 1)));
    const __m256 e1 = order(_mm256_shuffle_ps(b0, b1, _MM_SHUFFLE(2, 0, 2, 0)));
    const __m256 o1 = order(_mm256_shuffle_ps(b0, b1, _MM_SHUFFLE(3, 1, 3, 1)));
    __m256 r = _mm256_and_ps(e0, _mm256_castsi256_ps(k[0]));
    r = _mm256_blendv_ps(r, o0, _mm256_castsi256_ps(k[1]));
    r = _mm256_blendv_ps(r, e1, _mm256_castsi256_ps(k[2]));
    r = _mm256_blendv_ps(r, o1, _mm256_castsi256_ps(k[3]));
    _mm256_storeu_ps(dst + ow, r);
  }
  return _mm256_movemask_ps(_mm256_castsi256_ps(ok)) == 0xFF;
}

// avx512::scatter_row with eight lanes: columns [0, n - n % 8) here, the rest by scatter_2x2_row.
DSF_AVX2 bool scatter_row_body(const float* src, SwitchFormat fmt, const void* sw, int64_t n, int64_t base, int64_t W,
                               float* o0, float* o1) {
  __m256i ok = _mm256_set1_epi32(-1);
  for (int64_t ow = 0; ow + 8 <= n; ow += 8) {
    __m256i k[4];
    tap_masks(fmt, sw, ow, base, W, k);
    ok = _mm256_and_si256(ok, _mm256_or_si256(_mm256_or_si256(k[0], k[1]), _mm256_or_si256(k[2], k[3])));
    const __m256 v = _mm256_loadu_ps(src + ow);
    for (int r = 0; r < 2; ++r) {
      const __m256 even = _mm256_and_ps(v, _mm256_castsi256_ps(k[2 * r]));
      const __m256 odd = _mm256_and_ps(v, _mm256_castsi256_ps(k[2 * r + 1]));
      // Interleaved per 128-bit half (columns 0, 1, 4, 5 and 2, 3, 6, 7), then the halves in order.
      const __m256 lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd);
      float* o = (r == 0 ? o0 : o1) + 2 * ow;
      _mm256_storeu_ps(o, _mm256_permute2f128_ps(lo, hi, 0x20));
      _mm256_storeu_ps(o + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    }
  }
  return _mm256_movemask_ps(_mm256_castsi256_ps(ok)) == 0xFF;
}

}  // namespace avx2
#endif

// ---------------------------------------------------------------------------------------------
// Pool forward, NCHW: one output row per step.
// ---------------------------------------------------------------------------------------------

// One tap j of window row `src` for the output columns [lo, hi): the candidate replaces the
// running max when strictly greater or NaN (torch's rule: ties keep the first, the last NaN wins).
template <typename acc_t, typename scalar_t, int SW>
DSF_MULTIVERSION void sweep_tap(const scalar_t* __restrict src, int64_t sw, int64_t lo, int64_t hi,
                                acc_t* __restrict m, int32_t* __restrict t, int32_t tap) {
  const int64_t step = SW > 0 ? SW : sw;
  for (int64_t ow = lo; ow < hi; ++ow) {
    const acc_t v = static_cast<acc_t>(src[ow * step]);
    const bool take = (v > m[ow]) | (v != v);
    m[ow] = take ? v : m[ow];
    t[ow] = take ? tap : t[ow];
  }
}

template <typename scalar_t, int SW>
void pool_rows_nchw(const scalar_t* in, scalar_t* out, void* sw_out, SwitchFormat fmt, int64_t planes,
                    int64_t H, int64_t W, int64_t Ho, int64_t Wo, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const TapTable taps(g);
  const int64_t Wq = packed_width(Wo);
  // Output columns whose windows lie fully inside the row; the others need per-column tap ranges.
  int64_t full_lo = 0, full_hi = 0;
  {
    int64_t a = Wo, b = -1;
    for (int64_t ow = 0; ow < Wo; ++ow) {
      const int64_t start = ow * g.sw - g.pw;
      if (start >= 0 && start + (g.kw - 1) * g.dw < W) { a = std::min(a, ow); b = std::max(b, ow); }
    }
    if (b >= a) { full_lo = a; full_hi = b + 1; }
  }
  at::parallel_for(0, planes * Ho, std::max<int64_t>(1, 16384 / std::max<int64_t>(Wo, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<acc_t> m(Wo);
    std::vector<int32_t> t(Wo);
    std::vector<uint8_t> codes(fmt == SwitchFormat::Packed ? Wq * 4 : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t plane = r / Ho, oh = r % Ho;
      const scalar_t* src_plane = in + plane * H * W;
      const int64_t hstart = oh * g.sh - g.ph;
      const int64_t i0 = first_tap(hstart, g.dh), i1 = end_tap(hstart, g.kh, g.dh, H);
      for (int64_t ow = 0; ow < Wo; ++ow) {
        const int64_t wstart = ow * g.sw - g.pw;
        m[ow] = -std::numeric_limits<acc_t>::infinity();
        t[ow] = static_cast<int32_t>(i0 * g.kw + first_tap(wstart, g.dw));
      }
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* row = src_plane + (hstart + i * g.dh) * W;
        for (int64_t j = 0; j < g.kw; ++j) {
          const int32_t tap = static_cast<int32_t>(i * g.kw + j);
          // Interior columns: one strided sweep. Border columns: only taps inside the row.
          if (full_hi > full_lo)
            sweep_tap<acc_t, scalar_t, SW>(row + j * g.dw - g.pw, g.sw, full_lo, full_hi, m.data(), t.data(), tap);
          for (int64_t ow = 0; ow < Wo; ++ow) {
            if (ow == full_lo && full_hi > full_lo) { ow = full_hi - 1; continue; }
            const int64_t col = ow * g.sw - g.pw + j * g.dw;
            if (col < 0 || col >= W) continue;
            const acc_t v = static_cast<acc_t>(row[col]);
            if (v > m[ow] || v != v) { m[ow] = v; t[ow] = tap; }
          }
        }
      }
      scalar_t* dst = out + r * Wo;
      for (int64_t ow = 0; ow < Wo; ++ow) dst[ow] = static_cast<scalar_t>(m[ow]);
      if (fmt == SwitchFormat::Flat) {
        int64_t* s = static_cast<int64_t*>(sw_out) + r * Wo;
        for (int64_t ow = 0; ow < Wo; ++ow)
          s[ow] = (hstart + taps.di[t[ow]]) * W + ow * g.sw - g.pw + taps.dj[t[ow]];
      } else if (fmt == SwitchFormat::Window) {
        uint8_t* s = static_cast<uint8_t*>(sw_out) + r * Wo;
        for (int64_t ow = 0; ow < Wo; ++ow) s[ow] = static_cast<uint8_t>(t[ow]);
      } else {
        uint8_t* s = static_cast<uint8_t*>(sw_out) + r * Wq;
        std::fill(codes.begin(), codes.end(), 0);
        for (int64_t ow = 0; ow < Wo; ++ow) codes[ow] = static_cast<uint8_t>(t[ow]);
        for (int64_t q = 0; q < Wq; ++q)
          s[q] = static_cast<uint8_t>(codes[4 * q] | (codes[4 * q + 1] << 2) | (codes[4 * q + 2] << 4) |
                                      (codes[4 * q + 3] << 6));
      }
    }
  });
}

// 2x2 windows, stride 2, no padding, no dilation (SegNet, DeconvNet): all four taps in one sweep,
// without row buffers. Columns of a ceil_mode partial window fall back to the general row kernel.
template <typename scalar_t>
DSF_MULTIVERSION void pool_2x2_row(const scalar_t* __restrict r0, const scalar_t* __restrict r1, int64_t n,
                                   scalar_t* __restrict dst, uint8_t* __restrict code) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t ow = 0; ow < n; ++ow) {
    const acc_t a = static_cast<acc_t>(r0[2 * ow]), b = static_cast<acc_t>(r0[2 * ow + 1]);
    const acc_t c = static_cast<acc_t>(r1[2 * ow]), d = static_cast<acc_t>(r1[2 * ow + 1]);
    acc_t m = a;
    uint8_t t = 0;
    bool take = (b > m) | (b != b);
    m = take ? b : m; t = take ? 1 : t;
    take = (c > m) | (c != c);
    m = take ? c : m; t = take ? 2 : t;
    take = (d > m) | (d != d);
    m = take ? d : m; t = take ? 3 : t;
    dst[ow] = static_cast<scalar_t>(m);
    code[ow] = t;
  }
}

DSF_MULTIVERSION void codes_to_flat(const uint8_t* __restrict code, int64_t n, int64_t base, int64_t W,
                                    int64_t* __restrict s) {
  for (int64_t ow = 0; ow < n; ++ow) s[ow] = base + 2 * ow + (code[ow] >> 1) * W + (code[ow] & 1);
}

DSF_MULTIVERSION void pack_codes(const uint8_t* __restrict code, int64_t nq, uint8_t* __restrict s) {
  for (int64_t q = 0; q < nq; ++q)
    s[q] = static_cast<uint8_t>(code[4 * q] | (code[4 * q + 1] << 2) | (code[4 * q + 2] << 4) | (code[4 * q + 3] << 6));
}

template <typename scalar_t>
void pool_2x2_nchw(const scalar_t* in, scalar_t* out, void* sw_out, SwitchFormat fmt, int64_t planes,
                   int64_t H, int64_t W, int64_t Ho, int64_t Wo) {
  // Only called when every window is complete (no ceil_mode overhang).
  const int64_t Wq = packed_width(Wo);
  at::parallel_for(0, planes * Ho, std::max<int64_t>(1, 16384 / std::max<int64_t>(Wo, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> codes(Wq * 4 + 64, 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t plane = r / Ho, oh = r % Ho;
      const scalar_t* r0 = in + (plane * H + 2 * oh) * W;
#ifdef DSF_HAVE_AVX512_KERNELS
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (cpu_has_avx512()) {
          void* s = fmt == SwitchFormat::Flat ? static_cast<void*>(static_cast<int64_t*>(sw_out) + r * Wo)
                                              : static_cast<void*>(static_cast<uint8_t*>(sw_out) + r * (fmt == SwitchFormat::Packed ? Wq : Wo));
          avx512::pool_row(r0, r0 + W, Wo, out + r * Wo, fmt, s, 2 * oh * W, W);
          continue;
        }
      }
#endif
      uint8_t* code = fmt == SwitchFormat::Window ? static_cast<uint8_t*>(sw_out) + r * Wo : codes.data();
      pool_2x2_row(r0, r0 + W, Wo, out + r * Wo, code);
      if (fmt == SwitchFormat::Flat) {
        codes_to_flat(code, Wo, 2 * oh * W, W, static_cast<int64_t*>(sw_out) + r * Wo);
      } else if (fmt == SwitchFormat::Packed) {
        std::fill(codes.begin() + Wo, codes.begin() + 4 * Wq, 0);
        pack_codes(code, Wq, static_cast<uint8_t*>(sw_out) + r * Wq);
      }
    }
  });
}


// ---------------------------------------------------------------------------------------------
// Pool forward, NHWC: one output pixel per step, vectorised along channels.
// ---------------------------------------------------------------------------------------------

template <typename acc_t, typename scalar_t>
DSF_MULTIVERSION void sweep_channels(const scalar_t* __restrict src, int64_t C, acc_t* __restrict m,
                                     int32_t* __restrict t, int32_t tap) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t v = static_cast<acc_t>(src[c]);
    const bool take = (v > m[c]) | (v != v);
    m[c] = take ? v : m[c];
    t[c] = take ? tap : t[c];
  }
}

template <typename scalar_t>
void pool_nhwc(const scalar_t* in, scalar_t* out, void* sw_out, SwitchFormat fmt, int64_t N, int64_t C,
               int64_t H, int64_t W, int64_t Ho, int64_t Wo, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const TapTable taps(g);
  const int64_t Wq = packed_width(Wo);
  // A task is one output row, so the four columns that share a packed byte stay in one task.
  at::parallel_for(0, N * Ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> m(C);
    std::vector<int32_t> t(C);
    std::vector<uint8_t> row_codes(fmt == SwitchFormat::Packed ? Wq * C : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / Ho, oh = r % Ho;
      const int64_t hstart = oh * g.sh - g.ph;
      const int64_t i0 = first_tap(hstart, g.dh), i1 = end_tap(hstart, g.kh, g.dh, H);
      if (fmt == SwitchFormat::Packed) std::fill(row_codes.begin(), row_codes.end(), 0);
      for (int64_t ow = 0; ow < Wo; ++ow) {
        const int64_t wstart = ow * g.sw - g.pw;
        const int64_t j0 = first_tap(wstart, g.dw), j1 = end_tap(wstart, g.kw, g.dw, W);
        std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
        std::fill(t.begin(), t.end(), static_cast<int32_t>(i0 * g.kw + j0));
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = j0; j < j1; ++j)
            sweep_channels<acc_t, scalar_t>(
                in + ((n * H + hstart + i * g.dh) * W + wstart + j * g.dw) * C, C, m.data(), t.data(),
                static_cast<int32_t>(i * g.kw + j));
        const int64_t pix = (n * Ho + oh) * Wo + ow;
        scalar_t* dst = out + pix * C;
        for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(m[c]);
        if (fmt == SwitchFormat::Flat) {
          int64_t* s = static_cast<int64_t*>(sw_out) + pix * C;
          const int64_t base = hstart * W + wstart;
          for (int64_t c = 0; c < C; ++c) s[c] = base + taps.di[t[c]] * W + taps.dj[t[c]];
        } else if (fmt == SwitchFormat::Window) {
          uint8_t* s = static_cast<uint8_t*>(sw_out) + pix * C;
          for (int64_t c = 0; c < C; ++c) s[c] = static_cast<uint8_t>(t[c]);
        } else {
          uint8_t* s = row_codes.data() + (ow >> 2) * C;
          const int shift = packed_shift(ow);
          for (int64_t c = 0; c < C; ++c) s[c] |= static_cast<uint8_t>(t[c] << shift);
        }
      }
      if (fmt == SwitchFormat::Packed)
        std::memcpy(static_cast<uint8_t*>(sw_out) + (n * Ho + oh) * Wq * C, row_codes.data(), Wq * C);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Switch decoding for the scatter and gather kernels.
// ---------------------------------------------------------------------------------------------

// Flat position of the switch at `offset`, or -1 when it is invalid (outside the plane, or a compact
// code that is not a tap of its window): callers turn -1 into an error, never into a write.
template <SwitchFormat F>
inline int64_t switch_at(const void* data, int64_t offset, int64_t shift, int64_t oh, int64_t ow,
                         const Geometry& g, int64_t H, int64_t W) {
  if (F == SwitchFormat::Flat) {
    const int64_t p = static_cast<const int64_t*>(data)[offset];
    return (p >= 0 && p < H * W) ? p : -1;
  }
  uint8_t code = static_cast<const uint8_t*>(data)[offset];
  if (F == SwitchFormat::Packed) code = static_cast<uint8_t>((code >> shift) & 3);
  return window_code_to_flat(code, oh, ow, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, H, W);
}

// Offset of the switch of pooled element (n, c, oh, ow) and the bit shift for packed switches.
struct SwitchIndexer {
  bool nhwc;
  SwitchFormat fmt;
  int64_t C, Hp, Wp;
  inline int64_t cols() const { return fmt == SwitchFormat::Packed ? packed_width(Wp) : Wp; }
  inline int64_t offset(int64_t n, int64_t c, int64_t oh, int64_t ow) const {
    const int64_t col = fmt == SwitchFormat::Packed ? (ow >> 2) : ow;
    return nhwc ? ((n * Hp + oh) * cols() + col) * C + c : ((n * C + c) * Hp + oh) * cols() + col;
  }
  inline int64_t shift(int64_t ow) const { return fmt == SwitchFormat::Packed ? packed_shift(ow) : 0; }
  // The switches of (n, c, oh, ow) on, in `sw` (int64 for flat, bytes otherwise; packed: ow % 4 == 0).
  inline const void* at(const void* sw, int64_t n, int64_t c, int64_t oh, int64_t ow) const {
    const int64_t so = offset(n, c, oh, ow);
    return fmt == SwitchFormat::Flat ? static_cast<const void*>(static_cast<const int64_t*>(sw) + so)
                                     : static_cast<const void*>(static_cast<const uint8_t*>(sw) + so);
  }
};

[[noreturn]] void throw_bad_index(int64_t bad, SwitchFormat fmt, int64_t H, int64_t W) {
  if (fmt == SwitchFormat::Flat) {
    TORCH_CHECK(false, "indices: found flat switch ", bad, ", expected values in [0, ", H * W,
                ") for an output plane of ", H, "x", W);
  }
  TORCH_CHECK(false, "indices: found a ", fmt == SwitchFormat::Packed ? "packed" : "window",
              " switch that is not a tap of its window inside the ", H, "x", W,
              " output plane (corrupt switches, or kernel_size/stride/padding/dilation differ from the pooling)");
}

// Records the first bad switch seen by any thread; the op raises after the parallel region.
struct BadIndex {
  std::atomic<bool> seen{false};
  std::atomic<int64_t> value{0};
  void record(int64_t v) {
    bool expected = false;
    if (seen.compare_exchange_strong(expected, true)) value.store(v);
  }
};

// ---------------------------------------------------------------------------------------------
// Scatter: unpool forward (ACCUMULATE=false: overwrite, last writer wins) and pool backward
// (ACCUMULATE=true: sum in window order).
// ---------------------------------------------------------------------------------------------

// Sequential per plane, in torch's order. Handles any geometry and any flat switch in the plane.
// For NHWC a task is (image, block of channels): each channel's windows still run in order.
template <typename scalar_t, SwitchFormat F, bool ACCUMULATE>
void scatter_sequential(const scalar_t* src, const void* sw, scalar_t* out, bool nhwc, int64_t N, int64_t C,
                        int64_t Hp, int64_t Wp, int64_t H, int64_t W, const Geometry& g, BadIndex& bad) {
  using acc_t = at::opmath_type<scalar_t>;
  const SwitchIndexer ix{nhwc, F, C, Hp, Wp};
  constexpr int64_t CB = 16;
  const int64_t cblocks = nhwc ? (C + CB - 1) / CB : C;
  at::parallel_for(0, N * cblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / cblocks, cb = task % cblocks;
      const int64_t c0 = nhwc ? cb * CB : cb, c1 = nhwc ? std::min(C, c0 + CB) : cb + 1;
      const int64_t cn = c1 - c0;
      // Sums go through an opmath buffer so float16/bfloat16 gradients are added in float32.
      if (ACCUMULATE) acc.assign(cn * H * W, acc_t(0));
      if (nhwc) {
        for (int64_t p = 0; p < H * W; ++p)
          for (int64_t c = c0; c < c1; ++c) out[(n * H * W + p) * C + c] = scalar_t(0);
      } else {
        std::fill(out + (n * C + c0) * H * W, out + (n * C + c1) * H * W, scalar_t(0));
      }
      for (int64_t oh = 0; oh < Hp; ++oh)
        for (int64_t ow = 0; ow < Wp; ++ow)
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t p = switch_at<F>(sw, ix.offset(n, c, oh, ow), ix.shift(ow), oh, ow, g, H, W);
            if (p < 0) {
              bad.record(F == SwitchFormat::Flat ? static_cast<const int64_t*>(sw)[ix.offset(n, c, oh, ow)] : -1);
              continue;
            }
            const int64_t s_off = nhwc ? ((n * Hp + oh) * Wp + ow) * C + c : ((n * C + c) * Hp + oh) * Wp + ow;
            if (ACCUMULATE) {
              acc[(c - c0) * H * W + p] += static_cast<acc_t>(src[s_off]);
            } else {
              const int64_t o_off = nhwc ? (n * H * W + p) * C + c : (n * C + c) * H * W + p;
              out[o_off] = src[s_off];
            }
          }
      if (ACCUMULATE) {
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t p = 0; p < H * W; ++p) {
            const int64_t o_off = nhwc ? (n * H * W + p) * C + c : (n * C + c) * H * W + p;
            out[o_off] = static_cast<scalar_t>(acc[(c - c0) * H * W + p]);
          }
      }
    }
  });
}

// The SegNet/DeconvNet geometry, with every window complete inside an H x W plane.
bool is_2x2_stride2(const Geometry& g, int64_t Hp, int64_t Wp, int64_t H, int64_t W) {
  return g.kh == 2 && g.kw == 2 && g.sh == 2 && g.sw == 2 && g.ph == 0 && g.pw == 0 && g.dh == 1 && g.dw == 1 &&
         H >= 2 * Hp && W >= 2 * Wp;
}

// Which tap of a 2x2 stride-2 window a switch names, as a key compared against the four taps'
// keys: for flat switches the offset from the window's top-left tap (taps: 0, 1, W, W + 1; a switch
// outside the window matches none), for compact ones the code itself (taps: 0..3; a corrupt window
// code >= 4 matches none). Equality tests, rather than a decoded tap number, and 32-bit keys for the
// byte formats keep the channel and column loops below vectorisable.
template <SwitchFormat F>
struct Key2x2 {
  using type = std::conditional_t<F == SwitchFormat::Flat, int64_t, int32_t>;
  type t0, t1, t2, t3;
  explicit Key2x2(int64_t W) : t0(0), t1(1), t2(F == SwitchFormat::Flat ? W : 2), t3(F == SwitchFormat::Flat ? W + 1 : 3) {}
  inline type at(const void* sw, int64_t i, int shift, int64_t window_origin) const {
    if constexpr (F == SwitchFormat::Flat) {
      return static_cast<const int64_t*>(sw)[i] - window_origin;
    } else {
      const int32_t code = static_cast<const uint8_t*>(sw)[i];
      return F == SwitchFormat::Packed ? (code >> shift) & 3 : code;
    }
  }
  inline bool none(type d) const { return (d != t0) & (d != t1) & (d != t2) & (d != t3); }
};

// NHWC, one 2x2 window for all C channels: the four output pixels are written whole, so the
// channel loop vectorises. `sw` points at this window's C switches (packed: its byte column).
template <typename scalar_t, SwitchFormat F>
DSF_MULTIVERSION bool scatter_2x2_pixel(const scalar_t* __restrict src, const void* __restrict sw, int shift, int64_t C,
                                        int64_t origin, int64_t W, scalar_t* __restrict o00, scalar_t* __restrict o01,
                                        scalar_t* __restrict o10, scalar_t* __restrict o11) {
  const Key2x2<F> key(W);
  int bad = 0;
  for (int64_t c = 0; c < C; ++c) {
    const auto d = key.at(sw, c, shift, origin);
    const scalar_t v = src[c], z = scalar_t(0);
    o00[c] = d == key.t0 ? v : z;
    o01[c] = d == key.t1 ? v : z;
    o10[c] = d == key.t2 ? v : z;
    o11[c] = d == key.t3 ? v : z;
    bad |= key.none(d);
  }
  return bad == 0;
}

template <typename scalar_t, SwitchFormat F>
DSF_MULTIVERSION bool gather_2x2_pixel(const scalar_t* __restrict g00, const scalar_t* __restrict g01,
                                       const scalar_t* __restrict g10, const scalar_t* __restrict g11,
                                       const void* __restrict sw, int shift, int64_t C, int64_t origin, int64_t W,
                                       scalar_t* __restrict dst) {
  const Key2x2<F> key(W);
  int bad = 0;
  for (int64_t c = 0; c < C; ++c) {
    const auto d = key.at(sw, c, shift, origin);
    dst[c] = d == key.t0 ? g00[c] : d == key.t1 ? g01[c] : d == key.t2 ? g10[c] : g11[c];
    bad |= key.none(d);
  }
  return bad == 0;
}

// 2x2 stride-2 NCHW band: rows 2*oh and 2*oh+1 of the output, all four taps written in one pass.
// Returns false when a flat switch leaves its window (the caller then reruns sequentially).
template <typename scalar_t, SwitchFormat F>
DSF_MULTIVERSION bool scatter_2x2_row(const scalar_t* __restrict src, const void* __restrict sw_row, int64_t n,
                                      int64_t base, int64_t W, scalar_t* __restrict o0, scalar_t* __restrict o1) {
  const Key2x2<F> key(W);
  int bad = 0;
  for (int64_t ow = 0; ow < n; ++ow) {
    const auto d = key.at(sw_row, F == SwitchFormat::Packed ? (ow >> 2) : ow, packed_shift(ow), base + 2 * ow);
    const scalar_t v = src[ow], z = scalar_t(0);
    o0[2 * ow] = d == key.t0 ? v : z;
    o0[2 * ow + 1] = d == key.t1 ? v : z;
    o1[2 * ow] = d == key.t2 ? v : z;
    o1[2 * ow + 1] = d == key.t3 ? v : z;
    bad |= key.none(d);
  }
  return bad == 0;
}

// Non-overlapping windows: pooled row oh owns output rows [oh*sh - ph, (oh+1)*sh - ph); rows past
// the last band are zero. Every switch must land inside its own window's band rectangle; a flat
// switch that does not makes the function return false without having raced anyone.
template <typename scalar_t, SwitchFormat F>
bool scatter_bands(const scalar_t* src, const void* sw, scalar_t* out, bool nhwc, int64_t N, int64_t C,
                   int64_t Hp, int64_t Wp, int64_t H, int64_t W, const Geometry& g, BadIndex& bad) {
  const SwitchIndexer ix{nhwc, F, C, Hp, Wp};
  const bool fast2x2 = is_2x2_stride2(g, Hp, Wp, H, W);
  std::atomic<bool> left_window{false};
  // Band Hp is the tail of rows below the last window.
  const int64_t bands = Hp + 1;
  const int64_t outer = nhwc ? N : N * C;
  at::parallel_for(0, outer * bands, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t plane = task / bands, oh = task % bands;
      const int64_t n = nhwc ? plane : plane / C;
      const int64_t r0 = std::max<int64_t>(0, oh * g.sh - g.ph);
      const int64_t r1 = oh == Hp ? H : std::min<int64_t>(H, (oh + 1) * g.sh - g.ph);
      if (oh == Hp && r0 >= H) continue;
      const int64_t row_elems = nhwc ? W * C : W;
      scalar_t* band = out + (nhwc ? n * H * W * C : plane * H * W) + r0 * row_elems;
      if (oh == Hp) {
        std::fill(band, band + std::max<int64_t>(0, r1 - r0) * row_elems, scalar_t(0));
        continue;
      }
      if (fast2x2 && nhwc) {
        bool ok = true;
        const scalar_t* src_row = src + (n * Hp + oh) * Wp * C;
        for (int64_t ow = 0; ow < Wp; ++ow) {
          const void* sw_px = ix.at(sw, n, 0, oh, ow);
          scalar_t* o = band + 2 * ow * C;
          ok &= scatter_2x2_pixel<scalar_t, F>(src_row + ow * C, sw_px, static_cast<int>(ix.shift(ow)), C,
                                               2 * oh * W + 2 * ow, W, o, o + C, o + W * C, o + W * C + C);
        }
        if (!ok) left_window.store(true);
        if (W > 2 * Wp) {
          std::fill(band + 2 * Wp * C, band + W * C, scalar_t(0));
          std::fill(band + (W + 2 * Wp) * C, band + 2 * W * C, scalar_t(0));
        }
        continue;
      }
      if (fast2x2) {
        const int64_t c = plane % C;
        const void* sw_row = ix.at(sw, n, c, oh, 0);
        const scalar_t* src_row = src + (plane * Hp + oh) * Wp;
        bool ok;
#ifdef DSF_HAVE_AVX512_KERNELS
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (cpu_has_avx512()) {
            ok = avx512::scatter_row(src_row, F, sw_row, Wp, 2 * oh * W, W, band, band + W);
          } else if (cpu_has_avx2()) {  // whole steps of eight, then the portable loop
            const int64_t n8 = Wp / 8 * 8;
            ok = avx2::scatter_row_body(src_row, F, sw_row, Wp, 2 * oh * W, W, band, band + W) &&
                 scatter_2x2_row<scalar_t, F>(src_row + n8, ix.at(sw, n, c, oh, n8), Wp - n8, 2 * oh * W + 2 * n8, W, band + 2 * n8,
                                              band + W + 2 * n8);
          } else {
            ok = scatter_2x2_row<scalar_t, F>(src_row, sw_row, Wp, 2 * oh * W, W, band, band + W);
          }
        } else
#endif
        {
          ok = scatter_2x2_row<scalar_t, F>(src_row, sw_row, Wp, 2 * oh * W, W, band, band + W);
        }
        if (!ok) left_window.store(true);
        if (W > 2 * Wp) {
          std::fill(band + 2 * Wp, band + W, scalar_t(0));
          std::fill(band + W + 2 * Wp, band + 2 * W, scalar_t(0));
        }
        continue;
      }
      std::fill(band, band + std::max<int64_t>(0, r1 - r0) * row_elems, scalar_t(0));
      const int64_t c_lo = nhwc ? 0 : plane % C, c_hi = nhwc ? C : c_lo + 1;
      for (int64_t ow = 0; ow < Wp; ++ow) {
        const int64_t c0 = std::max<int64_t>(0, ow * g.sw - g.pw);
        const int64_t c1 = std::min<int64_t>(W, (ow + 1) * g.sw - g.pw);
        for (int64_t c = c_lo; c < c_hi; ++c) {
          const int64_t off = ix.offset(n, c, oh, ow);
          const int64_t p = switch_at<F>(sw, off, ix.shift(ow), oh, ow, g, H, W);
          if (p < 0) {
            bad.record(F == SwitchFormat::Flat ? static_cast<const int64_t*>(sw)[off] : -1);
            continue;
          }
          const int64_t h = p / W, w = p - (p / W) * W;
          if (h < r0 || h >= r1 || w < c0 || w >= c1) {
            left_window.store(true);
            continue;
          }
          const int64_t s_off = nhwc ? ((n * Hp + oh) * Wp + ow) * C + c : (plane * Hp + oh) * Wp + ow;
          band[(h - r0) * row_elems + (nhwc ? w * C + c : w)] = src[s_off];
        }
      }
    }
  });
  return !left_window.load();
}

// Windows overlap (e.g. 3x3 stride 1) when a stride is smaller than the dilated kernel extent.
bool windows_overlap(const Geometry& g) {
  return g.sh < (g.kh - 1) * g.dh + 1 || g.sw < (g.kw - 1) * g.dw + 1;
}

template <typename scalar_t, SwitchFormat F, bool ACCUMULATE>
void scatter(const scalar_t* src, const void* sw, scalar_t* out, bool nhwc, int64_t N, int64_t C, int64_t Hp,
             int64_t Wp, int64_t H, int64_t W, const Geometry& g, BadIndex& bad) {
  // The band path never sees two switches on one output element, so overwrite == accumulate there.
  if (!windows_overlap(g) && scatter_bands<scalar_t, F>(src, sw, out, nhwc, N, C, Hp, Wp, H, W, g, bad)) return;
  if (bad.seen.load()) return;
  scatter_sequential<scalar_t, F, ACCUMULATE>(src, sw, out, nhwc, N, C, Hp, Wp, H, W, g, bad);
}

// ---------------------------------------------------------------------------------------------
// Gather: unpool backward, grad_input[w] = grad_output[switch(w)].
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
DSF_MULTIVERSION bool gather_flat_row(const scalar_t* __restrict plane, const int64_t* __restrict idx, int64_t n,
                                      int64_t HW, scalar_t* __restrict dst) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = idx[i];
    const bool in = (p >= 0) & (p < HW);
    ok &= in;
    dst[i] = plane[in ? p : 0];
  }
  return ok;
}

// 2x2 stride-2 NCHW, one pooled row: each element reads the gradient at its switch, among the four
// taps of its window in output rows g0 and g1. Returns false when a switch is not a tap of its window
// (that element then holds one of its taps; the caller redoes the row element by element).
template <typename scalar_t, SwitchFormat F>
DSF_MULTIVERSION bool gather_2x2_row(const scalar_t* __restrict g0, const scalar_t* __restrict g1,
                                     const void* __restrict sw_row, int64_t n, int64_t base, int64_t W,
                                     scalar_t* __restrict dst) {
  const Key2x2<F> key(W);
  int bad = 0;
  for (int64_t ow = 0; ow < n; ++ow) {
    const auto d = key.at(sw_row, F == SwitchFormat::Packed ? (ow >> 2) : ow, packed_shift(ow), base + 2 * ow);
    const scalar_t top = d == key.t0 ? g0[2 * ow] : g0[2 * ow + 1];
    const scalar_t bottom = d == key.t2 ? g1[2 * ow] : g1[2 * ow + 1];
    dst[ow] = (d == key.t0) | (d == key.t1) ? top : bottom;
    bad |= key.none(d);
  }
  return bad == 0;
}

template <typename scalar_t, SwitchFormat F>
void gather(const scalar_t* grad, const void* sw, scalar_t* out, bool nhwc, int64_t N, int64_t C, int64_t Hp,
            int64_t Wp, int64_t H, int64_t W, const Geometry& g, BadIndex& bad) {
  const SwitchIndexer ix{nhwc, F, C, Hp, Wp};
  // One element, any layout; a bad switch is recorded and its gradient set to 0.
  auto gather_one = [&](int64_t n, int64_t c, int64_t oh, int64_t ow) {
    const int64_t off = ix.offset(n, c, oh, ow);
    const int64_t p = switch_at<F>(sw, off, ix.shift(ow), oh, ow, g, H, W);
    const int64_t o_off = nhwc ? ((n * Hp + oh) * Wp + ow) * C + c : ((n * C + c) * Hp + oh) * Wp + ow;
    if (p < 0) {
      bad.record(F == SwitchFormat::Flat ? static_cast<const int64_t*>(sw)[off] : -1);
      out[o_off] = scalar_t(0);
      return;
    }
    out[o_off] = grad[nhwc ? (n * H * W + p) * C + c : (n * C + c) * H * W + p];
  };
  const bool fast2x2 = is_2x2_stride2(g, Hp, Wp, H, W);
  if (nhwc) {
    at::parallel_for(0, N * Hp, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / Hp, oh = r % Hp;
        for (int64_t ow = 0; ow < Wp; ++ow) {
          if (fast2x2) {
            const void* sw_px = ix.at(sw, n, 0, oh, ow);
            const scalar_t* g00 = grad + ((n * H + 2 * oh) * W + 2 * ow) * C;
            if (gather_2x2_pixel<scalar_t, F>(g00, g00 + C, g00 + W * C, g00 + W * C + C, sw_px,
                                              static_cast<int>(ix.shift(ow)), C, 2 * oh * W + 2 * ow, W,
                                              out + ((n * Hp + oh) * Wp + ow) * C))
              continue;
          }
          // Any geometry, or a switch that left its window: element by element (records errors).
          for (int64_t c = 0; c < C; ++c) gather_one(n, c, oh, ow);
        }
      }
    });
    return;
  }
  at::parallel_for(0, N * C * Hp, std::max<int64_t>(1, 16384 / std::max<int64_t>(Wp, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t plane = r / Hp, oh = r % Hp;
      const scalar_t* gp = grad + plane * H * W;
      bool done = false;
      if (fast2x2) {
        auto sw_at = [&](int64_t ow) { return ix.at(sw, plane / C, plane % C, oh, ow); };
        const scalar_t *g0 = gp + 2 * oh * W, *g1 = gp + (2 * oh + 1) * W;
        bool tried = false;
#ifdef DSF_HAVE_AVX512_KERNELS
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (cpu_has_avx512()) {
            done = avx512::gather_row(g0, g1, F, sw_at(0), Wp, 2 * oh * W, W, out + r * Wp);
            tried = true;
          } else if (cpu_has_avx2()) {  // whole steps of eight, then the portable loop
            const int64_t n8 = Wp / 8 * 8;
            done = avx2::gather_row_body(g0, g1, F, sw_at(0), Wp, 2 * oh * W, W, out + r * Wp) &&
                   gather_2x2_row<scalar_t, F>(g0 + 2 * n8, g1 + 2 * n8, sw_at(n8), Wp - n8, 2 * oh * W + 2 * n8, W,
                                               out + r * Wp + n8);
            tried = true;
          }
        }
#endif
        // Without those: the portable row loop (flat switches: the gather below is faster than it).
        if (!tried && F != SwitchFormat::Flat)
          done = gather_2x2_row<scalar_t, F>(g0, g1, sw_at(0), Wp, 2 * oh * W, W, out + r * Wp);
      }
      if (!done && F == SwitchFormat::Flat)
        done = gather_flat_row(gp, static_cast<const int64_t*>(sw) + r * Wp, Wp, H * W, out + r * Wp);
      // A switch left its window or is invalid: redo the row element by element (records errors).
      if (!done)
        for (int64_t ow = 0; ow < Wp; ++ow) gather_one(plane / C, plane % C, oh, ow);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Op entry points.
// ---------------------------------------------------------------------------------------------

bool is_nhwc(const Tensor& t) { return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast; }

at::MemoryFormat layout_of(bool nhwc) {
  return nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

template <typename F>
void dispatch_format(SwitchFormat fmt, F&& f) {
  switch (fmt) {
    case SwitchFormat::Flat: f(std::integral_constant<SwitchFormat, SwitchFormat::Flat>{}); break;
    case SwitchFormat::Window: f(std::integral_constant<SwitchFormat, SwitchFormat::Window>{}); break;
    case SwitchFormat::Packed: f(std::integral_constant<SwitchFormat, SwitchFormat::Packed>{}); break;
  }
}

std::tuple<Tensor, Tensor> max_pool2d_switches_cpu(const Tensor& input, at::IntArrayRef kernel_size,
                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, bool ceil_mode,
                                                   c10::string_view index_format) {
  const SwitchFormat fmt = parse_format(index_format);
  const Geometry g = check_geometry(kernel_size, stride, padding, dilation, fmt);
  check_float_input(input, "input");
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  TORCH_CHECK_VALUE(C > 0 && H > 0 && W > 0, "input must have non-zero channels, height and width, got ",
                    input.sizes());
  const int64_t Ho = pooled_extent(H, g.kh, g.sh, g.ph, g.dh, ceil_mode);
  const int64_t Wo = pooled_extent(W, g.kw, g.sw, g.pw, g.dw, ceil_mode);
  TORCH_CHECK_VALUE(Ho > 0 && Wo > 0, "input of size ", input.sizes(), " is too small for kernel_size (", g.kh,
                    ", ", g.kw, ") with dilation (", g.dh, ", ", g.dw, ") and padding (", g.ph, ", ", g.pw,
                    "): the output would be ", Ho, "x", Wo);
  const bool nhwc = is_nhwc(input);
  const auto mf = layout_of(nhwc);
  auto values = empty_output({N, C, Ho, Wo}, input.scalar_type(), mf);
  auto switches = empty_output(switch_shape(N, C, Ho, Wo, fmt), switch_dtype(fmt), mf);
  if (values.numel() == 0) return {values, switches};
  const Tensor x = input.contiguous(mf);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2d_switches", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* out = values.mutable_data_ptr<scalar_t>();
    void* sw = switches.data_ptr();
    if (nhwc) {
      pool_nhwc(in, out, sw, fmt, N, C, H, W, Ho, Wo, g);
    } else if (g.kh == 2 && g.kw == 2 && g.sh == 2 && g.sw == 2 && g.ph == 0 && g.pw == 0 && g.dh == 1 &&
               g.dw == 1 && 2 * Ho <= H && 2 * Wo <= W) {
      pool_2x2_nchw(in, out, sw, fmt, N * C, H, W, Ho, Wo);
    } else if (g.sw == 1) {
      pool_rows_nchw<scalar_t, 1>(in, out, sw, fmt, N * C, H, W, Ho, Wo, g);
    } else if (g.sw == 2) {
      pool_rows_nchw<scalar_t, 2>(in, out, sw, fmt, N * C, H, W, Ho, Wo, g);
    } else {
      pool_rows_nchw<scalar_t, 0>(in, out, sw, fmt, N * C, H, W, Ho, Wo, g);
    }
  });
  return {values, switches};
}

// Shared by unpool forward and pool backward: scatter `src` [N, C, Hp, Wp] to an H x W plane.
template <bool ACCUMULATE>
Tensor scatter_op(const Tensor& src_in, const Tensor& indices, int64_t H, int64_t W, const Geometry& g,
                  SwitchFormat fmt) {
  const int64_t N = src_in.size(0), C = src_in.size(1), Hp = src_in.size(2), Wp = src_in.size(3);
  const bool nhwc = is_nhwc(src_in);
  const auto mf = layout_of(nhwc);
  auto out = empty_output({N, C, H, W}, src_in.scalar_type(), mf);
  if (out.numel() == 0) return out;
  if (src_in.numel() == 0) return out.zero_();
  const Tensor src = src_in.contiguous(mf);
  const Tensor sw = indices.contiguous(mf);
  BadIndex bad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "max_unpool2d", [&] {
    dispatch_format(fmt, [&](auto F) {
      scatter<scalar_t, decltype(F)::value, ACCUMULATE>(src.const_data_ptr<scalar_t>(), sw.const_data_ptr(),
                                                        out.mutable_data_ptr<scalar_t>(), nhwc, N, C, Hp, Wp, H, W,
                                                        g, bad);
    });
  });
  if (bad.seen.load()) throw_bad_index(bad.value.load(), fmt, H, W);
  return out;
}

void check_size_pair(at::IntArrayRef size, const char* name) {
  TORCH_CHECK_VALUE(size.size() == 2, name, " must have 2 elements (H, W), got ", size.size());
  TORCH_CHECK_VALUE(size[0] > 0 && size[1] > 0, name, " must be positive, got (", size[0], ", ", size[1], ")");
}

Tensor max_unpool2d_cpu(const Tensor& input, const Tensor& indices, at::IntArrayRef kernel_size,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                        at::IntArrayRef output_size, c10::string_view index_format) {
  const SwitchFormat fmt = parse_format(index_format);
  const Geometry g = check_geometry(kernel_size, stride, padding, dilation, fmt);
  check_float_input(input, "input");
  check_size_pair(output_size, "output_size");
  check_indices(indices, input, fmt, input.size(2), input.size(3));
  return scatter_op<false>(input, indices, output_size[0], output_size[1], g, fmt);
}

Tensor max_pool2d_switches_backward_cpu(const Tensor& grad_output, const Tensor& indices,
                                        at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                        c10::string_view index_format) {
  const SwitchFormat fmt = parse_format(index_format);
  const Geometry g = check_geometry(kernel_size, stride, padding, dilation, fmt);
  check_float_input(grad_output, "grad_output");
  check_size_pair(input_size, "input_size");
  check_indices(indices, grad_output, fmt, grad_output.size(2), grad_output.size(3));
  return scatter_op<true>(grad_output, indices, input_size[0], input_size[1], g, fmt);
}

Tensor max_unpool2d_backward_cpu(const Tensor& grad_output, const Tensor& indices, at::IntArrayRef input_size,
                                 at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, c10::string_view index_format) {
  const SwitchFormat fmt = parse_format(index_format);
  const Geometry g = check_geometry(kernel_size, stride, padding, dilation, fmt);
  check_float_input(grad_output, "grad_output");
  check_size_pair(input_size, "input_size");
  const int64_t N = grad_output.size(0), C = grad_output.size(1), H = grad_output.size(2), W = grad_output.size(3);
  const int64_t Hp = input_size[0], Wp = input_size[1];
  check_indices(indices, grad_output, fmt, Hp, Wp);
  const bool nhwc = is_nhwc(grad_output);
  const auto mf = layout_of(nhwc);
  auto out = empty_output({N, C, Hp, Wp}, grad_output.scalar_type(), mf);
  if (out.numel() == 0) return out;
  TORCH_CHECK_VALUE(H > 0 && W > 0, "grad_output must have a non-empty plane, got ", grad_output.sizes());
  const Tensor grad = grad_output.contiguous(mf);
  const Tensor sw = indices.contiguous(mf);
  BadIndex bad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "max_unpool2d_backward", [&] {
    dispatch_format(fmt, [&](auto F) {
      gather<scalar_t, decltype(F)::value>(grad.const_data_ptr<scalar_t>(), sw.const_data_ptr(),
                                           out.mutable_data_ptr<scalar_t>(), nhwc, N, C, Hp, Wp, H, W, g, bad);
    });
  });
  if (bad.seen.load()) throw_bad_index(bad.value.load(), fmt, H, W);
  return out;
}

}  // namespace
}  // namespace deconvseg

TORCH_LIBRARY_IMPL(deconvseg, CPU, m) {
  m.impl("max_pool2d_switches", &deconvseg::max_pool2d_switches_cpu);
  m.impl("max_unpool2d", &deconvseg::max_unpool2d_cpu);
  m.impl("max_pool2d_switches_backward", &deconvseg::max_pool2d_switches_backward_cpu);
  m.impl("max_unpool2d_backward", &deconvseg::max_unpool2d_backward_cpu);
}
