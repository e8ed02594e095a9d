"""memfit.optim."""
