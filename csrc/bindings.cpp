// nlft_kernels._C: the compiled NLFT row pass, bound through the torch extension API.
//
// first_stage() checks and unpacks the tensors of one call into a RowPass and runs the CPU
// kernel (csrc/cpu) or, in a build with NLFT_WITH_CUDA, the CUDA kernel (csrc/cuda) on the
// tensors' device. The Python side (nlft_kernels/ops/extension_ops.py, a torch.library op with
// a fake implementation) passes the fields of its Views and RuleConstants' fields by keyword.
#include <torch/extension.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "cpu/row_pass_cpu.h"
#include "nlft_row.h"

#ifdef NLFT_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/row_pass_cuda.h"
#endif

namespace {

using nlft::DType;

DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return nlft::kFloat32;
    case at::kDouble: return nlft::kFloat64;
    case at::kBFloat16: return nlft::kBFloat16;
    case at::kHalf: return nlft::kFloat16;
    default: TORCH_CHECK(false, name, " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
  }
}

at::ScalarType to_scalar_type(DType dtype) {
  switch (dtype) {
    case nlft::kFloat32: return at::kFloat;
    case nlft::kFloat64: return at::kDouble;
    case nlft::kBFloat16: return at::kBFloat16;
    case nlft::kFloat16: return at::kHalf;
  }
  TORCH_CHECK(false, "unknown nlft::DType ", static_cast<int>(dtype));
}

// A teacher view as the kernel reads it; `owned` keeps a converted copy alive for the call.
nlft::RowView teacher_view(const std::optional<at::Tensor>& view, int64_t mode, const at::Tensor& base,
                           at::ScalarType acc, const char* name, at::Tensor& owned) {
  nlft::RowView out;
  out.mode = static_cast<nlft::ViewMode>(mode);
  if (mode == nlft::kViewNone) return out;
  TORCH_CHECK(view.has_value(), name, " is required with mode ", mode);
  owned = *view;
  TORCH_CHECK(owned.device() == base.device(), name, " is on ", owned.device(), ", base on ", base.device());
  if (mode == nlft::kViewLogprobs) {
    TORCH_CHECK(owned.dim() == 1 && owned.numel() == base.size(0) * base.size(1), name,
                " log-probs must be [N] with N = B*T");
    owned = owned.to(acc).contiguous();
  } else {
    TORCH_CHECK(mode == nlft::kViewLogits, name, " mode must be 0, 1 or 2, got ", mode);
    TORCH_CHECK(owned.sizes() == base.sizes(), name, " logits must have the base logits' shape ", base.sizes());
#ifdef NLFT_WITH_CUDA
    // The CUDA kernel is compiled for teacher rows in the base dtype or in the accumulator
    // dtype; other dtypes are widened to the accumulator type, which the Triton kernel does
    // on load too, so the values are the same.
    if (owned.is_cuda() && owned.scalar_type() != base.scalar_type()) owned = owned.to(acc);
#endif
    if (owned.stride(2) != 1) owned = owned.contiguous();
    out.stride_b = owned.stride(0);
    out.stride_t = owned.stride(1);
    out.dtype = to_dtype(owned, name);
  }
  out.ptr = owned.data_ptr();
  return out;
}

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> first_stage(
    const at::Tensor& base, const at::Tensor& standard, int64_t standard_mode, const std::optional<at::Tensor>& judge,
    int64_t judge_mode, const at::Tensor& labels, const at::Tensor& wrong, const at::Tensor& scale,
    int64_t ignore_index, double tau, double saliency_power, double other_power, double log_ratio,
    double log_judge_min, double sigmoid_center, double sigmoid_scale, double unlikelihood_clamp, double nll_weight,
    bool compute_grad, const std::optional<at::Tensor>& grad_out, int64_t blocks_per_row) {
  TORCH_CHECK(base.dim() == 3 && base.stride(2) == 1, "base logits must be [B, T, V] with unit stride over V");
  const int64_t n_rows = base.size(0) * base.size(1);
  const at::ScalarType acc = base.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() && labels.numel() == n_rows,
              "labels must be contiguous int64 [N]");
  TORCH_CHECK(wrong.scalar_type() == at::kBool && wrong.is_contiguous() && wrong.numel() == n_rows,
              "wrong must be contiguous bool [N]");
  TORCH_CHECK(scale.scalar_type() == acc && scale.is_contiguous() && scale.numel() == n_rows,
              "scale must be contiguous [N] in ", acc);
  for (const at::Tensor* t : {&labels, &wrong, &scale}) {
    TORCH_CHECK(t->device() == base.device(), "all inputs must be on ", base.device());
  }
  TORCH_CHECK(standard_mode != nlft::kViewNone, "the standard view is required");

  nlft::RowPass p{};
  p.base = {base.data_ptr(), base.stride(0), base.stride(1), to_dtype(base, "base logits"), nlft::kViewLogits};
  at::Tensor standard_owned, judge_owned;
  p.standard = teacher_view(standard, standard_mode, base, acc, "standard", standard_owned);
  p.judge = teacher_view(judge, judge_mode, base, acc, "judge", judge_owned);
