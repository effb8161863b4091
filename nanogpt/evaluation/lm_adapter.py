"""Our GPT as an lm-evaluation-harness model: NanoGPTLM, an lm_eval ``LM`` over our model and tokenizer.

lm-eval asks a model three things: the log-likelihood of a continuation after a
context, the log-likelihood of a whole text in rolling windows (perplexity
tasks), and greedy (or sampled) generation until a stop string. NanoGPTLM
subclasses lm-eval's TemplateLM, the LM that also underlies its Hugging Face
model, so requests are tokenized by lm-eval's own rules (context/continuation
split, empty contexts, rolling windows); the scoring is
nanogpt/evaluation/scoring.py, on our model as it is: no export, no Hugging Face
copy. This module imports lm_eval, an optional package; harness.py imports it
only once that package is known to be there.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from nanogpt.errors import ConfigError
from nanogpt.evaluation.scoring import score_requests
from nanogpt.generation.language_model import LanguageModel
from nanogpt.generation.sampling import Sampling

MAX_GEN_TOKS = 256  # lm-eval's default for generate_until requests that name none


class NanoGPTLM(TemplateLM):
    """An lm-eval model: our LanguageModel (a GPT in eval mode on its device, its tokenizer, its decoding)."""

    def __init__(self, lm: LanguageModel, batch_size: int = 8, progress: bool = True):
        super().__init__()
        self.lm, self.model = lm, lm.model
        self._device, self.dtype, self._batch_size, self.progress = lm.device, lm.dtype, batch_size, progress

    @property
    def eot_token_id(self) -> int:
        # A vocabulary without an end-of-text token (a character model) has nothing better than id 0
        # to put before a text that is scored from its first token.
        eot = self.lm.tokenizer.eot
        return eot if eot is not None else 0

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.lm.tokenizer.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.lm.tokenizer.decode([tokens] if isinstance(tokens, int) else list(tokens))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids), as TemplateLM encodes them."""
        results = self.score([(context, continuation) for _, context, continuation in requests], disable_tqdm)
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood from its first token, in windows of the model's block (lm-eval's)."""
        windows, owners = [], []
        for owner, (text,) in enumerate(request.args for request in requests):
            for window in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(window)
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self.score(windows, disable_tqdm), strict=True):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate after each context until a stop string or max_gen_toks tokens; the text before it."""
        eos = self.tok_decode(self.eot_token_id) if self.lm.tokenizer.eot is not None else None
        answers = []
        for request in tqdm(requests, desc="generating", disable=disable_tqdm or not self.progress or None):
            context, settings = request.args
            settings = normalize_gen_kwargs(settings, MAX_GEN_TOKS)
            stops = handle_stop_sequences(settings.pop("until", None), eos=eos)
            new_tokens = settings.pop("max_gen_toks")
            room = self.max_length - new_tokens
            if room <= 0:
                raise ConfigError(f"a task asks for {new_tokens} new tokens, which leaves no room for a "
                                  f"context in the model's block of {self.max_length}")
            context_ids = self.tok_encode(context)[-room:] or [self.eot_token_id]
            temperature = settings.get("temperature", 0.0) if settings.get("do_sample") else 0.0
            # Greedy unless the task samples; the text ends before the first stop string, as lm-eval cuts it.
            sampling = Sampling(temperature, top_k=None, stop=stops, max_new_tokens=new_tokens)
            text = "".join(piece for pieces in self.lm.texts(context_ids, 1, sampling) for piece in pieces)
            answer = postprocess_generated_text(generation=text, stop=stops, think_end_token=None)
            answers.append(answer)
            self.cache_hook.add_partial("generate_until", request.args, answer)
        return answers

    def score(self, requests, disable_tqdm: bool) -> list[tuple[float, bool]]:
        return score_requests(self.model, requests, self._batch_size, self.device, self.dtype,
                              progress=self.progress and not disable_tqdm, desc="lm_eval")
