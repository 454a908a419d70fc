"""train_tiny.py: the tasks and their scorers, the noising, the SDAR and AR losses against
brute-force references, losses that drop, checkpoints that load back, ensure_trained and its
lock. Micro models only; nothing in out/."""
import json
import threading
import time

import pytest
import torch
import torch.nn.functional as F

import mask
import model as sdar
import train_tiny as tt


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Micro models run as fast on one thread, and a second one that waits on the first slows
    everything down manyfold when another process shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return sdar.load_tokenizer(sdar.write_byte_tokenizer(tmp_path_factory.mktemp("tok")))


def micro(tok, layers=2, seed=0):
    c = sdar.Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4, mask_token_id=tok.mask_id)
    return tt.init_model(c, seed)


# ----------------------------------------------------------------------------- task

def test_examples_are_deterministic_disjoint_and_long_enough():
    assert tt.examples(50, "train", 0) == tt.examples(50, "train", 0)
    assert tt.examples(50, "heldout", 3) == tt.examples(50, "heldout", 3)
    assert tt.examples(50, "train", 0) != tt.examples(50, "train", 1)
    train, heldout = tt.examples(3000, "train"), tt.examples(300, "heldout")
    assert not {p for p, _ in train} & {p for p, _ in heldout}  # no held-out prompt is trained on
    assert all(tt._is_heldout(p) for p, _ in heldout) and not any(tt._is_heldout(p) for p, _ in train)
    for prompt, answer in train[:200] + heldout:
        digits = prompt.removeprefix("sort ")
        assert prompt.startswith("sort ") and digits.isdigit() and 8 <= len(digits) <= 12
        assert answer == str(sorted(int(d) for d in digits))
        assert tt.score(prompt, answer, answer)
    lengths = [len(a.encode()) for _, a in train]  # byte tokenizer: bytes are tokens
    assert min(lengths) >= 24 and sum(lengths) / len(lengths) >= 29
    with pytest.raises(ValueError, match="split"):
        tt.examples(1, "test")
    with pytest.raises(ValueError, match="task"):
        tt.examples(1, task="reverse")


def test_score_accepts_exact_sorted_answers_only():
    prompt, answer = "sort 2921", "[1, 2, 2, 9]"
    for ok in ["[1, 2, 2, 9]", " [1, 2, 2, 9]\n", "\t[1, 2, 2, 9]  \n\n"]:
        assert tt.score(prompt, ok, answer) and tt.score(prompt, answer, ok)
    for bad in ["[1, 2, 9]", "[1, 2, 2, 8]", "[1, 2, 2, 9, 9]", "[1,2,2,9]", "[1, 2,  2, 9]", "1, 2, 2, 9",
                "[1, 2, 2, 9]]", "[1, 2, 2, 9] done", "[1, 2, 2, 9]<|im_end|>", "[9, 2, 2, 1]", ""]:
        assert not tt.score(prompt, bad, answer), bad


def test_walk_examples_are_deterministic_disjoint_valid_and_several_blocks_long():
    assert tt.examples(50, "train", 0, "walk") == tt.examples(50, "train", 0, "walk")
    assert tt.examples(50, "heldout", 2, "walk") == tt.examples(50, "heldout", 2, "walk")
    assert tt.examples(50, "train", 0, "walk") != tt.examples(50, "train", 1, "walk")
    train, heldout = tt.examples(4000, "train", 0, "walk"), tt.examples(300, "heldout", 0, "walk")
    assert not {p for p, _ in train} & {p for p, _ in heldout}
    assert len({p for p, _ in heldout}) == 300  # held-out prompts are distinct
    assert all(tt.score(p, a, None) for p, a in train + heldout)  # every reference answer is valid
    lengths = [len(a.encode()) for _, a in train]
    assert min(lengths) >= 21 and sum(lengths) / len(lengths) >= 24  # >= 6 blocks of 4 on average
    # the spread of valid answers is learned: one prompt gets several different answers in training
    by_prompt = {}
    for p, a in train:
        by_prompt.setdefault(p, set()).add(a)
    assert max(len(answers) for answers in by_prompt.values()) >= 4


WALK = "walk 3 to 5 in 6 steps within 2-6"


@pytest.mark.parametrize("answer", ["3+4+5+6-5-4+5", "3-2+3+4+5+6-5", "3+4-3+4-3+4+5", " 3+4+5-4+5-4+5\n"])
def test_walk_score_accepts_any_valid_walk(answer):
    reference = "3+4+5+6-5-4+5"
    assert tt.score(WALK, answer, reference)  # exact match would reject all but the first
    assert tt.score(WALK, answer, None)  # validity never reads the reference


