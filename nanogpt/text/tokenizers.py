"""Tokenizers: one Tokenizer object inside the package, a small JSON-able description on disk.

Inside the package a tokenizer is a Tokenizer (encode, decode, eot, vocab_size,
kind, name), equal to another exactly when their descriptions are, so "the
model's tokenizer against the dataset's" is ``==`` and a Tokenizer can key a
cache. Its ``description`` is what is stored: a prepared dataset's meta.json,
from there every checkpoint, an export's nanogpt_tokenizer.json, and what a
data worker process is given. So sampling, eval, export and ``nanogpt.load``
need nothing but the checkpoint to turn text into ids and back, and
load_tokenizer(description) gives the Tokenizer again (built once per process). Kinds:

char (a text's own characters), tiktoken (GPT-2's BPE or any tiktoken
encoding), hf (a Hugging Face ``tokenizers`` tokenizer: a BPE trained here on
the corpus, or a user's tokenizer.json, kept whole because a path stops meaning
anything once the checkpoint leaves the machine) and ids (pre-tokenized data
whose tokenizer is unknown). Each kind is one Tokenizer subclass below.

``tiktoken`` and ``tokenizers`` are optional and imported where first used, so
that a character-level user needs neither. Nothing here imports Hydra or torch
(worker processes import this module and should start quickly).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from nanogpt.errors import DataError, first_line, require_package
from nanogpt.text.gpt2_files import GPT2_ENCODING, gpt2_encoding, tiktoken_cache_dir

GPT2_TOKENIZER = {"kind": "tiktoken", "encoding": GPT2_ENCODING}
END_OF_TEXT = "<|endoftext|>"
BYTE_ALPHABET = 256  # a byte-level BPE starts from every byte value
UINT16_IDS = 1 << 16  # vocabularies up to this size are stored as uint16, larger ones as uint32
# dataset.tokenizer values that are not tiktoken encodings or tokenizer.json paths.
OWN_TOKENIZERS = ("char", "bpe")


class UnknownTokenError(DataError):
    """Text contains a character the vocabulary does not have."""


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned integer type that holds every id: what train.bin/val.bin use."""
    return "uint16" if vocab_size <= UINT16_IDS else "uint32"


def get_vocabulary(text: str) -> list[str]:
    """The sorted list of distinct characters in text: a character-level vocabulary."""
    return sorted(set(text))


def create_encoder_decoder(
    vocabulary: list[str],
) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """Return (encode, decode) between strings and ids for a character vocabulary."""
    stoi = {ch: i for i, ch in enumerate(vocabulary)}

    def encode(text: str) -> list[int]:
        try:
            return [stoi[ch] for ch in text]
        except KeyError as e:
            ch = e.args[0]
            raise UnknownTokenError(
                f"character {ch!r} (U+{ord(ch):04X}) is not in the vocabulary of "
                f"{len(vocabulary)} characters; use only characters from the training text"
            ) from None

    def decode(ids: list[int]) -> str:
        return "".join(vocabulary[i] for i in ids)

    return encode, decode


def code_points(text: str) -> np.ndarray:
    """The text's characters as an array of code points, without a Python loop."""
    if text.isascii():  # most text: one byte per character, a quarter of the memory traffic
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def char_lookup(vocabulary: list[str]) -> np.ndarray:
    """A table from code point to id (-1 for characters outside the vocabulary)."""
    points = np.array([ord(ch) for ch in vocabulary], dtype=np.int64)
    table = np.full(max(int(points.max(initial=0)) + 1, 256), -1, dtype=np.int32)
    table[points] = np.arange(len(vocabulary))
    return table


