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
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from nanogpt.errors import (
    ConfigError,
    DataError,
    UserError,
    describe_library_error,
    first_line,
    library_failure,
    require_package,
)
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


def quiet_about_shared_tags(record: logging.LogRecord) -> bool:
    """Drops lm-eval's warning that a tag "overrides" itself, which a task of one's own built on
    hellaswag (tagged multiple_choice) sets off: a tag comes from no file on either side, and the
    merge loses no task. An include that does replace a task of lm-eval's is still said.
    """
    return not (str(record.msg).startswith("Task '%s' from %s overrides") and record.args
                and tuple(record.args[1:]) == (None, None))


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
        logging.getLogger("lm_eval.tasks._index").addFilter(quiet_about_shared_tags)
        try:
            manager = TaskManager(include_path=include)
        except Exception as e:  # noqa: BLE001 (reported as lm-eval's, or re-raised as ours)
            raise lm_eval_failure(e, "reading its tasks", self.key) from None
        unknown = [name for name in options.tasks if name not in manager.all_tasks]
        if unknown:
            unreadable = unreadable_yaml(Path(include)) if include else []
            if unreadable:  # lm-eval skips a file it cannot read without a word: say which, and why
                (path, reason), more = unreadable[0], len(unreadable) - 1
                why = f"; {path} is not valid YAML: {reason}" + (f" ({more} more files there are not either)"
                                                                   if more else "")
            else:
                why = f"; `lm_eval ls tasks` lists them, {self.key}.include_path=DIR adds your own"
            raise ConfigError(f"{self.key}.tasks: lm-eval knows no task {', '.join(unknown)}"
                              + (f" (nor does {options.include_path})" if include else "") + why)
        lm = NanoGPTLM(subject.lm, subject.batch_size, subject.progress)
        try:
            output = lm_eval.simple_evaluate(model=lm, tasks=list(options.tasks), limit=options.limit,
                                             num_fewshot=options.num_fewshot, task_manager=manager,
                                             log_samples=False)
        except (ConnectionError, OSError) as e:  # a task whose data lm-eval could not fetch or read
            raise DataError(f"task=lm_eval could not load the data of {', '.join(options.tasks)} "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); offline, point a task "
                            f"YAML of your own at local files with {self.key}.include_path=DIR") from None
        except Exception as e:  # noqa: BLE001 (reported as lm-eval's, or re-raised as ours)
            raise lm_eval_failure(e, f"running {', '.join(options.tasks)}", self.key) from None
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


def lm_eval_failure(error: Exception, doing: str, key: str) -> Exception:
    """A failure inside lm-eval as one line, with its message and where it happened; anything else as it is.

    A task's YAML is handed to lm-eval as it is, and some of its mistakes (a
    metric option, an aggregation lm-eval lacks) only show when it scores.
    """
    if isinstance(error, UserError) or library_failure(error) != "lm-eval":
        return error  # ours (a ConfigError of our model, or a bug: its traceback)
    return DataError(f"task=lm_eval: lm-eval failed {doing} ({describe_library_error(error)}); check the "
                     f"task's YAML (its metric_list, doc_to_* and generation_kwargs; {key}.include_path)")


class _AnyTag(yaml.SafeLoader):
    """PyYAML's safe loader that reads lm-eval's own tags (!function) as plain values: for syntax alone."""


_AnyTag.add_multi_constructor("!", lambda loader, suffix, node: None)


def unreadable_yaml(folder: Path) -> list[tuple[Path, str]]:
    """(file, what PyYAML said, with its line and column) for each YAML file under folder that does not parse.

    lm-eval skips such a file without a word (it logs it at debug level), so a
    task named in it is only "unknown"; this says why.
    """
    found = []
    for path in sorted(folder.rglob("*.yaml")):
        try:
            yaml.load(path.read_text(encoding="utf-8"), Loader=_AnyTag)  # noqa: S506 (a safe loader)
        except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
            mark = getattr(e, "problem_mark", None)
            at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            found.append((path, f"{getattr(e, 'problem', None) or first_line(str(e))}{at}"))
    return found
