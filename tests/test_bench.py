"""bench.py: row selection, the table's maths and the honest headline on synthetic records (no timing
asserted), --shapes end to end, checkpoints on micro models, and bad input refused with a sentence."""
import json
from pathlib import Path

import pytest
import torch

import bench
import decode
import model
from conftest import run_scripts

from test_decode import micro_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def vanilla(tokens, forwards, seconds=1.0):
    return {"tokens": tokens, "forwards": forwards, "prefill_forwards": 1, "seconds": seconds}


def spec(tokens, iterations, accepted, drafted, draft_seconds=0.5, seconds=1.0):
    return {"tokens": tokens, "iterations": iterations, "accepted": accepted, "drafted": drafted,
            "draft_seconds": draft_seconds, "seconds": seconds}


def record(method, block, tok_s, stats, correct, task="t", temperature=0.0):
    return {"task": task, "method": method, "block": block, "temperature": temperature, "tok_s": tok_s,
            "stats": stats, "quality": stats, "correct": correct}


def test_configs_select_rows():
    """`ar` runs once (no block), sampling only on the sampled tasks, methods as asked."""
    keys = bench.configs({"sort": [], "valid": []}, ["target", "simsd", "ar"], [4, 8], [0.0, 1.0], ["valid"])
    assert ("sort", "ar", None, 0.0) in keys and ("valid", "ar", None, 1.0) in keys
    assert not any(k[0] == "sort" and k[3] == 1.0 for k in keys)
    assert sum(k[1] == "ar" for k in keys) == 3 and len(keys) == 3 + 2 * (2 + 2 * 2)
    assert ("valid", "simsd", 8, 1.0) in keys and ("sort", "target", 4, 0.0) in keys


def test_table_rows_maths():
    records = [record("target", 4, [90, 100, 130], [vanilla(64, 65), vanilla(64, 68)], [True, False, True]),
               record("draft", 4, [500, 400, 600], [vanilla(64, 65)], [True, True, False]),
               record("simsd", 4, [200, 150, 250], [spec(64, 32, 40, 80), spec(64, 16, 60, 64, 0.25)], [True, None, True]),
               record("target", 8, [50], [vanilla(64, 72)], [None]),
               record("simsd-position", 8, [75], [spec(64, 10, 50, 60)], [False]),
               record("ar", None, [40], [vanilla(64, 65)], [True]),
               record("specdiff", 4, [100], [spec(64, 20, 40, 60)], [True]),
               record("target", 4, [10], [vanilla(8, 9)], [True], temperature=1.0)]
    rows = {(r["method"], r["block"], r["temperature"]): r for r in bench.table_rows(records)}
    t4, d4, s4, t8, p8 = (rows[k, b, 0.0] for k, b in (("target", 4), ("draft", 4), ("simsd", 4), ("target", 8),
                                                       ("simsd-position", 8)))
    assert (t4["tok_s"], t4["speedup"], t4["acceptance"], t4["drafting"]) == (100, 1.0, None, None)
    assert t4["tokens_per_target_forward"] == pytest.approx(128 / (64 + 67))
    assert t4["accuracy"] == pytest.approx(200 / 3)
    assert (d4["speedup"], d4["tokens_per_target_forward"], d4["acceptance"]) == (5.0, None, None)
    assert s4["speedup"] == 2.0  # median 200 over the target's median 100, same block and temperature
    assert s4["tokens_per_target_forward"] == pytest.approx(128 / 48)  # tokens / iterations
    assert s4["acceptance"] == pytest.approx(100 / 144)  # accepted / drafted, summed over prompts
    assert s4["drafting"] == pytest.approx(0.75 / 2) and s4["accuracy"] == 100.0  # unanswered prompt left out
    assert t8["accuracy"] is None  # no answers: null, not faked
    assert p8["speedup"] == 1.5 and p8["accuracy"] == 0.0  # against block 8's target, not block 4's
    assert rows["specdiff", 4, 0.0]["speedup"] == 2.5 and rows["ar", None, 0.0]["speedup"] == 1.0  # against ar
    assert rows["target", 4, 1.0]["speedup"] == 1.0  # sampling rows against the sampled target


