// Operator schemas of the fourm_fast namespace and the _C Python module whose import runs every
// static registration. Kernels register themselves per backend (csrc/cpu/, csrc/cuda/).
#include <Python.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <vector>

#include "cpu/attention_cpu_rows_dispatch.h"
#include "cpu/bf16_gemm.h"
#include "cpu/cpu_gemm.h"
#include "cpu/cpu_isa.h"

#ifndef FOURM_FAST_CUDA_ARCHS
#define FOURM_FAST_CUDA_ARCHS ""
#endif
#ifndef FOURM_FAST_NO_CUDA_REASON
#define FOURM_FAST_NO_CUDA_REASON "CUDA was not requested"
#endif
#ifndef FOURM_FAST_VERSION
#define FOURM_FAST_VERSION "0+unknown"
#endif

TORCH_LIBRARY(fourm_fast, m) {
  m.def("vq_lookup(Tensor x, Tensor codebook, str metric=\"l2\") -> (Tensor indices, Tensor distance)");
  m.def(
      "sample_tokens(Tensor logits, Tensor? uncond_logits, Tensor temperature, Tensor top_k, Tensor top_p, "
      "Tensor min_p, Tensor cfg_scale, Tensor seed, Tensor offset) -> (Tensor tokens, Tensor probs)");
  m.def(
      "masked_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor k_valid, Tensor? q_segment, Tensor? k_segment, "
      "Tensor? q_limit, Tensor? k_rank, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "masked_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor k_valid, "
      "Tensor? q_segment, Tensor? k_segment, Tensor? q_limit, Tensor? k_rank, float scale) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def(
      "sample_budgets(int batch_size, Tensor alpha_in, Tensor alpha_tg, Tensor? weights, Tensor size, "
      "Tensor is_image, int in_lo, int in_hi, int tg_lo, int tg_hi, int seed, int offset) "
      "-> (Tensor component, Tensor input, Tensor target)");
  m.def(
      "token_layout(Tensor input_budget, Tensor target_budget, Tensor seq_input, Tensor seq_target, Tensor size, "
      "Tensor is_image, int num_encoder, int num_decoder, int seed, int offset) "
      "-> (Tensor enc_index, Tensor enc_modality, Tensor enc_position, Tensor enc_valid, Tensor dec_index, "
      "Tensor dec_modality, Tensor dec_position, Tensor dec_valid, Tensor dec_segment, Tensor dec_rank, "
      "Tensor dec_limit)");
  m.def(
      "span_mask(Tensor lengths, Tensor input_budget, Tensor target_budget, Tensor keep_mode, int max_tokens, "
      "int modality, int seed, int offset) -> (Tensor source, Tensor num_input, Tensor num_target, "
      "Tensor top_sentinel)");
  m.def("rows_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor grad_gate, Tensor grad_up)");
}

namespace {
// rows_linear exists for the CPU: on a GPU, cuBLAS already runs few-row products at memory speed,
// and fourm_fast/nn/few_rows.py sends CUDA tensors to F.linear.
void rows_linear_cuda_unsupported(const c10::OperatorHandle&, torch::jit::Stack*) {
  TORCH_CHECK(false, "rows_linear: CPU only (a GPU's F.linear already runs few-row products at memory speed); "
              "got CUDA tensors: use torch.nn.functional.linear, or fourm_fast.nn.few_rows.few_rows_linear, "
              "which picks it");
}
}  // namespace

TORCH_LIBRARY_IMPL(fourm_fast, CUDA, m) {
  m.impl("rows_linear", torch::CppFunction::makeFromBoxedFunction<&rows_linear_cuda_unsupported>());
}

#ifndef FOURM_FAST_WITH_CUDA
namespace {
// Without compiled CUDA kernels a CUDA tensor must meet a clear error, never the generic
// "no kernel registered for CUDA" message or a crash.
void cuda_kernels_missing(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, op.schema().name(),
              ": got CUDA tensors, but this fourm_fast build has no CUDA kernels (",
              FOURM_FAST_NO_CUDA_REASON,
              "). Rebuild with a CUDA build of torch and nvcc on PATH (FOURM_FAST_CUDA=1 "
              "pip install --no-build-isolation -e .), or move the inputs to the CPU.");
}
}  // namespace

