"""bench.py: the table's maths, the projection and the headline against hand-computed values on
synthetic records; checkpoints and the toy rows on micro models (the
lossless rows must equal their target row); bad input refused with one sentence and exit 2."""
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import bench
import checkpoint
import head
from batch import Stats


def strict_json(line):
    """json.loads that refuses Infinity and NaN, which the JSON standard does not have."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(line, parse_constant=refuse)


def last_json(capsys):
    return strict_json(capsys.readouterr().out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- maths

@pytest.fixture(autouse=True)
def elsewhere(tmp_path, monkeypatch):
    """bench.main writes its markdown to out/results.md by default: in a test, not the checkout's."""
    monkeypatch.chdir(tmp_path)


def test_projected_cost_against_a_hand_computation():
    """96 tokens: the target alone in 100 forwards of 16.4 GB, speculation in 40 target forwards
    and 120 draft forwards of 4.06 GB: 1640 / (656 + 487.2) = 1.434569... times faster."""
    alone, speculative = bench.projected_cost(100, 0, 96), bench.projected_cost(40, 120, 96)
    assert speculative == pytest.approx(1143.2 / 96)
    assert alone / speculative == pytest.approx(1.434569, abs=1e-6)
    assert bench.projected_cost(0, 0, 0) is None  # no tokens: no number, not a division error


def row(method, draft=None, lookahead=None, block=4, temperature=0.0, task="t"):
    return bench.Row(task, method, draft, lookahead, block, temperature)


def record(passes, outputs, correct):
    return {"passes": passes, "outputs": outputs, "correct": correct}


def timed(stats, *seconds):
    """A latency pass over len(seconds) prompts: `stats` at each, taking these seconds."""
    return [replace(stats, seconds=s) for s in seconds]


def test_table_rows_against_hand_computed_values():
    alone = Stats(tokens=32, forwards=34, steps=34)
    spec = Stats(tokens=32, forwards=16, steps=34, draft_forwards=40, drafted=60, accepted=30,
                 matched=18, draft_seconds=0.1)
    records = {  # three prompts, two passes; a slow spell hits the target on a different prompt
        row("target"): record([timed(alone, 0.2, 0.4, 0.2), timed(alone, 0.4, 0.2, 0.2)],
                              [[1, 2], [3, 4], [5]], [True, False, None]),
        row("draft", "data"): record([timed(alone, 0.1, 0.1, 0.1)] * 2, [[1], [3], [5]],
                                     [False, None, None]),
        row("simsd-lossless", "data", 2): record([timed(spec, 0.1, 0.2, 0.2),
                                                  timed(spec, 0.2, 0.1, 0.2)],
                                                 [[1, 2], [3, 5], [6]], [True, False, None]),
        row("ar", block=None): record([timed(alone, 0.4, 0.4, 0.4)] * 2, [[9], [9], [9]],
                                      [True, True, True]),
        row("specdiff", "data", 1): record([timed(spec, 0.2, 0.2, 0.1), timed(spec, 0.4, 0.4, 0.2)],
                                           [[9], [8], [9]], [True, True, True]),
    }
    rows = {(r["method"], r["draft"]): r for r in bench.table_rows(records)}
    target, draft = rows["target", None], rows["draft", "data"]
    lossless, specdiff = rows["simsd-lossless", "data"], rows["specdiff", "data"]
    # tok/s: per pass the median over prompts of 32 tokens / seconds, then over passes: the
    # target's (160, 80, 160) and (80, 160, 160), the lossless row's (320, 160, 160) and
    # (160, 320, 160): both 160
    assert target["tok_s"] == 160 and lossless["tok_s"] == 160
    # speedup: per pass the median over prompts of the ratio on the same prompt, (2, 2, 1) in
    # both passes, not the 1.0 of the medians' ratio
    assert lossless["speedup_passes"] == [2, 2] and lossless["speedup"] == 2
    assert lossless["spread"] == 0 and target["speedup"] == 1.0
    assert specdiff["speedup_passes"] == [2, 1] and specdiff["speedup"] == 1.5  # against ar
    assert specdiff["spread"] == 1.0
    assert draft["speedup"] == 2.0  # (2, 4, 2) and (4, 2, 2)
    assert target["accuracy"] == 50.0 and draft["accuracy"] == 0.0  # unanswered prompts left out
    assert target["tokens_per_target_forward"] == pytest.approx(96 / 102)
    assert lossless["tokens_per_target_forward"] == 2.0  # 96 tokens / 48 target forwards
    assert lossless["steps_matched"] == pytest.approx(54 / 102) and lossless["acceptance"] == 0.5
    assert lossless["drafting"] == pytest.approx(0.6)  # 0.3 of the first pass's 0.5 seconds
    assert lossless["outputs_equal_target"] == pytest.approx(1 / 3)
    assert specdiff["outputs_equal_target"] == pytest.approx(2 / 3)
    # projected: 102 x 16.4 / (48 x 16.4 + 120 x 4.06) = 1672.8 / 1274.4 (per 96 tokens)
    assert lossless["projected_speedup"] == pytest.approx(1.312618, abs=1e-6)
    assert draft["projected_speedup"] == pytest.approx(4.039409, abs=1e-6)  # 16.4 / 4.06
    assert draft["tokens_per_target_forward"] is None and draft["steps_matched"] is None
    assert target["outputs_equal_target"] is None  # only a lossless row reproduces another


