"""Test set-up: four fake CPU devices (multi-device code is tested without accelerators), and
XLA's cheap compilation mode for CPU programs."""

import os

import jax

# Must run before any JAX backend is initialised. The default device stays CPU 0, so single-device
# tests are unaffected; data-parallel tests build meshes over 1 or 4 of these devices.
jax.config.update("jax_num_cpu_devices", 4)

# The suite compiles hundreds of small programs and runs each a few times, so XLA:CPU's LLVM
# optimisation passes dominate its time (about 70% of the workers' time in a full run). Without them
# six of the slowest tests took 44 s instead of 85 s. Every assertion compares programs compiled
# the same way (the children, subprocess jobs and notebooks, inherit the setting through the
# environment); accelerator compiles keep full optimisation (tests/test_aot.py).
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
jax.config.update("jax_disable_most_optimizations", True)
