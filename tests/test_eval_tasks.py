"""nanogpt.eval's tasks: log-likelihood scoring, HellaSwag, bits per byte, and what bad input gets.

Each figure is checked against an independent computation: Hugging Face
transformers' GPT-2 on the same weights, lm-evaluation-harness's own HellaSwag
cleaning and text splitting, tiktoken's own bytes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from nanogpt.cli.entry import to_dataclass
from nanogpt.cli.paths import CONFIG_DIR
from nanogpt.errors import DataError
from nanogpt.eval import EvalConfig, evaluate
from nanogpt.evaluation import hellaswag, scoring
from nanogpt.evaluation.bpb import BpbOptions
from nanogpt.evaluation.hellaswag import HellaSwagOptions, example_from, read_examples, validation_file
from nanogpt.evaluation.scoring import encode_pair, score_requests
from nanogpt.evaluation.tasks import TASKS, Subject
from nanogpt.fileio import sha256_of_file
from nanogpt.generation.language_model import LanguageModel
from nanogpt.model import GPTConfig
from nanogpt.runtime.device import DeviceConfig
from nanogpt.text.tokenizers import GPT2_TOKENIZER, load_tokenizer, tiktoken_encoding
from nanogpt.training.config import TrainConfig
from nanogpt.weights.loading import LoadedSource

from .commands import run_in_process
from .conftest import register_commands, run_module
from .hellaswag_examples import HAND_WRITTEN, generated, write_jsonl
from .test_data import FileServer
from .test_eval import last_json, reference_loss
from .test_load import VOCABULARY, random_gpt, transformers_model, write_our_checkpoint

CPU = torch.device("cpu")


def as_language_model(model) -> LanguageModel:
    """A GPT-2-vocabulary model as evaluation takes it, on the CPU in float32."""
    loaded = LoadedSource(model, load_tokenizer(GPT2_TOKENIZER), "run", "a random model")
    return LanguageModel(loaded, CPU, torch.float32)
BPE_MODEL = GPTConfig(vocab_size=50257, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def hf_loglikelihood(hf, context: list[int], continuation: list[int], block: int) -> tuple[float, bool]:
    """The summed log-probability of continuation after context, as lm-eval's HF model computes it."""
    ids = (context + continuation)[-(block + 1):][:-1]
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, -len(continuation):].double()
    target = torch.tensor(continuation)
    chosen = F.log_softmax(logits, dim=-1).gather(1, target[:, None]).sum().item()
    return chosen, bool((logits.argmax(-1) == target).all())


def test_continuations_score_as_transformers_does_batched_and_cut_from_the_left():
    config = GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    model = random_gpt(config)
    hf = transformers_model(model.state_dict(), config)
    rng = np.random.default_rng(0)
    requests = [(rng.integers(0, 97, size=n).tolist(), rng.integers(0, 97, size=m).tolist())
                for n, m in ((3, 4), (30, 5), (12, 16), (1, 1), (15, 2), (40, 9), (5, 0))]
    one_by_one = score_requests(model, requests, 1, CPU, progress=False)
    batched = score_requests(model, requests, 3, CPU, progress=False)
    for (context, continuation), single, several in zip(requests, one_by_one, batched, strict=True):
        if not continuation:
            assert single == several == (0.0, True)
            continue
        expected, greedy = hf_loglikelihood(hf, context, continuation, 16)
        assert single[0] == pytest.approx(expected, abs=1e-4)
        assert several[0] == pytest.approx(expected, abs=1e-4)
        assert single[1] == several[1] == greedy
    with pytest.raises(DataError, match="continuation of 17 tokens does not fit the model's block of 16"):
        score_requests(model, [([1], list(range(17)))], 2, CPU, progress=False)


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_continuations_of_one_context_share_its_pass_and_score_as_transformers_does(monkeypatch):
    """Four endings for each of several contexts of different lengths (batched together, each row's
    cache at its own length), beside a request read whole: one cut from the left.
    """
    config = GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    model = random_gpt(config)
    hf = transformers_model(model.state_dict(), config)
    rng = np.random.default_rng(1)
    requests = []
    for length in (5, 5, 5, 8, 8, 3, 11, 14):
        context = rng.integers(0, 97, size=length).tolist()
        requests += [(context, rng.integers(0, 97, size=m).tolist()) for m in (1, 3, 2, 4)]
    shared, share = [], scoring.score_shared_contexts
    monkeypatch.setattr(scoring, "score_shared_contexts",
                        lambda model, requests, groups, *rest: shared.extend(groups) or share(model, requests,
                                                                                            groups, *rest))
    for batch_size in (1, 2, 16):
        shared.clear()
        scores = score_requests(model, requests, batch_size, CPU, progress=False)
        # Every context is read once; the 14-token one for the three endings that fit the block
        # with it, while its 4-token ending (18 tokens in all) is cut from the left and read whole.
        assert sorted(map(len, shared)) == [3] + [4] * 7
        for (context, continuation), (logprob, greedy) in zip(requests, scores, strict=True):
            expected, expected_greedy = hf_loglikelihood(hf, context, continuation, 16)
            assert logprob == pytest.approx(expected, abs=1e-4)
            assert greedy == expected_greedy


