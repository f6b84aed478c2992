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

// A lattice's tensors, validated and made contiguous, as raw pointers.
struct LatticeView {
  int64_t N = 0, M = 0, D1 = 0;
  const int32_t *off = nullptr, *nb = nullptr, *ptr = nullptr, *pix = nullptr;
  const float *w = nullptr, *sw = nullptr;
  std::vector<Tensor> keep;  // owns the contiguous copies
};

LatticeView view_lattice(const Tensor& offsets, const Tensor& weights, const Tensor& neighbors,
                         const Tensor& vertex_ptr, const Tensor& splat_pixels, const Tensor& splat_weights) {
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
  LatticeView L;
  L.N = offsets.size(0);
  L.M = M;
  L.D1 = D1;
  L.keep = {offsets.contiguous(), weights.contiguous(), neighbors.contiguous(), vertex_ptr.contiguous(),
            splat_pixels.contiguous(), splat_weights.contiguous()};
  L.off = L.keep[0].const_data_ptr<int32_t>();
  L.w = L.keep[1].const_data_ptr<float>();
  L.nb = L.keep[2].const_data_ptr<int32_t>();
  L.ptr = L.keep[3].const_data_ptr<int32_t>();
  L.pix = L.keep[4].const_data_ptr<int32_t>();
  L.sw = L.keep[5].const_data_ptr<float>();
  // Lattice tensors are ordinary op inputs: make sure the CSR lists stay inside their arrays
  // (pixel and neighbour indices are checked where they are read).
  TORCH_CHECK_VALUE(L.ptr[0] == 0 && L.ptr[M] == L.N * D1, "vertex_ptr does not describe splat_pixels");
  for (int64_t v = 0; v < M; ++v) TORCH_CHECK_VALUE(L.ptr[v] <= L.ptr[v + 1], "vertex_ptr must be non-decreasing");
  return L;
}

// Channels are processed in blocks of kLanes floats (one AVX-512 register): buffers are padded to
// a whole number of blocks, so every inner loop has a fixed trip count and no scalar remainder --
// with 21 labels a remainder loop would otherwise run 5 of every 21 channels one at a time.
template <typename T>
constexpr int64_t kLanes = 64 / sizeof(T);

template <typename T>
int64_t padded(int64_t c) { return (c + kLanes<T> - 1) / kLanes<T> * kLanes<T>; }

