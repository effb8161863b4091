"""GPT-2-scale recipes and the SLURM launcher preset compose, validate and (in small) run."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from nanogpt.cli import register_configs, to_dataclass
from nanogpt.config import CONFIG_DIR, TrainConfig
from tests.conftest import run_module
from tests.test_gpt2 import random_hf_model


def composed(overrides: list[str], hydra_config: bool = False):
    """conf/train.yaml composed by Hydra with overrides."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra_config)


@pytest.mark.parametrize("recipe", ["finetune_shakespeare", "gpt2_124m", "eval_gpt2", "eval_gpt2_medium",
                                    "eval_gpt2_large", "eval_gpt2_xl"])
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
    result = run_module("nanogpt.train", "hydra/launcher=slurm_ddp", "hydra.launcher.partition=gpu",
                        "--cfg", "hydra", "--package", "hydra.launcher", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "SlurmLauncher" in result.stdout and "partition: gpu" in result.stdout


def test_eval_recipe_evaluates_pretrained_weights_without_training(
    tmp_path, shakespeare, data_root, bpe_cache
):
    random_hf_model(tmp_path / "hf", vocab_size=50257)
    result = run_module(
        "nanogpt.train", "+experiment=eval_gpt2", "device=cpu", f"model.init_from={tmp_path / 'hf'}",
        "model.block_size=16", "dataset=shakespeare", f"dataset.source={shakespeare}",
        f"data_root={data_root}", "batch_size=2", "eval_iters=2", "hydra.run.dir=run", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "eval 0: train loss" in result.stdout
    assert "iter 0:" not in result.stdout
    assert not list((tmp_path / "run").glob("*.pt"))
