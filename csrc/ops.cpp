// Every kdfast op schema, in one place. Kernels register per device in
// csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(kdfast, CPU, m)) and csrc/cuda_ops.cpp;
// fake kernels and autograd are registered from Python in kdfast/ops.py.
#include <Python.h>
#include <torch/library.h>

// Importing kdfast._C loads this library, which registers the ops below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

// The loss keywords shared by every loss op (shared/DESIGN.md section 2).
#define KDFAST_LOSS_ARGS                                                                 \
  "float hard_weight, float soft_weight, float double_weight, float temperature, "       \
  "str negative_weighting, float negative_scale, float negative_shift, "                 \
  "float label_smoothing, int ignore_index"

TORCH_LIBRARY(kdfast, m) {
  // Dense logits [B, V] -> per-row losses [B] (dtype of the logits) and the per-row
  // statistics [B, 5] the backward recomputes the softmaxes from.
  m.def("distillation_loss_forward(Tensor student_logits, Tensor? target, Tensor? teacher_logits, "
        KDFAST_LOSS_ARGS ") -> (Tensor, Tensor)");
  m.def("distillation_loss_backward(Tensor grad_losses, Tensor student_logits, Tensor? target, "
        "Tensor? teacher_logits, Tensor stats, " KDFAST_LOSS_ARGS ") -> Tensor");
}
