"""Preconditioners built from Kronecker factors: damped inverses and eigendecompositions."""
