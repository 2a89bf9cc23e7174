"""The training job on the full-size local CIFAR-10 copy: curves and table."""
