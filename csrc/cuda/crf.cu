// Permutohedral lattice on the GPU: the same three ops, contracts and validation errors as
// csrc/cpu/crf.cpp (read its header comment for the tensors' layout).
//
// Lattice construction. Every point's simplex comes from the shared lattice::enclosing_simplex
// (float arithmetic kept free of FMA contraction there, so the GPU picks the CPU's simplices). The
// vertices go into an open-addressing hash table built with atomics; a slot holds the smallest
// entry index e = i*(d+1) + r whose key lives there. Vertices are numbered like the CPU's, in
// first-occurrence order of the entries: an entry is its key's first occurrence exactly when the
// slot holds it, and an inclusive scan of those marks gives each vertex's number (minus one). The
// slot a key lands in depends on the order of the inserts, but the smallest entry of a key does
// not, so offsets and neighbors are the same bits on every run and equal the CPU's.
//
// Filtering. splat -> blur along each axis -> slice, each a kernel over (row, channel) pairs on a
// vertex buffer [M+1, C] whose row 0 is the zero "no neighbour" row. The splat scatters with
// atomicAdd by default: the order of the additions into a vertex varies from run to run, so the
// low bits of the result can too. With torch.use_deterministic_algorithms(True) the splat gathers
// instead: the entries are stably sorted by vertex, and each vertex adds its contributions in
// ascending entry order (one sort per call, so slower). Blur and slice have no atomics.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "lattice_checks.h"
#include "permutohedral.h"

namespace deconvseg {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
// An empty hash slot. Entry indices are < N*(d+1) < 2^31 - 1, so never equal to it.
constexpr int32_t kEmpty = INT32_MAX;

// Blocks for a grid-stride loop over n items (capped: the loops stride over the rest).
unsigned int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(b, 1), int64_t(1) << 20));
}

// Indices are int64 throughout: E*d, (M+1)*C and (d+1)*M may all pass 2^31.
__device__ __forceinline__ int64_t grid_start() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() { return static_cast<int64_t>(blockDim.x) * gridDim.x; }

// Passed by value: the per-axis scales of the elevation, computed once on the host.
struct AxisScales {
  float s[lattice::kMaxDim];
};

__device__ __forceinline__ bool keys_equal(const int32_t* a,  // [d]
                                           const int32_t* b,  // [d]
                                           int d) {
  for (int k = 0; k < d; ++k)
    if (a[k] != b[k]) return false;
  return true;
}

// ---------------------------------------------------------------------------------------------
// Lattice construction

__global__ void __launch_bounds__(kThreads)
    simplex_kernel(const float* __restrict__ features,  // [N, d]
                   int64_t N, int d, AxisScales scale,
                   int32_t* __restrict__ keys,    // [N, d+1, d] out: each corner's coordinates
                   float* __restrict__ weights) {  // [N, d+1] out: barycentric weights
  for (int64_t i = grid_start(); i < N; i += grid_stride())
    lattice::enclosing_simplex(features + i * d, d, scale.s, keys + i * (d + 1) * d, weights + i * (d + 1));
}

// Enters every entry's key into the table; slot_of[e] receives the slot of e's key. A slot, once
// claimed, only ever holds entries with the same key (atomicMin is applied by entries of that key
// only) and slots are never emptied, so every entry of a key walks the same probe sequence past
// the same foreign keys and meets its key in one slot. The capacity is at least twice the number
// of entries, so empty slots always remain and every probe sequence ends.
__global__ void __launch_bounds__(kThreads)
    insert_kernel(const int32_t* __restrict__ keys,  // [E, d]
                  int64_t E, int d,
                  int32_t* slots,  // [cap] smallest entry of the slot's key, or kEmpty
                  uint64_t mask,   // cap - 1, cap a power of two
                  uint32_t* __restrict__ slot_of) {  // [E] out (cap <= 2^32, so a slot fits)
  for (int64_t e = grid_start(); e < E; e += grid_stride()) {
    const int32_t* key = keys + e * d;
    const int32_t me = static_cast<int32_t>(e);
    for (uint64_t h = lattice::hash_key(key, d);; ++h) {
      const uint64_t s = h & mask;
      // A stale read is harmless: a stale kEmpty is corrected by the CAS, and a stale entry has
      // the same key as the slot's current one.
      int32_t cur = *reinterpret_cast<volatile int32_t*>(slots + s);
      if (cur == kEmpty) {
        cur = atomicCAS(slots + s, kEmpty, me);
        if (cur == kEmpty) {
          slot_of[e] = static_cast<uint32_t>(s);
          break;
        }
      }
      if (keys_equal(keys + static_cast<int64_t>(cur) * d, key, d)) {
        if (me < cur) atomicMin(slots + s, me);
        slot_of[e] = static_cast<uint32_t>(s);
        break;
      }
    }
  }
}

