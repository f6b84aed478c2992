// Argument checks of the permutohedral-lattice ops, shared by the CPU (csrc/cpu/crf.cpp) and CUDA
// (csrc/cuda/crf.cu) kernels so that every device refuses bad input with the same ValueError.
// Host code only; the data-dependent checks (finite features, indices in range) stay with each
// kernel, which does them its own way.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "permutohedral.h"

namespace deconvseg {
namespace lattice {

// features [N, d] float32, 1 <= d <= kMaxDim, N >= 1, N (d+1) entries indexable with int32.
inline void check_features(const at::Tensor& features) {
  TORCH_CHECK_VALUE(features.dim() == 2, "features must be a 2-D [N, d] tensor, got ", features.dim(), " dims");
  TORCH_CHECK_VALUE(features.scalar_type() == at::kFloat, "features must be float32, got ", features.scalar_type());
  const int64_t N = features.size(0), d = features.size(1);
  TORCH_CHECK_VALUE(d >= 1 && d <= kMaxDim, "features must have 1 to ", kMaxDim, " dimensions, got ", d);
  TORCH_CHECK_VALUE(N >= 1, "features must have at least one point");
  TORCH_CHECK_VALUE(N * (d + 1) < (int64_t(1) << 31), "features: ", N, " points of dimension ", d,
                    " exceed the lattice's 32-bit indexing");
}

// The lattice's three tensors: shapes and dtypes (offsets [N, d+1] int32, weights like offsets
// float32, neighbors [d+1, M, 2] int32). Returns d+1.
inline int64_t check_lattice_tensors(const at::Tensor& offsets, const at::Tensor& weights,
                                     const at::Tensor& neighbors) {
  TORCH_CHECK_VALUE(offsets.dim() == 2 && offsets.scalar_type() == at::kInt, "offsets must be an int32 [N, d+1] tensor");
  TORCH_CHECK_VALUE(weights.sizes() == offsets.sizes() && weights.scalar_type() == at::kFloat,
                    "weights must be a float32 tensor shaped like offsets");
  const int64_t D1 = offsets.size(1);
  TORCH_CHECK_VALUE(D1 >= 2 && D1 <= kMaxDim + 1, "offsets must have d+1 columns for 1 <= d <= ", kMaxDim,
                    ", got ", D1);
  TORCH_CHECK_VALUE(neighbors.dim() == 3 && neighbors.size(0) == D1 && neighbors.size(2) == 2 &&
                        neighbors.scalar_type() == at::kInt,
                    "neighbors must be an int32 [d+1, M, 2] tensor");
  return D1;
}

// values [N, C] float32 or float64.
inline void check_values(const at::Tensor& values, int64_t N) {
  TORCH_CHECK_VALUE(values.dim() == 2 && values.size(0) == N, "values must be a [N, C] tensor with N = ", N,
                    " points, got ", values.sizes());
  TORCH_CHECK_VALUE(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble,
                    "values must be float32 or float64, got ", values.scalar_type());
}

// scale [N] of the values' dtype, when given.
inline void check_scale(const std::optional<at::Tensor>& scale, int64_t N, const at::Tensor& values) {
  if (!scale.has_value()) return;
  TORCH_CHECK_VALUE(scale->dim() == 1 && scale->size(0) == N && scale->scalar_type() == values.scalar_type(),
                    "scale must be a [", N, "] tensor of the values' dtype, got ", scale->sizes(), " ",
                    scale->scalar_type());
}

}  // namespace lattice
}  // namespace deconvseg
