"""`python decode.py` (decode.py): every bad input is one sentence and exit 2 (a checkpoint's fields
among them, checked before any weights load), every mode decodes, the stream is exactly the returned
tokens, the toy default routes prompts to their task's models, a prompt file's lines are the file's,
and output that cannot be written (exit 1) or Ctrl-C (exit 130) ends in one line."""
import json
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import decode
import sdar
import checkpoint
import speculative
import train_tiny

ROOT = Path(__file__).resolve().parents[1]


# Copies of the micro target with one file edited: (name, file, edit(obj) on its JSON, in place).
def drop(key):
    return lambda d: d.pop(key)


def put(key, value):
    return lambda d: d.update({key: value})


def header(edit):  # the edit of one tensor's entry in the safetensors header
    return lambda h: edit(h["model.norm.weight"])


BROKEN = [
    ("noweightmap", "model.safetensors.index.json", put("metadata", {})),
    ("badtoken", "vocab.json", put("a\u4e00", 300)),
    ("badadded", "tokenizer_config.json", lambda d: d["added_tokens_decoder"].update({"259": "<|MASK|>"})),
    ("bigadded", "tokenizer_config.json", lambda d: d["added_tokens_decoder"].update({"300": {"content": "<x>"}})),
    ("ropetext", "config.json", put("rope_theta", "1e4")),
    ("epszero", "config.json", put("rms_norm_eps", 0)),
    ("tied", "config.json", put("tie_word_embeddings", "no")),
    ("yarn", "config.json", put("rope_scaling", {"rope_type": "yarn", "factor": 4.0})),
    ("maskout", "config.json", put("mask_token_id", 999)),
    ("nomaskid", "config.json", drop("mask_token_id")),
    ("wrongmask", "config.json", put("mask_token_id", 258)),
    ("wide", "config.json", put("hidden_size", 48)),
    ("eostext", "generation_config.json", put("eos_token_id", "258")),
    ("eosunknown", "generation_config.json", put("eos_token_id", [258, 5000])),
    ("nodtype", "model.safetensors", header(drop("dtype"))),
    ("noshape", "model.safetensors", header(drop("shape"))),
    ("badoffsets", "model.safetensors", header(put("data_offsets", [0]))),
    ("notentry", "model.safetensors", lambda h: h.update({"model.norm.weight": [1, 2]}))]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, micro_checkpoint, edit_header):
    """Named micro checkpoints: a target and a draft (block 4), a block-8 draft, a draft without
    block_size, an AR target, broken folders (BROKEN among them) and prompt files."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {"target": micro_checkpoint(root / "target"), "draft": micro_checkpoint(root / "draft", 1),
           "b8": micro_checkpoint(root / "b8", 2, block_size=8),
           "free": micro_checkpoint(root / "free", 5, block_size=None),
           "ar": micro_checkpoint(root / "ar", 3, model_type="qwen3")}
    (root / "weightless").mkdir()
    (root / "weightless" / "config.json").write_text((root / "target" / "config.json").read_text())
    out["weightless"] = str(root / "weightless")
    out["notjson"] = micro_checkpoint(root / "notjson")
    (root / "notjson" / "config.json").write_text("{ this is not json")
    out["layers"] = micro_checkpoint(root / "layers")
    config = json.loads((root / "layers" / "config.json").read_text())
    (root / "layers" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": -1}))
    out["nomask"] = micro_checkpoint(root / "nomask")
    checkpoint.write_byte_tokenizer(root / "nomask", specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    (root / "prompts.txt").write_text("hi\n\nhello there\nsort 12\n", encoding="utf-8")
    (root / "latin1.txt").write_bytes("hi\ncafé au lait\n".encode("latin-1"))
    (root / "blank.txt").write_text("\n  \n\n")
    (root / "long.txt").write_text("hi\n\n" + "a " * 40 + "\n")
    (root / "folder").mkdir()
    out.update({name: str(root / f"{name}.txt") for name in ("prompts", "latin1", "blank", "long")})
    out["folder"], out["missing"] = str(root / "folder"), str(root / "missing.txt")
    out["othervocab"] = micro_checkpoint(root / "othervocab", 4)
    checkpoint.write_byte_tokenizer(root / "othervocab",
                               specials=("<|im_start|>", "<|endoftext|>", "<|im_end|>", "<|MASK|>"))
    for name, file, edit in BROKEN:
        shutil.copytree(root / "target", root / name)
        out[name], path = str(root / name), root / name / file
        if file.endswith(".safetensors"):
            edit_header(path, edit)
            continue
        obj = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        edit(obj)
        path.write_text(json.dumps(obj), encoding="utf-8")
    out["roomy"] = micro_checkpoint(root / "roomy", positions=8192)  # room for a long decode
    (root / "utf16.txt").write_bytes("hi\n".encode("utf-16"))
    (root / "long3.txt").write_text("hi\nhello\n" + "a " * 40 + "\nhi\n" + "b " * 40 + "\n")
    out.update({name: str(root / f"{name}.txt") for name in ("utf16", "long3")})
    return out


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "decode.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def bad_inputs(c):
    """(arguments, the sentence expected on stderr); each must exit 2 with no traceback."""
    m = ["--model", c["target"], "--device", "cpu", "--prompt", "hi", "--max-new-tokens", "8"]
    free = ["--model", c["free"], "--device", "cpu", "--prompt", "hi", "--max-new-tokens", "8"]
    f = m[:4] + ["--max-new-tokens", "8"]  # for --prompts
    spec = m + ["--draft", c["draft"]]
    cases = [
        (m + ["--temperature", "-1"], "--temperature must be 0 (argmax) or a finite number >= 0.0001 (smaller ones are argmax in effect and can overflow float32; use 0); got -1.0"),
        (m + ["--temperature", "inf"], "--temperature must be 0 (argmax) or a finite number >= 0.0001"),
        (m + ["--top-p", "0"], "--top-p must be in (0, 1] (1 = off); got 0.0"),
        (m + ["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (m + ["--top-k", "-3"], "--top-k must be an integer >= 0"),
        (m + ["--block", "0"], "--block must be an integer >= 1; got 0"),
        (m + ["--steps", "0"], "--steps must be an integer from 1 to the block length (4); got 0"),
        (m + ["--steps", "5"], "--steps must be an integer from 1 to the block length (4); got 5"),
        (m + ["--strategy", "dynamic", "--threshold", "2"], "--threshold must be in [0, 1]; got 2.0"),
        (m + ["--threshold", "0.5"], "--threshold applies to --strategy dynamic only"),
        (m + ["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1; got 0"),
        (m + ["--max-new-tokens", "60"], "exceed the model's max_position_embeddings 64"),
        (m + ["--prompt", "  "], "--prompt is empty"),
        (["--model", ""], "--model is empty"),
        (m + ["--seed", "1180591620717411303424"], "--seed must be an integer from 0 to 2**64 - 1"),
        (m + ["--threads", "0"], "--threads must be an integer from 1 to this machine's"),
        (m + ["--threads", "100000"], "--threads must be an integer from 1 to this machine's"),
        (m + ["--strategy", "sometimes"], "invalid choice: 'sometimes'"),
        (m + ["--block", "8"], "block 8 requested but this checkpoint was trained with block 4; use "
                               "--block 4 or leave it out (block 8 needs the -b8 checkpoints"),
        (["--model", c["b8"], "--block", "4"], "trained with block 8; use --block 8 or leave it out"),
        (free + ["--block", "1000000"], "one target forward would hold 2000000 tokens"),
        (free + ["--block", "100"], "exceed the model's max_position_embeddings 64"),
        (spec + ["--lookahead", "0"], "--lookahead must be an integer >= 1; got 0"),
        (spec + ["--eos-min-prob", "5"], "--eos-min-prob must be in [0, 1]"),
        (spec + ["--accept", "step"], "--accept does not apply to lossless verification"),
        (spec + ["--eos-min-prob", "0.5"], "--eos-min-prob does not apply to lossless verification"),
        (spec + ["--vanilla"], "--vanilla decodes without a draft"),
        (m + ["--verify", "exact"], "--verify does not apply to decoding without a draft"),
        (m + ["--show"], "--show does not apply to decoding without a draft"),
        (m + ["--draft", c["b8"]], "the draft was trained with block 8 and the target with block 4"),
        (m + ["--draft", c["free"]], "the draft was trained with no block_size in its config.json"),
        (m + ["--draft", c["ar"]], "this project drafts with diffusion models"),
        (m + ["--draft", c["othervocab"]], "does not give every token of the target the same id"),
        (["--model", c["ar"], "--draft", c["draft"], "--accept", "step"],
         "--accept does not apply to an autoregressive target"),
        (["--model", c["ar"], "--draft", c["draft"], "--temperature", "1", "--strategy", "dynamic"],
         "--strategy dynamic drafts by the confidence of sampled tokens"),
        (["--model", c["ar"], "--block", "4"], "--block does not apply to an autoregressive target decoding alone"),
        (["--model", c["nomask"]], "its config.json says model_type 'sdar' but its tokenizer defines no mask "
                                 "token (<|MASK|>); a diffusion model cannot decode without one."),
        (["--model", c["layers"]], "num_hidden_layers must be a positive integer; got -1."),
        (["--model", "/no/such/folder"], "is not a folder; download weights with the Hugging Face CLI"),
        (["--model", c["ar"], "--draft", "head"], "--draft head is not a folder: with --model it takes"),
        (["--model", c["weightless"]], "the weights are missing."),
        (["--model", c["notjson"]], "config.json is not valid JSON"),
        (["--system", "be brief"], "--system does not apply to the toy models"),
        (["--no-think"], "--no-think does not apply to the toy models"),
        (m + ["--draft", "self", "--lookahead", "3"], "--lookahead 3 does not apply to the target proposing for itself"),
        (m + ["--draft", "self", "--drafting", "block"], "--drafting does not apply to the target proposing for itself"),
        (m + ["--draft", "self", "--draft-device", "cpu"], "--draft-device does not apply to the target proposing for itself"),
        (m + ["--draft", "self", "--verify", "exact"], "--verify exact judges a draft's tokens"),
        (spec + ["--verify", "exact", "--proposer", "hybrid"],
         "--proposer does not apply to the paper's verification"),
        (m + ["--proposer", "hybrid"], "--proposer does not apply to decoding without a draft"),
        (m + ["--drafting", "step"], "--drafting does not apply to decoding without a draft"),
        (["--model", c["ar"], "--draft", "self"], "is autoregressive and cannot propose for itself"),
        (["--model", c["ar"], "--draft", c["draft"], "--proposer", "draft"],
         "--proposer does not apply to an autoregressive target"),
        (f + ["--prompts", c["missing"]], "does not exist"),
        (f + ["--prompts", c["folder"]], "is a folder; give a text file with one prompt per line"),
        (f + ["--prompts", c["latin1"]], "is not UTF-8 text (line 2, byte 6, cannot be decoded)"),
        (f + ["--prompts", c["blank"]], "holds no prompt; write one per line"),
        (f + ["--prompts", c["long"]], "line 3 of --prompts: the prompt ("),
        (f + ["--prompts", c["prompts"], "--batch-size", "0"], "--batch-size must be an integer >= 1; got 0"),
        (f + ["--prompts", c["prompts"], "--batch-size", "-2"], "--batch-size must be an integer >= 1; got -2"),
        (f + ["--prompts", c["prompts"], "--batch-size", "two"], "argument --batch-size: invalid int value: 'two'"),
        (m + ["--batch-size", "4"], "--batch-size applies to --prompts FILE"),
        (m + ["--prompts", c["prompts"]], "--prompt does not apply to --prompts"),
        (f + ["--prompts", c["prompts"], "--show"], "--show does not apply to --prompts"),
        (["--model", c["target"], "--draft-device", "cuda"], "--draft-device cuda was asked for"),
        (["--device", "cuda"], "--device cuda was asked for but this machine has no CUDA GPU"),
        (f + ["--prompts", ""], "--prompts is empty"),
        (f + ["--prompts", "/dev/zero"], "--prompts /dev/zero holds more than 64 MiB, the most this command reads"),
        (f + ["--prompts", c["utf16"]], "is UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8"),
        (f + ["--prompts", c["long3"]], "line 3 of --prompts: the prompt (99 tokens), --max-new-tokens 8 and one "
                                        "block (4) exceed the model's max_position_embeddings 64 (and so does line 5)"),
        (["--model", c["noweightmap"]], "model.safetensors.index.json has no weight_map; it must map each tensor"),
        (["--model", c["badtoken"]], "vocab.json: the token 'a\u4e00' is not written in the byte-level alphabet"),
        (["--model", c["badadded"]], "tokenizer_config.json: the added_tokens_decoder entry '259' is not an id"),
        (["--model", c["bigadded"]], "its tokenizer has ids up to 300 but its config.json's vocab_size is 260"),
        (["--model", c["ropetext"]], "config.json: rope_theta must be a finite number above 0; got '1e4'."),
        (["--model", c["epszero"]], "config.json: rms_norm_eps must be a finite number above 0; got 0."),
        (["--model", c["tied"]], "config.json: tie_word_embeddings must be true or false; got 'no'."),
        (["--model", c["yarn"]], "config.json asks for RoPE scaling 'yarn', which this model does not implement"),
        (["--model", c["maskout"]], "config.json: mask_token_id must be a token id, an integer from 0 to "
                                    "vocab_size - 1 (259); got 999."),
        (["--model", c["nomaskid"]], "its config.json has no mask_token_id but the tokenizer's <|MASK|> is id "
                                     "259; set mask_token_id to 259."),
        (["--model", c["wrongmask"]], "its config.json gives mask_token_id 258 but the tokenizer's <|MASK|> is "
                                      "id 259; set mask_token_id to 259."),
        (["--model", c["wide"]], "does not match its config.json: mis-shaped 12 tensors, first ['lm_head.weight "
                                 "(260, 32) != (260, 48)', "),
        (["--model", c["eostext"]], "generation_config.json: eos_token_id must be a token id or a list of them; "
                                    "got '258'."),
        (["--model", c["eosunknown"]], "generation_config.json: eos_token_id 5000 is no token of this tokenizer"),
        (["--model", c["nodtype"]], "model.safetensors: the header gives tensor model.norm.weight no dtype; the "
                                    "file is corrupt"),
        (["--model", c["noshape"]], "the header gives tensor model.norm.weight no shape"),
        (["--model", c["badoffsets"]], "the header gives tensor model.norm.weight a data_offsets that is not two "
                                       "integers"),
        (["--model", c["notentry"]], "the header's entry of tensor model.norm.weight is not an object"),
        (m + ["--draft", c["wrongmask"]], "--draft " + c["wrongmask"] + " cannot be loaded: its config.json gives "
                                          "mask_token_id 258")]
    return [case for case in cases if "cuda" not in case[0] or not torch.cuda.is_available()]


def test_bad_input_is_one_sentence_and_exit_2(ckpt, capsys):
    """Every bad input: exit 2, the sentence on stderr, no doubled punctuation, and the download
    hint only where the folder is missing. In-process (an exception other than the exit would fail
    the test); the command itself, run as a process, is checked below."""
    for args, sentence in bad_inputs(ckpt):
        with pytest.raises(SystemExit) as exit_:
            decode.main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and sentence in err, (args, err)
        line = err.strip().splitlines()[-1]  # ours, after argparse's usage lines if any
        assert line.startswith("decode.py: error: "), err
        assert not any(p in line for p in ("..", ".;", ";.", "  ")), err
        assert ("huggingface-cli" in err) == ("/no/such/folder" in args), err


def test_the_command_refuses_without_a_traceback(ckpt, run_scripts):
    """As processes: a range, a loading and a pairing error end with one line and exit 2."""
    cases = [case for case in bad_inputs(ckpt) if case[1].startswith(("--temperature must",
             "num_hidden_layers", "the draft was trained with block 8"))]
    for (args, sentence), proc in zip(cases, run_scripts("decode.py", [a for a, _ in cases])):
        assert proc.returncode == 2 and sentence in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_every_mode_decodes(ckpt):
    """A checkpoint decodes alone (SDAR and AR), speculatively (SimSD's three verifications and
    SpecDiff) and with --show."""
    cases = [([ckpt["target"]], ["tokens per forward", "vanilla"]),
             ([ckpt["ar"], "--no-think"], ["1.00 tokens per forward", "ar,"]),
             ([ckpt["target"], "--draft", ckpt["draft"], "--show", "--lookahead", "2"],
              ["tokens per target forward", "lossless", "lookahead 2", "steps matched per target"]),
             ([ckpt["target"], "--draft", ckpt["draft"], "--verify", "simsd", "--accept", "position"],
              ["simsd, position order"]),
             ([ckpt["ar"], "--draft", ckpt["draft"], "--show", "--temperature", "1"], ["specdiff"]),
             ([ckpt["target"], "--draft", "self", "--show"], ["the target proposing for itself",
                                                            "0.00 draft forwards per target"]),
             ([ckpt["target"], "--draft", ckpt["draft"], "--proposer", "draft", "--drafting", "step"],
              ["lossless, draft proposals"])]
    for args, words in cases:
        r = run_cli("--model", *args, "--prompt", "hi", "--max-new-tokens", "8", "--device", "cpu")
        assert r.returncode == 0, r.stderr
        assert all(w in r.stdout for w in words), (args, r.stdout)


def test_the_stream_is_exactly_the_returned_tokens(ckpt):
    """The streamed text is the decoded output, cut at --max-new-tokens, in every mode."""
    tok = checkpoint.load_tokenizer(ckpt["target"])
    target, draft, ar = (checkpoint.load(ckpt[k]) for k in ("target", "draft", "ar"))
    ids = tok.chat("hi")
    cases = [([ckpt["target"]], sdar.generate(target, ids, 5, stop_ids=tok.stop_ids)[0]),
             ([ckpt["ar"]], sdar.generate_ar(ar, ids, 5, stop_ids=tok.stop_ids)[0]),
             ([ckpt["target"], "--draft", ckpt["draft"], "--verify", "simsd"],
              speculative.generate(target, draft, ids, 5, stop_ids=tok.stop_ids, verify="simsd")[0]),
             ([ckpt["target"], "--draft", "self"],
              speculative.generate(target, None, ids, 5, stop_ids=tok.stop_ids)[0])]
    for args, tokens in cases:
        r = run_cli("--model", *args, "--prompt", "hi", "--max-new-tokens", "5", "--device", "cpu")
        body = r.stdout.split(">>> hi\n\n", 1)[1].split("\n[", 1)[0]
        assert body == tok.decode(tokens) and f"[{len(tokens)} tokens" in r.stdout, (args, r.stdout)


def test_help_shows_defaults_and_a_closed_pipe_is_quiet(ckpt):
    r = run_cli("--help")
    for name, default in (("--max-new-tokens", "default 256"), ("--top-k", "default 0"),
                          ("--seed", "default 0"), ("--threshold", "default 0.9"),
                          ("--verify", "default lossless"), ("--threads", "default: 1 for models")):
        assert default in " ".join(r.stdout.split()), name
    proc = subprocess.Popen([sys.executable, "decode.py", "--model", ckpt["target"], "--prompt", "hi",
                             "--max-new-tokens", "40", "--device", "cpu"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(4)
    proc.stdout.close()  # what `| head -c 4` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) != 0 and "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.fixture
def toys(ckpt, monkeypatch):
    """The toy default, pointed at micro checkpoints (the real toys take minutes to train): sort runs
    target + draft, walk runs draft + target, so the output says which pair ran."""
    folders = {"sort": {"target": ckpt["target"], "data": ckpt["draft"], "distilled": ckpt["draft"]},
               "walk": {"target": ckpt["draft"], "data": ckpt["target"], "distilled": ckpt["target"]}}
    monkeypatch.setattr(train_tiny, "folders", folders.get)
    monkeypatch.setattr(train_tiny, "ensure_trained", lambda quiet=False: None)
    loaded = []
    real = decode.read_checkpoint
    monkeypatch.setattr(decode, "read_checkpoint", lambda path, *a: (loaded.append(Path(path).name), real(path, *a))[1])
    return loaded


def test_the_toy_default_routes_prompts_to_their_tasks_models(toys, capsys):
    """--prompt picks its task's pair and notes a prompt outside the toys' training; --vanilla drops
    the draft; without --prompt each task's held-out prompts run on that task's pair."""
    decode.main(["--prompt", "walk 3 to 5 in 4 steps within 2-6", "--max-new-tokens", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.count(">>> ") == 1 and ">>> walk 3 to 5" in out and "lossless" in out
    assert "note: " in out and toys == ["draft", "target"]
    toys.clear()
    decode.main(["--vanilla", "--max-new-tokens", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    prompts = [p for task in train_tiny.TASKS for p, _ in train_tiny.examples(3, "heldout", task=task)]
    assert [line[4:] for line in out.splitlines() if line.startswith(">>> ")] == prompts
    assert "vanilla" in out and "lossless" not in out and "truncated at --max-new-tokens 4" in out
    assert toys == ["target", "draft"]  # each task's target, no drafts
    toys.clear()
    decode.main(["--draft", "self", "--max-new-tokens", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.count("the target proposing for itself") == len(prompts)
    assert toys == ["target", "draft"]  # each task's target proposes for itself


@pytest.mark.parametrize("mode", [[], ["--draft", "DRAFT"], ["--draft", "self"], ["--vanilla"]])
def test_a_file_of_prompts_is_one_json_line_each(mode, ckpt):
    """--prompts FILE --batch-size 2: one JSON line per prompt (blank lines skipped), each with its
    index and line, and the output its decode alone gives, whatever the batch."""
    args = [a.replace("DRAFT", ckpt["draft"]) for a in mode]
    r = run_cli("--model", ckpt["target"], "--prompts", ckpt["prompts"], "--batch-size", "2",
                "--max-new-tokens", "6", "--device", "cpu", *args)
    assert r.returncode == 0, r.stderr
    rows = sorted((json.loads(line) for line in r.stdout.splitlines()), key=lambda x: x["index"])
    assert [(x["index"], x["line"], x["prompt"]) for x in rows] == [
        (0, 1, "hi"), (1, 3, "hello there"), (2, 4, "sort 12")]
    tok, target = checkpoint.load_tokenizer(ckpt["target"]), checkpoint.load(ckpt["target"])
    for x in rows:
        ids, stops = tok.chat(x["prompt"]), tok.stop_ids
        want = sdar.generate(target, ids, 6, stop_ids=stops)[0]
        if "--draft" in args and args[1] != "self":
            want = speculative.generate(target, checkpoint.load(ckpt["draft"]), ids, 6, stop_ids=stops)[0]
        assert x["output"] == tok.decode(want) and x["tokens"] == len(want)
        assert x["end"] == ("length" if len(want) == 6 else "stop")


# ----------------------------------------------------------------------------- newcomer pass

SEPARATORS = ["\u2028", "\u2029", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85"]  # splitlines()'


def rows_of(out):
    """The JSON lines of --prompts, by index; split with splitlines(), so that an answer broken in
    two by a separator it holds would fail."""
    return sorted((json.loads(line) for line in out.splitlines()), key=lambda x: x["index"])


def alone(target, tok, prompt, n):
    """The reference: the prompt's answer decoded alone by the target."""
    return tok.decode(sdar.generate(target, tok.chat(prompt), n, stop_ids=tok.stop_ids)[0])


