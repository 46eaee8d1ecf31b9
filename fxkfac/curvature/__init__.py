"""Losses, reduction factors and backpropagated vectors for each Fisher type."""
