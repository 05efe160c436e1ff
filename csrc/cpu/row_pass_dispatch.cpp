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

void row_pass_cpu(const RowPass& p) {
#ifdef NLFT_X86_KERNELS
  const std::string capability = row_pass_capability();
  if (capability == "AVX512") {
    AVX512::row_pass(p);
    return;
  }
  if (capability == "AVX2") {
    AVX2::row_pass(p);
    return;
  }
#endif
  DEFAULT::row_pass(p);
}

void scale_rows_cpu(const RowScale& s) {
#ifdef NLFT_X86_KERNELS
  const std::string capability = row_pass_capability();
  if (capability == "AVX512") {
    AVX512::scale_rows(s);
    return;
  }
  if (capability == "AVX2") {
    AVX2::scale_rows(s);
    return;
  }
#endif
  DEFAULT::scale_rows(s);
}

}  // namespace nlft::cpu
