"""Preference tuning (objective=dpo) and RL from a reward the user writes (objective=grpo).

The losses are checked against the papers' formulas written out here, on the same
log-probabilities; the objectives' log-probabilities against a plain forward pass;
the data, the reward's loading and its failures, and whole runs (in-process, on a
random character-level GPT-2 and the reverse task) that record what they measure,
pick best.pt by it, resume exactly and load like any run.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import nanogpt
from nanogpt.cli.resume import check_resume_compatible
from nanogpt.dataset.batches import BatchSampler
from nanogpt.dataset.config import DatasetConfig
from nanogpt.dataset.pipeline import prepare_dataset
from nanogpt.errors import ConfigError, DataError
from nanogpt.model import GPT, GPTConfig
from nanogpt.runtime.device import DeviceConfig
from nanogpt.text.tokenizers import load_tokenizer
from nanogpt.tracking.loggers import LoggerConfig
from nanogpt.training.config import ModelConfig, TrainConfig
from nanogpt.training.objectives import (
    ObjectiveConfig,
    PreferenceObjective,
    base_of,
    dpo_loss,
    group_advantages,
    grpo_loss,
    most_mixed,
    summed_logps,
)
from nanogpt.training.optim import OptimizerConfig
from nanogpt.training.rewards import Reward, RewardError, exact_match
from nanogpt.training.setup import build_trainer
from nanogpt.weights import lora
from nanogpt.weights.checkpoint import load_checkpoint
from tests.commands import run_in_process
from tests.test_lora import make_char_base
from tests.test_sft import CHAR_BASE, write_jsonl

# A run of a few steps on the tiny random base: LoRA (its reference is the base, adapters off).
TINY = ["device=cpu", "logger=none", "model.block_size=64", "model.dropout=0", "dataset.tokenizer=char",
        "lora.rank=4", "lora.dropout=0", "batch_size=4", "max_iters=4", "eval_interval=2", "eval_iters=2",
        "log_interval=2", "sample_tokens=0", "optimizer.lr=1e-2", "optimizer.warmup_iters=0",
        "optimizer.weight_decay=0"]
GRPO = ["dataset=prompts", "dataset.name=reverse_prompts", "objective=grpo", "objective.samples=3",
        "objective.max_new_tokens=6"]
DPO = ["dataset=preference", "dataset.name=reverse_pairs", "objective=dpo"]
# A reward a random model can earn: shorter answers score higher.
SHORT_REWARD = "def score(prompt, answer, example):\n    return -len(answer)\n"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("objectives")


@pytest.fixture(scope="module")
def base(work) -> Path:
    return make_char_base(work / "base")


@pytest.fixture(scope="module")
def task(work) -> Path:
    """The reverse task's prompts (train.jsonl) and preference pairs of a right and a wrong reversal."""
    out = work / "task"
    out.mkdir()
    words = ["".join(chr(97 + (i * 7 + j * 3) % 26) for j in range(3 + i % 3)) for i in range(40)]
    write_jsonl(out / "train.jsonl", [{"prompt": f"reverse: {w}", "response": w[::-1]} for w in words])
    write_jsonl(out / "pairs.jsonl", [{"prompt": f"reverse: {w}", "chosen": w[::-1], "rejected": w}
                                      for w in words])
    (out / "short.py").write_text(SHORT_REWARD)
    return out


