"""lm-evaluation-harness tasks on any model gtakit loads (`gtakit eval --tasks`), through lm-eval's own HF model
wrapper: loglikelihood and generation requests run the model's own forward and `generate`, so a converted model is
scored with its compressed cache exactly as it will be used."""

from __future__ import annotations

import json
from pathlib import Path

from gtakit.errors import GtakitError


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise GtakitError("--tasks needs lm-evaluation-harness: pip install 'gtakit[eval]'") from None
    return lm_eval, HFLM, TaskManager


def run_tasks(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None = None,
    include_path: str | None = None,
    batch_size: int = 1,
    log_samples: bool = False,
) -> dict:
    """lm-eval's `simple_evaluate` results for `tasks` (names from its registry or from `include_path`)."""
    lm_eval, HFLM, TaskManager = _lm_eval()
    if include_path is not None and not Path(include_path).expanduser().is_dir():
        raise GtakitError(f"--include-path {include_path} is not a folder of lm-eval task YAML files")
    manager = TaskManager(include_path=str(Path(include_path).expanduser()) if include_path else None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise GtakitError(f"unknown lm-eval task(s) {', '.join(unknown)}; list them with `lm-eval ls tasks`, or "
                          "pass --include-path DIR for your own task files")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                       log_samples=log_samples)
    except (ConnectionError, OSError) as err:  # dataset download of a registry task without the Hub
        raise GtakitError(f"lm-eval could not load the task data ({str(err).splitlines()[0]}); connect to the "
                          "Hub, or use a local task (--include-path)") from None


def results_table(results: dict) -> str:
    from lm_eval.utils import make_table

    return make_table(results)


def results_json(results: dict) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable)
