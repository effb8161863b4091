"""The Hydra edge: the only place that composes config and reads the command line.

entry.py (hydra_entry: compose a command's config, --help; to_dataclass), errors.py
(one-line reports of user errors and stops), hydra_run_dir.py (claiming Hydra's run
directory, removing it if the task is refused), help.py (--help's text),
overrides.py (parsing overrides, once), resume.py (resume= and auto_resume:
rewriting the command line), sweeps.py (job names, W&B groups, the end-of-sweep
report). Commands (nanogpt/<command>.py) call hydra_entry and turn the composed
DictConfig into plain dataclasses.
"""