#ifdef NLFT_WITH_CUDA
  // Both teachers share one element type in the CUDA kernel.
  if (base.is_cuda() && p.standard.mode == nlft::kViewLogits && p.judge.mode == nlft::kViewLogits &&
      p.standard.dtype != p.judge.dtype) {
    const auto widen = [&](nlft::RowView& v, at::Tensor& owned, const char* name) {
      if (owned.scalar_type() != acc) v = teacher_view(owned.to(acc), nlft::kViewLogits, base, acc, name, owned);
    };
    widen(p.standard, standard_owned, "standard");
    widen(p.judge, judge_owned, "judge");
  }
#endif
  p.labels = labels.data_ptr<int64_t>();
  p.wrong = wrong.data_ptr<bool>();
  p.scale = scale.data_ptr();
  auto stats = at::empty({3, n_rows}, base.options().dtype(acc));
  auto saliency = at::empty({n_rows}, base.options().dtype(at::kBool));
  // The gradient rows are float32 for float16 base logits, else in the base dtype: this mirrors
  // nlft_kernels.ops.launch.grad_dtype, which the Triton and torch paths allocate with (see
  // nlft::grad_dtype_for). backward multiplies them by grad_output (GradScaler's factor) in
  // place; autograd then casts the returned gradient to float16.
  p.grad_dtype = nlft::grad_dtype_for(p.base.dtype);
  std::optional<at::Tensor> grad;
  if (compute_grad && grad_out.has_value()) {
    // The caller's buffer: for inplace_grad, the base logits themselves (each row is read
    // before its gradient overwrites it, by the same thread).
    grad = *grad_out;
    TORCH_CHECK(grad->device() == base.device() && grad->is_contiguous() && grad->sizes() == base.sizes() &&
                    grad->scalar_type() == to_scalar_type(p.grad_dtype),
                "grad_out must be a contiguous ", to_scalar_type(p.grad_dtype), " tensor shaped like the base logits");
    TORCH_CHECK(grad->data_ptr() != base.data_ptr() || base.is_contiguous(),
                "writing the gradient into the base logits needs contiguous base logits");
  } else if (compute_grad) {
    grad = at::empty(base.sizes(), base.options().dtype(to_scalar_type(p.grad_dtype)));
  }
  p.stats = stats.data_ptr();
  p.saliency = saliency.data_ptr<bool>();
  p.grad = compute_grad ? grad->data_ptr() : nullptr;
  p.n_rows = n_rows;
  p.steps = base.size(1);
  p.vocab = base.size(2);
  p.cfg = {tau,           saliency_power, other_power,        log_ratio,  log_judge_min,
           sigmoid_center, sigmoid_scale, unlikelihood_clamp, nll_weight, ignore_index};
  // The on-chip CUDA kernel (nlft_row.h): sm_90 thread-block clusters of 1..8 blocks, for the
  // gradient's second sweep; nlft_kernels.ops.launch.cuda_row_blocks asks for it only there.
  TORCH_CHECK(blocks_per_row >= 0 && blocks_per_row <= 8, "blocks_per_row must be in [0, 8], got ", blocks_per_row);
  TORCH_CHECK(blocks_per_row == 0 || (base.is_cuda() && compute_grad),
              "blocks_per_row > 0 (the on-chip CUDA kernel) needs CUDA logits and compute_grad=True");
  p.blocks_per_row = static_cast<int>(blocks_per_row);

  if (base.is_cuda()) {
#ifdef NLFT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(base.device());
    const cudaError_t err = nlft::cuda::row_pass_cuda(p, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "NLFT CUDA row pass failed (blocks_per_row=", blocks_per_row,
                "): ", cudaGetErrorString(err));
#else
    TORCH_CHECK(false, "nlft_kernels._C was built without CUDA (see nlft_kernels.backends())");
#endif
  } else {
    TORCH_CHECK(base.device().is_cpu(), "unsupported device ", base.device());
    nlft::cpu::row_pass_cpu(p);
  }
  return {stats, saliency, grad};
}

