"""MAGNET: missing-modality-aware graph neural network (pure torch/PyG, no Flower)."""

__version__ = "0.1.0"
