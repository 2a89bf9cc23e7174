"""Table 1b: weight-tied vs not-tied and ResNet-20."""