def train(work: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run_in_process("nanogpt.train", *TINY, f"data_root={work / 'data'}", *args, cwd=cwd or work)


# ---------------------------------------------------------------- the losses, against the papers


def test_dpo_loss_is_the_papers_formula_within_1e_6():
    """DPO (Rafailov et al. 2023, eq. 7): -log σ(β log(π(y_w)/π_ref(y_w)) - β log(π(y_l)/π_ref(y_l)))."""
    torch.manual_seed(0)
    chosen, rejected, ref_chosen, ref_rejected = (-torch.rand(16, dtype=torch.float64) * 40 for _ in range(4))
    for beta in (0.05, 0.1, 0.5):
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
        for i in range(16):
            margin = beta * (chosen[i] - ref_chosen[i]).item() - beta * (rejected[i] - ref_rejected[i]).item()
            assert abs(losses[i].item() - -math.log(1 / (1 + math.exp(-margin)))) < 1e-6
            assert abs(chosen_rewards[i].item() - beta * (chosen[i] - ref_chosen[i]).item()) < 1e-6
            assert abs(rejected_rewards[i].item() - beta * (rejected[i] - ref_rejected[i]).item()) < 1e-6
    # Where the model is the reference, every pair's loss is log 2, and raising the chosen answer lowers it.
    same = torch.full((3,), -5.0, requires_grad=True)
    losses, _, _ = dpo_loss(same, same.detach(), same.detach(), same.detach(), 0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2)))
    losses.sum().backward()
    assert (same.grad < 0).all()


def test_group_advantages_are_normalised_within_each_prompts_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 3.0, 3.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    advantages = group_advantages(rewards)
    assert torch.allclose(advantages[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.equal(advantages[1], torch.zeros(4))  # all alike: nothing to learn
    assert torch.allclose(advantages[2].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(advantages[2].std(unbiased=False), torch.tensor(1.0), atol=1e-5)


def test_dynamic_sampling_keeps_the_groups_whose_rewards_spread_widest_in_their_order():
    rewards = torch.tensor([[0.0, 0, 0], [0, 1, 0], [1, 1, 1], [1, 0, 1], [0, 0, 1], [0, 1, 1]])
    assert most_mixed(rewards, 2).tolist() == [1, 3]  # spread alike: the first two of the four mixed
    assert most_mixed(rewards, 5).tolist() == [0, 1, 3, 4, 5]
    assert most_mixed(rewards[[0, 2]], 1).tolist() == [0]


def test_the_grpo_loss_is_the_token_mean_policy_gradient_with_a_k3_kl():
    torch.manual_seed(0)
    logps = (-torch.rand(4, 5)).requires_grad_()
    ref_logps = -torch.rand(4, 5)
    advantages = torch.tensor([1.0, -0.5, 0.0, 2.0])
    learned = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 0]]).bool()
    n = learned.sum()
    loss, _ = grpo_loss(logps, advantages, learned)
    assert torch.allclose(loss, -(advantages[:, None] * learned).sum() / n)  # the ratio π/π_old is 1
    loss.backward()
    assert torch.allclose(logps.grad, -advantages[:, None] * learned / n)  # ∇ = -A ∇log π, token-averaged
    beta = 0.3
    loss, kl = grpo_loss(logps, advantages, learned, ref_logps, beta)
    r = ref_logps - logps.detach()
    k3 = (torch.exp(r) - r - 1) * learned
    assert (k3 >= 0).all() and torch.allclose(kl, k3.sum() / n)
    assert torch.allclose(loss, (-(advantages[:, None] * learned) + beta * k3).sum() / n)
    assert grpo_loss(ref_logps, advantages, learned, ref_logps, beta)[1] == 0  # no KL to itself


# ---------------------------------------------------------------- the data


def prepare(path: Path, data_root: Path, loader: str):
    config = DatasetConfig(name=f"{loader}_test", source=str(path), tokenizer="char", loader=loader,
                           val_fraction=0.25)
    return prepare_dataset(config, data_root, load_tokenizer(CHAR_BASE))


