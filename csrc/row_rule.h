// The per-row NLFT rule, shared by the CPU and CUDA kernels: from the three label log-probs
// of one row, decide saliency and the coefficient of (softmax - onehot) in the base gradient.
// Mirrors `_nlft_fwd_kernel` (nlft_kernels/ops/kernels.py) and `row_saliency`/`row_terms`
// (nlft_kernels/ops/row_rule.py) line by line.
#pragma once

#include <math.h>

#include "nlft_row.h"

#if defined(__CUDACC__)
#define NLFT_HD __host__ __device__ __forceinline__
#else
// Internal linkage: csrc/cpu/row_pass_kernel.cpp is compiled once per instruction set, and an
// out-of-line copy shared between those objects could be the AVX-512 one on any CPU.
#define NLFT_HD static inline
#endif

namespace nlft {

NLFT_HD float acc_exp(float x) { return expf(x); }
NLFT_HD double acc_exp(double x) { return exp(x); }
NLFT_HD float acc_log(float x) { return logf(x); }
NLFT_HD double acc_log(double x) { return log(x); }
NLFT_HD float acc_sqrt(float x) { return sqrtf(x); }
NLFT_HD double acc_sqrt(double x) { return sqrt(x); }

// Whether a labelled row's label indexes its row. With validate=False a label that is neither
// ignore_index nor in [0, V) reaches the kernels; every backend then gives the row the same
// result: nothing is read at the label (no read outside the row), its log-probs from logits are
// NaN, and so are its coefficient (hence its whole gradient row) and its loss: visible, never
// silently ignored. It is never salient.
NLFT_HD bool label_in_range(int64_t label, int64_t vocab) { return label >= 0 && label < vocab; }

template <typename acc_t>
NLFT_HD acc_t quiet_nan() {
  return static_cast<acc_t>(NAN);
}

template <typename acc_t>
struct RowDecision {
  acc_t coef;     // factor of (softmax - onehot) in the row's gradient, scale included
  bool saliency;
};

// lp_b/lp_s/lp_j: label log-probs (0 on unlabelled rows, lp_j 0 on correct rows); valid: the
// label is not ignore_index; in_range: label_in_range (see there for a valid row without it);
// scale: the row's factor in the reduced loss.
template <typename acc_t>
NLFT_HD RowDecision<acc_t> decide_row(acc_t lp_b, acc_t lp_s, acc_t lp_j, bool valid, bool in_range, bool wrong,
                                      acc_t scale, const RowConfig& cfg) {
  const acc_t tau = static_cast<acc_t>(cfg.tau);
  // Correct response: saliency p_s > tau; weight 1 + u**P on saliency, (p_s / tau)**Q else.
  const acc_t p_s = acc_exp(lp_s);
  const bool saliency_correct = p_s > tau;
  acc_t u = (p_s - tau) / (acc_t(1) - tau);
  u = u > acc_t(1e-30) ? u : acc_t(1e-30);
  const acc_t w_correct = saliency_correct
                              ? acc_t(1) + acc_exp(static_cast<acc_t>(cfg.saliency_power) * acc_log(u))
                              : acc_exp(static_cast<acc_t>(cfg.other_power) * (lp_s - acc_log(tau)));
  // Wrong response: saliency r1 > k, r2 > k, p_j > min, trained by unlikelihood; sqrt(p_s) else.
  const acc_t log_ratio = static_cast<acc_t>(cfg.log_ratio);
  const acc_t log_r1 = lp_j - lp_b;
  const bool saliency_wrong =
      log_r1 > log_ratio && lp_j - lp_s > log_ratio && lp_j > static_cast<acc_t>(cfg.log_judge_min);
  const acc_t w_unlikely = static_cast<acc_t>(cfg.sigmoid_scale) /
                           (acc_t(1) + acc_exp(static_cast<acc_t>(cfg.sigmoid_center) - acc_exp(log_r1)));
  const acc_t p_b = acc_exp(lp_b);
  const acc_t one_minus = acc_t(1) - p_b;
  const acc_t clamp = static_cast<acc_t>(cfg.unlikelihood_clamp);
  const acc_t coef_unlikely = one_minus >= clamp ? -w_unlikely * p_b / one_minus : acc_t(0);
  const acc_t coef_wrong = saliency_wrong ? coef_unlikely : acc_sqrt(p_s);
  const acc_t coef = wrong ? coef_wrong : w_correct + static_cast<acc_t>(cfg.nll_weight);
  RowDecision<acc_t> out;
  // NaN even where the teachers are given as log-probs (their coefficient would be finite).
  out.coef = !valid ? acc_t(0) : in_range ? coef * scale : quiet_nan<acc_t>();
  out.saliency = valid && in_range && (wrong ? saliency_wrong : saliency_correct);
  return out;
}

}  // namespace nlft
