"""The batched decoding engine and the detokenizer, in-process: no HTTP, no server.

The reference for every generation is LanguageModel.tokens, the loop
``nanogpt.sample`` and ``LanguageModel.stream`` use: a generation served alone,
or among others that join and leave at any step, must give exactly its tokens
for the same prompt, settings and seed, across window refills at block_size.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import replace

import pytest
import torch

import nanogpt
from nanogpt.generation.batching import LENGTH, STOP, Engine, Generation
from nanogpt.generation.detokenize import Detokenizer
from nanogpt.generation.sampling import Sampling
from nanogpt.model import GPTConfig
from nanogpt.text.tokenizers import GPT2_TOKENIZER, tiktoken_encoding

from .test_load import VOCABULARY, write_our_checkpoint

CHAR_MODEL = GPTConfig(vocab_size=len(VOCABULARY), block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
SETTINGS = [Sampling(0.8, 200, None, 1), Sampling(1.0, 5, 0.9, 7), Sampling(0.0, None, None, 3),
            Sampling(1.3, None, None, 11), Sampling(0.7, 40, 0.5, 12345)]
PROMPTS = ["ROMEO:", "A", "JULIET: what light through yonder window breaks", "xyz", "NURSE:\nHo"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    run = tmp_path_factory.mktemp("batching") / "run"
    write_our_checkpoint(run / "best.pt", CHAR_MODEL, {"kind": "char", "vocabulary": VOCABULARY})
    return nanogpt.load(run, device="cpu")


@pytest.fixture
def engine(lm):
    running = Engine(lm, 3).start()
    yield running
    running.stop()


def reference(lm, prompt: str, tokens: int, s: Sampling) -> list[int]:
    return [row[0] for row in lm.tokens(lm.encode(prompt), 1, budget(s, tokens))]


def budget(s: Sampling, tokens: int) -> Sampling:
    return replace(s, max_new_tokens=tokens)


def test_a_generation_alone_is_exactly_the_sampling_loop(lm, engine):
    for prompt, settings in zip(PROMPTS, SETTINGS, strict=True):
        # 80 tokens from a 32-token block: the row is filled again from the newest half window, twice.
        got = list(engine.generate(lm.encode(prompt), budget(settings, 80)))
        assert got == reference(lm, prompt, 80, settings)
    assert engine.busy == 0


def test_generations_joining_and_leaving_at_any_step_each_get_their_own_tokens(lm, engine):
    """13 generations over 3 slots (so most wait), arriving at random moments, of different lengths."""
    jobs = [(PROMPTS[i % 5], 10 + 9 * i, SETTINGS[(i * 2) % 5]) for i in range(13)]
    got: dict[int, list[int]] = {}
    rng = random.Random(0)
    delays = [rng.uniform(0, 0.05) for _ in jobs]

    def run(i: int) -> None:
        time.sleep(delays[i])
        prompt, tokens, settings = jobs[i]
        got[i] = list(engine.generate(lm.encode(prompt), budget(settings, tokens)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(got) == list(range(len(jobs)))
    for i, (prompt, tokens, settings) in enumerate(jobs):
        assert got[i] == reference(lm, prompt, tokens, settings), f"generation {i} differs from it alone"


def test_a_cancelled_generation_frees_its_row_before_the_next_step(lm, engine):
    long = engine.generate(lm.encode("ROMEO:"), budget(SETTINGS[0], 100_000))
    next(long)
    assert engine.busy == 1
    long.close()  # the caller went away
    short = list(engine.generate(lm.encode("JULIET:"), budget(SETTINGS[1], 20)))
    assert short == reference(lm, "JULIET:", 20, SETTINGS[1])
    assert engine.busy == 0 and engine.queued == 0
    assert engine.generated < 10_000  # the long one stopped at once, far short of its 100,000 tokens


def test_a_stop_token_ends_a_generation_and_a_listener_may_end_it_too(lm, engine):
    ids = lm.encode("ROMEO:")
    free = reference(lm, "ROMEO:", 30, SETTINGS[2])
    stop_token = free[10]
    heard, reasons = [], []
    done = threading.Event()

    def finished(reason: str) -> None:
        reasons.append(reason)
        done.set()

    engine.submit(Generation(ids, budget(SETTINGS[2], 30), stop_ids=[stop_token],
                             on_token=lambda t, _: heard.append(t), on_finish=finished))
    assert done.wait(60)
    assert reasons == [STOP] and heard == free[:free.index(stop_token) + 1]  # heard, then the end

    heard, reasons = [], []
    done.clear()
    def fourth(token: int, _) -> bool:
        heard.append(token)
        return len(heard) == 4

    engine.submit(Generation(ids, budget(SETTINGS[2], 30), on_token=fourth, on_finish=finished))
    assert done.wait(60)
    assert reasons == [STOP] and heard == free[:4]

    reasons.clear()
    done.clear()
    engine.submit(Generation(ids, budget(SETTINGS[2], 5), on_finish=finished))
    assert done.wait(60) and reasons == [LENGTH]


def test_log_probabilities_are_the_models_before_temperature(lm, engine):
    ids = lm.encode("ROMEO:")
    heard = []
    done = threading.Event()
    engine.submit(Generation(ids, Sampling(1.5, None, None, 2, max_new_tokens=3), top_logprobs=3,
                             on_token=lambda t, lp: heard.append((t, lp)), on_finish=lambda _: done.set()))
    assert done.wait(60)
    with torch.no_grad():
        context = ids + [token for token, _ in heard]
        logits, _ = lm.model(torch.tensor([context]), torch.tensor([context]))
    table = logits[0].log_softmax(-1)
    for n, (token, logprobs) in enumerate(heard):
        row = table[len(ids) - 1 + n]
        assert logprobs.logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert [t for t, _ in logprobs.top] == row.topk(3).indices.tolist()


def test_the_engine_stops_promptly_and_ends_what_it_held(lm):
    engine = Engine(lm, 1).start()
    reasons = []
    for prompt in ("ROMEO:", "JULIET:"):  # one decoding, one waiting for the slot
        engine.submit(Generation(lm.encode(prompt), budget(SETTINGS[0], 100_000), on_finish=reasons.append))
    while engine.busy == 0:
        time.sleep(0.01)
    engine.stop()
    assert reasons == ["aborted", "aborted"]
    refused = engine.generate(lm.encode("ROMEO:"), Sampling(max_new_tokens=5))
    assert list(refused) == []  # refused at once, not hanging


def test_the_detokenizer_never_shows_a_stop_string_or_half_a_character():
    encoding = tiktoken_encoding(GPT2_TOKENIZER["encoding"])
    text = "Naïve café: the 😀 stays. END here"
    ids = encoding.encode_ordinary(text)
    detokenizer = Detokenizer(encoding.decode, stops=["END", "stays!"])
    pieces = [detokenizer.add(token) for token in ids]
    assert "".join(pieces) == detokenizer.shown == "Naïve café: the 😀 stays. "
    assert detokenizer.stopped and detokenizer.finish() == ""
    assert all("\ufffd" not in piece for piece in pieces)
    # "stays" was held back while it could still become "stays!", then shown when it could not.
    assert not any(piece.endswith("stays") for piece in pieces)

    plain = Detokenizer(encoding.decode, stops=["\n\n"], skip_prefix=" ")
    pieces = [plain.add(token) for token in encoding.encode_ordinary(" Hello\n")]
    assert "".join(pieces) == "Hello" and plain.finish() == "\n" and plain.shown == "Hello\n"


def test_a_character_model_answer_ends_at_a_blank_line_as_chat_does(lm):
    """The same text as LanguageModel.chat, for a vocabulary without an end-of-text token."""
    decode = lm.decode
    ids = lm.encode(" Good day\nsir\n\nUser: more")
    detokenizer = Detokenizer(decode, stops=["\n\n"], skip_prefix=" ")
    text = "".join(detokenizer.add(token) for token in ids) + detokenizer.finish()
    assert text == "Good day\nsir" and detokenizer.stopped
