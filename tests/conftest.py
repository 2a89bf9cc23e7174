"""Test set-up: four fake CPU devices (multi-device code is tested without accelerators)."""

import jax

# Must run before any JAX backend is initialised. The default device stays CPU 0, so single-device
# tests are unaffected; data-parallel tests build meshes over 1 or 4 of these devices.
jax.config.update("jax_num_cpu_devices", 4)