// grad[r] *= factor[r] for every row r of grad [R, V], in place (CPU tensors): the fix-up of the
// stored gradient in backward, with grad_output folded into factor. A row whose factor is 1 is
// not touched; one whose factor is 0 is zero-filled without being read.
void scale_rows(at::Tensor& grad, const at::Tensor& factor) {
  TORCH_CHECK(grad.device().is_cpu() && grad.is_contiguous() && grad.dim() >= 1,
              "grad must be a contiguous CPU tensor");
  const at::ScalarType acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor factor_c = factor.to(acc).contiguous();
  const int64_t vocab = grad.size(-1), n_grad_rows = vocab ? grad.numel() / vocab : 0;
  TORCH_CHECK(factor_c.numel() == n_grad_rows, "factor must have one entry per row of grad, got ", factor_c.numel(),
              " for ", n_grad_rows, " rows");
  nlft::cpu::RowScale s{grad.data_ptr(), to_dtype(grad, "grad"), vocab, n_grad_rows, factor_c.data_ptr()};
  nlft::cpu::scale_rows_cpu(s);
}

// The labelled rows both per-row CPU passes (RowSoftmaxGrad, RowLogprobs) read: the view of
// logits [B, T, V] (unit stride over V), labels [N] int64, ignore_index, N = B * T, T and V. The
// callers check the layout first.
template <typename LabelledRows>
void set_labelled_rows(LabelledRows& q, const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index) {
  q.logits = {logits.data_ptr(), logits.stride(0), logits.stride(1), to_dtype(logits, "logits"), nlft::kViewLogits};
  q.labels = labels.data_ptr<int64_t>();
  q.ignore_index = ignore_index;
  q.n_rows = logits.size(0) * logits.size(1);
  q.steps = logits.size(1);
  q.vocab = logits.size(2);
}

// out[r] = coef[r] * (softmax(logits[r]) - onehot(labels[r])) from the saved lse [N] (CPU
// tensors): the gradient computed in backward (float16 logits, vocabulary-parallel shards,
// token_logprobs). Rows whose coef is 0 or whose label is ignore_index are zero-filled without
// being read; a label outside [0, V) gets no one-hot. `out` may be `logits` itself (contiguous).
void softmax_grad(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& coef,
                  int64_t ignore_index, at::Tensor& out) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 3 && logits.stride(2) == 1,
              "logits must be CPU [B, T, V] with unit stride over V");
  const int64_t n_rows = logits.size(0) * logits.size(1);
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() && labels.numel() == n_rows,
              "labels must be contiguous int64 [N]");
  const at::Tensor lse_c = lse.to(acc).contiguous(), coef_c = coef.to(acc).contiguous();
  TORCH_CHECK(lse_c.numel() == n_rows && coef_c.numel() == n_rows, "lse and coef must be [N]");
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.numel() == logits.numel() &&
                  out.size(-1) == logits.size(2),
              "out must be a contiguous CPU tensor of the logits' size");
  TORCH_CHECK(out.data_ptr() != logits.data_ptr() || logits.is_contiguous(),
              "writing the gradient into the logits needs contiguous logits");
  nlft::cpu::RowSoftmaxGrad q{};
  set_labelled_rows(q, logits, labels, ignore_index);
  q.lse = lse_c.data_ptr();
  q.coef = coef_c.data_ptr();
  q.out = out.data_ptr();
  q.out_dtype = to_dtype(out, "out");
  nlft::cpu::softmax_grad_cpu(q);
}

