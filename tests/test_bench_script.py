"""Smoke test of scripts/bench_methods.py on the tiny test pipelines (in one process, a few seconds)."""

import json

from conftest import load_script


def _load_script():
    return load_script("bench_methods.py")


def test_tiny_benchmark_counts_forwards_and_memory(tmp_path, capsys):
    bench = _load_script()
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--no-toy", "--json", str(out)]) == 0
    results = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"uce", "esd-x", "resteer"}
    assert all("error" not in r for r in results.values())
    assert results["uce"]["unet_forwards"] == 0 and results["uce"]["iterations"] == 0
    esd = results["esd-x"]
    assert esd["iterations"] == 2
    # k guided DDIM steps (k < ddim_steps = 2) + one frozen forward + one forward with gradients per iteration
    assert all(2 <= n <= 3 for n in esd["forwards_per_iteration"])
    assert esd["unet_forwards_with_grad"] == 2
    assert results["resteer"]["forwards_per_iteration"] == [1, 1]
    for result in results.values():
        assert result["pipeline_weight_bytes"] > 0
        assert result["peak_rss"] >= result["rss_before_apply"] > 0
    assert "peak/weights" in capsys.readouterr().out


def test_synthetic_requests_are_encodable():
    bench = _load_script()
    from erasure.concepts import check_encodable
    from erasure.testing import TINY_WORDS, tiny_tokenizer

    words = bench.synthetic_words(20)
    assert len(set(words)) == 20
    request = bench.synthetic_request(10, 2, 2)
    assert len(request.concepts) == 10 and len(request.erase_prompts) == 20 and len(request.preserve_prompts) == 20
    tokenizer = tiny_tokenizer((*TINY_WORDS, "artwork", *words))
    check_encodable(tokenizer, request)
    assert len(tokenizer(words[0], add_special_tokens=False).input_ids) == 1
