// The CPU row pass: one task per group of rows (at::parallel_for); per row, one sweep over the
// vocabulary folds the online max / sum of exponentials of the base, standard and judge views
// together, tile by tile, and a second sweep over the base row writes the gradient (in
// RowPass::grad_dtype: float32 for float16 logits, see nlft_row.h).
//
// setup.py compiles this file once per instruction set with CPU_CAPABILITY = DEFAULT, AVX2 or
// AVX512 (and that set's -m flags), as torch compiles its own kernels: at::vec::Vectorized is
// then that width, and every symbol below lives in nlft::cpu::CPU_CAPABILITY, so the copies
// never collide. row_pass_dispatch.cpp picks one at run time.

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../row_rule.h"
#include "row_pass_cpu.h"

namespace nlft::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// Vocabulary tile: a few float tiles of this size stay in L1 while a row is reduced twice
// (max, then sum of exponentials) and converted from 16-bit types once.
constexpr int64_t kTile = 2048;
// The running maximum starts finite (as LSE_START in the Triton kernels) so that a row whose
// tile is all -inf gives exp(-inf - start) = 0, not NaN.
constexpr double kLseStart = -1.0e30;

// Converts n entries of a row in `dtype` to acc_t; returns `src` itself when no conversion
// is needed, else `buf` [n].
template <typename acc_t>
const acc_t* to_acc(const void* src, DType dtype, int64_t n, acc_t* buf) {
  using Vec = Vectorized<float>;
  switch (dtype) {
    case kFloat32:
      if constexpr (std::is_same_v<acc_t, float>) return static_cast<const float*>(src);
      at::vec::convert(static_cast<const float*>(src), buf, n);
      return buf;
    case kFloat64:
      if constexpr (std::is_same_v<acc_t, double>) return static_cast<const double*>(src);
      at::vec::convert(static_cast<const double*>(src), buf, n);
      return buf;
    case kBFloat16:
    case kFloat16: {
      // 16-bit logits widen to float lane by lane (vectorised) and then, for a float64
      // accumulator only, to double.
      int64_t i = 0;
      if constexpr (std::is_same_v<acc_t, float>) {
        for (; i + Vec::size() <= n; i += Vec::size()) {
          Vec v;
          if (dtype == kBFloat16) {
            at::vec::load_to_float(static_cast<const c10::BFloat16*>(src) + i, v);
          } else {
            at::vec::load_to_float(static_cast<const c10::Half*>(src) + i, v);
          }
          v.store(buf + i);
        }
      }
      for (; i < n; ++i) {
        buf[i] = dtype == kBFloat16 ? static_cast<acc_t>(static_cast<const c10::BFloat16*>(src)[i])
                                    : static_cast<acc_t>(static_cast<const c10::Half*>(src)[i]);
      }
      return buf;
    }
  }
  return buf;
}

template <typename T>
const T* at_offset(const void* ptr, int64_t offset) {
  return static_cast<const T*>(ptr) + offset;
}

// Address of element `offset` of a row in `dtype`.
inline const void* offset_ptr(const void* ptr, DType dtype, int64_t offset) {
  switch (dtype) {
    case kFloat32: return at_offset<float>(ptr, offset);
    case kFloat64: return at_offset<double>(ptr, offset);
    case kBFloat16: return at_offset<c10::BFloat16>(ptr, offset);
    case kFloat16: return at_offset<c10::Half>(ptr, offset);
  }
  return ptr;
}

inline int64_t element_size(DType dtype) { return dtype == kFloat64 ? 8 : dtype == kFloat32 ? 4 : 2; }

// Whether rows in `dtype` are acc_t itself (written in place, no conversion).
template <typename acc_t>
bool is_acc(DType dtype) {
  return dtype == (std::is_same_v<acc_t, double> ? kFloat64 : kFloat32);
}

