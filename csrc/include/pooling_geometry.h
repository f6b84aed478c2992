// Window geometry and switch decoding shared by the CPU and CUDA kernels. Everything here is
// __host__ __device__ so the CPU tests exercise exactly the index math the GPU runs.
#pragma once
#include <cstdint>

#include "hd.h"

namespace deconvseg {

enum class SwitchFormat : int { Flat = 0, Window = 1, Packed = 2 };

// torch's pooling_output_shape: floor/ceil division, and with ceil_mode the last window must start
// inside the input or its left padding.
DSF_HD int64_t pooled_extent(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  const int64_t num = in + 2 * p - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0);
  const int64_t q = num >= 0 ? num / s : -((-num + s - 1) / s);
  int64_t out = q + 1;
  if (ceil_mode && (out - 1) * s >= in + p) --out;
  return out;
}

// Default size of an unpooled plane (torch's (in-1)*s + k - 2p, generalised to dilation).
DSF_HD int64_t unpooled_extent(int64_t pooled, int64_t k, int64_t s, int64_t p, int64_t d) {
  return (pooled - 1) * s - 2 * p + d * (k - 1) + 1;
}

// First tap t of a window starting at `start` (= o*s - p) with start + t*d >= 0.
DSF_HD int64_t first_tap(int64_t start, int64_t d) {
  return start >= 0 ? 0 : (-start + d - 1) / d;
}

// One past the last tap t < k with start + t*d < in.
DSF_HD int64_t end_tap(int64_t start, int64_t k, int64_t d, int64_t in) {
  const int64_t room = in - start;
  if (room <= 0) return 0;
  const int64_t t = (room + d - 1) / d;
  return t < k ? t : k;
}

// Bit position of pooled column `ow` inside its packed byte.
DSF_HD int packed_shift(int64_t ow) { return static_cast<int>(ow & 3) * 2; }

DSF_HD int64_t packed_width(int64_t wo) { return (wo + 3) / 4; }

// Flat position of window code `code` of window (oh, ow) in an H x W plane, or -1 when the code is
// not a tap of the window or lands in padding: callers turn -1 into an error, never a write.
DSF_HD int64_t window_code_to_flat(int64_t code, int64_t oh, int64_t ow, int64_t kh, int64_t kw,
                                   int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                                   int64_t dw, int64_t H, int64_t W) {
  if (code < 0 || code >= kh * kw) return -1;
  const int64_t i = code / kw;
  const int64_t j = code - i * kw;
  const int64_t h = oh * sh - ph + i * dh;
  const int64_t w = ow * sw - pw + j * dw;
  if (h < 0 || h >= H || w < 0 || w >= W) return -1;
  return h * W + w;
}

}  // namespace deconvseg