TORCH_LIBRARY_IMPL(fourm_fast, CUDA, m) {
  m.impl("vq_lookup", torch::CppFunction::makeFromBoxedFunction<&cuda_kernels_missing>());
  m.impl("sample_tokens", torch::CppFunction::makeFromBoxedFunction<&cuda_kernels_missing>());
  m.impl("masked_attention_fwd", torch::CppFunction::makeFromBoxedFunction<&cuda_kernels_missing>());
  m.impl("masked_attention_bwd", torch::CppFunction::makeFromBoxedFunction<&cuda_kernels_missing>());
  m.impl("sample_budgets", torch::CppFunction::makeFromBoxedFunction<&cuda_kernels_missing>());
  m.impl("token_layout", torch::CppFunction::makeFromBoxedFunction<&cuda_kernels_missing>());
  m.impl("span_mask", torch::CppFunction::makeFromBoxedFunction<&cuda_kernels_missing>());
  m.impl("swiglu", torch::CppFunction::makeFromBoxedFunction<&cuda_kernels_missing>());
  m.impl("swiglu_backward", torch::CppFunction::makeFromBoxedFunction<&cuda_kernels_missing>());
}
#endif

namespace {

PyObject* build_info(PyObject*, PyObject*) {
#ifdef FOURM_FAST_WITH_CUDA
  PyObject* cuda = Py_True;
#else
  PyObject* cuda = Py_False;
#endif
  return Py_BuildValue("{s:s,s:O,s:s,s:s,s:s,s:s}", "version", FOURM_FAST_VERSION, "cuda_compiled", cuda,
                       "cuda_archs", FOURM_FAST_CUDA_ARCHS, "no_cuda_reason",
                       FOURM_FAST_NO_CUDA_REASON, "cpu_kernel", fourm_fast::cpu_isa_in_use(), "cpu_gemm",
                       fourm_fast::cpu_gemm_in_use());
}

PyObject* set_cpu_isa(PyObject*, PyObject* arg) {
  const long isa = PyLong_AsLong(arg);
  if (isa == -1 && PyErr_Occurred()) return nullptr;
  try {
    fourm_fast::set_cpu_isa(static_cast<int>(isa));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* set_cpu_gemm_aten(PyObject*, PyObject* arg) {
  const int force = PyObject_IsTrue(arg);
  if (force < 0) return nullptr;
  fourm_fast::set_cpu_gemm_aten(force != 0);
  Py_RETURN_NONE;
}

// Test hook: e^x in place over a writable C-contiguous float32 buffer (a numpy array), with the
// exponential of the CPU attention row passes for the current ISA choice.
PyObject* cpu_exp(PyObject*, PyObject* arg) {
  Py_buffer view;
  if (PyObject_GetBuffer(arg, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) return nullptr;
  const bool f32 = view.itemsize == 4 && view.format != nullptr && std::string(view.format) == "f";
  if (!f32) {
    PyBuffer_Release(&view);
    PyErr_SetString(PyExc_TypeError, "_cpu_exp: expected a writable C-contiguous float32 buffer");
    return nullptr;
  }
  fourm_fast::attn_row_kernels().exp_inplace(static_cast<float*>(view.buf), view.len / 4);
  PyBuffer_Release(&view);
  Py_RETURN_NONE;
}

// The buffers of a GEMM test hook: A, B (C-contiguous 2-D, read) and C (C-contiguous 2-D,
// written), released with the object; the sizes of C = op(A) op(B) once shapes() agreed.
struct GemmHookBuffers {
  Py_buffer a{}, b{}, c{};
  int64_t m = 0, n = 0, k = 0;
  ~GemmHookBuffers() {
    if (a.obj) PyBuffer_Release(&a);
    if (b.obj) PyBuffer_Release(&b);
    if (c.obj) PyBuffer_Release(&c);
  }
  bool get(PyObject* ao, PyObject* bo, PyObject* co) {
    const int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT;
    return PyObject_GetBuffer(ao, &a, flags) == 0 && PyObject_GetBuffer(bo, &b, flags) == 0 &&
           PyObject_GetBuffer(co, &c, flags | PyBUF_WRITABLE) == 0;
  }
  static bool is(const Py_buffer& v, int itemsize, const char* format) {
    return v.ndim == 2 && v.itemsize == itemsize && v.format != nullptr && std::string(v.format) == format;
  }
  // op(A) = A^T when trans_a (A stored k x m), op(B) = B^T when trans_b (B stored n x k).
  bool shapes(bool trans_a, bool trans_b) {
    m = trans_a ? a.shape[1] : a.shape[0];
    k = trans_a ? a.shape[0] : a.shape[1];
    n = trans_b ? b.shape[0] : b.shape[1];
    const int64_t kb = trans_b ? b.shape[1] : b.shape[0];
    return kb == k && c.shape[0] == m && c.shape[1] == n;
  }
};

// Test hook: sgemm_rows (cpu_gemm.h) over numpy float32 matrices, C = alpha op(A) op(B) + beta C,
// each C-contiguous 2-D with its stored shape (op(A) = A^T when trans_a: A stored k x m).
PyObject* sgemm_rows_hook(PyObject*, PyObject* args) {
  int trans_a = 0, trans_b = 0;
  float alpha = 1.0f, beta = 0.0f;
  PyObject *ao = nullptr, *bo = nullptr, *co = nullptr;
  if (!PyArg_ParseTuple(args, "ppfOOfO", &trans_a, &trans_b, &alpha, &ao, &bo, &beta, &co)) return nullptr;
  GemmHookBuffers g;
  if (!g.get(ao, bo, co)) return nullptr;
  if (!GemmHookBuffers::is(g.a, 4, "f") || !GemmHookBuffers::is(g.b, 4, "f") || !GemmHookBuffers::is(g.c, 4, "f")) {
    PyErr_SetString(PyExc_TypeError, "_sgemm_rows: A, B and C must be C-contiguous 2-D float32 arrays");
    return nullptr;
  }
  if (!g.shapes(trans_a != 0, trans_b != 0)) {
    PyErr_SetString(PyExc_ValueError, "_sgemm_rows: shapes of op(A), op(B) and C do not agree");
    return nullptr;
  }
  fourm_fast::sgemm_rows(trans_a != 0, trans_b != 0, g.m, g.n, g.k, alpha, static_cast<const float*>(g.a.buf),
                         g.a.shape[1], static_cast<const float*>(g.b.buf), g.b.shape[1], beta,
                         static_cast<float*>(g.c.buf), g.n);
  Py_RETURN_NONE;
}

// Test hook: bf16_gemm_amx (bf16_gemm.h), C = alpha op(A) op(B) + beta C. A and B are C-contiguous
// 2-D numpy arrays of float32 or of uint16 holding bfloat16 bits, each with its stored shape; C is
// float32; optional scale_a, scale_b are the operands' scales (float32 operands only). Refused
// (RuntimeError) where cpu_isa_allows_amx() is false.
PyObject* bf16_gemm_hook(PyObject*, PyObject* args) {
  int trans_a = 0, trans_b = 0;
  float alpha = 1.0f, beta = 0.0f, scale_a = 1.0f, scale_b = 1.0f;
  PyObject *ao = nullptr, *bo = nullptr, *co = nullptr;
  if (!PyArg_ParseTuple(args, "ppfOOfO|ff", &trans_a, &trans_b, &alpha, &ao, &bo, &beta, &co, &scale_a, &scale_b)) {
    return nullptr;
  }
#ifndef FOURM_FAST_WITH_AMX
  PyErr_SetString(PyExc_RuntimeError, "_bf16_gemm: the AMX kernels are not available (not in this build)");
  return nullptr;
#else
  if (!fourm_fast::cpu_isa_allows_amx()) {
    PyErr_SetString(PyExc_RuntimeError, "_bf16_gemm: the AMX kernels are not available (CPU or ISA override)");
    return nullptr;
  }
  GemmHookBuffers g;
  if (!g.get(ao, bo, co)) return nullptr;
  auto operand = [](const Py_buffer& v) { return GemmHookBuffers::is(v, 4, "f") || GemmHookBuffers::is(v, 2, "H"); };
  if (!operand(g.a) || !operand(g.b) || !GemmHookBuffers::is(g.c, 4, "f")) {
    PyErr_SetString(PyExc_TypeError, "_bf16_gemm: A, B must be C-contiguous 2-D float32 or uint16 (bfloat16 bits) arrays, C float32");
    return nullptr;
  }
  if (!g.shapes(trans_a != 0, trans_b != 0)) {
    PyErr_SetString(PyExc_ValueError, "_bf16_gemm: shapes of op(A), op(B) and C do not agree");
    return nullptr;
  }
  const fourm_fast::Bf16GemmOperand A{g.a.buf, g.a.shape[1], trans_a != 0, g.a.itemsize == 4, scale_a},
      B{g.b.buf, g.b.shape[1], trans_b != 0, g.b.itemsize == 4, scale_b};
  std::vector<char> scratch(fourm_fast::bf16_gemm_scratch_bytes(g.m, g.n, g.k) + 64);
  void* aligned = scratch.data() + (64 - reinterpret_cast<uintptr_t>(scratch.data()) % 64) % 64;
  fourm_fast::bf16_gemm_amx(g.m, g.n, g.k, alpha, A, B, beta, static_cast<float*>(g.c.buf), g.n, aligned);
  Py_RETURN_NONE;
#endif
}

// Test hook: float32 numpy array (C-contiguous, any shape) -> a same-shaped uint16 array of its
// bfloat16 bits through f32_to_bf16_rows (bf16_gemm.h), as one row.
PyObject* bf16_round_hook(PyObject*, PyObject* args) {
  PyObject *xo = nullptr, *yo = nullptr;
  if (!PyArg_ParseTuple(args, "OO", &xo, &yo)) return nullptr;
#ifndef FOURM_FAST_WITH_AMX
  PyErr_SetString(PyExc_RuntimeError, "_bf16_round: the AMX kernels are not available (not in this build)");
  return nullptr;
#else
  if (!fourm_fast::cpu_isa_allows_amx()) {
    PyErr_SetString(PyExc_RuntimeError, "_bf16_round: the AMX kernels are not available (CPU or ISA override)");
    return nullptr;
  }
  Py_buffer x{}, y{};
  if (PyObject_GetBuffer(xo, &x, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) return nullptr;
  if (PyObject_GetBuffer(yo, &y, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) != 0) {
    PyBuffer_Release(&x);
    return nullptr;
  }
  const bool ok = x.itemsize == 4 && x.format && std::string(x.format) == "f" && y.itemsize == 2 && y.format &&
                  std::string(y.format) == "H" && x.len / 4 == y.len / 2;
  if (ok) {
    const int64_t n = x.len / 4;
    fourm_fast::f32_to_bf16_rows(static_cast<const float*>(x.buf), n, 1, n, nullptr, static_cast<uint16_t*>(y.buf), n);
  }
  PyBuffer_Release(&x);
  PyBuffer_Release(&y);
  if (!ok) {
    PyErr_SetString(PyExc_TypeError, "_bf16_round: expected a float32 array and a writable uint16 array of its size");
    return nullptr;
  }
  Py_RETURN_NONE;
#endif
}

PyMethodDef kMethods[] = {
    {"build_info", build_info, METH_NOARGS, "Build-time facts: version, CUDA kernels and archs."},
    {"_set_cpu_isa", set_cpu_isa, METH_O,
     "Force the CPU micro-kernels: 0 auto, 1 generic, 2 avx2+fma, 3 avx512, 4 avx512+amx (tests and benchmarks)."},
    {"_cpu_exp", cpu_exp, METH_O,
     "e^x in place over a float32 numpy array, with the CPU attention kernels' exponential (tests)."},
    {"_sgemm_rows", sgemm_rows_hook, METH_VARARGS,
     "(trans_a, trans_b, alpha, A, B, beta, C): the CPU tiles' GEMM on float32 numpy arrays (tests)."},
    {"_bf16_gemm", bf16_gemm_hook, METH_VARARGS,
     "(trans_a, trans_b, alpha, A, B, beta, C[, scale_a, scale_b]): the AMX bfloat16 GEMM; A, B float32 or uint16 bfloat16 bits (tests)."},
    {"_bf16_round", bf16_round_hook, METH_VARARGS,
     "(x float32, out uint16): x's bfloat16 bits through the AMX tiles' vector rounding (tests)."},
    {"_set_cpu_gemm_aten", set_cpu_gemm_aten, METH_O,
     "True: CPU tile products through ATen even where BLAS sgemm_ is linked (tests the fallback)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C",
                       "fourm_fast native operators (registered in torch.ops.fourm_fast).", -1,
                       kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
