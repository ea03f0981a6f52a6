"""A package that takes the place of a module (server.py became server/) keeps the module's
names, re-exported by its __init__.py, and the effect of setting one of them.

In the one module, `monkeypatch.setattr(server, "prepare", fake)` (a test's) reached every use
of `prepare`, a global looked up at call time. In the package, the code that calls it looks it
up in its own module. `forward_sets(__name__)`, at the end of the package's __init__.py, makes a
name set on the package be set too in each of its modules that holds the same object under that
name: the set, and the set that puts the old object back, reach the code as before. Nothing is
imported back from the package: its modules never know of it.
"""

from __future__ import annotations

import sys
import types
from typing import Any

_MISSING = object()


class _Forwarding(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        old = self.__dict__.get(name, _MISSING)
        if old is not _MISSING and not isinstance(old, types.ModuleType):  # a submodule is no shared name
            prefix = self.__name__ + "."
            for key, module in list(sys.modules.items()):
                if key.startswith(prefix) and module is not None and vars(module).get(name, _MISSING) is old:
                    setattr(module, name, value)
        super().__setattr__(name, value)


def forward_sets(package: str) -> None:
    """From now on, a name set on the package `package` is set in its modules that hold it too."""
    sys.modules[package].__class__ = _Forwarding
