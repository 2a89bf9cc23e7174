"""The accelerator compile matrix: every model family's training step compiled for TPU and GPU.

Deviceless ahead-of-time compilation (:mod:`wtjax.tools.aot`) on a CPU machine, written to
``accelerators.json`` (one entry per compile, so an interrupted run resumes) and rendered to
``accelerators.md`` beside this file:

    python -m experiments.benchmarks.aot_matrix                      # everything (about an hour on 2 cores)
    python -m experiments.benchmarks.aot_matrix --sections=depth     # depth-memory modes only
    python -m experiments.benchmarks.aot_matrix --render             # table from the JSON only

Sections: ``families`` (each family at its paper shape and batch, float32 and bfloat16, on a
TPU v5e-8 slice and 8 x H100), ``compile`` (compile time at K=4 and K=32 on the TPU target),
``depth`` (memory of the depth-memory modes at K=4..32, the ResNet-like model at width 64, batch
128) and ``multihost`` (the same step for a 2-host v5e:4x4 slice). Needs ``jax[tpu]`` and the
``jax-cuda12-plugin``/``-pjrt`` wheels (the ``aot`` extra) and ``JAX_PLATFORMS=cpu``.
Nothing is run: memory and FLOPs come from the compiler, step times are roofline bounds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.benchmarks import chips
from wtjax.job import config as config_schema
from wtjax.job.config import load_config_file
from wtjax.tools import aot

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

JSON, MARKDOWN = HERE / "accelerators.json", HERE / "accelerators.md"
H100_TARGET = HERE / "targets" / "h100_sxm.pbtxt"
CIFAR = ((32, 32, 3), 10)

# name -> (config file, config argument, overrides, (image shape, classes), depth field or None)
FAMILIES = {
    "resnet_like Small (C=44)": ("cifar_resnet.py", "width=44", {}, CIFAR, "depth"),
    "resnet_like Large (C=172)": ("cifar_resnet.py", "width=172", {}, CIFAR, "depth"),
    "resnet20 (tied)": ("cifar_resnet20.py", "", {}, CIFAR, None),
    "mlp (tied)": ("cifar_mlp.py", "", {}, CIFAR, "depth"),
    "cct-7 (tied)": ("cifar_cct.py", "", {}, CIFAR, "depth"),
    "convmixer-256/8 (tied)": ("cifar_cct.py", "", {"model": "convmixer"}, CIFAR, "depth"),
    "deq (Broyden 18/20, IFT)": ("cifar_deq.py", "", {}, CIFAR, None),
    "mondeq (conv, PR)": ("cifar_mondeq.py", "", {}, CIFAR, None),
    "lora ViT-B/16 (multi-mask)": ("vtab_lora.py", "", {}, ((224, 224, 3), 100), None),
}
DEPTHS, DEPTH_MODES = (
    (4, 8, 16, 32),
    {"store": (None, None), "remat": ("nothing_saveable", None), "sqrt": (None, "sqrt")},
)


def family_config(name: str, dtype: str = "float32", depth: int | None = None):
    """The config of matrix row ``name`` in ``dtype`` (and at ``depth`` reuses if given)."""
    file, arg, overrides, _, depth_field = FAMILIES[name]
    config = load_config_file(ROOT / "configs" / file, arg)
    if overrides.get("model") == "convmixer":
        config.model = config_schema.model_config("convmixer", form="tied", **_convmixer_cifar())
    config.model.dtype = dtype
    if depth is not None:
        config.model[depth_field] = depth
    return config


def _convmixer_cifar() -> dict:
    from wtjax.models.convmixer import VARIANTS

    return dict(VARIANTS["256/8/2/5"], mask_mode="multi", mask=dict(density=0.5))


def targets(platforms):
    """``{target name: abstract devices}`` for the requested platforms."""
    out = {}
    if "tpu" in platforms:
        out["TPU v5e-8"] = aot.tpu_devices("v5e:2x4", (2, 4, 1))
    if "gpu" in platforms:
        out["8x H100"] = aot.gpu_devices(H100_TARGET, "1x1x8")
    return out


def compile_entry(results: dict, key: str, config, devices, shape, force=False) -> dict:
    """Compile one entry unless ``results`` has it; store the report (or the error) and save."""
    if key in results and not force:
        return results[key]
    print(f"compiling {key} ...", flush=True)
    try:
        entry = aot.compile_train_step(config, devices, *shape).as_dict()
    except Exception as e:  # a refusal (e.g. over HBM) is a result too
        entry = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    results[key] = entry
    JSON.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"  {chips.one_line(entry)}", flush=True)
    return entry


def run_families(results, devices_by_target, force):
    for name, (*_, shape, _depth) in FAMILIES.items():
        for target, devices in devices_by_target.items():
            for dtype in ("float32", "bfloat16"):
                config = family_config(name, dtype)
                compile_entry(results, f"families|{name}|{target}|{dtype}", config, devices, shape, force)


def run_compile_times(results, devices_by_target, force):
    devices = devices_by_target["TPU v5e-8"]
    for name, (*_, shape, depth_field) in FAMILIES.items():
        if depth_field is None:
            continue
        for depth in (4, 32):
            config = family_config(name, "float32", depth)
            compile_entry(results, f"compile|{name}|K={depth}", config, devices, shape, force)


def run_depth(results, devices_by_target, force):
    for target, devices in devices_by_target.items():
        for mode, (policy, every) in DEPTH_MODES.items():
            for depth in DEPTHS:
                config = load_config_file(ROOT / "configs" / "cifar_resnet.py", f"width=64,depth={depth}")
                config.model.remat_policy, config.model.checkpoint_every = policy, every
                compile_entry(results, f"depth|{target}|{mode}|K={depth}", config, devices, CIFAR, force)


def run_multihost(results, force):
    devices = aot.tpu_devices("v5e:4x4", (2, 4, 1))
    config = family_config("resnet_like Small (C=44)")
    compile_entry(results, "multihost|TPU v5e:4x4 (2 hosts)", config, devices, CIFAR, force)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="families,compile,depth,multihost")
    parser.add_argument("--platforms", default="tpu,gpu")
    parser.add_argument("--force", action="store_true", help="recompile entries already in the JSON")
    parser.add_argument("--render", action="store_true", help="only render the markdown from the JSON")
    args = parser.parse_args(argv)
    results = json.loads(JSON.read_text()) if JSON.exists() else {}
    if not args.render:
        sections = args.sections.split(",")
        devices = targets(args.platforms.split(","))
        if "depth" in sections:
            run_depth(results, devices, args.force)
        if "families" in sections:
            run_families(results, devices, args.force)
        if "compile" in sections and "TPU v5e-8" in devices:
            run_compile_times(results, devices, args.force)
        if "multihost" in sections and "tpu" in args.platforms:
            run_multihost(results, args.force)
    MARKDOWN.write_text(chips.render(results))
    print(f"wrote {MARKDOWN}")


if __name__ == "__main__":
    main()
