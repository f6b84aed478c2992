// Permutohedral lattice on the CPU: build once per image, then filter any number of value channels.
//
// The lattice is returned as plain tensors so it can be built once and passed to every filter call
// (every mean-field iteration, and both directions of autograd):
//   offsets   [N, d+1] int32   vertex (0-based) of each corner of pixel i's enclosing simplex
//   weights   [N, d+1] float32 barycentric weight of each corner
//   neighbors [d+1, M, 2] int32 the two blur neighbours of each vertex along each lattice axis,
//                              1-based with 0 meaning "not in the lattice" (row 0 of the value
//                              buffer is kept at zero, so a missing neighbour adds nothing)
//   vertex_ptr [M+1] int32, splat_pixels [N*(d+1)] int32, splat_weights [N*(d+1)] float32: for each
//                              vertex, the pixels that splat into it and their weights, in
//                              increasing pixel order (CSR).
// Splatting gathers through the CSR lists instead of scattering with atomics, so every vertex sums
// its contributions in pixel order: the same bits for any thread count, and the same summation
// order as the sequential reference implementation.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "huge_pages.h"
#include "permutohedral.h"
#include "simd.h"

namespace deconvseg {
namespace {

using at::Tensor;

// Open-addressing table from a vertex's d coordinates to its index; indices follow first insertion.
class VertexTable {
 public:
  VertexTable(int d, int64_t expected) : d_(d) {
    int64_t cap = 64;
    while (cap < 2 * expected) cap <<= 1;
    slots_.assign(cap, -1);
    mask_ = cap - 1;
    keys_.reserve(expected * d);
  }

  int32_t insert(const int32_t* key) {
    uint64_t h = hash(key);
    while (true) {
      int32_t& slot = slots_[h & mask_];
      if (slot < 0) {
        slot = static_cast<int32_t>(size());
        keys_.insert(keys_.end(), key, key + d_);
        return slot;
      }
      if (std::memcmp(&keys_[static_cast<int64_t>(slot) * d_], key, d_ * sizeof(int32_t)) == 0) return slot;
      ++h;
    }
  }

  int32_t find(const int32_t* key) const {
    uint64_t h = hash(key);
    while (true) {
      const int32_t slot = slots_[h & mask_];
      if (slot < 0) return -1;
      if (std::memcmp(&keys_[static_cast<int64_t>(slot) * d_], key, d_ * sizeof(int32_t)) == 0) return slot;
      ++h;
    }
  }

  int64_t size() const { return static_cast<int64_t>(keys_.size()) / d_; }
  const int32_t* key(int64_t v) const { return &keys_[v * d_]; }

 private:
  uint64_t hash(const int32_t* key) const {
    uint64_t h = 0;
    for (int i = 0; i < d_; ++i) h = (h + static_cast<uint32_t>(key[i])) * 2531011ULL;
    return h ^ (h >> 29);
  }

  int d_;
  int64_t mask_;
  std::vector<int32_t> slots_;
  std::vector<int32_t> keys_;
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> permutohedral_lattice_cpu(const Tensor& features_in) {
  TORCH_CHECK_VALUE(features_in.dim() == 2, "features must be a 2-D [N, d] tensor, got ", features_in.dim(), " dims");
  TORCH_CHECK_VALUE(features_in.scalar_type() == at::kFloat, "features must be float32, got ",
                    features_in.scalar_type());
  const int64_t N = features_in.size(0);
  const int d = static_cast<int>(features_in.size(1));
  TORCH_CHECK_VALUE(d >= 1 && d <= lattice::kMaxDim, "features must have 1 to ", lattice::kMaxDim,
                    " dimensions, got ", d);
  TORCH_CHECK_VALUE(N >= 1, "features must have at least one point");
  TORCH_CHECK_VALUE(N * (d + 1) < (int64_t(1) << 31), "features: ", N, " points of dimension ", d,
                    " exceed the lattice's 32-bit indexing");
  const Tensor features = features_in.contiguous();
  TORCH_CHECK_VALUE(at::isfinite(features).all().item<bool>(), "features must be finite (found NaN or Inf)");
  const float* f = features.const_data_ptr<float>();
  const int D1 = d + 1;

  float scale[lattice::kMaxDim];
  for (int i = 0; i < d; ++i) scale[i] = lattice::axis_scale(i, d);

  // 1. Every pixel's simplex, in parallel: keys [N, d+1, d] and weights [N, d+1].
  std::vector<int32_t> keys(static_cast<size_t>(N) * D1 * d);
  Tensor weights = at::empty({N, D1}, features.options());
  float* w = weights.mutable_data_ptr<float>();
  at::parallel_for(0, N, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      lattice::enclosing_simplex(f + i * d, d, scale, keys.data() + i * D1 * d, w + i * D1);
  });

