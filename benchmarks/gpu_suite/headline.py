"""The headline: the fused NLFT loss against the same run's copy bandwidth and its baselines.

From bench_loss's result at the headline shape, ``gpu_headline_<device>_<date>.json`` holds
``{"device", "copy_gbs", "rows": [{"case", "ms", "gbs", "fraction_of_copy"}, ...]}`` (and what
else says how it was measured), ``case`` naming the op, dtype and shape. GB/s is the bytes of the
case's job in the package's traffic model over its median time.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import bench_loss

DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# bench_loss's case -> (what runs, which passes): the three-view cases do one job.
CASE_NAMES = {
    "nlft_kernels": ("nlft_loss 3 views", "fwd+bwd"),
    "liger_cross_entropy_x3": ("3x Liger cross_entropy", "fwd+bwd on the base, fwd on 2 teachers"),
    "compiled_cross_entropy_x3": ("3x torch.compile(F.cross_entropy)", "fwd+bwd on the base, fwd on 2 teachers"),
    "cross_entropy": ("F.cross_entropy 1 view", "fwd+bwd"),
}
TRAFFIC_MODEL = (
    "bytes of the case's job: benchmarks.bench_loss.bytes_moved -> benchmarks._util.nlft_row_pass_bytes -> "
    "nlft_kernels.ops.launch.row_pass_traffic (the package's traffic model, checked by tests/ops/test_traffic.py), "
    "every row counted as a labelled row of a wrong sample; the 3x cases do the NLFT loss's job (three views "
    "read, the base's gradient written) and are given its bytes, so their GB/s compare as their times"
)
# Issue 21's bar for the fused loss: a share of the same run's copy bandwidth.
TARGET_FRACTION = 0.85


def case_name(case: str, n: int, vocab: int, dtype: str) -> str:
    """E.g. ``nlft_loss 3 views bf16 N=8192 V=128256 fwd+bwd``."""
    what, passes = CASE_NAMES.get(case, (case, "fwd+bwd"))
    return f"{what} {DTYPE_NAMES.get(dtype, dtype)} N={n} V={vocab} {passes}"


def headline(payload: dict, source: str) -> dict:
    """The headline of a bench_loss ``payload`` (written to ``source``): one row per measured case,
    the others under ``not_measured`` with their status and note."""
    copy = payload["copy_bandwidth_bytes_per_s"]
    rows, not_measured = [], []
    for r in payload["cases"]:
        name = case_name(r["case"], r["n"], r["vocab"], r["dtype"])
        if r["status"] != "ok":
            not_measured.append({"case": name, "status": r["status"], "note": r.get("note", "")})
            continue
        bw = bench_loss.row_bandwidth(r, copy)
        rows.append(
            {
                "case": name,
                "ms": r["median_ms"],
                "gbs": bw["achieved_bytes_per_s"] / 1e9,
                "fraction_of_copy": bw["fraction_of_copy_bandwidth"],
                "bytes": bw["bytes_moved"],
                "bench_case": r["case"],
                "min_ms": r["min_ms"],
                "max_ms": r["max_ms"],
                "reps": r["reps"],
                "peak_extra_bytes": r.get("peak_extra_bytes"),
            }
        )
    ours = next((row for row in rows if row["bench_case"] == "nlft_kernels"), None)
    return {
        "benchmark": "gpu_headline",
        "device": payload["device"],
        "device_type": payload["device_type"],
        "device_slug": payload["device_slug"],
        "date": payload["date"],
        "command": payload["command"],
        "versions": payload["versions"],
        "source": Path(source).name,
        "copy_gbs": copy / 1e9,
        "copy_buffer_bytes": payload["copy_bandwidth_buffer_bytes"],
        "traffic_model": TRAFFIC_MODEL,
        "timing": payload["method"]["timing"],
        "target_fraction_of_copy": TARGET_FRACTION,
        "meets_target": None if ours is None else ours["fraction_of_copy"] >= TARGET_FRACTION,
        "rows": rows,
        "not_measured": not_measured,
    }


def table(head: dict) -> str:
    """Markdown: one line per measured case (ms, GB/s, % of copy, time as a multiple of ours), then
    what was not measured."""
    ours = next((r["ms"] for r in head["rows"] if r["bench_case"] == "nlft_kernels"), None)
    lines = [
        f"Copy bandwidth {head['copy_gbs']:.0f} GB/s (read + write, {head['copy_buffer_bytes'] >> 20} MiB buffers); "
        f"target for the fused loss: {100 * head['target_fraction_of_copy']:.0f}% of it.",
        "",
        "| case | median ms | GB/s | % of copy | x nlft_loss time |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in head["rows"]:
        times = f"{r['ms'] / ours:.2f}" if ours else "-"
        lines.append(f"| {r['case']} | {r['ms']:.2f} | {r['gbs']:.0f} | {100 * r['fraction_of_copy']:.0f} | {times} |")
    if head["not_measured"]:
        missing = "; ".join(f"{r['case']} ({r['status']}: {r['note'][:120]})" for r in head["not_measured"])
        lines += ["", f"Not measured: {missing}."]
    return "\n".join(lines)
