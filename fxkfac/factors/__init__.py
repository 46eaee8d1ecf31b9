"""Kronecker factors: per-kind rules (linear, conv) and the driver that computes ``(A, B)``."""

from fxkfac.factors import conv_rule, linear_rule  # noqa: F401  (registers the built-in rules)
