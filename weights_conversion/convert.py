"""Convert an original-format VLM checkpoint into a folder ``HookedVLM.from_pretrained(DIR)`` loads.

    python weights_conversion/convert.py SOURCE --format bunny|llava-original|llava-phi \\
        [--vision-tower PATH] --out DIR [--verify]

SOURCE and PATH are local folders with safetensors weights; nothing from them is executed.
The output is a Hugging Face ``LlavaForConditionalGeneration`` folder (safetensors, config,
processor files). ``--verify`` prints the largest logit differences against Hugging Face's
forward on the output and against the source read directly. The logic is in
``mm_lens.conversion.export``.
"""

from __future__ import annotations

import argparse
import sys

from mm_lens.conversion.export import FORMATS, convert_folder, verify


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="checkpoint folder in the original layout (safetensors)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--vision-tower", default=None, help="folder of the vision tower checkpoint (CLIP / SigLIP)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--verify", action="store_true", help="compare the converted model against references")
    parser.add_argument("--atol", type=float, default=1e-4, help="tolerance for --verify (float32)")
    parser.add_argument("--prompt", default=None,
                        help="prompt for --verify (default '<image>\\nDescribe the image.'; words the tokenizer knows)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = convert_folder(args.source, args.format, args.out, args.vision_tower)
    print(f"wrote {out}")
    if not args.verify:
        return 0
    diffs = verify(args.source, args.format, out, args.vision_tower, prompt=args.prompt)
    for name, value in diffs.items():
        print(f"max |logit difference| {name}: {value:.3g}")
    ok = all(v <= args.atol for v in diffs.values())
    print("verified" if ok else f"FAILED: above {args.atol}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
