"""``mm-lens study METHOD --model M --data D --out DIR``: a study from the command line (see :func:`mm_lens.study.run`)."""

from __future__ import annotations

import json

TEMPLATES = {"llava": "LLAVA_TEMPLATE", "constraint": "CONSTRAINT_TEMPLATE"}


def add_parser(sub) -> None:
    """Register the ``study`` subcommand on the ``mm-lens`` parser's subparsers."""
    p = sub.add_parser(
        "study", help="run a method over a dataset (resumable; locally or on a Ray cluster)",
        description="Run one method over every example of a dataset and write tidy Parquet results to --out. "
                    "Rerunning the same command resumes; a different configuration is refused.")
    p.add_argument("method", help="knockout, attention_knockout, causal_trace, activation_patch, path_patch, "
                                  "attribution_patch, logit_lens, attention_to_image, attention_contribution, "
                                  "modality_similarity or visual_token_budget")
    p.add_argument("--model", required=True, help="a hub id, a local checkpoint folder, or mm-lens/shapes (bundled)")
    p.add_argument("--data", required=True,
                   help="a .jsonl file, a VQA-Constraints .csv, a GQA questions .json (with --scene-graphs), a "
                        "datasets folder (save_to_disk), or hf:<dataset name>")
    p.add_argument("--out", required=True, help="results folder (Parquet parts and study.json)")
    p.add_argument("--engine", choices=("local", "ray"), default="local", help="local (default) or ray")
    p.add_argument("--workers", type=int, default=1, help="model replicas (Ray actors; default 1)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster: auto (this machine's cluster) or ray://host:10001; default: start a local one")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per Ray worker (default: 1 when the cluster has GPUs, else 1 CPU core)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a method keyword argument, VALUE as JSON when it parses (e.g. --set window=9 "
                        "--set 'edges=[\"image->last\"]'); repeat for more")
    p.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16 (default: the loader's)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    p.add_argument("--device-map", default=None,
                   help="spread each worker's model over its GPUs (e.g. auto; with --gpus-per-worker on Ray)")
    p.add_argument("--template", default="llava",
                   help="prompt template: llava, constraint (Basu et al.), or a string with <image> and {question}")
    p.add_argument("--no-filter", action="store_true", help="keep examples the model answers wrongly too")
    p.add_argument("--format", default=None, choices=("jsonl", "hf", "gqa", "vqa_constraints"),
                   help="dataset format (default: from the file name)")
    p.add_argument("--scene-graphs", default=None, help="GQA scene graphs JSON (object boxes)")
    p.add_argument("--images", default=None, help="image folder (default: next to the data file)")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples")
    p.add_argument("--columns", default="", help="comma-separated example fields copied into every row")
    p.add_argument("--retry-errors", action="store_true", help="run again the examples that ended in an error")
    p.add_argument("--summary", action="store_true", help="print the summary and write it to OUT/summary.csv")
    p.set_defaults(fn=_study)


def parse_settings(items) -> dict:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _study(args) -> int:
    from mm_lens import data, study

    template = getattr(data, TEMPLATES[args.template]) if args.template in TEMPLATES else args.template
    if "{question}" not in template:
        raise ValueError(f"--template must be llava, constraint or a string with {{question}}, got {args.template!r}")
    model_kwargs = {k: v for k, v in (("dtype", args.dtype), ("device", args.device), ("device_map", args.device_map))
                    if v is not None}
    resources = None if args.gpus_per_worker is None else {"num_gpus": args.gpus_per_worker, "num_cpus": 1}
    ds = study.load_dataset(args.data, args.format, image_dir=args.images, scene_graphs=args.scene_graphs,
                            limit=args.limit)
    try:
        result = study.run(args.model, ds, method=args.method, method_kwargs=parse_settings(args.set), out=args.out,
                           engine=args.engine, ray_address=args.ray_address, workers=args.workers,
                           model_kwargs=model_kwargs, worker_resources=resources, template=template,
                           filter=None if args.no_filter else "correct",
                           columns=tuple(c for c in args.columns.split(",") if c), retry_errors=args.retry_errors)
    except KeyboardInterrupt:
        print(f"interrupted: the finished examples are in {args.out}; run the same command again to resume")
        return 130
    c = result.counts
    print(f"{result.total} examples in {args.out}: {c['ok']} ok, {c['dropped']} dropped, {c['error']} errors "
          f"({result.processed} run now, {result.skipped} already done)")
    if args.summary:
        table = study.summarize(study.load_results(args.out))
        table.to_csv(f"{args.out}/summary.csv", index=False)
        print(table.to_string(index=False))
    return 0
