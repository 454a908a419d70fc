"""decode.py: the cached decoder equals the no-cache oracle; schedule, stops, forwards, the CLI."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import decode
import model
from conftest import run_scripts

ROOT = Path(__file__).resolve().parents[1]
VOCAB, MASK = 61, 60


def random_model(seed=0, layers=2):
    torch.manual_seed(seed)
    c = model.Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, mask_token_id=MASK)
    m = model.Transformer(c).eval()
    with torch.no_grad():  # sharper logits, so that confidences differ and dynamic decoding has work to do
        m.lm_head.weight.mul_(8)
    return m


def prompt(n, seed=0):
    return torch.randint(0, MASK, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("block", [4, 8])
@pytest.mark.parametrize("strategy", ["static", "dynamic"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cache_equals_oracle(block, strategy, temperature):
    """Cached generate == the no-cache oracle token for token, every prompt alignment, steps <= block."""
    m = random_model()
    for P in (1, block - 1, block, 2 * block + 1):
        for steps in (block, block // 2):
            kw = dict(block=block, steps=steps, strategy=strategy, threshold=0.3, temperature=temperature,
                      top_k=20 if temperature else 0, top_p=0.9 if temperature else 1.0)
            a, _ = decode.generate(m, prompt(P, P), 3 * block + 1, generator=torch.Generator().manual_seed(P), **kw)
            b, _ = decode.generate(m, prompt(P, P), 3 * block + 1, generator=torch.Generator().manual_seed(P),
                                    cached=False, **kw)
            assert a == b, (P, steps)
            assert len(a) == 3 * block + 1


# SDAR's decoder on a block whose first B - m positions are known: (m, block, steps) -> reveals per step.
# Its quota spreads the whole block, remainder first; each step reveals min(quota, masks left).
SDAR_SCHEDULES = {
    (4, 4, 4): [1, 1, 1, 1], (2, 4, 4): [1, 1], (4, 4, 2): [2, 2], (2, 4, 2): [2], (3, 4, 2): [2, 1],
    (1, 4, 2): [1], (4, 4, 3): [2, 1, 1], (3, 4, 3): [2, 1], (2, 4, 3): [2], (4, 4, 1): [4], (1, 4, 1): [1],
    (8, 8, 3): [3, 3, 2], (7, 8, 3): [3, 3, 1], (5, 8, 3): [3, 2], (3, 8, 3): [3], (5, 8, 4): [2, 2, 1],
    (8, 8, 8): [1] * 8, (6, 8, 8): [1] * 6, (7, 8, 5): [2, 2, 2, 1], (2, 8, 5): [2],
}


@pytest.mark.parametrize("m,block,steps", sorted(SDAR_SCHEDULES))
def test_schedule_is_sdars(m, block, steps):
    assert decode.schedule(m, block, steps) == SDAR_SCHEDULES[m, block, steps]


def test_step_map_follows_the_schedule():
    """Static decoding reveals schedule[s-1] positions at step s, each position exactly once; known stay 0;
    known positions anywhere in the block are left alone."""
    m = random_model()
    for pattern in range(15):  # every pattern of known positions but the full block
        known = torch.tensor([bool(pattern >> i & 1) for i in range(4)])
        for steps in (1, 2, 3, 4):
            block = torch.where(known, torch.tensor(prompt(4, pattern)), MASK)
            with torch.no_grad():
                tokens, step, probs, forwards = decode.denoise(m, block, 0, steps, mask_id=MASK)
            assert (tokens != MASK).all() and step[known].eq(0).all() and torch.equal(tokens[known], block[known])
            counts = [int((step == s).sum()) for s in range(1, forwards + 1)]
            assert counts == decode.schedule(int((~known).sum()), 4, steps)
            assert probs[known].eq(0).all() and torch.allclose(probs[~known].sum(-1), torch.ones(int((~known).sum())))


def test_static_reveals_the_most_confident():
    """At each step the revealed positions are the top-k confidences of that forward (checked by hand)."""
    m = random_model(3)
    block = torch.tensor([MASK] * 4)
    with torch.no_grad():
        tokens, step, _, _ = decode.denoise(m, block, 0, 4, mask_id=MASK)
        logits = m(block[None], torch.arange(4), torch.ones(4, 4, dtype=torch.bool))[0].softmax(-1)
    first = int(step.tolist().index(1))
    assert first == int(logits.max(-1).values.argmax()) and tokens[first] == logits[first].argmax()


def test_forwards_count_folded_store():
    """A full block costs `steps` forwards (the store is folded in), plus one prefill."""
    m = random_model()
    for block, steps in ((4, 4), (4, 2), (8, 8), (8, 3)):
        _, stats = decode.generate(m, prompt(2 * block), 5 * block, block=block, steps=steps)
        assert stats["forwards"] == 1 + 5 * steps
        _, stats = decode.generate(m, prompt(block + 1), 5 * block - 1, block=block, steps=steps)
        first = len(decode.schedule(block - 1, block, steps))  # one known token: SDAR may finish early
        assert stats["forwards"] == 1 + first + 4 * steps


def test_stop_tokens_and_max_new_tokens():
    """Output is trimmed before the first stop token; without one, exactly max_new_tokens come back."""
    m = random_model()
    p = prompt(5)
    free, _ = decode.generate(m, p, 23)
    assert len(free) == 23
    stop = free[9]
    cut, _ = decode.generate(m, p, 23, stop_ids=(stop, 999))
    assert cut == free[: free.index(stop)]
    for n in (1, 4, 7):
        assert decode.generate(m, p, n)[0] == free[:n]


def test_seeded_sampling_is_reproducible():
    """Same seed -> same tokens; argmax decoding is deterministic; another seed differs."""
    m = random_model()
    runs = [decode.generate(m, prompt(6), 16, temperature=1.0, generator=torch.Generator().manual_seed(s))[0]
            for s in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]
    assert decode.generate(m, prompt(6), 16)[0] == decode.generate(m, prompt(6), 16)[0]


def test_distribution_filters():
    """top-k keeps the k largest, top-p the smallest prefix reaching p, temperature sharpens."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert decode.distribution(logits, 1.0, top_k=2).tolist() == pytest.approx([0.625, 0.375, 0, 0])
    assert decode.distribution(logits, 1.0, top_p=0.8).tolist() == pytest.approx([0.625, 0.375, 0, 0])
    assert decode.distribution(logits, 1.0, top_p=0.81).tolist() == pytest.approx([0.5 / .95, 0.3 / .95, .15 / .95, 0])
    assert decode.distribution(logits, 0.5)[0] > 0.5


