"""study.run on the local engine: results, resuming, errors, the filter, configuration checks."""

import dataclasses
import os

import numpy as np
import pandas as pd
import pytest

from mm_lens import study
from mm_lens.analysis import knockout_edges
from mm_lens.data import Example
from mm_lens.study import results as results_io

from .conftest import toy_examples

EDGES = ["image->last", "question->last"]
KO = dict(edges=EDGES, window=1)


def counting(calls: list, stop_at=None):
    """The knockout method, recording each call and raising KeyboardInterrupt (Ctrl-C) at call ``stop_at``."""
    knockout = study.METHODS["knockout"]

    def call(model, example, inputs, ctx, **kw):
        calls.append(example.id)
        if stop_at is not None and len(calls) == stop_at:
            raise KeyboardInterrupt
        return knockout.call(model, example, inputs, ctx, **kw)

    return dataclasses.replace(knockout, name="counted_knockout", call=call)


def test_rows_are_the_methods_own_values_per_example(model, examples, tmp_path):
    run = study.run(model, examples[:3], "knockout", KO, out=str(tmp_path), progress=False, columns=("kind",))
    assert run.counts == {"ok": 3, "dropped": 0, "error": 0} and run.processed == 3
    df = study.load_results(str(tmp_path))
    assert list(df.columns[:5]) == ["example_id", "kind", "predicted", "status", "edge"]
    for ex in examples[:3]:
        direct = knockout_edges(model, ex.to_inputs(model), [tuple(e.split("->")) for e in EDGES], window=1,
                                progress=False).to_frame()
        mine = df[df.example_id == ex.id]
        assert mine["kind"].unique().tolist() == [ex.extra["kind"]]
        assert mine["edge"].tolist() == direct["edge"].tolist() and mine["layer"].tolist() == direct["layer"].tolist()
        np.testing.assert_array_equal(mine["value"].to_numpy(), direct["value"].to_numpy())


@pytest.mark.parametrize("part_size", [1, 2])
def test_interrupt_then_rerun_resumes_without_recomputing(model, examples, tmp_path, part_size):
    out = str(tmp_path)
    calls = []
    with pytest.raises(KeyboardInterrupt):
        study.run(model, examples, counting(calls, stop_at=4), KO, out=out, part_size=part_size, progress=False)
    first = list(calls[:3])
    assert sorted(results_io.finished(out)) == sorted(first)  # Ctrl-C lost only the example in flight
    assert not [f for f in os.listdir(os.path.join(out, "parts")) if f.startswith(".")]
    calls.clear()
    run = study.run(model, examples, counting(calls), KO, out=out, part_size=part_size, progress=False)
    assert sorted(calls) == sorted(ex.id for ex in examples if ex.id not in first)  # finished ids not recomputed
    assert run.skipped == 3 and run.processed == len(examples) - 3
    df = study.load_results(out)
    assert sorted(df.example_id.unique()) == sorted(ex.id for ex in examples)
    assert (df.groupby("example_id").size() == 2 * model.cfg.n_layers).all()  # each example exactly once
    calls.clear()
    again = study.run(model, examples, counting(calls), KO, out=out, part_size=part_size, progress=False)
    assert calls == [] and again.processed == 0


