"""Table 3: multi-mask LoRA on VTAB-1k with the ImageNet-21k ViT-B/16 (paper scale only)."""
