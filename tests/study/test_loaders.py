"""study.load_dataset: JSONL, Hugging Face datasets, the GQA layout, VQA-Constraints CSVs, plain lists."""

import csv
import json

import pytest

from mm_lens import study
from mm_lens.analysis import groups
from mm_lens.data import Example, save_jsonl
from mm_lens.toy import data as toy


@pytest.fixture(scope="module")
def scenes():
    return toy.make_examples(4, seed=2, kinds=("color",))


def test_jsonl_and_lists(tmp_path, scenes):
    examples = [Example(e.image, e.question, e.answer, box=e.box, extra={"kind": e.kind}) for e in scenes]
    save_jsonl(examples, str(tmp_path / "q.jsonl"))
    loaded = study.load_dataset(str(tmp_path / "q.jsonl"))
    assert [e.id for e in loaded] == ["0", "1", "2", "3"] and loaded[1].box == tuple(float(v) for v in scenes[1].box)
    assert loaded[0].extra["kind"] == "color" and loaded[0].load_image().size == (48, 48)
    direct = study.load_dataset(scenes, limit=2)  # the toy generator's own examples, by attribute
    assert [(e.id, e.question, e.extra) for e in direct] == [("0", scenes[0].question, {"kind": "color"}),
                                                            ("1", scenes[1].question, {"kind": "color"})]
    with pytest.raises(ValueError, match="duplicate example ids"):
        study.load_dataset([Example("a.png", "q", "a", id="x"), Example("b.png", "q", "a", id="x")])
    with pytest.raises(ValueError, match="no such file"):
        study.load_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="cannot tell the format"):
        (tmp_path / "q.txt").write_text("")
        study.load_dataset(str(tmp_path / "q.txt"))


def test_hugging_face_datasets_loaded_and_on_disk(tmp_path, scenes):
    datasets = pytest.importorskip("datasets")
    for i, e in enumerate(scenes):
        e.image.save(tmp_path / f"{i}.png")
    rows = [{"image": str(tmp_path / f"{i}.png"), "question": e.question, "answer": e.answer, "main_entity": "the circle",
             "id": f"q{i}"} for i, e in enumerate(scenes)]
    ds = datasets.Dataset.from_list(rows)
    loaded = study.load_dataset(ds)
    assert [e.id for e in loaded] == ["q0", "q1", "q2", "q3"] and loaded[2].constraint == "the circle"
    ds.save_to_disk(str(tmp_path / "saved"))
    again = study.load_dataset(str(tmp_path / "saved"))
    assert [e.to_dict() for e in again] == [e.to_dict() for e in loaded]


def test_gqa_layout_gives_object_boxes_that_resolve_to_the_object_patch(tmp_path, scenes, model):
    (tmp_path / "images").mkdir()
    questions, graphs = {}, {}
    for i, e in enumerate(scenes):
        image_id = f"img{i}"
        e.image.save(tmp_path / "images" / f"{image_id}.png")
        objects = {f"o{i}{j}": {"name": o.shape, "x": o.box[0], "y": o.box[1], "w": o.box[2] - o.box[0],
                                "h": o.box[3] - o.box[1], "attributes": [o.color]} for j, o in enumerate(e.objects)}
        graphs[image_id] = {"width": 48, "height": 48, "objects": objects}
        questions[f"{1000 + i}"] = {"imageId": image_id, "question": e.question, "answer": e.answer,
                                    "fullAnswer": f"The {e.objects[e.target].shape} is {e.answer}.",
                                    "annotations": {"question": {"3": f"o{i}{e.target}"}, "answer": {}},
                                    "types": {"structural": "query", "detailed": "chooseAttr" if i % 2 else "queryAttr"}}
    (tmp_path / "questions.json").write_text(json.dumps(questions))
    (tmp_path / "scenes.json").write_text(json.dumps(graphs))
    loaded = study.load_dataset(str(tmp_path / "questions.json"), scene_graphs=str(tmp_path / "scenes.json"),
                                image_ext=".png")
    assert [e.id for e in loaded] == ["1000", "1001", "1002", "1003"]
    assert loaded[1].extra["type_detailed"] == "chooseAttr" and loaded[1].extra["object_ids"] == [f"o1{scenes[1].target}"]
    for ex, scene in zip(loaded, scenes):
        assert ex.box == tuple(float(v) for v in scene.box)
        inputs = ex.to_inputs(model)
        row, col = divmod(scene.objects[scene.target].cell, toy.CELLS)  # one patch per cell, objects inside one
        assert groups.resolve(model, inputs, "object").tolist() == [inputs.positions.patch(row, col)]
        assert len(groups.resolve(model, inputs, "non_object")) == toy.CELLS**2 - 1
    only = study.load_gqa(str(tmp_path / "questions.json"), str(tmp_path / "scenes.json"), str(tmp_path / "images"),
                          types=["chooseAttr"], image_ext=".png")
    assert [e.id for e in only] == ["1001", "1003"]
    run = study.run(model, loaded, "knockout", dict(edges=["object->question", "non_object->question"], window=1),
                    out=str(tmp_path / "r"), progress=False)
    assert run.counts == {"ok": 4, "dropped": 0, "error": 0}


def test_vqa_constraints_csv(tmp_path, scenes):
    for i, e in enumerate(scenes):
        e.image.save(tmp_path / f"COCO_{i:06d}.png")
    with open(tmp_path / "vqa.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["question", "answer", "main_entity", "image_id", "source"])
        w.writeheader()
        for i, e in enumerate(scenes):
            w.writerow({"question": e.question, "answer": e.answer, "main_entity": "the " + e.question.split()[-2],
                        "image_id": i, "source": "okvqa"})
    loaded = study.load_dataset(str(tmp_path / "vqa.csv"), image_template="COCO_{image_id:0>6}.png")
    assert [e.constraint for e in loaded] == ["the " + e.question.split()[-2] for e in scenes]
    assert loaded[3].load_image().size == (48, 48) and loaded[0].extra == {"image_id": "0", "source": "okvqa"}
    (tmp_path / "named.csv").write_text("question,answer,main_entity,image\nwhat ?,red,it,COCO_000001.png\n")
    assert study.load_dataset(str(tmp_path / "named.csv"))[0].image == str(tmp_path / "COCO_000001.png")
    (tmp_path / "bad.csv").write_text("question,answer,image\nwhat ?,red,a.png\n")
    with pytest.raises(ValueError, match="main_entity"):
        study.load_dataset(str(tmp_path / "bad.csv"))

