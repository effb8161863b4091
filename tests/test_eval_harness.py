"""task=lm_eval against the real lm-evaluation-harness, offline: the same numbers as `lm_eval --model hf`.

A small random GPT-2-BPE model of ours is exported with `python -m nanogpt.export`;
the real `lm_eval` command line scores the export through Hugging Face
transformers, and `python -m nanogpt.eval task=lm_eval` scores our checkpoint
through NanoGPTLM, on local task YAMLs: lm-eval's own hellaswag task pointed
at a local file, a multiple-choice task and a rolling-log-likelihood
(perplexity) task of our own. Every metric must agree within 1e-4; task=hellaswag
must give lm-eval's hellaswag acc and acc_norm.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import lm_eval
import pytest

from nanogpt.text.tokenizers import GPT2_TOKENIZER

from .commands import run_in_process
from .hellaswag_examples import HAND_WRITTEN, write_jsonl
from .test_eval import last_json
from .test_eval_tasks import BPE_MODEL, one_line_error
from .test_load import write_our_checkpoint

TASKS = ["hellaswag_local", "choice_local", "rolling_local"]
QUESTIONS = [
    {"question": "What colour is the sky on a clear day?", "choices": ["blue", "green", "red"], "answer": 0},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight", "ten"], "answer": 1},
    {"question": "Which one is a fruit?", "choices": ["carrot", "potato", "apple"], "answer": 2},
    {"question": "What do bees make?", "choices": ["honey", "silk", "wax paper"], "answer": 0},
    {"question": "Water freezes at what temperature in Celsius?", "choices": ["100", "0", "37"], "answer": 1},
]
TEXTS = [  # longer than the model's 64 positions, so lm-eval's rolling windows are exercised
    {"text": "The river runs past the old mill, under the stone bridge and on towards the sea. " * 4},
    {"text": "Ciao! Naïve café owners serve crème brûlée; the 😀 stays on the menu. " * 3},
    {"text": "Short one."},
]


def offline_env(root: Path) -> dict:
    return {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(root / "hf_datasets"),
            "TOKENIZERS_PARALLELISM": "false"}


def offline_in_this_process(root: Path, monkeypatch) -> dict:
    """offline_env(root), for a command run in this process (run_in_process) as in a fresh one.

    datasets and huggingface_hub read these variables once, when first imported, which in a test
    process was long before; what they would have made of them is set in their modules here too.
    """
    import datasets.config
    import huggingface_hub.constants

    env = offline_env(root)
    cache = Path(env["HF_DATASETS_CACHE"])
    downloads = cache / datasets.config.DOWNLOADED_DATASETS_DIR
    for name, value in (("HF_DATASETS_CACHE", cache), ("DOWNLOADED_DATASETS_PATH", downloads),
                        ("EXTRACTED_DATASETS_PATH", downloads / datasets.config.EXTRACTED_DATASETS_DIR),
                        ("HF_HUB_OFFLINE", True), ("HF_DATASETS_OFFLINE", True)):
        monkeypatch.setattr(datasets.config, name, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return env


@pytest.fixture(scope="module")
def harness(tmp_path_factory, bpe_cache) -> Path:
    """A run, its Hugging Face export, and a folder of task YAMLs over local JSONL files."""
    root = tmp_path_factory.mktemp("harness")
    write_our_checkpoint(root / "run" / "best.pt", BPE_MODEL, GPT2_TOKENIZER)
    result = run_in_process("nanogpt.export", "ckpt=run", "out=hf", cwd=root)
    assert result.returncode == 0, result.stderr
    tasks = root / "tasks"
    tasks.mkdir()
    hellaswag_yaml = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"
    local = "dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n    validation: {}\n" \
            "training_split: null\nvalidation_split: validation\n"
    (tasks / "hellaswag_local.yaml").write_text(
        f"include: {hellaswag_yaml}\ntask: hellaswag_local\n"
        + local.format(write_jsonl(root / "hellaswag.jsonl", HAND_WRITTEN)))
    questions, texts = write_jsonl(root / "q.jsonl", QUESTIONS), write_jsonl(root / "t.jsonl", TEXTS)
    (tasks / "choice_local.yaml").write_text(
        "task: choice_local\noutput_type: multiple_choice\n" + local.format(questions)
        + 'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
          'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
    (tasks / "rolling_local.yaml").write_text(
        "task: rolling_local\noutput_type: loglikelihood_rolling\n" + local.format(texts)
        + 'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
          "  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    return root


@pytest.mark.slow  # the real lm_eval command and two of ours, each indexing lm-eval's tasks
def test_our_adapter_gives_lm_evals_numbers_for_hugging_faces_export(harness, monkeypatch):
    env = {**os.environ, **offline_env(harness)}
    env.pop("HYDRA_FULL_ERROR", None)
    reference = subprocess.run(
        ["lm_eval", "--model", "hf", "--model_args", f"pretrained={harness / 'hf'}",
         "--tasks", ",".join(TASKS), "--include_path", str(harness / "tasks"), "--device", "cpu",
         "--batch_size", "4", "--output_path", str(harness / "lm_eval_out")],
        cwd=harness, env=env, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = json.loads(next((harness / "lm_eval_out").rglob("results_*.json")).read_text())["results"]

    # Our side in this process: the reference above is the real command line.
    offline = offline_in_this_process(harness, monkeypatch)
    ours = run_in_process("nanogpt.eval", "ckpt=run", "task=lm_eval", f"task.tasks=[{','.join(TASKS)}]",
                          "task.include_path=tasks", "device=cpu", "batch_size=3", cwd=harness, env=offline)
    assert ours.returncode == 0, ours.stderr[-3000:]
    result = last_json(ours.stdout)
    assert result["task"] == "lm_eval"
    assert result["examples"] == len(HAND_WRITTEN) + len(QUESTIONS) + len(TEXTS)
    assert set(result["results"]) == set(expected) == set(TASKS)
    for task, metrics in expected.items():
        assert set(result["results"][task]) == set(metrics), task
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                mine = result["results"][task][key]
                print(task, key, "lm_eval --model hf:", value, "ours:", mine)
                if "perplexity" in key:  # exp(-mean log-likelihood): equal log-likelihoods, compared as such
                    assert math.log(mine) == pytest.approx(math.log(value), abs=1e-4), (task, key)
                else:
                    assert mine == pytest.approx(value, abs=1e-4), (task, key)
            else:
                assert result["results"][task][key] == value
    assert expected["rolling_local"]["word_perplexity,none"] > 1  # a real figure, not a placeholder

    # task=hellaswag scores lm-eval's hellaswag task without lm-eval.
    ours = run_in_process("nanogpt.eval", "ckpt=run", "task=hellaswag", "task.source=hellaswag.jsonl",
                          "device=cpu", cwd=harness)
    assert ours.returncode == 0, ours.stderr
    scored = last_json(ours.stdout)
    assert (scored["acc"], scored["acc_norm"]) == (expected["hellaswag_local"]["acc,none"],
                                                   expected["hellaswag_local"]["acc_norm,none"])

    # A task lm-eval does not know is named in one line.
    unknown = run_in_process("nanogpt.eval", "ckpt=run", "task=lm_eval", "task.tasks=[no_such_task]",
                             "task.include_path=tasks", cwd=harness, env=offline)
    assert one_line_error(unknown) == (
        "error: task.tasks: lm-eval knows no task no_such_task (nor does tasks); `lm_eval ls tasks` lists "
        "them, task.include_path=DIR adds your own")


def test_generation_is_lm_evals_greedy_generation(harness):
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from nanogpt.evaluation.lm_adapter import NanoGPTLM
    from nanogpt.generation.language_model import LanguageModel
    from nanogpt.weights.loading import resolve_source

    loaded = resolve_source(harness / "run")
    ours = NanoGPTLM(LanguageModel(loaded, torch.device("cpu"), torch.float32), progress=False)
    reference = HFLM(pretrained=str(harness / "hf"), device="cpu", batch_size=1)
    requests = [Instance("generate_until", doc={}, arguments=(context, settings), idx=0)
                for context, settings in (("Once upon a time", {"until": ["\n"], "max_gen_toks": 20}),
                                          ("Question: what is two and two?\nAnswer:", {"max_gen_toks": 12}),
                                          ("The list:", {"until": [",", "."], "max_gen_toks": 30,
                                                         "do_sample": False}))]
    answers = ours.generate_until(requests)
    assert answers == reference.generate_until(requests)
    assert any(answers)  # something was generated