def headline_row(method, speedup, accuracy, projected=1.0, draft=None, lookahead=None,
                 spread=0.01, block=4, **extra):
    return {"task": "t", "method": method, "draft": draft, "lookahead": lookahead, "block": block,
            "temperature": 0.0, "speedup": speedup, "accuracy": accuracy, "spread": spread,
            "projected_speedup": projected, **extra}


def test_headline_is_against_the_fastest_target_alone_within_one_point():
    rows = [headline_row("target", 1.0, 90.0), headline_row("target-dyn0.9", 3.0, 89.5, 3.0),
            headline_row("target-dyn0.7", 5.0, 85.0, 4.0),
            headline_row("simsd-lossless-dyn0.9", 4.5, 89.5, 3.75, "distilled", 2),
            headline_row("simsd", 9.0, 70.0, 6.0, "data", 1),
            headline_row("simsd-position", 4.2, 95.0, 2.4, "data", 1)]
    lossless, paper = bench.headlines(rows)
    assert lossless == ("t, block 4, greedy: simsd-lossless-dyn0.9 (distilled draft, L=2) runs at "
                        "1.50x target-dyn0.9 measured (4.50x against 3.00x target), 1.25x "
                        "projected")
    # simsd is faster but 20 points worse; dyn0.7 is faster but 5 points worse
    assert paper.endswith("simsd-position (data draft, L=1) runs at 1.40x target-dyn0.9 measured "
                          "(4.20x against 3.00x target), 0.80x projected")


def test_headline_asks_whether_a_draft_pays_over_the_target_proposing_for_itself():
    """Three lossless comparisons: the fastest row with a draft against the target's best alone and
    against the target proposing for itself, and that against its best alone; each row within 1
    point of the static target (the faster self row at 80% is left out)."""
    rows = [headline_row("target", 1.0, 90.0), headline_row("target-dyn0.9", 2.0, 90.0, 2.0),
            headline_row("target-self", 2.5, 90.0, 3.0, lookahead=2),
            headline_row("target-self-dyn0.9", 4.0, 80.0, 5.0, lookahead=2),
            headline_row("simsd-lossless-block-dyn0.9", 3.0, 90.0, 4.5, "distilled", 2),
            headline_row("simsd-hybrid-block", 2.8, 90.0, 5.0, "distilled", 3)]
    drafted, versus_self, self_alone = bench.headlines(rows)
    assert drafted.endswith("simsd-lossless-block-dyn0.9 (distilled draft, L=2) runs at 1.50x "
                            "target-dyn0.9 measured (3.00x against 2.00x target), 2.25x projected")
    assert versus_self.endswith("runs at 1.20x target-self (L=2) measured (3.00x against 2.50x "
                                "target), 1.50x projected")
    assert self_alone.endswith("target-self (L=2) runs at 1.25x target-dyn0.9 measured (2.50x "
                               "against 2.00x target), 1.50x projected")


