"""The config schema: what every key means, its type and its default.

Hydra composes YAML from ``conf/`` on top of these dataclasses, so an unknown
key or a value of the wrong type fails while composing, before any work.
validate_train_config() then checks what types cannot express (n_embd must
divide by n_head, rates must be positive, ...). Entry points turn the composed
DictConfig into these plain dataclasses with OmegaConf.to_object(); code below
the entry points never sees Hydra.
"""

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from nanogpt.data import DatasetConfig
from nanogpt.errors import ConfigError
from nanogpt.model import VARIANT_SWITCHES

PACKAGE_DIR = Path(__file__).resolve().parent


def _resource_dir(name: str) -> Path:
    """A top-level folder of the repository, or its copy inside an installed wheel."""
    inside_package = PACKAGE_DIR / name
    return inside_package if inside_package.is_dir() else PACKAGE_DIR.parent / name


CONFIG_DIR = _resource_dir("conf")
EXPERIMENTS_DIR = _resource_dir("experiments")


@dataclass
class ModelConfig:
    """Shape of the GPT (the vocabulary size comes from the dataset)."""

    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 256
    dropout: float = 0.1
    bias: bool = True
    vocab_multiple: int = 1  # round the vocabulary up to a multiple of this (64 for GPT-2 BPE on GPUs)
    gelu_approximate: str = "none"  # none: exact GELU; tanh: GPT-2's approximation
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more compute
    # Architecture variants, all off by default (GPT-2's architecture); README "Model options":
    position_encoding: str = "learned"  # learned: GPT-2's position table; rope: rotary positions
    norm: str = "layernorm"  # layernorm | rmsnorm
    qk_norm: bool = False  # RMS-normalise queries and keys per head
    activation: str = "gelu"  # gelu | relu2 (squared ReLU)
    # Start from pretrained GPT-2 weights: gpt2 | gpt2-medium | gpt2-large | gpt2-xl (from the
    # Hugging Face Hub) or a directory with config.json + model.safetensors. The shape then comes
    # from the weights; block_size (crop), dropout and the switches above still apply.
    init_from: str | None = None


@dataclass
class OptimizerConfig:
    """AdamW (or Muon for hidden matrices) with linear warmup then cosine decay to min_lr."""

    name: str = "adamw"  # adamw | muon
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    warmup_iters: int = 100
    decay_lr: bool = True
    lr_decay_iters: int | None = None  # where the cosine reaches min_lr; None means max_iters
    muon_lr: float = 0.02  # optimizer=muon: peak learning rate of the blocks' matrices
    muon_momentum: float = 0.95


@dataclass
class DeviceConfig:
    """Which device to run on and how: precision and compilation."""

    name: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool | None = None  # None: torch.compile on CUDA only
    peak_flops: float | None = None  # for MFU; None: looked up from the GPU's name


@dataclass
class LoggerConfig:
    """Experiment tracking (nanogpt/tracking.py). metrics.jsonl in the run directory is always written."""

    name: str = "wandb"  # wandb | tensorboard | none
    mode: str = "offline"  # W&B: offline | online | disabled (conf/logger/wandb.yaml reads WANDB_MODE)
    project: str = "nanogpt"  # W&B project (conf/logger/wandb.yaml reads WANDB_PROJECT)
    entity: str | None = None  # W&B team or user; None: your default entity
    group: str | None = None  # None: the sweep's name in a multirun, no group otherwise
    run_name: str | None = None  # None: from the job's overrides
    tags: list[str] = field(default_factory=list)
    run_id: str | None = None  # resume this W&B run (by id) instead of starting a new one
    init_timeout: float = 10.0  # seconds to wait for W&B before falling back to offline


@dataclass
class TrainConfig:
    """Everything a training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    data_root: str = "~/.cache/nanogpt"  # shared cache of prepared datasets
    seed: int = 1337
    batch_size: int = 64  # sequences per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_iters: int = 5000  # optimizer steps
    eval_interval: int = 250  # evaluate (and checkpoint) every this many steps
    eval_iters: int = 200  # batches averaged per evaluation and split
    log_interval: int = 10
    sample_tokens: int = 200  # length of the sample printed at the end; 0 skips it
    save_checkpoints: bool = True
    resume: str | None = None  # a run directory or its last.pt: continue that run exactly
    auto_resume: bool = False  # if the run directory already holds last.pt, continue from it


@dataclass
class SampleConfig:
    """Generation from a checkpoint."""

    ckpt: str | None = None  # checkpoint file or run dir; None: newest run under outputs/
    outputs: str = "outputs"  # where to look for the newest run
    prompt: str = "\n"
    prompt_file: str | None = None  # read the prompt from this file instead
    num_samples: int = 1
    num_tokens: int = 500
    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None
    seed: int = 1337
    use_cache: bool = True
    device: DeviceConfig = field(default_factory=DeviceConfig)


@dataclass
class DataConfig:
    """Preparing a dataset without training."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    data_root: str = "~/.cache/nanogpt"


