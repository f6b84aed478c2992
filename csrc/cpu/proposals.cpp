// Proposal paste-and-aggregate (DeconvNet's instance-wise inference) and its backward on the CPU.
// The exact semantics -- box rounding, bilinear sampling, fill, tie and NaN rules -- are in
// docs/proposals.md; deconvseg_fast/reference/proposals.py is the oracle.
//
//  * Forward: a gather. Each task owns whole output rows (image, channel, row) and, for every row,
//    visits the proposals of that image in increasing index order. A row is written by one task
//    only and the order of the max/sum over proposals is fixed, so results are bit-identical for
//    any thread count.
//  * Backward: the adjoint of the bilinear paste is a scatter into the score map. Each task owns
//    whole (proposal, channel) planes of the gradient and walks its box's pixels in row-major
//    order, so again no two tasks share an element and the summation order is fixed.
//  * The bilinear taps of every box row and column are computed once per call (P * (H + W)
//    entries at most), not once per pixel and channel.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace deconvseg {
namespace {

using at::Tensor;

// Box coordinates beyond +-2^24 are rejected: every derived integer then fits easily in int32 and
// the float32 sampling arithmetic stays meaningful. Same limit in deconvseg_fast/ops/proposals.py.
constexpr double kMaxCoord = 16777216.0;

enum class Mode { Max, Sum };

Mode parse_mode(c10::string_view mode) {
  if (mode == "max") return Mode::Max;
  if (mode == "sum") return Mode::Sum;
  TORCH_CHECK_VALUE(false, "mode must be 'max' or 'sum', got '", std::string(mode), "'");
}

// One proposal after rounding and clipping: it covers image rows [ya, yb) and columns [xa, xb) of
// image b (empty ranges for degenerate boxes or boxes outside the image). ylo/xlo and bh/bw are
// the unclipped integer box: its first row/column and its size, which fix the sampling scale.
struct Box {
  int64_t b, ya, yb, xa, xb, ylo, xlo, bh, bw;
};

// Bilinear taps of one image row or column: source indices i0 <= i1 and weights l0 + l1 = 1.
template <typename T>
struct Tap {
  int64_t i0, i1;
  T l0, l1;
};

void check_boxes(const Tensor& boxes, const Tensor& image_index, int64_t P) {
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(0) == P && boxes.size(1) == 4,
                    "boxes must be a [P, 4] tensor (x1, y1, x2, y2) with P = ", P, ", got ", boxes.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(boxes.scalar_type()), "boxes must be a floating-point tensor, got ",
                    boxes.scalar_type());
  TORCH_CHECK_VALUE(image_index.dim() == 1 && image_index.size(0) == P,
                    "image_index must be a [P] tensor with P = ", P, ", got ", image_index.sizes());
  TORCH_CHECK_VALUE(image_index.scalar_type() == at::kLong, "image_index must be int64, got ",
                    image_index.scalar_type());
  TORCH_CHECK_VALUE(P <= std::numeric_limits<int32_t>::max(), "at most 2**31 - 1 proposals are supported, got ", P);
}

// Validates box values and image indices and rounds the boxes (docs/proposals.md, "Boxes").
std::vector<Box> make_boxes(const Tensor& boxes, const Tensor& image_index, int64_t B, int64_t H, int64_t W) {
  const int64_t P = boxes.size(0);
  const Tensor bx = boxes.to(at::kDouble).contiguous();  // [P, 4]
  const Tensor ix = image_index.contiguous();             // [P]
  const double* pb = bx.data_ptr<double>();
  const int64_t* pi = ix.data_ptr<int64_t>();
  std::vector<Box> out(P);
  for (int64_t p = 0; p < P; ++p) {
    const double* v = pb + 4 * p;
    for (int k = 0; k < 4; ++k) {
      TORCH_CHECK_VALUE(std::isfinite(v[k]), "boxes must be finite, got ", v[k], " in proposal ", p);
      TORCH_CHECK_VALUE(std::abs(v[k]) <= kMaxCoord, "boxes must have coordinates within +-2**24, got ", v[k],
                        " in proposal ", p);
    }
    TORCH_CHECK_VALUE(pi[p] >= 0 && pi[p] < B, "image_index must be in [0, ", B, ") for a batch of ", B,
                      " images, got ", pi[p], " for proposal ", p);
    Box& o = out[p];
    o.b = pi[p];
    o.xlo = static_cast<int64_t>(std::floor(v[0]));
    o.ylo = static_cast<int64_t>(std::floor(v[1]));
    const int64_t xhi = static_cast<int64_t>(std::ceil(v[2]));
    const int64_t yhi = static_cast<int64_t>(std::ceil(v[3]));
    o.bw = xhi - o.xlo;
    o.bh = yhi - o.ylo;
    const bool valid = v[2] > v[0] && v[3] > v[1];
    o.xa = std::clamp<int64_t>(o.xlo, 0, W);
    o.xb = valid ? std::clamp<int64_t>(xhi, 0, W) : o.xa;
    o.ya = std::clamp<int64_t>(o.ylo, 0, H);
    o.yb = valid ? std::clamp<int64_t>(yhi, 0, H) : o.ya;
    if (o.xb < o.xa) o.xb = o.xa;
    if (o.yb < o.ya) o.yb = o.ya;
  }
  return out;
}

