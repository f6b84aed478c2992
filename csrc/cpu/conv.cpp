// Atrous (dilated) convolution with a fused epilogue on the CPU:
//   y = act((conv(x, w) + bias) * scale + shift),  act = identity | relu.
//
// The convolution itself is ATen's (at::convolution, which dispatches to oneDNN for the shapes that
// matter): a hand-written direct or im2col kernel on two cores cannot beat oneDNN's JIT'd
// dilated kernels, and the issue asks for the fastest correct path. What we add is the epilogue:
//  * the bias goes into oneDNN's convolution, which adds it in the fp32 accumulator before the
//    single rounding to the output dtype (no extra pass, and bit-identical to F.conv2d);
//  * the folded batch-norm scale/shift and the ReLU then run in place over the convolution's own
//    output in ONE vectorised pass -- torch's conv -> bn -> relu reads and writes the activation
//    three times and allocates two extra tensors.
// The output therefore has exactly the strides at::convolution gives (NCHW, or channels_last when
// the input or weight suggests it -- torch's rule), which is what register_fake reproduces.
//
// A packed weight (an MKLDNN-layout tensor from deconvseg_fast.functional.pack_conv_weight, what
// deconvseg_fast.freeze() stores in each convolution for inference) skips oneDNN's weight reorder,
// which at::convolution repeats on every call: the convolution is then oneDNN's
// mkldnn::_convolution_pointwise (Inductor's CPU convolution) with the ReLU as its post-op when
// there is no scale/shift, so the output is written once. The output takes the input's memory
// format (suggest_memory_format); oneDNN may pick a different kernel than for the plain weight, so
// results agree with F.conv2d to rounding rather than bit for bit.
//
// Two plain-weight shapes leave at::convolution, each where it measured faster (details at
// window_is_whole_input and mostly_padding_nchw): a kernel as large as its input is one GEMM, and
// an NCHW call that is mostly padding packs its weight for the call. Both agree with F.conv2d to
// rounding; every other call is at::convolution's bits.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "simd.h"

