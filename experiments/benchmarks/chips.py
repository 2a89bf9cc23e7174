"""Public peak figures of accelerator chips, roofline bounds, and the accelerators.md renderer.

Peaks are the vendors' published per-chip numbers (dense bfloat16 matmul FLOP/s, HBM bandwidth,
HBM capacity): Cloud TPU v5e 197 TFLOP/s, 819 GB/s, 16 GiB; NVIDIA H100 SXM 989 TFLOP/s (dense,
no sparsity), 3.35 TB/s, 80 GB. The float32 rows are compared against the same bfloat16 peak (TPU
matmuls run float32 as several bf16 passes; H100 float32 uses TF32 tensor cores at half that peak),
so their MFU reads as a fraction of what the chip could do in bf16.

A roofline bound is a *lower bound* on step time: ``max(FLOPs / peak FLOP/s, bytes / bandwidth)``.
FLOPs are :func:`wtjax.tools.aot.jaxpr_flops` (matmul/conv, scans counted K times); bytes are XLA's
"bytes accessed", which counts each loop body once and so undercounts: the bound stays a lower
bound, only a looser one. The GPU compiler gives no cost analysis, so GPU bounds use FLOPs alone.
MFU at the bound is an upper bound on what a real run can reach.
"""

from __future__ import annotations

import re

GIB, MIB = 2**30, 2**20

# Public peak dense (no sparsity) bfloat16 matmul FLOP/s and HBM bytes per *JAX device*, matched
# in order against the lowercased device kind. On TPU v2/v3 a JAX device is one of a chip's two
# TensorCores (half the chip); from v4 on it is a whole chip. float32 steps are compared against
# the same bf16 peak, so their MFU reads as a fraction of what the chip does in bfloat16.
PEAKS = (  # (pattern, peak FLOP/s, HBM bytes, source)
    (r"tpu v6( lite|e)", 918e12, 32 * GIB, "TPU v6e chip: 918 TFLOP/s bf16, 32 GiB"),
    (r"tpu v5( lite|e)", 197e12, 16 * GIB, "TPU v5e chip: 197 TFLOP/s bf16, 16 GiB"),
    (r"tpu v5p?\b", 459e12, 95 * GIB, "TPU v5p chip: 459 TFLOP/s bf16, 95 GiB"),
    (r"tpu v4", 275e12, 32 * GIB, "TPU v4 chip: 275 TFLOP/s bf16, 32 GiB"),
    (r"tpu v3", 61.5e12, 16 * GIB, "TPU v3 core (half of a 123 TFLOP/s, 32 GiB chip)"),
    (r"tpu v2", 22.5e12, 8 * GIB, "TPU v2 core (half of a 45 TFLOP/s, 16 GiB chip)"),
    (r"h100.*pcie", 756e12, 80e9, "H100 PCIe: 756 TFLOP/s bf16 dense, 80 GB"),
    (r"h100", 989e12, 80e9, "H100 SXM: 989 TFLOP/s bf16 dense, 80 GB"),
    (r"a100", 312e12, None, "A100: 312 TFLOP/s bf16 dense (40 or 80 GB: see memory_limit_bytes)"),
    (r"\bl4\b", 121e12, 24e9, "L4: 121 TFLOP/s bf16 dense, 24 GB"),
    (r"\bt4\b", 65e12, 16e9, "T4: 65 TFLOP/s float16 (no bfloat16 tensor cores), 16 GB"),
)


# HBM bandwidth (bytes/s) per chip, for the roofline of the compile targets.
BANDWIDTH = {"TPU v5 lite": 819e9, "NVIDIA H100 80GB HBM3": 3.35e12}


def peak_for(device_kind: str) -> dict | None:
    """The public peak of a device kind (first match of :data:`PEAKS`), or None if unknown."""
    kind = device_kind.lower()
    for pattern, flops, hbm, source in PEAKS:
        if re.search(pattern, kind):
            return {"peak_flops_per_device": flops, "hbm_bytes_per_device": hbm, "peak_source": source}
    return None


def chip(kind: str) -> dict | None:
    """Peak FLOP/s, HBM bandwidth and capacity of a device kind; ``None`` for an unknown chip."""
    peak = peak_for(kind)
    if peak is None:
        return None
    return dict(
        peak_flops=peak["peak_flops_per_device"],
        hbm_bandwidth=BANDWIDTH.get(kind),
        hbm_bytes=peak["hbm_bytes_per_device"],
    )


def roofline(entry: dict) -> tuple[float | None, float | None]:
    """``(step time lower bound in s, MFU at that bound)`` of a compile entry, or ``(None, None)``."""
    spec = chip(entry.get("device_kind", ""))
    if spec is None or "model_flops" not in entry:
        return None, None
    t = entry["model_flops"] / spec["peak_flops"]
    if entry.get("xla_bytes") and spec["hbm_bandwidth"]:
        t = max(t, entry["xla_bytes"] / spec["hbm_bandwidth"])
    return t, entry["model_flops"] / (t * spec["peak_flops"])