// torch's bilinear source index (align_corners=False, no scale_factor): scale = n / size computed
// in T, src = scale * (d + 0.5) - 0.5 clamped at 0, for d = pos - lo in [0, size).
template <typename T>
void axis_taps(int64_t lo, int64_t size, int64_t a, int64_t b, int64_t n, Tap<T>* out) {
  const T scale = static_cast<T>(n) / static_cast<T>(size);
  for (int64_t pos = a; pos < b; ++pos) {
    T src = scale * (static_cast<T>(pos - lo) + static_cast<T>(0.5)) - static_cast<T>(0.5);
    if (src < 0) src = 0;
    const int64_t i0 = std::min<int64_t>(static_cast<int64_t>(src), n - 1);
    const T l1 = std::min(std::max(src - static_cast<T>(i0), static_cast<T>(0)), static_cast<T>(1));
    out[pos - a] = {i0, i0 + (i0 < n - 1 ? 1 : 0), static_cast<T>(1) - l1, l1};
  }
}

// Row and column taps of every proposal's clipped box, concatenated; rows of proposal p start at
// row_off[p], its columns at col_off[p].
template <typename T>
struct TapTables {
  std::vector<Tap<T>> rows, cols;
  std::vector<int64_t> row_off, col_off;
  TapTables(const std::vector<Box>& boxes, int64_t h, int64_t w) : row_off(boxes.size()), col_off(boxes.size()) {
    int64_t nr = 0, nc = 0;
    for (size_t p = 0; p < boxes.size(); ++p) {
      row_off[p] = nr;
      col_off[p] = nc;
      nr += boxes[p].yb - boxes[p].ya;
      nc += boxes[p].xb - boxes[p].xa;
    }
    rows.resize(nr);
    cols.resize(nc);
    for (size_t p = 0; p < boxes.size(); ++p) {
      const Box& o = boxes[p];
      axis_taps<T>(o.ylo, o.bh, o.ya, o.yb, h, rows.data() + row_off[p]);
      axis_taps<T>(o.xlo, o.bw, o.xa, o.xb, w, cols.data() + col_off[p]);
    }
  }
};

// Proposals grouped by image, each group in increasing proposal index: proposals of image b are
// order[start[b] .. start[b + 1]).
void group_by_image(const std::vector<Box>& boxes, int64_t B, std::vector<int64_t>& start,
                    std::vector<int64_t>& order) {
  start.assign(B + 1, 0);
  for (const Box& o : boxes) ++start[o.b + 1];
  for (int64_t b = 0; b < B; ++b) start[b + 1] += start[b];
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  order.resize(boxes.size());
  for (size_t p = 0; p < boxes.size(); ++p) order[next[boxes[p].b]++] = static_cast<int64_t>(p);
}