def test_a_half_written_part_never_reads_as_complete(model, examples, tmp_path, monkeypatch):
    out = str(tmp_path)
    study.run(model, examples[:2], "knockout", KO, out=out, progress=False)
    import pyarrow.parquet as pq

    def dies_midway(table, f, **kw):
        f.write(b"PAR1 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        study.run(model, examples[:3], "knockout", KO, out=out, progress=False)
    monkeypatch.undo()
    assert sorted(results_io.finished(out)) == ["t0", "t1"]
    run = study.run(model, examples[:3], "knockout", KO, out=out, progress=False)
    assert run.processed == 1 and sorted(study.load_results(out).example_id.unique()) == ["t0", "t1", "t2"]
    assert not [f for f in os.listdir(os.path.join(out, "parts")) if f.endswith(".tmp")]


def test_bad_examples_become_error_rows_and_the_study_goes_on(model, examples, tmp_path):
    good = examples[:2]
    missing = Example(str(tmp_path / "nowhere.png"), "what color is the circle ?", "red", box=(0, 0, 9, 9), id="missing")
    outside = dataclasses.replace(examples[2], id="outside", box=(40.0, 40.0, 90.0, 90.0))
    edges = EDGES + ["object->question"]
    run = study.run(model, [good[0], missing, outside, good[1]], "knockout", dict(edges=edges, window=1),
                    out=str(tmp_path / "r"), progress=False)
    assert run.counts == {"ok": 2, "dropped": 0, "error": 2}
    table = study.status_table(str(tmp_path / "r")).set_index("example_id")
    assert "does not exist" in table.loc["missing", "error"] and table.loc["missing", "error"].startswith("ValueError")
    assert "box" in table.loc["outside", "error"] and "must satisfy" in table.loc["outside", "error"]
    assert set(study.load_results(str(tmp_path / "r")).example_id) == {good[0].id, good[1].id}
    fixed = dataclasses.replace(examples[2], id="outside")
    again = study.run(model, [good[0], missing, fixed, good[1]], "knockout", dict(edges=edges, window=1),
                      out=str(tmp_path / "r"), retry_errors=True, progress=False)
    assert again.processed == 2 and again.counts == {"ok": 3, "dropped": 0, "error": 1}


def test_a_changed_configuration_is_refused(model, examples, tmp_path):
    out = str(tmp_path)
    study.run(model, examples[:1], "knockout", KO, out=out, progress=False)
    with pytest.raises(ValueError, match=r"method_kwargs.window: 1 -> 3"):
        study.run(model, examples[:2], "knockout", dict(KO, window=3), out=out, progress=False)
    with pytest.raises(ValueError, match=r"template"):
        study.run(model, examples[:2], "knockout", KO, out=out, template="<image> {question}", progress=False)
    with pytest.raises(ValueError, match=r"method: 'knockout' -> 'logit_lens'"):
        study.run(model, examples[:2], "logit_lens", out=out, progress=False)
    other = study.load_dataset(examples[:2])
    weight = next(model.parameters())
    saved = weight.data.view(-1)[0].item()
    weight.data.view(-1)[0] += 1.0  # one weight nudged: another model
    try:
        with pytest.raises(ValueError, match=r"model_id.state_sha256"):
            study.run(model, other, "knockout", KO, out=out, progress=False)
    finally:
        weight.data.view(-1)[0] = saved
    assert study.run(model, other, "knockout", KO, out=out, progress=False).processed == 1  # the same study grows


def test_the_folder_of_a_named_model_is_hashed(tmp_path, examples):
    from mm_lens.study.config import model_identity

    name, ident, checked = model_identity("mm-lens/shapes")
    assert name == "mm-lens/shapes" and len(ident["sha256"]["model.safetensors"]) == 64
    assert set(checked) == set(ident["sha256"])


def test_the_filter_drops_wrong_answers_with_the_reason(model, examples, tmp_path):
    wrong = {"t1": "purple", "t4": "bottom-right"}
    data = [dataclasses.replace(ex, answer=wrong.get(ex.id, ex.answer)) for ex in examples]
    run = study.run(model, data, "knockout", KO, out=str(tmp_path / "f"), progress=False)
    table = study.status_table(str(tmp_path / "f")).set_index("example_id")
    dropped = table[table.status == "dropped"]
    assert sorted(dropped.index) == ["t1", "t4"] and run.counts["ok"] == len(data) - 2
    assert f"the model predicts {examples[1].answer!r}" in dropped.loc["t1", "reason"]
    assert "'purple'" in dropped.loc["t1", "reason"] and dropped.loc["t1", "reason"].startswith("wrong answer")
    kept = study.run(model, data, "knockout", KO, out=str(tmp_path / "all"), filter=None, progress=False)
    assert kept.counts == {"ok": len(data), "dropped": 0, "error": 0}


def test_examples_lacking_what_the_method_needs_are_dropped_with_the_reason(model, tmp_path):
    data = toy_examples(8, seed=5, kinds=("exists",))
    no_box = [ex.id for ex in data if ex.box is None]
    assert no_box and len(no_box) < len(data)
    run = study.run(model, data, "knockout", dict(window=1), out=str(tmp_path), progress=False)
    table = study.status_table(str(tmp_path)).set_index("example_id")
    assert sorted(table.index[table.status == "dropped"]) == sorted(no_box)
    assert table.loc[no_box[0], "reason"].startswith("no box") and run.counts["ok"] == len(data) - len(no_box)


def test_summarize_is_the_mean_and_95_interval_over_examples(model, examples, tmp_path):
    study.run(model, examples, "knockout", dict(edges="paper", window=1), out=str(tmp_path), progress=False)
    df = study.load_results(str(tmp_path))
    summary = study.summarize(df)
    assert summary.shape[0] == 6 * model.cfg.n_layers
    z = 1.959963984540054  # the 97.5% normal quantile
    for (edge, layer), values in df.groupby(["edge", "layer"])["value"]:
        v = values.to_numpy()
        row = summary[(summary.edge == edge) & (summary.layer == layer)].iloc[0]
        assert row["n"] == len(v) == len(examples)
        assert row["mean"] == pytest.approx(v.sum() / len(v), rel=1e-12, abs=1e-12)
        half = z * np.sqrt(((v - v.mean()) ** 2).sum() / (len(v) - 1)) / np.sqrt(len(v))
        assert row["ci95"] == pytest.approx(half, rel=1e-9, abs=1e-12)
        assert row["low"] == pytest.approx(row["mean"] - half) and row["high"] == pytest.approx(row["mean"] + half)
    assert summary.edge.drop_duplicates().tolist() == ["question->last", "image->last", "image->question", "last->last",
                                                       "object->question", "non_object->question"]


def test_summarize_averages_positions_of_a_kind_within_an_example_first(model, examples, tmp_path):
    data = [dataclasses.replace(ex, constraint="is the") for ex in examples[:4] if " is the " in ex.question]
    assert len(data) >= 2
    study.run(model, data, "causal_trace", dict(corrupt="constraint", modules=["mlp"]), out=str(tmp_path),
              progress=False)
    df = study.load_results(str(tmp_path))
    tokens = df[df.position_kind.str.endswith("corrupted")].groupby("example_id")["token"].agg(lambda t: sorted(set(t)))
    assert all(t == ["is", "the"] for t in tokens)
    summary = study.summarize(df)
    cell = summary[(summary.layer == 1) & (summary.position_kind == "before") & (summary.quantity == "p")].iloc[0]
    per_example = [g[(g.layer == 1) & (g.position_kind == "before")]["p"].to_numpy().mean()
                   for _, g in df.groupby("example_id")]
    assert max(len(g[(g.layer == 1) & (g.position_kind == "before")]) for _, g in df.groupby("example_id")) > 1
    assert cell["n"] == len(data) and cell["mean"] == pytest.approx(np.mean(per_example), rel=1e-12)
    assert cell["ci95"] == pytest.approx(1.959963984540054 * np.std(per_example, ddof=1) / np.sqrt(len(data)))


def test_every_registered_method_runs_and_summarizes(model, tmp_path):
    data = [dataclasses.replace(ex, constraint="the " + ex.question.split()[-2]) for ex in
            toy_examples(2, seed=9, kinds=("color",))]
    settings = {
        "activation_patch": dict(corruption="blank_image", layers=[0, 2], hook="z", heads=True),
        "path_patch": dict(corruption={"kind": "replace", "span": "constraint"}, senders=["L0H0", "mlp1"]),
        "attribution_patch": dict(corruption={"kind": "embedding_noise", "group": "image"}),
        "causal_trace": dict(modules=["mlp"], layers=[0]),
        "visual_token_budget": dict(keep=[9, 3], strategy=["stride"]),
        "attention_contribution": dict(source="image", target="constraint"),
        "attention_knockout": dict(source="image", target="last"),
        "knockout": dict(edges=["constraint->last", "image->constraint"], window=1),
    }
    for name, method in study.METHODS.items():
        out = str(tmp_path / name)
        run = study.run(model, data, name, settings.get(name, {}), out=out, progress=False)
        errors = study.status_table(out).get("error")
        assert run.counts["ok"] == 2, (name, None if errors is None else errors.tolist())
        summary = study.summarize(study.load_results(out))
        assert len(summary) and (summary["n"] == 2).all(), name
        assert set(summary["quantity"]) >= set(method.values), name
        if method.patching:
            assert "normalized" in set(summary["quantity"]), name
        if name == "activation_patch":  # one cell per (layer, group, head)
            assert len(summary) == 2 * 2 * 3 * model.cfg.n_heads and {"group", "head"} <= set(summary.columns)
        if name == "knockout":  # the constraint's edges keep their name, whatever each example's span
            assert summary["edge"].unique().tolist() == ["constraint->last", "image->constraint"]


def test_patching_normalised_effect_is_that_of_the_field(model, tmp_path):
    data = toy_examples(3, seed=11, kinds=("color",))
    study.run(model, data, "activation_patch", dict(corruption="blank_image", positions=["image"]), out=str(tmp_path),
              progress=False)
    df = study.load_results(str(tmp_path))
    summary = study.summarize(df)
    clean = df.drop_duplicates("example_id")["clean_metric"].mean()
    corrupted = df.drop_duplicates("example_id")["corrupted_metric"].mean()
    for layer in range(3):
        mean = df[df.layer == layer]["value"].mean()
        row = summary[(summary.layer == layer) & (summary.quantity == "normalized")].iloc[0]
        assert row["mean"] == pytest.approx((mean - corrupted) / (clean - corrupted), rel=1e-9)
    # patching every image position at layer 0 restores the clean run exactly: normalised effect 1
    assert summary[(summary.layer == 0) & (summary.quantity == "normalized")]["mean"].iloc[0] == pytest.approx(1, abs=1e-5)


def test_bad_arguments_are_clear_errors(model, examples, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        study.run(model, examples, "magic", out=str(tmp_path))
    with pytest.raises(ValueError, match="engine must be one of"):
        study.run(model, examples, out=str(tmp_path), engine="spark")
    with pytest.raises(ValueError, match="use engine='ray'"):
        study.run(model, examples, "knockout", KO, out=str(tmp_path / "w"), workers=2, progress=False)
    with pytest.raises(TypeError, match="pass its name or folder"):
        study.run(model, examples, out=str(tmp_path), engine="ray")
    with pytest.raises(ValueError, match="loaded already"):
        study.run(model, examples, out=str(tmp_path), model_kwargs=dict(dtype="bfloat16"))
    with pytest.raises(ValueError, match="holds no study"):
        study.load_results(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="need corruption="):
        study.run(model, examples[:1], "activation_patch", {}, out=str(tmp_path / "p"), progress=False)
    with pytest.raises(ValueError, match="an edge is 'source->target'"):
        study.run(model, examples[:1], "knockout", dict(edges=["image-last"]), out=str(tmp_path / "p"), progress=False)


def test_results_are_plain_parquet(model, examples, tmp_path):
    study.run(model, examples[:2], "knockout", KO, out=str(tmp_path), progress=False)
    parts = results_io.part_files(str(tmp_path))
    assert len(parts) == 2
    frame = pd.read_parquet(parts[0])
    assert {"example_id", "status", "edge", "layer", "value"} <= set(frame.columns)
