"""Flower ClientApp: a hospital site that trains MAGNET on its own patients."""