def test_text_is_cut_into_context_and_continuation_as_lm_eval_cuts_it(bpe_cache):
    from nanogpt.evaluation.lm_adapter import NanoGPTLM

    encoding = tiktoken_encoding("gpt2")
    lm = NanoGPTLM(as_language_model(random_gpt(BPE_MODEL)), progress=False)
    for context, continuation in (("The cat sat on the", " mat."), ("Question: 2+2=  ", "4"),
                                  ("It ends with a newline\n", "Next line"), ("naïve café", "s ☕ ok")):
        ours = encode_pair(encoding.encode_ordinary, context, continuation, encoding.eot_token)
        assert ours == lm._encode_pair(context, continuation)
    assert encode_pair(encoding.encode_ordinary, "", " hello", 50256) == ([50256], encoding.encode(" hello"))


def test_hellaswag_cleans_text_exactly_as_lm_eval_does():
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    # Hugging Face's copy (which lm-eval reads) keeps the label as a string.
    docs = [{**doc, "label": str(doc["label"])} for doc in HAND_WRITTEN]
    for doc, processed in zip(HAND_WRITTEN, process_docs(datasets.Dataset.from_list(docs)), strict=True):
        ours = example_from(doc)
        assert (ours.context, ours.endings, ours.label) == (processed["query"], processed["choices"],
                                                            processed["gold"])
    # [header] is dropped, [title] becomes ". ", ctx_b is capitalised.
    assert example_from(HAND_WRITTEN[3]).context == \
        "Home and Garden: How to water a houseplant. Check the soil first."
    assert example_from(HAND_WRITTEN[0]).context.endswith("white paint. She")


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_hellaswag_matches_transformers_ending_by_ending(bpe_cache, tmp_path):
    source = write_jsonl(tmp_path / "hs.jsonl", HAND_WRITTEN)
    model = random_gpt(BPE_MODEL)
    subject = Subject(as_language_model(model), 5, tmp_path, split=None, progress=False)
    examples = read_examples(source)
    likelihoods = hellaswag.ending_likelihoods(subject, examples, where=source)

    hf, encoding = transformers_model(model.state_dict(), BPE_MODEL), tiktoken_encoding("gpt2")
    for example, row in zip(examples, likelihoods, strict=True):
        for ending, ours in zip(example.endings, row, strict=True):
            context = encoding.encode_ordinary(example.context)  # lm-eval's split of the text
            continuation = encoding.encode_ordinary(example.context + " " + ending)[len(context):]
            assert ours == pytest.approx(hf_loglikelihood(hf, context, continuation, 64)[0], abs=1e-4)
    # acc and acc_norm from those numbers, as lm-eval's multiple-choice scoring takes them.
    labels = np.array([example.label for example in examples])
    lengths = np.array([[len(ending) for ending in example.endings] for example in examples])
    result = hellaswag.HellaSwagTask(HellaSwagOptions(source=str(source), limit=10)).run(subject)
    assert result["examples"] == 10
    assert result["acc"] == np.mean(likelihoods[:10].argmax(1) == labels[:10])
    assert result["acc_norm"] == np.mean((likelihoods / lengths)[:10].argmax(1) == labels[:10])


