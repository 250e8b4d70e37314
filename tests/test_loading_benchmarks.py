"""The loading benchmark and the GPU check run end to end at a tiny size (their code paths; the real sizes are
run by hand: benchmarks/bench_load.py on a 24 GiB machine, benchmarks/gpu_check.py on a GPU)."""

import pytest

from benchmarks import bench_load, gpu_check


@pytest.mark.slow
def test_bench_load_tiny(capsys):
    ratios = bench_load.main(["--size", "tiny"])
    out = capsys.readouterr().out
    assert "mm_lens / Hugging Face: peak RSS" in out
    assert set(ratios) == {"peak_rss", "peak_rss_after_touch", "time", "time_to_every_weight"}
    assert all(r > 0 for r in ratios.values())


def test_hub_names_load_in_both_loaders(tmp_path):
    """The writer uses the hub's key names; both loaders take every tensor (no missing or unexpected key)."""
    bench_load.write_checkpoint(tmp_path, "tiny")
    for loader in ("hf", "mm_lens"):
        result = bench_load.load_once(loader, str(tmp_path))
        assert result["problems"] == [] and result["dtypes"] == ["torch.bfloat16"], result


def test_gpu_check_smoke():
    results = gpu_check.main(["--smoke"])
    errors = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    assert not errors, errors
    cache = results["mm_lens run_with_cache (every hook)"]
    assert cache["cache_gib"] == cache["estimate_gib"]
    hf = results["hugging face eager (hidden states + attentions)"]
    assert hf["top1_agrees"] or hf["top2_margin"] < 2 * hf["max_log_prob_diff"]  # a bf16 near tie may flip
    assert hf["max_log_prob_diff"] < 0.05
    assert results["device_map auto (GPU + CPU)"]["patch_max_diff_vs_one_device"] == 0.0
