"""Capture: tracing, op matching, parameter verification and the graph rewrite."""
