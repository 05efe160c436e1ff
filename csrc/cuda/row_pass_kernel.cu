// The NLFT row pass on CUDA: same contract and outputs as the Triton `_nlft_fwd_kernel`.
//
// One block per row (grid N = B*T). Each thread folds its strided chunks of the base,
// standard and judge rows into online (max, sum of exponentials) pairs, kVec elements per
// 16-byte-class load; the pairs are combined across the block (warp shuffles, then one warp
// over the per-warp results); thread 0 applies the NLFT rule (row_rule.h); a second sweep
// writes the gradient row. Bytes: every given logits row once (the judge row only for rows of
// wrong samples, nothing for unlabelled rows), the base row a second time, the gradient row
// (float32 for float16 logits, see nlft::grad_dtype_for; kVec elements per thread and chunk,
// stored 16 bytes at a time).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../row_rule.h"
#include "row_pass_cuda.h"

namespace nlft::cuda {
namespace {

// Elements per load and store: 16 bytes for 16-bit types, 32 for float (two 16-byte
// transactions).
constexpr int kVec = 8;
constexpr int kWarp = 32;
// Finite start of the running maximum, as LSE_START in the Triton kernels.
constexpr float kLseStart = -1.0e30f;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
// Gradient rows of base type T, as nlft::grad_dtype_for: float for __half, else T.
template <typename T> struct GradOf { using type = T; };
template <> struct GradOf<__half> { using type = float; };

template <typename T> constexpr DType kDTypeOf = kFloat32;
template <> constexpr DType kDTypeOf<double> = kFloat64;
template <> constexpr DType kDTypeOf<__nv_bfloat16> = kBFloat16;
template <> constexpr DType kDTypeOf<__half> = kFloat16;

template <typename acc_t> __device__ __forceinline__ acc_t widen(float x) { return static_cast<acc_t>(x); }
template <typename acc_t> __device__ __forceinline__ acc_t widen(double x) { return static_cast<acc_t>(x); }
template <typename acc_t> __device__ __forceinline__ acc_t widen(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename acc_t> __device__ __forceinline__ acc_t widen(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T narrow(float x);
template <> __device__ __forceinline__ float narrow<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <typename T> __device__ __forceinline__ T narrow(double x) { return static_cast<T>(x); }

__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }

template <typename T>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T>
__device__ __forceinline__ bool is_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Pack<T>) == 0;
}

// x[0..kVec) = row[i0..i0+kVec) widened, -inf past `limit` (the row end, or 0 for rows that
// must not be read).
template <typename acc_t, typename T>
__device__ __forceinline__ void load_chunk(const T* row, int64_t i0, int64_t limit, bool aligned, acc_t* x) {
  if (aligned && i0 + kVec <= limit) {
    const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(row + i0);
#pragma unroll
    for (int k = 0; k < kVec; ++k) x[k] = widen<acc_t>(pack.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) x[k] = i0 + k < limit ? widen<acc_t>(row[i0 + k]) : acc_t(-INFINITY);
  }
}

template <typename acc_t>
struct Lse {
  acc_t m;
  acc_t s;
};

template <typename acc_t>
__device__ __forceinline__ Lse<acc_t> combine(Lse<acc_t> a, Lse<acc_t> b) {
  const acc_t m = a.m > b.m ? a.m : b.m;
  return {m, a.s * fast_exp(a.m - m) + b.s * fast_exp(b.m - m)};
}

// Folds one chunk into a running pair: one rescale per chunk, one exponential per element.
template <typename acc_t>
__device__ __forceinline__ void fold(Lse<acc_t>& run, const acc_t* x) {
  acc_t chunk_max = x[0];
#pragma unroll
  for (int k = 1; k < kVec; ++k) chunk_max = x[k] > chunk_max ? x[k] : chunk_max;
  const acc_t m = run.m > chunk_max ? run.m : chunk_max;
  acc_t s = run.s * fast_exp(run.m - m);
#pragma unroll
  for (int k = 0; k < kVec; ++k) s += fast_exp(x[k] - m);
  run = {m, s};
}

// The block's combined pair, returned to every thread; `scratch` holds one pair per warp.
template <typename acc_t>
__device__ Lse<acc_t> block_lse(Lse<acc_t> v, Lse<acc_t>* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v = combine(v, Lse<acc_t>{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)});
  }
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? scratch[lane] : Lse<acc_t>{acc_t(kLseStart), acc_t(0)};
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      v = combine(v, Lse<acc_t>{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)});
    }
    if (lane == 0) scratch[kWarp] = v;
  }
  __syncthreads();
  const Lse<acc_t> out = scratch[kWarp];
  __syncthreads();  // scratch is reused by the next view
  return out;
}

