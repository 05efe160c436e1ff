// The contract of the NLFT row pass (the "first stage"), shared by the CPU and CUDA kernels.
//
// Plain C++ with raw pointers so that the CUDA translation unit needs no torch headers (the
// CPU torch wheel ships none for CUDA). Semantics are those of the Triton `_nlft_fwd_kernel`
// in nlft_kernels/ops/kernels.py: per row, log-softmax statistics of up to three views,
// the saliency test, the token coefficient and, optionally, the provisional base gradient.
#pragma once

#include <cstdint>

namespace nlft {

// How a teacher view reaches the kernel (the values of ViewMode in nlft_kernels/ops/contracts.py;
// tests/csrc/test_contracts.py checks them).
enum ViewMode : int { kViewNone = 0, kViewLogits = 1, kViewLogprobs = 2 };

// Element types of logits and gradient rows.
enum DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// The element type of the gradient rows for base logits of `base` (RowPass::grad_dtype), as
// nlft_kernels.ops.launch.grad_dtype: float32 for float16, the base dtype otherwise. The rows
// are multiplied by grad_output only in backward, where GradScaler's factor (up to 2**16)
// arrives; stored in float16 first, entries below ~6e-8 would underflow to 0. bfloat16 has
// float32's range and keeps its own type.
constexpr DType grad_dtype_for(DType base) { return base == kFloat16 ? kFloat32 : base; }

// Entries of each block's slice in the on-chip CUDA kernel (RowPass::blocks_per_row = `blocks`):
// ceil(vocab / blocks) rounded up to whole packs of `pack` entries, so that no pack straddles two
// blocks. nlft_kernels.ops.launch.on_chip_slice_bytes computes the same (tests/csrc checks it).
constexpr int64_t on_chip_slice(int64_t vocab, int64_t blocks, int64_t pack) {
  return ((vocab + blocks - 1) / blocks + pack - 1) / pack * pack;
}

// A [B, T, V] view addressed as ptr + b * stride_b + t * stride_t + v (unit stride over V),
// or, for kViewLogprobs, an [N] vector of label log-probs in the accumulator type.
struct RowView {
  const void* ptr = nullptr;
  int64_t stride_b = 0;
  int64_t stride_t = 0;
  DType dtype = kFloat32;
  ViewMode mode = kViewNone;
};

// The NLFT constants the row pass needs, already in the form the kernel compares against: the
// fields of RuleConstants (nlft_kernels/ops/contracts.py), passed to the bindings by name.
struct RowConfig {
  double tau;                 // correct_threshold
  double saliency_power;
  double other_power;
  double log_ratio;           // log(ratio_threshold)
  double log_judge_min;       // log(judge_min_prob), -inf for 0
  double sigmoid_center;
  double sigmoid_scale;
  double unlikelihood_clamp;
  double nll_weight;
  int64_t ignore_index;
};

// Everything one launch reads and writes. The accumulator type (float, or double when the
// base logits are float64) types stats, scale and log-prob teacher views.
struct RowPass {
  RowView base;               // mode kViewLogits always
  RowView standard;           // kViewLogits or kViewLogprobs
  RowView judge;              // any mode; read only on labelled rows of wrong samples
  const int64_t* labels;      // [N]
  const bool* wrong;          // [N], rows of wrong samples
  const void* scale;          // [N] acc, the row's factor in the reduced loss
  void* stats;                // [3, N] acc: log p(label) of base, standard, judge
  bool* saliency;             // [N]
  void* grad;                 // [N, V] contiguous in grad_dtype, or nullptr
  DType grad_dtype = kFloat32;  // grad_dtype_for(base.dtype) (the CUDA kernel accepts no other)
  int64_t n_rows;             // N = B * T
  int64_t steps;              // T
  int64_t vocab;              // V
  // CUDA only: 0 launches one block per row (the base row read twice, the second time from L2
  // if it is still there); k in 1..8 (sm_90, with a gradient) a thread-block cluster of k blocks
  // per row, each holding its slice of ceil(V / k) base entries in shared memory between the two
  // sweeps (the base row read once). nlft_kernels.ops.launch.cuda_row_blocks chooses.
  int blocks_per_row = 0;
  RowConfig cfg;
};

}  // namespace nlft