def test_a_malformed_hellaswag_line_is_named_by_file_and_number(tmp_path):
    lines = [json.dumps(HAND_WRITTEN[0]), json.dumps(HAND_WRITTEN[1]), '{"ctx_a": "broken',
             json.dumps({k: v for k, v in HAND_WRITTEN[2].items() if k != "endings"})]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"^{path}:3 is not a HellaSwag example"):
        read_examples(path)
    path.write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    with pytest.raises(DataError, match=f"^{path}:3 is not a HellaSwag example \\(no 'endings'\\)"):
        read_examples(path)
    assert len(read_examples(path, limit=2)) == 2  # a limit stops before the bad line


def test_hellaswag_is_downloaded_once_checked_and_only_then_cached(tmp_path, monkeypatch):
    folder = tmp_path / "served"
    folder.mkdir()
    write_jsonl(folder / "hellaswag_val.jsonl", generated(10_042))
    write_jsonl(folder / "other.jsonl", generated(100))
    server = FileServer(folder)
    root = tmp_path / "data_root"
    root.mkdir()
    try:
        # Not the published file (its sha256 differs): refused; the cache is as it was, no hellaswag/ in it.
        monkeypatch.setattr(hellaswag, "VALIDATION_URL", f"{server.url}/other.jsonl")
        with pytest.raises(DataError, match="sent [0-9,]+ bytes with sha256 [0-9a-f]{64}, not the "
                                            "published validation set \\(12,246,618 bytes, sha256 "
                                            "0aa3b888.*nothing was cached"):
            validation_file(root)
        assert list(root.iterdir()) == []
        # The download machinery, with the checksum of the file this server has (the real one cannot be
        # fetched here): checked, then cached, then read from the cache.
        monkeypatch.setattr(hellaswag, "VALIDATION_URL", f"{server.url}/hellaswag_val.jsonl")
        monkeypatch.setattr(hellaswag, "VALIDATION_SHA256", sha256_of_file(folder / "hellaswag_val.jsonl"))
        path = validation_file(root)
        assert path == root / "hellaswag" / "hellaswag_val.jsonl"
        assert path.read_bytes() == (folder / "hellaswag_val.jsonl").read_bytes()
    finally:
        server.close()
    assert validation_file(root) == path and server.requests == 2  # the server is gone: read from the cache
    monkeypatch.setattr(hellaswag, "VALIDATION_URL", server.url + "/hellaswag_val.jsonl")
    with pytest.raises(DataError) as error:
        validation_file(tmp_path / "elsewhere")
    assert str(error.value) == (f"could not download HellaSwag's validation set from {server.url}/"
                                "hellaswag_val.jsonl (could not connect: Failed to establish a new "
                                "connection: [Errno 111] Connection refused); offline, fetch that file "
                                "elsewhere and give task.source=PATH")
    assert not (tmp_path / "elsewhere").exists()  # no hellaswag/ folder: a failed download leaves none


def test_bits_per_byte_counts_the_utf8_bytes_of_the_scored_text(bpe_cache, tmp_path):
    text = "Naïve café owners serve crème brûlée — 😀 — to the ROMEO of Verona.\n" * 12
    source = tmp_path / "text.txt"
    source.write_text(text, encoding="utf-8")
    write_our_checkpoint(tmp_path / "run" / "best.pt", BPE_MODEL, GPT2_TOKENIZER)
    config = EvalConfig(ckpt=str(tmp_path / "run"), task=BpbOptions(source=str(source)), batch_size=3,
                        device=DeviceConfig(name="cpu"))
    result = evaluate(config)

    encoding = tiktoken_encoding("gpt2")
    tokens = np.array(encoding.encode_ordinary(text))
    model = random_gpt(BPE_MODEL)  # write_our_checkpoint saved these weights
    hf = transformers_model(model.state_dict(), BPE_MODEL)
    mean, windows = reference_loss(lambda x: hf(x).logits, tokens, 64)
    scored = tokens[1: windows * 64 + 1]
    size = len(encoding.decode_bytes(scored.tolist()))
    assert size > len(encoding.decode(scored.tolist())) and windows >= 3  # multi-byte characters counted
    assert (result["task"], result["bytes"], result["tokens"]) == ("bpb", size, windows * 64)
    assert result["bits_per_byte"] == pytest.approx(mean * windows * 64 / math.log(2) / size, rel=1e-6)