def test_missing_mask_id_is_an_error():
    """Without mask_id and without config.mask_token_id, or with an AR model, diffusion decoding refuses."""
    m = random_model()
    m.config.mask_token_id = None
    with pytest.raises(ValueError, match="without a mask token cannot decode diffusion-style"):
        decode.generate(m, [1, 2], 4)
    m.config.mask_token_id, m.config.model_type = MASK, "qwen3"
    with pytest.raises(ValueError, match="qwen3 model"):
        decode.generate(m, [1, 2], 4)


def rigged(m):
    """The model with the mask id's logit raised far above every other: it would always pick it."""
    m.lm_head.register_forward_hook(lambda module, inputs, out: out.index_add(
        -1, torch.tensor([MASK]), torch.full((*out.shape[:-1], 1), 1e4)))
    return m


def test_the_mask_token_is_never_output():
    """A diffusion decoder gives its mask id zero probability: vanilla decoding, drafting and SimSD's
    verification alike, greedy and sampled, even from a model rigged to prefer it."""
    import speculative
    target, draft = rigged(random_model(0)), rigged(random_model(1, 1))
    with torch.no_grad():
        assert target(torch.tensor([[1, 2]]), torch.arange(2))[0].argmax(-1).eq(MASK).all()  # the rig works
    for temperature in (0.0, 1.0):
        kw = dict(temperature=temperature, generator=torch.Generator().manual_seed(0))
        outs = [decode.generate(target, prompt(6), 12, **kw)[0], decode.generate(target, prompt(6), 12, cached=False, **kw)[0],
                speculative.generate(target, draft, prompt(6), 12, **kw)[0],
                speculative.generate(target, draft, prompt(6), 12, verify="exact", **kw)[0]]
        assert all(len(o) == 12 and MASK not in o for o in outs), outs
    probs = decode.distribution(torch.randn(3, VOCAB), 1.0, 5, 0.9, suppress=MASK)
    assert probs[:, MASK].eq(0).all() and torch.allclose(probs.sum(-1), torch.ones(3))