namespace deconvseg {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// Epilogue loops. One call handles `n` consecutive elements whose channel is either fixed
// (NCHW plane: s, t scalars broadcast) or cycles with the position (NHWC pixel: s[c], t[c]).
// Plain loops compiled per vector width (DSF_MULTIVERSION) so GCC vectorises them; `v < 0 ? 0 : v`
// keeps NaN as NaN like torch.relu.
// ---------------------------------------------------------------------------------------------

template <typename T>
DSF_MULTIVERSION void affine_plane(T* __restrict y, int64_t n, T s, T t, bool relu) {
  if (relu) {
    for (int64_t i = 0; i < n; ++i) {
      const T v = y[i] * s + t;
      y[i] = v < T(0) ? T(0) : v;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = y[i] * s + t;
  }
}

template <typename T>
DSF_MULTIVERSION void affine_pixels(T* __restrict y, int64_t pixels, int64_t C, const T* __restrict s,
                                    const T* __restrict t, bool relu) {
  for (int64_t p = 0; p < pixels; ++p) {
    T* __restrict row = y + p * C;
    if (relu) {
      for (int64_t c = 0; c < C; ++c) {
        const T v = row[c] * s[c] + t[c];
        row[c] = v < T(0) ? T(0) : v;
      }
    } else {
      for (int64_t c = 0; c < C; ++c) row[c] = row[c] * s[c] + t[c];
    }
  }
}

// bfloat16 as raw bits: widening is a shift and narrowing is round-to-nearest-even on the integer
// (NaN kept quiet), both branch-free so the loops vectorise; c10::BFloat16's conversions do not.
inline float bf16_to_float(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : uint16_t(rounded);
}

DSF_MULTIVERSION void affine_plane_bf16(uint16_t* __restrict y, int64_t n, float s, float t, bool relu) {
  for (int64_t i = 0; i < n; ++i) {
    float v = bf16_to_float(y[i]) * s + t;
    if (relu) v = v < 0.f ? 0.f : v;
    y[i] = float_to_bf16(v);
  }
}

DSF_MULTIVERSION void affine_pixels_bf16(uint16_t* __restrict y, int64_t pixels, int64_t C,
                                         const float* __restrict s, const float* __restrict t, bool relu) {
  for (int64_t p = 0; p < pixels; ++p) {
    uint16_t* __restrict row = y + p * C;
    for (int64_t c = 0; c < C; ++c) {
      float v = bf16_to_float(row[c]) * s[c] + t[c];
      if (relu) v = v < 0.f ? 0.f : v;
      row[c] = float_to_bf16(v);
    }
  }
}

// float16 goes through c10::Half's conversions (scalar; fp16 on the CPU is a storage format here).
void affine_plane_half(at::Half* y, int64_t n, float s, float t, bool relu) {
  for (int64_t i = 0; i < n; ++i) {
    float v = float(y[i]) * s + t;
    if (relu) v = v < 0.f ? 0.f : v;
    y[i] = at::Half(v);
  }
}

void affine_pixels_half(at::Half* y, int64_t pixels, int64_t C, const float* s, const float* t, bool relu) {
  for (int64_t p = 0; p < pixels; ++p)
    for (int64_t c = 0; c < C; ++c) {
      float v = float(y[p * C + c]) * s[c] + t[c];
      if (relu) v = v < 0.f ? 0.f : v;
      y[p * C + c] = at::Half(v);
    }
}

// Elements per parallel task: large enough that a task's cost dwarfs OpenMP's fork/barrier.
constexpr int64_t kGrainElems = 1 << 15;

// y [N, C, H, W], contiguous NCHW or channels_last, modified in place.
// s, t [C] in the op-math type of y (float for bf16/half, else y's type).
template <typename scalar_t>
void epilogue_(Tensor& y, const Tensor& s, const Tensor& t, bool relu) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  const opmath_t* sp = s.const_data_ptr<opmath_t>();
  const opmath_t* tp = t.const_data_ptr<opmath_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const bool nhwc = !y.is_contiguous() && y.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (nhwc) {
    const int64_t pixels = N * HW;
    at::parallel_for(0, pixels, std::max<int64_t>(1, kGrainElems / C), [&](int64_t begin, int64_t end) {
      scalar_t* base = yp + begin * C;
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
        affine_pixels_bf16(reinterpret_cast<uint16_t*>(base), end - begin, C, sp, tp, relu);
      } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
        affine_pixels_half(base, end - begin, C, sp, tp, relu);
      } else {
        affine_pixels<scalar_t>(base, end - begin, C, sp, tp, relu);
      }
    });
    return;
  }
  at::parallel_for(0, N * C, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(HW, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % C;
      scalar_t* base = yp + plane * HW;
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
        affine_plane_bf16(reinterpret_cast<uint16_t*>(base), HW, sp[c], tp[c], relu);
      } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
        affine_plane_half(base, HW, sp[c], tp[c], relu);
      } else {
        affine_plane<scalar_t>(base, HW, sp[c], tp[c], relu);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Validation (the Python layer checks the same things first, with the same messages; these keep
// a direct torch.ops call memory-safe).
// ---------------------------------------------------------------------------------------------
void check_pair(at::IntArrayRef v, const char* name, int64_t min_value) {
  TORCH_CHECK_VALUE(v.size() == 2, name, " must have 2 elements, got ", v.size());
  TORCH_CHECK_VALUE(v[0] >= min_value && v[1] >= min_value, name, " must be ",
                    min_value > 0 ? "positive" : "non-negative", ", got (", v[0], ", ", v[1], ")");
}

void check_channel_vector(const c10::optional<Tensor>& v, const char* name, const Tensor& input, int64_t C) {
  if (!v.has_value() || !v->defined()) return;
  TORCH_CHECK_VALUE(v->dim() == 1 && v->size(0) == C, name, " must be a 1-D tensor of ", C,
                    " elements (one per output channel), got shape ", v->sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(v->scalar_type()), name, " must be a floating-point tensor, got ",
                    v->scalar_type());
  TORCH_CHECK_VALUE(v->device() == input.device(), name, " must be on ", input.device(), ", got ", v->device());
}

// oneDNN's convolution with a prepacked weight and an optional fused ReLU. Called through the
// dispatcher (boxed, so the exact C++ signature of the op -- which has changed between torch
// releases -- does not matter); the op is registered whenever torch is built with oneDNN.
const std::optional<c10::OperatorHandle>& convolution_pointwise_op() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_convolution_pointwise", ""});
  return op;
}

Tensor convolution_pointwise(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                             bool relu) {
  TORCH_CHECK(convolution_pointwise_op().has_value(), "weight: packed weights need torch's oneDNN convolution "
              "(mkldnn::_convolution_pointwise), which this torch build does not have");
  const c10::OperatorHandle& op = *convolution_pointwise_op();
  torch::jit::Stack stack;
  stack.reserve(10);
  stack.emplace_back(input.contiguous(input.suggest_memory_format()));
  stack.emplace_back(weight);
  stack.emplace_back(bias.has_value() && bias->defined() ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(padding.vec());
  stack.emplace_back(stride.vec());
  stack.emplace_back(dilation.vec());
  stack.emplace_back(int64_t(1));
  stack.emplace_back(std::string(relu ? "relu" : "none"));
  stack.emplace_back(c10::List<c10::optional<at::Scalar>>());
  stack.emplace_back(c10::IValue());
  op.callBoxed(&stack);
  // oneDNN sometimes answers channels_last for an NCHW input; the contract is the input's format.
  const auto format = input.suggest_memory_format();
  Tensor y = stack.back().toTensor();
  return y.is_contiguous(format) ? y : y.contiguous(format);
}

// A kernel as large as its unpadded, undilated input (DeconvNet's fc6: 7x7 over pool5's 7x7) has one
// output pixel per image: the convolution is the matrix product [N, C_in kH kW] x [C_in kH kW, C_out]
// of the flattened input and weight, both flattened in their shared memory order (a view, no copy).
// oneDNN's convolution handles that shape badly in two of its layouts -- it reorders the whole
// weight (411 MB for fc6) on each call: with torch 2.13 on this project's 2-core CPU, fc6 took
// 210-250 ms per NCHW call at batch 1-4 and per channels_last call at batch 1, against 25-70 ms as
// a GEMM -- while channels_last batches of 2 or more run well (22-25 ms). So those two cases take
// the GEMM; floating-point sums then come in another order than at::convolution's.
bool window_is_whole_input(const Tensor& input, const Tensor& weight, at::IntArrayRef padding,
                           at::IntArrayRef dilation) {
  if (padding[0] != 0 || padding[1] != 0 || dilation[0] != 1 || dilation[1] != 1) return false;
  if (input.size(2) != weight.size(2) || input.size(3) != weight.size(3) || input.size(0) == 0) return false;
  const auto st = input.scalar_type();
  if (st != at::kFloat && st != at::kDouble) return false;
  const auto fmt = input.suggest_memory_format();
  if (weight.suggest_memory_format() != fmt || !input.is_contiguous(fmt) || !weight.is_contiguous(fmt)) return false;
  return fmt == at::MemoryFormat::Contiguous || input.size(0) == 1;
}

Tensor whole_window_matmul(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias) {
  const int64_t N = input.size(0), C = weight.size(0);
  const bool nhwc = input.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  // Flattened in memory order: (c, h, w) for NCHW, (h, w, c) for channels_last.
  const Tensor x = nhwc ? input.permute({0, 2, 3, 1}).reshape({N, -1}) : input.reshape({N, -1});
  const Tensor w = nhwc ? weight.permute({0, 2, 3, 1}).reshape({C, -1}) : weight.reshape({C, -1});
  // at::convolution's output layout for these operands (channels_last if either suggests it).
  Tensor y = at::empty({N, C, 1, 1}, input.options().memory_format(input.suggest_memory_format()));
  Tensor y2 = y.view({N, C});
  if (bias.has_value() && bias->defined()) {
    at::addmm_out(y2, *bias, x, w.t());
  } else {
    at::mm_out(y2, x, w.t());
  }
  return y;
}

// Fraction of a kernel's taps, over all output pixels, that land inside the input (not padding).
double inside_fraction(const Tensor& input, const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation) {
  double frac = 1.0;
  for (int d = 0; d < 2; ++d) {
    const int64_t H = input.size(2 + d), k = weight.size(2 + d);
    const int64_t out = (H + 2 * padding[d] - dilation[d] * (k - 1) - 1) / stride[d] + 1;
    int64_t inside = 0;
    for (int64_t o = 0; o < out; ++o)
      for (int64_t t = 0; t < k; ++t) {
        const int64_t h = o * stride[d] - padding[d] + t * dilation[d];
        inside += h >= 0 && h < H;
      }
    frac *= out > 0 ? double(inside) / double(out * k) : 1.0;
  }
  return frac;
}

// An NCHW float32 call whose taps fall into the padding for over a quarter of the work (DeepLab's
// fc6, dilation 12 on a 41x41 map: 35 %). at::convolution's NCHW path computes those taps; oneDNN's
// convolution with a weight packed for this input skips them, and gains more than the pack costs
// (fc6: 70-78 ms against 92-95 ms on this project's 2-core CPU, pack included). Where little of
// the work is padding (conv5, dilation 2: 6 %) the per-call pack costs more than it saves.
bool mostly_padding_nchw(const Tensor& input, const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation) {
  if (input.scalar_type() != at::kFloat || !at::hasMKLDNN() || !convolution_pointwise_op().has_value() ||
      input.size(0) == 0)
    return false;
  if (!input.is_contiguous() || !weight.is_contiguous() || input.size(1) < 64) return false;
  return inside_fraction(input, weight, stride, padding, dilation) < 0.75;
}

// The weight reordered by oneDNN for this input and geometry (what pack_conv_weight does).
Tensor pack_for(const Tensor& weight, const Tensor& input, at::IntArrayRef stride, at::IntArrayRef padding,
                at::IntArrayRef dilation) {
  return at::mkldnn_reorder_conv2d_weight(weight.contiguous().to_mkldnn(), padding, stride, dilation, 1,
                                          input.sizes());
}

bool parse_activation(c10::string_view activation) {
  if (activation == "relu") return true;
  TORCH_CHECK_VALUE(activation == "none", "activation must be 'none' or 'relu', got '", std::string(activation),
                    "'");
  return false;
}

Tensor atrous_conv2d_cpu(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                         const c10::optional<Tensor>& scale, const c10::optional<Tensor>& shift,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                         c10::string_view activation) {
  const bool relu = parse_activation(activation);
  TORCH_CHECK_VALUE(input.dim() == 4, "input must be a 4-D [N, C, H, W] tensor, got ", input.dim(), " dims");
  TORCH_CHECK_VALUE(weight.dim() == 4, "weight must be a 4-D [C_out, C_in, kH, kW] tensor, got ", weight.dim(),
                    " dims");
  const auto st = input.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                    "input must be float32, float64, float16 or bfloat16, got ", st);
  TORCH_CHECK_VALUE(weight.scalar_type() == st, "weight must have the dtype of input (", st, "), got ",
                    weight.scalar_type());
  TORCH_CHECK_VALUE(weight.size(1) == input.size(1), "weight must have C_in = ", input.size(1),
                    " input channels (groups = 1), got weight of shape ", weight.sizes());
  check_pair(stride, "stride", 1);
  check_pair(dilation, "dilation", 1);
  check_pair(padding, "padding", 0);
  const int64_t C = weight.size(0);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == C, "bias must be a 1-D tensor of ", C,
                      " elements, got shape ", bias->sizes());
    TORCH_CHECK_VALUE(bias->scalar_type() == st, "bias must have the dtype of input (", st, "), got ",
                      bias->scalar_type());
  }
  check_channel_vector(scale, "scale", input, C);
  check_channel_vector(shift, "shift", input, C);
  for (int d = 0; d < 2; ++d) {
    const int64_t span = dilation[d] * (weight.size(2 + d) - 1) + 1;
    TORCH_CHECK_VALUE(input.size(2 + d) + 2 * padding[d] >= span, "input of size ", input.sizes(),
                      " is too small for a kernel of extent ", span, " (dilation ", dilation[d], ") with padding ",
                      padding[d], " in dim ", 2 + d);
  }

  const bool has_scale = scale.has_value() && scale->defined();
  const bool has_shift = shift.has_value() && shift->defined();
  if (weight.is_mkldnn()) {
    TORCH_CHECK_VALUE(st == at::kFloat || st == at::kBFloat16,
                      "a packed weight needs a float32 or bfloat16 input, got ", st);
    TORCH_CHECK_VALUE(!input.is_mkldnn(), "input must be a dense (strided) tensor, got an MKLDNN tensor");
  }
  // A packed weight: the caller's, or one packed for this call when the call is mostly padding.
  const Tensor packed = weight.is_mkldnn() ? weight
                        : mostly_padding_nchw(input, weight, stride, padding, dilation)
                            ? pack_for(weight, input, stride, padding, dilation)
                            : Tensor();
  Tensor y;
  if (packed.defined()) {
    // Without scale/shift the ReLU is oneDNN's post-op and the output is final.
    y = convolution_pointwise(input, packed, bias, stride, padding, dilation, relu && !has_scale && !has_shift);
    if (!has_scale && !has_shift) return y;
  } else if (window_is_whole_input(input, weight, padding, dilation)) {
    y = whole_window_matmul(input, weight, bias);
  } else {
    y = at::convolution(input, weight, bias, stride, padding, dilation, /*transposed=*/false,
                        /*output_padding=*/{0, 0}, /*groups=*/1);
  }
  if ((!has_scale && !has_shift && !relu) || y.numel() == 0) return y;
  // at::convolution returns NCHW or channels_last; anything else would be a torch change, so fall
  // back to making it contiguous (the epilogue then still runs in one pass).
  if (!y.is_contiguous() && !y.is_contiguous(at::MemoryFormat::ChannelsLast)) y = y.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "atrous_conv2d_epilogue", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto opts = y.options().dtype(c10::CppTypeToScalarType<opmath_t>::value);
    const Tensor s = has_scale ? scale->to(opts).contiguous() : at::ones({C}, opts);
    const Tensor t = has_shift ? shift->to(opts).contiguous() : at::zeros({C}, opts);
    epilogue_<scalar_t>(y, s, t, relu);
  });
  return y;
}

}  // namespace
}  // namespace deconvseg

TORCH_LIBRARY_IMPL(deconvseg, CPU, m) {
  m.impl("atrous_conv2d", &deconvseg::atrous_conv2d_cpu);
}

// A packed (MKLDNN-layout) weight puts the call under the MkldnnCPU key; the same kernel serves it.
TORCH_LIBRARY_IMPL(deconvseg, MkldnnCPU, m) {
  m.impl("atrous_conv2d", &deconvseg::atrous_conv2d_cpu);
}