// (log p(label) [N], lse [N]) of CPU logits [B, T, V], in float (double for float64 logits).
std::tuple<at::Tensor, at::Tensor> label_logprobs(const at::Tensor& logits, const at::Tensor& labels,
                                                  int64_t ignore_index) {
  TORCH_CHECK(logits.device().is_cpu(), "label_logprobs runs on CPU tensors, got ", logits.device());
  TORCH_CHECK(logits.dim() == 3 && logits.stride(2) == 1, "logits must be [B, T, V] with unit stride over V");
  const int64_t n_rows = logits.size(0) * logits.size(1);
  TORCH_CHECK(labels.device().is_cpu() && labels.scalar_type() == at::kLong && labels.is_contiguous() &&
                  labels.numel() == n_rows,
              "labels must be contiguous int64 [N] on the CPU");
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto logprob = at::empty({n_rows}, logits.options().dtype(acc));
  auto lse = at::empty({n_rows}, logits.options().dtype(acc));
  nlft::cpu::RowLogprobs q{};
  set_labelled_rows(q, logits, labels, ignore_index);
  q.logprob = logprob.data_ptr();
  q.lse = lse.data_ptr();
  nlft::cpu::label_logprobs_cpu(q);
  return {logprob, lse};
}

bool built_with_cuda() {
#ifdef NLFT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Compiled NLFT row pass (the first stage of nlft_kernels.nlft_loss): C++ CPU and CUDA kernels";
  m.def("first_stage", &first_stage,
        "Row pass: (stats [3, N] acc, saliency [N] bool, gradient [B, T, V] or None: float32 for float16 base "
        "logits, else in the base dtype, as nlft_kernels.ops.launch.grad_dtype; written into grad_out if given)",
        py::arg("base"), py::arg("standard"), py::arg("standard_mode"), py::arg("judge"), py::arg("judge_mode"),
        py::arg("labels"), py::arg("wrong"), py::arg("scale"), py::arg("ignore_index"), py::arg("tau"),
        py::arg("saliency_power"), py::arg("other_power"), py::arg("log_ratio"), py::arg("log_judge_min"),
        py::arg("sigmoid_center"), py::arg("sigmoid_scale"), py::arg("unlikelihood_clamp"), py::arg("nll_weight"),
        py::arg("compute_grad"), py::arg("grad_out") = py::none(), py::arg("blocks_per_row") = 0);
  m.def("scale_rows", &scale_rows,
        "grad[r] *= factor[r] for every row, in place (CPU): rows with factor 1 untouched, 0 zero-filled unread",
        py::arg("grad"), py::arg("factor"));
  m.def("softmax_grad", &softmax_grad,
        "out[r] = coef[r] * (softmax(logits[r]) - onehot(label)) from lse (CPU); coef 0 or ignored rows zero-filled",
        py::arg("logits"), py::arg("labels"), py::arg("lse"), py::arg("coef"), py::arg("ignore_index"),
        py::arg("out"));
  m.def("label_logprobs", &label_logprobs,
        "token_logprobs' forward on CPU logits [B, T, V]: (log p(label) [N], lse [N]), zero on ignored rows",
        py::arg("logits"), py::arg("labels"), py::arg("ignore_index"));
  m.def("cpu_capability", &nlft::cpu::row_pass_capability,
        "The instruction set of the CPU kernel copy that runs here: AVX512, AVX2 or DEFAULT");
  m.def("built_with_cuda", &built_with_cuda, "Whether this build contains the CUDA kernel");
}
