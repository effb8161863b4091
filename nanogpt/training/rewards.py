"""The reward of objective=grpo: a plain Python function the user writes, and the one shipped here.

``objective.reward=my_module:score`` (a module Python can import from where the
command runs) or ``objective.reward=path/to/file.py:score`` names a function

    def score(prompt: str, answer: str, example: dict) -> float

called once for every sampled answer: prompt is the example's prompt (the last
user message of a conversation), answer the text the model wrote (as ``lm.chat``
returns it: without the space the template puts before it, ending before the
end-of-answer), and example every field of the example's JSON line, so a
reference answer, test cases or anything else the reward needs travels with the
prompt. It runs in the training process, seeded per process like sampling.
A reward that cannot be imported, raises, or returns anything but a finite
number stops the run with one line naming the function and the example.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nanogpt.errors import ConfigError, UserError


class RewardError(UserError):
    """The user's reward function failed on an example, or returned something that is not a number."""


def exact_match(prompt: str, answer: str, example: dict) -> float:
    """1.0 when the answer is the example's reference ("answer", else "response"), else 0.0.

    Leading and trailing whitespace is ignored.
    """
    reference = example.get("answer", example.get("response"))
    if not isinstance(reference, str):
        raise ValueError('exact_match compares with a reference answer: give each example an "answer" '
                         '(or "response") string')
    return float(answer.strip() == reference.strip())


@dataclass
class Reward:
    """A reward function, loaded from where objective.reward names it, and the checks around each call."""

    spec: str
    function: Callable[[str, str, dict], object]

    @classmethod
    def load(cls, spec: str) -> Reward:
        """Import spec's function ("module:function" or "path/to/file.py:function"), or one line why not."""
        where, _, name = spec.rpartition(":")
        key = f"objective.reward={spec}"
        try:
            if where.endswith(".py"):
                path = Path(where).expanduser()
                if not path.is_file():
                    raise ConfigError(f"{key}: {path} is not a file; give path/to/file.py:function "
                                      "or module:function")
                module_spec = importlib.util.spec_from_file_location(f"nanogpt_reward_{path.stem}", path)
                module = importlib.util.module_from_spec(module_spec)
                module_spec.loader.exec_module(module)
            else:
                if "" not in sys.path:  # a module beside the command, as `python -m` finds it
                    sys.path.insert(0, "")
                module = importlib.import_module(where)
        except ConfigError:
            raise
        except Exception as error:  # noqa: BLE001  (whatever importing the user's code raises, said in one line)
            raise ConfigError(f"{key}: cannot import {where} ({type(error).__name__}: {error})") from None
        function = getattr(module, name, None)
        if not callable(function):
            raise ConfigError(f"{key}: {where} has no function {name!r}")
        return cls(spec, function)

    def score(self, prompt: str, answer: str, example: dict, where: str) -> float:
        """The function's reward for one answer, as a float; where names the example for an error."""
        about = f"objective.reward={self.spec} on the example at {where} (answer {answer[:40]!r})"
        try:
            value = self.function(prompt, answer, example)
        except Exception as error:  # noqa: BLE001  (the user's code: any failure is theirs, in one line)
            raise RewardError(f"{about} raised {type(error).__name__}: {error}") from None
        if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise RewardError(f"{about} returned {value!r} ({type(value).__name__}); a reward must be a "
                              "finite number")
        return float(value)