@pytest.mark.parametrize("answer", [
    "3+4+5+6-5-4+5-4+5",  # 8 steps, not 6
    "3+4+5+6-5+4+5",  # a sign that disagrees with its step
    "3+4+5+6+7-6-5",  # leaves 2-6
    "3-2-1+2+3+4+5",  # leaves 2-6 below
    "3+4+5+6-5-4-3",  # ends on 3
    "4+5+6-5-4-3+4",  # starts on 4
    "3+5+6-5-4+5-4",  # a step of 2
    "3+4+5+6-5-4+5+",  # a trailing sign
    "3 +4 +5 +6 -5 -4 +5",  # spaces inside
    "3,4,5,6,5,4,5", "[3, 4, 5, 6, 5, 4, 5]", "3+4+5+6-5-4+5<|im_end|>", "3+4+5+6-5-4+5 done", ""])
def test_walk_score_rejects_invalid_walks(answer):
    assert not tt.score(WALK, answer, "3+4+5+6-5-4+5"), answer


# ----------------------------------------------------------------------------- batches and noise

def test_batch_layout(tok):
    pairs = [("sort 98765432", "[2, 3, 4, 5, 6, 7, 8, 9]"), ("sort 111122223333", str(sorted([1, 2, 3] * 4)))]
    x0, is_resp = tt.batch(pairs, tok)
    stop, pad = tok.id_of("<|im_end|>"), tok.id_of("<|endoftext|>")
    for row, resp, (prompt, answer) in zip(x0.tolist(), is_resp.tolist(), pairs):
        p = tok.chat(prompt)
        r = tok.encode(answer) + [stop]
        assert row == p + r + [pad] * (len(row) - len(p) - len(r))
        assert resp == [False] * len(p) + [True] * (len(row) - len(p))  # pads count as response


def test_noise_never_masks_the_prompt_and_always_masks_a_response_token(tok):
    x0, is_resp = tt.batch(tt.examples(6, "train"), tok)
    g = torch.Generator().manual_seed(0)
    fractions, single = [], 0
    for _ in range(1000):
        xt, masked, p = tt.noise(x0, is_resp, tok.mask_id, g)
        assert not (masked & ~is_resp).any()
        assert masked.any(1).all()
        assert torch.equal(xt, torch.where(masked, tok.mask_id, x0))
        assert ((p >= 1e-3) & (p <= 1)).all()
        fractions.append((masked.sum(1) / is_resp.sum(1)).mean().item())
        single += int((masked.sum(1) == 1).sum())
    assert single > 0  # the at-least-one fallback was exercised
    assert abs(sum(fractions) / len(fractions) - 0.5) < 0.03  # E[masked fraction] = E[p] ~ 0.5


# ----------------------------------------------------------------------------- loss

def reference_mask(n, block):
    """[x_t ; x_0] built one pair at a time from SDAR's rule: x_t block b sees x_t block b and
    x_0 blocks < b; x_0 is block-causal and never sees x_t."""
    m = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for q in range(2 * n):
        for k in range(2 * n):
            qb, kb = (q % n) // block, (k % n) // block
            if q < n:
                m[q, k] = qb == kb if k < n else kb < qb
            else:
                m[q, k] = k >= n and kb <= qb
    return m


@pytest.mark.parametrize("block", [4, 8])
def test_loss_matches_a_per_token_reference(tok, block):
    model = micro(tok).eval()
    x0, is_resp = tt.batch(tt.examples(3, "train", 5), tok)  # rows of different lengths: pads
    with torch.no_grad():
        loss = tt.sdar_loss(model, x0, is_resp, block, tok.mask_id, torch.Generator().manual_seed(1))
        xt, masked, p = tt.noise(x0, is_resp, tok.mask_id, torch.Generator().manual_seed(1))
        n, total = x0.shape[1], 0.0
        for b in range(x0.shape[0]):  # one row at a time, the whole [x_t ; x_0], no shortcuts
            logits = model(torch.cat([xt[b], x0[b]])[None], torch.arange(n).repeat(2), reference_mask(n, block))[0]
            for i in range(n):
                if masked[b, i]:
                    total += -F.log_softmax(logits[i], -1)[x0[b, i]].item() / p[b, 0].item()
    assert torch.isclose(loss, torch.tensor(total / is_resp.sum().item()), rtol=1e-4)


def micro_ar(tok, seed=0):
    c = sdar.Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4, model_type="qwen3")
    return tt.init_model(c, seed)


