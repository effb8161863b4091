"""What a training run is: TrainConfig, assembled from the sections their own modules declare.

An option is declared once, next to the code that uses it: the model's shape in
GPTConfig (model.py), the optimizer's in optim.py, the dataset's in
dataset/config.py, the device's in runtime/device.py, the logger's in
tracking/loggers.py, LoRA's in weights/lora.py. Here they are put together
with the few top-level keys. The Hydra edge (nanogpt/cli) composes YAML from
``conf/`` over these dataclasses, so an unknown key or a wrong type fails while
composing, and each dataclass's __post_init__ rejects impossible values before any work; a config
built in Python is checked the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from nanogpt.dataset.config import DatasetConfig, data_root_option
from nanogpt.evaluation.registry import TASKS, TRAINING_TASKS, TaskSettings
from nanogpt.model import GPTConfig
from nanogpt.options import check_choices, option, require
from nanogpt.runtime.device import DeviceConfig
from nanogpt.runtime.distributed import DistributedConfig
from nanogpt.tracking.loggers import LoggerConfig
from nanogpt.training.objectives import LOADER_OF, ObjectiveConfig
from nanogpt.training.optim import OptimizerConfig
from nanogpt.weights.loading import require_source_packages
from nanogpt.weights.lora import LoraConfig


@dataclass
class ModelConfig(GPTConfig):
    """The ``model`` options: GPTConfig's shape and switches, and where the weights start from.

    The vocabulary is the dataset's, so vocab_size is not set here: gpt_config()
    builds the model's GPTConfig once the data is prepared.
    """

    vocab_size: int | None = option(None, "the dataset's tokenizer decides it; leave it unset")
    init_from: str | None = option(
        None, "start from pretrained weights: gpt2 | gpt2-medium | gpt2-large | gpt2-xl, a run directory, "
              "a Hugging Face or nanoGPT directory; the shape then comes from the weights")

    def __post_init__(self) -> None:
        check_choices(self)
        require(self.vocab_size is None,
                f"vocab_size={self.vocab_size}: the vocabulary comes from the dataset's tokenizer; drop it "
                "(model.vocab_multiple rounds it up)")
        model = self.gpt_config(vocab_size=1)  # GPTConfig's own checks
        require(self.init_from is None or not model.variants,
                f"init_from={self.init_from} loads GPT-2's architecture; drop "
                + " ".join(f"model.{k}={v}" for k, v in model.variants.items()))

    def require_packages(self) -> None:
        """init_from a Hugging Face directory or a GPT-2 name needs the hf extra's packages."""
        require_source_packages(self.init_from, key="model.init_from")

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        """The GPTConfig of this shape for a vocabulary of vocab_size."""
        shape = {f.name: getattr(self, f.name) for f in fields(GPTConfig) if f.name != "vocab_size"}
        return GPTConfig(vocab_size=vocab_size, **shape)


@dataclass
class TrainConfig:
    """Everything a training run needs."""

    model: ModelConfig = option(default_factory=ModelConfig)
    dataset: DatasetConfig = option(default_factory=DatasetConfig)
    optimizer: OptimizerConfig = option(default_factory=OptimizerConfig)
    device: DeviceConfig = option(default_factory=DeviceConfig)
    distributed: DistributedConfig = option(default_factory=DistributedConfig)
    logger: LoggerConfig = option(default_factory=LoggerConfig)
    lora: LoraConfig = option(default_factory=LoraConfig)
    objective: ObjectiveConfig = option(default_factory=ObjectiveConfig)
    data_root: str = data_root_option()
    seed: int = option(1337, "seeds every random generator of the run")
    batch_size: int = option(64, "sequences per micro-batch")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step (the job's total)")
    max_iters: int = option(5000, "optimizer steps")
    eval_interval: int = option(250, "evaluate (and checkpoint) every this many steps")
    eval_iters: int = option(200, "batches averaged per evaluation and split")
    eval_at_start: bool = option(True, "also evaluate before the first step (the untrained loss); "
                                       "false saves that time, as a speedrun does")
    eval_tasks: list[str] = option(default_factory=list, help="benchmarks scored at every evaluation besides "
                                   f"the loss, e.g. [bpb,hellaswag]: {' | '.join(TRAINING_TASKS)}")
    tasks: TaskSettings = option(default_factory=TaskSettings)
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
        unknown = [name for name in self.eval_tasks if name not in TRAINING_TASKS]
        require(not unknown, f"eval_tasks: {', '.join(unknown)} is not one of {', '.join(TRAINING_TASKS)}")
        # LoRA trains a few adapters on frozen weights: its gradients and optimizer state are already small.
        require(not (self.lora.rank and self.distributed.strategy == "fsdp"),
                f"lora.rank={self.lora.rank} with distributed.strategy=fsdp: LoRA keeps gradients and "
                "optimizer state for its adapters alone (GPT-2 XL's frozen weights take 3.1 GB in bfloat16), "
                "so there is little to shard; use distributed.strategy=ddp")

        objective, loader = self.objective.name, self.dataset.loader
        needed = LOADER_OF.get(objective)
        require(needed is None or loader == needed,
                f"objective={objective} learns from dataset={needed} (dataset.loader={needed}), not "
                f"dataset.loader={loader}; docs/finetuning.md says what each objective reads")
        wanted = next((k for k, v in LOADER_OF.items() if v == loader), objective)
        require(objective == wanted, f"dataset.loader={loader} holds data for objective={wanted}: add "
                                     f"objective={wanted} (or learn answers with dataset=sft)")

    def require_packages(self) -> None:
        """The optional packages eval_tasks need (lm_eval: lm-eval), checked before any work."""
        for name in self.eval_tasks:
            TASKS[name]().require_packages(f"eval_tasks=[{name}]")