def test_both_pair_schemas_prepare_alike_and_only_the_final_answer_is_learned(tmp_path, data_root):
    plain = [{"prompt": f"say {c}", "chosen": c * 2, "rejected": c} for c in "abcd"]
    chat = [{"messages": [{"role": "user", "content": p["prompt"]}],
             "chosen": {"role": "assistant", "content": p["chosen"]},
             "rejected": {"role": "assistant", "content": p["rejected"]}} for p in plain]
    a = prepare(write_jsonl(tmp_path / "plain.jsonl", plain), data_root, "preference")
    b = prepare(write_jsonl(tmp_path / "chat.jsonl", chat), data_root / "b", "preference")
    assert a.meta["pairs"] == {"train": 3, "val": 1} and a.meta["examples"] == {"train": 6, "val": 2}
    for split in ("train", "val"):
        for name in (f"{split}.bin", f"{split}.mask.bin"):
            assert (a.directory / name).read_bytes() == (b.directory / name).read_bytes()
    x, y = BatchSampler(a, 64, 4, torch.device("cpu")).get_batch("train")
    decode = load_tokenizer(CHAR_BASE).decode
    assert len(x) == 8  # 4 pairs: their chosen answers, then their rejected ones
    for i in range(4):
        chosen, rejected = decode(y[i][y[i] >= 0].tolist()), decode(y[i + 4][y[i + 4] >= 0].tolist())
        prompt = decode(x[i][:x[i].tolist().index(decode_id("A"))].tolist())
        assert prompt == decode(x[i + 4][:len(prompt)].tolist())  # one prompt, two answers
        letter = prompt.split("say ")[1][0]
        assert (chosen, rejected) == (f" {letter * 2}\n\n", f" {letter}\n\n")  # the prompt masked


def decode_id(char: str) -> int:
    return load_tokenizer(CHAR_BASE).encode(char)[0]


@pytest.mark.parametrize("pair,message", [
    ({"prompt": "a", "chosen": "b"}, 'a pair needs "prompt" (or "messages"), "chosen" and "rejected"'),
    ({"prompt": "a", "chosen": "b", "rejected": "b"}, '"chosen" and "rejected" are the same answer'),
    ({"prompt": "a", "chosen": 3, "rejected": "b"}, '"chosen" must be a string or'),
    ({"messages": [{"role": "user", "content": "a"}], "chosen": {"role": "user", "content": "b"},
      "rejected": "c"}, '"chosen" must be a string or'),
])
def test_a_bad_pair_is_named_by_file_and_line_and_leaves_nothing(pair, message, tmp_path, data_root):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "x", "chosen": "y", "rejected": "z"}, pair])
    with pytest.raises(DataError) as raised:
        prepare(path, data_root, "preference")
    assert str(raised.value).startswith(f"{path}:2: ") and message in str(raised.value)
    assert "\n" not in str(raised.value) and list(data_root.iterdir()) == []


def test_prompts_end_where_the_answer_begins_and_keep_their_fields(tmp_path, data_root):
    lines = [{"prompt": f"reverse: {w}", "answer": w[::-1], "id": i} for i, w in enumerate(("ab", "cd", "e"))]
    data = prepare(write_jsonl(tmp_path / "prompts.jsonl", [*lines, {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "reverse: ij"}]}]),
        data_root, "prompts")
    from nanogpt.dataset.batches import PromptSet

    prompts, decode = PromptSet(data), load_tokenizer(CHAR_BASE).decode
    seen = []
    for split in ("train", "val"):
        for i in range(prompts.count(split)):
            text, (example, where) = decode(prompts.ids(split, i)), prompts.example(split, i)
            assert text.endswith("Assistant:") and where.startswith(f"{tmp_path / 'prompts.jsonl'}:")
            seen.append(example.get("id", "conversation"))
            if "messages" in example:
                assert text == "System: Be brief.\nUser: reverse: ij\nAssistant:"
    assert sorted(map(str, seen)) == ["0", "1", "2", "conversation"]
    with pytest.raises(DataError, match=r"bad.jsonl:1: a line needs a \"prompt\" string"):
        prepare(write_jsonl(tmp_path / "bad.jsonl", [{"question": "?"}]), data_root, "prompts")


