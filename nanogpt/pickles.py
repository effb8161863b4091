"""Reading pickles written by karpathy/nanoGPT without letting them run code.

nanoGPT stores a character vocabulary as ``meta.pkl`` (``vocab_size``, ``stoi``,
``itos``) beside its ``train.bin``/``val.bin``. A pickle can name any callable
to be run while it loads, so one from elsewhere is read with an unpickler that
refuses every class and function: only the plain containers and scalars such a
file legitimately holds can come out of it.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

from nanogpt.errors import DataError

# The only values a nanoGPT meta.pkl needs; builtins that pickle without find_class.
PLAIN_TYPES = (dict, list, tuple, str, int, float, bool, type(None))


class PlainUnpickler(pickle.Unpickler):
    """An unpickler that resolves no global at all, so no constructor or function can be called."""

    def find_class(self, module: str, name: str):
        """Refuse: a plain dict of strings and numbers never needs a global."""
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def is_plain(value) -> bool:
    """True when value is built only of PLAIN_TYPES, at any depth."""
    if isinstance(value, dict):
        return all(is_plain(k) and is_plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    return isinstance(value, PLAIN_TYPES)


def read_nanogpt_meta_pkl(path: str | Path) -> dict:
    """The dict in a nanoGPT meta.pkl, refusing any pickle that would call code to build it."""
    path = Path(path)
    try:
        value = PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror})") from None
    except Exception as e:  # UnpicklingError, EOFError, ValueError... all mean "not a plain pickle"
        raise DataError(f"{path} was refused: it is not a plain nanoGPT meta.pkl ({e}); "
                        "write it again with nanoGPT's prepare.py") from None
    if not isinstance(value, dict) or not is_plain(value):
        raise DataError(f"{path} does not hold a plain dict of vocabulary data; "
                        "write it again with nanoGPT's prepare.py")
    return value
