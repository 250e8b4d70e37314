"""The ``mm-lens`` command: the demo report, model info, and the analyses on any model and image."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mm_lens.demo import ANALYSES


def _demo(args) -> int:
    from mm_lens.demo import demo

    path = demo(Path(args.out), n_examples=args.examples)
    print(f"report written to {path.resolve()}")
    return 0


def _load(name: str, device: str, trust_remote_code: bool):
    from mm_lens import HookedVLM
    from mm_lens.bundled import BUNDLED

    if name not in BUNDLED and not Path(name).exists() and "/" not in name:
        raise ValueError(f"{name!r} is neither a local folder nor a hub id (owner/name) nor a bundled model "
                         f"({', '.join(BUNDLED)})")
    return HookedVLM.from_pretrained(name, device=device, trust_remote_code=trust_remote_code)


def _info(args) -> int:
    model = _load(args.model, args.device, args.trust_remote_code)
    c = model.cfg
    print(f"model            {c.model_name}")
    print(f"architecture     {c.original_architecture}")
    print(f"language model   {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads "
          f"({c.n_key_value_heads} key/value), d_head {c.d_head}, d_mlp {c.d_mlp}, vocab {c.d_vocab}, "
          f"norm {c.normalization_type}, act {c.act_fn}")
    if c.vision is not None:
        v = c.vision
        print(f"vision tower     {v.architecture}: {v.n_layers} layers, d_model {v.d_model}, {v.n_heads} heads, "
              f"{v.image_size} px images in {v.patch_size} px patches ({v.grid_size}x{v.grid_size})")
        print(f"projector        {c.projector.kind}, features from layer(s) {c.vision_feature_layer} "
              f"({c.vision_feature_select_strategy}): {c.n_image_tokens} tokens per image")
    print(f"hook points      {len(model.hook_dict)}")
    return 0


def _run(args) -> int:
    from PIL import Image

    from mm_lens.demo import Case, run_analyses

    image_path = Path(args.image)
    if not image_path.is_file():
        raise ValueError(f"image file {str(image_path)!r} does not exist")
    analyses = [a.strip() for a in args.analysis.split(",") if a.strip()]
    unknown = [a for a in analyses if a not in ANALYSES]
    if unknown:
        raise ValueError(f"unknown analyses {unknown}; choose from {', '.join(ANALYSES)}")
    model = _load(args.model, args.device, args.trust_remote_code)
    case = Case(Image.open(image_path).convert("RGB"), args.prompt, question=args.question, answer=args.answer,
                box=tuple(args.box) if args.box else None, title=args.prompt)
    path = run_analyses(model, [case], Path(args.out), ["summary"] + [a for a in analyses if a != "summary"],
                        title=f"mm_lens: {args.model}")
    print(f"report written to {path.resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mm-lens",
        description="Interpretability for vision-language models: caching, patching, knockout, logit lens "
                    "and causal tracing across image and text positions, written as an HTML report.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run the main job on the bundled shapes model and write the report",
                       description="Load the bundled mm-lens/shapes model, run every analysis on a few held-out "
                                   "examples and write a self-contained HTML report.")
    p.add_argument("--out", default="mm_lens_report", help="report folder (default: mm_lens_report)")
    p.add_argument("--examples", type=int, default=3, help="number of examples (default: 3)")
    p.set_defaults(fn=_demo)

    def model_args(p):
        p.add_argument("model", help="a hub id (e.g. llava-hf/llava-1.5-7b-hf), a local checkpoint folder, or "
                                     "mm-lens/shapes (bundled)")
        p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
        p.add_argument("--trust-remote-code", action="store_true",
                       help="allow the checkpoint's own code to run (off by default; only for checkpoints you trust)")

    p = sub.add_parser("info", help="describe a model: towers, sizes, image tokens, hook points",
                       description="Load a model and print its configuration.")
    model_args(p)
    p.set_defaults(fn=_info)

    p = sub.add_parser("run", help="run analyses on one image and prompt and write a report",
                       description="Run the chosen analyses on one image and prompt with any supported model and "
                                   "write a self-contained HTML report.")
    model_args(p)
    p.add_argument("--image", required=True, help="path of the image")
    p.add_argument("--prompt", required=True,
                   help="the prompt, with the image placeholder (e.g. <image>) where the image goes; without one "
                        "the image is put at the start")
    p.add_argument("--analysis", default="lens,knockout,patching,trace",
                   help=f"comma-separated analyses from {', '.join(ANALYSES)} (default: lens,knockout,patching,trace)")
    p.add_argument("--question", default=None,
                   help="the question part of the prompt (for the question position group); optional")
    p.add_argument("--answer", default=None,
                   help="the expected one-token answer (default: the model's own top prediction)")
    p.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), default=None,
                   help="bounding box of the object of interest, in pixels of the image (object/non-object groups)")
    p.add_argument("--out", default="mm_lens_report", help="report folder (default: mm_lens_report)")
    p.set_defaults(fn=_run)
    from mm_lens.study.cli import add_parser as add_study_parser  # `mm-lens study METHOD ...`
    add_study_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as e:
        print(f"mm-lens: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
