"""``study.run``: one call runs a method over a dataset, resumably, locally or on Ray.

The driver (this process) records the configuration, skips the examples already in ``out``, hands the
rest to the engine and writes each example's rows as it arrives, with a progress bar (examples done
/ total, ETA). Interrupting it (Ctrl-C) loses at most the examples in flight; running the same call
again finishes the study.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from tqdm.auto import tqdm

from mm_lens.data import LLAVA_TEMPLATE, Example
from mm_lens.study import methods
from mm_lens.study.config import StudyConfig, check_same, jsonable, model_identity, now, placement_free, versions
from mm_lens.study.loaders import load_dataset, with_ids
from mm_lens.study.results import Writer, finished, load_results, remove_ids, summary_counts
from mm_lens.study.worker import FILTERS, WorkerSpec

ENGINES = ("local", "ray")


@dataclass
class StudyRun:
    """What a call of :func:`run` did: ``counts`` of every example in ``out`` by status, how many this call
    ``processed`` and ``skipped`` (already done), its ``seconds``, and Ray worker ``restarts``."""

    out: str
    config: StudyConfig
    total: int
    processed: int
    skipped: int
    counts: dict
    seconds: float
    restarts: int = 0
    stats: dict = field(default_factory=dict)

    @property
    def examples_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else float("nan")

    def results(self, status="ok"):
        return load_results(self.out, status)

    def summary(self, **kwargs):
        from mm_lens.study.summary import summarize

        return summarize(self.results(), **kwargs)


def run(model: Any, dataset: Any, method: Union[str, methods.Method] = "knockout", method_kwargs: Optional[dict] = None,
        out: str = "study_results", engine: str = "local", ray_address: Optional[str] = None, workers: int = 1,
        model_kwargs: Optional[dict] = None, worker_resources: Optional[dict] = None, template: str = LLAVA_TEMPLATE,
        filter: Union[str, Callable, None] = "correct", columns: tuple = (), part_size: int = 1,
        retry_errors: bool = False, max_retries: int = 2, progress: bool = True,
        callback: Optional[Callable[[str, str], None]] = None) -> StudyRun:
    """Run ``method`` on every example of ``dataset`` and write tidy Parquet results to ``out``.

    ``model``: a hub id, a local folder, ``"mm-lens/shapes"``, or (local engine) a loaded model.
    ``dataset``: anything :func:`load_dataset` reads, or its result. ``method``: a name of
    :data:`mm_lens.study.methods.METHODS` or a :class:`~mm_lens.study.methods.Method`; ``method_kwargs``
    go to it. ``engine="ray"`` runs ``workers`` actors (one model replica each, ``worker_resources``
    per actor, e.g. ``{"num_gpus": 1}``) on the cluster at ``ray_address`` (None: the current session or
    a new local one; ``"auto"``; ``"ray://host:port"``). ``model_kwargs`` go to
    ``HookedVLM.from_pretrained`` (``dtype="bfloat16"``, ``device``). ``template``: the prompt,
    ``{question}`` filled in. ``filter``: ``"correct"`` (keep examples the model answers correctly),
    ``None``, or ``fn(example, predicted_text) -> reason or None``. ``columns``: keys of each example's
    ``extra`` copied into its rows (e.g. ``("kind",)``). ``part_size``: examples per Parquet part.
    ``retry_errors``: run again the examples that ended in an error. ``callback(example_id, status)``
    is called after each example is written.

    Rerunning with the same arguments skips finished examples; a different configuration is refused.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "ray" and not isinstance(model, (str, os.PathLike)):
        raise TypeError("engine='ray' loads the model in every worker: pass its name or folder, not a loaded model")
    if model_kwargs and not isinstance(model, (str, os.PathLike)):
        raise ValueError("model_kwargs are for loading a model by name; this model is loaded already")
    if not (filter is None or callable(filter) or filter in FILTERS):
        raise ValueError(f"filter must be one of {FILTERS}, None or a callable (example, predicted) -> reason")
    if engine == "ray":
        from mm_lens.study.ray_engine import require_ray

        require_ray()
    spec_method = methods.get(method)
    kwargs = {**spec_method.defaults, **(method_kwargs or {})}
    if spec_method.check is not None:
        spec_method.check(kwargs)
    model_kwargs = dict(model_kwargs or {})
    examples = _examples(dataset)
    model = str(model) if isinstance(model, os.PathLike) else model

    with Writer(out, part_size) as writer:
        recorded = StudyConfig.load(out)
        name, model_id, checked = model_identity(model, recorded)
        config = StudyConfig(
            model=name, model_id=model_id, method=spec_method.name, method_kwargs=jsonable(kwargs),
            model_kwargs=placement_free(model_kwargs), template=template, filter=_filter_name(filter),
            columns=list(columns), versions=versions(), created=recorded.created if recorded else now(),
            dataset={"examples": len(examples), "source": dataset if isinstance(dataset, str) else type(dataset).__name__},
            engine={"engine": engine, "workers": workers, "ray_address": ray_address}, files_checked=checked)
        check_same(recorded, config, out)
        config.save(out)
        done = finished(out)
        if retry_errors:
            errors = {i for i, s in done.items() if s == "error"}
            remove_ids(out, errors)
            done = {i: s for i, s in done.items() if i not in errors}
        todo = [ex for ex in examples if ex.id not in done]
        if engine == "ray":  # actors may not share this process's working directory
            model, todo = _absolute(model), [_absolute_image(ex) for ex in todo]
        spec = WorkerSpec(model, model_kwargs, spec_method, kwargs, template, filter, tuple(columns))
        statuses = dict(done)
        bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc=f"study {spec_method.name}",
                   unit="example", disable=not progress)

        def sink(example_id: str, rows) -> None:
            writer.add(rows)
            statuses[example_id] = str(rows["status"].iloc[0])
            counts = summary_counts(statuses)
            bar.set_postfix(dropped=counts["dropped"], errors=counts["error"], refresh=False)
            bar.update(1)
            if callback is not None:
                callback(example_id, statuses[example_id])

        started = time.perf_counter()
        try:
            stats = _execute(engine, spec, todo, sink, workers, ray_address, worker_resources, max_retries,
                             config.versions)
        finally:
            bar.close()
        seconds = time.perf_counter() - started
    return StudyRun(out, config, len(examples), len(todo), len(examples) - len(todo), summary_counts(statuses), seconds,
                    stats.get("restarts", 0), stats)


def _execute(engine, spec, todo, sink, workers, ray_address, worker_resources, max_retries, expected_versions) -> dict:
    if engine == "local":
        if ray_address is not None or worker_resources is not None:
            raise ValueError("ray_address and worker_resources are for engine='ray'")
        from mm_lens.study import local

        return local.execute(spec, todo, sink, workers)
    from mm_lens.study import ray_engine

    return ray_engine.execute(spec, todo, sink, workers, ray_address, worker_resources, max_retries,
                              expected_versions=expected_versions)


def _examples(dataset: Any) -> list[Example]:
    if isinstance(dataset, (list, tuple)) and all(isinstance(x, Example) for x in dataset):
        return with_ids(dataset)
    return load_dataset(dataset)


def _absolute(path: Any) -> Any:
    return os.path.abspath(path) if isinstance(path, str) and os.path.exists(path) else path


def _absolute_image(example: Example) -> Example:
    image = _absolute(example.image)
    return example if image is example.image else dataclasses.replace(example, image=image)


def _filter_name(f) -> str:
    if f is None:
        return "none"
    return jsonable(f) if callable(f) else f
