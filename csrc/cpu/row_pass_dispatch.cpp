// Picks the copy of the CPU row pass for this machine.
#include <ATen/native/DispatchStub.h>

#include "row_pass_cpu.h"

namespace nlft::cpu {

std::string row_pass_capability() {
  // torch's choice honours ATEN_CPU_CAPABILITY and the CPU's features.
  const auto capability = at::native::get_cpu_capability();
  if (capability == at::native::CPUCapability::AVX512) return "AVX512";
  if (capability == at::native::CPUCapability::AVX2) return "AVX2";
  return "DEFAULT";
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
