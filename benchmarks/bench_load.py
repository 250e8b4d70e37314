"""Loading a 7B-shaped LLaVA-1.5 checkpoint in bfloat16: peak host memory and time, mm_lens vs Hugging Face.

A random checkpoint with LLaVA-1.5-7B's shapes (Llama-2-7B text tower: 32 layers, d_model 4096, d_mlp 11008,
32 heads, vocabulary 32064; CLIP ViT-L/14-336: 24 layers, width 1024, MLP 4096, 16 heads; mlp2x_gelu
projector) is written on the fly, shard by shard (never the whole model in memory), as bfloat16 safetensors
shards with the hub's key names and index, into a temporary folder (~14 GB) that is deleted afterwards.
Each loader then runs in a subprocess of its own, which reports its peak resident memory (VmHWM: anonymous
plus file-backed pages) and its load time:

- Hugging Face: ``LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16)``
- mm_lens: ``HookedVLM.from_pretrained(folder, dtype=torch.bfloat16, device="cpu")`` (default weight
  processing: fold_ln, centring, value biases, done in float32 one part at a time)

    python benchmarks/bench_load.py                  # 7B-shaped (needs ~16 GB free RAM and ~15 GB disk)
    python benchmarks/bench_load.py --size tiny      # seconds: the same code path on a tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

SIZES = {
    "7b": dict(
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768),
    ),
    "1b": dict(  # a quick look at the same shapes with fewer layers
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768),
    ),
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=96, max_position_embeddings=256, rms_norm_eps=1e-5),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=28, patch_size=14, projection_dim=16),
    ),
}
# transformers' current key names -> the names llava-hf checkpoints on the hub use
HUB_NAMES = [("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
             ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head.")]


def llava_config(size: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    shapes = SIZES[size]
    text = LlamaConfig(**shapes["text"], pad_token_id=1, bos_token_id=2, eos_token_id=3)
    vision = CLIPVisionConfig(**shapes["vision"], hidden_act="quick_gelu", layer_norm_eps=1e-5)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=4, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    cfg.architectures = ["LlavaForConditionalGeneration"]
    return cfg


def hub_name(key: str) -> str:
    for new, old in HUB_NAMES:
        if key.startswith(new):
            return old + key[len(new):]
    return key


def checkpoint_shapes(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint (hub names) with its shape, from the model built on the meta device."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    return [(hub_name(k), tuple(v.shape)) for k, v in model.state_dict().items()]


def random_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    t = torch.empty(shape, dtype=torch.bfloat16)
    if "norm" in name and name.endswith("weight"):
        return t.normal_(1.0, 0.05)
    return t.normal_(0.0, 0.02)


def write_checkpoint(folder: Path, size: str, shard_bytes: int = 4 * 2**30) -> int:
    """Random bf16 safetensors shards + index + config + processor in ``folder``; returns the weights' bytes.
    Only one shard is ever in memory."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    cfg = llava_config(size)
    shapes = checkpoint_shapes(cfg)
    shards, current, used = [], [], 0
    for name, shape in shapes:
        nbytes = 2 * torch.Size(shape).numel()
        if current and used + nbytes > shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append((name, shape))
        used += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(tqdm(shards, desc="Writing shards", disable=None)):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_tensor(name, shape) for name, shape in shard}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({name: file for name in tensors})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg.save_pretrained(str(folder))
    _processor(cfg).save_pretrained(str(folder))
    return total


def _processor(cfg):
    from transformers import CLIPImageProcessor, LlavaProcessor

    from mm_lens.testing import make_tokenizer

    size = cfg.vision_config.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=make_tokenizer(),
                          patch_size=cfg.vision_config.patch_size, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)