template <typename scalar_t>
void paste_forward(const scalar_t* S,  // [P, C, h, w] contiguous
                   scalar_t* O,        // [B, C, H, W] contiguous
                   int32_t* winner,    // [B, C, H, W] contiguous, or nullptr (mode sum)
                   const std::vector<Box>& boxes, int64_t B, int64_t C, int64_t H, int64_t W, int64_t h,
                   int64_t w, Mode mode, double fill) {
  using acc_t = at::opmath_type<scalar_t>;
  const TapTables<acc_t> taps(boxes, h, w);
  std::vector<int64_t> start, order;
  group_by_image(boxes, B, start, order);
  const scalar_t fill_v = static_cast<scalar_t>(fill);
  at::parallel_for(0, B * C * H, std::max<int64_t>(1, 8192 / std::max<int64_t>(W, 1)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(W);
    std::vector<int32_t> who(W);  // covering proposal (max: the winner so far), -1 = none yet
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = r % H, c = (r / H) % C, b = r / (H * C);
      std::fill(acc.begin(), acc.end(), static_cast<acc_t>(0));
      std::fill(who.begin(), who.end(), -1);
      for (int64_t k = start[b]; k < start[b + 1]; ++k) {
        const int64_t p = order[k];
        const Box& o = boxes[p];
        if (y < o.ya || y >= o.yb) continue;
        const Tap<acc_t> ty = taps.rows[taps.row_off[p] + (y - o.ya)];
        const scalar_t* plane = S + (p * C + c) * h * w;
        const scalar_t* r0 = plane + ty.i0 * w;
        const scalar_t* r1 = plane + ty.i1 * w;
        const Tap<acc_t>* tx = taps.cols.data() + taps.col_off[p] - o.xa;
        const int32_t p32 = static_cast<int32_t>(p);
        for (int64_t x = o.xa; x < o.xb; ++x) {
          const Tap<acc_t>& t = tx[x];
          // torch's upsample_bilinear2d evaluation order
          const acc_t v = ty.l0 * (t.l0 * static_cast<acc_t>(r0[t.i0]) + t.l1 * static_cast<acc_t>(r0[t.i1])) +
                          ty.l1 * (t.l0 * static_cast<acc_t>(r1[t.i0]) + t.l1 * static_cast<acc_t>(r1[t.i1]));
          if (mode == Mode::Max) {
            // strict > keeps the lowest index among equal maxima; the first NaN wins and stays
            const acc_t m = acc[x];
            if (who[x] < 0 || v > m || (v != v && m == m)) {
              acc[x] = v;
              who[x] = p32;
            }
          } else {
            acc[x] += v;
            who[x] = p32;
          }
        }
      }
      scalar_t* dst = O + r * W;
      for (int64_t x = 0; x < W; ++x) dst[x] = who[x] < 0 ? fill_v : static_cast<scalar_t>(acc[x]);
      if (winner != nullptr) std::copy(who.begin(), who.end(), winner + r * W);
    }
  });
}

template <typename scalar_t>
void paste_backward(const scalar_t* G,       // [B, C, H, W] contiguous
                    const int32_t* winner,   // [B, C, H, W] contiguous, or nullptr (mode sum)
                    scalar_t* GS,            // [P, C, h, w] contiguous
                    const std::vector<Box>& boxes, int64_t C, int64_t H, int64_t W, int64_t h, int64_t w) {
  using acc_t = at::opmath_type<scalar_t>;
  const TapTables<acc_t> taps(boxes, h, w);
  const int64_t P = static_cast<int64_t>(boxes.size());
  at::parallel_for(0, P * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> g(h * w);
    for (int64_t q = begin; q < end; ++q) {
      const int64_t p = q / C, c = q % C;
      const Box& o = boxes[p];
      std::fill(g.begin(), g.end(), static_cast<acc_t>(0));
      const Tap<acc_t>* tx = taps.cols.data() + taps.col_off[p] - o.xa;
      for (int64_t y = o.ya; y < o.yb; ++y) {
        const Tap<acc_t> ty = taps.rows[taps.row_off[p] + (y - o.ya)];
        const int64_t row = ((o.b * C + c) * H + y) * W;
        const scalar_t* gr = G + row;
        const int32_t* wr = winner != nullptr ? winner + row : nullptr;
        acc_t* g0 = g.data() + ty.i0 * w;
        acc_t* g1 = g.data() + ty.i1 * w;
        for (int64_t x = o.xa; x < o.xb; ++x) {
          if (wr != nullptr && wr[x] != p) continue;
          const Tap<acc_t>& t = tx[x];
          const acc_t gv = static_cast<acc_t>(gr[x]);
          const acc_t a0 = ty.l0 * gv, a1 = ty.l1 * gv;
          g0[t.i0] += a0 * t.l0;
          g0[t.i1] += a0 * t.l1;
          g1[t.i0] += a1 * t.l0;
          g1[t.i1] += a1 * t.l1;
        }
      }
      scalar_t* dst = GS + q * h * w;
      for (int64_t k = 0; k < h * w; ++k) dst[k] = static_cast<scalar_t>(g[k]);
    }
  });
}

