// Picks the copy of the CPU row pass for this machine.
#include <ATen/Version.h>

#include "row_pass_cpu.h"

namespace nlft::cpu {

std::string row_pass_capability() {
  // torch's choice for its own kernels: it honours ATEN_CPU_CAPABILITY and the CPU's features.
  const std::string capability = at::get_cpu_capability();
  return capability == "AVX512" || capability == "AVX2" ? capability : "DEFAULT";
}

void row_pass_cpu(const RowPass& p) {
  const std::string capability = row_pass_capability();
  if (capability == "AVX512") {
    AVX512::row_pass(p);
  } else if (capability == "AVX2") {
    AVX2::row_pass(p);
  } else {
    DEFAULT::row_pass(p);
  }
}

}  // namespace nlft::cpu
