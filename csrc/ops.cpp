// The one list of every op's schema. Kernels register themselves per backend at the end of their
// own files (csrc/cpu/, csrc/cuda/); Triton kernels are registered from deconvseg_fast/ops/.
#include <Python.h>
#include <torch/library.h>

// Importing deconvseg_fast._C from Python runs the static registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(deconvseg, m) {
  // input: [N, C, H, W] -> (values [N, C, Ho, Wo], indices: flat int64 / window uint8 [N, C, Ho, Wo],
  // packed uint8 [N, C, Ho, ceil(Wo/4)]). See docs/switches.md for the exact semantics.
  m.def(
      "max_pool2d_switches(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, bool ceil_mode, str index_format) -> (Tensor, Tensor)");
  // input [N, C, Hp, Wp], indices as produced above -> [N, C, output_size[0], output_size[1]]
  m.def(
      "max_unpool2d(Tensor input, Tensor indices, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int[2] output_size, str index_format) -> Tensor");
  // grad_output [N, C, Ho, Wo] -> grad_input [N, C, input_size[0], input_size[1]]
  m.def(
      "max_pool2d_switches_backward(Tensor grad_output, Tensor indices, int[2] input_size, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, str index_format) "
      "-> Tensor");
  // grad_output [N, C, Hout, Wout] -> grad_input [N, C, input_size[0], input_size[1]] (the pooled size)
  m.def(
      "max_unpool2d_backward(Tensor grad_output, Tensor indices, int[2] input_size, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, str index_format) "
      "-> Tensor");
  // input [N, C_in, H, W], weight [C_out, C_in, kH, kW] (groups = 1), bias/scale/shift [C_out] ->
  // [N, C_out, Ho, Wo] = act((conv(input, weight) + bias) * scale + shift), act "none" | "relu";
  // scale/shift are a folded batch-norm. See csrc/cpu/conv.cpp.
  m.def(
      "atrous_conv2d(Tensor input, Tensor weight, Tensor? bias, Tensor? scale, Tensor? shift, "
      "int[2] stride, int[2] padding, int[2] dilation, str activation) -> Tensor");
  // features [N, d] float32 (already divided by the standard deviations) -> the permutohedral
  // lattice of the points: (offsets [N, d+1] int32, weights [N, d+1] float32, neighbors [d+1, M, 2]
  // int32). See csrc/cpu/crf.cpp.
  m.def("permutohedral_lattice(Tensor features) -> (Tensor, Tensor, Tensor)");
  // values [N, C] float32 -> [N, C]: the lattice's Gaussian filter; reverse=True is its transpose.
  m.def(
      "permutohedral_filter(Tensor values, Tensor offsets, Tensor weights, Tensor neighbors, bool reverse) "
      "-> Tensor");
  // The first two stages of the filter, for GPU mean field (whose update slices them itself):
  // values [N, C] float32/float64, times scale [N] if given -> blurred [M+1, C], row 0 zero and row
  // v+1 vertex v. No slice and no normalising constant.
  m.def(
      "permutohedral_splat_blur(Tensor values, Tensor? scale, Tensor offsets, Tensor weights, Tensor neighbors, "
      "bool reverse) -> Tensor");
  // Mean-field inference (no autograd) with K kernels: logits [L, N] float32 (or the transpose of a
  // contiguous [N, L]), 3 lattice tensors per kernel, pre/post [K, N] normalisation, compat [K, L, L]
  // subtracted from the logits -> Q [L, N] in the logits' layout.
  m.def(
      "dense_crf_mean_field(Tensor logits, Tensor[] lattices, Tensor pre, Tensor post, Tensor compat, "
      "int iterations) -> Tensor");
  // The same for a batch of B point sets of N points each: logits [B, L, N], 3 lattice tensors per
  // kernel per image (image-major), pre/post [B, K, N], compat [K, L, L] -> Q [B, L, N].
  m.def(
      "dense_crf_mean_field_batch(Tensor logits, Tensor[] lattices, Tensor pre, Tensor post, Tensor compat, "
      "int iterations) -> Tensor");
  // Proposal paste-and-aggregate (DeconvNet's instance-wise inference, docs/proposals.md): scores
  // [P, C, h, w], boxes [P, 4] (x1, y1, x2, y2), image_index [P] int64, output_size (B, H, W) ->
  // (out [B, C, H, W], winner [B, C, H, W] int32 for mode "max" / [0] int32 for mode "sum").
  m.def(
      "paste_aggregate(Tensor scores, Tensor boxes, Tensor image_index, int[3] output_size, str mode, "
      "float fill) -> (Tensor, Tensor)");
  // grad_out [B, C, H, W], winner as above -> grad_scores [P, C, score_size[0], score_size[1]]
  m.def(
      "paste_aggregate_backward(Tensor grad_out, Tensor winner, Tensor boxes, Tensor image_index, "
      "int[2] score_size, str mode) -> Tensor");
}
