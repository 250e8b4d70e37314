"""Loading and caching at real size on a GPU: LLaVA-1.5-7B-shaped, bfloat16, against Hugging Face eager.

Run it when a CUDA GPU is lent (needs ~30 GB of GPU memory, ~30 GB of host memory, ~15 GB of disk); ``--smoke``
runs the same steps on the CPU with a tiny model (seconds), which is all a machine without a GPU should do.

1. Write a LLaVA-1.5-7B-shaped random bf16 checkpoint (bench_load.py's writer) to a temporary folder.
2. mm_lens ``from_pretrained(dtype=bfloat16, device="cuda")``: load time, peak GPU memory while loading
   (the weights plus at most one part's float32 working copy: never a float32 model), peak host memory.
3. ``run_with_cache`` with every hook on one 600-token prompt (one 336 px image: 576 tokens, plus text):
   median time, peak GPU memory, the cache's size beside :mod:`mm_lens.memory`'s estimate.
4. Hugging Face eager with ``output_hidden_states`` and ``output_attentions`` on the same input: the same
   numbers, plus the last-position log-prob difference, top-1 agreement and the residual streams' relative
   difference between the two.
5. ``device_map="auto"`` with ``max_memory`` holding about half the weights on the GPU (the rest on the CPU):
   GPU memory within the limit, the residual stream crossing devices (a text prompt's log-probs against the
   single-GPU model), a ``names_filter`` cache, and activation patching across the boundary.

    python benchmarks/gpu_check.py            # on a GPU machine
    python benchmarks/gpu_check.py --smoke    # anywhere: tiny, CPU
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mm_lens import HookedVLM, memory, patching  # noqa: E402
from mm_lens.testing import random_image  # noqa: E402

GiB = 2**30


def write_elsewhere(folder: Path, size: str) -> int:
    """The checkpoint written by a subprocess, so that this process's peak host memory is the loaders' own."""
    import subprocess

    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
            "from benchmarks.bench_load import write_checkpoint; print(write_checkpoint(Path(sys.argv[2]), sys.argv[3]))")
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code, root, str(folder), size], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip().splitlines()[-1])


def gpu_peak(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def reset(device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def host_peak() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB


def timed(fn, device, repeats: int = 3) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def prompt_of_length(model, image, n_positions: int) -> str:
    """A prompt whose inputs (image placeholder expanded) are exactly ``n_positions`` long."""
    words = "what is the color of the shape in this picture on the left".split()
    k = 4
    for _ in range(20):
        prompt = "USER: <image>\n" + " ".join(words[i % len(words)] for i in range(k)) + " ASSISTANT:"
        n = model.to_inputs(image, prompt).shape[1]
        if n == n_positions:
            return prompt
        k = max(1, k + n_positions - n)
    raise RuntimeError(f"could not make a {n_positions}-position prompt")


def step(results: dict, name: str, fn) -> None:
    """Run one step; record its numbers or its error and go on."""
    print(f"--- {name}", flush=True)
    try:
        results[name] = fn()
    except Exception as err:  # a step that fails must not hide the others' numbers
        traceback.print_exc()
        results[name] = {"error": f"{type(err).__name__}: {err}"}
    print(json.dumps(results[name], indent=1, default=str), flush=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: the code path only")
    parser.add_argument("--positions", type=int, default=600)
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --smoke for the code path on the CPU")
    device = torch.device("cpu" if args.smoke else "cuda:0")
    size = "tiny" if args.smoke else "7b"
    n_positions = 16 if args.smoke else args.positions
    torch.set_grad_enabled(False)
    results: dict = {"device": str(device), "size": size}
    keep: dict = {}
    with tempfile.TemporaryDirectory(prefix="mm-lens-gpu-check-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        results["checkpoint_gib"] = write_elsewhere(folder, size) / GiB
        results["write_seconds"] = time.perf_counter() - start

        def load_mm_lens():
            reset(device)
            start = time.perf_counter()
            model = HookedVLM.from_pretrained(str(folder), dtype=torch.bfloat16, device=device)
            seconds = time.perf_counter() - start
            keep["model"] = model
            weights = sum(p.numel() * p.element_size() for p in model.parameters()) / GiB
            return dict(seconds=seconds, weights_gib=weights, gpu_peak_gib=gpu_peak(device),
                        host_peak_gib=host_peak(), dtypes=sorted({str(p.dtype) for p in model.parameters()}))

        step(results, "mm_lens load", load_mm_lens)
        model = keep["model"]
        image = random_image(0, (336, 336))
        prompt = prompt_of_length(model, image, n_positions)
        inputs = model.to_inputs(image, prompt)
        text = model.to_inputs(None, "USER: what is the color of the circle on the left of the picture ? ASSISTANT:")

        def cache_everything():
            model = keep["model"]
            reset(device)
            estimate = sum(memory.cache_bytes(model, inputs).values()) / GiB
            seconds, (logits, cache) = timed(lambda: model.run_with_cache(inputs), device)
            actual = sum(t.numel() * t.element_size() for t in cache.values()) / GiB
            keep["log_probs"] = logits[0, -1].float().log_softmax(-1).cpu()
            keep["resid"] = {l: cache[f"blocks.{l}.hook_resid_pre"][0].float().cpu() for l in (0, 16, 31)
                             if f"blocks.{l}.hook_resid_pre" in cache}
            keep["text_log_probs"] = model(text)[0, -1].float().log_softmax(-1).cpu()
            out = dict(positions=inputs.shape[1], hooks=len(cache), seconds=seconds, gpu_peak_gib=gpu_peak(device),
                       cache_gib=actual, estimate_gib=estimate)
            del cache
            return out

        step(results, "mm_lens run_with_cache (every hook)", cache_everything)

        def filtered_cache():
            model = keep["model"]
            reset(device)
            keep_names = lambda name: name.endswith("hook_resid_post")
            seconds, (_, cache) = timed(lambda: model.run_with_cache(inputs, names_filter=keep_names), device)
            return dict(hooks=len(cache), seconds=seconds, gpu_peak_gib=gpu_peak(device),
                        estimate_gib=sum(memory.cache_bytes(model, inputs, keep_names).values()) / GiB)

        step(results, "mm_lens run_with_cache (resid_post only)", filtered_cache)

        def patch_reference():
            model = keep["model"]
            clean, corrupted = text, model.to_inputs(None, "USER: what is the color of the square on the right of "
                                                           "the picture ? ASSISTANT:")
            keep["pair"] = clean, corrupted
            boundary = model.cfg.n_layers // 2
            keep["patch_layers"] = [boundary - 1, boundary]
            res = patching.activation_patch(model, clean, corrupted, _metric, layers=keep["patch_layers"],
                                            positions="last", fast=False, progress=False)
            keep["patch"] = res.values.float().cpu()
            return dict(values=res.values.float().flatten().tolist())

        step(results, "mm_lens activation patching (one device)", patch_reference)
        keep.pop("model")  # only the numbers are kept: the GPU is freed for Hugging Face
        model = None

        def hugging_face():
            from transformers import LlavaForConditionalGeneration

            reset(device)
            start = time.perf_counter()
            hf = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.bfloat16,
                                                               attn_implementation="eager").to(device).eval()
            load_seconds = time.perf_counter() - start
            load_peak = gpu_peak(device)
            enc = dict(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                       pixel_values=inputs.pixel_values.to(torch.bfloat16))
            reset(device)
            seconds, out = timed(lambda: hf(**enc, output_hidden_states=True, output_attentions=True), device)
            log_probs = out.logits[0, -1].float().log_softmax(-1).cpu()
            resid = {l: (keep["resid"][l] - out.hidden_states[l][0].float().cpu()).norm().item()
                     / out.hidden_states[l][0].float().norm().item() for l in keep["resid"]}
            return dict(load_seconds=load_seconds, load_gpu_peak_gib=load_peak, seconds=seconds,
                        gpu_peak_gib=gpu_peak(device),
                        max_log_prob_diff=float((log_probs - keep["log_probs"]).abs().max()),
                        top1_agrees=bool(log_probs.argmax() == keep["log_probs"].argmax()),
                        top2_margin=float(log_probs.topk(2).values.diff().abs()),  # a near tie may flip in bf16
                        resid_relative_diff=resid)

        step(results, "hugging face eager (hidden states + attentions)", hugging_face)

        def mapped():
            reset(device)
            limits = {"cpu": "1GiB"} if args.smoke else {0: f"{results['mm_lens load']['weights_gib'] / 2:.1f}GiB",
                                                         "cpu": "100GiB"}
            start = time.perf_counter()
            model = HookedVLM.from_pretrained(str(folder), dtype=torch.bfloat16, device_map="auto", max_memory=limits)
            seconds = time.perf_counter() - start
            placed = model.device_map or {}
            counts = {str(d): sum(1 for v in placed.values() if v == d) for d in set(placed.values())}
            log_probs = model(text)[0, -1].float().log_softmax(-1).cpu()
            _, cache = model.run_with_cache(text, names_filter=lambda n: n.endswith("hook_resid_post"))
            cache_devices = sorted({str(t.device) for t in cache.values()})
            clean, corrupted = keep["pair"]
            res = patching.activation_patch(model, clean, corrupted, _metric, layers=keep["patch_layers"],
                                            positions="last", fast=False, progress=False)
            out = dict(seconds=seconds, max_memory=limits, parts_per_device=counts, gpu_peak_gib=gpu_peak(device),
                       max_log_prob_diff_vs_one_device=float((log_probs - keep["text_log_probs"]).abs().max()),
                       top1_agrees=bool(log_probs.argmax() == keep["text_log_probs"].argmax()),
                       cache_devices=cache_devices,
                       patch_max_diff_vs_one_device=float((res.values.float().cpu() - keep["patch"]).abs().max()))
            try:
                fast = patching.activation_patch(model, clean, corrupted, _metric, layers=keep["patch_layers"],
                                                 positions="last", fast=True, progress=False)
                out["fast_patch_max_diff"] = float((fast.values.float().cpu() - keep["patch"]).abs().max())
            except Exception as err:  # the fast engine may not cross devices
                out["fast_patch"] = f"{type(err).__name__}: {err}"
            return out

        step(results, "device_map auto (GPU + CPU)", mapped)
    print("RESULTS " + json.dumps(results, default=str))
    return results


def _metric(logits):
    return logits[:, -1, 5].float() - logits[:, -1, 6].float()


if __name__ == "__main__":
    main()
