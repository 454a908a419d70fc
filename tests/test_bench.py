"""bench.py: the table's maths on fake measurements, --shapes end to end, real checkpoints on micro models."""
import json

import pytest
import torch

import bench
import decode
import model

VOCAB, MASK = 260, 259  # write_byte_tokenizer: 256 bytes, then 4 specials, <|MASK|> last


@pytest.fixture(autouse=True)
def one_thread():
    """Micro models are dispatch-bound: one thread is as fast, and immune to the long stalls a
    two-thread OpenMP pool suffers on a two-core machine that is busy with something else.
    bench.main(--threads) sets the global count, so it is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def vanilla(tokens, forwards, seconds=1.0):
    return {"tokens": tokens, "forwards": forwards, "prefill_forwards": 1, "seconds": seconds}


def spec(tokens, iterations, accepted, drafted):
    return {"tokens": tokens, "iterations": iterations, "accepted": accepted, "drafted": drafted}


def record(method, block, tok_s, stats, correct):
    return {"method": method, "block": block, "tok_s": tok_s, "stats": stats, "correct": correct}


def test_table_rows_maths():
    records = [record("target", 4, [90, 100, 130], [vanilla(64, 65), vanilla(64, 68)], [True, False, True]),
               record("draft", 4, [500, 400, 600], [vanilla(64, 65)], [True, True, False]),
               record("simsd", 4, [200, 150, 250], [spec(64, 32, 40, 80), spec(64, 16, 60, 64)], [True, None, True]),
               record("target", 8, [50], [vanilla(64, 72)], [None]),
               record("simsd-exact", 8, [75], [spec(64, 10, 50, 60)], [False])]
    rows = {(r["method"], r["block"]): r for r in bench.table_rows(records)}
    t4, d4, s4, t8, e8 = rows.values()
    assert t4 == {"method": "target", "block": 4, "tok_s": 100, "speedup": 1.0,
                  "tokens_per_target_forward": pytest.approx(128 / (64 + 67)), "acceptance": None,
                  "accuracy": pytest.approx(200 / 3)}
    assert (d4["speedup"], d4["tokens_per_target_forward"], d4["acceptance"]) == (5.0, None, None)
    assert s4["speedup"] == 2.0  # median 200 over the target's median 100, same block
    assert s4["tokens_per_target_forward"] == pytest.approx(128 / 48)  # tokens / iterations
    assert s4["acceptance"] == pytest.approx(100 / 144)  # accepted / drafted, summed over prompts
    assert s4["accuracy"] == 100.0  # the unanswered prompt is left out
    assert t8["accuracy"] is None  # no answers: null, not faked
    assert e8["speedup"] == 1.5 and e8["accuracy"] == 0.0  # against block 8's target, not block 4's


def test_report_ends_with_the_json_line(capsys):
    rows = bench.table_rows([record("target", 4, [10.0], [vanilla(8, 9)], [True]),
                             record("simsd", 4, [20.0], [spec(8, 4, 6, 12)], [False])])
    bench.report({"device": "cpu", "dtype": "float32", "threads": 2}, rows, ["a note"])
    out = capsys.readouterr().out.strip().splitlines()
    assert "| simsd | 4 | 20.0 | 2.00x | 2.00 | 50% | 0.0% |" in out
    last = json.loads(out[-1])
    assert last["device"] == "cpu" and last["dtype"] == "float32"
    assert [r["method"] for r in last["rows"]] == ["target", "simsd"]
    assert set(last["rows"][0]) == {"method", "block", "tok_s", "speedup", "tokens_per_target_forward",
                                    "acceptance", "accuracy"}
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
    c = model.Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    m = bench.random_model(c, "cpu", torch.bfloat16, seed=0)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in m.parameters())
    assert torch.equal(m.model.norm.weight, torch.ones(32, dtype=torch.bfloat16))
    assert abs(m.model.layers[0].mlp.up_proj.weight.float().std().item() - 0.02) < 0.002


def micro_checkpoint(path, layers, block_size=None):
    torch.manual_seed(layers)
    c = model.Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, mask_token_id=MASK, block_size=block_size)
    model.write_byte_tokenizer(path)
    model.save(model.Transformer(c), path)
    return str(path)


def test_real_checkpoints_with_and_without_answers(tmp_path, capsys):
    target = micro_checkpoint(tmp_path / "target", 2)
    tok = model.load_tokenizer(target)
    m = model.load(target)
    out, _ = decode.generate(m, tok.chat("one"), 8, block=4, stop_ids=tok.stop_ids, mask_id=tok.mask_id)
    answered, bare = tmp_path / "answers.jsonl", tmp_path / "bare.jsonl"
    answered.write_text(json.dumps({"prompt": "one", "answer": tok.decode(out)}) + "\n"
                        + json.dumps({"prompt": "two", "answer": "not in any output"}) + "\n")
    bare.write_text('{"prompt": "one"}\n{"prompt": "two"}\n')
    argv = ["--model", target, "--draft", target, "--new-tokens", "8", "--answer-cap", "8", "--blocks", "4",
            "--device", "cpu", "--threads", "1"]
    bench.main(argv + ["--prompts", str(answered)])
    rows = {r["method"]: r for r in last_json(capsys)["rows"]}
    # draft == target: vanilla and exact verification decode the same tokens, so one of two is right
    assert rows["target"]["accuracy"] == rows["draft"]["accuracy"] == rows["simsd-exact"]["accuracy"] == 50.0
    assert rows["simsd-exact"]["acceptance"] == 1.0 and rows["target"]["speedup"] == 1.0
    bench.main(argv + ["--prompts", str(bare), "--draft", micro_checkpoint(tmp_path / "draft", 1)])
    rows = last_json(capsys)["rows"]
    assert len(rows) == 4 and all(r["accuracy"] is None and r["tok_s"] > 0 for r in rows)


def test_block_the_checkpoint_was_not_trained_with_fails(tmp_path):
    target = micro_checkpoint(tmp_path / "target", 1, block_size=4)
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(SystemExit, match="block 8 requested but the checkpoints were trained with block 4"):
        bench.main(["--model", target, "--draft", target, "--prompts", str(tmp_path / "p.jsonl"), "--blocks", "8",
                    "--device", "cpu"])