def test_ar_loss_matches_a_per_token_reference(tok):
    """One forward per predicted token on the prefix before it, with a causal mask built by a
    loop (every layer's earlier rows must not see later ones either), over the answer and its
    stop token only: the pads after it are not trained."""
    model = micro_ar(tok).eval()
    pairs = tt.examples(2, "train", 5) + tt.examples(2, "train", 5, "walk")  # rows of different lengths
    x0, is_resp = tt.batch(pairs, tok)
    stop = tok.id_of("<|im_end|>")
    with torch.no_grad():
        loss = tt.ar_loss(model, x0, is_resp, tok.id_of("<|endoftext|>"))
        terms = []
        for (prompt, answer), row in zip(pairs, x0):
            start = len(tok.chat(prompt))
            for i in range(start, start + len(tok.encode(answer)) + 1):  # the answer, then the stop
                causal = torch.tensor([[k <= q for k in range(i)] for q in range(i)])
                logits = model(row[None, :i], torch.arange(i), causal)[0, -1]
                terms.append(-F.log_softmax(logits, -1)[row[i]].item())
            assert row[i] == stop
    assert torch.isclose(loss, torch.tensor(sum(terms) / len(terms)), rtol=1e-4)


def test_training_loss_drops(tok):
    model = micro(tok)
    x0, is_resp = tt.batch(tt.examples(16, "heldout"), tok)

    def held_out_loss():
        with torch.no_grad():
            return tt.sdar_loss(model.eval(), x0, is_resp, 4, tok.mask_id, torch.Generator().manual_seed(0)).item()

    before = held_out_loss()
    tt.train(model, tok, steps=40, batch_size=16, lr=1e-2, tasks=("sort",), log_every=None)
    after = held_out_loss()
    assert after < 0.4 * before, (before, after)


def test_ar_training_loss_drops_on_the_mixture(tok):
    model, pad = micro_ar(tok), tok.id_of("<|endoftext|>")
    x0, is_resp = tt.batch(tt.examples(8, "heldout") + tt.examples(8, "heldout", task="walk"), tok)

    def held_out_loss():
        with torch.no_grad():
            return tt.ar_loss(model.eval(), x0, is_resp, pad).item()

    before = held_out_loss()
    tt.train(model, tok, steps=40, batch_size=16, lr=1e-2, log_every=None)
    assert held_out_loss() < 0.4 * before




# ----------------------------------------------------------------------------- checkpoints

