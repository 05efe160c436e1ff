"""Compile every Triton kernel for real GPUs, ahead of time, without a GPU.

The interpreter that runs the kernels in CI accepts code the compiler rejects (globals that
are not constexpr, type mismatches between branches), so this builds each kernel variant down
to a cubin for sm_80 and sm_90. Run as a script, without TRITON_INTERPRET.
"""

from __future__ import annotations

import inspect
import itertools
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nlft_kernels.ops.nlft_loss import VIEW_LOGITS, VIEW_LOGPROBS, VIEW_NONE, _nlft_fwd_kernel, _scale_rows_kernel
from nlft_kernels.ops.token_logprobs import _token_logprobs_bwd_kernel, _token_logprobs_kernel

TARGETS = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)]
FLOAT_ARGS = {
    "tau",
    "saliency_power",
    "other_power",
    "log_ratio",
    "log_judge_min",
    "sigmoid_center",
    "sigmoid_scale",
    "unlikelihood_clamp",
    "nll_weight",
}
TL_NAME = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32, "fp64": tl.float64}


def signature(kernel, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Triton types of ``kernel``'s arguments: named pointers, config floats, int64 otherwise."""
    types = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = pointers[name]
        else:
            types[name] = "fp32" if name in FLOAT_ARGS else "i64"
    return types


def variants():
    """(kernel, pointer types, constexprs, num_warps) for each variant worth compiling."""
    for dtype in ("bf16", "fp16", "fp32", "fp64"):
        acc = "fp64" if dtype == "fp64" else "fp32"
        common = {"BLOCK_V": 2048 if dtype != "fp64" else 1024, "ACC": TL_NAME[acc]}
        ptrs = {
            "x_ptr": f"*{dtype}",
            "labels_ptr": "*i64",
            "lp_ptr": f"*{acc}",
            "lse_ptr": f"*{acc}",
            "g_ptr": "*fp32",
            "grad_ptr": f"*{dtype}",
        }
        yield _token_logprobs_kernel, ptrs, common, 8
        yield _token_logprobs_bwd_kernel, ptrs, common, 8
        yield _scale_rows_kernel, {"grad_ptr": f"*{dtype}", "factor_ptr": "*fp32"}, {"BLOCK_V": 2048}, 8
        modes = itertools.product((VIEW_LOGITS, VIEW_LOGPROBS), (VIEW_NONE, VIEW_LOGITS, VIEW_LOGPROBS), (True, False))
        for std, judge, grad in modes if dtype == "bf16" else [(VIEW_LOGITS, VIEW_LOGITS, True)]:
            std_t = f"*{dtype}" if std == VIEW_LOGITS else f"*{acc}"
            judge_t = f"*{dtype}" if judge == VIEW_LOGITS else f"*{acc}"
            ptrs = {
                "base_ptr": f"*{dtype}",
                "std_ptr": std_t,
                "judge_ptr": judge_t,
                "labels_ptr": "*i64",
                "wrong_ptr": "*i8",
                "scale_ptr": f"*{acc}",
                "stats_ptr": f"*{acc}",
                "saliency_ptr": "*i8",
                "grad_ptr": f"*{dtype}" if grad else f"*{acc}",
            }
            yield _nlft_fwd_kernel, ptrs, dict(common, STD=std, JUDGE=judge, COMPUTE_GRAD=grad), 16


def main() -> int:
    count = 0
    for kernel, ptrs, constexprs, warps in variants():
        source = ASTSource(fn=kernel, signature=signature(kernel, ptrs, constexprs), constexprs=constexprs)
        for target in TARGETS:
            compiled = triton.compile(source, target=target, options={"num_warps": warps})
            assert "cubin" in compiled.asm, f"{kernel.fn.__name__}: no cubin for {target}"
            count += 1
    print(f"compiled {count} kernel variants for {', '.join(f'sm_{t.arch}' for t in TARGETS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
