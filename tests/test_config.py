"""Config composition with real Hydra, and bad input through the real entry points."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from nanogpt.bench import BenchConfig
from nanogpt.cli.entry import register_configs, to_dataclass
from nanogpt.cli.paths import CONFIG_DIR, EXPERIMENTS_DIR
from nanogpt.errors import ConfigError
from nanogpt.sample import SampleConfig
from nanogpt.training.config import TrainConfig

from .commands import run_in_process
from .conftest import run_module

GROUPS = ["model", "dataset", "optimizer", "device", "logger", "objective"]
# Recipes for training; eval recipes (they name a ckpt to score) compose with conf/eval.yaml instead.
TRAIN_RECIPES = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml") if "ckpt" not in OmegaConf.load(p))


def compose_train(overrides: list[str], config_name: str = "train", schema: type = TrainConfig):
    register_configs(config_name, schema)  # as the command registers its own when it starts
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    return to_dataclass(cfg, schema)


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


# What an option needs beside it: a source to read, and the objective its data is for (or the reverse).
PAIRS, PROMPTS = ["dataset.source=/some/pairs.jsonl"], ["dataset.source=/some/prompts.jsonl"]
COMPANIONS = {("dataset", "text"): ["dataset.source=/some/file.txt"],
              ("dataset", "sft"): ["dataset.source=/some/file.txt"],
              ("dataset", "preference"): [*PAIRS, "objective=dpo"],
              ("dataset", "prompts"): [*PROMPTS, "objective=grpo"],
              ("objective", "dpo"): ["dataset=preference", *PAIRS],
              ("objective", "grpo"): ["dataset=prompts", *PROMPTS]}


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in group_options(g)]
)
def test_every_group_option_composes(group, option):
    overrides = [f"{group}={option}", *COMPANIONS.get((group, option), [])]
    cfg = compose_train(overrides)
    assert getattr(cfg, group).name if group != "model" else cfg.model.n_layer > 0


def test_defaults_are_the_small_baby_gpt():
    cfg = compose_train([])
    assert (cfg.model.block_size, cfg.batch_size) == (256, 64)
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (6, 6, 384)
    assert cfg.optimizer.lr == 3e-4 and cfg.max_iters == 5000
    assert cfg.optimizer.warmup_iters == 100 and cfg.model.dropout == 0.1
    assert cfg.dataset.name == "shakespeare_char" and cfg.device.name == "auto"


def test_tiny_is_the_cpu_size():
    m = compose_train(["model=tiny"]).model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (4, 4, 128, 64)


@pytest.mark.parametrize("recipe", TRAIN_RECIPES)
def test_every_experiment_composes(recipe):
    compose_train([f"+experiment={recipe}"])


@pytest.mark.parametrize("recipe", TRAIN_RECIPES)
def test_every_experiment_composes_for_the_benchmark(recipe):
    compose_train([f"+experiment={recipe}"], config_name="bench", schema=BenchConfig)


def test_cpu_recipe_is_nanogpts():
    cfg = compose_train(["+experiment=shakespeare_char_cpu"])
    m, o = cfg.model, cfg.optimizer
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (4, 4, 128, 64, 0.0)
    assert (cfg.batch_size, cfg.max_iters, o.lr, o.min_lr, o.beta2) == (12, 2000, 1e-3, 1e-4, 0.99)
    assert cfg.device.name == "cpu"


def test_gpu_recipe_is_nanogpts():
    cfg = compose_train(["+experiment=shakespeare_char"])
    assert (cfg.model.n_embd, cfg.model.block_size, cfg.model.dropout) == (384, 256, 0.2)
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.optimizer.beta2) == (1e-3, 1e-4, 0.99)


def test_validation_names_the_key():
    with pytest.raises(ConfigError, match="model.n_embd=100"):
        compose_train(["model.n_embd=100"])


def test_sample_config_composes():
    register_configs("sample", SampleConfig)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="sample", overrides=["prompt=ROMEO:", "top_p=0.9"])
    sample = to_dataclass(cfg, SampleConfig)
    assert isinstance(sample, SampleConfig) and sample.meta is None
    assert sample.prompt == "ROMEO:" and sample.top_p == 0.9 and sample.ckpt is None


BAD_TRAIN_INPUTS = [
    (["model=huge"], "model=huge is not an option; choose one of: "
                     "gpt2, gpt2-large, gpt2-medium, gpt2-xl, medium, small, tiny"),
    (["model.foo=1"], "unknown key 'model.foo'"),
    (["+foo=1"], "unknown key 'foo'"),
    (["model.n_layer=abc"], "model.n_layer"),
    (["model.n_embd=100"], "model.n_embd=100 is not divisible by n_head=6"),
    (["optimizer.lr=-1"], "optimizer.lr=-1.0 must be positive"),
    (["device=cuda"], "device=cuda"),
    (["device=mps"], "device=mps"),
    (["dataset=text"], "dataset.source"),
    (["dataset=text", "dataset.source=/no/such/file.txt"], "/no/such/file.txt does not exist"),
    (["dataset.source=http://127.0.0.1:9/input.txt"], "could not download http://127.0.0.1:9/input.txt"),
    (["model.block_size=200000", "dataset=text", "dataset.source={corpus}"], "model.block_size=200000"),
]


@pytest.mark.parametrize("args,expected", BAD_TRAIN_INPUTS, ids=[" ".join(a) for a, _ in BAD_TRAIN_INPUTS])
def test_bad_train_input_fails_with_one_clear_line(args, expected, tmp_path, corpus, data_root):
    import torch

    if any("device=cuda" in a for a in args) and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if any("device=mps" in a for a in args) and torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    run_dir = tmp_path / "run"
    args = [a.format(corpus=corpus) for a in args]
    # The first row in a real process, the others in this one (tests/commands.py).
    run = run_module if args == BAD_TRAIN_INPUTS[0][0] else run_in_process
    result = run(
        "nanogpt.train", *args, f"data_root={data_root}", f"hydra.run.dir={run_dir}",
        "max_iters=1", cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not run_dir.exists()  # no half-made run directory


def test_help_lists_groups_and_options(tmp_path):
    result = run_in_process("nanogpt.train", "--help", cwd=tmp_path)
    assert result.returncode == 0
    for word in ("model: gpt2, gpt2-large, gpt2-medium, gpt2-xl, medium, small, tiny",
                 "device: auto, cpu, cuda, mps", "experiment:"):
        assert word in result.stdout


def test_cfg_job_prints_the_composed_config(tmp_path):
    result = run_in_process("nanogpt.train", "model=tiny", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0
    assert "n_embd: 128" in result.stdout and "batch_size: 64" in result.stdout


def test_experiment_found_from_any_directory(tmp_path):
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    result = run_in_process("nanogpt.train", "+experiment=shakespeare_char_cpu", "--cfg", "job",
                            cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert "batch_size: 12" in result.stdout
    assert Path(CONFIG_DIR).is_dir()


def test_help_explains_every_key_with_the_values_the_command_line_would_use(tmp_path):
    result = run_in_process("nanogpt.train", "model=tiny", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "model: gpt2, gpt2-large" in text and "+experiment: " in text
    assert "model.n_layer: int = 4" in text  # tiny's value, not the schema default
    assert "width of the residual stream" in text  # GPTConfig's own words
    assert "[learned | rope]" in text and "optimizer.muon_lr" in text


@pytest.mark.parametrize("entry", ["sample", "eval", "export", "data", "bench"])
def test_every_entry_point_explains_its_keys(entry, tmp_path):
    # Real processes: the other --help tests here run the command in this one (tests/commands.py).
    result = run_module(f"nanogpt.{entry}", "--help", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith(f"python -m nanogpt.{entry}"), result.stderr
    keys = result.stdout.split("Keys")[1].splitlines()[1:]
    assert keys and all(line.startswith("      ") for line in keys[1:-3:2])  # each key has its meaning


def test_sample_help_lists_only_the_groups_sampling_uses(tmp_path):
    result = run_in_process("nanogpt.sample", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    groups = result.stdout.split("Keys")[0]
    assert "device: auto" in groups and "optimizer" not in groups and "dataset" not in groups
    assert "temperature: float = 0.8" in result.stdout


def test_every_option_has_a_meaning():
    from nanogpt.eval import EvalConfig
    from nanogpt.explain import ExplainConfig
    from nanogpt.export import ExportConfig
    from nanogpt.options import describe_options

    for schema in (TrainConfig, SampleConfig, BenchConfig, EvalConfig, ExportConfig, ExplainConfig):
        missing = [key for key, _, _, meaning in describe_options(schema) if not meaning]
        assert not missing, missing
