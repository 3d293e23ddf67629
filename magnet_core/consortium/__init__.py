"""Simulated consortia: scenario files and the sites they build from a cohort."""
