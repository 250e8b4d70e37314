"""Train the bundled shapes model: ``python -m mm_lens.toy.train [--steps N] [--seed S] [--out DIR]``.

The checkpoint goes to ``--out`` (default ``~/.cache/mm_lens/shapes``, under ``$XDG_CACHE_HOME`` when
set); load it with ``HookedVLM.from_pretrained(folder)``. Only ``--replace-bundled`` writes over the
weights shipped inside the package (``mm-lens/shapes``).

A real ``LlavaForConditionalGeneration`` (CLIP vision tower, mlp2x_gelu projector, Llama text
tower) and a ``LlavaProcessor`` with a word-level tokenizer, trained from scratch on
:mod:`mm_lens.toy.data` with the cross-entropy of the one-word answer at the last prompt
position. Deterministic given the seed (CPU, fixed thread count); a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mm_lens.toy import data

WEIGHTS = Path(__file__).parent / "weights"


def default_out() -> Path:
    """Where a retrained model goes unless told otherwise: a user folder, never the package."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "mm_lens" / "shapes"
SPECIAL = ["<unk>", "<pad>", "<s>", "</s>", "<image>"]
ARCH = dict(d_vision=64, vision_layers=1, vision_heads=4, d_model=64, text_layers=3, n_heads=4, n_kv_heads=4,
            d_mlp=192)


