"""Object / non-object position groups against masks written by hand: the box drawn on a mask, sent
through the checkpoint's own image processor (resize, crop, any-resolution tiling), unfolded into
patches (a patch counts if any of its pixels is inside), and, for LLaVA-NeXT, laid out in the
sequence by Hugging Face's own ``pack_image_features`` (base image, unpadded tiles, newlines)."""

import pytest
import torch
from PIL import Image, ImageDraw

from mm_lens import HookedVLM
from mm_lens.analysis import groups
from mm_lens.testing import random_image, tiny_llava, tiny_llava_next
from tests.conftest import NO_PROCESSING, PROMPT


def hand_masks(processor, size_wh, box):
    """[n_crops, g*g] bool: the box on a mask, through the processor, unfolded into 8 x 8 patches."""
    mask = Image.new("RGB", size_wh)
    ImageDraw.Draw(mask).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(255, 255, 255))
    pix = processor.image_processor(images=[mask], return_tensors="pt", do_normalize=False)["pixel_values"][0]
    pix = pix if pix.ndim == 4 else pix[None]  # [n_crops, C, H, W]
    patches = pix[:, 0].unfold(1, 8, 8).unfold(2, 8, 8)  # [n_crops, g, g, 8, 8]
    return (patches > 0.5).flatten(3).any(-1).flatten(1)


@pytest.fixture(scope="module")
def next_pair():
    hf, proc = tiny_llava_next(seed=3)
    return hf, proc, HookedVLM.from_hf(hf, proc, device="cpu")


@pytest.mark.parametrize("size_hw", [(40, 70), (70, 30), (40, 48)])
@pytest.mark.parametrize("box", [(0, 0, 10, 10), (5, 12, 29, 30), (0, 0, 30, 40)])
def test_llava_next_object_groups_equal_a_hand_made_mask_packed_by_hugging_face(next_pair, size_hw, box):
    hf, proc, model = next_pair
    h, w = size_hw
    x = model.to_inputs(random_image(1, size=size_hw), PROMPT)
    masks = hand_masks(proc, (w, h), box)
    # what each packed image position reads: channel 0 = inside the box, channel 1 = a patch (0 at newlines)
    feats = torch.stack([masks.float(), torch.ones_like(masks, dtype=torch.float)], dim=-1)
    (packed,), lens = hf.model.pack_image_features([feats], torch.tensor([[h, w]]), "default",
                                                image_newline=torch.zeros(2))
    image = x.positions.image
    assert lens[0] == len(image)
    expected_object = image[packed[:, 0] > 0.5]
    expected_rest = image[(packed[:, 0] < 0.5) & (packed[:, 1] > 0.5)]
    assert torch.equal(groups.resolve(model, x, groups.object_patches(box)), expected_object)
    assert torch.equal(groups.resolve(model, x, groups.non_object_patches(box)), expected_rest)
    # newline tokens are in neither group; together the groups and the newlines are the whole image
    newlines = x.positions[0].newlines()
    assert len(expected_object) + len(expected_rest) + len(newlines) == len(image)
    assert expected_object.numel() > 0


def test_llava_next_object_groups_per_row_of_a_batch(next_pair):
    hf, proc, model = next_pair
    sizes = [(40, 70), (70, 30)]
    boxes = [(0, 0, 10, 10), (20, 40, 30, 70)]
    x = model.to_inputs([random_image(i, size=s) for i, s in enumerate(sizes)], [PROMPT, PROMPT])
    x.meta["box"] = boxes
    for row, ((h, w), box) in enumerate(zip(sizes, boxes)):
        masks = hand_masks(proc, (w, h), box)
        feats = torch.stack([masks.float(), torch.ones_like(masks, dtype=torch.float)], dim=-1)
        (packed,), _ = hf.model.pack_image_features([feats], torch.tensor([[h, w]]), "default",
                                                 image_newline=torch.zeros(2))
        image = x.positions[row].image
        assert torch.equal(groups.resolve(model, x, "object", row), image[packed[:, 0] > 0.5])


def test_llava_object_groups_equal_a_hand_made_mask():
    hf, proc = tiny_llava(seed=0)
    model = HookedVLM.from_hf(hf, proc, device="cpu", **NO_PROCESSING)
    x = model.to_inputs(random_image(2, size=(50, 36)), PROMPT)
    box = (3, 20, 17, 41)
    inside = hand_masks(proc, (36, 50), box)[0]  # CLIP: shortest edge to 32, centre crop 32 x 32
    image = x.positions.image  # strategy "default": the class token is dropped, 16 patches in order
    assert torch.equal(groups.resolve(model, x, groups.object_patches(box)), image[inside])
    assert torch.equal(groups.resolve(model, x, groups.non_object_patches(box)), image[~inside])


def test_mask_region_blanks_the_box_in_every_llava_next_crop(next_pair):
    from mm_lens.analysis.corruptions import mask_region

    hf, proc, model = next_pair
    x = model.to_inputs(random_image(1, size=(40, 70)), PROMPT)
    box = (5, 12, 29, 30)
    masked = mask_region(model, x, box)
    pixel = hand_masks(proc, (70, 40), box).view(-1, 4, 4)
    pixel = pixel.repeat_interleave(8, 1).repeat_interleave(8, 2)  # [n_crops, 32, 32]
    n = len(pixel)
    assert torch.equal(masked.pixel_values[0, :n].permute(1, 0, 2, 3)[:, pixel],
                       torch.zeros(3, int(pixel.sum())))
    assert torch.equal(masked.pixel_values[0, :n].permute(1, 0, 2, 3)[:, ~pixel],
                       x.pixel_values[0, :n].permute(1, 0, 2, 3)[:, ~pixel])
