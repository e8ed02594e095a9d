"""memfit.moe."""