def test_a_prompt_file_ends_lines_at_newlines_only(ckpt, tmp_path, capsys):
    """--prompts: a byte-order mark is dropped, a line ends at \\n or \\r\\n alone (every other
    separator of str.splitlines stays inside its prompt), the line numbers are the file's, and each
    answer is one line whoever splits them, the output its decode alone gives."""
    lines = ["hi"] + [f"a{sep}b" for sep in SEPARATORS] + ["", " \t", "last"]
    text = "\ufeff" + "\r\n".join(lines[:3]) + "\r\n" + "\n".join(lines[3:]) + "\n"
    (tmp_path / "p.txt").write_text(text, encoding="utf-8")
    decode.main(["--model", ckpt["target"], "--prompts", str(tmp_path / "p.txt"), "--max-new-tokens",
                 "3", "--device", "cpu"])
    rows = rows_of(capsys.readouterr().out)
    want = [(1, "hi")] + [(n, f"a{sep}b") for n, sep in enumerate(SEPARATORS, 2)] + [(12, "last")]
    assert [(x["index"], x["line"], x["prompt"]) for x in rows] == [(i, *w) for i, w in enumerate(want)]
    tok, target = checkpoint.load_tokenizer(ckpt["target"]), checkpoint.load(ckpt["target"])
    assert all(x["output"] == alone(target, tok, x["prompt"], 3) for x in rows)