class Tokenizer:
    """Text to ids and back, for one stored description; one subclass per kind, found in TOKENIZERS.

    A new kind is a subclass with its ``kind``, ``vocab_size``, ``eot`` (the
    end-of-text id put after each document, or None), encode and decode;
    encode_array is the fast path data preparation uses. Subclassing registers it.
    A kind that ``dataset.tokenizer=NAME`` can name also says which names are
    its own (names) and what description such a name stands for (describe).

    A Tokenizer is a value: equal and hashed by its description in canonical
    JSON. Kinds whose library is optional (tiktoken, tokenizers) build their
    encoder on first use, so a model's tokenizer travels with it (export,
    init_from's check, the loss on its own tokens) where that library is absent.
    Make one with load_tokenizer(description); the description is never changed.
    """

    kind: str = ""
    vocab_size: int
    eot: int | None = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        TOKENIZERS[cls.kind] = cls

    def __init__(self, description: dict):
        self.description = description
        self.key = canonical_json(description)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return f"<Tokenizer {self.name}>"

    @property
    def name(self) -> str:
        """A short name for messages: the kind and what tells it apart."""
        return self.kind

    def encodes_like(self, other: Tokenizer) -> bool:
        """True when both give the same ids for any text: equal, or differing only in where they were read."""
        return self == other

    @classmethod
    def names(cls, name: str) -> bool:
        """True when dataset.tokenizer=name means a tokenizer of this kind."""
        return False

    @classmethod
    def describe(cls, name: str) -> dict:
        """The description dataset.tokenizer=name stands for, checked to load before any work."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def encode_array(self, text: str) -> np.ndarray:
        return np.array(self.encode(text), dtype=np.int64)

    @property
    def dtype(self) -> str:
        """The integer type of the token files for this vocabulary."""
        return token_dtype(self.vocab_size)


TOKENIZERS: dict[str, type[Tokenizer]] = {}


class CharTokenizer(Tokenizer):
    """``{"kind": "char", "vocabulary": [...]}``: a text's own characters, id = position."""

    kind = "char"

    def __init__(self, description: dict):
        super().__init__(description)
        vocabulary = description["vocabulary"]
        self.vocab_size = len(vocabulary)
        self.encode, self.decode = create_encoder_decoder(vocabulary)
        self.table = char_lookup(vocabulary)

    @property
    def name(self) -> str:
        return f"char ({self.vocab_size} characters)"

    def encode_array(self, text: str) -> np.ndarray:
        points = code_points(text)
        if points.dtype != np.uint8 and points.size and int(points.max()) >= len(self.table):
            self.encode(chr(int(points.max())))  # raises the one-line error
        ids = self.table[points]
        if ids.size and ids.min() < 0:
            self.encode(text[int(np.argmax(ids < 0))])  # raises the one-line error
        return ids


class TiktokenTokenizer(Tokenizer):
    """``{"kind": "tiktoken", "encoding": NAME}``: GPT-2's BPE or any tiktoken encoding."""

    kind = "tiktoken"

    @classmethod
    def names(cls, name: str) -> bool:
        return name in tiktoken_names()

    @classmethod
    def describe(cls, name: str) -> dict:
        tiktoken_encoding(name)
        return GPT2_TOKENIZER if name == GPT2_ENCODING else {"kind": "tiktoken", "encoding": name}

    @property
    def name(self) -> str:
        return f"tiktoken {self.description['encoding']}"

    @functools.cached_property
    def encoding(self):
        """The tiktoken Encoding, read on first use (tiktoken and its files are needed only then)."""
        return tiktoken_encoding(self.description["encoding"])

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def eot(self) -> int:
        return self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        # Special tokens such as <|endoftext|> inside a text are read as plain text.
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)


