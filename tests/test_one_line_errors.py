"""Failures inside other libraries are one line that keeps their message; chat and samples say what they do.

lm-eval for real (a task YAML that does not parse, a metric option lm-eval rejects only while scoring),
Hydra's list parsing, safetensors, tokenizers and peft raising their own errors; which of them a
traceback belongs to (a bug of ours that a library called back keeps its traceback). Then what chat
says when it leaves something out, the end-of-run sample's text, and the training log's count of
instruction examples cut by the block.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from hydra import compose, initialize_config_dir

import nanogpt
from nanogpt.chat import answer_note, prompt_notes
from nanogpt.cli.errors import describe_error, is_user_error
from nanogpt.cli.paths import CONFIG_DIR
from nanogpt.dataset.batches import ExampleWindows
from nanogpt.errors import CheckpointError, DataError, first_line, library_failure
from nanogpt.generation.language_model import ChatFit, sample_text
from nanogpt.model import GPT, GPTConfig
from nanogpt.text.tokenizers import GPT2_TOKENIZER, load_tokenizer
from nanogpt.weights.checkpoint import save_checkpoint
from nanogpt.weights.huggingface import read_hf_directory
from nanogpt.weights.loading import LoadedSource

from .commands import run_in_process
from .conftest import register_commands
from .test_eval_harness import QUESTIONS, offline_in_this_process
from .test_eval_tasks import BPE_MODEL
from .test_load import VOCABULARY, write_our_checkpoint
from .test_sft import CHAR_BASE, SHAKESPEARE_CHARS, prepare, write_jsonl

CHOICES = 'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: "{{answer}}"\n'


def one_error_line(result: subprocess.CompletedProcess, after_progress: bool = False) -> str:
    """The one error line a refused command printed (after_progress: the last, after progress bars)."""
    lines = result.stderr.strip().splitlines()
    if after_progress:  # lm-eval's and datasets' bars are on stderr too, before the error
        lines = lines[-1:] if not any(line.startswith("error: ") for line in lines[:-1]) else lines
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


@pytest.mark.slow  # two lm-eval runs, each indexing its tasks for seconds
def test_lm_eval_a_task_it_cannot_read_or_score_is_one_line_with_its_reason(tmp_path, bpe_cache, monkeypatch):
    write_our_checkpoint(tmp_path / "run" / "best.pt", BPE_MODEL, GPT2_TOKENIZER)
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    local = ("dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n"
             f"    validation: {questions}\ntraining_split: null\nvalidation_split: validation\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "broken.yaml").write_text("task: broken\noutput_type: multiple_choice\n" + local + CHOICES
                                       + 'doc_to_choice: "{{choices}}"\nmetric_list: [\n  - metric: acc\n')
    (tasks / "odd_metric.yaml").write_text(  # an option exact_match does not take, found while scoring
        "task: odd_metric\noutput_type: generate_until\n" + local + CHOICES
        + 'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 2\n'
        + "metric_list:\n  - metric: exact_match\n    no_such_option: 3\n")
    common = ["ckpt=run", "task=lm_eval", "task.include_path=tasks", "device=cpu"]
    offline = offline_in_this_process(tmp_path, monkeypatch)
    unread = run_in_process("nanogpt.eval", *common, "task.tasks=[broken]", cwd=tmp_path, env=offline)
    assert one_error_line(unread) == (
        "error: task.tasks: lm-eval knows no task broken (nor does tasks); "
        "tasks/broken.yaml is not valid YAML: expected the node content, but found '-' (line 14, "
        "column 3)")
    scored = run_in_process("nanogpt.eval", *common, "task.tasks=[odd_metric]", cwd=tmp_path, env=offline)
    line = one_error_line(scored, after_progress=True)
    assert line.startswith("error: task=lm_eval: lm-eval failed running odd_metric (TypeError: "
                           "exact_match_fn() "), line
    assert "(in lm_eval/api/task.py, process_results)); check the task's YAML (its metric_list" in line


def test_hydra_says_how_to_quote_a_value_with_a_comma():
    register_commands()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        with pytest.raises(Exception) as error:  # noqa: PT011 (Hydra's own ConfigCompositionException)
            compose("eval", overrides=["task=lm_eval", "task.include_path=mine,theirs"])
    assert is_user_error(error.value)
    assert describe_error(error.value) == (
        "task.include_path=mine,theirs: Hydra reads a comma as several values; for one value that holds "
        """commas, quote it inside the shell's quotes: "task.include_path='mine,theirs'"; for a list: """
        "task.include_path=[mine,theirs]; to sweep over the values: add -m")


def test_a_librarys_own_error_is_one_line_and_a_bug_of_ours_keeps_its_traceback(tmp_path):
    peft = pytest.importorskip("peft")
    with pytest.raises(ValueError) as raised:  # peft's own check of its settings
        peft.LoraConfig(target_modules="c_attn", layers_to_transform=[0])
    assert library_failure(raised.value) == "peft" and is_user_error(raised.value)
    # Which of peft's files raises it moves between its versions; that one of them is named does not.
    assert re.fullmatch(
        r"peft failed: ValueError: `layers_to_transform` cannot be used when `target_modules` is a str\. "
        r"\(in peft/[\w/]+\.py, \w+\); NANOGPT_DEBUG=1 shows the whole traceback",
        describe_error(raised.value)), describe_error(raised.value)
    from lm_eval.models.utils import Collator

    with pytest.raises(AttributeError) as ours:  # lm-eval calling code of ours that fails: our bug
        list(Collator([None, "text"], sort_fn=first_line).get_batched(n=1))
    assert library_failure(ours.value) is None and not is_user_error(ours.value)

    hf = tmp_path / "hf"  # a Hugging Face directory whose weights file was cut short
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"vocab_size": 65, "n_positions": 32, "n_layer": 1,
                                                "n_head": 2, "n_embd": 32}))
    (hf / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(CheckpointError, match="model.safetensors cannot be read: safetensors says "
                                              "SafetensorError: "):
        read_hf_directory(hf)
    (hf / "config.json").write_text('{"n_layer": 2}')
    with pytest.raises(CheckpointError, match="config.json is not a Hugging Face GPT-2 config \\(it has no "):
        read_hf_directory(hf)

    tokenizers = pytest.importorskip("tokenizers")  # a word-level tokenizer without an unknown token
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab={"the": 0, "and": 1}, unk_token=None))
    words.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    codec = load_tokenizer({"kind": "hf", "origin": "words.json", "json": words.to_str()})
    with pytest.raises(DataError, match="^words.json cannot encode the text: tokenizers says WordLevel "
                                        "error: Missing \\[UNK\\] token from the vocabulary; give a"):
        codec.encode("the rest")