def test_headline_says_why_lossless_is_slower():
    rows = [headline_row("target", 1.0, 90.0), headline_row("simsd", 9.0, 50.0, 9.0, "data", 2),
            headline_row("simsd-lossless", 0.8, 90.0, 1.1, "data", 1, forwards=40, matched=30,
                         drafting=0.4),
            headline_row("ar", 1.0, 95.0, block=None),
            headline_row("specdiff", 1.5, 95.0, 1.8, "data", 3)]
    lossless, paper, specdiff = bench.headlines(rows)
    assert paper.endswith("no paper SimSD row is within 1 point of the static target's accuracy "
                          "(the fastest, simsd (data draft, L=2), has 50.0%)")
    assert lossless.endswith("runs at 0.80x target measured (0.80x against 1.00x target), 1.10x "
                             "projected; 20% slower measured: drafting takes 40% of its time, and "
                             "a target forward commits 0.75 matched draft steps")
    assert specdiff.endswith("specdiff (data draft, L=3) runs at 1.50x ar measured (1.50x against "
                             "1.00x ar), 1.80x projected")


def test_a_comparison_is_withheld_when_its_rows_passes_disagree():
    """Only the sentences whose rows are jumpy are withheld: here the specdiff one."""
    rows = [headline_row("target", 1.0, 90.0), headline_row("ar", 1.0, 95.0, block=None),
            headline_row("specdiff", 2.0, 95.0, block=4, spread=0.15, draft="data", lookahead=1),
            headline_row("simsd-lossless", 1.5, 90.0, 1.1, "data", 1)]
    lossless, specdiff = bench.headlines(rows)
    assert lossless.startswith("t, block 4, greedy: simsd-lossless (data draft, L=1) runs at 1.50x")
    assert specdiff == ("t, block 4, greedy: specdiff (data draft, L=1) against ar: withheld: the "
                        "speedup of specdiff (data draft, L=1) differs by 15% between passes, "
                        "more than 10%; rerun on a quieter machine")
    rows[2]["spread"] = None  # one pass
    assert bench.headlines(rows)[1].endswith("withheld: specdiff (data draft, L=1) has fewer "
                                             "than two timing passes to compare; use --repeats "
                                             "2 or more")
    rows[2]["spread"] = 0.09
    assert "withheld" not in " ".join(bench.headlines(rows))


def test_report_names_draft_lookahead_threads_and_never_writes_infinity(capsys):
    rows = [headline_row("simsd", math.inf, 90.0, math.nan, "distilled", 3, tok_s=math.inf,
                         tokens_per_target_forward=2.5, steps_matched=0.5, acceptance=0.25,
                         drafting=0.75, draft_forwards_per_target_forward=1.5, width=20.0,
                         outputs_equal_target=None)]
    bench.report({"device": "cpu", "dtype": "float32", "threads": 1}, rows)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "- device: cpu" and "- threads: 1" in out
    header = next(i for i, line in enumerate(out) if line.startswith("| method"))
    assert out[header].startswith("| method | draft | L | block | temp | tok/s | speedup |")
    assert out[header + 2].startswith("| simsd | distilled | 3 | 4 | 0 |")
    assert out[header + 2].endswith("| 2.50 | 50% | 25% | 75% | 1.50 | 20.0 | 90.0 |  |")
    result = strict_json(out[-1])
    assert result["threads"] == 1 and result["spread_limit"] == 0.1
    assert result["rows"][0]["speedup"] is None and result["rows"][0]["projected_speedup"] is None


# ----------------------------------------------------------------------------- end to end

def write_checkpoint(random_model, path, seed, layers, model_type="sdar", block_size=None):
    """A micro checkpoint on the byte-level ids, its head sharpened (random_model) so that
    dynamic decoding reveals several positions in some steps."""
    m = random_model(seed, layers, model_type, vocab=260)
    m.config.block_size = block_size
    checkpoint.save(m, path)
    mask = ("<|MASK|>",) if model_type == "sdar" else ()
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + mask
    checkpoint.write_byte_tokenizer(path, specials=specials)
    return str(path)