  // 2. Vertex numbering, sequential in (pixel, corner) order so it never depends on threads.
  VertexTable table(d, N * D1 / 2 + 16);
  Tensor offsets = at::empty({N, D1}, features.options().dtype(at::kInt));
  int32_t* off = offsets.mutable_data_ptr<int32_t>();
  for (int64_t e = 0; e < N * D1; ++e) off[e] = table.insert(keys.data() + e * d);
  keys.clear();
  keys.shrink_to_fit();
  const int64_t M = table.size();

  // 3. Blur neighbours along each axis j: all coordinates -1 (resp. +1) except axis j, which moves
  //    by +d (resp. -d); the implicit last coordinate makes axis d "all coordinates -1 / +1".
  Tensor neighbors = at::empty({D1, M, 2}, offsets.options());
  int32_t* nb = neighbors.mutable_data_ptr<int32_t>();
  at::parallel_for(0, M, 1024, [&](int64_t begin, int64_t end) {
    int32_t n1[lattice::kMaxDim], n2[lattice::kMaxDim];
    for (int64_t v = begin; v < end; ++v) {
      const int32_t* key = table.key(v);
      for (int j = 0; j <= d; ++j) {
        for (int k = 0; k < d; ++k) {
          n1[k] = key[k] - 1;
          n2[k] = key[k] + 1;
        }
        if (j < d) {
          n1[j] = key[j] + d;
          n2[j] = key[j] - d;
        }
        nb[(j * M + v) * 2] = table.find(n1) + 1;
        nb[(j * M + v) * 2 + 1] = table.find(n2) + 1;
      }
    }
  });

