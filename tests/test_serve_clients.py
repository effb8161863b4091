"""The field's own clients against one server: lm-evaluation-harness over HTTP, a real browser on the page.

A small random GPT-2-BPE model of ours is served on a loopback port.

* lm-eval's ``local-completions`` model (its own HTTP client, tokenizing
  through the server's /tokenize) scores lm-eval's hellaswag task on a local
  HellaSwag-format file: acc and acc_norm must be exactly what
  ``python -m nanogpt.eval task=hellaswag`` gives on the same checkpoint.
* Debian's chromium, headless, driven by selenium through chromium-driver,
  opens the chat page, types messages and sees the answers stream in; each is
  the answer the openai package gets for the same conversation and seed; a
  long answer is stopped and its slot is free at once. Skipped where chromium
  is not installed, except in CI, whose .ci/run installs it.
"""

from __future__ import annotations

import json
import os
import subprocess

import lm_eval
import openai
import pytest

from .conftest import run_module
from .hellaswag_examples import HAND_WRITTEN, write_jsonl
from .server_process import ServerProcess
from .test_eval import last_json
from .test_eval_harness import offline_env
from .test_eval_tasks import BPE_MODEL
from .test_load import write_our_checkpoint

NAME = "tiny-bpe"
LONGEST = 3000  # the server's max_tokens: an answer long enough to be stopped half-way


@pytest.fixture(scope="module")
def root(tmp_path_factory, bpe_cache):
    from nanogpt.text.tokenizers import GPT2_TOKENIZER

    root = tmp_path_factory.mktemp("serve_clients")
    write_our_checkpoint(root / "run" / "best.pt", BPE_MODEL, GPT2_TOKENIZER)
    return root


@pytest.fixture(scope="module")
def server(root):
    process = ServerProcess(f"ckpt={root / 'run'}", f"name={NAME}", f"max_tokens={LONGEST}", "slots=4",
                            cwd=root)
    yield process
    process.stop()


pytestmark = pytest.mark.slow  # a browser and lm-eval, each starting up for seconds: the slow tier


