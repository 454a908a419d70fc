"""gpu.py: forwards at real shapes, run here at the tiny shape; bad input is one sentence."""
import json

import pytest

import gpu


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