  // 4. Splat lists: counting sort of the (pixel, corner) entries by vertex, stable in pixel order.
  Tensor vertex_ptr = at::zeros({M + 1}, offsets.options());
  Tensor splat_pixels = at::empty({N * D1}, offsets.options());
  Tensor splat_weights = at::empty({N * D1}, weights.options());
  int32_t* ptr = vertex_ptr.mutable_data_ptr<int32_t>();
  int32_t* pix = splat_pixels.mutable_data_ptr<int32_t>();
  float* sw = splat_weights.mutable_data_ptr<float>();
  for (int64_t e = 0; e < N * D1; ++e) ++ptr[off[e] + 1];
  for (int64_t v = 0; v < M; ++v) ptr[v + 1] += ptr[v];
  {
    std::vector<int32_t> fill(ptr, ptr + M);
    for (int64_t e = 0; e < N * D1; ++e) {
      const int32_t slot = fill[off[e]]++;
      pix[slot] = static_cast<int32_t>(e / D1);
      sw[slot] = w[e];
    }
  }
  return {offsets, weights, neighbors, vertex_ptr, splat_pixels, splat_weights};
}

void check_lattice(const Tensor& offsets, const Tensor& weights, const Tensor& neighbors, const Tensor& vertex_ptr,
                   const Tensor& splat_pixels, const Tensor& splat_weights) {
  TORCH_CHECK_VALUE(offsets.dim() == 2 && offsets.scalar_type() == at::kInt, "offsets must be an int32 [N, d+1] tensor");
  TORCH_CHECK_VALUE(weights.sizes() == offsets.sizes() && weights.scalar_type() == at::kFloat,
                    "weights must be a float32 tensor shaped like offsets");
  const int64_t D1 = offsets.size(1);
  TORCH_CHECK_VALUE(neighbors.dim() == 3 && neighbors.size(0) == D1 && neighbors.size(2) == 2 &&
                        neighbors.scalar_type() == at::kInt,
                    "neighbors must be an int32 [d+1, M, 2] tensor");
  const int64_t M = neighbors.size(1);
  TORCH_CHECK_VALUE(vertex_ptr.dim() == 1 && vertex_ptr.size(0) == M + 1 && vertex_ptr.scalar_type() == at::kInt,
                    "vertex_ptr must be an int32 [M+1] tensor");
  TORCH_CHECK_VALUE(splat_pixels.dim() == 1 && splat_pixels.size(0) == offsets.numel() &&
                        splat_pixels.scalar_type() == at::kInt,
                    "splat_pixels must be an int32 [N*(d+1)] tensor");
  TORCH_CHECK_VALUE(splat_weights.sizes() == splat_pixels.sizes() && splat_weights.scalar_type() == at::kFloat,
                    "splat_weights must be a float32 tensor shaped like splat_pixels");
}

// Channels are processed in blocks of kLanes floats (one AVX-512 register): buffers are padded to
// a whole number of blocks, so every inner loop has a fixed trip count and no scalar remainder --
// with 21 labels a remainder loop would otherwise run 5 of every 21 channels one at a time.
template <typename T>
constexpr int64_t kLanes = 64 / sizeof(T);

// Splat vertices [begin, end): buf[v+1] = sum over the vertex's entries of weight * in[pixel].
template <typename T>
DSF_MULTIVERSION void splat_range(const T* __restrict in, const int32_t* __restrict ptr,
                                  const int32_t* __restrict pix, const float* __restrict pw, int64_t Cp,
                                  int64_t N, int64_t begin, int64_t end, T* __restrict buf, bool* bad) {
  for (int64_t v = begin; v < end; ++v) {
    T* acc = buf + (v + 1) * Cp;
    for (int32_t k = ptr[v]; k < ptr[v + 1]; ++k) {
      const int32_t p = pix[k];
      if (p < 0 || p >= N) { *bad = true; continue; }
      const T we = pw[k];
      const T* src = in + p * Cp;
      for (int64_t c0 = 0; c0 < Cp; c0 += kLanes<T>)
        for (int64_t c = c0; c < c0 + kLanes<T>; ++c) acc[c] += we * src[c];
    }
  }
}

// One blur pass along an axis: dst[v+1] = src[v+1] + (src[n1] + src[n2]) / 2.
template <typename T>
DSF_MULTIVERSION void blur_range(const T* __restrict src, const int32_t* __restrict nbj, int64_t Cp, int64_t M,
                                 int64_t begin, int64_t end, T* __restrict dst, bool* bad) {
  for (int64_t v = begin; v < end; ++v) {
    int32_t n1 = nbj[v * 2], n2 = nbj[v * 2 + 1];
    if (n1 < 0 || n1 > M || n2 < 0 || n2 > M) { *bad = true; n1 = n2 = 0; }
    const T* o = src + (v + 1) * Cp;
    const T* p1 = src + n1 * Cp;
    const T* p2 = src + n2 * Cp;
    T* out = dst + (v + 1) * Cp;
    for (int64_t c0 = 0; c0 < Cp; c0 += kLanes<T>)
      for (int64_t c = c0; c < c0 + kLanes<T>; ++c) out[c] = o[c] + T(0.5) * (p1[c] + p2[c]);
  }
}

// Slice pixels [begin, end): out[i] = sum over the simplex corners of (weight * buf[vertex+1]) * alpha.
template <typename T>
DSF_MULTIVERSION void slice_range(const T* __restrict buf, const int32_t* __restrict off,
                                  const float* __restrict w, int64_t D1, int64_t Cp, int64_t M, T alpha,
                                  int64_t begin, int64_t end, T* __restrict out, bool* bad) {
  for (int64_t i = begin; i < end; ++i) {
    T* dst = out + i * Cp;
    for (int64_t c = 0; c < Cp; ++c) dst[c] = T(0);
    for (int64_t r = 0; r < D1; ++r) {
      const int64_t vtx = off[i * D1 + r];
      if (vtx < 0 || vtx >= M) { *bad = true; continue; }
      const T we = w[i * D1 + r];
      const T* src = buf + (vtx + 1) * Cp;
      for (int64_t c0 = 0; c0 < Cp; c0 += kLanes<T>)
        for (int64_t c = c0; c < c0 + kLanes<T>; ++c) dst[c] += we * src[c] * alpha;
    }
  }
}

// Runs fn(begin, end, &bad) over [0, n) in parallel; true if any chunk flagged bad.
template <typename F>
bool parallel_checked(int64_t n, int64_t grain, const F& fn) {
  std::atomic<bool> any{false};
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    bool bad = false;
    fn(begin, end, &bad);
    if (bad) any = true;
  });
  return any.load();
}

