"""Results on disk: Parquet parts keyed by example id, written so that a study can always resume.

``out/study.json`` is the configuration; ``out/parts/*.parquet`` hold the rows, one part per example
(or per ``part_size`` examples). A part is written under a hidden temporary name, flushed to disk and
renamed into place, so a part that exists is complete: an interrupted study loses at most the
examples in flight. Every row has ``example_id`` and ``status``:

* ``"ok"``: the method's tidy rows (one per output cell);
* ``"dropped"``: one row, ``reason`` says why (the filter, or what the method needs and the example lacks);
* ``"error"``: one row, ``error`` holds the exception's type and message.

One process writes a folder at a time (a lock file refuses a second).
"""

from __future__ import annotations

import os
import uuid
import warnings
from typing import Iterable, Optional, Sequence, Union

import pandas as pd

PARTS = "parts"
LOCK = ".lock"
STATUSES = ("ok", "dropped", "error")


def part_files(out: str) -> list[str]:
    folder = os.path.join(out, PARTS)
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".parquet") and not f.startswith("."))


def _dataset(out: str):
    """Every part of ``out`` as one Arrow dataset (parts of dropped or failed examples lack the method's columns)."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    files = part_files(out)
    if not files:
        return None
    schema = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")
    return ds.dataset(files, schema=schema, format="parquet")


def finished(out: str) -> dict[str, str]:
    """``{example_id: status}`` of every example with results in ``out``."""
    data = _dataset(out)
    if data is None:
        return {}
    table = data.to_table(columns=["example_id", "status"])
    return dict(zip(table.column("example_id").to_pylist(), table.column("status").to_pylist()))


def load_results(out: str, status: Union[str, Sequence[str]] = "ok") -> pd.DataFrame:
    """The rows of a study as one tidy DataFrame (``status="all"`` keeps dropped examples and errors too).

    ``df.attrs["study"]`` holds the recorded configuration (``study.json``), which :func:`summarize` reads.
    """
    from mm_lens.study.config import StudyConfig

    config = StudyConfig.load(out)
    if config is None:
        raise ValueError(f"{out} holds no study (no study.json): pass the out folder given to study.run")
    wanted = STATUSES if status == "all" else ((status,) if isinstance(status, str) else tuple(status))
    bad = [s for s in wanted if s not in STATUSES]
    if bad:
        raise ValueError(f"unknown status {bad}; use 'all' or some of {STATUSES}")
    import pyarrow.dataset as ds

    data = _dataset(out)
    if data is None:
        df = pd.DataFrame({"example_id": pd.Series([], dtype=str), "status": pd.Series([], dtype=str)})
    else:
        df = data.to_table(filter=ds.field("status").isin(list(wanted))).to_pandas()
        df = _first_of_each_id(df.dropna(axis=1, how="all"))  # columns only other statuses have
    df.attrs["study"] = {"method": config.method, "method_kwargs": config.method_kwargs, "model": config.model}
    return df


def status_table(out: str) -> pd.DataFrame:
    """One row per example: ``example_id``, ``status`` and, where there is one, ``reason`` or ``error``."""
    df = load_results(out, status="all")
    cols = [c for c in ("example_id", "status", "reason", "error") if c in df.columns]
    return df[cols].drop_duplicates("example_id").reset_index(drop=True)


def _first_of_each_id(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of the first part holding each id (two runs racing on one folder without the lock could repeat one)."""
    if df.empty:
        return df
    part = df.groupby("example_id", sort=False)["_part"].transform("first") if "_part" in df else None
    if part is not None:
        repeated = int((df["_part"] != part).sum())
        if repeated:
            warnings.warn(f"{repeated} rows repeat examples already in an earlier part; kept the first", stacklevel=3)
        df = df[df["_part"] == part]
    return df.drop(columns=["_part"], errors="ignore")


class Writer:
    """Writes rows in parts under ``out/parts``; holds the folder's lock while open."""

    def __init__(self, out: str, part_size: int = 1):
        if part_size < 1:
            raise ValueError(f"part_size must be >= 1, got {part_size}")
        self.out, self.part_size = out, part_size
        os.makedirs(os.path.join(out, PARTS), exist_ok=True)
        self._lock = _lock(out)
        for f in os.listdir(os.path.join(out, PARTS)):  # parts an interrupted run left half-written
            if f.startswith(".") and f.endswith(".tmp"):
                os.remove(os.path.join(out, PARTS, f))
        self._buffer: list[pd.DataFrame] = []
        self._n = 0

    def add(self, rows: pd.DataFrame) -> None:
        self._buffer.append(rows)
        if len(self._buffer) >= self.part_size:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        frame = pd.concat(self._buffer, ignore_index=True)
        self._buffer = []
        name = f"part-{uuid.uuid4().hex}"
        frame["_part"] = name
        write_part(os.path.join(self.out, PARTS), name, frame)
        self._n += 1

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_part(folder: str, name: str, frame: pd.DataFrame) -> None:
    """``folder/name.parquet`` written under a hidden name, synced, then renamed into place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = os.path.join(folder, f".{name}.parquet.tmp")
    table = pa.Table.from_pandas(frame, preserve_index=False)
    with open(tmp, "wb") as f:
        pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, f"{name}.parquet"))


def remove_ids(out: str, ids: Iterable[str]) -> int:
    """Rewrite the parts without the rows of ``ids`` (e.g. errors to retry); returns how many rows went."""
    import pyarrow.parquet as pq

    ids = set(ids)
    removed = 0
    for path in part_files(out):
        frame = pq.read_table(path).to_pandas()
        gone = frame["example_id"].isin(ids)
        if not gone.any():
            continue
        removed += int(gone.sum())
        kept = frame[~gone]
        if len(kept):
            name = f"part-{uuid.uuid4().hex}"
            write_part(os.path.dirname(path), name, kept.assign(_part=name))
        os.remove(path)
    return removed


def _lock(out: str):
    """An exclusive lock on ``out/.lock`` (POSIX); raises when another process holds it."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        return None
    f = open(os.path.join(out, LOCK), "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ValueError(f"another process is writing to {out}: wait for it to finish, or write to another folder") \
            from None
    return f


def summary_counts(statuses: Optional[dict]) -> dict:
    counts = {s: 0 for s in STATUSES}
    for s in (statuses or {}).values():
        counts[s] = counts.get(s, 0) + 1
    return counts