class HFTokenizer(Tokenizer):
    """``{"kind": "hf", "json": TOKENIZER_JSON}``: a Hugging Face tokenizers tokenizer, kept whole."""

    kind = "hf"

    @classmethod
    def names(cls, name: str) -> bool:
        return is_tokenizer_file(name)

    @classmethod
    def describe(cls, name: str) -> dict:
        return read_tokenizer_file(name)

    @property
    def name(self) -> str:
        return f"hf ({self.description.get('origin', 'a tokenizer.json')})"

    def encodes_like(self, other: Tokenizer) -> bool:
        # A tokenizer.json by its content, not by where it was read.
        return isinstance(other, HFTokenizer) and self.description["json"] == other.description["json"]

    @functools.cached_property
    def hf(self):
        """The Hugging Face tokenizer, parsed on first use (the tokenizers package is needed only then)."""
        return hf_tokenizer(self.description["json"])

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def eot(self) -> int | None:
        return self.hf.token_to_id(END_OF_TEXT)

    def encode(self, text: str) -> list[int]:
        try:
            return self.hf.encode(text, add_special_tokens=False).ids
        except Exception as e:  # noqa: BLE001 (tokenizers' Rust code raises a plain Exception)
            where = self.description.get("origin", "the tokenizer.json")
            raise DataError(f"{where} cannot encode the text: tokenizers says {first_line(str(e))}; give a "
                            "tokenizer that covers any text (a byte-level BPE, or one with an unknown "
                            "token)") from None

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def encode_array(self, text: str) -> np.ndarray:
        # An Encoding keeps strings and offsets for every token: encode a long text in parts.
        parts = [np.array(self.encode(part), dtype=np.int64) for part in slices(text)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class IdsTokenizer(Tokenizer):
    """``{"kind": "ids", "vocab_size": N}``: pre-tokenized data whose tokenizer is unknown; text is ids."""

    kind = "ids"

    def __init__(self, description: dict):
        super().__init__(description)
        self.vocab_size = int(description["vocab_size"])

    @property
    def name(self) -> str:
        return f"ids ({self.vocab_size} ids of an unknown tokenizer)"

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(str(i) for i in ids)


def canonical_json(description: dict) -> str:
    """A tokenizer description as canonical JSON: what a Tokenizer is equal and hashed by."""
    return json.dumps(description, sort_keys=True)


def load_tokenizer(description: dict) -> Tokenizer:
    """The Tokenizer a stored description stands for (meta.json's, a checkpoint's), built once a process.

    The Tokenizer keeps a copy of the description as given, key order and all:
    what it writes back (meta.json, a checkpoint, an export) is what it read.
    """
    if not isinstance(description, dict) or description.get("kind") not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {str(description)[:80]}; this version knows "
                        f"{', '.join(TOKENIZERS)}")
    key = canonical_json(description)
    if key not in BUILT:
        if len(BUILT) >= MAX_BUILT:
            del BUILT[next(iter(BUILT))]  # the one built first
        BUILT[key] = TOKENIZERS[description["kind"]](copy.deepcopy(description))
    return BUILT[key]


BUILT: dict[str, Tokenizer] = {}  # load_tokenizer's: canonical JSON -> its Tokenizer
MAX_BUILT = 8  # tokenizers kept built in a process (a few at most are ever in use)


def hf_tokenizer(tokenizer_json: str):
    """A Hugging Face tokenizers.Tokenizer from its JSON text; special tokens in text stay text."""
    require_package("tokenizers", "bpe", "a Hugging Face tokenizer (dataset.tokenizer=bpe or tokenizer.json)")
    from tokenizers import Tokenizer as HFTokenizer

    tokenizer = HFTokenizer.from_str(tokenizer_json)
    # A corpus or a prompt that contains "<|endoftext|>" is text, as with tiktoken's encode_ordinary.
    tokenizer.encode_special_tokens = True
    return tokenizer


def tiktoken_encoding(name: str):
    """A tiktoken encoding by name; offline, one line naming the missing file and where it goes."""
    if name == GPT2_ENCODING:
        return gpt2_encoding()
    require_package("tiktoken", "bpe", f"dataset.tokenizer={name}")
    import tiktoken

    try:
        return tiktoken.get_encoding(name)
    except ValueError:
        raise DataError(
            f"dataset.tokenizer={name!r} is not a tiktoken encoding; use char, bpe, a path to a "
            f"tokenizer.json or one of: {', '.join(tiktoken.list_encoding_names())}"
        ) from None
    except Exception as error:  # tiktoken's download raises requests' errors and its own
        raise DataError(missing_tiktoken_file(name, error)) from None


@functools.cache
def tiktoken_names() -> tuple[str, ...]:
    """The encodings tiktoken knows by name (just gpt2 if tiktoken is not installed)."""
    try:
        import tiktoken
    except ImportError:
        return (GPT2_ENCODING,)
    return tuple(tiktoken.list_encoding_names())