def test_the_toys_route_each_line_by_its_first_word_and_note_what_they_did_not_learn(toys, ckpt,
                                                                                    tmp_path, capsys):
    """Without --model each line goes to its task's models by its first word, whatever its case and
    spaces (a byte-order mark before it); each line the toys did not learn gets the note --prompt
    gets, on stderr with its line number, once."""
    lines = ["walk 3 to 5 in 10 steps within 2-6", "  Walk 3 to 5 in 10 steps within 2-6",
             "SORT 31415926", "sort 31415926", "walker", "hello"]
    (tmp_path / "p.txt").write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    decode.main(["--vanilla", "--prompts", str(tmp_path / "p.txt"), "--max-new-tokens", "3",
                 "--device", "cpu"])  # 3: the micro models hold 64 positions
    out, err = capsys.readouterr()
    assert toys == ["target", "draft"]  # the sort job, then the walk job (see `toys`)
    tok = checkpoint.load_tokenizer(ckpt["target"])
    models = {"sort": checkpoint.load(ckpt["target"]), "walk": checkpoint.load(ckpt["draft"])}
    tasks = ["walk", "walk", "sort", "sort", "sort", "sort"]
    for x, task in zip(rows_of(out), tasks):
        other = models["sort" if task == "walk" else "walk"]
        assert x["output"] == alone(models[task], tok, x["prompt"], 3), x
        assert x["output"] != alone(other, tok, x["prompt"], 3), x  # so the test can tell
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: line {n} of --prompts: {train_tiny.outside_training(lines[n - 1])}"
                     for n in (2, 3, 5, 6)]
    assert "written otherwise" in notes[0] and "neither" in notes[2]


