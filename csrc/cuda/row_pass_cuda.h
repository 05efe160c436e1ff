// Launcher of the CUDA row pass. Plain CUDA runtime types only: the CPU torch wheel ships no
// CUDA-side torch headers, so row_pass_kernel.cu is written against raw pointers.
#pragma once

#include <cuda_runtime.h>

#include "../nlft_row.h"

namespace nlft::cuda {

// Launches the row pass of `p` on `stream` (all pointers on the current device). Teacher
// logits must be in the base dtype or in the accumulator dtype, both views in the same one
// (bindings.cpp widens them); the gradient, if any, in grad_dtype_for(base dtype) (float32
// for float16 logits). Returns the launch status (cudaErrorInvalidValue for other dtypes).
cudaError_t row_pass_cuda(const RowPass& p, cudaStream_t stream);

}  // namespace nlft::cuda