def test_an_objective_and_the_data_it_reads_go_together(base, task):
    def config(objective: str, loader: str) -> TrainConfig:
        dataset = DatasetConfig(source=str(task / "train.jsonl"), loader=loader, tokenizer="char")
        return TrainConfig(model=ModelConfig(init_from=str(base)), objective=ObjectiveConfig(name=objective),
                           dataset=dataset)

    with pytest.raises(ConfigError, match="objective=dpo learns from dataset=preference"):
        config("dpo", "sft")
    with pytest.raises(ConfigError, match="dataset.loader=prompts holds data for objective=grpo"):
        config("lm", "prompts")
    with pytest.raises(ConfigError, match="samples=1: each answer's advantage is its reward against"):
        ObjectiveConfig(name="grpo", samples=1)
    with pytest.raises(ConfigError, match=r"oversample=0 must be at least 1 \(1: learn from every prompt"):
        ObjectiveConfig(name="grpo", oversample=0)
    with pytest.raises(ConfigError, match="beta=0 with objective=dpo"):
        ObjectiveConfig(name="dpo", beta=0)


# ---------------------------------------------------------------- the reward


def test_a_reward_is_loaded_from_a_module_or_a_file_and_its_failures_name_the_example(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def score(prompt, answer, example):\n    return 0.5\n"
                                            "def bad(prompt, answer, example):\n    return 'yes'\n"
                                            "def boom(prompt, answer, example):\n    raise KeyError('ref')\n")
    monkeypatch.chdir(tmp_path)
    assert Reward.load("my_rewards:score").score("p", "a", {}, "x.jsonl:1") == 0.5
    assert Reward.load(f"{tmp_path / 'my_rewards.py'}:score").function("p", "a", {}) == 0.5
    with pytest.raises(RewardError, match=r"example at x.jsonl:3 \(answer 'cba'\) returned 'yes' \(str\)"):
        Reward.load("my_rewards:bad").score("p", "cba", {}, "x.jsonl:3")
    with pytest.raises(RewardError, match=r"at x.jsonl:4 \(answer 'a'\) raised KeyError: 'ref'"):
        Reward.load("my_rewards:boom").score("p", "a", {}, "x.jsonl:4")
    with pytest.raises(ConfigError, match="objective.reward=no_such_module:f: cannot import no_such_module"):
        Reward.load("no_such_module:f")
    with pytest.raises(ConfigError, match="my_rewards has no function 'nope'"):
        Reward.load("my_rewards:nope")
    with pytest.raises(ConfigError, match="missing.py is not a file"):
        Reward.load("missing.py:f")
    assert exact_match("reverse: ab", " ba ", {"response": "ba"}) == 1.0
    assert exact_match("reverse: ab", "ab", {"answer": "ba", "response": "x"}) == 0.0


def test_a_reward_that_fails_in_a_run_stops_it_in_one_line_naming_the_example(work, base, task, tmp_path):
    (tmp_path / "bad.py").write_text("def score(prompt, answer, example):\n    return None\n")
    out = tmp_path / "run"
    done = train(work, *GRPO, f"model.init_from={base}", f"dataset.source={task / 'train.jsonl'}",
                 f"objective.reward={tmp_path / 'bad.py'}:score", f"hydra.run.dir={out}", cwd=tmp_path)
    assert done.returncode != 0 and done.stderr.count("\n") == 1, done.stderr
    assert f"on the example at {task / 'train.jsonl'}:" in done.stderr and "returned None" in done.stderr
    assert not (out / "best.pt").exists() and not (out / "last.pt").exists()


# ---------------------------------------------------------------- the reference and the log-probabilities


