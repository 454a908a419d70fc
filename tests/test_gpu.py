"""gpu.py: forwards at real shapes, run here at the tiny shape; bad input is one sentence."""
import json
from dataclasses import replace

import pytest
import torch

import gpu
import sdar
import train_tiny


def test_shapes_tiny_end_to_end(capsys):
    gpu.main(["--shapes", "tiny:tiny", "--device", "cpu", "--context", "20", "--new-tokens", "8",
              "--repeats", "1", "--blocks", "4", "8", "--threads", "1"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["device"] == "cpu" and result["gpu"] is None and result["threads"] == 1
    for block in result["blocks"]:
        B = block["block"]
        tokens = {f["name"]: f["tokens"] for f in block["forwards"]}
        assert tokens == {"target denoise step": B, "target verify, lossless/exact": B * B,
                          "target verify, simsd": 2 * B, "draft step": B}
        # per layer 2 x 64 x 64 + 2 x 64 x 32 (attention) + 3 x 64 x 128 (mlp) + 2 x 16 + 2 x 64
        # (norms) = 37024; 2 layers, embedding and head 512 x 64 each, final norm 64: 139648 floats
        assert {f["weight_bytes"] for f in block["forwards"]} == {139648 * 4}
        assert all(f["floor_fraction"] is None for f in block["forwards"])  # no bandwidth on a CPU


def test_bad_shapes_are_one_sentence(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu.main(["--shapes", "sdar-8b"])
    assert exit_info.value.code == 2
    assert "--shapes takes TARGET:DRAFT" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --gpu-report

# The tiny shapes' weights a forward reads (the embedding table left out), by hand from the
# count above: TINY 139648 floats less the 512 x 64 table; TINY_DRAFT one layer of 37024, the
# head 512 x 64 and the final norm 64. KV cache bytes per token of a row: 2 (keys, values) x
# layers x 2 kv heads x head_dim 16 x 4 bytes.
READ = {"tiny": (139648 - 512 * 64) * 4, "tiny, 1 layer": (37024 + 512 * 64 + 64) * 4}
KV_PER_TOKEN = {"tiny": 2 * 2 * 2 * 16 * 4, "tiny, 1 layer": 2 * 1 * 2 * 16 * 4}
SECTIONS = ["bandwidth", "attention", "forwards", "prefill_peak", "iterations", "toys",
            "computed_peak", "compiled"]


def report(tmp_path, *flags):
    """Run --gpu-report --tiny on the CPU into tmp_path: (the JSON, the markdown)."""
    gpu.main(["--gpu-report", "--device", "cpu", "--tiny", "--out", str(tmp_path), "--threads",
              "1", "--repeats", "1", *flags])
    return (json.loads((tmp_path / "gpu-report.json").read_text()),
            (tmp_path / "gpu-report.md").read_text())


def test_gpu_report_tiny_end_to_end(tmp_path, capsys, monkeypatch):
    """Every measurement at the tiny shapes, each with sane values against references by hand."""
    monkeypatch.delattr(sdar, "compiled", raising=False)
    result, md = report(tmp_path, "--toy-prompts", "1")
    assert capsys.readouterr().out.strip() == md.strip()  # the markdown is printed too
    assert all(name in result for name in SECTIONS)

    assert result["bandwidth"]["bytes"] == 2 ** 22 * 4 and result["bandwidth"]["GB_s"] > 0

    rows = result["forwards"]
    assert len(rows) == 2 * 2 * 2 * 3  # models x batches x contexts x layouts
    for row in rows:
        assert "error" not in row, row
        assert row["tokens"] == (16 if row["forward"].startswith("lossless") else 4)
        assert row["ms"] > 0 and row["weight_bytes"] == READ[row["model"]]
        assert row["kv_bytes"] == KV_PER_TOKEN[row["model"]] * row["batch"] * (
            row["context"] + row["tokens"])
        assert 0 < row["floor_fraction"] <= row["bytes_floor_fraction"]
    assert {(r["batch"], r["context"]) for r in rows} == {(1, 16), (1, 64), (16, 16), (16, 64)}

    for label in ("bool mask", "no mask"):
        got = result["attention"][label]
        assert got["path"] == "cpu" and "aten::scaled_dot_product_attention" in got["aten"]

    iterations = {row["method"]: row for row in result["iterations"]}
    assert len(iterations) == 6
    for method, row in iterations.items():
        assert "error" not in row, row
        assert row["tokens"] == 8 and row["target_forwards"] >= 1 and row["ms"] > 0
        assert row["ms_per_target_forward"] > 0 and row["iterations"] >= 1
        assert row["round_trips_per_iteration"] <= 1, (method, row["round_trip_sites"])
    assert iterations["lossless, draft proposes"]["draft_forwards"] >= 1
    assert iterations["lossless, target proposes"]["draft_forwards"] == 0

    for task, got in result["toys"].items():
        if got != "toys absent":
            assert got["prompts"] == 1
            assert got["fp32_lossless_eq_fp32_target"] == 1  # lossless: exact in float32
            assert all(0 <= v <= 1 for k, v in got.items() if k != "prompts")

    assert result["prefill_peak"] == {"error": "measured on CUDA only"}
    peaks = result["computed_peak"]
    assert {(p["batch"], p["chunk"], p["attention"]) for p in peaks} == {
        (b, c, a) for b, c in ((1, 256), (16, 512), (16, 4096))
        for a in ("math", "fused")}
    for p in peaks:
        assert p["weights_bytes"] == 139648 * 4  # every parameter, the table included
        assert p["cache_bytes"] == 2 * 2 * p["batch"] * 2 * 256 * 16 * 4
        assert p["total_bytes"] == p["weights_bytes"] + p["cache_bytes"] + p["activation_bytes"]
    assert result["compiled"] == {"error": "compiled: not available (sdar has no compiled)"}

    for title in ("Copy bandwidth", "Forwards, eager", "Attention kernel", "host round trips",
                  "Random weights: acceptance means nothing", "toys", "measured", "computed",
                  "compiled: not available"):
        assert title in md, title


def test_gpu_report_survives_a_failure_and_its_budget(tmp_path, monkeypatch):
    """A measurement that raises leaves its error in the report and the rest goes on; past the
    budget every measurement is skipped, and the files are still written."""
    def broken(r):
        raise RuntimeError("no copy today")
    monkeypatch.setitem(gpu.SECTIONS, "bandwidth", broken)
    result, md = report(tmp_path, "--skip", "attention", "iterations", "toys", "computed_peak",
                        "compiled")
    assert result["bandwidth"] == {"error": "RuntimeError: no copy today"}
    assert "error: RuntimeError: no copy today" in md
    assert result["attention"] == {"error": "skipped: --skip"}
    assert all(row["ms"] > 0 and row["floor_fraction"] is None for row in result["forwards"])

    result, _ = report(tmp_path, "--budget", "0")
    assert all(result[name] == {"error": "skipped: time budget"} for name in SECTIONS)

    result["forwards"] = [{"model": "tiny", "batch": "not a number"}]  # rendering cannot fail
    assert "## 2. Forwards, eager\n\n(not rendered: ValueError" in gpu.render(result)


def test_gpu_report_times_sdar_compiled_where_it_exists(tmp_path, monkeypatch):
    """The compiled rows run what sdar.compiled returns, built once per model."""
    built = []

    def compiled(m):
        built.append(m.config.num_hidden_layers)
        return m
    monkeypatch.setattr(sdar, "compiled", compiled, raising=False)
    result, _ = report(tmp_path, "--skip", "attention", "forwards", "iterations", "toys",
                       "computed_peak")
    assert sorted(built) == [1, 2]
    rows = result["compiled"]
    assert len(rows) == 24 and all(r["ms"] > 0 and r["first_call_ms"] > 0 for r in rows)


def test_toys_absent(tmp_path, monkeypatch):
    monkeypatch.setattr(train_tiny, "folders", lambda task: {
        role: tmp_path / role for role in ("target", "data", "distilled", "ar")})
    r = gpu.Report(gpu.SMALL, torch.device("cpu"), torch.float32, 1, 60, tmp_path)
    assert gpu.toys(r) == {"sort": "toys absent", "walk": "toys absent"}


def test_live_bytes_sees_frees():
    """A chain whose live bytes are known by hand: two tensors of 4000 bytes at most at once, so
    a counter blind to frees would report 12000; views and in-place results add nothing."""
    x = torch.empty(1000, device="meta")
    with gpu.LiveBytes() as live:
        a = x * 2
        b = a + 1
        assert live.live == 8000
        del a
        c = b.view(10, 100)  # a view: b's storage
        d = b * 3
        d.add_(1)  # in place: d's storage
        del b, c
        assert live.live == 4000
    del d
    assert (live.peak, live.live) == (8000, 0)


def test_peak_bytes_against_references():
    """The weights and the cache by hand. At a prompt of 512 tokens in one forward, the fp32
    scores (batch x heads x T x T x 4 bytes) outweigh everything else a layer makes: the math
    path holds at least them on top of what the fused attention holds, which is less than them;
    chunks of 64 tokens a row hold less at once. (A short RoPE table: the default 32768
    positions would outweigh the rest at this shape.)"""
    c = replace(gpu.TINY, max_position_embeddings=1024)
    small = gpu.peak_bytes(c, 2, 64, 512, torch.float32, "math")
    assert small["weights_bytes"] == 139648 * 4
    assert small["cache_bytes"] == 2 * 2 * 2 * 2 * 64 * 16 * 4  # k, v x layers x rows x heads
    assert small["total_bytes"] == sum(small[k] for k in ("weights_bytes", "cache_bytes",
                                                           "activation_bytes"))
    scores = 4 * 4 * 512 * 512 * 4
    math, fused, chunked = (
        gpu.peak_bytes(c, 4, 512, chunk, torch.float32, path)["activation_bytes"]
        for chunk, path in ((4 * 512, "math"), (4 * 512, "fused"), (256, "math")))
    assert math - fused >= scores > fused
    assert chunked < math / 4
