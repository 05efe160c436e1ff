// The CPU row pass, one copy per instruction set; row_pass_cpu() picks the widest the CPU
// (and ATEN_CPU_CAPABILITY, as for torch's own kernels) allows.
#pragma once

#include <string>

#include "../nlft_row.h"

namespace nlft::cpu {

// grad[r, :] *= factor[r] for every row r < n_rows: the fix-up of the stored gradient in
// backward (the per-sample rule's factor times grad_output). Rows whose factor is 1 are not
// touched; rows whose factor is 0 are zero-filled without being read.
struct RowScale {
  void* grad;                 // [R, V] contiguous, in `dtype`
  DType dtype;
  int64_t vocab;              // V
  int64_t n_rows;             // R
  const void* factor;         // [R] float (double for float64 gradients)
};

// out[r] = coef[r] * (softmax(x[r]) - onehot(label[r])) from the saved lse: the gradient
// computed in backward. Rows whose coef is 0 or whose label is ignore_index are zero-filled
// without being read; a label outside [0, V) gets no one-hot. `out` may alias the logits
// (contiguous): each tile is read before it is written.
struct RowSoftmaxGrad {
  RowView logits;             // [B, T, V] with unit stride over V
  const int64_t* labels;      // [N]
  int64_t ignore_index;
  const void* lse;            // [N] acc
  const void* coef;           // [N] acc
  void* out;                  // [N, V] contiguous in out_dtype
  DType out_dtype;
  int64_t n_rows;             // N = B * T
  int64_t steps;              // T
  int64_t vocab;              // V
};

// Label log-probs of one view of logits (token_logprobs, linear_token_logprobs' teachers):
// lp[r] = x[r, label] - lse(x[r]) and lse[r], zero on rows whose label is ignore_index; one
// sweep over each labelled row, nothing read for the others.
struct RowLogprobs {
  RowView logits;             // [B, T, V] with unit stride over V, mode kViewLogits
  const int64_t* labels;      // [N]
  int64_t ignore_index;
  void* logprob;              // [N] acc (float, double for float64 logits)
  void* lse;                  // [N] acc
  int64_t n_rows;             // N = B * T
  int64_t steps;              // T
  int64_t vocab;              // V
};

namespace DEFAULT {
void row_pass(const RowPass& p);
void scale_rows(const RowScale& s);
void softmax_grad(const RowSoftmaxGrad& q);
void label_logprobs(const RowLogprobs& q);
}
namespace AVX2 {
void row_pass(const RowPass& p);
void scale_rows(const RowScale& s);
void softmax_grad(const RowSoftmaxGrad& q);
void label_logprobs(const RowLogprobs& q);
}
namespace AVX512 {
void row_pass(const RowPass& p);
void scale_rows(const RowScale& s);
void softmax_grad(const RowSoftmaxGrad& q);
void label_logprobs(const RowLogprobs& q);
}

// Runs the row pass for `p` on the calling thread pool (at::parallel_for over rows).
void row_pass_cpu(const RowPass& p);

// Runs the row fix-up `s` (at::parallel_for over its rows).
void scale_rows_cpu(const RowScale& s);

// Runs `q` (at::parallel_for over rows).
void label_logprobs_cpu(const RowLogprobs& q);

// Runs `q` (at::parallel_for over rows).
void softmax_grad_cpu(const RowSoftmaxGrad& q);

// "AVX512", "AVX2" or "DEFAULT": the copy row_pass_cpu() runs on this machine.
std::string row_pass_capability();

}  // namespace nlft::cpu
