"""Consortium scenarios, runners (centralized, federated, studies) and the magnet-fl command line."""
