// The NLFT row pass on CUDA: same contract and outputs as the Triton `_nlft_fwd_kernel`.
//
// Two kernels, chosen by RowPass::blocks_per_row:
//
// - row_pass_kernel (0): one block per row (grid N = B*T). Each thread folds its strided chunks
//   of the base, standard and judge rows into online (max, sum of exponentials) pairs, kVec
//   elements per 16-byte-class load; the pairs are combined across the block (warp shuffles,
//   then one warp over the per-warp results); thread 0 applies the NLFT rule (row_rule.h); a
//   second sweep writes the gradient row. Bytes: every given logits row once (the judge row
//   only for rows of wrong samples, nothing for unlabelled rows), the base row a second time
//   (from L2 if it is still there), the gradient row (float32 for float16 logits, see
//   nlft::grad_dtype_for; kVec elements per thread and chunk, stored 16 bytes at a time).
// - row_pass_on_chip_kernel (k = 1..8, sm_90): a thread-block cluster of k blocks per row, each
//   sweeping a slice of ceil(V / k) entries and keeping its slice of the base row in shared
//   memory from the first sweep to the second; the blocks' (max, sum) pairs are merged through
//   distributed shared memory (see the kernel for its two cluster barriers). The base row is read from DRAM once: for three logit views
//   forward+backward 4 units of N*V instead of 5, as Hopper cross-entropy kernels keep a row
//   on chip (quack). Which of the two is faster is the GPU suite's measurement
//   (benchmarks/tune_launch.py, key cuda_row_pass); nlft_kernels.ops.launch.cuda_row_blocks
//   chooses.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>

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

template <typename T> __device__ __forceinline__ T neg_inf() { return T(-INFINITY); }
template <> __device__ __forceinline__ __nv_bfloat16 neg_inf<__nv_bfloat16>() { return __float2bfloat16(-INFINITY); }
template <> __device__ __forceinline__ __half neg_inf<__half>() { return __float2half(-INFINITY); }

// row[i0..i0+kVec) as stored, -inf past `limit` (the row or slice end, or i0 itself for rows
// that must not be read): one 16-byte-class load where the pack is whole and aligned.
template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* row, int64_t i0, int64_t limit, bool aligned) {
  if (aligned && i0 + kVec <= limit) return *reinterpret_cast<const Pack<T>*>(row + i0);
  Pack<T> pack;
#pragma unroll
  for (int k = 0; k < kVec; ++k) pack.v[k] = i0 + k < limit ? row[i0 + k] : neg_inf<T>();
  return pack;
}

template <typename acc_t, typename T>
__device__ __forceinline__ void widen_pack(const Pack<T>& pack, acc_t* x) {
#pragma unroll
  for (int k = 0; k < kVec; ++k) x[k] = widen<acc_t>(pack.v[k]);
}

template <typename acc_t>
struct Lse {
  acc_t m;
  acc_t s;
};

template <typename acc_t>
__device__ __forceinline__ Lse<acc_t> lse_start() {
  return {acc_t(kLseStart), acc_t(0)};
}

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

// A warp's combined pair, in every lane (butterfly shuffles).
template <typename acc_t>
__device__ __forceinline__ Lse<acc_t> warp_lse(Lse<acc_t> v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v = combine(v, Lse<acc_t>{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)});
  }
  return v;
}

// Per-warp pairs of the three views, and the block's in row kWarp.
template <typename acc_t>
using Scratch = Lse<acc_t>[kWarp + 1][3];

// The block's combined pairs of the views a row reads (the base's always, the standard's and the
// judge's where given as logits), returned to every thread: the views share one cross-warp
// reduction, so a row pays two barriers, not two or three per view.
template <typename acc_t>
__device__ void block_lse(Lse<acc_t>& lb, Lse<acc_t>& ls, Lse<acc_t>& lj, bool std_logits, bool judge_logits,
                          Scratch<acc_t>& scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  lb = warp_lse(lb);
  if (std_logits) ls = warp_lse(ls);
  if (judge_logits) lj = warp_lse(lj);
  if (lane == 0) {
    scratch[warp][0] = lb;
    scratch[warp][1] = ls;
    scratch[warp][2] = lj;
  }
  __syncthreads();
  if (warp == 0) {
    const auto merged = [&](int view) {
      return warp_lse(lane < warps ? scratch[lane][view] : lse_start<acc_t>());
    };
    const Lse<acc_t> b = merged(0);
    const Lse<acc_t> s = std_logits ? merged(1) : lse_start<acc_t>();
    const Lse<acc_t> j = judge_logits ? merged(2) : lse_start<acc_t>();
    if (lane == 0) {
      scratch[kWarp][0] = b;
      scratch[kWarp][1] = s;
      scratch[kWarp][2] = j;
    }
  }
  __syncthreads();
  lb = scratch[kWarp][0];
  if (std_logits) ls = scratch[kWarp][1];
  if (judge_logits) lj = scratch[kWarp][2];
}