def ar_model(seed=0):
    torch.manual_seed(seed)
    c = model.Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, model_type="qwen3")
    return model.Transformer(c).eval()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_ar_cache_equals_recomputing_everything(temperature):
    """Cached AR decoding == recomputing the whole sequence causally for every token (the oracle)."""
    m = ar_model()
    for P in (1, 2, 5):
        kw = dict(temperature=temperature, top_k=30 if temperature else 0, top_p=0.95 if temperature else 1.0)
        a, sa = decode.generate_ar(m, prompt(P, P), 17, generator=torch.Generator().manual_seed(P), **kw)
        b, _ = decode.generate_ar(m, prompt(P, P), 17, generator=torch.Generator().manual_seed(P), cached=False, **kw)
        assert a == b and len(a) == 17
        assert sa["forwards"] - sa["prefill_forwards"] == 17 and sa["prefill_forwards"] == (P > 1)


@torch.no_grad()
def test_ar_greedy_is_the_argmax_of_the_shifted_logits():
    """Each greedy token is the argmax of a plain causal forward's logits at the position before it."""
    m = ar_model(3)
    out, _ = decode.generate_ar(m, prompt(4), 10)
    seq = torch.tensor(prompt(4) + out)
    causal = torch.ones(len(seq), len(seq), dtype=torch.bool).tril()
    logits = m(seq[None], torch.arange(len(seq)), causal)[0]
    assert out == logits[3:-1].argmax(-1).tolist()


def test_ar_stops_and_stream():
    """Stops trim; the callback sees exactly the returned tokens."""
    m, seen = ar_model(), []
    free, _ = decode.generate_ar(m, prompt(3), 12, callback=seen.extend)
    assert seen == free
    stop, seen = free[6], []
    cut, _ = decode.generate_ar(m, prompt(3), 12, stop_ids=(stop,), callback=seen.extend)
    assert cut == free[:free.index(stop)] == seen


