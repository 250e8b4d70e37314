"""Device maps as Hugging Face's ``device_map``/``max_memory``: resolution of every part's device, accelerate's
inference, clear errors, and (on CPU, with entries that are all "cpu" but distinct per module) the loading
path and unchanged hooks, caches and patching. Runs across real devices are in benchmarks/gpu_check.py."""

import pytest
import torch

from mm_lens import HookedVLM, patching
from mm_lens.conversion.placement import place, resolve_device_map
from mm_lens.model import _to_device_of
from mm_lens.testing import random_image
from tests.conftest import NO_PROCESSING, PROMPT


def per_module_map(model) -> dict:
    """A distinct "cpu" entry for every module a map can name."""
    entries = {"vision_encoder": "cpu", "vision_projector": "cpu", "embed": "cpu", "unembed": "cpu"}
    entries.update({f"blocks.{l}": "cpu" for l in range(model.cfg.n_layers)})
    return entries


def test_per_module_cpu_map_loads_and_runs_as_one_device(sharded, llava_pair, image):
    _, _, reference = llava_pair
    model = HookedVLM.from_pretrained(str(sharded), device_map=per_module_map(reference), **NO_PROCESSING)
    assert {p.device.type for p in model.parameters()} == {"cpu"} and model.cfg.device == torch.device("cpu")
    inputs = model.to_inputs(image, PROMPT)
    torch.testing.assert_close(model(inputs), reference(inputs), atol=0, rtol=0)
    _, cache = model.run_with_cache(inputs)
    _, ref_cache = reference.run_with_cache(inputs)
    assert cache.keys() == ref_cache.keys()
    torch.testing.assert_close(cache["blocks.1.hook_resid_post"], ref_cache["blocks.1.hook_resid_post"], atol=0, rtol=0)


def test_patching_on_a_mapped_model(sharded, llava_pair):
    _, _, reference = llava_pair
    model = HookedVLM.from_pretrained(str(sharded), device_map=per_module_map(reference), **NO_PROCESSING)
    clean = model.to_inputs(random_image(1), PROMPT)
    corrupted = model.to_inputs(random_image(2), PROMPT)

    def metric(logits):
        return logits[:, -1, 5] - logits[:, -1, 6]

    ours = patching.activation_patch(model, clean, corrupted, metric, layers=[0, 2], progress=False)
    ref = patching.activation_patch(reference, clean, corrupted, metric, layers=[0, 2], progress=False)
    torch.testing.assert_close(ours.values, ref.values, atol=1e-5, rtol=0)


def test_auto_map_within_max_memory(sharded, image):
    model = HookedVLM.from_pretrained(str(sharded), device_map="auto", max_memory={"cpu": "1GiB"}, dtype="bfloat16")
    assert {p.device.type for p in model.parameters()} == {"cpu"} and model.cfg.dtype == torch.bfloat16
    assert torch.isfinite(model(model.to_inputs(image, PROMPT)).float()).all()


def test_impossible_max_memory_is_a_clear_error(sharded):
    with pytest.raises(ValueError, match=r"does not fit in max_memory: it needs 0\.\d+ GiB.*bfloat16.*"
                                         r"allows 0\.00 GiB \(cpu: 0\.00 GiB\).*Raise max_memory"):
        HookedVLM.from_pretrained(str(sharded), device_map="sequential", max_memory={"cpu": 10_000}, dtype="bfloat16")


def test_map_resolution_over_several_devices(llava_pair):
    """Longest key wins; ln_final follows unembed, anyres the projector; nothing needs the devices to exist."""
    model = llava_pair[2]
    placed = resolve_device_map(model, {"": "cpu", "vision_encoder": 0, "blocks": 1, "blocks.2": "cuda:2",
                                        "unembed": 3})
    cuda = lambda i: torch.device("cuda", i)
    assert placed["vision_encoder"] == placed["vision_encoder.blocks.1"] == cuda(0)
    assert placed["vision_projector"] == placed["embed"] == torch.device("cpu")
    assert placed["blocks.0"] == placed["blocks.1"] == cuda(1) and placed["blocks.2"] == cuda(2)
    assert placed["head"] == cuda(3)


@pytest.mark.parametrize("device_map, message", [
    ({"vision_encoder": "cpu", "embed": "cpu"}, r"no device for \['vision_projector', 'blocks.0'"),
    ({"": "cpu", "blocks.0.attn": 1}, r"'blocks.0.attn' names no module \(or one finer than a block\)"),
    ({"": "cpu", "vison_encoder": 1}, r"'vison_encoder' names no module"),
    ({"": "cpu", "vision_encoder.blocks.1": 1}, r"vision tower must sit on one device"),
    ({"": "disk"}, r"'disk' is not supported.*more max_memory"),
])
def test_bad_maps(llava_pair, device_map, message):
    with pytest.raises(ValueError, match=message):
        resolve_device_map(llava_pair[2], device_map)


def test_device_and_memory_arguments_that_do_not_go_together(llava_pair):
    model = llava_pair[2]
    with pytest.raises(ValueError, match="either device=... or device_map"):
        place(model, device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="max_memory only applies with device_map='auto'"):
        place(model, device="cpu", max_memory={"cpu": "1GiB"})
    with pytest.raises(ValueError, match="not with an explicit map"):
        place(model, device_map={"": "cpu"}, max_memory={"cpu": "1GiB"})


def test_the_residual_stream_moves_to_each_block_device(llava_pair):
    """The forward's hop at a block boundary (the meta device stands in for a second device here)."""
    model = llava_pair[2]
    block = model.blocks[0]
    x, rotary = torch.zeros(1, 3, 4), (torch.zeros(1, 3, 1, 2), torch.ones(1, 3, 1, 2))
    assert _to_device_of(block, x, rotary)[0] is x
    import copy

    moved_x, moved_rotary = _to_device_of(copy.deepcopy(block).to("meta"), x, rotary)
    assert moved_x.is_meta and all(t.is_meta for t in moved_rotary)


def test_device_map_property_reports_each_part(llava_pair):
    import copy

    model = copy.deepcopy(llava_pair[2])
    assert model.device_map is None
    model.blocks[1].to("meta")
    placed = model.device_map
    assert placed["blocks.1"] == torch.device("meta") and placed["blocks.0"] == torch.device("cpu")
    model.bfloat16()  # a dtype change keeps each part where it is
    assert model.device_map == placed and model.cfg.dtype == torch.bfloat16


def test_image_pipeline_modules_sit_with_the_projector():
    """LLaVA-NeXT's pipeline module ``anyres`` (``image_newline``) is a part of its own, placed with the projector."""
    from mm_lens.testing import tiny_llava_next
    from mm_lens.weights import weight_parts

    hf, processor = tiny_llava_next(seed=1)
    model = HookedVLM.from_hf(hf, processor, device="cpu", **NO_PROCESSING)
    assert model.image_modules == ("anyres",) and "anyres.image_newline" in dict(model.named_parameters())
    parts = weight_parts(model)
    assert parts.index("anyres") == parts.index("vision_projector") + 1
    placed = resolve_device_map(model, {"": "cpu", "vision_projector": 1})
    assert placed["anyres"] == placed["vision_projector"] == torch.device("cuda", 1)
    assert placed["embed"] == torch.device("cpu")
