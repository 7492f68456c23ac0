"""Renamed keyword arguments of the modules (one vocabulary across torch and Flax).

:func:`renamed` wraps a constructor so that an old keyword still works: it
warns (``DeprecationWarning``, one line naming the new keyword) and is passed
on under the new name; giving the old and the new name together is a
``TypeError`` naming both. ``inspect.signature`` of the wrapped constructor
shows only the new names (it follows ``__wrapped__``).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings

_HERE = os.path.dirname(os.path.abspath(__file__))


def _stacklevel() -> int:
    """How many frames up the user's call is: past this package and Flax's metaclass."""
    level, frame = 1, sys._getframe(1)
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not (name.startswith(_HERE + os.sep) or f"{os.sep}flax{os.sep}" in name):
            return level
        level, frame = level + 1, frame.f_back
    return level


def renamed(synonyms=(), **old_to_new):
    """Decorator: ``old=new`` keyword aliases of a constructor, deprecated.

    ``synonyms``: pairs of keywords that both stay (neither deprecated) but
    name one argument, so giving both is a TypeError.
    """

    def decorate(init):
        @functools.wraps(init)
        def wrapper(self, *args, **kwargs):
            for old, new in old_to_new.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(f"{old}= and {new}= were both given; {old}= is the deprecated name of "
                                    f"{new}=: pass only {new}=")
                warnings.warn(f"{old}= is deprecated; use {new}=", DeprecationWarning, stacklevel=_stacklevel())
                kwargs[new] = kwargs.pop(old)
            for name, other in synonyms:
                if name in kwargs and other in kwargs:
                    raise TypeError(f"{name}= and {other}= were both given; they are two names of one "
                                    f"argument: pass one")
            return init(self, *args, **kwargs)

        return wrapper

    return decorate
