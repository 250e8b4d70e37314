"""Edge attribution runs as a study method: one row per edge and example, averaged per edge by summarize."""

import pytest

import mm_lens.circuits.study  # noqa: F401  (registers "edge_attribution")
from mm_lens import load_toy, study
from mm_lens.circuits.attribution import edge_attribution
from mm_lens.circuits.runs import prepare
from mm_lens.data import Example
from mm_lens.study import pairs
from mm_lens.toy import data as toy


def test_edge_scores_over_a_dataset(tmp_path):
    model = load_toy()
    examples = [Example(e.image, e.question, e.answer, box=e.box, id=f"t{i}")
                for i, e in enumerate(toy.make_examples(3, seed=3, kinds=("color",)))]
    kwargs = dict(corruption="mask_object", metric="answer_logprob", method="eap")
    run = study.run(model, examples, method="edge_attribution", method_kwargs=kwargs, out=str(tmp_path / "edges"),
                    progress=False)
    assert run.counts["ok"] == 3
    df = study.load_results(str(tmp_path / "edges"))
    first = examples[0]
    inputs = first.to_inputs(model)  # the study's default template
    args = pairs.patch_args(model, first, inputs, dict(predicted=model.to_single_token(first.answer)),
                            "mask_object", "answer_logprob")
    runs = prepare(model, args["clean"], args["corrupted"], args["metric"], ["image", "question"])
    expected = edge_attribution(runs, "eap")
    got = df[df["example_id"] == "t0"].set_index("edge")["value"]
    top = int(expected.abs().argmax())
    assert got[runs.graph.edges[top].name] == pytest.approx(float(expected[top]), rel=1e-4)
    summary = study.summarize(df)
    assert len(summary) == runs.graph.n_edges
