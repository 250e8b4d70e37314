"""The Ray engine on a local two-core cluster started here: the same rows as the local engine, every example
exactly once even when a worker is killed mid-study, and a clear error without Ray."""

import sys

import pandas as pd
import pytest

from mm_lens import study

from .conftest import toy_examples

KO = dict(edges=["image->last", "question->last", "object->question"], window=1)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _rows(out: str) -> pd.DataFrame:
    df = study.load_results(out, status="all")
    return df.sort_values(["example_id", "edge", "layer"]).reset_index(drop=True)


@pytest.mark.slow
def test_two_ray_workers_give_exactly_the_rows_of_the_local_engine(ray_cluster, tmp_path):
    data = toy_examples(6, seed=4)
    local = study.run("mm-lens/shapes", data, "knockout", KO, out=str(tmp_path / "local"), progress=False)
    remote = study.run("mm-lens/shapes", data, "knockout", KO, out=str(tmp_path / "ray"), engine="ray", workers=2,
                       progress=False)
    assert remote.counts == local.counts and remote.restarts == 0
    pd.testing.assert_frame_equal(_rows(str(tmp_path / "ray")), _rows(str(tmp_path / "local")), check_exact=True)


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_every_example_appears_exactly_once(ray_cluster, tmp_path):
    ray = ray_cluster
    data = toy_examples(10, seed=6, kinds=("color", "where"))
    killed = []

    def kill_worker_0(example_id, status):
        if not killed:  # after the first result: worker 0 still holds examples
            name = next(n["name"] if isinstance(n, dict) else n for n in ray.util.list_named_actors()
                        if (n["name"] if isinstance(n, dict) else n).endswith("/worker-0.0"))
            ray.kill(ray.get_actor(name))
            killed.append(name)

    run = study.run("mm-lens/shapes", data, "knockout", KO, out=str(tmp_path), engine="ray", workers=2,
                    progress=False, callback=kill_worker_0)
    assert killed and run.restarts == 1 and run.stats["retried"] >= 1
    df = study.load_results(str(tmp_path), status="all")
    per_example = df.groupby("example_id")["status"].agg(["size", "first"])
    assert sorted(per_example.index) == sorted(ex.id for ex in data)
    assert (per_example["first"] == "ok").all() and (per_example["size"] == 3 * 3).all()  # 3 edges x 3 layers
    local = study.run("mm-lens/shapes", data, "knockout", KO, out=str(tmp_path / "local"), progress=False)
    assert local.counts == run.counts
    pd.testing.assert_frame_equal(_rows(str(tmp_path)), _rows(str(tmp_path / "local")), check_exact=True)


def test_without_ray_the_error_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'mm-lens\[ray\]'"):
        study.run("mm-lens/shapes", toy_examples(1), "knockout", out=str(tmp_path), engine="ray")