def test_the_lora_reference_is_the_base_with_its_adapters_off_and_log_probs_are_a_plain_forward():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    start = copy.deepcopy(model).eval()
    lora.add_adapters(model, lora.LoraConfig(rank=4, dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # the adapters have learned something
    x = torch.randint(0, 20, (6, 16))
    y = torch.where(torch.arange(16) >= 10, torch.randint(0, 20, (6, 16)), -1)  # the answers: the last 6
    plain = F.log_softmax(start(x, y)[0].double(), -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    expected = (plain * (y >= 0)).sum(1)
    with base_of(model) as reference:
        assert torch.allclose(summed_logps(reference, x, y).double(), expected, atol=1e-4)
    assert model.training and not torch.allclose(summed_logps(model, x, y).double(), expected, atol=1e-2)

    class Pairs:  # just what PreferenceObjective reads of a run
        objective = ObjectiveConfig(name="dpo", beta=0.1)

    setattr(model, lora.RECORD, {"rank": 4})
    objective = PreferenceObjective(Pairs, model, None, None)
    loss, figures = objective.pair_figures(model, (x, y))
    ours = summed_logps(model, x, y)
    want, _, _ = dpo_loss(*ours.chunk(2), *expected.float().chunk(2), 0.1)
    assert torch.allclose(figures["chosen_logp"], ours[:3].mean(), atol=1e-5)
    assert abs(loss.item() - want.mean().item()) < 1e-5


# ---------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def dpo_run(work, base, task) -> Path:
    done = train(work, *DPO, f"model.init_from={base}", f"dataset.source={task / 'pairs.jsonl'}",
                 f"hydra.run.dir={work / 'dpo'}")
    assert done.returncode == 0, done.stderr
    return work / "dpo"


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_a_dpo_run_records_its_preferences_and_keeps_best_pt_by_accuracy(dpo_run, work):
    evals, steps = records(dpo_run, "eval"), records(dpo_run, "train")
    for name in ("val_accuracy", "val_margin", "val_chosen_logp", "val_rejected_logp", "val_chosen_reward",
                 "val_rejected_reward", "train_loss", "val_loss"):
        assert all(name in r for r in evals), name
    assert all({"accuracy", "margin", "chosen_logp", "rejected_logp"} <= r.keys() for r in steps)
    assert abs(evals[0]["val_margin"]) < 1e-5 and abs(evals[0]["val_loss"] - math.log(2)) < 1e-5  # the start
    assert evals[-1]["train_loss"] < evals[0]["train_loss"]  # the chosen answers pulled ahead
    summary = json.loads((dpo_run / "summary.json").read_text())
    best = max(evals, key=lambda r: r["val_accuracy"])
    assert summary["best_by"] == "val_accuracy" and summary["best_value"] == best["val_accuracy"]
    assert load_checkpoint(dpo_run / "best.pt")["iter_num"] == best["iter"]
    lm = nanogpt.load(dpo_run, device="cpu")  # an ordinary run: it loads and chats
    assert isinstance(lm.chat("reverse: abc", max_new_tokens=4, temperature=0), str)
    done = run_in_process("nanogpt.export", f"ckpt={dpo_run}", "adapter_only=true", f"out={work / 'adapter'}",
                          cwd=work)
    assert done.returncode == 0, done.stderr
    assert (work / "adapter" / "adapter_config.json").is_file()


def test_resume_refuses_another_objective_in_one_line(dpo_run, work):
    done = run_in_process("nanogpt.train", f"resume={dpo_run}", "objective.beta=0.5", cwd=work)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "objective.beta=0.5 would change the run, which has objective.beta=0.1" in done.stderr
    changed = "objective.name=dpo would change the run, which has objective.name=lm"
    with pytest.raises(ConfigError, match=changed):
        check_resume_compatible({"seed": 1}, {"seed": 1, "objective": {"name": "dpo"}})


def grpo_config(work: Path, base: Path, task: Path, max_iters: int) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(init_from=str(base), block_size=64, dropout=0.0),
        dataset=DatasetConfig(name="reverse_prompts", source=str(task / "train.jsonl"), tokenizer="char",
                              loader="prompts"),
        objective=ObjectiveConfig(name="grpo", samples=3, max_new_tokens=6, beta=0.05,
                                  reward=f"{task / 'short.py'}:score"),
        optimizer=OptimizerConfig(lr=1e-2, warmup_iters=0, decay_lr=False, weight_decay=0.0),
        device=DeviceConfig(name="cpu"), logger=LoggerConfig(name="none"), data_root=str(work / "data"),
        lora=lora.LoraConfig(rank=4, dropout=0.0), batch_size=2, max_iters=max_iters,
        eval_interval=2, eval_iters=2, log_interval=2, sample_tokens=0)


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_a_grpo_run_resumes_exactly_and_records_rewards(work, base, task, tmp_path):
    """Sampling draws from a generator the checkpoint saves: a resumed run samples what the whole one did."""
    straight = build_trainer(grpo_config(work, base, task, 4), tmp_path / "a")
    straight.run()
    halfway = build_trainer(grpo_config(work, base, task, 2), tmp_path / "b")
    halfway.run()
    resumed = build_trainer(grpo_config(work, base, task, 4), tmp_path / "b",
                            resume=load_checkpoint(tmp_path / "b" / "last.pt"))
    resumed.run()
    for name, value in lora.trainable_weights(straight.model).items():
        assert torch.equal(lora.trainable_weights(resumed.model)[name], value), name
    a, b = records(tmp_path / "a", "train"), records(tmp_path / "b", "train")
    assert [r["reward"] for r in a] == [r["reward"] for r in b]
    assert all({"reward", "answer_length", "kl", "reward_std"} <= r.keys() for r in a)
    evals = records(tmp_path / "a", "eval")
    assert all({"val_reward", "val_pass_at_1", "val_answer_length"} <= r.keys() for r in evals)
    assert all(-6 <= r["val_reward"] <= 0 and r["val_answer_length"] <= 6 for r in evals)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["best_by"] == "val_reward"
    assert summary["best_value"] == max(r["val_reward"] for r in evals)


def test_oversampling_answers_more_prompts_and_learns_from_the_most_mixed(work, base, task, tmp_path):
    (tmp_path / "letters.py").write_text("def score(prompt, answer, example):\n    return len(set(answer))\n")
    cfg = grpo_config(work, base, task, 1)
    cfg.objective.oversample, cfg.objective.reward = 3, f"{tmp_path / 'letters.py'}:score"
    trainer = build_trainer(cfg, tmp_path / "run")
    objective, drawn, learned = trainer.objective, [], []
    sample = objective.sample
    objective.sample = lambda *args: drawn.append(sample(*args)) or drawn[-1]
    forward = lambda x, y: learned.append(x) or trainer.model(x, y)  # noqa: E731
    objective.loss(forward, (torch.tensor([0, 1]),))
    (answers,) = drawn
    assert answers.rewards.shape == (6, 3)  # the batch's 2 prompts and 4 more, 3 answers each
    assert learned[0].shape[0] == 2 * 3  # learned from 2 groups
    spread = answers.rewards.std(dim=1, unbiased=False)
    assert spread.max() > spread.min()  # a random model's answers: groups that differ, to choose among
    figures = objective.figures()
    assert figures["reward"] == pytest.approx(answers.rewards.mean().item())
    assert figures["reward_std"] == pytest.approx(spread.sort(descending=True).values[:2].mean().item())
    kept = most_mixed(answers.rewards, 2)
    assert torch.equal(learned[0], answers.of_groups(kept).inputs)


@pytest.mark.slow  # a torchrun job, and a sweep of two
def test_torchrun_and_a_sweep_run_grpo(work, base, task, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*torchrun, "-m", "nanogpt.train", *TINY, *GRPO, f"data_root={work / 'data'}",
                           f"model.init_from={base}", f"dataset.source={task / 'train.jsonl'}",
                           f"objective.reward={task / 'short.py'}:score",
                           "gradient_accumulation_steps=2", f"hydra.run.dir={tmp_path / 'ddp'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(tmp_path / "ddp" / "last.pt")["training"]["world_size"] == 2
    assert records(tmp_path / "ddp", "eval")[-1]["val_reward"] <= 0
    swept = run_in_process("nanogpt.train", "-m", *TINY, f"data_root={work / 'data'}", *GRPO, "max_iters=2",
                           f"model.init_from={base}", f"dataset.source={task / 'train.jsonl'}",
                           f"objective.reward={task / 'short.py'}:score", "objective.beta=0,0.1",
                           "objective.samples=2", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert swept.returncode == 0, swept.stderr
    runs = (tmp_path / "sweep").glob("*/last.pt")
    betas = sorted(load_checkpoint(p)["config"]["objective"]["beta"] for p in runs)
    assert betas == [0, 0.1]