// Splat vertices [begin, end): buf[v+1] = sum over the vertex's entries of weight * (scale[pixel] *
// in[pixel]); scale may be null. The product order is the reference implementation's (it scales the
// values first, then splats).
template <typename T>
DSF_MULTIVERSION void splat_range(const T* __restrict in, const T* __restrict scale, const int32_t* __restrict ptr,
                                  const int32_t* __restrict pix, const float* __restrict pw, int64_t Cp,
                                  int64_t N, int64_t begin, int64_t end, T* __restrict buf, bool* bad) {
  for (int64_t v = begin; v < end; ++v) {
    T* acc = buf + (v + 1) * Cp;
    for (int64_t c = 0; c < Cp; ++c) acc[c] = T(0);
    for (int32_t k = ptr[v]; k < ptr[v + 1]; ++k) {
      const int32_t p = pix[k];
      if (p < 0 || p >= N) { *bad = true; continue; }
      const T we = pw[k];
      const T s = scale ? scale[p] : T(1);
      const T* src = in + p * Cp;
      if (scale) {
        for (int64_t c0 = 0; c0 < Cp; c0 += kLanes<T>)
          for (int64_t c = c0; c < c0 + kLanes<T>; ++c) acc[c] += we * (s * src[c]);
      } else {
        for (int64_t c0 = 0; c0 < Cp; c0 += kLanes<T>)
          for (int64_t c = c0; c < c0 + kLanes<T>; ++c) acc[c] += we * src[c];
      }
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

// out[0:Cp] = sum over pixel i's simplex corners of (weight * buf[vertex+1]) * alpha.
template <typename T>
inline bool slice_one(const T* __restrict buf, const LatticeView& L, int64_t i, int64_t Cp, T alpha, T* __restrict out) {
  bool ok = true;
  for (int64_t c = 0; c < Cp; ++c) out[c] = T(0);
  for (int64_t r = 0; r < L.D1; ++r) {
    const int64_t vtx = L.off[i * L.D1 + r];
    if (vtx < 0 || vtx >= L.M) { ok = false; continue; }
    const T we = L.w[i * L.D1 + r];
    const T* src = buf + (vtx + 1) * Cp;
    for (int64_t c0 = 0; c0 < Cp; c0 += kLanes<T>)
      for (int64_t c = c0; c < c0 + kLanes<T>; ++c) out[c] += we * src[c] * alpha;
  }
  return ok;
}

template <typename T>
DSF_MULTIVERSION void slice_range(const T* __restrict buf, const LatticeView& L, int64_t Cp, T alpha, int64_t begin,
                                  int64_t end, T* __restrict out, bool* bad) {
  for (int64_t i = begin; i < end; ++i)
    if (!slice_one(buf, L, i, Cp, alpha, out + i * Cp)) *bad = true;
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

// Splat `in` [N, Cp] (times scale[N], if given) and blur it along every axis; a and b are [M+1, Cp]
// buffers with row 0 zero (the "no neighbour" row). Returns the buffer that holds the result.
template <typename T>
T* splat_blur(const LatticeView& L, const T* in, const T* scale, int64_t Cp, bool reverse, T* a, T* b) {
  const int d = static_cast<int>(L.D1 - 1);
  bool bad = parallel_checked(L.M, 256, [&](int64_t begin, int64_t end, bool* flag) {
    splat_range<T>(in, scale, L.ptr, L.pix, L.sw, Cp, L.N, begin, end, a, flag);
  });
  TORCH_CHECK_VALUE(!bad, "splat_pixels hold out-of-range pixels");
  for (int step = 0; step <= d; ++step) {
    const int j = reverse ? d - step : step;
    const int32_t* nbj = L.nb + static_cast<int64_t>(j) * L.M * 2;
    bad = parallel_checked(L.M, 256, [&](int64_t begin, int64_t end, bool* flag) {
      blur_range<T>(a, nbj, Cp, L.M, begin, end, b, flag);
    });
    TORCH_CHECK_VALUE(!bad, "neighbors hold out-of-range vertices");
    std::swap(a, b);
  }
  return a;
}

// Vertex buffers for one lattice: [M+1, Cp] twice, row 0 zero.
template <typename T>
struct VertexBuffers {
  Tensor a, b;
  VertexBuffers(const LatticeView& L, int64_t Cp, at::ScalarType dtype) {
    a = empty_output({L.M + 1, Cp}, dtype, at::MemoryFormat::Contiguous);
    b = empty_output({L.M + 1, Cp}, dtype, at::MemoryFormat::Contiguous);
    std::memset(a.mutable_data_ptr<T>(), 0, Cp * sizeof(T));
    std::memset(b.mutable_data_ptr<T>(), 0, Cp * sizeof(T));
  }
  T* pa() { return a.mutable_data_ptr<T>(); }
  T* pb() { return b.mutable_data_ptr<T>(); }
};

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

// values [N, C] -> [N, C]: alpha * slice(blur(splat(values))), computed in T (float or double).
template <typename T>
Tensor filter_impl(const Tensor& values_in, const LatticeView& L, bool reverse) {
  const int64_t N = values_in.size(0), C = values_in.size(1), Cp = padded<T>(C);
  const auto dtype = values_in.scalar_type();
  const Tensor values = values_in.contiguous();
  // Padded copy of the values; the padding columns are zero and are dropped at the end.
  Tensor in = values;
  if (Cp != C) {
    in = empty_output({N, Cp}, dtype, at::MemoryFormat::Contiguous);
    copy_rows<T>(values.const_data_ptr<T>(), C, in.mutable_data_ptr<T>(), Cp, N);
  }
  VertexBuffers<T> bufs(L, Cp, dtype);
  const T* blurred = splat_blur<T>(L, in.const_data_ptr<T>(), nullptr, Cp, reverse, bufs.pa(), bufs.pb());
  Tensor out_p = empty_output({N, Cp}, dtype, at::MemoryFormat::Contiguous);
  const T alpha = static_cast<T>(lattice::slice_alpha(static_cast<int>(L.D1 - 1)));
  const bool bad = parallel_checked(N, 256, [&](int64_t begin, int64_t end, bool* flag) {
    slice_range<T>(blurred, L, Cp, alpha, begin, end, out_p.mutable_data_ptr<T>(), flag);
  });
  TORCH_CHECK_VALUE(!bad, "offsets hold out-of-range vertices");
  if (Cp == C) return out_p;
  Tensor out = empty_output({N, C}, dtype, at::MemoryFormat::Contiguous);
  copy_rows<T>(out_p.const_data_ptr<T>(), Cp, out.mutable_data_ptr<T>(), C, N);
  return out;
}

Tensor permutohedral_filter_cpu(const Tensor& values, const Tensor& offsets, const Tensor& weights,
                                const Tensor& neighbors, const Tensor& vertex_ptr, const Tensor& splat_pixels,
                                const Tensor& splat_weights, bool reverse) {
  const LatticeView L = view_lattice(offsets, weights, neighbors, vertex_ptr, splat_pixels, splat_weights);
  TORCH_CHECK_VALUE(values.dim() == 2 && values.size(0) == L.N, "values must be a [N, C] tensor with N = ", L.N,
                    " points, got ", values.sizes());
  TORCH_CHECK_VALUE(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble,
                    "values must be float32 or float64, got ", values.scalar_type());
  if (values.numel() == 0) return empty_output(values.sizes(), values.scalar_type(), at::MemoryFormat::Contiguous);
  if (values.scalar_type() == at::kDouble) return filter_impl<double>(values, L, reverse);
  return filter_impl<float>(values, L, reverse);
}

// exp for the softmax, vectorisable: 2^(x log2 e) split into 2^n * 2^f, f in [-0.5, 0.5], with a
// degree-6 polynomial for 2^f (relative error < 2e-7, about the rounding of float32 itself).
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float y = x * 1.44269504088896341f;
  const float n = std::nearbyint(y);
  const float f = y - n;
  float p = 1.5403530393381606e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<int32_t>(n) << 23;
  std::memcpy(&p, &bits, sizeof(bits));
  return p;
}

// The mean-field update of pixels [begin, end), fused: slice every kernel's blurred buffer, scale by
// its post-normalisation, apply its compatibility, add the logits, softmax, write Q.
//   logits [N, L]; q [N, Lp] (padded, pad columns left 0); bufs[k] the blurred [M_k+1, Lp] buffers;
//   post [K, N]; compat [K, L, L] (diag[k] set: only the diagonal is non-zero).
DSF_MULTIVERSION void mean_field_update(const std::vector<LatticeView>& lats, const std::vector<const float*>& bufs,
                                        const float* __restrict post, const float* __restrict compat,
                                        const std::vector<char>& diag, const float* __restrict logits, int64_t N,
                                        int64_t L, int64_t Lp, int64_t begin, int64_t end, float* __restrict q,
                                        bool* bad) {
  std::vector<float> f(Lp), t(Lp);
  const int64_t K = static_cast<int64_t>(lats.size());
  for (int64_t i = begin; i < end; ++i) {
    for (int64_t l = 0; l < L; ++l) t[l] = logits[i * L + l];
    for (int64_t k = 0; k < K; ++k) {
      const float alpha = lattice::slice_alpha(static_cast<int>(lats[k].D1 - 1));
      if (!slice_one(bufs[k], lats[k], i, Lp, alpha, f.data())) *bad = true;
      const float s = post[k * N + i];
      for (int64_t l = 0; l < L; ++l) f[l] *= s;
      const float* ck = compat + k * L * L;
      if (diag[k]) {
        for (int64_t l = 0; l < L; ++l) t[l] -= ck[l * L + l] * f[l];
      } else {
        for (int64_t l = 0; l < L; ++l) {
          float acc = 0.f;
          for (int64_t m = 0; m < L; ++m) acc += ck[l * L + m] * f[m];
          t[l] -= acc;
        }
      }
    }
    float mx = t[0];
    for (int64_t l = 1; l < L; ++l) mx = std::max(mx, t[l]);
    float sum = 0.f;
    for (int64_t l = 0; l < L; ++l) {
      t[l] = exp_approx(t[l] - mx);
      sum += t[l];
    }
    const float inv = 1.0f / sum;
    float* qi = q + i * Lp;
    for (int64_t l = 0; l < L; ++l) qi[l] = t[l] * inv;
  }
}

// Mean-field inference with K Gaussian kernels, one pass over the pixels per iteration on top of
// each kernel's splat and blur. logits [N, L] float32; lattices: 6 tensors per kernel; pre/post
// [K, N] per-pixel normalisation before splatting / after slicing; compat [K, L, L], subtracted
// (Potts of weight w is -w * I). Returns Q [N, L].
Tensor dense_crf_mean_field_cpu(const Tensor& logits_in, at::TensorList lattices, const Tensor& pre_in,
                                const Tensor& post_in, const Tensor& compat_in, int64_t iterations) {
  TORCH_CHECK_VALUE(logits_in.dim() == 2 && logits_in.scalar_type() == at::kFloat,
                    "logits must be a float32 [N, L] tensor");
  TORCH_CHECK_VALUE(lattices.size() % 6 == 0 && !lattices.empty(), "lattices must hold 6 tensors per kernel, got ",
                    lattices.size());
  TORCH_CHECK_VALUE(iterations >= 0, "iterations must be non-negative, got ", iterations);
  const int64_t N = logits_in.size(0), L = logits_in.size(1), K = static_cast<int64_t>(lattices.size() / 6);
  TORCH_CHECK_VALUE(pre_in.sizes() == at::IntArrayRef({K, N}) && pre_in.scalar_type() == at::kFloat,
                    "pre must be a float32 [K, N] tensor");
  TORCH_CHECK_VALUE(post_in.sizes() == at::IntArrayRef({K, N}) && post_in.scalar_type() == at::kFloat,
                    "post must be a float32 [K, N] tensor");
  TORCH_CHECK_VALUE(compat_in.sizes() == at::IntArrayRef({K, L, L}) && compat_in.scalar_type() == at::kFloat,
                    "compat must be a float32 [K, L, L] tensor");
  std::vector<LatticeView> lats;
  for (int64_t k = 0; k < K; ++k) {
    lats.push_back(view_lattice(lattices[6 * k], lattices[6 * k + 1], lattices[6 * k + 2], lattices[6 * k + 3],
                                lattices[6 * k + 4], lattices[6 * k + 5]));
    TORCH_CHECK_VALUE(lats.back().N == N, "lattice ", k, " has ", lats.back().N, " points, logits have ", N);
  }
  const Tensor logits = logits_in.contiguous(), pre = pre_in.contiguous(), post = post_in.contiguous(),
               compat = compat_in.contiguous();
  const float* cp = compat.const_data_ptr<float>();
  std::vector<char> diag(K, 1);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t l = 0; l < L; ++l)
      for (int64_t m = 0; m < L; ++m)
        if (l != m && cp[(k * L + l) * L + m] != 0.f) diag[k] = 0;

  const int64_t Lp = padded<float>(L);
  Tensor q = empty_output({N, Lp}, at::kFloat, at::MemoryFormat::Contiguous);
  float* qp = q.mutable_data_ptr<float>();
  // Q0 = softmax(logits): the update with no kernels.
  const std::vector<LatticeView> none;
  const std::vector<const float*> no_bufs;
  const std::vector<char> no_diag;
  at::parallel_for(0, N, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) std::memset(qp + i * Lp + L, 0, (Lp - L) * sizeof(float));
    bool unused = false;
    mean_field_update(none, no_bufs, nullptr, nullptr, no_diag, logits.const_data_ptr<float>(), N, L, Lp, begin, end,
                      qp, &unused);
  });
  std::vector<VertexBuffers<float>> vbufs;
  for (int64_t k = 0; k < K; ++k) vbufs.emplace_back(lats[k], Lp, at::kFloat);
  std::vector<const float*> blurred(K);
  for (int64_t it = 0; it < iterations; ++it) {
    for (int64_t k = 0; k < K; ++k)
      blurred[k] = splat_blur<float>(lats[k], qp, pre.const_data_ptr<float>() + k * N, Lp, false, vbufs[k].pa(),
                                     vbufs[k].pb());
    // Q is read by the splats above and rewritten below, one pixel per task: no races.
    const bool bad = parallel_checked(N, 256, [&](int64_t begin, int64_t end, bool* flag) {
      mean_field_update(lats, blurred, post.const_data_ptr<float>(), cp, diag, logits.const_data_ptr<float>(), N, L,
                        Lp, begin, end, qp, flag);
    });
    TORCH_CHECK_VALUE(!bad, "offsets hold out-of-range vertices");
  }
  Tensor out = empty_output({N, L}, at::kFloat, at::MemoryFormat::Contiguous);
  copy_rows<float>(qp, Lp, out.mutable_data_ptr<float>(), L, N);
  return out;
}

}  // namespace
}  // namespace deconvseg

TORCH_LIBRARY_IMPL(deconvseg, CPU, m) {
  m.impl("permutohedral_lattice", &deconvseg::permutohedral_lattice_cpu);
  m.impl("permutohedral_filter", &deconvseg::permutohedral_filter_cpu);
  m.impl("dense_crf_mean_field", &deconvseg::dense_crf_mean_field_cpu);
}
