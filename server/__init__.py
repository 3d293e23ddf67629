"""Flower ServerApp: modality-aware aggregation, update validation and exact global evaluation."""