// One row as both kernels read it: its flags and the rows of its views (teacher rows only
// where given as logits; the judge row only on labelled rows of wrong samples).
template <typename T, typename TT>
struct Row {
  int64_t r, label;
  bool valid, in_range, wrong, use_judge, std_logits, judge_logits;
  const T* base;
  const TT* standard;
  const TT* judge;
  bool base_aligned, std_aligned, judge_aligned;

  __device__ __forceinline__ Row(const RowPass& p, int64_t row) : r(row) {
    const int64_t b = r / p.steps, t = r % p.steps;
    label = p.labels[r];
    valid = label != p.cfg.ignore_index;
    in_range = label_in_range(label, p.vocab);  // see there for a valid row without it
    wrong = p.wrong[r];
    use_judge = valid && wrong;
    std_logits = p.standard.mode == kViewLogits;
    judge_logits = p.judge.mode == kViewLogits && use_judge;  // correct rows never read the judge
    base = static_cast<const T*>(p.base.ptr) + b * p.base.stride_b + t * p.base.stride_t;
    standard = std_logits ? static_cast<const TT*>(p.standard.ptr) + b * p.standard.stride_b + t * p.standard.stride_t
                          : nullptr;
    judge = judge_logits ? static_cast<const TT*>(p.judge.ptr) + b * p.judge.stride_b + t * p.judge.stride_t : nullptr;
    base_aligned = is_aligned(base);
    std_aligned = std_logits && is_aligned(standard);
    judge_aligned = judge_logits && is_aligned(judge);
  }
};

// First sweep over row entries [lo, limit) (limit = lo for rows that read nothing): each
// thread folds its chunks of every given view into its pairs, every view's load of a chunk
// issued before any of them is folded (three 16-byte-class loads in flight per thread, not
// one); with kStash the base chunks are also kept in `stash` (shared memory, chunk
// (i0 - lo) / kVec), where the same thread finds them again in the second sweep, so they need
// no barrier.
template <bool kStash, typename acc_t, typename T, typename TT>
__device__ __forceinline__ void first_sweep(const Row<T, TT>& row, int64_t lo, int64_t limit, Pack<T>* stash,
                                            Lse<acc_t>& lb, Lse<acc_t>& ls, Lse<acc_t>& lj) {
  // float64 rows fold each view as it arrives: three 64-byte packs live at once spill.
  constexpr bool kLoadsFirst = sizeof(acc_t) == 4;
  acc_t x[kVec];
  for (int64_t i0 = lo + int64_t(threadIdx.x) * kVec; i0 < limit; i0 += int64_t(blockDim.x) * kVec) {
    const Pack<T> pb = load_pack(row.base, i0, limit, row.base_aligned);
    Pack<TT> ps{}, pj{};
    if (kLoadsFirst && row.std_logits) ps = load_pack(row.standard, i0, limit, row.std_aligned);
    if (kLoadsFirst && row.judge_logits) pj = load_pack(row.judge, i0, limit, row.judge_aligned);
    if constexpr (kStash) stash[(i0 - lo) / kVec] = pb;
    widen_pack(pb, x);
    fold(lb, x);
    if (row.std_logits) {
      widen_pack(kLoadsFirst ? ps : load_pack(row.standard, i0, limit, row.std_aligned), x);
      fold(ls, x);
    }
    if (row.judge_logits) {
      widen_pack(kLoadsFirst ? pj : load_pack(row.judge, i0, limit, row.judge_aligned), x);
      fold(lj, x);
    }
  }
}

// What the rule reads of a row besides its sweeps: the label's entry of each view (its logit,
// widened, or for a teacher given as log-probs its [N] entry; 0 where the row does not read it)
// and the row's scale. One thread reads them before the sweeps, so that the latency hides
// behind them and no read of the base logits follows the first sweep (the gradient may be
// written into them).
template <typename acc_t>
struct LabelEntries {
  acc_t base, standard, judge, scale;
};