def row(method, tok_s, accuracy, block=4, temperature=0.0, speedup=None):
    return {"task": "t", "method": method, "block": block, "temperature": temperature, "tok_s": tok_s,
            "accuracy": accuracy, "speedup": speedup}


def test_headline_is_against_the_fastest_target_within_one_point():
    rows = [row("target", 100, 90.0), row("target-dyn0.9", 300, 89.5), row("target-dyn0.7", 500, 85.0),
            row("simsd", 450, 90.0), row("simsd-dyn0.9", 900, 70.0), row("simsd-position", 420, 95.0)]
    (line,) = bench.headlines(rows)
    assert "target-dyn0.9 at 300 tok/s" in line  # dyn0.7 is faster but 5 points worse
    assert "simsd at 1.50x of it" in line  # simsd-dyn0.9 is faster but outside the point
    rows = [row("target", 100, 90.0), row("target-dyn0.9", 300, 90.0), row("simsd", 900, 50.0)]
    assert "no SimSD row is within that point (the fastest, simsd, runs at 3.00x of it with 50.0%)" in \
        bench.headlines(rows)[0]
    rows = [row("target", 100, 90.0, 8, 1.0), row("ar", 40, 90.0, None), row("specdiff", 100, 90.0, 8, speedup=2.5)]
    lines = bench.headlines(rows)
    assert "t, block 8, temperature 1: fastest target alone" in lines[0] and "target at 100 tok/s" in lines[0]
    assert lines[1] == "t, block 8, greedy: specdiff 2.50x ar"
    assert bench.headlines([row("target", 100, None)]) == []  # no accuracy: no claim


def test_report_ends_with_the_json_line(capsys):
    rows = bench.table_rows([record("target", 4, [10.0], [vanilla(8, 9)], [True]),
                             record("simsd", 4, [20.0], [spec(8, 4, 6, 12)], [False])])
    bench.report({"device": "cpu", "dtype": "float32", "threads": 2}, rows)
    out = capsys.readouterr().out.strip().splitlines()
    assert "| simsd | 4 | 0 | 20.0 | 2.00x | 2.00 | 2.00 | 50% | 50% | 0.0% |" in out
    last = json.loads(out[-1])
    assert last["device"] == "cpu" and [r["method"] for r in last["rows"]] == ["target", "simsd"]
    assert last["rows"][0]["acceptance"] is None and last["rows"][1]["speedup"] == 2.0


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_shapes_tiny_end_to_end(capsys):
    bench.main(["--shapes", "tiny:tiny", "--device", "cpu", "--context", "20", "--new-tokens", "8",
                "--repeats", "1", "--blocks", "4", "8", "--threads", "1"])
    result = last_json(capsys)
    assert result["device"] == "cpu" and result["gpu"] is None and [b["block"] for b in result["blocks"]] == [4, 8]
    for b in result["blocks"]:
        B, derived = b["block"], b["simsd_tok_s_derived"]
        assert len(derived) == B and all(x < y for x, y in zip(derived, derived[1:]))
        assert derived[0] == pytest.approx(1e3 / b["forwards"][-1]["ms"])  # k / iteration time
        tokens = {f["name"]: f["tokens"] for f in b["forwards"]}
        assert tokens["target verify, simsd"] == 2 * B and tokens["target verify, exact"] == B * B
        assert b["vanilla_tok_s"] > 0 and all(f["ms"] > 0 and f["weight_bytes"] > 0 for f in b["forwards"])


def test_random_model_ties_and_fills():
    c = model.Config(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    m = bench.random_model(c, "cpu", torch.bfloat16, seed=0)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in m.parameters())
    assert torch.equal(m.model.norm.weight, torch.ones(32, dtype=torch.bfloat16))
    assert abs(m.model.layers[0].mlp.up_proj.weight.float().std().item() - 0.02) < 0.002


