"""LoRA finetuning end to end: frozen base, small checkpoints that rebuild, peft interop, chat, resume, DDP.

One real run (a random GPT-2-shaped base in a Hugging Face directory with Tiny
Shakespeare's characters, finetuned with LoRA on the reverse task that
experiments/make_reverse_task.py writes) serves most tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import nanogpt
from nanogpt.cli.resume import check_resume_compatible
from nanogpt.dataset.config import DatasetConfig
from nanogpt.errors import CheckpointError, ConfigError
from nanogpt.fileio import WRITTEN_FILE
from nanogpt.model import GPT, GPTConfig
from nanogpt.runtime.device import DeviceConfig
from nanogpt.text.tokenizers import load_tokenizer
from nanogpt.tracking.loggers import LoggerConfig
from nanogpt.training.config import ModelConfig, TrainConfig
from nanogpt.training.optim import OptimizerConfig, build_optimizer
from nanogpt.training.setup import build_trainer
from nanogpt.weights import lora
from nanogpt.weights.checkpoint import load_checkpoint
from nanogpt.weights.huggingface import export_adapter, export_model
from nanogpt.weights.loading import LoadedSource, load_pretrained
from nanogpt.weights.quantize import quantize_model
from tests.commands import run_in_process
from tests.conftest import REPO
from tests.test_sft import SHAKESPEARE_CHARS

LORA_RUN = ["device=cpu", "logger=none", "model.block_size=64", "model.dropout=0", "dataset=sft",
            "dataset.tokenizer=char", "dataset.name=reverse", "lora.rank=4", "lora.dropout=0", "batch_size=8",
            "max_iters=8", "eval_interval=4", "eval_iters=2", "log_interval=4", "sample_tokens=0",
            "optimizer.lr=1e-2", "optimizer.warmup_iters=0", "optimizer.weight_decay=0"]


def make_char_base(directory: Path) -> Path:
    """A random GPT-2 in a Hugging Face directory, reading Tiny Shakespeare's characters."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(SHAKESPEARE_CHARS), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0, 0.1)
    model.save_pretrained(directory)
    vocabulary = {"kind": "char", "vocabulary": SHAKESPEARE_CHARS}
    (directory / "nanogpt_tokenizer.json").write_text(json.dumps(vocabulary))
    return directory


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def base(work) -> Path:
    return make_char_base(work / "base")


