"""The Colab notebooks' generator (build.py)."""