def test_every_line_is_checked_before_any_weights_load(toys, ckpt, tmp_path, capsys, monkeypatch):
    """A line too long for its model is refused before anything loads or prints, the toys' walk
    line (the second job) as much as a --model file's third line."""
    loaded = []
    monkeypatch.setattr(decode, "load_weights", lambda *a: loaded.append(a))
    (tmp_path / "p.txt").write_text("sort 31415926\nwalk 3 to 5 in 10 steps within 2-6\nwalk "
                                    + "1 " * 40 + "\n", encoding="utf-8")
    for which in ([], ["--model", ckpt["target"]]):
        with pytest.raises(SystemExit) as exit_:
            decode.main([*which, "--prompts", str(tmp_path / "p.txt"), "--max-new-tokens", "4",
                         "--device", "cpu"])
        out, err = capsys.readouterr()
        assert exit_.value.code == 2 and not loaded and out == "", (which, out)
        assert err.startswith("decode.py: error: line 3 of --prompts: the prompt (") and \
            len(err.splitlines()) == 1, err


def test_the_summary_of_a_short_output_counts_the_steps_past_its_end(ckpt, capsys):
    """--max-new-tokens 1: the forwards commit whole steps past the one token returned; the summary
    says so with its counts, the reference decode's own."""
    tok = checkpoint.load_tokenizer(ckpt["target"])
    target, draft = checkpoint.load(ckpt["target"]), checkpoint.load(ckpt["draft"])
    tokens, st = speculative.generate(target, draft, tok.chat("hi"), 1, stop_ids=tok.stop_ids)
    decode.main(["--model", ckpt["target"], "--draft", ckpt["draft"], "--prompt", "hi",
                 "--max-new-tokens", "1", "--device", "cpu"])
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[1 token in")][0]
    f = st.forwards
    assert len(tokens) == 1 and st.steps > 1  # the case: the steps past the output's end
    assert line.startswith(
        f"[1 token in {f} target forwards ({1 / f:.2f} tokens per target forward), {st.steps} steps "
        f"committed (at least {st.steps - 1} past the output's end), {st.matched} as proposed "
        f"({st.matched / f:.2f} proposed steps matched per target forward), "
        f"{st.draft_forwards / f:.2f} draft forwards per target forward, lossless, "), line


def popen(args, **kw):
    return subprocess.Popen([sys.executable, "decode.py", *args], cwd=ROOT, text=True,
                            stderr=subprocess.PIPE, **kw)


def test_output_that_cannot_be_written_is_one_sentence_and_exit_1(ckpt):
    """stdout closed (`>&-`), on a full disk (/dev/full) or open for reading only: one sentence on
    stderr and exit status 1, never a traceback, never exit 0 with the answers lost. stderr closed:
    its lines are dropped, not mixed into the answers."""
    one = ["--model", ckpt["target"], "--prompt", "hi", "--max-new-tokens", "4", "--device", "cpu"]
    many = ["--model", ckpt["target"], "--prompts", ckpt["prompts"], "--max-new-tokens", "4",
            "--device", "cpu"]
    closed = "stdout is closed, so no answer could be written; run the command with its output"
    full = "stdout cannot be written (No space left on device), so the output stops here"
    reading = "stdout cannot be written (Bad file descriptor), so the output stops here"
    cases = [(one, "closed", closed), (many, "closed", closed), (one, "/dev/full", full),
             (many, "/dev/full", full), (many, os.devnull, reading)]

    def run(case):
        args, where, sentence = case
        if where == "closed":  # a shell's `>&-`
            return subprocess.run(["sh", "-c", 'exec "$0" "$@" >&-', sys.executable, "decode.py",
                                   *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        with open(where, "w" if where == "/dev/full" else "r") as stdout:
            return subprocess.run([sys.executable, "decode.py", *args], cwd=ROOT, stdout=stdout,
                                  stderr=subprocess.PIPE, text=True, timeout=120)
    if not os.path.exists("/dev/full"):
        cases = [case for case in cases if case[1] != "/dev/full"]
    quiet = subprocess.run(["sh", "-c", 'exec "$0" "$@" 2>&-', sys.executable, "decode.py", *many],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and len(rows_of(quiet.stdout)) == 3  # stderr closed: no line lost
    with ThreadPoolExecutor(3) as pool:
        for (args, where, sentence), done in zip(cases, pool.map(run, cases)):
            err = done.stderr
            assert done.returncode == 1 and "Traceback" not in err, (where, args, err)
            assert err.startswith(f"decode.py: error: {sentence}") and len(err.splitlines()) == 1


def test_ctrl_c_is_one_line_and_exit_130_from_the_first_second(ckpt, interrupt_early):
    """SIGINT while torch's libraries load, and while a long decode streams: `interrupted` alone on
    stderr, exit status 130, no traceback."""
    args = ["--model", ckpt["roomy"], "--prompt", "hi", "--max-new-tokens", "8000", "--device", "cpu"]
    decoding = popen(args, stdout=subprocess.PIPE,
                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert decoding.stdout.readline() == "\n" and decoding.stdout.readline().startswith(">>> hi")
    decoding.send_signal(signal.SIGINT)
    err = decoding.communicate(timeout=120)[1]
    for status, err in (interrupt_early("decode.py", args), (decoding.returncode, err)):
        assert status == 130 and err == "\ninterrupted\n", err