def missing_tiktoken_file(name: str, error: Exception) -> str:
    """What to download and where to save it, read off the failed request's message."""
    found = re.search(r"host='([^']+)'.*?url: (\S+)", str(error))
    if not found:
        return f"could not load tiktoken encoding {name} ({type(error).__name__}); allow network access"
    url = f"https://{found.group(1)}{found.group(2)}"
    target = tiktoken_cache_dir() / hashlib.sha1(url.encode()).hexdigest()
    return (f"dataset.tokenizer={name}: tiktoken could not download {url}; offline, fetch that file "
            f"elsewhere and save it as {target} (the folder is $TIKTOKEN_CACHE_DIR)")


def is_tokenizer_file(name: str) -> bool:
    """True when dataset.tokenizer names a Hugging Face tokenizer.json rather than a built-in."""
    return name.endswith(".json") or os.sep in name


def read_tokenizer_file(path: str) -> dict:
    """The description of a user's tokenizer.json, checked to load before any work starts."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"dataset.tokenizer={path} does not exist; give the path of a Hugging Face "
                        "tokenizer.json (as tokenizer.save() writes it)")
    text = file.read_text(encoding="utf-8", errors="replace")
    try:
        hf_tokenizer(text)
    except DataError:
        raise
    except Exception as e:  # tokenizers raises its own Exception subclass for unparsable JSON
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise DataError(f"dataset.tokenizer={path} is not a Hugging Face tokenizer.json ({reason}); "
                        "give a file written by tokenizers' Tokenizer.save()") from None
    return {"kind": "hf", "origin": str(file.resolve()), "json": text}


def knows_tokenizer(name: str) -> bool:
    """True when dataset.tokenizer=name means something: char, bpe, or a name some kind claims."""
    return name in OWN_TOKENIZERS or any(kind.names(name) for kind in TOKENIZERS.values())


def named_tokenizer(name: str) -> Tokenizer:
    """The tokenizer given by name (a tiktoken encoding) or path (a tokenizer.json) as dataset.tokenizer.

    Loading it here is the check: a missing or broken file, or an encoding whose
    files cannot be had offline, fails before any data is touched.
    """
    for kind in TOKENIZERS.values():
        if kind.names(name):
            return load_tokenizer(kind.describe(name))
    raise DataError(f"dataset.tokenizer={name!r} names no tokenizer this version knows")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of vocab_size ids trained on texts, with <|endoftext|> as id 0.

    Byte-level (GPT-2's pre-tokenizer and byte alphabet) so that any text can be
    encoded; training sees texts in a fixed order, so one corpus and size always
    give the same merges.
    """
    require_package("tokenizers", "bpe", "dataset.tokenizer=bpe")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator((part for text in texts for part in slices(text)), trainer=trainer)
    return load_tokenizer({"kind": "hf", "origin": f"bpe trained here, vocab_size={vocab_size}",
                           "json": tokenizer.to_str()})


# A newline between two visible ASCII characters: every tiktoken pattern and byte-level BPE
# pre-tokenizer makes such a newline a token of its own, so text cut just after it encodes to
# exactly the ids the uncut text would.
CLEAN_CUT = re.compile(r"[\x21-\x7e]\n(?=[\x21-\x7e])")


def slices(text: str, size: int = 1 << 16) -> Iterator[str]:
    """Text in parts of about size characters, each cut at a CLEAN_CUT (the rest in one part if none).

    Hugging Face tokenizers need memory in proportion to the text given in one
    call (measured: training on 25 MB given as 4 MB strings peaked at 823 MB,
    as 64 kB parts at 85 MB), so they are given small parts.
    """
    start = 0
    while start < len(text):
        found = CLEAN_CUT.search(text, start + size)
        end = found.start() + 2 if found else len(text)
        yield text[start:end]
        start = end


def write_hf_tokenizer(tokenizer: Tokenizer, directory: Path) -> bool:
    """Write tokenizer.json and tokenizer_config.json for an hf-kind tokenizer; False for other kinds.

    AutoTokenizer.from_pretrained(directory) then encodes text to the ids our model was trained on.
    """
    if tokenizer.kind != "hf":
        return False
    (directory / "tokenizer.json").write_text(tokenizer.description["json"], encoding="utf-8")
    settings = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if tokenizer.eot is not None:
        settings.update(bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT)
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=1))
    return True
