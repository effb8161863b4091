"""GPT-2-scale recipes and the SLURM launcher preset compose, validate and (in small) run."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from nanogpt.cli.entry import to_dataclass
from nanogpt.cli.paths import CONFIG_DIR
from nanogpt.training.config import TrainConfig
from tests.commands import run_in_process
from tests.conftest import register_commands
from tests.test_gpt2 import random_hf_model


def composed(overrides: list[str], hydra_config: bool = False):
    """conf/train.yaml composed by Hydra with overrides."""
    register_commands()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra_config)


@pytest.mark.parametrize("recipe", ["finetune_shakespeare", "gpt2_124m"])
def test_gpt2_recipes_compose_and_validate(recipe):
    config = to_dataclass(composed([f"+experiment={recipe}"]), TrainConfig)
    assert config.dataset.tokenizer == "gpt2"
    assert config.model.vocab_multiple == 64


def test_gpt2_124m_recipe_steps_half_a_million_tokens():
    cfg = composed(["+experiment=gpt2_124m"])
    assert cfg.batch_size * cfg.model.block_size * cfg.gradient_accumulation_steps == 491_520
    assert (cfg.max_iters, cfg.dataset.name, cfg.model.n_layer) == (600_000, "openwebtext", 12)


def test_finetune_recipe_starts_from_gpt2_xl():
    cfg = composed(["+experiment=finetune_shakespeare"])
    assert cfg.model.init_from == "gpt2-xl" and cfg.dataset.name == "shakespeare"
    assert cfg.optimizer.decay_lr is False


def test_slurm_ddp_launcher_preset_composes_onto_submitit():
    cfg = composed(["hydra/launcher=slurm_ddp", "hydra.launcher.nodes=2"], hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8
    assert launcher.nodes == 2
    assert launcher.submitit_folder.endswith(".submitit/%j")


def test_slurm_ddp_launcher_resolves_from_the_command_line(tmp_path):
    result = run_in_process("nanogpt.train", "hydra/launcher=slurm_ddp", "hydra.launcher.partition=gpu",
                            "--cfg", "hydra", "--package", "hydra.launcher", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "SlurmLauncher" in result.stdout and "partition: gpu" in result.stdout


@pytest.mark.parametrize("size", ["", "-medium", "-large", "-xl"])
def test_eval_recipes_compose_for_the_eval_entry_point(size):
    from nanogpt.eval import EvalConfig

    register_commands()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=[f"+experiment=eval_gpt2{size.replace('-', '_')}"])
    config = to_dataclass(cfg, EvalConfig)
    assert (config.ckpt, config.dataset.name) == (f"gpt2{size}", "openwebtext")
    assert config.dataset.tokenizer == "gpt2"


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_eval_recipe_scores_pretrained_weights(tmp_path, corpus, data_root, bpe_cache):
    """The recipe with a local GPT-2-shaped directory in place of the Hub and a small BPE text."""
    random_hf_model(tmp_path / "hf", vocab_size=50257)
    result = run_in_process(
        "nanogpt.eval", "+experiment=eval_gpt2", "device=cpu", f"ckpt={tmp_path / 'hf'}", "dataset=text",
        f"dataset.source={corpus}", "dataset.name=toy_bpe", "dataset.tokenizer=gpt2",
        f"data_root={data_root}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    scored = json.loads(result.stdout.strip().splitlines()[-1])
    assert scored["windows"] > 5 and scored["tokens"] == 64 * scored["windows"] and scored["loss"] > 0
    assert "bits_per_char" not in scored  # a BPE token is not one character
