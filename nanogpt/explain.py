"""Look inside a trained model: ``python -m nanogpt.explain [ckpt=...] prompt=TEXT`` (or prompt_file=PATH).

The model reads the text once, and a new directory gets what it computed, as pictures:
explain.html, one self-contained page (it fetches nothing: open it in any browser, offline)
with each token shaded by the model's surprise at it and its top candidates, every block's
and head's attention map with a one-line reading of each head, the logit lens, and for a
small vocabulary the token embeddings on a map; and the same pictures as PNGs. The numbers
are LanguageModel.explain()'s (nanogpt/insight). ckpt= takes every source sample takes.

out= is a new or empty directory, or one an earlier explain wrote; by default a new one
under outputs/explain/. It is written beside and moved into place once complete.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig

from nanogpt.cli.entry import hydra_entry, to_dataclass
from nanogpt.errors import ConfigError, DataError
from nanogpt.fileio import check_new_directory, write_atomically, write_directory
from nanogpt.generation.inference import ModelOptions, open_model, provenance
from nanogpt.generation.language_model import LanguageModel
from nanogpt.insight.numbers import Explanation
from nanogpt.insight.page import About, notes, page_data, page_html
from nanogpt.insight.pictures import write_pictures
from nanogpt.insight.reading import embedding_map
from nanogpt.options import option, require

COMMAND = "nanogpt.explain"
PAGE = "explain.html"
MAX_CANDIDATES = 20
READ_LIMIT = 2 ** 20  # the characters of a prompt_file read: the first block of any model, many times over


@dataclass
class ExplainConfig(ModelOptions):
    """Which model reads which text, and where the pictures go."""

    prompt: str | None = option(None, "the text the model reads (longer than its block: its last block)")
    prompt_file: str | None = option(None, "read the text from this file instead (longer than the "
                                           "model's block: its first block)")
    candidates: int = option(5, f"the likeliest next tokens shown at each position (1-{MAX_CANDIDATES})")
    out: str | None = option(None, "the directory to write: new, empty, or an earlier explain's (which it "
                                   "replaces); null: a new one, outputs/explain/<date>_<time>")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(1 <= self.candidates <= MAX_CANDIDATES,
                f"candidates={self.candidates} must be between 1 and {MAX_CANDIDATES}")


def default_out() -> Path:
    """outputs/explain/<date>_<time>, with -2, -3, ... when one of that second exists."""
    stem = Path("outputs") / "explain" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out, n = stem, 1
    while out.exists():
        n += 1
        out = stem.with_name(f"{stem.name}-{n}")
    return out


def read_text(cfg: ExplainConfig) -> tuple[str, str]:
    """The text to read and which block of it to keep: a prompt's last, a file's first."""
    if cfg.prompt_file is None:
        if cfg.prompt is None:
            raise ConfigError("no text to look inside: give prompt=TEXT or prompt_file=PATH")
        if not cfg.prompt:
            raise ConfigError("prompt is empty; give prompt=TEXT or prompt_file=PATH")
        return cfg.prompt, "last"
    path = Path(cfg.prompt_file).expanduser()
    if not path.is_file():
        raise DataError(f"prompt_file={path} does not exist")
    try:
        with path.open(encoding="utf-8") as f:
            text = f.read(READ_LIMIT)
    except UnicodeDecodeError as e:
        raise DataError(f"prompt_file={path} is not UTF-8 text (byte {e.start} cannot be decoded)") from None
    if not text:
        raise DataError(f"prompt_file={path} is empty; give a file with some text")
    return text, "first"


def about(lm: LanguageModel) -> About:
    c = lm.model.config
    return About(lm.source.where, c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size,
                 lm.tokenizer.name, lm.source.iteration)


def write_explanation(lm: LanguageModel, explanation: Explanation, out: Path) -> tuple[Path, list[str]]:
    """The page and the PNGs of explanation, written to out as a whole; (out, the notes the page shows)."""
    described = about(lm)
    page_notes = notes(explanation, described, len(explanation.tokens) + explanation.cut)
    embedding = embedding_map(lm.model, lm.tokenizer)
    data = page_data(explanation, lm.tokenizer, described, embedding, page_notes)

    def fill(folder: Path) -> None:
        write_atomically(folder / PAGE, lambda tmp: tmp.write_text(page_html(data), encoding="utf-8"))
        write_pictures(folder, explanation, lm.tokenizer, embedding)

    return write_directory(out, fill, COMMAND, "out"), page_notes


def run(cfg: ExplainConfig) -> Path:
    """Read the text through the model, write the directory, say where; the directory written."""
    out = Path(cfg.out).expanduser() if cfg.out else default_out()
    check_new_directory(out, COMMAND, "out")  # before the model is read
    text, keep = read_text(cfg)
    lm = open_model(cfg, "explaining")
    explanation = lm.explain(text, cfg.candidates, keep)
    for line in provenance(lm):
        print(line, file=sys.stderr)
    written, page_notes = write_explanation(lm, explanation, out)
    for note in page_notes:
        print(f"note: {note}", file=sys.stderr)
    loss = f"; loss {explanation.loss():.3f} nats a token" if len(explanation.tokens) > 1 else ""
    count = len(explanation.tokens)
    print(f"{lm.source.where} read {count} token{'s' * (count != 1)}{loss}")
    pictures = sorted(p.name for p in written.glob("*.png"))
    print(f"wrote {out}: {PAGE} (open it in a browser) and {', '.join(pictures)}")
    return written


@hydra_entry("explain", ExplainConfig)
def main(cfg: DictConfig) -> None:
    """Entry point: compose explain.yaml and write the pictures."""
    run(to_dataclass(cfg, ExplainConfig))


if __name__ == "__main__":
    main()
