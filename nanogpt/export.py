"""Export a checkpoint as a Hugging Face GPT-2 model: ``python -m nanogpt.export ckpt=RUN out=DIR``.

The directory holds config.json and model.safetensors, so
``transformers.GPT2LMHeadModel.from_pretrained(DIR)`` loads it and computes the
same logits as our model (a LoRA run: its adapters merged into the base). GPT-2
BPE models also get GPT-2's tokenizer files. ``adapter_only=true`` writes a LoRA
run's adapters alone, as a PEFT adapter directory for its base model.
A character-level vocabulary matches no Hugging Face tokenizer: its characters
are kept in nanogpt_tokenizer.json (``model.init_from=DIR`` reads it back), and
text must be turned into ids with it by hand.

out= is a new or empty directory, or one an earlier export wrote (it records
its files there); anything else is refused before any work, naming what is in
it. The export is written beside out and moved into place once complete, so an
export that fails or is stopped leaves out as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING, DictConfig

from nanogpt.cli.entry import hydra_entry, to_dataclass
from nanogpt.errors import require_package
from nanogpt.fileio import check_new_directory
from nanogpt.options import option
from nanogpt.weights.checkpoint import find_checkpoint, load_checkpoint
from nanogpt.weights.huggingface import EXPORT_COMMAND, export_adapter, export_model, require_export_packages
from nanogpt.weights.loading import require_source_packages, resolve_source


@dataclass
class ExportConfig:
    """What to export and where."""

    ckpt: str = option(MISSING, "any source sample takes: a run dir (its best.pt, else last.pt), a .pt "
                             "file, nanoGPT's out_dir, a Hugging Face dir")
    out: str = option(MISSING, "the Hugging Face model directory to write: new, empty, or an earlier export "
                             "(which it replaces)")
    adapter_only: bool = option(False, "a LoRA run: write only its adapters, as a PEFT adapter directory "
                                       "(adapter_config.json, adapter_model.safetensors) for its base model")

    def require_packages(self) -> None:
        require_export_packages()
        require_source_packages(self.ckpt)
        if self.adapter_only:
            require_package("peft", "peft", "nanogpt.export adapter_only=true", "peft")


@hydra_entry("export", ExportConfig)
def main(cfg: DictConfig) -> None:
    """Entry point: export cfg.ckpt to cfg.out and say what was written."""
    config = to_dataclass(cfg, ExportConfig)
    check_new_directory(Path(config.out), EXPORT_COMMAND, "out")  # before the model is read
    if config.adapter_only:
        path = find_checkpoint(config.ckpt)
        out = export_adapter(load_checkpoint(path), config.out, where=str(path))
        base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
        print(f"wrote a PEFT LoRA adapter to {out}, for the base {base}: "
              f"PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(BASE), '{out}'), where BASE is "
              "that base as a Hugging Face directory (a run of ours: python -m nanogpt.export ckpt=BASE "
              "out=DIR)")
        return
    loaded = resolve_source(config.ckpt, key="ckpt")
    out = export_model(loaded.model, loaded.tokenizer, config.out, where=loaded.where)
    print(f"wrote a Hugging Face GPT-2 model to {out}")
    if loaded.tokenizer.kind == "char":
        print("note: its character vocabulary matches no Hugging Face tokenizer; "
              "map text to ids with nanogpt_tokenizer.json")
    elif (out / "vocab.json").is_file() or (out / "tokenizer.json").is_file():
        print("with its tokenizer: AutoTokenizer.from_pretrained works on it")
    else:
        print("tokenizer: GPT-2's BPE (AutoTokenizer.from_pretrained('gpt2') matches it)")


if __name__ == "__main__":
    main()
