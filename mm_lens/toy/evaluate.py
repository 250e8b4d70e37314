"""Held-out accuracy of the bundled shapes model: ``python -m mm_lens.toy.evaluate [--n N] [--weights DIR]``.

Runs the saved checkpoint through ``HookedVLM.from_pretrained`` (the same path a user takes)
on examples drawn with a seed the training stream never uses; the answer is the argmax over
the whole vocabulary at the last prompt position.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from mm_lens.toy import data

HELD_OUT_SEED = 12345


@dataclass
class Accuracy:
    correct: int = 0
    total: int = 0
    by_kind: dict = field(default_factory=lambda: defaultdict(lambda: [0, 0]))

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.total)

    value = accuracy

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {c / t:.3f}" for k, (c, t) in sorted(self.by_kind.items()))
        return f"held-out accuracy {self.value:.3f} ({self.correct}/{self.total}); by question: {kinds}"


@torch.no_grad()
def predict(model, examples: list[data.Example]) -> list[str]:
    """The model's one-word answers (examples of one kind per batch, so prompts have equal length)."""
    out: dict[int, str] = {}
    for kind in dict.fromkeys(e.kind for e in examples):
        idx = [i for i, e in enumerate(examples) if e.kind == kind]
        for start in range(0, len(idx), 64):
            chunk = idx[start:start + 64]
            inputs = model.to_inputs([examples[i].image for i in chunk], [examples[i].prompt for i in chunk])
            logits = model(inputs)[:, -1]
            for i, tok in zip(chunk, logits.argmax(-1).tolist()):
                out[i] = model.tokenizer.convert_ids_to_tokens(int(tok))
    return [out[i] for i in range(len(examples))]


def evaluate(model="mm-lens/shapes", n: int = 800, seed: int = HELD_OUT_SEED, max_objects=None) -> Accuracy:
    """Accuracy on ``n`` held-out examples of a HookedVLM, or of the checkpoint at a folder / bundled name."""
    from mm_lens import HookedVLM

    torch.set_grad_enabled(False)
    if not isinstance(model, HookedVLM):
        model = HookedVLM.from_pretrained(str(model), device="cpu")
    examples = data.make_examples(n, seed, max_objects=max_objects)
    acc = Accuracy()
    for e, pred in zip(examples, tqdm(predict(model, examples), desc="scoring", disable=True)):
        ok = pred == e.answer
        acc.correct += ok
        acc.total += 1
        acc.by_kind[e.kind][0] += ok
        acc.by_kind[e.kind][1] += 1
    return acc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Held-out accuracy of the bundled mm-lens/shapes model.")
    p.add_argument("--weights", default="mm-lens/shapes", help="bundled name or checkpoint folder")
    p.add_argument("--n", type=int, default=800, help="number of held-out examples (default 800)")
    p.add_argument("--seed", type=int, default=HELD_OUT_SEED, help=f"data seed (default {HELD_OUT_SEED})")
    p.add_argument("--max-objects", type=int, default=data.MAX_OBJECTS,
                   help=f"at most this many objects per image (default {data.MAX_OBJECTS})")
    args = p.parse_args(argv)
    acc = evaluate(args.weights, args.n, args.seed, args.max_objects)
    print(acc.summary())
    return 0 if acc.value >= 0.95 else 1


if __name__ == "__main__":
    raise SystemExit(main())