// first[e] = the smallest entry with e's key; is_first[e] = 1 if that is e itself.
__global__ void __launch_bounds__(kThreads)
    first_kernel(const int32_t* __restrict__ slots,     // [cap]
                 const uint32_t* __restrict__ slot_of,  // [E]
                 int64_t E,
                 int32_t* __restrict__ first,      // [E] out
                 int32_t* __restrict__ is_first) {  // [E] out
  for (int64_t e = grid_start(); e < E; e += grid_stride()) {
    const int32_t f = slots[slot_of[e]];
    first[e] = f;
    is_first[e] = f == e ? 1 : 0;
  }
}

// offsets[e] = vertex of e's key (overwriting the first entry stored there); vertex_entry[v] = the
// first entry of vertex v. rank[e] = number of first occurrences among entries 0..e (inclusive).
__global__ void __launch_bounds__(kThreads)
    number_kernel(const int32_t* __restrict__ rank,  // [E]
                  int64_t E,
                  int32_t* __restrict__ offsets,        // [E] in: first entry, out: vertex
                  int32_t* __restrict__ vertex_entry) {  // [M] out
  for (int64_t e = grid_start(); e < E; e += grid_stride()) {
    const int32_t f = offsets[e];
    const int32_t v = rank[f] - 1;
    offsets[e] = v;
    if (f == e) vertex_entry[v] = static_cast<int32_t>(e);
  }
}

// Vertex number + 1 of `key`, or 0 if it is not in the table. Ends at the first empty slot (one
// always exists) or at the key's slot.
__device__ __forceinline__ int32_t find_vertex(const int32_t* key,  // [d]
                                               int d,
                                               const int32_t* __restrict__ keys,   // [E, d]
                                               const int32_t* __restrict__ slots,  // [cap]
                                               uint64_t mask,
                                               const int32_t* __restrict__ rank) {  // [E]
  for (uint64_t h = lattice::hash_key(key, d);; ++h) {
    const int32_t cur = slots[h & mask];
    if (cur == kEmpty) return 0;
    if (keys_equal(keys + static_cast<int64_t>(cur) * d, key, d)) return rank[cur];
  }
}

// neighbors[j, v] = the two blur neighbours of vertex v along axis j, 1-based, 0 when absent.
__global__ void __launch_bounds__(kThreads)
    neighbor_kernel(const int32_t* __restrict__ keys,          // [E, d]
                    const int32_t* __restrict__ vertex_entry,  // [M]
                    const int32_t* __restrict__ slots,         // [cap]
                    uint64_t mask,
                    const int32_t* __restrict__ rank,  // [E]
                    int64_t M, int d,
                    int32_t* __restrict__ neighbors) {  // [d+1, M, 2] out
  int32_t n1[lattice::kMaxDim], n2[lattice::kMaxDim];
  for (int64_t t = grid_start(); t < (d + 1) * M; t += grid_stride()) {
    const int64_t j = t / M, v = t - j * M;
    const int32_t* key = keys + static_cast<int64_t>(vertex_entry[v]) * d;
    lattice::blur_neighbor_keys(key, d, static_cast<int>(j), n1, n2);
    neighbors[t * 2] = find_vertex(n1, d, keys, slots, mask, rank);
    neighbors[t * 2 + 1] = find_vertex(n2, d, keys, slots, mask, rank);
  }
}