def test_lm_eval_over_http_scores_hellaswag_as_nanogpt_eval_does(root, server):
    tasks = root / "tasks"
    tasks.mkdir()
    hellaswag_yaml = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "hellaswag", "hellaswag.yaml")
    data = write_jsonl(root / "hellaswag.jsonl", HAND_WRITTEN)
    (tasks / "hellaswag_local.yaml").write_text(
        f"include: {hellaswag_yaml}\ntask: hellaswag_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\ntraining_split: null\n"
        "validation_split: validation\n")
    env = {**os.environ, **offline_env(root)}
    env.pop("HYDRA_FULL_ERROR", None)
    # As docs/serving.md has it: the model's name, the completions URL, the model's block as max_length.
    over_http = subprocess.Popen(
        ["lm_eval", "--model", "local-completions", "--model_args",
         f"model={NAME},base_url={server.url}/v1/completions,num_concurrent=4,"
         f"max_length={BPE_MODEL.block_size}",
         "--tasks", "hellaswag_local", "--include_path", str(tasks),
         "--output_path", str(root / "lm_eval_out")],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ours = run_module("nanogpt.eval", "ckpt=run", "task=hellaswag", "task.source=hellaswag.jsonl",
                      "device=cpu", cwd=root)
    _, errors = over_http.communicate(timeout=600)
    assert over_http.returncode == 0, errors[-3000:]
    assert "Using remote tokenizer" in errors  # lm-eval found the server's tokenizer routes by itself
    assert ours.returncode == 0, ours.stderr
    scored = last_json(ours.stdout)
    results = json.loads(next((root / "lm_eval_out").rglob("results_*.json")).read_text())["results"]
    measured = results["hellaswag_local"]
    assert (measured["acc,none"], measured["acc_norm,none"]) == (scored["acc"], scored["acc_norm"])
    assert scored["examples"] == len(HAND_WRITTEN)


def test_the_chat_page_streams_answers_keeps_the_conversation_and_stops(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)
    browser.get(f"{server.url}/")
    wait.until(lambda d: d.find_element(By.ID, "model").text == NAME)
    browser.find_element(By.CSS_SELECTOR, "details summary").click()  # the settings
    browser.find_element(By.ID, "seed").send_keys("7")
    browser.find_element(By.ID, "max-tokens").send_keys("200")
    # Every length the newest answer shows on the page, as it changes.
    browser.execute_script("""
        window.lengths = [];
        new MutationObserver(() => {
          const answers = document.querySelectorAll('.message.assistant .content');
          if (answers.length) window.lengths.push(answers[answers.length - 1].textContent.length);
        }).observe(document.getElementById('conversation'),
                   {subtree: true, childList: true, characterData: true});
    """)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    conversation = []
    for message in ("Hello there", "Tell me more"):
        browser.execute_script("window.lengths = [];")
        box = browser.find_element(By.ID, "input")
        box.send_keys(message)
        box.send_keys(Keys.ENTER)
        answers = len(conversation) // 2 + 1
        wait.until(lambda d, answers=answers:
                   len(d.find_elements(By.CSS_SELECTOR, ".message.assistant")) == answers
                   and d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
        shown = browser.execute_script("const a = document.querySelectorAll('.message.assistant .content'); "
                                       "return a[a.length - 1].textContent;")
        conversation.append({"role": "user", "content": message})
        expected = client.chat.completions.create(model=NAME, messages=conversation, max_tokens=200, seed=7,
                                                  temperature=0.8).choices[0].message.content
        assert shown == expected
        assert len(set(browser.execute_script("return window.lengths;"))) > 2  # it grew piece by piece
        conversation.append({"role": "assistant", "content": shown})
    assert not browser.find_elements(By.CSS_SELECTOR, ".message.error")

    # A long answer, stopped as soon as it shows: the page keeps what came, the server frees the slot.
    before = server.health()["tokens_generated"]
    limit = browser.find_element(By.ID, "max-tokens")
    limit.clear()
    limit.send_keys(str(LONGEST))
    # The page clicks Stop itself as soon as the answer shows: a click sent from here could come
    # after a fast machine had finished the answer, when Stop is hidden again.
    browser.execute_script("""
        window.stopWasShown = null;
        new MutationObserver((_, observer) => {
          const answers = document.querySelectorAll('.message.assistant .content');
          if (answers.length === 3 && answers[2].textContent.length > 0) {
            observer.disconnect();
            const stop = document.getElementById('stop');
            window.stopWasShown = !stop.hidden;
            stop.click();
          }
        }).observe(document.getElementById('conversation'),
                   {subtree: true, childList: true, characterData: true});
    """)
    box = browser.find_element(By.ID, "input")
    box.send_keys("Go on and on")
    box.send_keys(Keys.ENTER)
    wait.until(lambda d: d.execute_script("return window.stopWasShown !== null;"))
    assert browser.execute_script("return window.stopWasShown;")  # Stop is offered while it streams
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
    assert browser.find_elements(By.CSS_SELECTOR, ".message.assistant.stopped")
    server.wait_until_idle()
    assert server.health()["tokens_generated"] - before < LONGEST  # cut short, not run to the end
    browser.find_element(By.ID, "clear").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".message") == []

    # A message longer than the model's context, and no limit asked: the page says what was cut.
    limit.clear()
    box = browser.find_element(By.ID, "input")
    box.send_keys("word " * (2 * BPE_MODEL.block_size))
    box.send_keys(Keys.ENTER)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
    notes = [note.text for note in browser.find_elements(By.CSS_SELECTOR, ".message.assistant .note")]
    block = BPE_MODEL.block_size
    assert any(f"longer than the model's {block}-token context: its first" in note for note in notes), notes
    assert any(f"fill the model's {block}-token context" in note for note in notes), notes


def test_the_chat_pages_switch_shades_each_token_by_its_probability(browser, server):
    import math

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)
    browser.get(f"{server.url}/")
    wait.until(lambda d: d.find_element(By.ID, "model").text == NAME)
    switch = browser.find_element(By.ID, "shade")
    assert "before temperature, top-k and top-p" in switch.find_element(By.XPATH, "..").get_attribute("title")
    switch.click()
    browser.find_element(By.CSS_SELECTOR, "details summary").click()
    browser.find_element(By.ID, "seed").send_keys("3")
    browser.find_element(By.ID, "max-tokens").send_keys("12")
    box = browser.find_element(By.ID, "input")
    box.send_keys("Hello there")
    box.send_keys(Keys.ENTER)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant")
               and d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
    spans = browser.find_elements(By.CSS_SELECTOR, ".message.assistant .content .token")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    expected = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Hello there"}], max_tokens=12, seed=3,
        temperature=0.8, logprobs=True, top_logprobs=5).choices[0].logprobs.content
    assert [s.get_attribute("textContent") for s in spans] == [e.token for e in expected] and len(spans) > 2
    assert [float(s.get_attribute("data-p")) for s in spans] == \
        pytest.approx([math.exp(e.logprob) for e in expected], abs=1e-4)
    assert "shaded" in browser.find_element(By.TAG_NAME, "body").get_attribute("class")
    ActionChains(browser).move_to_element(spans[2]).perform()
    shown = browser.find_element(By.ID, "alternatives")
    assert shown.is_displayed() and f"p = {100 * math.exp(expected[2].logprob):.1f}%" in shown.text
    rows = shown.find_elements(By.CSS_SELECTOR, ".alt")
    likeliest = expected[2].top_logprobs[0].token.replace(" ", "␣").replace("\n", "↵")
    assert len(rows) == 5 and rows[0].text.startswith(f"“{likeliest}”")
    switch.click()  # off: the answer stays, unshaded
    assert "shaded" not in browser.find_element(By.TAG_NAME, "body").get_attribute("class")