def test_bits_per_byte_of_a_character_model_is_its_bits_per_character(tmp_path, corpus, data_root):
    from nanogpt.dataset.pipeline import prepare_data

    data = prepare_data("toy", str(corpus), data_root)
    config = GPTConfig(vocab_size=data.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    dataset = {"name": "toy", "source": str(corpus), "tokenizer": "char", "val_fraction": 0.1}
    write_our_checkpoint(tmp_path / "run" / "best.pt", config, data.meta["tokenizer"],
                         {"dataset": dataset, "data_root": str(data_root)})
    loss = evaluate(EvalConfig(ckpt=str(tmp_path / "run"), device=DeviceConfig(name="cpu")))
    bpb = evaluate(EvalConfig(ckpt=str(tmp_path / "run"), task=BpbOptions(), device=DeviceConfig(name="cpu")))
    assert loss["task"] == "loss" and bpb["split"] == "val"
    assert bpb["bytes"] == bpb["tokens"] == loss["tokens"]  # ASCII: a character is a byte
    assert bpb["bits_per_byte"] == pytest.approx(loss["bits_per_char"], rel=1e-9)


def test_eval_without_ckpt_scores_the_newest_run(bpe_cache, tmp_path):
    write_our_checkpoint(tmp_path / "outputs" / "old" / "best.pt", BPE_MODEL, GPT2_TOKENIZER)
    newest = tmp_path / "outputs" / "new" / "best.pt"
    write_our_checkpoint(newest, BPE_MODEL, GPT2_TOKENIZER)
    os.utime(tmp_path / "outputs" / "old" / "best.pt", (1, 1))
    write_jsonl(tmp_path / "hs.jsonl", HAND_WRITTEN)
    result = run_in_process("nanogpt.eval", "task=hellaswag", "task.source=hs.jsonl", "task.limit=4",
                            "device=cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"evaluating the newest run's checkpoint: {Path('outputs/new/best.pt')}" in result.stderr
    scored = last_json(result.stdout)
    assert (scored["task"], scored["ckpt"], scored["examples"]) == ("hellaswag", "outputs/new/best.pt", 4)
    assert {"acc", "acc_norm"} <= scored.keys()


@pytest.mark.parametrize("task", sorted(p.stem for p in (CONFIG_DIR / "task").glob("*.yaml")))
def test_every_task_composes_into_its_own_options(task):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_commands()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[f"task={task}"])
    assert type(OmegaConf.to_object(cfg.task)) is TASKS[task].Options
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        overrides = ["eval_tasks=[bpb,hellaswag]", "tasks.hellaswag.limit=5", "tasks.bpb.source=held_out.txt"]
        train = to_dataclass(compose(config_name="train", overrides=overrides), TrainConfig)
    assert train.eval_tasks == ["bpb", "hellaswag"] and train.tasks.hellaswag == HellaSwagOptions(limit=5)
    assert train.tasks.bpb == BpbOptions(source="held_out.txt")


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_bad_input_is_one_line_naming_what_to_fix(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(HAND_WRITTEN[0]) + "\n{not json\n")
    write_our_checkpoint(tmp_path / "run" / "best.pt", GPTConfig(vocab_size=65, block_size=64, n_layer=1,
                                                                 n_head=2, n_embd=16, dropout=0.0),
                         {"kind": "char", "vocabulary": VOCABULARY})
    # One real process; the other refusals run in this one (tests/commands.py).
    assert one_line_error(run_module("nanogpt.eval", "ckpt=run", "task=hellaswag", f"task.source={bad}",
                                     "device=cpu", cwd=tmp_path)).startswith(
        f"error: {bad}:2 is not a HellaSwag example (")
    assert one_line_error(run_in_process("nanogpt.eval", "task=glue", cwd=tmp_path)) == (
        "error: task=glue is not an option; choose one of: bpb, hellaswag, lm_eval, loss")
    # A source that is not there is named before any model is read (there is none here either).
    missing = run_in_process("nanogpt.eval", "ckpt=nowhere", "task=bpb", "task.source=missing.txt",
                             cwd=tmp_path)
    assert one_line_error(missing) == (
        "error: task.source=missing.txt does not exist; give a UTF-8 text file")
    # Without lm-eval, task=lm_eval and eval_tasks=[lm_eval] say how to install it: tests/test_first_hour.py.
