"""Any lm-evaluation-harness task (``task=lm_eval task.tasks=[...]``), run on our model directly.

lm-eval (EleutherAI's lm-evaluation-harness, the tool papers report with) is an
optional package: ``pip install -e ".[eval]"``. Its evaluator runs the tasks on
NanoGPTLM (lm_adapter.py), and the result's ``results`` is exactly the object
lm-eval returns: per task, each metric under lm-eval's own key ("acc,none",
"acc_norm,none", their "_stderr" partners, "alias"). Tasks of your own are YAML
files in a folder given as ``task.include_path``, as lm-eval's ``--include_path``
takes them; that is also how an offline machine points a task at local files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from nanogpt.errors import ConfigError, DataError, require_package
from nanogpt.evaluation.tasks import Subject, Task, task_name
from nanogpt.options import option, require


@dataclass
class LmEvalOptions:
    """``task=lm_eval``: which lm-evaluation-harness tasks, and how."""

    name: str = task_name("lm_eval")
    tasks: list[str] = option(default_factory=list, help="lm-eval task, group or tag names, e.g. "
                              "[lambada_openai,arc_easy] (`lm_eval ls tasks` lists them)")
    include_path: str | None = option(None, "a folder of task YAML files of your own (lm-eval's "
                                            "--include_path)")
    limit: int | None = option(None, "score only the first N examples of each task; null: all")
    num_fewshot: int | None = option(None, "examples shown before each question; null: each task's default")

    def __post_init__(self) -> None:
        require(self.limit is None or self.limit >= 1, f"limit={self.limit} must be at least 1 (or null)")
        require(self.num_fewshot is None or self.num_fewshot >= 0,
                f"num_fewshot={self.num_fewshot} must be 0 or more (or null)")


class LmEvalTask(Task):
    """lm-evaluation-harness tasks, scored through its own evaluator."""

    name = "lm_eval"
    Options = LmEvalOptions

    def require_packages(self, needed_for: str) -> None:
        require_package("lm_eval", "eval", needed_for, "lm-eval")

    def check(self) -> None:
        options = self.options
        self.require_packages(f"task={self.name}")
        if not options.tasks:
            raise ConfigError(f"{self.key}.tasks is empty; name lm-eval tasks, e.g. "
                              f"{self.key}.tasks=[lambada_openai] (`lm_eval ls tasks` lists them)")
        if options.include_path is not None and not Path(options.include_path).expanduser().is_dir():
            raise DataError(f"{self.key}.include_path={options.include_path} is not a folder; give the "
                            "folder that holds your task YAML files")

    def run(self, subject: Subject) -> dict:
        options = self.options
        self.check()
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable

        from nanogpt.evaluation.lm_adapter import NanoGPTLM

        include = str(Path(options.include_path).expanduser()) if options.include_path else None
        manager = TaskManager(include_path=include)
        unknown = [name for name in options.tasks if name not in manager.all_tasks]
        if unknown:
            raise ConfigError(f"{self.key}.tasks: lm-eval knows no task {', '.join(unknown)}"
                              + (f" (nor does {options.include_path})" if include else "")
                              + f"; `lm_eval ls tasks` lists them, {self.key}.include_path=DIR adds your own")
        lm = NanoGPTLM(subject.model, subject.tokenizer, subject.device, subject.dtype, subject.batch_size,
                       subject.progress)
        try:
            output = lm_eval.simple_evaluate(model=lm, tasks=list(options.tasks), limit=options.limit,
                                             num_fewshot=options.num_fewshot, task_manager=manager,
                                             log_samples=False)
        except (ConnectionError, OSError) as e:  # a task whose data lm-eval could not fetch or read
            raise DataError(f"task=lm_eval could not load the data of {', '.join(options.tasks)} "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); offline, point a task "
                            f"YAML of your own at local files with {self.key}.include_path=DIR") from None
        # lm-eval's numbers may be numpy scalars; its own serializer makes them plain JSON.
        results = json.loads(json.dumps(output["results"], default=handle_non_serializable))
        examples = sum(int(counts.get("effective", 0)) for counts in output.get("n-samples", {}).values())
        return {"tasks": list(options.tasks), "results": results, "examples": examples}

    def describe(self, result: dict) -> str:
        return ", ".join(f"{key} {value:.4f}" for key, value in self.metrics(result).items()) or "no metrics"

    def metrics(self, result: dict) -> dict[str, float]:
        """Each task's numeric metrics as TASK_METRIC (lm-eval's "acc,none" becomes acc), no stderr."""
        figures = {}
        for task, values in result["results"].items():
            for key, value in values.items():
                metric, comma, filtered = key.partition(",")  # lm-eval's metric keys are "metric,filter"
                if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)) \
                        or isinstance(value, bool):
                    continue
                suffix = "" if filtered in ("", "none") else f"_{filtered}"
                figures[re.sub(r"[^\w.-]", "_", f"{task}_{metric}{suffix}")] = float(value)
        return figures
