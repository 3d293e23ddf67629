"""Artefacts a run leaves: signed model packages and HTML run reports."""