std::tuple<Tensor, Tensor, Tensor> permutohedral_lattice_cuda(const Tensor& features_in) {
  lattice::check_features(features_in);
  const int64_t N = features_in.size(0);
  const int d = static_cast<int>(features_in.size(1));
  const c10::cuda::CUDAGuard guard(features_in.device());
  const Tensor features = features_in.contiguous();
  {
    // Lattice coordinates are int32: beyond 1e6 standard deviations they could overflow. One
    // reduction and one sync; max propagates NaN, so NaN and Inf both give a non-finite maximum.
    const float amax = features.abs().max().item<float>();
    TORCH_CHECK_VALUE(std::isfinite(amax), "features must be finite (found NaN or Inf)");
    TORCH_CHECK_VALUE(amax <= 1e6f, "features must lie within +-1e6 (they are positions divided by standard "
                      "deviations; is a standard deviation tiny?)");
  }
  const int D1 = d + 1;
  const int64_t E = N * D1;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto i32 = features.options().dtype(at::kInt);

  AxisScales scale{};
  for (int i = 0; i < d; ++i) scale.s[i] = lattice::axis_scale(i, d);

  // 1. Every point's simplex: keys [E, d] and weights [N, d+1].
  Tensor keys = at::empty({E, d}, i32);
  Tensor weights = at::empty({N, D1}, features.options());
  simplex_kernel<<<blocks_for(N), kThreads, 0, stream>>>(features.const_data_ptr<float>(), N, d, scale,
                                                          keys.mutable_data_ptr<int32_t>(),
                                                          weights.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // 2. Hash table of the distinct keys, and each entry's slot. E < 2^31, so cap <= 2^32.
  int64_t cap = 64;
  while (cap < 2 * E) cap <<= 1;
  const uint64_t mask = static_cast<uint64_t>(cap - 1);
  Tensor slots = at::full({cap}, kEmpty, i32);
  Tensor slot_of = at::empty({E}, i32);  // holds uint32 slot numbers
  insert_kernel<<<blocks_for(E), kThreads, 0, stream>>>(keys.const_data_ptr<int32_t>(), E, d,
                                                         slots.mutable_data_ptr<int32_t>(), mask,
                                                         reinterpret_cast<uint32_t*>(slot_of.mutable_data_ptr<int32_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // 3. Number the vertices in first-occurrence order of the entries.
  Tensor offsets = at::empty({N, D1}, i32);
  Tensor is_first = at::empty({E}, i32);
  first_kernel<<<blocks_for(E), kThreads, 0, stream>>>(slots.const_data_ptr<int32_t>(),
                                                        reinterpret_cast<const uint32_t*>(slot_of.const_data_ptr<int32_t>()),
                                                        E, offsets.mutable_data_ptr<int32_t>(),
                                                        is_first.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  slot_of.reset();
  const Tensor rank = at::cumsum(is_first, 0, at::kInt);  // int32 is enough: E < 2^31
  is_first.reset();
  const int64_t M = rank[E - 1].item<int32_t>();
  Tensor vertex_entry = at::empty({M}, i32);
  number_kernel<<<blocks_for(E), kThreads, 0, stream>>>(rank.const_data_ptr<int32_t>(), E,
                                                         offsets.mutable_data_ptr<int32_t>(),
                                                         vertex_entry.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // 4. Blur neighbours of every vertex along every axis.
  Tensor neighbors = at::empty({D1, M, 2}, i32);
  neighbor_kernel<<<blocks_for(D1 * M), kThreads, 0, stream>>>(
      keys.const_data_ptr<int32_t>(), vertex_entry.const_data_ptr<int32_t>(), slots.const_data_ptr<int32_t>(), mask,
      rank.const_data_ptr<int32_t>(), M, d, neighbors.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {offsets, weights, neighbors};
}

// ---------------------------------------------------------------------------------------------
// Filtering

// A lattice's tensors, validated and made contiguous.
struct LatticeCuda {
  int64_t N = 0, M = 0, D1 = 0;
  Tensor off, w, nb;  // [N, D1] int32, [N, D1] float32, [D1, M, 2] int32
};

void check_same_device(const Tensor& t, const char* name, const Tensor& values) {
  TORCH_CHECK_VALUE(t.device() == values.device(), name, " must be on the same device as values (", values.device(),
                    "), got ", t.device());
}

// Lattice tensors are ordinary op inputs: every index is checked here (ATen min/max reductions, one
// sync), so the kernels below can trust them and never read or write out of bounds.
LatticeCuda view_lattice(const Tensor& offsets, const Tensor& weights, const Tensor& neighbors, const Tensor& values) {
  const int64_t D1 = lattice::check_lattice_tensors(offsets, weights, neighbors);
  check_same_device(offsets, "offsets", values);
  check_same_device(weights, "weights", values);
  check_same_device(neighbors, "neighbors", values);
  LatticeCuda L;
  L.N = offsets.size(0);
  L.M = neighbors.size(1);
  L.D1 = D1;
  L.off = offsets.contiguous();
  L.w = weights.contiguous();
  L.nb = neighbors.contiguous();
  std::vector<Tensor> ends;  // [min, max] of offsets, then of neighbors, where not empty
  if (L.off.numel() > 0) {
    auto mm = at::aminmax(L.off);
    ends.push_back(std::get<0>(mm).reshape({1}));
    ends.push_back(std::get<1>(mm).reshape({1}));
  }
  if (L.nb.numel() > 0) {
    auto mm = at::aminmax(L.nb);
    ends.push_back(std::get<0>(mm).reshape({1}));
    ends.push_back(std::get<1>(mm).reshape({1}));
  }
  if (!ends.empty()) {
    const Tensor host = at::cat(ends).cpu();
    const int32_t* p = host.const_data_ptr<int32_t>();
    const int64_t M = L.M;
    if (L.off.numel() > 0) {
      TORCH_CHECK_VALUE(p[0] >= 0 && p[1] <= M - 1, "offsets hold out-of-range vertices (expected 0..", M - 1, ")");
      p += 2;
    }
    if (L.nb.numel() > 0)
      TORCH_CHECK_VALUE(p[0] >= 0 && p[1] <= M, "neighbors hold out-of-range vertices (expected 0..", M, ")");
  }
  return L;
}

// buf[off[i, r] + 1] += weights[i, r] * (scale[i] * values[i]), one thread per (point, channel).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    splat_atomic_kernel(const T* __restrict__ values,  // [N, C]
                        const T* __restrict__ scale,   // [N], or null for none
                        const int32_t* __restrict__ off,  // [N, D1]
                        const float* __restrict__ w,      // [N, D1]
                        int64_t N, int64_t C, int D1,
                        T* buf) {  // [M+1, C], zeroed
  for (int64_t t = grid_start(); t < N * C; t += grid_stride()) {
    const int64_t i = t / C, c = t - i * C;
    T x = values[t];
    if (scale != nullptr) x = scale[i] * x;
    for (int r = 0; r < D1; ++r) {
      const int64_t e = i * D1 + r;
      atomicAdd(buf + (static_cast<int64_t>(off[e]) + 1) * C + c, static_cast<T>(w[e]) * x);
    }
  }
}

// The same sums without atomics: vertex v adds its entries order[start[v] .. start[v+1]) in
// ascending entry order. Writes every row but row 0.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    splat_gather_kernel(const T* __restrict__ values,    // [N, C]
                        const T* __restrict__ scale,     // [N], or null for none
                        const int64_t* __restrict__ order,  // [N*D1] entries sorted by vertex, stably
                        const int64_t* __restrict__ start,  // [M+1] first position of each vertex in order
                        const float* __restrict__ w,        // [N*D1]
                        int64_t M, int64_t C, int D1,
                        T* __restrict__ buf) {  // [M+1, C]
  for (int64_t t = grid_start(); t < M * C; t += grid_stride()) {
    const int64_t v = t / C, c = t - v * C;
    T acc = T(0);
    for (int64_t p = start[v]; p < start[v + 1]; ++p) {
      const int64_t e = order[p], i = e / D1;
      T x = values[i * C + c];
      if (scale != nullptr) x = scale[i] * x;
      acc += static_cast<T>(w[e]) * x;
    }
    buf[t + C] = acc;
  }
}

// One blur pass along an axis: dst[v+1] = src[v+1] + (src[n1] + src[n2]) / 2. Row 0 untouched.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    blur_kernel(const T* __restrict__ src,        // [M+1, C]
                const int32_t* __restrict__ nbj,  // [M, 2] this axis' neighbours, 1-based
                int64_t M, int64_t C,
                T* __restrict__ dst) {  // [M+1, C]
  for (int64_t t = grid_start(); t < M * C; t += grid_stride()) {
    const int64_t v = t / C, c = t - v * C;
    const int64_t n1 = nbj[v * 2], n2 = nbj[v * 2 + 1];
    dst[t + C] = src[t + C] + T(0.5) * (src[n1 * C + c] + src[n2 * C + c]);
  }
}

// out[i] = sum over point i's corners of (weight * buf[vertex+1]) * alpha.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    slice_kernel(const T* __restrict__ buf,        // [M+1, C]
                 const int32_t* __restrict__ off,  // [N, D1]
                 const float* __restrict__ w,      // [N, D1]
                 int64_t N, int64_t C, int D1, T alpha,
                 T* __restrict__ out) {  // [N, C]
  for (int64_t t = grid_start(); t < N * C; t += grid_stride()) {
    const int64_t i = t / C, c = t - i * C;
    T acc = T(0);
    for (int r = 0; r < D1; ++r) {
      const int64_t e = i * D1 + r;
      acc += static_cast<T>(w[e]) * buf[(static_cast<int64_t>(off[e]) + 1) * C + c] * alpha;
    }
    out[t] = acc;
  }
}

// values [N, C] (contiguous, C > 0), times scale [N] if given -> blurred buffer [M+1, C], row 0 zero.
template <typename T>
Tensor splat_blur_buffer(const Tensor& values, const T* scale, const LatticeCuda& L, bool reverse,
                         cudaStream_t stream) {
  const int64_t N = L.N, M = L.M, C = values.size(1);
  const int D1 = static_cast<int>(L.D1);
  const T* in = values.const_data_ptr<T>();
  Tensor a;
  if (at::globalContext().deterministicAlgorithms() && N > 0 && M > 0) {
    // Stable: equal vertices keep ascending entry order.
    const Tensor flat = L.off.reshape({-1});
    const auto sorted = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const Tensor start = at::searchsorted(std::get<0>(sorted), at::arange(M + 1, flat.options()));
    const Tensor order = std::get<1>(sorted);
    a = at::empty({M + 1, C}, values.options());
    a.narrow(0, 0, 1).zero_();
    splat_gather_kernel<T><<<blocks_for(M * C), kThreads, 0, stream>>>(
        in, scale, order.const_data_ptr<int64_t>(), start.const_data_ptr<int64_t>(), L.w.const_data_ptr<float>(), M,
        C, D1, a.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    a = at::zeros({M + 1, C}, values.options());
    if (N > 0) {
      splat_atomic_kernel<T><<<blocks_for(N * C), kThreads, 0, stream>>>(
          in, scale, L.off.const_data_ptr<int32_t>(), L.w.const_data_ptr<float>(), N, C, D1, a.mutable_data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  if (M == 0) return a;
  Tensor b = at::empty({M + 1, C}, values.options());
  b.narrow(0, 0, 1).zero_();
  const int d = D1 - 1;
  for (int step = 0; step <= d; ++step) {
    const int j = reverse ? d - step : step;
    blur_kernel<T><<<blocks_for(M * C), kThreads, 0, stream>>>(
        a.const_data_ptr<T>(), L.nb.const_data_ptr<int32_t>() + static_cast<int64_t>(j) * M * 2, M, C,
        b.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    std::swap(a, b);
  }
  return a;
}

template <typename T>
Tensor filter_impl(const Tensor& values_in, const LatticeCuda& L, bool reverse) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor values = values_in.contiguous();
  const Tensor blurred = splat_blur_buffer<T>(values, nullptr, L, reverse, stream);
  const int64_t N = L.N, C = values.size(1);
  Tensor out = at::empty({N, C}, values.options());
  const T alpha = static_cast<T>(lattice::slice_alpha(static_cast<int>(L.D1 - 1)));  // on the host: exact powf
  slice_kernel<T><<<blocks_for(N * C), kThreads, 0, stream>>>(blurred.const_data_ptr<T>(),
                                                               L.off.const_data_ptr<int32_t>(),
                                                               L.w.const_data_ptr<float>(), N, C,
                                                               static_cast<int>(L.D1), alpha, out.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

Tensor permutohedral_filter_cuda(const Tensor& values, const Tensor& offsets, const Tensor& weights,
                                 const Tensor& neighbors, bool reverse) {
  const LatticeCuda L = view_lattice(offsets, weights, neighbors, values);
  lattice::check_values(values, L.N);
  const c10::cuda::CUDAGuard guard(values.device());  // after the checks: values may be on the CPU
  if (values.numel() == 0) return at::empty(values.sizes(), values.options());
  if (values.scalar_type() == at::kDouble) return filter_impl<double>(values, L, reverse);
  return filter_impl<float>(values, L, reverse);
}

Tensor permutohedral_splat_blur_cuda(const Tensor& values, const std::optional<Tensor>& scale_in,
                                     const Tensor& offsets, const Tensor& weights, const Tensor& neighbors,
                                     bool reverse) {
  const LatticeCuda L = view_lattice(offsets, weights, neighbors, values);
  lattice::check_values(values, L.N);
  lattice::check_scale(scale_in, L.N, values);
  Tensor scale;
  if (scale_in.has_value()) {
    check_same_device(*scale_in, "scale", values);
    scale = scale_in->contiguous();
  }
  const c10::cuda::CUDAGuard guard(values.device());  // after the checks: values may be on the CPU
  if (values.size(1) == 0) return at::zeros({L.M + 1, 0}, values.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor v = values.contiguous();
  if (values.scalar_type() == at::kDouble)
    return splat_blur_buffer<double>(v, scale.defined() ? scale.const_data_ptr<double>() : nullptr, L, reverse, stream);
  return splat_blur_buffer<float>(v, scale.defined() ? scale.const_data_ptr<float>() : nullptr, L, reverse, stream);
}

}  // namespace
}  // namespace deconvseg

TORCH_LIBRARY_IMPL(deconvseg, CUDA, m) {
  m.impl("permutohedral_lattice", &deconvseg::permutohedral_lattice_cuda);
  m.impl("permutohedral_filter", &deconvseg::permutohedral_filter_cuda);
  m.impl("permutohedral_splat_blur", &deconvseg::permutohedral_splat_blur_cuda);
}
