"""The config schema: each entry point's options, assembled from the modules that own them.

An option is declared once, next to the code that uses it: the model's shape in
GPTConfig (model.py), the optimizer's in optim.py, the dataset's in data.py,
the device's in device.py, the tracker's in tracking.py. This file only puts
those sections together per entry point and adds the few top-level keys. Hydra
composes YAML from ``conf/`` on top of these dataclasses (nanogpt/cli.py
registers them), so an unknown key or a wrong type fails while composing, and
each dataclass's __post_init__ rejects impossible values before any work.
"""

import dataclasses
from dataclasses import dataclass, make_dataclass
from pathlib import Path
from typing import get_type_hints

from nanogpt.data import DatasetConfig
from nanogpt.device import DeviceConfig
from nanogpt.model import GPTConfig
from nanogpt.optim import OptimizerConfig
from nanogpt.options import check_choices, option, require
from nanogpt.quantize import quantize_option
from nanogpt.tracking import LoggerConfig

PACKAGE_DIR = Path(__file__).resolve().parent


def _resource_dir(name: str) -> Path:
    """A top-level folder of the repository, or its copy inside an installed wheel."""
    inside_package = PACKAGE_DIR / name
    return inside_package if inside_package.is_dir() else PACKAGE_DIR.parent / name


CONFIG_DIR = _resource_dir("conf")
EXPERIMENTS_DIR = _resource_dir("experiments")


def _model_schema() -> type:
    """ModelConfig: GPTConfig's options minus vocab_size (the data decides it), plus init_from.

    Derived rather than written out, so a new model option needs no edit here;
    its checks run by building the GPTConfig it describes.
    """
    hints = get_type_hints(GPTConfig)
    fields = [(f.name, hints[f.name], dataclasses.field(default=f.default, metadata=f.metadata))
              for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"]
    fields.append(("init_from", str | None, option(
        None, "start from pretrained weights: gpt2 | gpt2-medium | gpt2-large | gpt2-xl or a "
              "directory; the shape then comes from the weights")))

    def __post_init__(self) -> None:
        model = self.gpt_config(vocab_size=1)
        require(self.init_from is None or not model.variants,
                f"init_from={self.init_from} loads GPT-2's architecture; drop "
                + " ".join(f"model.{k}={v}" for k, v in model.variants.items()))

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        """The GPTConfig of this shape for a vocabulary of vocab_size."""
        shape = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "init_from"}
        return GPTConfig(vocab_size=vocab_size, **shape)

    return make_dataclass("ModelConfig", fields, namespace={
        "__module__": __name__, "__post_init__": __post_init__, "gpt_config": gpt_config,
        "__doc__": "The GPT's shape and switches (model.py's GPTConfig) as model.KEY options."})


ModelConfig = _model_schema()


@dataclass
class TrainConfig:
    """Everything a training run needs."""

    model: ModelConfig = option(default_factory=ModelConfig)
    dataset: DatasetConfig = option(default_factory=DatasetConfig)
    optimizer: OptimizerConfig = option(default_factory=OptimizerConfig)
    device: DeviceConfig = option(default_factory=DeviceConfig)
    logger: LoggerConfig = option(default_factory=LoggerConfig)
    data_root: str = option("~/.cache/nanogpt", "shared cache of prepared datasets (env NANOGPT_DATA_ROOT)")
    seed: int = option(1337, "seeds every random generator of the run")
    batch_size: int = option(64, "sequences per micro-batch")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step (the job's total)")
    max_iters: int = option(5000, "optimizer steps")
    eval_interval: int = option(250, "evaluate (and checkpoint) every this many steps")
    eval_iters: int = option(200, "batches averaged per evaluation and split")
    eval_at_start: bool = option(True, "also evaluate before the first step (the untrained loss); "
                                       "false saves that time, as a speedrun does")
    log_interval: int = option(10, "log a training line every this many steps")
    sample_tokens: int = option(200, "length of the sample printed at the end; 0 skips it")
    save_checkpoints: bool = option(True, "write best.pt and last.pt into the run directory")
    resume: str | None = option(None, "a run directory or its last.pt: continue that run exactly")
    auto_resume: bool = option(False, "if the run directory already holds last.pt, continue from it")

    def __post_init__(self):
        counts = ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval")
        for name in counts:
            require(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be at least 1")
        require(self.max_iters >= 0, f"max_iters={self.max_iters} must be >= 0")


@dataclass
class SampleConfig:
    """Generation from a checkpoint."""

    ckpt: str | None = option(None, "run dir, .pt file, nanoGPT out_dir/ckpt.pt, Hugging Face dir or "
                                    "gpt2 | gpt2-medium | ...; null: newest run under `outputs`")
    meta: str | None = option(None, "karpathy/nanoGPT checkpoints: their meta.pkl, when it is not "
                                    "data/<dataset>/meta.pkl under the current directory")
    outputs: str = option("outputs", "where to look for the newest run")
    prompt: str = option("\n", "text the samples continue")
    prompt_file: str | None = option(None, "read the prompt from this file instead")
    num_samples: int = option(1, "how many samples to draw")
    num_tokens: int = option(500, "new tokens per sample")
    temperature: float = option(0.8, "0: always the likeliest token; higher: more varied")
    top_k: int | None = option(200, "sample only among the k likeliest tokens; null: all")
    top_p: float | None = option(None, "nucleus sampling, e.g. 0.9; null: off")
    seed: int = option(1337, "seeds the sampling")
    use_cache: bool = option(True, "KV cache: each new token costs one position, not the whole context")
    quantize: str | None = quantize_option()
    device: DeviceConfig = option(default_factory=DeviceConfig)

    def __post_init__(self):
        check_choices(self)
        require(self.temperature >= 0,
                f"temperature={self.temperature} must be >= 0 (0 picks the likeliest token)")
        require(self.top_k is None or self.top_k >= 1,
                f"top_k={self.top_k} must be at least 1, or null for no top-k filter")
        require(self.top_p is None or 0 < self.top_p <= 1,
                f"top_p={self.top_p} must be in (0, 1], or null for no nucleus filter")
        require(self.num_tokens >= 0 and self.num_samples >= 1,
                "num_tokens must be >= 0 and num_samples >= 1")


@dataclass
class DataConfig:
    """Preparing a dataset without training."""

    dataset: DatasetConfig = option(default_factory=DatasetConfig)
    data_root: str = option("~/.cache/nanogpt", "shared cache of prepared datasets (env NANOGPT_DATA_ROOT)")