template <typename acc_t, typename TT>
__device__ __forceinline__ acc_t teacher_entry(const RowView& view, const TT* row, int64_t r, int64_t label,
                                               bool in_range) {
  if (view.mode == kViewLogprobs) return static_cast<const acc_t*>(view.ptr)[r];
  return row != nullptr && in_range ? widen<acc_t>(row[label]) : acc_t(0);
}

template <typename acc_t, typename T, typename TT>
__device__ LabelEntries<acc_t> label_entries(const RowPass& p, const Row<T, TT>& row) {
  LabelEntries<acc_t> e{acc_t(0), acc_t(0), acc_t(0), static_cast<const acc_t*>(p.scale)[row.r]};
  if (!row.valid) return e;
  if (row.in_range) e.base = widen<acc_t>(row.base[row.label]);
  e.standard = teacher_entry<acc_t>(p.standard, row.standard, row.r, row.label, row.in_range);
  if (row.use_judge) e.judge = teacher_entry<acc_t>(p.judge, row.judge, row.r, row.label, row.in_range);
  return e;
}

// log p(label) of a teacher view from its label entry: minus the view's lse for logits (NaN
// for a label outside [0, V)), as given for log-probs.
template <typename acc_t>
__device__ __forceinline__ acc_t teacher_logprob(const RowView& view, acc_t entry, bool in_range, Lse<acc_t> lse) {
  if (view.mode == kViewLogprobs) return entry;
  return in_range ? entry - (lse.m + log(lse.s)) : quiet_nan<acc_t>();
}

template <typename acc_t>
struct RowCoef {
  acc_t lse;   // the base row's log-sum-exp (0 on unlabelled rows)
  acc_t coef;  // the gradient's factor of (softmax - onehot)
};

// The NLFT rule on the row's whole-row pairs (one thread): its label log-probs, saliency and
// coefficient; `write` stores the row's statistics and saliency (one block per row does).
template <typename acc_t, typename T, typename TT>
__device__ RowCoef<acc_t> decide(const RowPass& p, const Row<T, TT>& row, const LabelEntries<acc_t>& e,
                                 Lse<acc_t> lb, Lse<acc_t> ls, Lse<acc_t> lj, bool write) {
  const acc_t lse_b = lb.m + log(lb.s);
  acc_t lp_b = 0, lp_s = 0, lp_j = 0;
  if (row.valid) {
    lp_b = row.in_range ? e.base - lse_b : quiet_nan<acc_t>();
    lp_s = teacher_logprob(p.standard, e.standard, row.in_range, ls);
    if (row.use_judge && p.judge.mode != kViewNone) lp_j = teacher_logprob(p.judge, e.judge, row.in_range, lj);
  }
  const RowDecision<acc_t> d =
      decide_row<acc_t>(lp_b, lp_s, lp_j, row.valid, row.in_range, row.wrong, e.scale, p.cfg);
  if (write) {
    acc_t* stats = static_cast<acc_t*>(p.stats);
    stats[row.r] = lp_b;
    stats[p.n_rows + row.r] = lp_s;
    stats[2 * p.n_rows + row.r] = lp_j;
    p.saliency[row.r] = d.saliency;
  }
  return {row.valid ? lse_b : acc_t(0), d.coef};
}