// Writes n entries of acc_t to a row in `dtype` (vectorised conversions of at::vec).
template <typename acc_t>
void from_acc(const acc_t* src, DType dtype, int64_t n, void* dst) {
  switch (dtype) {
    case kFloat32: at::vec::convert(src, static_cast<float*>(dst), n); return;
    case kFloat64: at::vec::convert(src, static_cast<double*>(dst), n); return;
    case kBFloat16: at::vec::convert(src, static_cast<c10::BFloat16*>(dst), n); return;
    case kFloat16: at::vec::convert(src, static_cast<c10::Half*>(dst), n); return;
  }
}

// Running (max, sum of exp(x - max)) of one view, folded a tile at a time.
template <typename acc_t>
struct OnlineLse {
  acc_t m = static_cast<acc_t>(kLseStart);
  acc_t s = 0;

  void update(const acc_t* x, int64_t n) {
    using Vec = Vectorized<acc_t>;
    const acc_t tile_max = at::vec::reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x, n);
    const acc_t m_new = std::max(m, tile_max);
    const Vec shift(m_new);
    const acc_t tile_sum = at::vec::map_reduce_all<acc_t>(
        [shift](Vec v) { return (v - shift).exp_u20(); }, [](Vec& a, Vec& b) { return a + b; }, x, n);
    s = s * acc_exp(m - m_new) + tile_sum;
    m = m_new;
  }

  acc_t lse() const { return m + acc_log(s); }
};

// Label log-prob of a view: from its logits row and lse (NaN for a label outside [0, vocab),
// which is not read), or read from the [N] log-prob vector.
template <typename acc_t>
acc_t label_logprob(const RowView& view, int64_t row, int64_t row_offset, int64_t label, int64_t vocab,
                    const OnlineLse<acc_t>& lse) {
  if (view.mode == kViewLogprobs) return static_cast<const acc_t*>(view.ptr)[row];
  if (!label_in_range(label, vocab)) return quiet_nan<acc_t>();
  acc_t converted = 0;
  const acc_t* x = to_acc<acc_t>(offset_ptr(view.ptr, view.dtype, row_offset + label), view.dtype, 1, &converted);
  return *x - lse.lse();
}

// Writes coef * (softmax(x) - onehot(label)) of one row of `x` (in `x_dtype`, from `offset`) to
// `grad_row` [V] in `grad_dtype` (no one-hot for a label outside [0, V): its coef is NaN, see
// label_in_range). Gradient rows in the accumulator type (float32 for float32 logits, float64
// for float64 ones) are written in place by the vectorised map; others through `g_buf`,
// converted once. `grad_row` may be the row of `x` itself (inplace_grad): every tile is read,
// and its label entry kept, before the tile is written.
template <typename acc_t>
void gradient_row(const void* x_ptr, DType x_dtype, int64_t offset, int64_t vocab, int64_t label, acc_t lse,
                  acc_t coef, void* grad_row, DType grad_dtype, acc_t* x_buf, acc_t* g_buf) {
  using Vec = Vectorized<acc_t>;
  const Vec lse_v(lse), coef_v(coef);
  const bool direct = is_acc<acc_t>(grad_dtype);
  for (int64_t start = 0; start < vocab; start += kTile) {
    const int64_t n = std::min(kTile, vocab - start);
    const acc_t* x = to_acc<acc_t>(offset_ptr(x_ptr, x_dtype, offset + start), x_dtype, n, x_buf);
    const bool has_label = label >= start && label < start + n;
    const acc_t x_label = has_label ? x[label - start] : acc_t(0);
    acc_t* g = direct ? static_cast<acc_t*>(grad_row) + start : g_buf;
    at::vec::map([lse_v, coef_v](Vec v) { return (v - lse_v).exp_u20() * coef_v; }, g, x, n);
    if (has_label) g[label - start] = coef * (acc_exp(x_label - lse) - acc_t(1));
    if (!direct) from_acc(g, grad_dtype, n, static_cast<char*>(grad_row) + start * element_size(grad_dtype));
  }
}