def test_presets():
    tok_ids = type("Tok", (), {"vocab_size": 260, "mask_id": 259})()
    target, draft, ar = (tt.init_model(tt.config(name, tok_ids)) for name in ("target", "draft", "ar"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(target) >= 4 * count(draft)
    assert draft.config.num_hidden_layers == 1 < target.config.num_hidden_layers
    assert target.config.block_size is None and draft.config.mask_token_id == 259
    assert ar.config.model_type == "qwen3" and ar.config.mask_token_id is None and ar.config.block_size is None
    assert count(ar) == count(target) and ar.config.vocab_size == target.config.vocab_size == 260
    for task in tt.TASKS:  # one SDAR pair per task, each of the pair's shapes; the AR model learns every task
        target_name, draft_name = (folder.name.removeprefix("tiny-") for folder in tt.pair(task))
        assert tt.PRESETS[target_name][0] == tt.TARGET and tt.PRESETS[draft_name][0] == tt.DRAFT
        assert tt.PRESETS[target_name][3] == tt.PRESETS[draft_name][3] == (task,)
    assert tt.PRESETS["ar"][3] == tt.TASKS


def test_checkpoint_round_trip(tok, tmp_path):
    m = micro(tok, seed=3).eval()
    tt.write(m, tmp_path)
    assert tt.complete(tmp_path)
    loaded = sdar.load(tmp_path)
    idx = torch.tensor([tok.chat("sort 31415926") + tok.encode("[1, 1, 2")])
    pos, attn = torch.arange(idx.shape[1]), mask.block_causal(idx.shape[1], 4)
    with torch.no_grad():
        assert torch.equal(m(idx, pos, attn), loaded(idx, pos, attn))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["mask_token_id"] == tok.mask_id and "block_size" not in cfg

    t = sdar.load_tokenizer(tmp_path)
    assert (t.mask_id, t.stop_ids) == (tok.id_of("<|MASK|>"), (tok.id_of("<|im_end|>"), tok.id_of("<|endoftext|>")))
    for prompt, answer in tt.examples(20):
        for text in (prompt, answer):
            assert t.encode(text) == list(text.encode()) and t.decode(t.encode(text)) == text
        chat = t.chat(prompt)
        assert chat == ([t.id_of("<|im_start|>")] + list(b"user\n") + list(prompt.encode()) + [t.id_of("<|im_end|>")]
                        + list(b"\n") + [t.id_of("<|im_start|>")] + list(b"assistant\n"))
        assert t.decode(chat) == f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def test_ar_checkpoint_round_trip(tok, tmp_path):
    """An AR model is written as a Qwen3 folder: model_type qwen3, no mask token in config.json
    or the tokenizer, the toy pair's 260 embedding rows; it loads back with identical logits."""
    m = micro_ar(tok, seed=4).eval()
    tt.write(m, tmp_path)
    assert tt.complete(tmp_path)
    loaded = sdar.load(tmp_path)
    assert loaded.config.model_type == "qwen3" and loaded.config.mask_token_id is None
    assert loaded.config.vocab_size == tok.vocab_size == 260
    idx = torch.tensor([tok.chat("walk 3 to 5 in 4 steps within 2-6") + tok.encode("3+4-")])
    pos, attn = torch.arange(idx.shape[1]), mask.block_causal(idx.shape[1], 1)
    with torch.no_grad():
        assert torch.equal(m(idx, pos, attn), loaded(idx, pos, attn))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and "mask_token_id" not in cfg and "block_size" not in cfg
    added = json.loads((tmp_path / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {int(i): t["content"] for i, t in added.items()} == {256: "<|endoftext|>", 257: "<|im_start|>",
                                                                258: "<|im_end|>"}
    t = sdar.load_tokenizer(tmp_path)
    assert t.mask_id is None and t.stop_ids == tok.stop_ids and t.chat("sort 1") == tok.chat("sort 1")


@pytest.fixture
def toy_dirs(tmp_path, monkeypatch):
    """Every toy folder under tmp_path instead of out/, by preset name."""
    attrs = {"target": "TARGET_DIR", "draft": "DRAFT_DIR", "walk-target": "WALK_TARGET_DIR",
             "walk-draft": "WALK_DRAFT_DIR", "ar": "AR_DIR"}
    assert set(attrs) == set(tt.PRESETS)
    for name, attr in attrs.items():
        monkeypatch.setattr(tt, attr, tmp_path / f"tiny-{name}")
    return {name: tmp_path / f"tiny-{name}" for name in attrs}


def write_toy(tok, name, folder):
    tt.write(micro_ar(tok) if name == "ar" else micro(tok), folder)


def test_ensure_trained_trains_when_any_folder_is_incomplete(tok, toy_dirs, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(tt, "main", lambda argv: calls.append(argv))
    for name, folder in toy_dirs.items():
        if name != "ar":
            write_toy(tok, name, folder)
    sdar.write_byte_tokenizer(toy_dirs["ar"])  # what an interrupted run leaves: tokenizer files only
    tt.ensure_trained(quiet=True)
    assert len(calls) == 1 and str(tmp_path) in calls[0]  # trains, into tmp_path
    write_toy(tok, "ar", toy_dirs["ar"])
    (toy_dirs["draft"] / "model.safetensors").unlink()  # weights lost, config.json still there
    tt.ensure_trained(quiet=True)
    assert len(calls) == 2
    write_toy(tok, "draft", toy_dirs["draft"])
    tt.ensure_trained(quiet=True)
    assert len(calls) == 2  # all complete: nothing to do


def test_ensure_trained_lock_lets_one_of_two_callers_train(tok, toy_dirs, monkeypatch):
    """Two first runs at once: the second blocks on the lock while the first trains, then finds
    the folders complete. The fake trainer is slow enough that, without the lock, both would
    see the folders missing and train."""
    calls = []

    def fake_main(argv):
        calls.append(argv)
        time.sleep(0.5)
        for name, folder in toy_dirs.items():
            write_toy(tok, name, folder)

    monkeypatch.setattr(tt, "main", fake_main)
    errors = []
    threads = [threading.Thread(target=lambda: _catch(errors, tt.ensure_trained, True)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1
    assert all(tt.complete(folder) for folder in toy_dirs.values())


def _catch(errors, fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001  a thread's exception would otherwise vanish
        errors.append(e)


@pytest.mark.parametrize("task", tt.TASKS)
def test_evaluate_runs_with_decode(tok, task):
    pytest.importorskip("decode")
    acc = tt.evaluate(micro(tok), tok, n=2, block=4, task=task)
    assert 0.0 <= acc <= 1.0


@pytest.mark.parametrize("task", tt.TASKS)
def test_evaluate_runs_an_ar_model_with_decode_generate_ar(tok, task):
    pytest.importorskip("decode")
    assert 0.0 <= tt.evaluate(micro_ar(tok), tok, n=2, task=task) <= 1.0
