// Every kdfast op schema, in one place. Kernels register per device in
// csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(kdfast, CPU, m)) and csrc/cuda_ops.cpp;
// fake kernels and autograd are registered from Python in kdfast/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "cpu/gemm.h"
#include "cpu/grad_buffers.h"

namespace {
// kdfast._C.cpu_bf16_gemm_status(): whether the CPU tile GEMMs of bf16 inputs
// take the bf16 GEMM now, and why (csrc/cpu/gemm.h).
PyObject* cpu_bf16_gemm_status(PyObject*, PyObject*) {
  return PyUnicode_FromString(kdfast::cpu::bf16_gemm_status().c_str());
}
// kdfast._C.empty_cpu_cache() / cpu_cache_bytes(): the grad_weight block kept
// for reuse (csrc/cpu/grad_buffers.h).
PyObject* empty_cpu_cache(PyObject*, PyObject*) {
  return PyLong_FromLongLong(kdfast::cpu::empty_cpu_cache());
}
PyObject* cpu_cache_bytes(PyObject*, PyObject*) {
  return PyLong_FromLongLong(kdfast::cpu::cpu_cache_bytes());
}
PyMethodDef module_methods[] = {
    {"cpu_bf16_gemm_status", cpu_bf16_gemm_status, METH_NOARGS, "whether the CPU's bf16 tile GEMM is on, and why"},
    {"empty_cpu_cache", empty_cpu_cache, METH_NOARGS, "free the kept grad_weight block; the bytes freed"},
    {"cpu_cache_bytes", cpu_cache_bytes, METH_NOARGS, "bytes of the kept grad_weight block"},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

// Importing kdfast._C loads this library, which registers the ops below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods};
  return PyModule_Create(&module_def);
}

// The loss keywords shared by every loss op (shared/DESIGN.md section 2).
#define KDFAST_LOSS_ARGS                                                                 \
  "float hard_weight, float soft_weight, float double_weight, float temperature, "       \
  "str negative_weighting, float negative_scale, float negative_shift, "                 \
  "float label_smoothing, int ignore_index"

// Targets and teacher of the fused linear loss, after the student's tensors.
#define KDFAST_FUSED_INPUTS                                                              \
  "Tensor? target, Tensor? target_indptr, Tensor? target_indices, "                      \
  "Tensor? teacher_logits, Tensor? teacher_hidden, Tensor? teacher_weight, "             \
  "Tensor? teacher_bias, Tensor? topk_indices, Tensor? topk_logits, Tensor? topk_lse"

TORCH_LIBRARY(kdfast, m) {
  // Dense logits [B, V] -> per-row losses [B] (dtype of the logits) and the per-row
  // statistics [B, 8] the backward recomputes the softmaxes from.
  m.def("distillation_loss_forward(Tensor student_logits, Tensor? target, Tensor? teacher_logits, "
        KDFAST_LOSS_ARGS ") -> (Tensor, Tensor)");
  m.def("distillation_loss_backward(Tensor grad_losses, Tensor student_logits, Tensor? target, "
        "Tensor? teacher_logits, Tensor stats, " KDFAST_LOSS_ARGS ") -> Tensor");

  // The student's last linear layer and the loss in one op: hidden [B, d] and
  // weight [V, d] (+ bias [V]) in, per-row losses [B] and statistics [B, 8] out.
  // Targets: an int target [B], or CSR positives (target_indptr [B+1],
  // target_indices) for pick-all-labels. Teacher: dense logits [B, V], or
  // hidden [B, d_t] + weight [V, d_t] (+ bias) computed tile by tile, or a
  // stored top-k (indices [B, k], logits [B, k], lse [B]). tile_size 0 picks
  // the class tile from B and a memory budget; filter_eps is read by the
  // backward only (0: exact, no gradient filtering).
  m.def("fused_linear_loss_forward(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, "
        KDFAST_FUSED_INPUTS ", " KDFAST_LOSS_ARGS ", int tile_size, float filter_eps) -> (Tensor, Tensor)");
  // -> grad_hidden [B, d], grad_weight [V, d], grad_bias [V] ([0] without a bias)
  m.def("fused_linear_loss_backward(Tensor grad_losses, Tensor student_hidden, Tensor student_weight, "
        "Tensor? student_bias, " KDFAST_FUSED_INPUTS ", Tensor stats, " KDFAST_LOSS_ARGS
        ", int tile_size, float filter_eps) -> (Tensor, Tensor, Tensor)");

  // Teacher labeling: logits = hidden [B, d] @ weight[V, d]^T (+ bias) made tile by
  // tile; per row the k largest logits (descending, ties to the lower class) and
  // their classes, LSE and entropy of softmax(logits / temperature), and the
  // probability mass of the top-k. -> indices [B, k] int64, logits [B, k],
  // lse [B], entropy [B], covered [B] (float32; float64 for float64 inputs).
  m.def("teacher_topk(Tensor hidden, Tensor weight, Tensor? bias, int k, float temperature, int tile_size) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Extreme Classification Repository BoW file -> CSR arrays: feature indptr
  // [N+1], indices, values (float32), label indptr [N+1], label indices, and
  // the header [N, D, L].
  m.def("read_xmlrepo(str path) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Seed 001: weights [T, k, d] (T checkpoints of a k x d matrix) and a data
  // eigenbasis [d, r] -> out [T, r], out[t, i] = ||W_t basis[:, i]||_2.
  m.def("eigenprojection(Tensor weights, Tensor basis) -> Tensor");

  // Seed 004, eq. 3: per element, the root z of
  //   (rho/T)(sigmoid(z/T) - sigmoid(z_t/T)) + (1 - rho)(sigmoid(z) - y) = 0,
  // the logit a wide student converges to; hard_labels y in [0, 1], same shape.
  m.def("effective_student_logits(Tensor teacher_logits, Tensor hard_labels, float soft_ratio, float temperature) "
        "-> Tensor");
}
