"""``njit`` and ``prange`` for the kernels, typed for mypy.

Numba's own ``njit`` turns a function into a ``Dispatcher`` whose call signature mypy cannot see
(``*args``), so under type checking the decorator is declared to return the function unchanged:
callers in fededge are checked against the kernels' annotations. At run time these are Numba's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

if TYPE_CHECKING:

    def njit(*args: Any, **kwargs: Any) -> Callable[[F], F]:
        """Numba's ``njit(**options)``, as mypy sees it: the kernel keeps its signature."""
        ...

    prange = range
else:
    from numba import njit, prange

__all__ = ["njit", "prange"]