# ---------------------------------------------------------------- one loader, in its own process
def memory_status() -> dict:
    """This process's peak and current resident memory, and what the current is made of, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


@contextmanager
def sampling_parts():
    """While mm_lens converts: before each part is processed (its float32 working copy filled), the process's
    memory and what the model holds (bytes of parameters already cast to bf16, of float32 working copies)."""
    import mm_lens.conversion.build as build

    samples, original = [], build.process_part

    def sampled(model, part, processing):
        held = {"bf16": 0, "float32": 0}
        for p in model.parameters():
            if not p.is_meta:
                held["bf16" if p.dtype == torch.bfloat16 else "float32"] += p.numel() * p.element_size()
        samples.append({"part": part, **memory_status(), **held})
        return original(model, part, processing)

    build.process_part = sampled
    try:
        yield samples
    finally:
        build.process_part = original


def load_once(loader: str, folder: str) -> dict:
    """Load with ``loader`` ("hf" or "mm_lens"); time, memory, and the weights' bytes."""
    from transformers import LlavaForConditionalGeneration

    from mm_lens import HookedVLM

    torch.set_grad_enabled(False)
    before = memory_status()  # after the imports
    start = time.perf_counter()
    if loader == "hf":
        model, info = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16,
                                                                    output_loading_info=True)
        missing = sorted(info["missing_keys"]) + sorted(info["unexpected_keys"])
    else:
        with sampling_parts() as samples:
            model = HookedVLM.from_pretrained(folder, dtype=torch.bfloat16, device="cpu", progress=False)
        missing = []
    seconds = time.perf_counter() - start
    loaded = memory_status()
    params = list(model.parameters())
    start = time.perf_counter()
    touched = float(max(p.max() for p in params))  # every weight read once, no copy made: now resident
    touch_seconds = time.perf_counter() - start
    at_peak = max(samples, key=lambda x: x["VmRSS"]) if loader == "mm_lens" else None
    return dict(loader=loader, seconds=seconds, touch_seconds=touch_seconds, before=before, loaded=loaded,
                touched=memory_status(), at_peak=at_peak,
                weight_bytes=sum(p.numel() * p.element_size() for p in params),
                dtypes=sorted({str(p.dtype) for p in params}), devices=sorted({str(p.device) for p in params}),
                problems=missing, checksum=touched)


def run_loader(loader: str, folder: Path) -> dict:
    code = ("import json, sys; sys.path.insert(0, sys.argv[3]); from benchmarks.bench_load import load_once; "
            "print('RESULT' + json.dumps(load_once(sys.argv[1], sys.argv[2])))")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code, loader, str(folder), root], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{loader} load failed:\n{out.stderr[-4000:]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def report(results: list[dict], weight_bytes: int) -> dict:
    """Print each run and the ratio mm_lens / Hugging Face of peak memory and time (best run of each)."""
    print(f"checkpoint: {gib(weight_bytes)} of bf16 weights")
    for r in results:
        peak, loaded = r["loaded"]["VmHWM"], r["loaded"]
        print(f"{r['loader']:>8}: {r['seconds']:7.1f} s (+ {r['touch_seconds']:.1f} s to read every weight once)  "
              f"peak RSS {gib(peak)} (after import {gib(r['before']['VmRSS'])};"
              f" at the end anon {gib(loaded['RssAnon'])} + file {gib(loaded['RssFile'])}); after reading every "
              f"weight: peak {gib(r['touched']['VmHWM'])}  [{r['dtypes']}, {r['devices']}]")
        if r["at_peak"]:
            p = r["at_peak"]
            print(f"          largest RSS while converting, at part {p['part']}: {gib(p['VmRSS'])} = anon "
                  f"{gib(p['RssAnon'])} + file {gib(p['RssFile'])}; the model then held {gib(p['bf16'])} of finished "
                  f"bf16 weights and {gib(p['float32'])} of float32 working copy")
    best = {name: min((r for r in results if r["loader"] == name), key=lambda r: r["loaded"]["VmHWM"])
            for name in ("hf", "mm_lens")}
    fastest = {name: min(r["seconds"] for r in results if r["loader"] == name) for name in ("hf", "mm_lens")}
    ready = {name: min(r["seconds"] + r["touch_seconds"] for r in results if r["loader"] == name)
             for name in ("hf", "mm_lens")}
    ratios = dict(peak_rss=best["mm_lens"]["loaded"]["VmHWM"] / best["hf"]["loaded"]["VmHWM"],
                  peak_rss_after_touch=best["mm_lens"]["touched"]["VmHWM"] / best["hf"]["touched"]["VmHWM"],
                  time=fastest["mm_lens"] / fastest["hf"], time_to_every_weight=ready["mm_lens"] / ready["hf"])
    print(f"mm_lens / Hugging Face: peak RSS {ratios['peak_rss']:.3f}x (after reading every weight "
          f"{ratios['peak_rss_after_touch']:.3f}x), load time {ratios['time']:.2f}x (load plus reading every "
          f"weight once {ratios['time_to_every_weight']:.2f}x)")
    print("Hugging Face maps the safetensors files and reads a weight when it is first used, so its load-time peak "
          "leaves the weights out; the peak after every weight was read once is the memory the model needs.")
    return ratios


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="7b")
    parser.add_argument("--repeats", type=int, default=1, help="loads per loader, alternating (default 1)")
    parser.add_argument("--dir", default=None, help="where to make the temporary folder (default: the system's)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mm-lens-bench-load-", dir=args.dir) as tmp:
        folder = Path(tmp)
        weight_bytes = write_checkpoint(folder, args.size)
        results = []
        for _ in range(args.repeats):
            for loader in ("mm_lens", "hf"):
                results.append(run_loader(loader, folder))
        for r in results:
            if r["problems"]:
                raise RuntimeError(f"{r['loader']} did not load every weight: {r['problems'][:10]}")
        return report(results, weight_bytes)


if __name__ == "__main__":
    main()