def constant_model(token: int, vocab_size: int, block_size: int = 32) -> GPT:
    """A GPT that writes token after anything, sampled or greedy.

    Its final norm outputs a constant that one output row matches, by a margin of 50 in the logits.
    """
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=32,
                          dropout=0.0))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 50.0
        model.transformer.wte.weight.zero_()
        model.transformer.wte.weight[token, 0] = 1.0
    return model


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_chat_says_what_it_leaves_out_and_why_an_answer_is_empty(tmp_path):
    model = constant_model(VOCABULARY.index("x"), len(VOCABULARY))  # never ends an answer itself
    save_checkpoint(tmp_path / "run" / "best.pt", {
        "model_config": asdict(model.config), "model": model.state_dict(), "iter_num": 0,
        "best_val_loss": 1.0, "tokenizer": {"kind": "char", "vocabulary": VOCABULARY}, "config": {}})
    lines = "hello\n" + "a very long message, far longer than the model's context of thirty-two\n"
    done = subprocess.run([sys.executable, "-m", "nanogpt.chat", "ckpt=run", "device=cpu", "temperature=0"],
                          input=lines, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr
    notes = done.stderr.strip().splitlines()
    assert notes[0] == ("note: run/best.pt was not finetuned on instruction data, so it continues the "
                        "conversation's text rather than answering it (often with nothing); finetune it "
                        "first: python -m nanogpt.train model.init_from=run/best.pt dataset=sft "
                        "dataset.source=CHATS.jsonl (docs/finetuning.md)")
    assert sum(note.startswith("note:") for note in notes) == 1  # said once, not per answer
    # "User: hello\nAssistant:" takes 22 of the 32 positions: the answer gets the other 10, and says so.
    assert notes[1] == ("(the answer stopped at 10 tokens: the prompt and the answer fill the model's "
                        "32-token context; /clear starts a conversation with more room)")
    assert "(the 2 oldest messages no longer fit the context and are left out)" in notes
    assert any(note.startswith("(your message is longer than the model's 32-token context: its first ")
               for note in notes)
    assert len(done.stdout.splitlines()) == 2  # stdout holds the answers alone

    ends = SHAKESPEARE_CHARS.index("\n")  # a char model ends an answer with a blank line: "\n\n"
    crafted = LoadedSource(constant_model(ends, len(SHAKESPEARE_CHARS)), load_tokenizer(CHAR_BASE), "run",
                           "crafted", chat_template={})
    lm = nanogpt.LanguageModel(crafted, torch.device("cpu"), torch.float32)
    fit = ChatFit()
    assert "".join(lm.stream_chat("hi", temperature=0, fit=fit)) == "" and fit.ended == "end"
    assert answer_note(fit, "", temperature=0) == (
        "(the model ended its answer at once, before any text: greedy decoding (temperature=0) will do so "
        "every time; try temperature=0.8, or finetune longer)")
    assert prompt_notes(fit) == [] and lm.finetuned_for_chat


def test_the_end_of_run_sample_shows_text_not_end_of_text_markers(bpe_cache):
    eot = load_tokenizer(GPT2_TOKENIZER).eot
    text = sample_text(constant_model(eot, 50257), load_tokenizer(GPT2_TOKENIZER), 30, torch.device("cpu"))
    assert text == "\n"  # the newline it starts from; thirty end-of-text tokens show as nothing
    space = load_tokenizer(GPT2_TOKENIZER).encode(" x")[0]
    spaced = sample_text(constant_model(space, 50257), load_tokenizer(GPT2_TOKENIZER), 5, torch.device("cpu"))
    assert spaced == "\n" + " x" * 5


def test_the_log_says_whether_a_long_example_loses_prompt_or_answer(tmp_path, data_root, caplog):
    examples = [{"prompt": "Who?", "response": "Me."},  # fits
                {"prompt": "Tell me, " * 6 + "who?", "response": "Me."},  # a long prompt: loses its start
                {"prompt": "Who?", "response": "I am the one you seek, " * 3}]  # an answer past the block
    data = prepare(write_jsonl(tmp_path / "chats.jsonl", examples * 4), data_root, val_fraction=0.25)
    with caplog.at_level(logging.INFO, logger="nanogpt.data"):
        ExampleWindows(data, block_size=40)
    said = " ".join(r.getMessage() for r in caplog.records)
    counts = re.findall(r"sft: (\d+) of \d+ (?:train|val) examples are longer than block_size \+ 1 = 41 "
                        r"tokens and are cut from the left: (\d+) lose only part of their prompt, (\d+) part "
                        r"of an answer too \(what they learn is longer than the block\)", said)
    cut, prompts, answers = (sum(int(found[i]) for found in counts) for i in range(3))
    assert (cut, prompts, answers) == (8, 4, 4), said  # train and val together: 4 of each long kind
