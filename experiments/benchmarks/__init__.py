"""Step-time benchmarks, the chips' peak table and the accelerator compile matrix."""
