// The CPU row pass, one copy per instruction set; row_pass_cpu() picks the widest the CPU
// (and ATEN_CPU_CAPABILITY, as for torch's own kernels) allows.
#pragma once

#include <string>

#include "../nlft_row.h"

namespace nlft::cpu {

namespace DEFAULT {
void row_pass(const RowPass& p);
}
namespace AVX2 {
void row_pass(const RowPass& p);
}
namespace AVX512 {
void row_pass(const RowPass& p);
}

// Runs the row pass for `p` on the calling thread pool (at::parallel_for over rows).
void row_pass_cpu(const RowPass& p);

// "AVX512", "AVX2" or "DEFAULT": the copy row_pass_cpu() runs on this machine.
std::string row_pass_capability();

}  // namespace nlft::cpu
