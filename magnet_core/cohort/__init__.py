"""Cohorts: table readers, the data layout, preprocessing, the consortium manifest, site validation and the generated cohort."""