@pytest.mark.parametrize("kw,message", [
    (dict(temperature=-1.0), "--temperature must be >= 0"), (dict(top_p=0.0), r"--top-p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"--top-p must be in \(0, 1\]"), (dict(top_k=-3), "--top-k must be an integer >= 0"),
    (dict(threshold=2.0), r"--threshold must be in \[0, 1\]"), (dict(block=0), "--block must be an integer >= 1"),
    (dict(block=-4), "--block must be an integer >= 1"), (dict(steps=0), "--steps must be an integer from 1"),
    (dict(steps=5), r"--steps must be an integer from 1 to the block length \(4\)"),
    (dict(temperature=float("nan")), "--temperature must be >= 0"), (dict(strategy="maybe"), "--strategy must be"),
])
def test_library_options_are_checked(kw, message):
    """Bad options raise ValueError naming the flag and its range, from every entry point."""
    import speculative
    m = random_model()
    spec_kw = {("draft_steps" if k == "steps" else k): v for k, v in kw.items()}
    calls = [lambda: decode.generate(m, [1, 2], 4, **kw), lambda: decode.generate(m, [1, 2], 4, cached=False, **kw),
             lambda: speculative.generate(m, m, [1, 2], 4, **spec_kw)]
    if "block" not in kw:
        calls.append(lambda: decode.denoise(m, torch.full((4,), MASK), 0, kw.get("steps", 4), mask_id=MASK,
                                            **{k: v for k, v in kw.items() if k != "steps"}))
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call()


def test_other_limits_are_checked():
    import speculative
    m = random_model()
    for kw, message in ((dict(max_new_tokens=0), "--max-new-tokens must be an integer >= 1"),
                        (dict(max_new_tokens=-1), "--max-new-tokens must be an integer >= 1"),
                        (dict(eos_min_prob=5.0), r"--eos-min-prob must be in \[0, 1\]")):
        with pytest.raises(ValueError, match=message):
            speculative.generate(m, m, [1, 2], **{"max_new_tokens": 4, **kw})
    for call in (lambda: decode.generate(m, [], 4), lambda: decode.generate_ar(ar_model(), [], 4)):
        with pytest.raises(ValueError, match="the prompt is empty"):
            call()
    with pytest.raises(ValueError, match="--max-new-tokens must be"):
        decode.generate_ar(ar_model(), [1], 0)


# ----------------------------------------------------------------------------- the command

def micro_checkpoint(path, seed=0, block_size=4, model_type="sdar", layers=1):
    """A micro SDAR (or Qwen3: no mask in its tokenizer) folder on the byte-level toy ids."""
    torch.manual_seed(seed)
    c = model.Config(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     mask_token_id=259 if model_type == "sdar" else None,
                     block_size=block_size if model_type == "sdar" else None, model_type=model_type)
    model.save(model.Transformer(c), path)
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + (("<|MASK|>",) if model_type == "sdar" else ())
    model.write_byte_tokenizer(path, specials=specials)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Named micro checkpoints: target and draft (block 4), a block-8 draft, an AR target, broken folders."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {"target": micro_checkpoint(root / "target"), "draft": micro_checkpoint(root / "draft", 1),
           "b8": micro_checkpoint(root / "b8", 2, block_size=8), "ar": micro_checkpoint(root / "ar", 3, None, "qwen3")}
    out["weightless"] = str(root / "weightless")
    (root / "weightless").mkdir()
    (root / "weightless" / "config.json").write_text((root / "target" / "config.json").read_text())
    out["notjson"] = micro_checkpoint(root / "notjson")
    (root / "notjson" / "config.json").write_text("{ this is not json")
    out["nomask"] = micro_checkpoint(root / "nomask")
    model.write_byte_tokenizer(root / "nomask", specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    out["othervocab"] = micro_checkpoint(root / "othervocab", 4)
    model.write_byte_tokenizer(root / "othervocab", specials=("<|im_start|>", "<|endoftext|>", "<|im_end|>",
                                                              "<|MASK|>"))
    return out


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "decode.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def bad_inputs(c):
    """(arguments, the sentence expected on stderr); each must exit 2 with no traceback."""
    m = ["--model", c["target"], "--device", "cpu", "--prompt", "hi"]
    cases = [(m + ["--temperature", "-1"], "--temperature must be >= 0 (0 = argmax); got -1.0"),
             (m + ["--top-p", "0"], "--top-p must be in (0, 1] (1 = off); got 0.0"),
             (m + ["--top-p", "0", "--temperature", "0.8"], "--top-p must be in (0, 1]"),
             (m + ["--top-p", "1.5"], "--top-p must be in (0, 1]"), (m + ["--top-k", "-3"], "--top-k must be an integer >= 0"),
             (m + ["--block", "0"], "--block must be an integer >= 1; got 0"),
             (m + ["--block", "-4"], "--block must be an integer >= 1; got -4"),
             (m + ["--steps", "0"], "--steps must be an integer from 1 to the block length (4); got 0"),
             (m + ["--steps", "-2"], "--steps must be an integer from 1"),
             (m + ["--steps", "5"], "--steps must be an integer from 1 to the block length (4); got 5"),
             (m + ["--strategy", "dynamic", "--threshold", "2"], "--threshold must be in [0, 1]; got 2.0"),
             (m + ["--threshold", "0.5"], "--threshold applies to --strategy dynamic only"),
             (m + ["--draft", c["draft"], "--eos-min-prob", "5"], "--eos-min-prob must be in [0, 1]"),
             (m + ["--max-new-tokens", "-1"], "--max-new-tokens must be an integer >= 1; got -1"),
             (m + ["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1; got 0"),
             (m + ["--prompt", "  "], "the prompt is empty"),
             (m + ["--strategy", "sometimes"], "invalid choice: 'sometimes'"),
             (m + ["--block", "8"], "trained with block 4; block 8 needs the -b8 checkpoints"),
             (m + ["--max-new-tokens", "60"], "max_position_embeddings 64"),
             (m + ["--draft", c["draft"], "--vanilla"], "--vanilla decodes without a draft"),
             (m + ["--verify", "exact"], "--verify does not apply to decoding without --draft"),
             (m + ["--show"], "--show does not apply to decoding without --draft"),
             (m + ["--draft", c["b8"]], "the draft was trained with block 8 and the target with block 4"),
             (m + ["--draft", c["ar"]], "this project drafts with diffusion models"),
             (m + ["--draft", c["othervocab"]], "does not give every token of the target the same id"),
             (["--model", c["ar"], "--draft", c["draft"], "--accept", "step"], "--accept does not apply to an "
              "autoregressive target"),
             (["--model", c["ar"], "--draft", c["draft"], "--verify", "simsd"], "--verify does not apply"),
             (["--model", c["ar"], "--block", "4"], "--block does not apply to an autoregressive --model"),
             (["--model", c["nomask"]], "defines no mask token (<|MASK|>); a diffusion model cannot decode"),
             (["--model", "/no/such/folder"], "is not a folder; download weights with the Hugging Face CLI"),
             (["--model", c["weightless"]], "the weights are missing."),
             (["--model", c["notjson"]], "config.json is not valid JSON"),
             (["--model", c["target"], "--draft-device", "cuda"], "--draft-device cuda was asked for"),
             (["--device", "cuda"], "--device cuda was asked for but this machine has no CUDA GPU")]
    return [case for case in cases if "cuda" not in case[0] or not torch.cuda.is_available()]


def test_cli_bad_input_is_one_sentence_and_exit_2(ckpt):
    """Every bad input: exit 2, the sentence on stderr, no traceback, no doubled punctuation, and the
    download hint only where the folder is missing. The processes run side by side to save time."""
    cases = bad_inputs(ckpt)
    for (args, sentence), proc in zip(cases, run_scripts("decode.py", [args for args, _ in cases], ROOT)):
        err = proc.stderr
        assert proc.returncode == 2 and sentence in err and "Traceback" not in err, (args, err)
        line = err.strip().splitlines()[-1]  # ours, after argparse's usage lines if any
        assert line.startswith("decode.py: error: ") and not any(p in line for p in ("..", ".;", ";.", "  ")), err
        assert ("huggingface-cli" in err) == (args[1] == "/no/such/folder"), err


def test_cli_vanilla_speculative_and_show(ckpt):
    """A checkpoint decodes alone (SDAR and AR), speculatively (SimSD and SpecDiff) and with --show."""
    for args, words in (([ckpt["target"]], ["tokens per forward", "vanilla"]),
                        ([ckpt["target"], "--vanilla"], ["tokens per forward", "vanilla"]),
                        ([ckpt["ar"], "--no-think"], ["1.00 tokens per forward", "ar,"]),
                        ([ckpt["target"], "--draft", ckpt["draft"], "--show", "--accept", "position"],
                         ["tokens per target forward", "accepted,", "[accepted@s]", "simsd"]),
                        ([ckpt["ar"], "--draft", ckpt["draft"], "--show"], ["<bonus (AR target)>", "specdiff"])):
        r = run_cli("--model", *args, "--prompt", "hi", "--max-new-tokens", "8", "--device", "cpu")
        assert r.returncode == 0, r.stderr
        assert all(w in r.stdout for w in words) and "rough figure" in r.stdout, (args, r.stdout)


def test_cli_streams_exactly_the_returned_tokens(ckpt):
    """The streamed text is the decoded output, cut at --max-new-tokens, in every mode."""
    tok = model.load_tokenizer(ckpt["target"])
    target, draft, ar = (model.load(ckpt[k]) for k in ("target", "draft", "ar"))
    import speculative
    ids = tok.chat("hi")
    for args, tokens in (([ckpt["target"]], decode.generate(target, ids, 5, stop_ids=tok.stop_ids)[0]),
                         ([ckpt["ar"]], decode.generate_ar(ar, ids, 5, stop_ids=tok.stop_ids)[0]),
                         ([ckpt["target"], "--draft", ckpt["draft"]],
                          speculative.generate(target, draft, ids, 5, stop_ids=tok.stop_ids)[0])):
        r = run_cli("--model", *args, "--prompt", "hi", "--max-new-tokens", "5", "--device", "cpu")
        body = r.stdout.split(">>> hi\n\n", 1)[1].rsplit("\n[", 1)[0]
        assert body == tok.decode(tokens) and f"[{len(tokens)} tokens" in r.stdout, (args, r.stdout)


def test_cli_help_shows_defaults_and_a_closed_pipe_is_quiet(ckpt):
    r = run_cli("--help")
    for flag, default in (("--max-new-tokens", "default 256"), ("--top-k", "default 0"), ("--top-p", "default 1"),
                          ("--seed", "default 0"), ("--threshold", "default 0.9"), ("--accept", "default step")):
        assert default in " ".join(r.stdout.split()), flag
    proc = subprocess.Popen([sys.executable, "decode.py", "--model", ckpt["target"], "--prompt", "hi",
                             "--max-new-tokens", "40", "--device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.read(4)
    proc.stdout.close()  # what `| head -c 4` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) != 0 and "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.fixture
def toys(ckpt, monkeypatch):
    """The toy default, pointed at micro checkpoints (the real toys take minutes to train): the sort
    pair is target + draft, the walk pair target + the block-8 draft's twin, so the output says which ran."""
    import train_tiny
    pairs = {"sort": (ckpt["target"], ckpt["draft"]), "walk": (ckpt["draft"], ckpt["target"])}
    monkeypatch.setattr(train_tiny, "pair", pairs.get)
    monkeypatch.setattr(train_tiny, "ensure_trained", lambda quiet=False: None)
    return train_tiny


def test_toy_default_honours_prompt_and_vanilla(toys, capsys, monkeypatch):
    """--prompt replaces the toy prompts and picks its task's pair; --vanilla drops the draft; without
    them each task's held-out prompts run on that task's pair."""
    loaded = []
    monkeypatch.setattr(decode, "load_checkpoint", lambda path, *a, real=decode.load_checkpoint: (
        loaded.append(Path(path).name), real(path, *a))[1])
    decode.main(["--prompt", "walk 3 to 5 in 4 steps within 2-6", "--max-new-tokens", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.count(">>> ") == 1 and ">>> walk 3 to 5" in out and "simsd" in out and loaded == ["draft", "target"]
    loaded.clear()
    decode.main(["--vanilla", "--max-new-tokens", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    prompts = [p for task in toys.TASKS for p, _ in toys.examples(3, "heldout", task=task)]
    assert [line[4:] for line in out.splitlines() if line.startswith(">>> ")] == prompts
    assert "vanilla" in out and "simsd" not in out and "truncated at --max-new-tokens 4" in out
    assert loaded == ["target", "draft"]  # each task's target, no drafts


def test_toy_default_retrains_after_an_interrupted_first_run(ckpt, tmp_path, monkeypatch, capsys):
    """A toy folder holding tokenizer files only (training was interrupted) is trained again, not loaded."""
    import shutil
    import train_tiny
    names = {"TARGET_DIR": "target", "DRAFT_DIR": "draft", "WALK_TARGET_DIR": "walk-target",
             "WALK_DRAFT_DIR": "walk-draft", "AR_DIR": "ar"}
    for attr, name in names.items():
        monkeypatch.setattr(train_tiny, attr, tmp_path / f"tiny-{name}")
    model.write_byte_tokenizer(tmp_path / "tiny-target")
    trained = []

    def fake_training(argv):  # stands in for train_tiny.main: writes micro checkpoints
        trained.append(argv)
        for name in names.values():
            shutil.copytree(ckpt["ar" if name == "ar" else "target"], tmp_path / f"tiny-{name}", dirs_exist_ok=True)
    monkeypatch.setattr(train_tiny, "main", fake_training)
    decode.main(["--prompt", "sort 321", "--max-new-tokens", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    assert len(trained) == 1 and "training the toy models" in out and ">>> sort 321" in out