// values [N, C] -> [N, C]: alpha * slice(blur(splat(values))), computed in T (float or double).
template <typename T>
Tensor filter_impl(const Tensor& values_in, const Tensor& offsets, const Tensor& weights, const Tensor& neighbors,
                   const Tensor& vertex_ptr, const Tensor& splat_pixels, const Tensor& splat_weights, bool reverse) {
  const int64_t N = values_in.size(0), C = values_in.size(1);
  const int64_t D1 = offsets.size(1), M = neighbors.size(1);
  const int d = static_cast<int>(D1 - 1);
  const auto dtype = values_in.scalar_type();
  const int64_t Cp = (C + kLanes<T> - 1) / kLanes<T> * kLanes<T>;
  auto alloc = [&](int64_t rows, int64_t cols) { return empty_output({rows, cols}, dtype, at::MemoryFormat::Contiguous); };
  // Copies rows of `from` (from_cols wide) into `to` (to_cols wide), zero-filling extra columns.
  auto copy_rows = [&](const T* from, int64_t from_cols, T* to, int64_t to_cols) {
    const int64_t n = std::min(from_cols, to_cols);
    at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        std::memcpy(to + i * to_cols, from + i * from_cols, n * sizeof(T));
        if (to_cols > n) std::memset(to + i * to_cols + n, 0, (to_cols - n) * sizeof(T));
      }
    });
  };
  // Padded copy of the values; the padding columns are zero and are dropped at the end.
  const Tensor values = values_in.contiguous();
  Tensor in = values;
  if (Cp != C) {
    in = alloc(N, Cp);
    copy_rows(values.const_data_ptr<T>(), C, in.mutable_data_ptr<T>(), Cp);
  }
  // Two [M+1, Cp] buffers; row 0 stays zero and stands for "no neighbour".
  Tensor buf_a = alloc(M + 1, Cp), buf_b = alloc(M + 1, Cp);
  T* a = buf_a.mutable_data_ptr<T>();
  T* b = buf_b.mutable_data_ptr<T>();
  std::memset(a, 0, (M + 1) * Cp * sizeof(T));
  std::memset(b, 0, Cp * sizeof(T));

  bool bad = parallel_checked(M, 256, [&](int64_t begin, int64_t end, bool* flag) {
    splat_range<T>(in.const_data_ptr<T>(), vertex_ptr.const_data_ptr<int32_t>(), splat_pixels.const_data_ptr<int32_t>(),
                   splat_weights.const_data_ptr<float>(), Cp, N, begin, end, a, flag);
  });
  TORCH_CHECK_VALUE(!bad, "splat_pixels hold out-of-range pixels");
  for (int step = 0; step <= d; ++step) {
    const int j = reverse ? d - step : step;
    const int32_t* nbj = neighbors.const_data_ptr<int32_t>() + static_cast<int64_t>(j) * M * 2;
    bad = parallel_checked(M, 256, [&](int64_t begin, int64_t end, bool* flag) {
      blur_range<T>(a, nbj, Cp, M, begin, end, b, flag);
    });
    TORCH_CHECK_VALUE(!bad, "neighbors hold out-of-range vertices");
    std::swap(a, b);
  }
  Tensor out_p = alloc(N, Cp);
  bad = parallel_checked(N, 256, [&](int64_t begin, int64_t end, bool* flag) {
    slice_range<T>(a, offsets.const_data_ptr<int32_t>(), weights.const_data_ptr<float>(), D1, Cp, M,
                   static_cast<T>(lattice::slice_alpha(d)), begin, end, out_p.mutable_data_ptr<T>(), flag);
  });
  TORCH_CHECK_VALUE(!bad, "offsets hold out-of-range vertices");
  if (Cp == C) return out_p;
  Tensor out = alloc(N, C);
  copy_rows(out_p.const_data_ptr<T>(), Cp, out.mutable_data_ptr<T>(), C);
  return out;
}