// Gradient sweep over entries [lo, hi) of the row: coef * (softmax - onehot(label)); zeros on
// unlabelled rows (nothing read), NaN on rows whose label is outside [0, V) (coef is NaN; the
// one-hot matches no column). The base chunks come from `stash` (kStash) or from global memory.
template <bool kStash, typename acc_t, typename T, typename TT, typename G>
__device__ __forceinline__ void grad_sweep(const Row<T, TT>& row, int64_t lo, int64_t hi, const Pack<T>* stash,
                                           RowCoef<acc_t> rc, G* grad) {
  const bool grad_aligned = is_aligned(grad);
  acc_t x[kVec];
  for (int64_t i0 = lo + int64_t(threadIdx.x) * kVec; i0 < hi; i0 += int64_t(blockDim.x) * kVec) {
    const Pack<T> pack = !row.valid ? load_pack(row.base, i0, i0, false)  // nothing read
                         : kStash   ? stash[(i0 - lo) / kVec]
                                    : load_pack(row.base, i0, hi, row.base_aligned);
    widen_pack(pack, x);
    Pack<G> out;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const acc_t onehot = i0 + k == row.label ? acc_t(1) : acc_t(0);
      out.v[k] = narrow<G>(row.valid ? rc.coef * (fast_exp(x[k] - rc.lse) - onehot) : acc_t(0));
    }
    if (grad_aligned && i0 + kVec <= hi) {
      *reinterpret_cast<Pack<G>*>(grad + i0) = out;
    } else {
      for (int k = 0; k < kVec && i0 + k < hi; ++k) grad[i0 + k] = out.v[k];
    }
  }
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
  __shared__ Scratch<acc_t> scratch;
  __shared__ RowCoef<acc_t> row_coef;
  const Row<T, TT> row(p, blockIdx.x);
  LabelEntries<acc_t> entries{};
  if (threadIdx.x == 0) entries = label_entries<acc_t>(p, row);
  Lse<acc_t> lb = lse_start<acc_t>(), ls = lb, lj = lb;
  first_sweep<false>(row, 0, row.valid ? p.vocab : 0, static_cast<Pack<T>*>(nullptr), lb, ls, lj);
  block_lse(lb, ls, lj, row.std_logits, row.judge_logits, scratch);
  if (threadIdx.x == 0) row_coef = decide(p, row, entries, lb, ls, lj, true);
  if (p.grad == nullptr) return;
  __syncthreads();
  grad_sweep<false>(row, 0, p.vocab, static_cast<const Pack<T>*>(nullptr), row_coef, static_cast<G*>(p.grad) + row.r * p.vocab);
}

// Blocks of a cluster: the portable maximum (a larger cluster needs a non-portable opt-in).
constexpr int kMaxCluster = 8;
// The on-chip kernel's most threads per block (its launch bound): a slice is at most a few
// tens of thousands of entries, which 512 threads (256 for float64) sweep in 8 chunks or more;
// the cluster merge adds registers, and float64 spills under a bound of 512.
template <typename T>
constexpr int kOnChipThreads = sizeof(typename AccOf<T>::type) == 8 ? 256 : 512;

