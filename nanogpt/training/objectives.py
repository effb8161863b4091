"""What a training step minimises (``objective=lm|dpo|grpo``), written out, and how each is measured.

The Trainer (trainer.py) has one loop for all three: each micro-batch it asks
its Objective for a loss, at each evaluation for the figures on held-out data,
and keeps best.pt by the objective's own measure (``best_by``).

* ``lm``: next-token cross-entropy (on the answers only, for ``dataset=sft``):
  what every run minimised before there were objectives. best.pt: the lowest val loss.
* ``dpo`` (Direct Preference Optimization, Rafailov et al. 2023), on ``dataset=preference``
  pairs: with log π(y) the summed log-probability of an answer's tokens under the
  model, and log π_ref(y) the same under the reference (the starting weights),
  each pair's loss is  -log σ(β [(log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))]),
  y_w the chosen answer, y_l the rejected one. β(log π - log π_ref) is an answer's
  implicit reward; a pair is ranked right when the chosen answer's is higher.
  DPO alone may push both answers down, the chosen one less (on the reverse task
  its greedy answers got worse): ``objective.chosen_nll`` adds the chosen answers'
  next-token loss, as RPO does (Pang et al. 2024). best.pt: the highest preference
  accuracy on held-out pairs.
* ``grpo`` (Group Relative Policy Optimization, Shao et al. 2024), on ``dataset=prompts``:
  for each prompt, ``objective.samples`` answers are sampled through the decoding
  loop every command generates with (nanogpt/decoding.py's Decoder over a KV cache,
  then GPT.stream's sample_next_token; the batch's answers decoded together),
  each scored by the user's reward function (rewards.py), and each answer's advantage is its reward less the
  group's mean, over the group's standard deviation. The loss is token-level: the
  mean over every answer token of the batch of -A·π/π_old + β·KL(π ‖ π_ref).
  Each batch of samples is learned from once, so π_old is π itself (detached):
  the ratio is 1, its gradient ∇log π, and PPO's clipping never acts (left out).
  The KL term is the k3 estimator, exp(r) - r - 1 with r = log π_ref - log π
  (never negative), and is skipped at β = 0. An answer has at most
  ``objective.max_new_tokens`` tokens; the batch stops decoding once all have
  ended. Under torchrun every process decodes on its own (the weights are whole on
  each) and meets the others only at the gradient's all-reduce; sharded (FSDP),
  the processes vote on whether all have ended, so all run as many forward
  passes. best.pt: the highest mean reward of greedy answers to held-out prompts.

The reference is the model as training starts: with LoRA the same model with its
adapters switched off (no second copy), otherwise a frozen copy of the starting
weights. Sampling draws from torch's default generator, which setup seeds per
process and every checkpoint saves per process, so a resumed run samples what
the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from nanogpt.dataset.batches import WIDTH_MULTIPLE, BatchSampler, PreparedData, PromptSet
from nanogpt.dataset.prompts import prompt_text
from nanogpt.decoding import Decoder
from nanogpt.evaluation.loss import estimate_loss
from nanogpt.generation.detokenize import Detokenizer
from nanogpt.generation.sampling import Sampling
from nanogpt.model import GPT
from nanogpt.options import check_choices, option, require
from nanogpt.runtime import distributed
from nanogpt.runtime.device import autocast
from nanogpt.runtime.process import Runtime
from nanogpt.text.chat_template import ChatTemplate
from nanogpt.tracking.metrics import lower_is_better
from nanogpt.training.rewards import Reward
from nanogpt.weights import lora

# objective.name: what each learns from (config.py checks the dataset matches).
OBJECTIVES = {
    "lm": "next-token cross-entropy (answers only on dataset=sft)",
    "dpo": "Direct Preference Optimization on dataset=preference pairs",
    "grpo": "reinforcement learning from objective.reward on dataset=prompts (GRPO)",
}
# The dataset.loader each objective needs; lm reads any dataset but these two.
LOADER_OF = {"dpo": "preference", "grpo": "prompts"}


@dataclass
class ObjectiveConfig:
    """The ``objective`` options: what training minimises (conf/objective/*.yaml)."""

    name: str = option("lm", "; ".join(f"{k}: {v}" for k, v in OBJECTIVES.items()),
                       choices=tuple(OBJECTIVES))
    beta: float = option(0.1, "dpo: the β of the loss (how strongly preferences pull away from the "
                              "reference); grpo: weight of the KL penalty to the reference (0: none)")
    chosen_nll: float = option(0.0, "dpo: weight of the chosen answers' next-token loss (per token) added to "
                                    "DPO's, as RPO does (Pang et al. 2024); it keeps them likely while the "
                                    "margin grows (0: DPO alone)")
    reward: str = option("nanogpt.training.rewards:exact_match",
                         "grpo: the reward, module:function or path/to/file.py:function, called as "
                         "function(prompt, answer, example) -> number")
    samples: int = option(8, "grpo: answers sampled per prompt, the group their rewards are compared in")
    oversample: int = option(1, "grpo: answer this many times batch_size prompts a step and learn from the "
                                "batch_size groups whose rewards differ most (dynamic sampling, as DAPO "
                                "does: a group whose answers all score alike has no advantage to learn "
                                "from); the extra prompts are drawn at random from the training split")
    max_new_tokens: int = option(32, "grpo: decoding steps per answer (an answer may end sooner)")
    temperature: float = option(1.0, "grpo: sampling temperature (1: the model's own distribution)")
    top_k: int | None = option(None, "grpo: sample among the k likeliest tokens; null: all")
    solved: float = option(1.0, "grpo: a held-out greedy answer with at least this reward counts as "
                                "solved (val_pass_at_1)")

    def __post_init__(self) -> None:
        check_choices(self)
        require(math.isfinite(self.beta) and self.beta >= 0, f"beta={self.beta} must be a number >= 0")
        require(math.isfinite(self.chosen_nll) and self.chosen_nll >= 0,
                f"chosen_nll={self.chosen_nll} must be a number >= 0 (0: DPO alone)")
        require(self.name != "dpo" or self.beta > 0,
                "beta=0 with objective=dpo: the loss would be constant; use beta > 0 (0.1 is usual)")
        require(self.samples >= 2, f"samples={self.samples}: each answer's advantage is its reward against "
                                   "the others' for the same prompt, so sample at least 2")
        require(self.oversample >= 1, f"oversample={self.oversample} must be at least 1 (1: learn from "
                                      "every prompt drawn)")
        require(self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be at least 1")
        require(math.isfinite(self.temperature) and self.temperature > 0,
                f"temperature={self.temperature} must be > 0 (answers are sampled, not greedy)")
        require(self.top_k is None or self.top_k >= 1, f"top_k={self.top_k} must be at least 1, or null")
        require(":" in self.reward, f"reward={self.reward!r} names no function: give module:function "
                                    "or path/to/file.py:function")


# ---------------------------------------------------------------- the losses, written out


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log p(target) at every position (rows, T), 0 where the target is -1 (not learned)."""
    flat = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1,
                           reduction="none")
    return -flat.view(targets.shape)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss of each pair, chosen answers' implicit rewards, rejected answers'), from summed log-probs."""
    chosen_rewards = beta * (chosen - ref_chosen)
    rejected_rewards = beta * (rejected - ref_rejected)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each reward (prompts, samples) against its group: minus the group's mean, over its std.

    A group whose answers all scored alike has nothing to teach: its advantages are 0.
    """
    mean, std = rewards.mean(dim=1, keepdim=True), rewards.std(dim=1, unbiased=False, keepdim=True)
    return (rewards - mean) / (std + eps)


def most_mixed(rewards: torch.Tensor, keep: int) -> torch.Tensor:
    """The indices, in order, of the keep groups (rows of rewards: prompts, samples) whose rewards
    spread widest (their std); of groups that spread alike, the first.
    """
    spread = rewards.std(dim=1, unbiased=False)
    return torch.argsort(spread, descending=True, stable=True)[:keep].sort().values


def grpo_loss(logps: torch.Tensor, advantages: torch.Tensor, learned: torch.Tensor,
              ref_logps: torch.Tensor | None = None, beta: float = 0.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the mean over learned tokens of -A·π/π_old + β·KL, the mean KL) for rows of sampled answers.

    logps and ref_logps: (rows, T) log-probabilities of the sampled tokens under the
    model and the reference; advantages: (rows,); learned: (rows, T), True on answer tokens.
    """
    ratio = torch.exp(logps - logps.detach())  # 1, with the gradient of log π
    per_token = -advantages[:, None] * ratio
    kl = torch.zeros_like(logps)
    if ref_logps is not None and beta > 0:
        log_ratio = ref_logps - logps
        kl = torch.exp(log_ratio) - log_ratio - 1
        per_token = per_token + beta * kl
    count = learned.sum().clamp(min=1)
    return (per_token * learned).sum() / count, ((kl * learned).sum() / count).detach()


# ---------------------------------------------------------------- the objectives


class Objective:
    """objective=lm: the model's own next-token loss; the base of the others."""

    best_by = "val_loss"  # the held-out figure best.pt is chosen by (metrics.lower_is_better says which way)

    def __init__(self, cfg, model: GPT, runtime: Runtime, data: PreparedData):
        self.cfg, self.options, self.model, self.runtime, self.data = cfg, cfg.objective, model, runtime, data
        self.sums: dict[str, torch.Tensor] = {}  # figures of the steps since the last log line
        self.counted = 0

    @classmethod
    def for_run(cls, cfg, model: GPT, runtime: Runtime, data: PreparedData) -> Objective:
        """The objective cfg.objective names, for model as training starts (the reference)."""
        kinds = {"lm": Objective, "dpo": PreferenceObjective, "grpo": RewardObjective}
        return kinds[cfg.objective.name](cfg, model, runtime, data)

    def loss(self, forward: Callable, batch: tuple) -> torch.Tensor:
        """The loss of one micro-batch, through forward (the model as training calls it: DDP, compiled)."""
        x, y = batch
        return forward(x, y)[1]

    def evaluate(self, forward: Callable, sampler: BatchSampler, eval_iters: int, ctx,
                 batch_done: Callable[[int, int], None]) -> dict[str, float]:
        """The figures of an evaluation (this process's share): train_loss, val_loss, ..."""
        losses = estimate_loss(forward, sampler, eval_iters, ctx, batch_done)
        return {"train_loss": losses["train"], "val_loss": losses["val"]}

    def held_out(self, figures: dict[str, float]) -> float:
        """The evaluation's best_by figure as a number to lower (a score is negated): best.pt's key."""
        value = figures[self.best_by]
        return value if lower_is_better(self.best_by) else -value

    def describe_best(self, held_out: float) -> str:
        """The best held_out() so far, in words."""
        value = held_out if lower_is_better(self.best_by) else -held_out
        return f"{self.best_by.replace('_', ' ')} {value:.4f}"

    def note(self, **figures: torch.Tensor) -> None:
        """Add one micro-batch's figures (on the device: no wait) to those the next log line shows."""
        for name, value in figures.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().float()
        self.counted += 1

    def figures(self) -> dict[str, float]:
        """The mean of each figure noted since the last call (the train record's), then forget them."""
        means = {name: (value / max(self.counted, 1)).item() for name, value in self.sums.items()}
        self.sums, self.counted = {}, 0
        return means

    # The reference: the model as training starts.

    def reference(self) -> Callable[[], contextlib.AbstractContextManager]:
        """What runs the reference: the model with its adapters off (LoRA), else a frozen copy of it."""
        if getattr(self.model, lora.RECORD, None) is not None:
            return lambda: base_of(self.model)
        frozen = frozen_copy(self.model, self.runtime)
        return lambda: contextlib.nullcontext(frozen)


@contextlib.contextmanager
def base_of(model: GPT) -> Iterator[GPT]:
    """Model with its LoRA adapters off, in evaluation mode (no dropout), within the block."""
    training = model.training
    model.eval()
    try:
        with lora.adapters_off(model):
            yield model
    finally:
        model.train(training)


def frozen_copy(model: GPT, runtime: Runtime) -> GPT:
    """A copy of model's weights as they are now, in evaluation mode, that never trains.

    Sharded (FSDP), a second sharded model is built and each process copies its own
    shards into it; the random generators are left as they were.
    """
    if runtime.sharded:
        with torch.random.fork_rng(devices=[]):
            frozen = runtime.new_model(model.config)
        with torch.no_grad():
            for mine, source in zip(frozen.parameters(), model.parameters(), strict=True):
                mine.copy_(source)
    else:
        frozen = copy.deepcopy(model)
    return frozen.requires_grad_(False).eval()


@torch.no_grad()
def summed_logps(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability of its learned targets (y != -1), without gradients.

    The output layer runs only where a target is learned (GPT.logits_at).
    """
    rows, positions = (y != -1).nonzero(as_tuple=True)
    logits = model.logits_at(x, rows, positions)
    logps = -F.cross_entropy(logits.float(), y[rows, positions], reduction="none")
    return torch.zeros(len(y), device=y.device).index_add_(0, rows, logps)


@torch.no_grad()
def learned_token_logps(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """token_logps() of model for (x, y), without gradients: the reference's, for the KL."""
    rows, positions = (y != -1).nonzero(as_tuple=True)
    logits = model.logits_at(x, rows, positions)
    out = torch.zeros(y.shape, device=y.device)
    out[rows, positions] = -F.cross_entropy(logits.float(), y[rows, positions], reduction="none")
    return out


class PreferenceObjective(Objective):
    """objective=dpo: each batch holds B pairs as 2B rows, the chosen answers first, then the rejected."""

    best_by = "val_accuracy"

    def __init__(self, cfg, model: GPT, runtime: Runtime, data: PreparedData):
        super().__init__(cfg, model, runtime, data)
        self.run_reference = self.reference()

    def pair_figures(self, forward: Callable, batch: tuple) -> tuple[torch.Tensor, dict]:
        """(mean loss, figures) of a batch of pairs: the reference first, then the model with gradients."""
        x, y = batch
        with self.run_reference() as reference:
            ref_chosen, ref_rejected = summed_logps(reference, x, y).chunk(2)
        logits, _ = forward(x, y)
        logps = token_logps(logits, y)
        chosen, rejected = logps.sum(dim=1).chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected,
                                                            self.options.beta)
        figures = {"accuracy": (chosen_rewards > rejected_rewards).float().mean(),
                   "margin": (chosen_rewards - rejected_rewards).mean(),
                   "chosen_reward": chosen_rewards.mean(), "rejected_reward": rejected_rewards.mean(),
                   "chosen_logp": chosen.mean(), "rejected_logp": rejected.mean()}
        loss = losses.mean()
        if self.options.chosen_nll > 0:  # the chosen answers' next-token loss, per token (RPO)
            figures["chosen_nll"] = -chosen.sum() / (y[:len(chosen)] != -1).sum().clamp(min=1)
            loss = loss + self.options.chosen_nll * figures["chosen_nll"]
        return loss, {name: value.detach() for name, value in figures.items()}

    def loss(self, forward: Callable, batch: tuple) -> torch.Tensor:
        loss, figures = self.pair_figures(forward, batch)
        self.note(**figures)
        return loss

    @torch.no_grad()
    def evaluate(self, forward: Callable, sampler: BatchSampler, eval_iters: int, ctx,
                 batch_done: Callable[[int, int], None]) -> dict[str, float]:
        """The DPO loss of each split (train_loss, val_loss) and the val pairs' figures, over eval_iters
        batches of each.
        """
        self.model.eval()
        results = {}
        for s, split in enumerate(("train", "val")):
            sums: dict[str, torch.Tensor] = {}
            for i in range(eval_iters):
                with ctx:
                    loss, figures = self.pair_figures(forward, sampler.get_batch(split, evaluation=True))
                for name, value in {"loss": loss, **figures}.items():
                    sums[name] = sums.get(name, 0) + value.float()
                batch_done(s * eval_iters + i + 1, 2 * eval_iters)
            results[f"{split}_loss"] = (sums.pop("loss") / eval_iters).item()
            if split == "val":
                results.update({f"val_{name}": (value / eval_iters).item() for name, value in sums.items()})
        self.model.train()
        return results


@dataclass
class Answers:
    """The sampled answers to a batch of prompts, as rows ready to learn from and as the reward saw them."""

    inputs: torch.Tensor  # (rows, width): prompt and answer, padded
    targets: torch.Tensor  # (rows, width): the answer's tokens where they are predicted, else -1
    rewards: torch.Tensor  # (prompts, samples)
    lengths: torch.Tensor  # (rows,): answer tokens learned (up to and with the end)
    ended: torch.Tensor  # (rows,): 1 where the answer ended within max_new_tokens

    def of_groups(self, groups: torch.Tensor) -> Answers:
        """The answers to the prompts at these indices (of the batch's), their rows kept together."""
        samples = self.rewards.shape[1]
        rows = (groups[:, None] * samples + torch.arange(samples, device=groups.device)).flatten()
        return Answers(self.inputs[rows], self.targets[rows], self.rewards[groups], self.lengths[rows],
                       self.ended[rows])


class RewardObjective(Objective):
    """objective=grpo: a batch is prompts (their indices in the split); the answers are sampled here."""

    best_by = "val_reward"

    def __init__(self, cfg, model: GPT, runtime: Runtime, data: PreparedData):
        super().__init__(cfg, model, runtime, data)
        self.prompts = PromptSet(data)
        self.reward = Reward.load(self.options.reward)
        require(self.options.max_new_tokens < model.config.block_size,
                f"objective.max_new_tokens={self.options.max_new_tokens} leaves no room for the prompt in "
                f"model.block_size={model.config.block_size}; lower it")
        self.tokenizer = data.tokenizer
        self.template = ChatTemplate.from_record(data.meta.get("chat_template"), self.tokenizer)
        self.run_reference = self.reference() if self.options.beta > 0 else None
        self.generator = sampling_generator(runtime.device)

    def sample(self, split: str, picks: list[int], sampling: Sampling, rows: int) -> Answers:
        """The given number of answers (rows) to each prompt picked, decoded together, and scored.

        The decoding is GPT.stream's (a Decoder over the KV cache, then
        sample_next_token), with every row of every prompt in one batch; it ends
        when every answer has ended or after sampling.max_new_tokens steps.
        Sharded (FSDP), where each forward pass gathers the weights from every
        process, the prompts are decoded one at a time and the processes vote on
        whether all have ended, so all run as many forward passes.
        """
        was_training = self.model.training
        self.model.eval()  # dropout off while sampling
        groups = [[pick] for pick in picks] if self.runtime.sharded else [picks]
        found = [answer for group in groups for answer in self.decode(split, group, sampling, rows)]
        self.model.train(was_training)
        sequences, starts, rewards, ended = zip(*found, strict=True)
        return self.answers(list(sequences), list(starts), list(rewards), list(ended), len(picks), rows)

    @torch.no_grad()
    def decode(self, split: str, picks: list[int], sampling: Sampling,
               rows: int) -> list[tuple[list[int], int, float, bool]]:
        """(prompt and answer ids, where the answer starts, its reward, whether it ended) of each row."""
        template, block = self.template, self.model.config.block_size
        stops = [template.end_text] if template.end_id is None else []
        prompts = [self.prompts.ids(split, pick)[-(block - sampling.max_new_tokens):] for pick in picks]
        sequences = [list(ids) for ids in prompts for _ in range(rows)]  # a prompt's rows side by side
        texts = [Detokenizer(self.tokenizer.decode, stops, template.answer_start) for _ in sequences]
        done = [False] * len(sequences)
        with autocast(self.runtime.device, self.runtime.dtype):
            decoder = Decoder(self.model, self.model.new_cache(len(sequences)))
            for _ in range(sampling.max_new_tokens):
                tokens = sampling.next_token(decoder.next_logits(sequences), self.generator)[:, 0].tolist()
                for row, token in enumerate(tokens):
                    if done[row]:
                        continue
                    sequences[row].append(token)
                    if token == template.end_id:
                        done[row] = True
                    else:
                        texts[row].add(token)
                        done[row] = texts[row].stopped
                if self.all_done(all(done)):
                    break
        found = []
        for row, ids in enumerate(sequences):
            example, where = self.prompts.example(split, picks[row // rows])
            answer = texts[row].shown + texts[row].finish()
            found.append((ids, len(prompts[row // rows]), self.reward.score(prompt_text(example), answer,
                                                                             example, where), done[row]))
        return found

    def all_done(self, mine: bool) -> bool:
        """True when every answer has ended: this process's, and sharded, every process's too."""
        if not self.runtime.sharded:
            return mine
        return distributed.all_reduce_mean({"done": float(mine)}, self.runtime.dist,
                                           self.runtime.device)["done"] == 1.0

    def answers(self, sequences: list[list[int]], starts: list[int], rewards: list[float], ended: list[bool],
                prompts: int, rows: int) -> Answers:
        """The sampled sequences as padded (inputs, targets) rows, the answers' tokens learned."""
        block, device = self.model.config.block_size, self.runtime.device
        longest = max(len(s) for s in sequences) - 1
        width = min(block, -(-longest // WIDTH_MULTIPLE) * WIDTH_MULTIPLE)
        inputs = np.zeros((len(sequences), width), dtype=np.int64)
        targets = np.full((len(sequences), width), -1, dtype=np.int64)
        for row, (ids, start) in enumerate(zip(sequences, starts, strict=True)):
            inputs[row, :len(ids) - 1] = ids[:-1]
            targets[row, start - 1:len(ids) - 1] = ids[start:]
        lengths = [len(ids) - start for ids, start in zip(sequences, starts, strict=True)]
        return Answers(torch.from_numpy(inputs).to(device), torch.from_numpy(targets).to(device),
                       torch.tensor(rewards, dtype=torch.float32, device=device).view(prompts, rows),
                       torch.tensor(lengths, dtype=torch.float32, device=device),
                       torch.tensor(ended, dtype=torch.float32, device=device))

    def loss(self, forward: Callable, batch: tuple) -> torch.Tensor:
        """Sample objective.samples answers to each prompt of the batch, score them, learn from them.

        With objective.oversample > 1, more prompts are answered than learned from:
        the batch's and random others', and the batch_size most mixed groups are kept.
        reward is the mean of all the answers sampled (the policy's), reward_std and
        mixed (the share of groups not all alike) those of the groups learned from.
        """
        o = self.options
        sampling = Sampling(o.temperature, o.top_k, None, None, [], o.max_new_tokens)
        picks = batch[0].tolist()
        extra = (o.oversample - 1) * len(picks)
        if extra:
            picks += torch.randint(self.prompts.count("train"), (extra,), generator=self.generator,
                                   device=self.generator.device).tolist()
        drawn = self.sample("train", picks, sampling, o.samples)
        answers = drawn.of_groups(most_mixed(drawn.rewards, len(batch[0]))) if extra else drawn
        x, y = answers.inputs, answers.targets
        ref_logps = None
        if self.run_reference is not None:
            with self.run_reference() as reference:
                ref_logps = learned_token_logps(reference, x, y)
        logits, _ = forward(x, y)
        advantages = group_advantages(answers.rewards).flatten()
        loss, kl = grpo_loss(token_logps(logits, y), advantages, y != -1, ref_logps, o.beta)
        spread = answers.rewards.std(dim=1, unbiased=False)
        self.note(reward=drawn.rewards.mean(), answer_length=answers.lengths.mean(),
                  ended=answers.ended.mean(), kl=kl, reward_std=spread.mean(),
                  mixed=(spread > 0).float().mean())
        return loss

    @torch.no_grad()
    def evaluate(self, forward: Callable, sampler: BatchSampler, eval_iters: int, ctx,
                 batch_done: Callable[[int, int], None]) -> dict[str, float]:
        """Greedy answers to held-out prompts: their mean reward, the share solved, their length.

        The prompts are the val split's first eval_iters × batch_size (all, if fewer)
        across the job, the same at every evaluation; each process answers an equal
        share (repeating the last if need be, not counted), so all decode as many steps.
        """
        dist, count = self.runtime.dist, self.prompts.count("val")
        total = min(count, eval_iters * dist.world_size * self.cfg.batch_size)
        share = -(-total // dist.world_size)
        picks = [dist.rank * share + i for i in range(share)]
        greedy = Sampling(0.0, None, None, None, [], self.options.max_new_tokens)
        with ctx:
            answers = self.sample("val", [min(pick, total - 1) for pick in picks], greedy, 1)
        counted = torch.tensor([pick < total for pick in picks], dtype=torch.float32,
                               device=self.runtime.device)  # the repeated last prompt is not
        rewards = answers.rewards[:, 0]
        sums = torch.stack([(rewards * counted).sum(), ((rewards >= self.options.solved) * counted).sum(),
                            (answers.lengths * counted).sum(), counted.sum()])
        batch_done(1, 1)
        names = ("reward", "solved", "length", "n")
        figures = distributed.all_reduce_mean(dict(zip(names, sums.tolist(), strict=True)), dist,
                                              self.runtime.device)
        n = max(figures["n"], 1e-12)
        return {"val_reward": figures["reward"] / n, "val_pass_at_1": figures["solved"] / n,
                "val_answer_length": figures["length"] / n}


def sampling_generator(device: torch.device) -> torch.Generator:
    """Torch's default generator of device: seeded per process by setup, saved per process in checkpoints.

    (Elsewhere, on MPS, a generator of its own, seeded from torch's: not saved, so a resumed
    run samples afresh.)
    """
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index or 0]
    if device.type == "cpu":
        return torch.default_generator
    return torch.Generator(device=device).manual_seed(torch.initial_seed())
