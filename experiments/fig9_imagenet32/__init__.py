"""Figure 9: ImageNet32 and the density table (paper scale only)."""