def fits(entry: dict) -> str:
    spec = chip(entry.get("device_kind", ""))
    if "error" in entry:
        return "no: " + entry["error"][:80]
    if spec is None or spec["hbm_bytes"] is None:
        return "?"
    return "yes" if entry["peak_bytes"] <= spec["hbm_bytes"] else "**no**"


def one_line(entry: dict) -> str:
    """A progress line for one compile."""
    if "error" in entry:
        return entry["error"]
    t, mfu = roofline(entry)
    bound = f", bound {t * 1e3:.2f} ms (MFU {mfu:.2f})" if t else ""
    return f"{entry['compile_s']:.1f} s compile, peak {entry['peak_bytes'] / MIB:,.0f} MiB{bound}"


def _families_table(results: dict) -> list[str]:
    rows = [
        "| model (paper shape) | target | dtype | batch | compile s | peak MiB/device | temp MiB | fits HBM "
        "| GFLOP/step/device | bound ms | MFU at bound | host callbacks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, e in results.items():
        if not key.startswith("families|"):
            continue
        _, name, target, dtype = key.split("|")
        if "error" in e:
            rows.append(f"| {name} | {target} | {dtype} | | | | | {fits(e)} | | | | |")
            continue
        t, mfu = roofline(e)
        if t is None:
            bound = " | "
        elif not e.get("xla_bytes"):  # FLOPs alone: MFU at that bound is 1 by construction
            bound = f"{t * 1e3:.2f} (FLOPs only) | n/a"
        else:
            bound = f"{t * 1e3:.2f} | {mfu:.2f}"
        rows.append(
            f"| {name} | {target} | {dtype} | {e['global_batch']} | {e['compile_s']:.0f} "
            f"| {e['peak_bytes'] / MIB:,.0f} | {e['temp_bytes'] / MIB:,.0f} | {fits(e)} "
            f"| {e['model_flops'] / 1e9:.1f} | {bound} | {', '.join(e['host_callbacks']) or 'none'} |"
        )
    return rows


def _depth_table(results: dict) -> list[str]:
    rows = ["| target | mode | K | peak MiB/device | temp MiB | GFLOP/step/device (incl. recompute) |"]
    rows.append("|---|---|---|---|---|---|")
    depth_rows = [key.split("|")[1:] for key in results if key.startswith("depth|")]
    for target, mode, k in sorted(depth_rows, key=lambda r: (r[0], r[1], int(r[2][2:]))):
        e = results["|".join(("depth", target, mode, k))]
        if "error" not in e:
            rows.append(
                f"| {target} | {mode} | {k[2:]} | {e['peak_bytes'] / MIB:,.0f} "
                f"| {e['temp_bytes'] / MIB:,.0f} | {e['model_flops'] / 1e9:.1f} |"
            )
    return rows


def _compile_table(results: dict) -> list[str]:
    rows = ["| model | compile s at K=4 | compile s at K=32 | ratio |", "|---|---|---|---|"]
    names = sorted({k.split("|")[1] for k in results if k.startswith("compile|")})
    for name in names:
        a, b = results.get(f"compile|{name}|K=4", {}), results.get(f"compile|{name}|K=32", {})
        if "compile_s" in a and "compile_s" in b:
            rows.append(
                f"| {name} | {a['compile_s']:.0f} | {b['compile_s']:.0f} "
                f"| {b['compile_s'] / a['compile_s']:.2f} |"
            )
    return rows


def render(results: dict) -> str:
    """``accelerators.md`` from the matrix results (see ``aot_matrix.py``)."""
    lines = [
        "# Accelerator compile matrix (deviceless AOT, generated by `aot_matrix.py`)",
        "",
        "Every number here comes from **compiling** for a device description on a CPU-only machine;",
        "nothing was run on a TPU or GPU. Memory is XLA's per-device figure; step times are roofline",
        "lower bounds (see `chips.py`), not measurements. Compile times are wall time of the CPU",
        "host running the compiler (noisy: other work shared its cores). FLOPs count matmuls and",
        "convolutions only (monDEQ's FFT solver and elementwise work are not in them), with scans",
        "counted K times; a DEQ solver's while loop counts once.",
        "",
        "## Every family at its paper shape",
        "",
        *_families_table(results),
        "",
        "## Depth-memory modes (ResNet-like, width 64, batch 128, multi-mask)",
        "",
        "`store`: every reuse's activations kept; `remat`: `remat_policy='nothing_saveable'` (one",
        "carry per reuse); `sqrt`: `checkpoint_every='sqrt'` (a carry every ~sqrt(K) reuses, segments",
        "recomputed).",
        "",
        *_depth_table(results),
        "",
        "## Compile time against depth (TPU v5e-8, float32)",
        "",
        *_compile_table(results),
        "",
        "## Multi-host",
        "",
    ]
    for key, e in results.items():
        if key.startswith("multihost|"):
            lines.append(f"- {key.split('|')[1]}: {one_line(e)}, {e.get('num_processes', '?')} processes")
    return "\n".join(lines) + "\n"