// The on-chip row pass: blockIdx.x / k is the row, the block's rank in its cluster of k its
// slice [rank * slice, (rank + 1) * slice) of the row (on_chip_slice: a multiple of kVec, so
// that packs never straddle two blocks); dynamic shared memory holds the slice of the base row.
//
// Synchronisation (k > 1): thread 0 reads the row's label entries before the sweep; after it,
// each block publishes its three pairs in its shared memory, and a full cluster barrier
// (release/acquire) makes them visible to the cluster and orders every block's reads of the
// base row before any block's gradient stores (which may overwrite the base logits). Thread 0
// then reads every rank's pairs through distributed shared memory, in rank order (every block
// gets the same bits of lse and coefficient). A second, relaxed barrier is arrived at once the
// block has read them and waited for only before the block exits, so that no block frees
// shared memory a peer still reads, while its cost hides behind the gradient sweep. k = 1
// needs neither: its pairs stay in the block.
template <typename T, typename TT, typename G>
__global__ void __launch_bounds__(kOnChipThreads<T>) row_pass_on_chip_kernel(RowPass p, int64_t slice) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using acc_t = typename AccOf<T>::type;
  namespace cg = cooperative_groups;
  // barrier.cluster's two halves, each executed by every thread of every block of the cluster:
  // the default arrive has release semantics, the wait acquire semantics (cluster scope); a
  // relaxed arrive orders nothing and costs no memory barrier (ptxas emits MEMBAR.ALL.GPU for a
  // release arrive).
  const auto cluster_arrive = [] { asm volatile("barrier.cluster.arrive.aligned;\n" ::: "memory"); };
  const auto cluster_arrive_relaxed = [] { asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory"); };
  const auto cluster_wait = [] { asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory"); };
  extern __shared__ __align__(64) unsigned char stash_bytes[];  // Pack<double> is 64-byte aligned
  Pack<T>* stash = reinterpret_cast<Pack<T>*>(stash_bytes);
  __shared__ Scratch<acc_t> scratch;
  __shared__ Lse<acc_t> partial[3];  // this block's pairs, read by every block of the cluster
  __shared__ RowCoef<acc_t> row_coef;
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned blocks = cluster.num_blocks(), rank = cluster.block_rank();
  const Row<T, TT> row(p, blockIdx.x / blocks);
  const int64_t start = int64_t(rank) * slice;
  const int64_t lo = start < p.vocab ? start : p.vocab, hi = lo + slice < p.vocab ? lo + slice : p.vocab;

  LabelEntries<acc_t> entries{};
  if (threadIdx.x == 0) entries = label_entries<acc_t>(p, row);
  Lse<acc_t> lb = lse_start<acc_t>(), ls = lb, lj = lb;
  first_sweep<true>(row, lo, row.valid ? hi : lo, stash, lb, ls, lj);
  block_lse(lb, ls, lj, row.std_logits, row.judge_logits, scratch);
  if (blocks == 1) {
    if (threadIdx.x == 0) row_coef = decide(p, row, entries, lb, ls, lj, true);
    __syncthreads();
  } else {
    if (threadIdx.x == 0) {
      partial[0] = lb;
      partial[1] = ls;
      partial[2] = lj;
    }
    cluster_arrive();
    cluster_wait();
    if (threadIdx.x == 0) {
      Lse<acc_t> whole[3] = {lse_start<acc_t>(), lse_start<acc_t>(), lse_start<acc_t>()};
      for (unsigned q = 0; q < blocks; ++q) {
        const Lse<acc_t>* theirs = cluster.map_shared_rank(partial, q);
#pragma unroll
        for (int v = 0; v < 3; ++v) whole[v] = combine(whole[v], theirs[v]);
      }
      row_coef = decide(p, row, entries, whole[0], whole[1], whole[2], rank == 0);
    }
    __syncthreads();           // row_coef for the block; thread 0's remote reads are done
    cluster_arrive_relaxed();  // this block reads no peer's shared memory any more
  }
  if (p.grad != nullptr) grad_sweep<true>(row, lo, hi, stash, row_coef, static_cast<G*>(p.grad) + row.r * p.vocab);
  if (blocks > 1) cluster_wait();  // no block leaves while a peer may still read its pairs
#else
  __trap();  // never launched: launch_on_chip refuses a kernel image built below sm_90
#endif
}

// Threads per row: enough chunks of kVec per thread to hide latency, at most `max_threads`.
int threads_for(int64_t vocab, int max_threads) {
  int threads = kWarp;
  while (threads < max_threads && int64_t(threads) * kVec * 8 < vocab) threads *= 2;
  return threads;
}

// What launch_on_chip needs of a device and of one instantiation of the kernel, asked once per
// device (the driver calls cost microseconds per launch otherwise; the fused linear loss
// launches once per chunk). Only a successful setup is kept: a failure (say, inside a CUDA-graph
// capture that forbids loading the module) is asked again at the next launch.
struct OnChipSetup {
  cudaError_t err = cudaSuccess;
  int major = 0;
  size_t max_stash_bytes = 0;  // the device's opt-in shared memory per block less the static part
  int ptx_version = 0;         // of the code that runs: below 90 it is the sm_80 trap (JIT or cross-compiled)
};

constexpr int kMaxDevices = 64;

template <typename T, typename TT, typename G>
OnChipSetup on_chip_setup(int device) {
  static std::mutex mutex;
  static OnChipSetup setups[kMaxDevices];
  static bool ready[kMaxDevices] = {};
  const std::lock_guard<std::mutex> lock(mutex);
  if (ready[device]) return setups[device];
  OnChipSetup s;
  int max_smem = 0;
  cudaFuncAttributes attrs{};
  auto kernel = row_pass_on_chip_kernel<T, TT, G>;
  s.err = cudaDeviceGetAttribute(&s.major, cudaDevAttrComputeCapabilityMajor, device);
  if (s.err == cudaSuccess) s.err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (s.err == cudaSuccess) s.err = cudaFuncGetAttributes(&attrs, kernel);
  if (s.err != cudaSuccess) return s;
  // binaryVersion is the architecture the machine code runs on (90 even for compute_80 PTX
  // compiled for an H100); ptxVersion is the one its source was compiled for.
  s.ptx_version = attrs.ptxVersion;
  s.max_stash_bytes = size_t(max_smem) - attrs.sharedSizeBytes;
  // One cap for every launch (the largest slice the device holds), so that no thread lowers it
  // between another thread's setting and launch; legal during graph capture.
  if (s.major >= 9) {
    s.err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(s.max_stash_bytes));
  }
  if (s.err == cudaSuccess) {
    setups[device] = s;
    ready[device] = true;
  }
  return s;
}

