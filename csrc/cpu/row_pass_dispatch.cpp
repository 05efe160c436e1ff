// Picks the copy of the CPU row pass for this machine.
#include <ATen/Version.h>

#include "row_pass_cpu.h"

namespace nlft::cpu {

std::string row_pass_capability() {
#ifdef NLFT_X86_KERNELS
  // torch's choice for its own kernels: it honours ATEN_CPU_CAPABILITY and the CPU's features.
  const std::string capability = at::get_cpu_capability();
  return capability == "AVX512" || capability == "AVX2" ? capability : "DEFAULT";
#else
  // Builds off x86 compile the portable copy only (setup.py, CPU_CAPABILITIES).
  return "DEFAULT";
#endif
}

// Calls FN of the copy for this machine's instruction set. Builds off x86 have the portable
// copy only, so the others must not even be named there.
#ifdef NLFT_X86_KERNELS
#define NLFT_DISPATCH(FN, ARGS)                                    \
  do {                                                             \
    const std::string capability = row_pass_capability();         \
    if (capability == "AVX512") return AVX512::FN(ARGS);           \
    if (capability == "AVX2") return AVX2::FN(ARGS);               \
    return DEFAULT::FN(ARGS);                                      \
  } while (false)
#else
#define NLFT_DISPATCH(FN, ARGS) return DEFAULT::FN(ARGS)
#endif

void row_pass_cpu(const RowPass& p) { NLFT_DISPATCH(row_pass, p); }

void scale_rows_cpu(const RowScale& s) { NLFT_DISPATCH(scale_rows, s); }

void label_logprobs_cpu(const RowLogprobs& q) { NLFT_DISPATCH(label_logprobs, q); }

void softmax_grad_cpu(const RowSoftmaxGrad& q) { NLFT_DISPATCH(softmax_grad, q); }

}  // namespace nlft::cpu