void check_scores(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be a 4-D tensor, got ", t.dim(), " dims");
  const auto st = t.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                    name, " must be float32, float64, float16 or bfloat16, got ", st);
}

std::tuple<Tensor, Tensor> paste_aggregate_cpu(const Tensor& scores, const Tensor& boxes, const Tensor& image_index,
                                               at::IntArrayRef output_size, c10::string_view mode_name, double fill) {
  check_scores(scores, "scores");
  const Mode mode = parse_mode(mode_name);
  TORCH_CHECK_VALUE(output_size.size() == 3, "output_size must be (B, H, W), got ", output_size);
  const int64_t B = output_size[0], H = output_size[1], W = output_size[2];
  TORCH_CHECK_VALUE(B >= 0 && H >= 0 && W >= 0, "output_size must be non-negative, got ", output_size);
  const int64_t P = scores.size(0), C = scores.size(1), h = scores.size(2), w = scores.size(3);
  TORCH_CHECK_VALUE(h > 0 && w > 0, "scores must have non-zero height and width, got ", scores.sizes());
  check_boxes(boxes, image_index, P);
  const std::vector<Box> bx = make_boxes(boxes, image_index, B, H, W);
  Tensor out = at::empty({B, C, H, W}, scores.options());
  Tensor winner = mode == Mode::Max ? at::empty({B, C, H, W}, scores.options().dtype(at::kInt))
                                    : at::empty({0}, scores.options().dtype(at::kInt));
  if (out.numel() == 0) return {out, winner};
  const Tensor s = scores.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "paste_aggregate", [&] {
    paste_forward<scalar_t>(s.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                            mode == Mode::Max ? winner.data_ptr<int32_t>() : nullptr, bx, B, C, H, W, h, w, mode,
                            fill);
  });
  return {out, winner};
}

Tensor paste_aggregate_backward_cpu(const Tensor& grad_out, const Tensor& winner, const Tensor& boxes,
                                    const Tensor& image_index, at::IntArrayRef score_size,
                                    c10::string_view mode_name) {
  check_scores(grad_out, "grad_out");
  const Mode mode = parse_mode(mode_name);
  TORCH_CHECK_VALUE(score_size.size() == 2 && score_size[0] > 0 && score_size[1] > 0,
                    "score_size must be two positive ints (h, w), got ", score_size);
  const int64_t B = grad_out.size(0), C = grad_out.size(1), H = grad_out.size(2), W = grad_out.size(3);
  const int64_t P = boxes.dim() >= 1 ? boxes.size(0) : 0;
  const int64_t h = score_size[0], w = score_size[1];
  check_boxes(boxes, image_index, P);
  if (mode == Mode::Max) {
    TORCH_CHECK_VALUE(winner.scalar_type() == at::kInt && winner.sizes() == grad_out.sizes(),
                      "winner must be an int32 tensor shaped like grad_out ", grad_out.sizes(), ", got ",
                      winner.scalar_type(), " ", winner.sizes());
  }
  const std::vector<Box> bx = make_boxes(boxes, image_index, B, H, W);
  Tensor grad = at::empty({P, C, h, w}, grad_out.options());
  if (grad.numel() == 0) return grad;
  const Tensor g = grad_out.contiguous();
  const Tensor win = mode == Mode::Max ? winner.contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "paste_aggregate_backward", [&] {
    paste_backward<scalar_t>(g.data_ptr<scalar_t>(), mode == Mode::Max ? win.data_ptr<int32_t>() : nullptr,
                             grad.data_ptr<scalar_t>(), bx, C, H, W, h, w);
  });
  return grad;
}

}  // namespace
}  // namespace deconvseg

TORCH_LIBRARY_IMPL(deconvseg, CPU, m) {
  m.impl("paste_aggregate", &deconvseg::paste_aggregate_cpu);
  m.impl("paste_aggregate_backward", &deconvseg::paste_aggregate_backward_cpu);
}
