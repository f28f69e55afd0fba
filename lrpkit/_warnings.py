"""Warnings that name the user's line.

A fixed ``stacklevel`` counts frames, and the count breaks whenever a call passes through one more layer of lrpkit
(a subclass's ``__init__``, the inference-mode wrapper of :mod:`lrpkit._inference`, ``analyze`` around ``LRP``).
:func:`warn` instead walks up the stack to the first frame whose file is not inside the lrpkit package and
attributes the warning to that line: the user's call, however deep inside lrpkit the warning was raised.
"""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _inside_package(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_PACKAGE)


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` call in the caller of this function point at the first
    frame outside the lrpkit package (the outermost frame when every frame is inside it)."""
    frame = sys._getframe(2)  # the frame that will call warnings.warn's caller: stacklevel 2
    level = 2
    while frame is not None and _inside_package(frame.f_code.co_filename) and frame.f_back is not None:
        frame = frame.f_back
        level += 1
    return level


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the user's line: the first frame up the stack whose file
    is not inside the lrpkit package (see the module docstring)."""
    warnings.warn(message, category, stacklevel=user_stacklevel())
