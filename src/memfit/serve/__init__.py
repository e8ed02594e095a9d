"""memfit.serve."""