@pytest.fixture(scope="module")
def task(work) -> Path:
    script = REPO / "experiments" / "make_reverse_task.py"
    done = subprocess.run([sys.executable, str(script), str(work / "task"), "--train", "300",
                           "--heldout", "20"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return work / "task"


@pytest.fixture(scope="module")
def run(work, base, task) -> Path:
    """A LoRA run of 8 steps, saved at 4 and 8."""
    done = run_in_process("nanogpt.train", *LORA_RUN, f"model.init_from={base}",
                          f"dataset.source={task}/train.jsonl", f"data_root={work / 'data'}",
                          f"hydra.run.dir={work / 'run'}", cwd=work)
    assert done.returncode == 0, done.stderr
    assert "lora: rank 4 on c_attn, c_proj, c_fc" in done.stdout
    return work / "run"


def unmerged(run_dir: Path) -> GPT:
    """The run's base with peft's adapters in it, as training computed (not merged)."""
    state = load_checkpoint(run_dir / "best.pt")
    model, _ = load_pretrained(state["lora"]["base"]["source"], block_size=64)
    lora.add_adapters(model, lora.LoraConfig(**{k: v for k, v in state["lora"].items() if k != "base"}))
    model.load_state_dict(state["model"], strict=False)
    return model.eval()


def ids_of(lm, text: str = "User: reverse: abc\nAssistant: cba\n\n") -> torch.Tensor:
    return torch.tensor([lm.encode(text)])


def test_only_the_adapters_train_and_the_optimizer_holds_only_them():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    lora.adapt(model, lora.LoraConfig(rank=4, alpha=8, dropout=0.0, targets=["c_attn", "c_fc"]), None)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".")[4] for n in trainable} == {"c_attn", "c_fc"}  # transformer.h.N.attn.c_attn...
    for cfg in (OptimizerConfig(), OptimizerConfig(name="muon")):
        optimizer = build_optimizer(model, cfg)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert held == {id(p) for p in model.parameters() if p.requires_grad}
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-2, weight_decay=0.0))
    idx = torch.randint(0, 50, (4, 16))
    for _ in range(3):
        _, loss = model(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = {name.replace(".base_layer.", "."): p for name, p in model.named_parameters()}
    for name, value in before.items():  # every base weight is where it was
        assert torch.equal(after[name], value), name
    assert all(after[n].abs().sum() > 0 for n in trainable if ".lora_B." in n)  # B left zero: it learned


def test_merged_and_unmerged_models_give_the_same_logits():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    base = GPT(config).eval()
    adapted = GPT(config)
    adapted.load_state_dict(base.state_dict())
    lora.adapt(adapted, lora.LoraConfig(rank=4, alpha=8, dropout=0.0), "somewhere")
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.5)  # as if trained: B is zero at the start
    adapters = lora.trainable_weights(adapted)
    assert set(adapters) == {n for n, p in adapted.named_parameters() if p.requires_grad}
    merged = lora.merge_adapters(base, lora.record(adapted)["lora"], adapters)
    idx = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        expected, _ = adapted.eval()(idx, idx)
        logits, _ = merged(idx, idx)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert (expected - GPT(config).eval()(idx, idx)[0]).abs().max() > 0.1  # the adapters changed the model


def test_lora_settings_are_checked_and_a_model_without_such_layers_is_refused():
    with pytest.raises(ConfigError, match=r"targets=\['q_proj'\]: q_proj is not a Linear layer of model.py's "
                                          r"blocks; choose among c_attn, c_proj, c_fc"):
        lora.LoraConfig(rank=4, targets=["q_proj"])
    with pytest.raises(ConfigError, match="rank=-1 must be >= 0"):
        lora.LoraConfig(rank=-1)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32))
    quantize_model(model, "int8", torch.device("cpu"))  # its Linear layers become int8 ones
    with pytest.raises(ConfigError, match="lora.rank=4: the model has no c_attn, c_proj, c_fc layers"):
        lora.adapt(model, lora.LoraConfig(rank=4), None)


def test_a_lora_checkpoint_holds_the_adapters_and_rebuilds_base_plus_adapters(run, base):
    state = load_checkpoint(run / "best.pt")
    saved = state["lora"]
    assert saved["base"]["source"] == str(base.resolve()) and len(saved["base"]["sha256"]) == 64
    assert (saved["rank"], saved["targets"]) == (4, ["c_attn", "c_proj", "c_fc"])
    assert state["model"] and all(".lora_" in name for name in state["model"])
    assert state["chat_template"]["end_text"] == "\n\n"
    base_bytes = (base / "model.safetensors").stat().st_size
    assert (run / "best.pt").stat().st_size < base_bytes / 3
    lm = nanogpt.load(run, device="cpu")
    with torch.no_grad():
        merged, _ = lm.model(ids_of(lm), ids_of(lm))
        expected, _ = unmerged(run)(ids_of(lm), ids_of(lm))
        plain, _ = nanogpt.load(base, device="cpu").model(ids_of(lm), ids_of(lm))
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=0)
    assert (merged - plain).abs().max() > 1e-3  # the finetune changed the model