def test_checkpoints_with_and_without_answers(tmp_path, capsys):
    """SDAR target: the target and SimSD rows; draft == target makes exact verification accept all. A Qwen3
    target: ar and specdiff rows. Lines without answers are not scored."""
    target = micro_checkpoint(tmp_path / "target", 0, block_size=None, layers=2)
    tok, m = model.load_tokenizer(target), model.load(target)
    out, _ = decode.generate(m, tok.chat("one"), 8, block=4, stop_ids=tok.stop_ids, mask_id=tok.mask_id)
    answered, bare = tmp_path / "answers.jsonl", tmp_path / "bare.jsonl"
    answered.write_text(json.dumps({"prompt": "one", "answer": tok.decode(out)}) + "\n"
                        + json.dumps({"prompt": "two", "answer": "not in any output"}) + "\n")
    bare.write_text('{"prompt": "one"}\n{"prompt": "two"}\n')
    argv = ["--new-tokens", "8", "--answer-cap", "8", "--blocks", "4", "--device", "cpu", "--threads", "1"]
    bench.main(["--model", target, "--draft", target, "--prompts", str(answered), "--temperatures", "0",
                "--methods", "target", "draft", "simsd-exact", "simsd"] + argv)
    rows = {r["method"]: r for r in last_json(capsys)["rows"]}
    assert set(rows) == {"target", "draft", "simsd-exact", "simsd"}
    assert rows["target"]["accuracy"] == rows["draft"]["accuracy"] == rows["simsd-exact"]["accuracy"] == 50.0
    assert rows["simsd-exact"]["acceptance"] == 1.0 and rows["target"]["speedup"] == 1.0
    ar = micro_checkpoint(tmp_path / "ar", 3, model_type="qwen3")
    bench.main(["--model", ar, "--draft", target, "--prompts", str(bare)] + argv)
    rows = last_json(capsys)["rows"]
    assert {r["method"] for r in rows} == {"draft", "ar", "specdiff"} and len(rows) == 2 * 3  # greedy + sampled
    assert all(r["accuracy"] is None and r["tok_s"] > 0 for r in rows)
    bench.main(["--model", target, "--draft", target, "--prompts", str(bare), "--temperatures", "0",
                "--accept", "position"] + argv)
    assert [r["method"] for r in last_json(capsys)["rows"]] == ["target", "target-dyn0.9", "target-dyn0.7", "draft",
                                                                "simsd-position"]


def test_bad_input_is_one_sentence_and_exit_2(tmp_path):
    """As in decode.py: a sentence naming the flag, exit 2, no traceback."""
    b4 = micro_checkpoint(tmp_path / "b4", 0, block_size=4)
    (tmp_path / "bad.jsonl").write_text("prompt: not json\n")
    (tmp_path / "list.jsonl").write_text('["a list"]\n')
    (tmp_path / "ok.jsonl").write_text('{"prompt": "hi"}\n')
    ok = ["--model", b4, "--draft", b4, "--prompts", str(tmp_path / "ok.jsonl"), "--device", "cpu"]
    cases = [(["--model", b4, "--draft", b4, "--prompts", str(tmp_path / "nope.jsonl")], "cannot be read as JSONL"),
             (["--model", b4, "--draft", b4, "--prompts", str(tmp_path / "bad.jsonl")], "cannot be read as JSONL"),
             (["--model", b4, "--draft", b4, "--prompts", str(tmp_path / "list.jsonl")], "object per line"),
             (["--num-prompts", "-2"], "--num-prompts must be an integer >= 1; got -2"),
             (["--num-prompts", "0"], "--num-prompts must be an integer >= 1; got 0"),
             (["--blocks", "0"], "--blocks must be an integer >= 1; got 0"),
             (["--temperatures", "-1"], "--temperatures must be >= 0; got -1.0"),
             (["--tasks", "chess"], "--tasks chess is not a toy task"),
             (["--methods", "magic"], "invalid choice: 'magic'"),
             (ok + ["--blocks", "8"], "block 8 requested but the draft was trained with block 4"),
             (["--model", "/no/such"], "checkpoints need all of --model, --draft and --prompts"),
             (["--model", "/no/such", "--draft", b4, "--prompts", str(tmp_path / "ok.jsonl")], "cannot load"),
             (["--shapes", "sdar-8b"], "--shapes takes TARGET:DRAFT")]
    for (args, sentence), proc in zip(cases, run_scripts("bench.py", [args for args, _ in cases], ROOT)):
        err = proc.stderr
        assert proc.returncode == 2 and sentence in err and "Traceback" not in err, (args, err)
        assert err.strip().splitlines()[-1].startswith("bench.py: error: ")
