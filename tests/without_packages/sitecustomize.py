"""Test helper: this interpreter behaves as if the packages in $NANOGPT_TEST_HIDE were not installed.

Put this folder first on PYTHONPATH; Python imports sitecustomize at start-up.
NANOGPT_TEST_HIDE=tensorboard,hydra_plugins.hydra_joblib_launcher hides each
named module and everything below it, as hiding.py beside this file describes.
"""

import os

from hiding import hide

HIDDEN = [name for name in os.environ.get("NANOGPT_TEST_HIDE", "").split(",") if name]

if HIDDEN:
    hide(HIDDEN)