// log p(label) of a teacher view: from its logits row and lse (NaN for a label outside
// [0, V), which is not read), or read from the [N] vector.
template <typename acc_t, typename TT>
__device__ acc_t teacher_logprob(const RowView& view, const TT* row, int64_t r, int64_t label, bool in_range,
                                 Lse<acc_t> lse) {
  if (view.mode == kViewLogprobs) return static_cast<const acc_t*>(view.ptr)[r];
  return in_range ? widen<acc_t>(row[label]) - (lse.m + log(lse.s)) : quiet_nan<acc_t>();
}

// The most threads per block the launcher gives a row of base type T (threads_for), and the
// bound ptxas allocates registers for (__launch_bounds__): one constant for both, so that every
// block the launcher asks for can launch. An SM's 65536 registers allow 64 per thread at 1024
// threads; the float64 kernel needs ~94 on sm_90 (and spills under a bound of 1024), so its
// rows get at most 512 threads (128 registers).
template <typename T>
constexpr int kMaxThreads = sizeof(typename AccOf<T>::type) == 8 ? 512 : 1024;

// T: base logits type; TT: teacher logits type (T or the accumulator type); G: gradient type
// (GradOf<T>: float for __half, else T).
template <typename T, typename TT, typename G>
__global__ void __launch_bounds__(kMaxThreads<T>) row_pass_kernel(RowPass p) {
  using acc_t = typename AccOf<T>::type;
  __shared__ Lse<acc_t> scratch[kWarp + 1];
  __shared__ acc_t row_lse, row_coef;
  const int64_t r = blockIdx.x;
  const int64_t b = r / p.steps, t = r % p.steps, V = p.vocab;
  const int64_t label = p.labels[r];
  const bool valid = label != p.cfg.ignore_index;
  const bool in_range = label_in_range(label, V);  // see there for a valid row without it
  const bool wrong = p.wrong[r];
  const bool use_judge = valid && wrong;
  const bool std_logits = p.standard.mode == kViewLogits;
  const bool judge_logits = p.judge.mode == kViewLogits && use_judge;  // correct rows never read the judge
  const T* base = static_cast<const T*>(p.base.ptr) + b * p.base.stride_b + t * p.base.stride_t;
  const TT* standard =
      std_logits ? static_cast<const TT*>(p.standard.ptr) + b * p.standard.stride_b + t * p.standard.stride_t : nullptr;
  const TT* judge =
      judge_logits ? static_cast<const TT*>(p.judge.ptr) + b * p.judge.stride_b + t * p.judge.stride_t : nullptr;
  const bool base_aligned = is_aligned(base);
  const bool std_aligned = std_logits && is_aligned(standard);
  const bool judge_aligned = judge_logits && is_aligned(judge);
  const int64_t limit = valid ? V : 0;  // unlabelled rows read nothing

  Lse<acc_t> lb{acc_t(kLseStart), acc_t(0)}, ls = lb, lj = lb;
  acc_t x[kVec];
  for (int64_t i0 = int64_t(threadIdx.x) * kVec; i0 < limit; i0 += int64_t(blockDim.x) * kVec) {
    load_chunk(base, i0, limit, base_aligned, x);
    fold(lb, x);
    if (std_logits) {
      load_chunk(standard, i0, limit, std_aligned, x);
      fold(ls, x);
    }
    if (judge_logits) {
      load_chunk(judge, i0, limit, judge_aligned, x);
      fold(lj, x);
    }
  }
  lb = block_lse(lb, scratch);
  if (std_logits) ls = block_lse(ls, scratch);
  if (judge_logits) lj = block_lse(lj, scratch);

  if (threadIdx.x == 0) {
    const acc_t lse_b = lb.m + log(lb.s);
    acc_t lp_b = 0, lp_s = 0, lp_j = 0;
    if (valid) {
      lp_b = in_range ? widen<acc_t>(base[label]) - lse_b : quiet_nan<acc_t>();
      lp_s = teacher_logprob(p.standard, standard, r, label, in_range, ls);
      if (use_judge && p.judge.mode != kViewNone) lp_j = teacher_logprob(p.judge, judge, r, label, in_range, lj);
    }
    const RowDecision<acc_t> d =
        decide_row<acc_t>(lp_b, lp_s, lp_j, valid, in_range, wrong, static_cast<const acc_t*>(p.scale)[r], p.cfg);
    acc_t* stats = static_cast<acc_t*>(p.stats);
    stats[r] = lp_b;
    stats[p.n_rows + r] = lp_s;
    stats[2 * p.n_rows + r] = lp_j;
    p.saliency[r] = d.saliency;
    row_lse = valid ? lse_b : acc_t(0);
    row_coef = d.coef;
  }
  if (p.grad == nullptr) return;
  __syncthreads();

  // Gradient sweep: coef * (softmax - onehot(label)); zeros on unlabelled rows, NaN on rows
  // whose label is outside [0, V) (coef is NaN; the one-hot matches no column).
  const acc_t lse = row_lse, coef = row_coef;
  G* grad = static_cast<G*>(p.grad) + r * V;
  const bool grad_aligned = is_aligned(grad);
  for (int64_t i0 = int64_t(threadIdx.x) * kVec; i0 < V; i0 += int64_t(blockDim.x) * kVec) {
    load_chunk(base, i0, limit, base_aligned, x);
    Pack<G> out;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const acc_t onehot = i0 + k == label ? acc_t(1) : acc_t(0);
      out.v[k] = narrow<G>(valid ? coef * (fast_exp(x[k] - lse) - onehot) : acc_t(0));
    }
    if (grad_aligned && i0 + kVec <= V) {
      *reinterpret_cast<Pack<G>*>(grad + i0) = out;
    } else {
      for (int k = 0; k < kVec && i0 + k < V; ++k) grad[i0 + k] = out.v[k];
    }
  }
}

