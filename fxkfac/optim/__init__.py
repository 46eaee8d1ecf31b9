"""Optimizers: the K-FAC preconditioner, the K-FAC optimizer and the NGD-T regulator."""
