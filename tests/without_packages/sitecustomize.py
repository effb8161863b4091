"""Test helper: this interpreter behaves as if the packages in $NANOGPT_TEST_HIDE were not installed.

Put this folder first on PYTHONPATH; Python imports sitecustomize at start-up.
NANOGPT_TEST_HIDE=tensorboard,hydra_plugins.hydra_joblib_launcher hides each
named module and everything below it: importing it raises ModuleNotFoundError,
importlib.util.find_spec cannot find it, and pkgutil (which Hydra's plugin
discovery walks) does not list it.
"""

import os
import pkgutil
import sys

HIDDEN = tuple(name for name in os.environ.get("NANOGPT_TEST_HIDE", "").split(",") if name)


def hidden(name: str) -> bool:
    return any(name == h or name.startswith(h + ".") for h in HIDDEN)


class HidingFinder:
    """First on sys.meta_path: a hidden module is not found, whoever asks."""

    def find_spec(self, name, path=None, target=None):
        if hidden(name):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


if HIDDEN:
    sys.meta_path.insert(0, HidingFinder())
    listed = pkgutil.iter_modules

    def iter_modules(path=None, prefix=""):
        return (info for info in listed(path, prefix) if not hidden(info.name))

    pkgutil.iter_modules = iter_modules