@pytest.fixture(scope="module")
def micro(tmp_path_factory, random_model):
    """Folders of micro models: an SDAR target, two different drafts, an AR target."""
    root = tmp_path_factory.mktemp("micro")
    folders = {"target": write_checkpoint(random_model, root / "target", 0, 2),
               "data": write_checkpoint(random_model, root / "data", 1, 1),
               "distilled": write_checkpoint(random_model, root / "distilled", 2, 1),
               "ar": write_checkpoint(random_model, root / "ar", 3, 2, "qwen3")}
    torch.manual_seed(0)  # a head for the target (head.py), untrained
    head.save(head.new(checkpoint.load(folders["target"]), 4, width=16, layers=1),
              root / "head")
    return {**folders, "head": str(root / "head")}


def test_checkpoints_lossless_rows_equal_their_target(micro, tmp_path, capsys):
    """The target and the draft are different models; the lossless rows must return the target
    rows' outputs, whatever the lookahead, and the paper's rows need not."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n"
                               for p, a in (("one", "x"), ("two", None), ("three", "y"))))
    argv = ["--model", micro["target"], "--draft", micro["data"], "--prompts", str(prompts),
            "--new-tokens", "8", "--answer-cap", "8", "--lookahead", "1", "2", "--device", "cpu"]
    methods = ["simsd-lossless", "simsd-lossless-dyn0.9", "simsd-hybrid-block",
               "simsd-lossless-block-dyn0.9", "target-self", "target-self-dyn0.9"]
    bench.main(argv + ["--methods", *methods, "simsd-exact"])
    rows = last_json(capsys)["rows"]
    lossless = [r for r in rows if r["method"] in methods]
    assert {(r["method"], r["lookahead"]) for r in lossless} == {(m, L) for m in methods
                                                                 for L in (1, 2)}
    assert all(r["outputs_equal_target"] == 1.0 for r in lossless)
    assert {r["draft"] for r in lossless} == {"data", None}
    assert all(r["draft_forwards_per_target_forward"] == 0 for r in lossless if r["draft"] is None)
    alone = {r["method"] for r in rows if r["draft"] is None} - set(methods)
    assert alone == {"target", "target-dyn0.9"}
    assert all(r["lookahead"] is None for r in rows if r["method"] in alone)
    bench.main(["--model", micro["ar"], "--draft", micro["data"], "--prompts", str(prompts),
                "--new-tokens", "8", "--answer-cap", "8", "--lookahead", "2", "--device", "cpu"])
    rows = {r["method"]: r for r in last_json(capsys)["rows"]}
    assert set(rows) == {"draft", "ar", "specdiff"} and rows["specdiff"]["lookahead"] == 2
    assert rows["specdiff"]["outputs_equal_target"] == 1.0 and rows["ar"]["speedup"] == 1.0


@pytest.fixture
def toys(monkeypatch, micro):
    """train_tiny's toy API on micro models: two tasks, two drafts each, no AR-distilled draft;
    the patches end with the test."""
    import train_tiny
    monkeypatch.setattr(train_tiny, "TASKS", ("sort", "walk"))
    monkeypatch.setattr(train_tiny, "DRAFTS", ("data", "distilled"), raising=False)
    monkeypatch.setattr(train_tiny, "folders", lambda task: dict(micro), raising=False)
    monkeypatch.setattr(train_tiny, "ensure_trained", lambda quiet=False: None)
    monkeypatch.setattr(train_tiny, "examples",
                        lambda n, split, task: [(f"{task} {i}", "no") for i in range(n)])
    monkeypatch.setattr(train_tiny, "score", lambda prompt, prediction, answer: False)
    return micro


def test_toy_rows_by_default(toys):
    """The default methods on the toys at --lookahead 1 3 and temperatures 0 1: every draft for
    specdiff, the distilled draft for the lossless rows, the data draft for the paper's simsd, the
    target proposing for itself at lookahead 1 and 2, sampling on walk only."""
    args = bench.parse_args(["--temperatures", "0", "1"])
    args.lookahead = [1, 3]
    tasks = bench.toy_tasks(args, ("cpu", torch.float32, {}))
    rows = {tuple(r) for name, task in tasks.items() for r in bench.plan(name, task, args)}
    both = ("data", "distilled")
    expected = {(m, None, None) for m in ("target", "target-dyn0.9", "target-dyn0.7", "ar")}
    expected |= {("draft", d, None) for d in both}
    expected |= {("specdiff", d, L) for d in both for L in (1, 3)}
    lossless = [m for m in bench.DEFAULT_METHODS if m.startswith(("simsd-lossless", "simsd-hybrid"))]
    assert len(lossless) == 6
    expected |= {(m, "distilled", L) for m in lossless for L in (1, 3)}
    expected |= {(m, None, L) for m in ("target-self", "target-self-dyn0.9") for L in (1, 2)}
    expected |= {("simsd", "data", L) for L in (1, 3)}
    heads = [m for m in bench.DEFAULT_METHODS if m.startswith("simsd-head")]
    assert len(heads) == 4
    expected |= {(m, "head", L) for m in heads for L in (1, 3)}
    assert rows == {(task, m, d, L, None if m == "ar" else 4, t) for task in ("sort", "walk")
                    for t in (0.0, 1.0) for m, d, L in expected if task == "walk" or t == 0.0}
    assert tasks["sort"].folders["distilled draft"] == toys["distilled"]


@pytest.fixture
def two_threads():
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(1)


def test_toy_run_states_one_thread_and_the_drafts(toys, two_threads, capsys, tmp_path,
                                                  monkeypatch):
    """The toys on a CPU run one thread unless --threads says otherwise; folders are named as
    typed from the working directory; --results holds what stdout shows but the JSON line."""
    monkeypatch.chdir(Path(toys["distilled"]).parent)
    bench.main(["--tasks", "walk", "--num-prompts", "2", "--new-tokens", "8", "--answer-cap", "8",
                "--methods", "simsd-lossless", "--lookahead", "2",
                "--results", str(tmp_path / "results.md")])
    out = capsys.readouterr().out
    result = strict_json(out.strip().splitlines()[-1])
    assert result["threads"] == 1 and torch.get_num_threads() == 1 and "- threads: 1" in out
    assert "distilled draft " in out and "(distilled)" in out
    assert (tmp_path / "results.md").read_text() == out.strip().rsplit("\n", 1)[0] + "\n"
    rows = {(r["method"], r["draft"], r["lookahead"]): r for r in result["rows"]}
    assert set(rows) == {("target", None, None), ("simsd-lossless", "distilled", 2)}
    assert all(r["outputs_equal_target"] == 1.0 for r in rows.values() if r["draft"])


def test_batch_table_on_the_toys(toys, capsys):
    """The batch table: per task, target, target-dyn0.9, ar, the fastest lossless and specdiff rows
    at each size; every batched output equal to its batch-1 output, size 1 at 1x its own."""
    bench.main(["--tasks", "sort", "--num-prompts", "3", "--new-tokens", "6", "--answer-cap", "6",
                "--methods", "target-dyn0.9", "target-self", "simsd-lossless-block", "specdiff",
                "--lookahead", "2", "--batch-sizes", "1", "2", "3"])
    out = capsys.readouterr().out
    assert "sort, batches (every prompt, in batches of each size):" in out
    batches = strict_json(out.strip().splitlines()[-1])["batches"]
    rows = {(r["method"], r["batch"]) for r in batches}
    fastest = {r["method"] for r in batches} - {"target", "target-dyn0.9", "ar", "specdiff"}
    assert len(fastest) == 1 and fastest <= {"target-self", "simsd-lossless-block"}
    assert rows == {(m, b) for m in ("target", "target-dyn0.9", "ar", "specdiff", *fastest)
                    for b in (1, 2, 3)}
    assert all(r["equal_batch_1"] == 1.0 for r in batches)
    assert all(r["over_batch_1"] == 1.0 for r in batches if r["batch"] == 1)
    assert all(r["speedup"] == 1.0 for r in batches if r["method"] in ("target", "ar"))


def test_split_reads_the_loops_labels_and_adds_up(toys, capsys):
    """split.py on the micro toys: a row per task and method, parts that add up to the total (the
    target's forward a real share of it), the draft's denoising only where a draft runs, and every
    step of the speculative loop found by its label (a renamed label would read as zero)."""
    import split
    split.main(["--num-prompts", "2", "--new-tokens", "8", "--methods", "target-dyn0.9",
                "simsd-lossless-block-dyn0.9", "target-self", "--lookahead", "2"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert lines[0] == ("| task | method | batch | total | target forward | step | propose | "
                        "draft | lay out | accept | commit | the rest |")
    rows = [line.strip("| ").split(" | ") for line in lines[1:]]
    assert [(r[0], r[1].split(" ")[0]) for r in rows] == [
        (t, m) for t in ("sort", "walk") for m in ("target-dyn0.9", "simsd-lossless-block-dyn0.9",
                                                    "target-self")]
    for r in rows:
        total, parts = float(r[3]), dict(zip(split.LABELS + ("the rest",), map(float, r[4:])))
        shown = sum(v for k, v in parts.items() if k != "draft")  # the draft's is in propose's
        assert shown == pytest.approx(total, abs=0.005 * len(parts)), r
        assert parts["target forward"] > 0.2 * total, r
        assert (parts["draft"] > 0) == ("draft" in r[1]), r
        speculating = r[1].split(" ")[0] != "target-dyn0.9"
        loop = ("propose", "lay out", "accept", "commit")
        assert all((parts[k] > 0) == speculating for k in loop) and (parts["step"] > 0) != speculating, r


# ----------------------------------------------------------------------------- refused input

def test_bad_input_is_one_sentence_and_exit_2(tmp_path, run_scripts):
    """As in decode.py: a sentence, exit 2, no traceback, and never a hang."""
    (tmp_path / "empty.jsonl").write_text('{"prompt": "hi"}\n{"prompt": ""}\n')
    cases = [(["--num-prompts", "1000", "--tasks", "walk"],
              "asked for 1000 distinct held-out walk prompts; found only 376"),
             (["--num-prompts", "1000000"], "at most 1000 held-out prompts per task"),
             (["--threads", "1000000"], "--threads must be from 1 to this machine's"),
             (["--threads", "0"], "--threads must be from 1 to this machine's"),
             (["--model", "m", "--draft", "d", "--prompts", str(tmp_path / "empty.jsonl")],
              "line 2 is not a {\"prompt\": ..., \"answer\": ...} object"),
             (["--temperatures", "inf"], "--temperatures must be 0 (argmax) or a finite number >= 0.0001"),
             (["--lookahead", "0"], "argument --lookahead: must be an integer >= 1; got 0")]
    for (args, sentence), proc in zip(cases, run_scripts("bench.py", [a for a, _ in cases])):
        err = proc.stderr
        assert proc.returncode == 2 and sentence in err and "Traceback" not in err, (args, err)
        assert err.strip().splitlines()[-1].startswith("bench.py: error: ")


def test_split_refuses_in_its_own_name(capsys):
    """split.py shares bench.py's flags; its refusals name split.py, and bench's stay bench's."""
    import split
    for main, prog in ((split.main, "split.py"), (bench.main, "bench.py")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--batch-sizes", "0"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert err == (f"{prog}: error: argument --batch-sizes: must be an integer >= 1; got 0 "
                       f"(python {prog} --help lists the options)\n")


def refusal(argv, capsys):
    """bench.main's sentence for argv, which must exit with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_block_errors_say_what_the_config_holds(tmp_path, micro, random_model, capsys):
    """No "block None", and no advice about other checkpoints."""
    b4 = write_checkpoint(random_model, tmp_path / "b4", 0, 1, block_size=4)
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"prompt": "hi"}\n')
    err = refusal(["--model", b4, "--draft", micro["data"], "--prompts", str(ok)], capsys)
    assert ("the draft was trained with no block_size in its config.json and the target with "
            "block 4") in err
    err += refusal(["--model", b4, "--draft", b4, "--prompts", str(ok), "--blocks", "8"], capsys)
    assert "block 8 requested but the models were trained with block 4" in err
    assert "None" not in err and "-b8" not in err
