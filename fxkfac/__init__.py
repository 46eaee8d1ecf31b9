"""fxkfac: K-FAC for any PyTorch model through a torch.fx graph-transformation compiler.

>>> kmod = fxkfac.compile(model, example_inputs=(x,))
>>> out, cap = kmod(x)
>>> factors = cap.factors(loss_func, y, fisher_type="type-2")   # {layer: (A, B)}
"""

from fxkfac.capture import Capture
from fxkfac.compiled_module import CompiledModule
from fxkfac.compiler import compile
from fxkfac.errors import CaptureError, FxKfacError, InputMismatchError, TraceError, UnsupportedLossError
from fxkfac.layers import ConvParams, LayerInfo
from fxkfac.optim.kfac import KFAC
from fxkfac.optim.ngdt import NGDT
from fxkfac.passes.matchers import register_function_matcher, register_module_matcher
from fxkfac.precond.preconditioner import KFACPreconditioner

__version__ = "0.1.0"

__all__ = [
    "KFAC",
    "NGDT",
    "Capture",
    "CaptureError",
    "CompiledModule",
    "ConvParams",
    "FxKfacError",
    "InputMismatchError",
    "KFACPreconditioner",
    "LayerInfo",
    "TraceError",
    "UnsupportedLossError",
    "__version__",
    "compile",
    "register_function_matcher",
    "register_module_matcher",
]
