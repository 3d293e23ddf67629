"""Federation maths: aggregation, update screening, differential privacy, release rules, secure aggregation."""
