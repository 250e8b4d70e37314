"""Examples per second of a knockout study (the paper's six edges, window 9) on the bundled shapes model:
the local engine, Ray with 1 worker and Ray with 2 workers (one per core), on a local Ray cluster.

Steady throughput is measured between the first and the last result (model loading and actor start-up
excluded; reported apart as start-up). Ray's overhead per example is the difference of the seconds per
example of Ray with one worker and of the local engine, for knockout and for a method that does nothing
(what is left: the example's inputs, the clean forward of the filter, moving the example and its rows; its
results go to one part, so that writing parts does not count); scaling is 2 workers' throughput over 1
worker's. The local engine writes each part itself; with Ray the driver writes while the workers compute.
Run: ``python benchmarks/bench_study.py [--examples 200] [--cpus 2]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import pandas as pd
import torch

from mm_lens import study
from mm_lens.data import Example
from mm_lens.toy import data as toy

METHOD_KWARGS = dict(edges="paper", window=9)
NOTHING = study.Method("nothing", lambda model, example, inputs, ctx: None,
                       lambda result, example, ctx: pd.DataFrame({"value": [0.0]}), by=())


def dataset(n: int, seed: int = 0) -> list[Example]:
    return [Example(e.image, e.question, e.answer, box=e.box, id=str(i), extra={"kind": e.kind})
            for i, e in enumerate(toy.make_examples(n, seed))]


def timed_run(data, out: str, method="knockout", part_size: int = 1, **engine) -> dict:
    stamps = []
    started = time.perf_counter()
    run = study.run("mm-lens/shapes", data, method, METHOD_KWARGS if method == "knockout" else {}, out=out,
                    progress=False, part_size=part_size, callback=lambda i, s: stamps.append(time.perf_counter()),
                    **engine)
    n = len(stamps)
    steady = (n - 1) / (stamps[-1] - stamps[0])
    return {"examples": n, "ok": run.counts["ok"], "startup_s": stamps[0] - started, "total_s": stamps[-1] - started,
            "steady_per_s": steady, "overall_per_s": n / (stamps[-1] - started)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--cpus", type=int, default=2, help="CPU cores of the local Ray cluster (default 2)")
    parser.add_argument("--part-size", type=int, default=1, help="examples per Parquet part (default 1)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)  # one core per worker, as each Ray actor
    data = dataset(args.examples)
    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows["local"] = timed_run(data, os.path.join(tmp, "local"), part_size=args.part_size)
        for workers in sorted({1, min(2, args.cpus), args.cpus}):
            rows[f"ray, {workers} worker{'s' if workers > 1 else ''}"] = timed_run(
                data, os.path.join(tmp, f"ray{workers}"), part_size=args.part_size, engine="ray", workers=workers)
        rows["local, nothing"] = timed_run(data, os.path.join(tmp, "local0"), NOTHING, len(data))
        rows["ray 1, nothing"] = timed_run(data, os.path.join(tmp, "ray0"), NOTHING, len(data), engine="ray", workers=1)
    ray.shutdown()
    print(f"knockout study, {args.examples} shapes examples (6 edges x 3 layers, window 9), torch threads 1 per worker, "
          f"{args.part_size} example(s) per part")
    print(f"{'engine':<16}{'examples/s':>12}{'s/example':>12}{'start-up s':>12}{'total s':>10}")
    for name, r in rows.items():
        print(f"{name:<16}{r['steady_per_s']:>12.2f}{1 / r['steady_per_s']:>12.4f}{r['startup_s']:>12.2f}"
              f"{r['total_s']:>10.1f}")
    for (local, one), what in (((rows["local"], rows["ray, 1 worker"]), "knockout"),
                               ((rows["local, nothing"], rows["ray 1, nothing"]), "a method doing nothing")):
        overhead = 1 / one["steady_per_s"] - 1 / local["steady_per_s"]
        print(f"Ray overhead per example, {what}: {overhead * 1000:+.1f} ms ({overhead * local['steady_per_s'] * 100:+.0f}% "
              "of a local example)")
    one = rows["ray, 1 worker"]
    for name, r in rows.items():
        if name.startswith("ray,") and r is not one:
            print(f"scaling {name} / ray, 1 worker: {r['steady_per_s'] / one['steady_per_s']:.2f}x")


if __name__ == "__main__":
    main()
