"""Exception types raised by fxkfac.

Every error says what went wrong and what the user can do about it; the CLI prints the
message as one line.
"""

from __future__ import annotations


class FxKfacError(Exception):
    """Base class of all fxkfac errors."""


class TraceError(FxKfacError):
    """The model could not be traced into a ``torch.fx`` graph."""


class CaptureError(FxKfacError):
    """A capture cannot be used for what was asked (wrong model, no gradient graph, ...)."""


class UnsupportedLossError(FxKfacError, NotImplementedError):
    """The loss function has no K-FAC rule (supported: MSE, cross-entropy, BCE-with-logits)."""


class InputMismatchError(FxKfacError, RuntimeError):
    """Inputs and parameters disagree in dtype or device (the forward could not run)."""