def register_configs() -> None:
    """Register the schemas and the experiment recipes with Hydra's ConfigStore.

    Recipes live in the top-level experiments/ folder rather than conf/, so they
    are registered here as the ``experiment`` group; ``+experiment=NAME`` then
    works from any directory and from an installed wheel.
    """
    from nanogpt.sweeps import register_resolvers  # sweep directory names use a resolver

    register_resolvers()
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="sample_schema", node=SampleConfig)
    store.store(name="data_schema", node=DataConfig)
    for recipe in sorted(EXPERIMENTS_DIR.glob("*.yaml")):
        store.store(
            group="experiment", name=recipe.stem, node=OmegaConf.load(recipe), package="_global_"
        )


def validate_train_config(cfg: TrainConfig) -> None:
    """Raise ConfigError naming the first key whose value cannot work."""
    m, o = cfg.model, cfg.optimizer
    variants = [f"model.{name}={getattr(m, name)}" for name in VARIANT_SWITCHES
                if getattr(m, name) != getattr(ModelConfig, name)]
    checks = [
        (m.n_head > 0, f"model.n_head={m.n_head} must be at least 1"),
        (m.n_head <= 0 or m.n_embd % m.n_head == 0,
         f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}; "
         "pick n_embd as a multiple of n_head"),
        (m.n_layer > 0, f"model.n_layer={m.n_layer} must be at least 1"),
        (m.block_size > 0, f"model.block_size={m.block_size} must be at least 1"),
        (0 <= m.dropout < 1, f"model.dropout={m.dropout} must be in [0, 1)"),
        (m.vocab_multiple >= 1, f"model.vocab_multiple={m.vocab_multiple} must be at least 1"),
        (m.gelu_approximate in ("none", "tanh"),
         f"model.gelu_approximate={m.gelu_approximate!r} must be none or tanh"),
        (m.position_encoding in ("learned", "rope"),
         f"model.position_encoding={m.position_encoding!r} must be learned or rope"),
        (m.position_encoding != "rope" or (m.n_embd // max(m.n_head, 1)) % 2 == 0,
         f"model.position_encoding=rope needs an even head size, but n_embd/n_head = {m.n_embd}/{m.n_head}"),
        (m.norm in ("layernorm", "rmsnorm"), f"model.norm={m.norm!r} must be layernorm or rmsnorm"),
        (m.activation in ("gelu", "relu2"), f"model.activation={m.activation!r} must be gelu or relu2"),
        (m.init_from is None or not variants,
         f"model.init_from={m.init_from} loads GPT-2's architecture; drop {' '.join(variants)}"),
        (o.lr > 0, f"optimizer.lr={o.lr} must be positive"),
        (0 <= o.min_lr <= o.lr, f"optimizer.min_lr={o.min_lr} must be between 0 and optimizer.lr={o.lr}"),
        (o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay} must be >= 0"),
        (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optimizer.beta1 and optimizer.beta2 must be in [0, 1)"),
        (o.grad_clip >= 0, f"optimizer.grad_clip={o.grad_clip} must be >= 0 (0 disables clipping)"),
        (o.warmup_iters >= 0, f"optimizer.warmup_iters={o.warmup_iters} must be >= 0"),
        (o.lr_decay_iters is None or o.lr_decay_iters > o.warmup_iters,
         f"optimizer.lr_decay_iters={o.lr_decay_iters} must be larger than warmup_iters"),
        (o.name in ("adamw", "muon"), f"optimizer.name={o.name!r} is not supported; use adamw or muon"),
        (o.muon_lr > 0, f"optimizer.muon_lr={o.muon_lr} must be positive"),
        (cfg.batch_size > 0, f"batch_size={cfg.batch_size} must be at least 1"),
        (cfg.gradient_accumulation_steps > 0,
         f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be at least 1"),
        (cfg.max_iters >= 0, f"max_iters={cfg.max_iters} must be >= 0"),
        (cfg.eval_interval > 0, f"eval_interval={cfg.eval_interval} must be at least 1"),
        (cfg.eval_iters > 0, f"eval_iters={cfg.eval_iters} must be at least 1"),
        (cfg.log_interval > 0, f"log_interval={cfg.log_interval} must be at least 1"),
        (cfg.logger.name in ("wandb", "tensorboard", "none"),
         f"logger.name={cfg.logger.name!r} is not one of wandb, tensorboard, none"),
        (cfg.logger.mode in ("offline", "online", "disabled", "dryrun", "run"),
         f"logger.mode={cfg.logger.mode!r} is not one of offline, online, disabled"),
        (cfg.device.dtype in ("auto", "float32", "bfloat16", "float16"),
         f"device.dtype={cfg.device.dtype!r} is not one of auto, float32, bfloat16, float16"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
