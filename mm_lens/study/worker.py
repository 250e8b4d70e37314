"""The worker: loads the model once and turns one example at a time into rows.

The local engine runs one in-process; the Ray engine runs one per actor. Processing an example:

1. build its one-row inputs (:meth:`mm_lens.data.Example.to_inputs` with the study's template);
2. drop it, with the reason, when the method needs what it lacks (a box, a constraint) or when the
   filter rejects it (``"correct"``: the clean run's top token at the last position is not the
   answer's first token, compared as text, case-insensitively — the papers keep only examples the
   model answers correctly);
3. run the method and turn its result into tidy rows.

An exception in any step becomes one ``"error"`` row with its type and message; the study goes on.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import pandas as pd
import torch

from mm_lens.data import Example
from mm_lens.study.methods import Method

FILTERS = ("correct", "none")


@dataclass
class WorkerSpec:
    """What every worker needs: the model to load, the method with its keyword arguments, the template, the filter."""

    model: Any  # a name or folder (each worker loads it), or a loaded model (local engine only)
    model_kwargs: dict
    method: Method
    method_kwargs: dict
    template: str
    filter: Union[str, Callable, None] = "correct"
    columns: tuple = ()
    extra: dict = field(default_factory=dict)


def load_model(model: Any, model_kwargs: dict):
    """A loaded model as is; a name or folder through ``HookedVLM.from_pretrained`` (dtype names allowed)."""
    if not isinstance(model, str):
        return model
    from mm_lens import HookedVLM

    kwargs = dict(model_kwargs)
    if isinstance(kwargs.get("dtype"), str):
        name = kwargs["dtype"].replace("torch.", "")
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise ValueError(f"unknown dtype {kwargs['dtype']!r}; use e.g. 'float32', 'bfloat16', 'float16'")
        kwargs["dtype"] = getattr(torch, name)
    kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    return HookedVLM.from_pretrained(model, **kwargs)


class Worker:
    """One model replica processing examples (see the module docstring)."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.model = load_model(spec.model, spec.model_kwargs)

    def versions(self) -> dict:
        from mm_lens.study.config import versions

        return versions()

    def process(self, example: Example) -> pd.DataFrame:
        """The rows of one example: its results, or one ``dropped`` or ``error`` row."""
        try:
            return self._process(example)
        except Exception as e:  # the study goes on; the row says what went wrong
            return error_rows(example.id, e, self._columns(example))

    def _columns(self, example: Example) -> dict:
        return {c: example.extra.get(c) for c in self.spec.columns}

    def _process(self, example: Example) -> pd.DataFrame:
        spec, model, method = self.spec, self.model, self.spec.method
        base = {"example_id": example.id, **self._columns(example)}
        reason = method.requires(example, spec.method_kwargs) if method.requires is not None else None
        if reason:
            return pd.DataFrame([{**base, "status": "dropped", "reason": reason}])
        inputs = example.to_inputs(model, spec.template)
        with torch.no_grad():
            logits = model(inputs)
        last = int(inputs.positions.last)
        predicted = int(logits[0, last].argmax())
        predicted_str = model.tokenizer.decode([predicted])
        base["predicted"] = predicted_str.strip()
        reason = self._filter(example, predicted)
        if reason:
            return pd.DataFrame([{**base, "status": "dropped", "reason": reason}])
        ctx = {"predicted": predicted, "predicted_str": predicted_str, "last": last}
        run_inputs = example.to_inputs(model, spec.template, with_answer=True) if method.with_answer else inputs
        result = method.call(model, example, run_inputs, ctx, **spec.method_kwargs)
        rows = method.frame(result, example, ctx).reset_index(drop=True)
        head = pd.DataFrame({**base, "status": "ok"}, index=rows.index)
        return pd.concat([head, rows.drop(columns=[c for c in head.columns if c in rows.columns])], axis=1)

    def _filter(self, example: Example, predicted: int) -> Optional[str]:
        f = self.spec.filter
        if f in (None, "none"):
            return None
        if f == "correct":
            return answer_mismatch(self.model.tokenizer, predicted, example.answer)
        if callable(f):
            return f(example, self.model.tokenizer.decode([predicted]))
        raise ValueError(f"filter must be one of {FILTERS}, None or a callable (example, predicted) -> reason, got {f!r}")


def answer_mismatch(tokenizer, predicted: int, answer: str) -> Optional[str]:
    """None when the predicted token is the answer's first token (as text, any case); else why not."""
    got = tokenizer.decode([predicted]).strip().lower()
    unk = getattr(tokenizer, "unk_token_id", None)
    firsts = set()
    for text in {answer, answer.lower(), " " + answer, " " + answer.lower()}:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = [i for i in ids if tokenizer.decode([i]).strip()]  # skip bare-space pieces
        if ids and ids[0] != unk:
            firsts.add(tokenizer.decode(ids[:1]).strip().lower())
    if not firsts:
        return f"the answer {answer!r} has no token the tokenizer knows, so correctness cannot be checked"
    if got in firsts:
        return None
    return f"wrong answer: the model predicts {got!r}, the answer {answer!r} starts with {' or '.join(sorted(firsts))!r}"


def error_rows(example_id: str, error: BaseException, columns: Optional[dict] = None) -> pd.DataFrame:
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    at = f" (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})" if where else ""
    return pd.DataFrame([{"example_id": example_id, **(columns or {}), "status": "error",
                          "error": f"{type(error).__name__}: {error}{at}"}])