template <typename acc_t>
void row_pass_typed(const RowPass& p) {
  auto* stats = static_cast<acc_t*>(p.stats);
  const auto* scale = static_cast<const acc_t*>(p.scale);
  const int64_t n_rows = p.n_rows, vocab = p.vocab;
  const bool std_logits = p.standard.mode == kViewLogits;
  const bool judge_logits = p.judge.mode == kViewLogits;
  const int64_t out_size = p.grad ? element_size(p.grad_dtype) : 0;
  // Enough rows per task that a task streams ~256 KiB of logits.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / vocab);

  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffers(4 * kTile);
    acc_t* base_buf = buffers.data();
    acc_t* std_buf = base_buf + kTile;
    acc_t* judge_buf = std_buf + kTile;
    acc_t* grad_buf = judge_buf + kTile;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / p.steps, t = row % p.steps;
      const int64_t label = p.labels[row];
      const bool valid = label != p.cfg.ignore_index;
      const bool wrong = p.wrong[row];
      const bool use_judge = valid && wrong;
      void* grad_row = p.grad ? static_cast<char*>(p.grad) + row * vocab * out_size : nullptr;
      if (!valid) {
        // Unlabelled rows read nothing and get zero statistics and gradient.
        stats[row] = stats[n_rows + row] = stats[2 * n_rows + row] = 0;
        p.saliency[row] = false;
        if (grad_row) std::memset(grad_row, 0, vocab * out_size);
        continue;
      }
      const int64_t base_off = b * p.base.stride_b + t * p.base.stride_t;
      const int64_t std_off = b * p.standard.stride_b + t * p.standard.stride_t;
      const int64_t judge_off = b * p.judge.stride_b + t * p.judge.stride_t;
      OnlineLse<acc_t> lse_b, lse_s, lse_j;
      for (int64_t start = 0; start < vocab; start += kTile) {
        const int64_t n = std::min(kTile, vocab - start);
        lse_b.update(to_acc<acc_t>(offset_ptr(p.base.ptr, p.base.dtype, base_off + start), p.base.dtype, n, base_buf), n);
        if (std_logits) {
          lse_s.update(
              to_acc<acc_t>(offset_ptr(p.standard.ptr, p.standard.dtype, std_off + start), p.standard.dtype, n, std_buf),
              n);
        }
        // Rows of correct samples never read the judge view.
        if (judge_logits && use_judge) {
          lse_j.update(
              to_acc<acc_t>(offset_ptr(p.judge.ptr, p.judge.dtype, judge_off + start), p.judge.dtype, n, judge_buf), n);
        }
      }
      const acc_t lp_b = label_logprob(p.base, row, base_off, label, vocab, lse_b);
      const acc_t lp_s = label_logprob(p.standard, row, std_off, label, vocab, lse_s);
      const acc_t lp_j = use_judge && p.judge.mode != kViewNone
                             ? label_logprob(p.judge, row, judge_off, label, vocab, lse_j)
                             : acc_t(0);
      const bool in_range = label_in_range(label, vocab);
      const RowDecision<acc_t> d = decide_row<acc_t>(lp_b, lp_s, lp_j, valid, in_range, wrong, scale[row], p.cfg);
      stats[row] = lp_b;
      stats[n_rows + row] = lp_s;
      stats[2 * n_rows + row] = lp_j;
      p.saliency[row] = d.saliency;
      if (grad_row) {
        gradient_row<acc_t>(p.base.ptr, p.base.dtype, base_off, vocab, label, lse_b.lse(), d.coef, grad_row, p.grad_dtype,
                            base_buf, grad_buf);
      }
    }
  });
}

