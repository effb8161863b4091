"""karpathy/nanoGPT's ``meta.pkl``: its character vocabulary, read without letting the file run anything.

nanoGPT stores a character vocabulary as a pickle: ``{"vocab_size": 65,
"stoi": {"a": 39, ...}, "itos": {39: "a", ...}}``. Unpickling an arbitrary file
can call any importable function (``os.system`` is the classic), and a
downloaded checkpoint folder is exactly the kind of file a user should not have
to trust. A vocabulary needs only dicts, lists, tuples, strings and numbers, so
this reader accepts those and refuses every instruction that would look up a
class or function by name: nothing in the file is ever called.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

from nanogpt.errors import CheckpointError, DataError
from nanogpt.text.tokenizers import Tokenizer, load_tokenizer

# The only values a nanoGPT meta.pkl needs: the types pickle builds without naming a global.
PLAIN_TYPES = (dict, list, tuple, str, int, float, bool, type(None))


class MetaPickleError(CheckpointError, DataError):
    """A meta.pkl that cannot be read as plain data: beside a checkpoint or beside .bin files alike."""


class PlainDataUnpickler(pickle.Unpickler):
    """An unpickler for plain data only: any reference to a class or function is refused.

    Dicts, lists, tuples, str, int, float, bool and None have opcodes of their
    own; everything else reaches find_class (GLOBAL / STACK_GLOBAL) or
    persistent_load, and both refuse.
    """

    def find_class(self, module: str, name: str):
        """Refuse: loading a plain vocabulary never needs to name a class or function."""
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, and only plain data is accepted")

    def persistent_load(self, pid):
        """Refuse persistent ids as well: they are another way to reach outside the file."""
        raise pickle.UnpicklingError("it uses a persistent id, and only plain data is accepted")


def is_plain(value) -> bool:
    """True when value is built only of PLAIN_TYPES, at any depth."""
    if isinstance(value, dict):
        return all(is_plain(k) and is_plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    return isinstance(value, PLAIN_TYPES)


def read_nanogpt_meta_pkl(path: str | Path) -> dict:
    """The dict in nanoGPT's meta.pkl at path, read so that nothing in the file can run."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MetaPickleError(f"cannot read {path} ({e.strerror})") from None
    try:
        meta = PlainDataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise MetaPickleError(f"{path} was refused, nothing in it was run: {e}") from None
    except Exception as e:  # noqa: BLE001 (a damaged pickle fails in many ways)
        raise MetaPickleError(f"{path} is not a readable pickle ({type(e).__name__})") from None
    if not isinstance(meta, dict) or not is_plain(meta):
        raise MetaPickleError(f"{path} holds a {type(meta).__name__}, not nanoGPT's plain vocabulary dict")
    return meta


def read_char_vocabulary(path: str | Path) -> Tokenizer:
    """Our character tokenizer for nanoGPT's meta.pkl at path (its ``itos`` table).

    Used for a nanoGPT checkpoint's vocabulary and for its prepared .bin folders alike.
    """
    itos = read_nanogpt_meta_pkl(path).get("itos")
    if not isinstance(itos, dict) or sorted(itos) != list(range(len(itos))):
        raise MetaPickleError(f"{path} has no itos table numbering its tokens 0, 1, 2, ...")
    vocabulary = [itos[i] for i in range(len(itos))]
    if not all(isinstance(token, str) and len(token) == 1 for token in vocabulary):
        raise MetaPickleError(f"{path} is not a character vocabulary (its tokens are not single characters)")
    return load_tokenizer({"kind": "char", "vocabulary": vocabulary})