// A failed runtime call also records its error as the thread's last error, which the next
// unrelated launch check would report: it is cleared, and returned here instead.
cudaError_t failed(cudaError_t err) {
  (void)cudaGetLastError();
  return err;
}

template <typename T, typename TT, typename G>
cudaError_t launch_on_chip(const RowPass& p, cudaStream_t stream) {
  const int blocks = p.blocks_per_row;
  if (blocks < 1 || blocks > kMaxCluster || p.n_rows > 0x7fffffff / blocks) return cudaErrorInvalidConfiguration;
  int device = 0;
  if (const cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return failed(err);
  if (device >= kMaxDevices) return cudaErrorInvalidDevice;
  const OnChipSetup setup = on_chip_setup<T, TT, G>(device);
  if (setup.err != cudaSuccess) return failed(setup.err);
  // Thread-block clusters need sm_90; a build whose code for this GPU comes from compute_80
  // (TORCH_CUDA_ARCH_LIST="8.0+PTX", JIT-compiled at load) would trap, which ends the context.
  if (setup.major < 9 || setup.ptx_version < 90) return cudaErrorInvalidDeviceFunction;
  const int64_t slice = on_chip_slice(p.vocab, blocks, kVec);
  const size_t stash_bytes = size_t(slice) * sizeof(T);
  if (stash_bytes > setup.max_stash_bytes) return cudaErrorInvalidValue;  // the slice does not fit
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = unsigned(blocks);
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(unsigned(p.n_rows * blocks));
  config.blockDim = dim3(unsigned(threads_for(slice, kOnChipThreads<T>)));
  config.dynamicSmemBytes = stash_bytes;
  config.stream = stream;
  config.attrs = &cluster;
  config.numAttrs = 1;
  const cudaError_t err = cudaLaunchKernelEx(&config, row_pass_on_chip_kernel<T, TT, G>, p, slice);
  return err == cudaSuccess ? cudaSuccess : failed(err);
}

template <typename T, typename TT, typename G>
cudaError_t launch(const RowPass& p, cudaStream_t stream) {
  if (p.blocks_per_row > 0) return launch_on_chip<T, TT, G>(p, stream);
  if (p.n_rows > 0x7fffffff) return cudaErrorInvalidConfiguration;  // one block per row
  row_pass_kernel<T, TT, G><<<dim3(unsigned(p.n_rows)), dim3(threads_for(p.vocab, kMaxThreads<T>)), 0, stream>>>(p);
  return cudaGetLastError();  // also clears it
}

template <typename T>
cudaError_t launch_base(const RowPass& p, cudaStream_t stream) {
  using acc_t = typename AccOf<T>::type;
  using G = typename GradOf<T>::type;
  static_assert(kDTypeOf<G> == grad_dtype_for(kDTypeOf<T>), "GradOf disagrees with nlft::grad_dtype_for");
  const DType acc_dtype = sizeof(acc_t) == 8 ? kFloat64 : kFloat32;
  // Gradient rows are compiled in one type per base type only.
  if (p.grad != nullptr && p.grad_dtype != kDTypeOf<G>) return cudaErrorInvalidValue;
  // The on-chip kernel exists for the second sweep: it needs a gradient.
  if (p.blocks_per_row > 0 && p.grad == nullptr) return cudaErrorInvalidValue;
  // Teacher logits share one type: the base's, or the accumulator's.
  DType teacher = p.base.dtype;
  if (p.standard.mode == kViewLogits) teacher = p.standard.dtype;
  else if (p.judge.mode == kViewLogits) teacher = p.judge.dtype;
  if ((p.standard.mode == kViewLogits && p.standard.dtype != teacher) ||
      (p.judge.mode == kViewLogits && p.judge.dtype != teacher)) {
    return cudaErrorInvalidValue;
  }
  if (teacher == p.base.dtype) return launch<T, T, G>(p, stream);
  if (teacher == acc_dtype) return launch<T, acc_t, G>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t row_pass_cuda(const RowPass& p, cudaStream_t stream) {
  if (p.n_rows == 0) return cudaSuccess;
  switch (p.base.dtype) {
    case kFloat32: return launch_base<float>(p, stream);
    case kFloat64: return launch_base<double>(p, stream);
    case kBFloat16: return launch_base<__nv_bfloat16>(p, stream);
    case kFloat16: return launch_base<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace nlft::cuda
