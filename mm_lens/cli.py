"""The ``mm-lens`` command: the demo report, model info, and the analyses on any model and image.

Every argument is checked (files, box, question, output folder, model name) before the model is
loaded; torch is imported only then, so ``--help`` and mistakes answer at once.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from mm_lens import __version__
from mm_lens.demo import ANALYSES, DESCRIPTIONS

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_TIMEOUT_S = 5.0


# ---------------------------------------------------------------- checks (no model, no torch)
def writable_folder(path: str) -> Path:
    """``path`` as a folder we can write into (created if needed)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {path!r} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".mm_lens_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write the report into {path!r} ({e.strerror or e}): choose another --out") from None
    return folder


def check_model_name(name: str) -> None:
    """Fail fast on a name that is neither bundled, nor a local folder, nor a hub model we can get.

    A hub id is looked up in the local Hugging Face cache first; only when it is not there is the
    hub asked, with a short timeout (none at all with ``HF_HUB_OFFLINE=1``).
    """
    from mm_lens.bundled import BUNDLED

    if name in BUNDLED or Path(name).is_dir():
        return
    if Path(name).exists():
        raise ValueError(f"{name!r} is a file; pass a checkpoint folder, a hub id or a bundled model "
                         f"({', '.join(BUNDLED)})")
    if name.startswith((".", "/", "~")) or not HUB_ID.match(name):
        raise ValueError(f"{name!r} is neither a local folder nor a hub id (owner/name) nor a bundled model "
                         f"({', '.join(BUNDLED)})")
    import huggingface_hub

    if isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise ValueError(f"{name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: download it "
                         f"first (hf download {name}) or pass a local folder")
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        huggingface_hub.model_info(name, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return  # it exists; loading says what access it needs
    except RepositoryNotFoundError:
        raise ValueError(f"no model {name!r} on the Hugging Face hub (nor a local folder of that name)") from None
    except Exception as e:  # offline, DNS, timeout: say so instead of retrying
        raise ValueError(f"{name!r} is not in the local Hugging Face cache and the hub did not answer within "
                         f"{HUB_TIMEOUT_S:.0f} s ({type(e).__name__}: {e}): download it first or pass a local folder"
                         ) from None


def check_run_args(args):
    """Everything ``mm-lens run`` can check before loading the model; returns the image and the analyses."""
    from mm_lens.inputs import load_image

    if not args.prompt.strip():
        raise ValueError("--prompt is empty: pass the text the model reads (with <image> where the image goes)")
    if args.question is not None and (not args.question.strip() or args.question not in args.prompt):
        raise ValueError(f"--question {args.question!r} must be a non-empty part of --prompt {args.prompt!r} "
                         "(it marks the question's positions)")
    analyses = [a.strip() for a in args.analysis.split(",") if a.strip()]
    unknown = [a for a in analyses if a not in ANALYSES]
    if unknown or not analyses:
        raise ValueError(f"unknown analyses {unknown}; choose from {', '.join(ANALYSES)}")
    image = load_image(Path(args.image))  # a clear error for a missing or unreadable file
    if args.box is not None:
        x0, y0, x1, y1 = args.box
        w, h = image.size
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise ValueError(f"--box {x0:g} {y0:g} {x1:g} {y1:g} must satisfy 0 <= X0 < X1 <= {w} and "
                             f"0 <= Y0 < Y1 <= {h} (pixels of the {w}x{h} image)")
    writable_folder(args.out)
    check_model_name(args.model)
    return image, analyses


# ---------------------------------------------------------------- commands
def _demo(args) -> int:
    if args.examples < 1:
        raise ValueError(f"--examples must be at least 1, got {args.examples}")
    folder = writable_folder(args.out)
    from mm_lens.demo import demo

    path = demo(folder, n_examples=args.examples)
    print(f"report written to {path.resolve()}")
    return 0


def _load(name: str, device: str, trust_remote_code: bool):
    check_model_name(name)
    from mm_lens import HookedVLM

    return HookedVLM.from_pretrained(name, device=device, trust_remote_code=trust_remote_code)


def _info(args) -> int:
    model = _load(args.model, args.device, args.trust_remote_code)
    c = model.cfg
    print(f"model            {args.model}")
    print(f"architecture     {c.original_architecture}")
    print(f"language model   {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads "
          f"({c.n_key_value_heads} key/value), d_head {c.d_head}, d_mlp {c.d_mlp}, vocab {c.d_vocab}, "
          f"context {c.n_ctx}, norm {c.normalization_type}, act {c.act_fn}")
    if c.vision is not None:
        v = c.vision
        images = f"{v.image_size} px images" if v.image_size else "images of any size (dynamic resolution)"
        grid = f" ({v.grid_size}x{v.grid_size})" if v.image_size else ""
        tokens = f"{c.n_image_tokens} tokens per image" if v.image_size else "each image's tokens on its own grid"
        print(f"vision tower     {v.architecture}: {v.n_layers} layers, d_model {v.d_model}, {v.n_heads} heads, "
              f"{images} in {v.patch_size} px patches{grid}")
        print(f"projector        {c.projector.kind}, features from layer(s) {c.vision_feature_layer} "
              f"({c.vision_feature_select_strategy}): {tokens}")
    print(f"hook points      {len(model.hook_dict)}")
    return 0


def _run(args) -> int:
    image, analyses = check_run_args(args)
    from mm_lens.demo import Case, run_analyses

    model = _load(args.model, args.device, args.trust_remote_code)
    case = Case(image, args.prompt, question=args.question, answer=args.answer,
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
    parser.add_argument("--version", action="version", version=f"mm-lens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run every analysis on the bundled shapes model and write the report",
                       description="Load the bundled mm-lens/shapes model, run every analysis on a few held-out "
                                   "examples and write a self-contained HTML report.")
    p.add_argument("--out", default="mm_lens_report", help="report folder (default: mm_lens_report)")
    p.add_argument("--examples", type=int, default=3, help="number of examples, at least 1 (default: 3)")
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

    listing = "; ".join(f"{a}: {DESCRIPTIONS[a]}" for a in ANALYSES)
    p = sub.add_parser("run", help="run analyses on one image and prompt and write a report",
                       description="Run the chosen analyses on one image and prompt with any supported model and "
                                   f"write a self-contained HTML report. Analyses: {listing}.")
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
                   help="the expected one-token answer (default: the model's own top prediction); a word outside "
                        "the vocabulary is an error")
    p.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), default=None,
                   help="bounding box of the object of interest, in pixels of the image (object/non-object groups)")
    p.add_argument("--out", default="mm_lens_report", help="report folder (default: mm_lens_report)")
    p.set_defaults(fn=_run)
    from mm_lens.study.cli import add_parser as add_study_parser  # `mm-lens study METHOD ...`
    add_study_parser(sub)
    __import__("mm_lens.circuits.cli", fromlist=["add_parser"]).add_parser(sub)  # `mm-lens bench-methods`
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
