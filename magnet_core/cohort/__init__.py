"""Cohorts: table readers and their input limits, the data layout, preprocessing, the consortium manifest, site
validation and the generated cohort."""