def test_a_changed_base_is_refused_in_one_line(run, base, work, tmp_path):
    moved = shutil.copytree(base, tmp_path / "base")
    state = load_checkpoint(run / "best.pt")
    state["lora"]["base"]["source"] = str(moved)
    torch.save(state, tmp_path / "best.pt")
    assert nanogpt.load(tmp_path / "best.pt", device="cpu")  # the same weights elsewhere: found by their hash
    model = GPT2LMHeadModel.from_pretrained(moved)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] += 0.01
    model.save_pretrained(moved)
    done = run_in_process("nanogpt.sample", f"ckpt={tmp_path / 'best.pt'}", "device=cpu", "num_tokens=5",
                          cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"the LoRA adapters were trained on {moved}" in done.stderr and "restore that base" in done.stderr


def test_the_peft_adapter_gives_our_logits_in_transformers(run, base, work):
    import peft

    out = work / "adapter"
    done = run_in_process("nanogpt.export", f"ckpt={run}", f"out={out}", "adapter_only=true", cwd=work)
    assert done.returncode == 0, done.stderr
    files = sorted(p.name for p in out.iterdir() if p.name != WRITTEN_FILE)  # and export's record of them
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    settings = json.loads((out / "adapter_config.json").read_text())
    assert (settings["r"], settings["peft_type"]) == (4, "LORA")
    assert settings["base_model_name_or_path"] == str(base)
    theirs = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), out).eval()
    lm = nanogpt.load(run, device="cpu")
    with torch.no_grad():
        ours, _ = lm.model(ids_of(lm), ids_of(lm))
        torch.testing.assert_close(theirs(ids_of(lm)).logits, ours, atol=1e-4, rtol=0)
        # The merged export (as for any checkpoint) computes the same in plain transformers.
        export_model(lm.model, lm.tokenizer, work / "merged")
        merged = GPT2LMHeadModel.from_pretrained(work / "merged").eval()
        torch.testing.assert_close(merged(ids_of(lm)).logits, ours, atol=1e-4, rtol=0)
    with pytest.raises(CheckpointError, match="trained without LoRA"):
        plain = load_checkpoint(run / "best.pt")
        plain.pop("lora")
        export_adapter(plain, work / "nothing", where="plain.pt")


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_chat_streams_answers_for_piped_input_and_clear_starts_over(run, work):
    lm = nanogpt.load(run, device="cpu")
    first = lm.chat("reverse: abc", max_new_tokens=8, temperature=0)
    follow = lm.chat([{"role": "user", "content": "reverse: abc"}, {"role": "assistant", "content": first},
                      {"role": "user", "content": "reverse: xyz"}], max_new_tokens=8, temperature=0)
    assert "\n\n" not in first + follow  # an answer ends where its end-of-text is
    done = subprocess.run([sys.executable, "-m", "nanogpt.chat", f"ckpt={run}", "device=cpu", "temperature=0",
                           "max_new_tokens=8"], input="reverse: abc\nreverse: xyz\n/clear\nreverse: abc\n",
                          capture_output=True, text=True, timeout=120, cwd=work)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n") == [first, follow, first, ""]  # what lm.chat returns, line by line
    assert "(a new conversation)" in done.stderr


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_ctrl_c_leaves_chat_quietly(run, work):
    chat = subprocess.Popen([sys.executable, "-m", "nanogpt.chat", f"ckpt={run}", "device=cpu",
                             "max_new_tokens=4"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=work,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    chat.stdin.write("reverse: abc\n")
    chat.stdin.flush()
    chat.stdout.readline()  # the answer: the model is loaded and waiting for the next line
    chat.send_signal(signal.SIGINT)
    _, err = chat.communicate(timeout=60)
    assert chat.returncode == 0 and "Traceback" not in err, err


def test_chat_stops_at_the_end_of_text():
    """A model made to write one token only: if it is the end, nothing is shown; else max_new_tokens of it."""
    config = GPTConfig(vocab_size=len(SHAKESPEARE_CHARS), block_size=32, n_layer=1, n_head=2, n_embd=32,
                       dropout=0.0)

    def always(character: str) -> nanogpt.LanguageModel:
        model = GPT(config)
        with torch.no_grad():  # the final norm outputs a constant; one row of the output layer matches it
            model.transformer.ln_f.weight.zero_()
            model.transformer.ln_f.bias.zero_()
            model.transformer.ln_f.bias[0] = 10.0
            model.transformer.wte.weight.zero_()
            model.transformer.wte.weight[SHAKESPEARE_CHARS.index(character), 0] = 1.0
        chars = load_tokenizer({"kind": "char", "vocabulary": SHAKESPEARE_CHARS})
        source = LoadedSource(model, chars, "run", "crafted")
        return nanogpt.LanguageModel(source, torch.device("cpu"), torch.float32)

    assert always("\n").chat("hi", temperature=0) == ""  # "\n\n" ends the answer at once
    assert always("x").chat("hi", max_new_tokens=7, temperature=0) == "x" * 7
    with pytest.raises(ConfigError, match="end with the user's message"):
        always("x").chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def test_eval_scores_the_answers_of_the_runs_own_data(run, work):
    done = run_in_process("nanogpt.eval", f"ckpt={run}", "device=cpu", cwd=work)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    meta = json.loads((work / "data" / "reverse" / "meta.json").read_text())
    assert result["tokens"] == meta["answer_tokens"]["val"] and result["windows"] == meta["examples"]["val"]
    assert 0 < result["loss"] < 5


def small_run(work: Path, base: Path, task: Path, max_iters: int) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(init_from=str(base), block_size=64, dropout=0.0),
        dataset=DatasetConfig(name="reverse", source=str(task / "train.jsonl"), tokenizer="char",
                              loader="sft"),
        optimizer=OptimizerConfig(lr=1e-2, warmup_iters=0, decay_lr=False, weight_decay=0.0),
        device=DeviceConfig(name="cpu"), logger=LoggerConfig(name="none"), data_root=str(work / "data"),
        lora=lora.LoraConfig(rank=4, dropout=0.1), batch_size=4, max_iters=max_iters,
        eval_interval=3, eval_iters=2, log_interval=3, sample_tokens=0)


def test_resume_continues_a_lora_run_exactly_and_refuses_another_base(work, base, task, tmp_path):
    straight = build_trainer(small_run(work, base, task, 6), tmp_path / "a")
    straight.run()
    halfway = build_trainer(small_run(work, base, task, 3), tmp_path / "b")
    halfway.run()
    state = load_checkpoint(tmp_path / "b" / "last.pt")
    resumed = build_trainer(small_run(work, base, task, 6), tmp_path / "b", resume=state)
    resumed.run()
    for name, value in lora.trainable_weights(straight.model).items():
        assert torch.equal(lora.trainable_weights(resumed.model)[name], value), name
    assert resumed.best_val_loss == straight.best_val_loss
    state["lora"]["base"]["sha256"] = "0" * 64
    with pytest.raises(CheckpointError, match="restore that base"):
        build_trainer(small_run(work, base, task, 6), tmp_path / "b", resume=state)


def test_resume_refuses_other_lora_settings_in_one_line(run, work):
    done = run_in_process("nanogpt.train", f"resume={run}", "lora.rank=8", cwd=work)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "lora.rank=8 would change the run, which has lora.rank=4" in done.stderr
    # A run saved before LoRA existed had it off: resuming it with the default is no change.
    check_resume_compatible({"model": {"n_layer": 2}}, {"model": {"n_layer": 2}, "lora": {"rank": 0}})
    with pytest.raises(ConfigError, match="lora.rank=4 would change the run, which has lora.rank=0"):
        check_resume_compatible({"model": {"n_layer": 2}}, {"model": {"n_layer": 2}, "lora": {"rank": 4}})


def test_bench_measures_lora_with_checkpointing_in_bfloat16(work, corpus, data_root):
    """The command the GPU measurement runs (model=gpt2-xl there), on a tiny model on the CPU."""
    out = work / "bench"
    done = run_in_process("nanogpt.bench", "device=cpu", "model=tiny", "model.n_layer=2", "model.n_embd=32",
                          "model.n_head=2", "model.block_size=32", "dataset=text", f"dataset.source={corpus}",
                          f"data_root={data_root}", "lora.rank=8", "model.gradient_checkpointing=true",
                          "device.dtype=bfloat16", "batch_size=1", "bench.warmup_steps=1",
                          "bench.train_steps=2", "bench.gen_tokens=10", "bench.gen_uncached=false",
                          f"hydra.run.dir={out}", cwd=work)
    assert done.returncode == 0, done.stderr
    settings = json.loads((out / "bench.json").read_text())["settings"]
    assert settings["dtype"] == "bfloat16" and 0 < settings["trainable_params_m"] < settings["params_m"] / 2
    assert "trained (LoRA)" in done.stdout


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_without_peft_lora_is_one_line_and_loading_a_lora_run_still_works(run, work):
    hide_peft = "import sys; sys.modules['peft'] = None; "
    load = subprocess.run([sys.executable, "-c", hide_peft + f"import nanogpt; nanogpt.load({str(run)!r}, "
                           "device='cpu'); print('loaded')"], capture_output=True, text=True, timeout=120)
    assert load.returncode == 0 and "loaded" in load.stdout, load.stderr
    train = run_in_process("nanogpt.train", "lora.rank=8", "device=cpu", cwd=work, hidden=["peft"])
    assert train.returncode == 2 and train.stderr.count("\n") == 1, train.stderr
    assert "lora.rank=8 needs the optional package peft" in train.stderr
    assert "pip install peft" in train.stderr


@pytest.mark.slow  # a torchrun job
def test_torchrun_trains_lora_on_instructions(work, base, task, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*torchrun, "-m", "nanogpt.train", *LORA_RUN, "max_iters=4",
                           "gradient_accumulation_steps=2", f"model.init_from={base}",
                           f"dataset.source={task}/train.jsonl", f"data_root={work / 'data'}",
                           f"hydra.run.dir={tmp_path / 'ddp'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    state = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert state["training"]["world_size"] == 2 and all(".lora_" in name for name in state["model"])
    assert isinstance(nanogpt.load(tmp_path / "ddp", device="cpu").chat("reverse: ab", max_new_tokens=4), str)


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_a_sweep_over_lora_settings_makes_one_run_each(work, base, task, tmp_path):
    done = run_in_process("nanogpt.train", "-m", *LORA_RUN, "max_iters=2", "eval_interval=2", "lora.rank=2,4",
                          f"model.init_from={base}", f"dataset.source={task}/train.jsonl",
                          f"data_root={work / 'data'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    ranks = sorted(load_checkpoint(p)["lora"]["rank"] for p in (tmp_path / "sweep").glob("*/best.pt"))
    assert ranks == [2, 4]


def test_the_recipes_compose():
    from tests.test_config import compose_train

    gpt2 = compose_train(["+experiment=finetune_lora"])
    assert (gpt2.model.init_from, gpt2.dataset.loader, gpt2.dataset.tokenizer) == ("gpt2", "sft", "gpt2")
    assert (gpt2.lora.rank, gpt2.lora.targets) == (8, ["c_attn", "c_proj", "c_fc"])
    demo = compose_train(["+experiment=finetune_reverse_cpu"])
    assert (demo.model.init_from, demo.dataset.tokenizer) == ("outputs/shakespeare_base", "char")
    assert demo.lora.rank == 16


def test_chat_help_explains_every_key(work):
    from nanogpt.chat import ChatConfig
    from nanogpt.options import describe_options

    assert not [key for key, _, _, meaning in describe_options(ChatConfig) if not meaning]
    assert not [key for key, _, _, meaning in describe_options(TrainConfig) if key.startswith("lora.") and
                not meaning]
    done = run_in_process("nanogpt.chat", "--help", cwd=work)
    assert done.returncode == 0 and done.stdout.startswith("python -m nanogpt.chat"), done.stderr
    assert "max_new_tokens: int = 256" in done.stdout

