"""Table 2: 2:4 vs unstructured masks."""