template <typename acc_t>
void scale_rows_typed(const RowScale& s) {
  using Vec = Vectorized<acc_t>;
  const auto* factor = static_cast<const acc_t*>(s.factor);
  const int64_t vocab = s.vocab, size = element_size(s.dtype);
  const bool direct = is_acc<acc_t>(s.dtype);
  at::parallel_for(0, s.n_rows, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(vocab, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(direct ? 0 : kTile);
    for (int64_t row = begin; row < end; ++row) {
      const acc_t f_row = factor[row];
      if (f_row == acc_t(1)) continue;  // nothing to change: not read, not written
      void* grad_row = static_cast<char*>(s.grad) + row * vocab * size;
      if (f_row == acc_t(0)) {  // written as zeros without being read
        std::memset(grad_row, 0, vocab * size);
        continue;
      }
      const Vec f(f_row);
      for (int64_t start = 0; start < vocab; start += kTile) {
        const int64_t n = std::min(kTile, vocab - start);
        if (direct) {
          acc_t* g = static_cast<acc_t*>(grad_row) + start;
          at::vec::map([f](Vec v) { return v * f; }, g, g, n);
          continue;
        }
        const acc_t* g = to_acc<acc_t>(offset_ptr(grad_row, s.dtype, start), s.dtype, n, buffer.data());
        at::vec::map([f](Vec v) { return v * f; }, buffer.data(), g, n);
        from_acc(buffer.data(), s.dtype, n, static_cast<char*>(grad_row) + start * size);
      }
    }
  });
}

template <typename acc_t>
void softmax_grad_typed(const RowSoftmaxGrad& q) {
  const auto* lse = static_cast<const acc_t*>(q.lse);
  const auto* coef = static_cast<const acc_t*>(q.coef);
  const int64_t vocab = q.vocab, size = element_size(q.out_dtype);
  at::parallel_for(0, q.n_rows, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(vocab, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffers(2 * kTile);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t label = q.labels[row];
      void* out_row = static_cast<char*>(q.out) + row * vocab * size;
      if (label == q.ignore_index || coef[row] == acc_t(0)) {
        std::memset(out_row, 0, vocab * size);
        continue;
      }
      const int64_t offset = (row / q.steps) * q.logits.stride_b + (row % q.steps) * q.logits.stride_t;
      gradient_row<acc_t>(q.logits.ptr, q.logits.dtype, offset, vocab, label, lse[row], coef[row], out_row,
                          q.out_dtype, buffers.data(), buffers.data() + kTile);
    }
  });
}

void softmax_grad(const RowSoftmaxGrad& q) {
  if (q.logits.dtype == kFloat64) {
    softmax_grad_typed<double>(q);
  } else {
    softmax_grad_typed<float>(q);
  }
}

template <typename acc_t>
void label_logprobs_typed(const RowLogprobs& q) {
  auto* logprob = static_cast<acc_t*>(q.logprob);
  auto* lse_out = static_cast<acc_t*>(q.lse);
  const int64_t vocab = q.vocab;
  at::parallel_for(0, q.n_rows, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(vocab, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(kTile);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t label = q.labels[row];
      if (label == q.ignore_index) {
        logprob[row] = lse_out[row] = 0;
        continue;
      }
      const int64_t offset = (row / q.steps) * q.logits.stride_b + (row % q.steps) * q.logits.stride_t;
      OnlineLse<acc_t> lse;
      for (int64_t start = 0; start < vocab; start += kTile) {
        const int64_t n = std::min(kTile, vocab - start);
        lse.update(to_acc<acc_t>(offset_ptr(q.logits.ptr, q.logits.dtype, offset + start), q.logits.dtype, n,
                                 buffer.data()),
                   n);
      }
      logprob[row] = label_logprob(q.logits, row, offset, label, vocab, lse);
      lse_out[row] = lse.lse();
    }
  });
}

void label_logprobs(const RowLogprobs& q) {
  if (q.logits.dtype == kFloat64) {
    label_logprobs_typed<double>(q);
  } else {
    label_logprobs_typed<float>(q);
  }
}

void scale_rows(const RowScale& s) {
  if (s.dtype == kFloat64) {
    scale_rows_typed<double>(s);
  } else {
    scale_rows_typed<float>(s);
  }
}

// The entry point of this instruction set (declared in row_pass_cpu.h).
void row_pass(const RowPass& p) {
  if (p.base.dtype == kFloat64) {
    row_pass_typed<double>(p);
  } else {
    row_pass_typed<float>(p);
  }
}

}  // namespace nlft::cpu::CPU_CAPABILITY
