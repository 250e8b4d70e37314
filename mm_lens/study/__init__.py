"""Studies at dataset scale: any method over thousands of examples, resumable, on one machine or a Ray cluster.

Example::

    from mm_lens import study
    ds = study.load_dataset("questions.jsonl")        # or a Hugging Face dataset, the GQA layout, VQA-Constraints CSVs
    run = study.run("mm-lens/shapes", ds, method="knockout", method_kwargs=dict(edges="paper", window=9),
                    out="results/knockout")           # engine="ray", workers=N for a cluster
    df = study.load_results("results/knockout")       # tidy: one row per (example, output cell)
    study.summarize(df)                                # mean and 95% interval per edge and layer

Files: :mod:`~mm_lens.study.loaders` (datasets), :mod:`~mm_lens.study.methods` (the registry) and
:mod:`~mm_lens.study.pairs` (corruptions and metrics of the patching methods), :mod:`~mm_lens.study.config`
(what is recorded), :mod:`~mm_lens.study.worker` (one example -> rows), :mod:`~mm_lens.study.local` and
:mod:`~mm_lens.study.ray_engine` (engines), :mod:`~mm_lens.study.run` (the driver),
:mod:`~mm_lens.study.results` (Parquet IO), :mod:`~mm_lens.study.summary` (the papers' aggregates).
"""

import importlib

# names -> the submodule defining them, imported on first use (so ``mm-lens --help`` stays fast)
_EXPORTS = {
    "load_dataset": "loaders", "load_gqa": "loaders", "load_vqa_constraints": "loaders",
    "METHODS": "methods", "Method": "methods", "register": "methods",
    "load_results": "results", "status_table": "results",
    "run": "run", "StudyRun": "run",
    "summarize": "summary",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mm_lens.study' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mm_lens.study.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
