"""Installed packages made to look uninstalled: what a user without them would meet.

hide(names) hides each named module and everything below it: importing it raises
ModuleNotFoundError, importlib.util.find_spec cannot find it, and pkgutil (which Hydra's
plugin discovery walks) does not list it. Modules of theirs already imported are taken out
of sys.modules, so nothing finds them there either. It returns the function that undoes it all.

sitecustomize.py beside this file hides $NANOGPT_TEST_HIDE for a whole interpreter;
tests/commands.py hides around one command run inside the test process.
"""

from __future__ import annotations

import pkgutil
import sys
from collections.abc import Callable, Iterable


def hider(names: Iterable[str]) -> Callable[[str], bool]:
    """A test of whether a module name is one of names or below one."""
    names = tuple(names)
    return lambda name: any(name == h or name.startswith(h + ".") for h in names)


class HidingFinder:
    """First on sys.meta_path: a hidden module is not found, whoever asks."""

    def __init__(self, hidden: Callable[[str], bool]):
        self.hidden = hidden

    def find_spec(self, name, path=None, target=None):
        if self.hidden(name):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def hide(names: Iterable[str]) -> Callable[[], None]:
    hidden = hider(names)
    finder = HidingFinder(hidden)
    loaded = {name: module for name, module in sys.modules.items() if hidden(name)}
    for name in loaded:
        del sys.modules[name]
    listed = pkgutil.iter_modules

    def iter_modules(path=None, prefix=""):
        return (info for info in listed(path, prefix) if not hidden(info.name))

    sys.meta_path.insert(0, finder)
    pkgutil.iter_modules = iter_modules

    def undo() -> None:
        sys.meta_path.remove(finder)
        pkgutil.iter_modules = listed
        sys.modules.update(loaded)

    return undo
