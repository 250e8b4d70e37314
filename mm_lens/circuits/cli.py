"""``mm-lens bench-methods``: score every localisation method on the ground-truth suite (see
:mod:`mm_lens.circuits.bench`). The parser imports nothing heavy: ``--help`` answers at once."""

from __future__ import annotations

MODELS = ("copy_head", "route", "storage", "distractor")
METHOD_NAMES = ("eap", "eap_ig", "activation_patching", "attribution_patching", "causal_tracing", "knockout",
                "attention_contribution", "path_patching")


def add_parser(sub) -> None:
    """Register the ``bench-methods`` subcommand on the ``mm-lens`` parser's subparsers."""
    p = sub.add_parser(
        "bench-methods", help="score every localisation method on models whose circuit is known",
        description="Run every localisation method of the library (activation and attribution patching, EAP, EAP-IG, "
                    "path patching, attention knockout, causal tracing, attention contribution) on small VLMs built "
                    "with a known mechanism, and print how well each recovers the true edges: AUROC over every edge of "
                    "the position-aware graph, and precision among the top k edges for k = the true circuit's size.")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated models (default: {','.join(MODELS)})")
    p.add_argument("--methods", default=",".join(METHOD_NAMES),
                   help=f"comma-separated methods (default: all: {','.join(METHOD_NAMES)})")
    p.add_argument("--csv", default=None, help="also write every number (and the time each method took) to this file")
    p.set_defaults(fn=_bench)


def _names(text: str, known, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown {what} {unknown}; choose from {', '.join(known)}")
    return names


def _bench(args) -> int:
    models = _names(args.models, MODELS, "models")
    methods = _names(args.methods, METHOD_NAMES, "methods")
    import torch

    from mm_lens.circuits.bench import bench, table

    torch.set_grad_enabled(False)
    df = bench(models, methods, progress=True)
    print("AUROC / precision at the true circuit's size (1 = every true edge ranked first)\n")
    print(table(df))
    if args.csv:
        df.to_csv(args.csv, index=False)
        print(f"\nwritten to {args.csv}")
    return 0
