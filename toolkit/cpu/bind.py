"""Methods bound to one module instance, that survive ``torch.save`` of the whole model."""
from __future__ import annotations

import inspect
from typing import Any


class BoundMethod:
    """``func`` bound to ``module``, for setting as an instance attribute (a switched ``forward``
    and the like: ``module.forward = BoundMethod(f, module)``).

    ``types.MethodType`` does the same but pickles by name (``getattr(module, f.__name__)`` on
    load), which fails for a function the module's class does not have: ``torch.load`` of a whole
    switched model then raised ``AttributeError``. This pickles the function by reference and the
    module with the model. Its signature is ``func``'s without the module (transformers'
    ``apply_chunking_to_forward`` counts the arguments). ``__func__`` and ``__self__`` are those
    of a bound method, so ``getattr(attr, "__func__", None) is f`` tells what is bound.
    """

    def __init__(self, func: Any, module: Any):
        self.__func__, self.__self__ = func, module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(self.__self__, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.Signature(list(inspect.signature(self.__func__).parameters.values())[1:])

    def __repr__(self) -> str:
        return f"<bound {self.__func__.__qualname__} of {type(self.__self__).__name__}>"