def build_tokenizer():
    """A word-level fast tokenizer (whitespace split, ``<s>`` prepended, ``<image>`` special)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + data.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="left")


def build_processor():
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = data.IMAGE_SIZE
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                         image_mean=list(data.CLIP_MEAN), image_std=list(data.CLIP_STD))
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=data.PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def build_model(tokenizer, seed: int):
    """A freshly initialised LLaVA of the bundled size."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    a = ARCH
    vc = CLIPVisionConfig(hidden_size=a["d_vision"], intermediate_size=4 * a["d_vision"],
                          num_hidden_layers=a["vision_layers"], num_attention_heads=a["vision_heads"],
                          image_size=data.IMAGE_SIZE, patch_size=data.PATCH_SIZE)
    tc = LlamaConfig(hidden_size=a["d_model"], intermediate_size=a["d_mlp"], num_hidden_layers=a["text_layers"],
                     num_attention_heads=a["n_heads"], num_key_value_heads=a["n_kv_heads"], vocab_size=len(tokenizer),
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, max_position_embeddings=256, tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-1, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu")
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(cfg)


class Encoder:
    """Prompts to token ids the way the processor does it (cached: the prompts repeat)."""

    def __init__(self, processor):
        self.processor = processor
        self.cache: dict[str, list[int]] = {}
        self.answer_ids = {w: processor.tokenizer.convert_tokens_to_ids(w) for w in data.vocabulary()}

    def ids(self, prompt: str) -> list[int]:
        if prompt not in self.cache:
            image = data.make_examples(1, 0)[0].image
            self.cache[prompt] = self.processor(images=image, text=prompt)["input_ids"][0]
            self.cache[prompt] = list(map(int, self.cache[prompt]))
        return self.cache[prompt]

    def batch(self, examples: list[data.Example]):
        input_ids = torch.tensor([self.ids(e.prompt) for e in examples])
        targets = torch.tensor([self.answer_ids[e.answer] for e in examples])
        return data.pixel_values([e.image for e in examples]), input_ids, targets


def answer_logits(model, pixel_values, input_ids) -> torch.Tensor:
    """Logits at the last prompt position ``[batch, vocab]`` (prompts in a batch have equal length)."""
    return model(input_ids=input_ids, pixel_values=pixel_values, logits_to_keep=1).logits[:, -1]


def patch_targets(examples: list[data.Example], enc: "Encoder") -> tuple[torch.Tensor, torch.Tensor]:
    """Auxiliary targets at the image positions ``[batch, n_patches]`` x 2: the colour and the shape
    word of the object in each patch (-100 where there is none). They give the vision tower and the
    projector a direct signal early in training (and make the visual tokens readable by a logit lens)."""
    n = (data.IMAGE_SIZE // data.PATCH_SIZE) ** 2
    colors = torch.full((len(examples), n), -100)
    shapes = torch.full((len(examples), n), -100)
    for i, e in enumerate(examples):
        for o in e.objects:
            colors[i, o.cell] = enc.answer_ids[o.color]
            shapes[i, o.cell] = enc.answer_ids[o.shape]
    return colors, shapes


def losses(model, enc: "Encoder", examples: list[data.Example], aux_weight: float):
    """Answer loss at the last position plus the auxiliary per-patch loss; also the answer logits."""
    pix, ids, tgt = enc.batch(examples)
    logits = model(input_ids=ids, pixel_values=pix).logits
    answer = logits[:, -1]
    loss = torch.nn.functional.cross_entropy(answer, tgt)
    if aux_weight > 0:
        image = logits[ids == model.config.image_token_id].view(len(examples), -1, logits.shape[-1])
        colors, shapes = patch_targets(examples, enc)
        flat = image.flatten(0, 1)
        aux = (torch.nn.functional.cross_entropy(flat, colors.flatten())
               + torch.nn.functional.cross_entropy(flat, shapes.flatten()))
        loss = loss + aux_weight * aux
    return loss, answer, tgt


def batches(rng: np.random.Generator, per_kind: int, max_objects: int = 3):
    """Endless training batches: one equal-length group per question kind."""
    while True:
        groups = []
        for kind in data.KINDS:
            exs = []
            for _ in range(per_kind):
                image, objects = data.random_scene(rng, int(rng.integers(1, max_objects + 1)))
                exs.append(data.ask(rng, image, objects, kind))
            groups.append(exs)
        yield groups


def train(steps: int = 6000, per_kind: int = 16, lr: float = 5e-3, seed: int = 0, threads: int = 1,
          max_objects: int = data.MAX_OBJECTS, aux_weight: float = 0.5):
    """Train from scratch; returns ``(hf_model, processor)`` in eval mode."""
    torch.set_num_threads(threads)
    processor = build_processor()
    model = build_model(processor.tokenizer, seed).train()
    enc = Encoder(processor)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    stream = batches(np.random.default_rng(seed + 1000), per_kind, max_objects)
    bar = tqdm(range(steps), desc="training mm-lens/shapes")
    running = None
    for _ in bar:
        opt.zero_grad(set_to_none=True)
        loss_sum, correct, total = 0.0, 0, 0
        for group in next(stream):
            loss, logits, tgt = losses(model, enc, group, aux_weight)
            loss = loss / len(data.KINDS)
            loss.backward()
            loss_sum += float(loss.detach())
            correct += int((logits.argmax(-1) == tgt).sum())
            total += len(group)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        acc = correct / total
        running = acc if running is None else 0.95 * running + 0.05 * acc
        bar.set_postfix(loss=f"{loss_sum:.3f}", acc=f"{running:.3f}")
    return model.eval(), processor


def save(model, processor, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; ``out`` is the folder the model will be written to."""
    p = argparse.ArgumentParser(description="Train the bundled mm-lens/shapes model on synthetic shapes VQA.")
    p.add_argument("--steps", type=int, default=6000, help="optimizer steps (default 6000)")
    p.add_argument("--per-kind", type=int, default=16, help="examples per question kind per step (default 16)")
    p.add_argument("--lr", type=float, default=5e-3, help="peak learning rate (default 5e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights and the data (default 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: tiny matrices, and a shared CPU makes more threads slower)")
    p.add_argument("--max-objects", type=int, default=data.MAX_OBJECTS,
                   help=f"at most this many objects per image (default {data.MAX_OBJECTS})")
    p.add_argument("--aux-weight", type=float, default=0.5,
                   help="weight of the auxiliary loss at the image positions (default 0.5; 0 turns it off)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=None, help=f"output folder (default {default_out()})")
    where.add_argument("--replace-bundled", action="store_true",
                       help=f"write over the model shipped inside the package ({WEIGHTS}) instead")
    args = p.parse_args(argv)
    args.out = WEIGHTS if args.replace_bundled else (args.out or default_out())
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out
    t0 = time.time()
    model, processor = train(args.steps, args.per_kind, args.lr, args.seed, args.threads, args.max_objects, args.aux_weight)
    save(model, processor, out)
    print(f"trained in {time.time() - t0:.0f} s; saved to {out}"
          + ("" if args.replace_bundled else f" (load it with HookedVLM.from_pretrained({str(out)!r}))"))
    from mm_lens.toy.evaluate import evaluate

    print(evaluate(out, max_objects=args.max_objects).summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