// Threads per row: enough chunks of kVec per thread to hide latency, at most `max_threads`.
int threads_for(int64_t vocab, int max_threads) {
  int threads = kWarp;
  while (threads < max_threads && int64_t(threads) * kVec * 8 < vocab) threads *= 2;
  return threads;
}

template <typename T>
cudaError_t launch_base(const RowPass& p, cudaStream_t stream) {
  using acc_t = typename AccOf<T>::type;
  using G = typename GradOf<T>::type;
  static_assert(kDTypeOf<G> == grad_dtype_for(kDTypeOf<T>), "GradOf disagrees with nlft::grad_dtype_for");
  const DType acc_dtype = sizeof(acc_t) == 8 ? kFloat64 : kFloat32;
  // Gradient rows are compiled in one type per base type only.
  if (p.grad != nullptr && p.grad_dtype != kDTypeOf<G>) return cudaErrorInvalidValue;
  // Teacher logits share one type: the base's, or the accumulator's.
  DType teacher = p.base.dtype;
  if (p.standard.mode == kViewLogits) teacher = p.standard.dtype;
  else if (p.judge.mode == kViewLogits) teacher = p.judge.dtype;
  if ((p.standard.mode == kViewLogits && p.standard.dtype != teacher) ||
      (p.judge.mode == kViewLogits && p.judge.dtype != teacher)) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(static_cast<unsigned>(p.n_rows)), block(threads_for(p.vocab, kMaxThreads<T>));
  if (teacher == p.base.dtype) {
    row_pass_kernel<T, T, G><<<grid, block, 0, stream>>>(p);
  } else if (teacher == acc_dtype) {
    row_pass_kernel<T, acc_t, G><<<grid, block, 0, stream>>>(p);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t row_pass_cuda(const RowPass& p, cudaStream_t stream) {
  if (p.n_rows == 0) return cudaSuccess;
  if (p.n_rows > 0x7fffffff) return cudaErrorInvalidConfiguration;  // one block per row
  switch (p.base.dtype) {
    case kFloat32: return launch_base<float>(p, stream);
    case kFloat64: return launch_base<double>(p, stream);
    case kBFloat16: return launch_base<__nv_bfloat16>(p, stream);
    case kFloat16: return launch_base<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace nlft::cuda