Tensor permutohedral_filter_cpu(const Tensor& values, const Tensor& offsets_in, const Tensor& weights_in,
                                const Tensor& neighbors_in, const Tensor& vertex_ptr_in, const Tensor& splat_pixels_in,
                                const Tensor& splat_weights_in, bool reverse) {
  check_lattice(offsets_in, weights_in, neighbors_in, vertex_ptr_in, splat_pixels_in, splat_weights_in);
  TORCH_CHECK_VALUE(values.dim() == 2 && values.size(0) == offsets_in.size(0),
                    "values must be a [N, C] tensor with N = ", offsets_in.size(0), " points, got ", values.sizes());
  TORCH_CHECK_VALUE(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble,
                    "values must be float32 or float64, got ", values.scalar_type());
  const int64_t N = values.size(0), M = neighbors_in.size(1);
  if (values.numel() == 0) return empty_output(values.sizes(), values.scalar_type(), at::MemoryFormat::Contiguous);
  const Tensor offsets = offsets_in.contiguous(), weights = weights_in.contiguous(),
               neighbors = neighbors_in.contiguous(), vertex_ptr = vertex_ptr_in.contiguous(),
               splat_pixels = splat_pixels_in.contiguous(), splat_weights = splat_weights_in.contiguous();
  // Lattice tensors are ordinary op inputs: make sure the CSR lists stay inside their arrays.
  const int32_t* ptr = vertex_ptr.const_data_ptr<int32_t>();
  TORCH_CHECK_VALUE(ptr[0] == 0 && ptr[M] == N * offsets.size(1), "vertex_ptr does not describe splat_pixels");
  for (int64_t v = 0; v < M; ++v) TORCH_CHECK_VALUE(ptr[v] <= ptr[v + 1], "vertex_ptr must be non-decreasing");
  if (values.scalar_type() == at::kDouble)
    return filter_impl<double>(values, offsets, weights, neighbors, vertex_ptr, splat_pixels, splat_weights, reverse);
  return filter_impl<float>(values, offsets, weights, neighbors, vertex_ptr, splat_pixels, splat_weights, reverse);
}

}  // namespace
}  // namespace deconvseg

TORCH_LIBRARY_IMPL(deconvseg, CPU, m) {
  m.impl("permutohedral_lattice", &deconvseg::permutohedral_lattice_cpu);
  m.impl("permutohedral_filter", &deconvseg::permutohedral_filter_cpu);
}
