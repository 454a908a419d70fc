"""train_tiny.py: the tasks and their scorers, the noising, the SDAR, trajectory and AR losses
against brute-force references, losses that drop, the target's batched decodes against
sdar.generate, a distilled draft that agrees with its target, checkpoints that load back,
ensure_trained (its lock, the missing models only), Ctrl-C, and the command line's checks.
Micro models only; nothing in out/."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import sdar
import mask
from checkpoint import load, load_tokenizer, write_byte_tokenizer
from model import Config
import speculative
import train_tiny as tt


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(write_byte_tokenizer(tmp_path_factory.mktemp("tok")))


def micro(tok, layers=2, seed=0, width=32):
    c = Config(vocab_size=tok.vocab_size, hidden_size=width, intermediate_size=2 * width,
                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                    rope_theta=1e4, mask_token_id=tok.mask_id)
    return tt.init_model(c, seed)


def micro_ar(tok, seed=0):
    c = Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    rope_theta=1e4, model_type="qwen3")
    return tt.init_model(c, seed)


# ----------------------------------------------------------------------------- task

def test_examples_are_deterministic_disjoint_and_long_enough():
    assert tt.examples(50, "train", 0) == tt.examples(50, "train", 0)
    assert tt.examples(50, "heldout", 3) == tt.examples(50, "heldout", 3)
    assert tt.examples(50, "train", 0) != tt.examples(50, "train", 1)
    train, heldout = tt.examples(3000, "train"), tt.examples(300, "heldout")
    assert not {p for p, _ in train} & {p for p, _ in heldout}  # no held-out prompt is trained on
    assert all(tt._is_heldout(p) for p, _ in heldout)
    assert not any(tt._is_heldout(p) for p, _ in train)
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
    for bad in ["[1, 2, 9]", "[1, 2, 2, 8]", "[1, 2, 2, 9, 9]", "[1,2,2,9]", "[1, 2,  2, 9]",
                "1, 2, 2, 9", "[1, 2, 2, 9]]", "[1, 2, 2, 9] done", "[1, 2, 2, 9]<|im_end|>",
                "[9, 2, 2, 1]", ""]:
        assert not tt.score(prompt, bad, answer), bad


def test_a_prompt_goes_to_its_task_by_its_first_word_and_one_written_otherwise_is_noted():
    """task_of reads the first word whatever its case and the spaces around it; outside_training is
    silent on every held-out prompt and tells a prompt written otherwise (case, spaces, digits
    that are not ASCII) from one of another kind."""
    held_out = {task: [p for p, _ in tt.examples(30, "heldout", task=task)] for task in tt.TASKS}
    for task, prompts in held_out.items():
        assert all(tt.task_of(p) == task and tt.outside_training(p) is None for p in prompts)
    cases = {"  Walk 3 to 5 in 10 steps within 2-6": ("walk", "written otherwise"),
             "WALK\t3 to 5 in 10  steps within 2-6 ": ("walk", "written otherwise"),
             "SORT 31415926": ("sort", "written otherwise"), " sort 31415926\n": ("sort", "written otherwise"),
             "walk 3 to 5 in 4 steps within 2-6": ("walk", "neither"), "walk": ("walk", "neither"),
             "walker 3": ("sort", "neither"), "sort 1": ("sort", "neither"), "": ("sort", "neither"),
             "sort \u0663\u0661\u0664\u0661\u0665\u0669\u0662\u0666": ("sort", "neither")}
    for prompt, (task, note) in cases.items():
        assert tt.task_of(prompt) == task and note in tt.outside_training(prompt), prompt


def test_walk_examples_are_deterministic_disjoint_valid_and_several_blocks_long():
    assert tt.examples(50, "train", 0, "walk") == tt.examples(50, "train", 0, "walk")
    assert tt.examples(50, "heldout", 2, "walk") == tt.examples(50, "heldout", 2, "walk")
    assert tt.examples(50, "train", 0, "walk") != tt.examples(50, "train", 1, "walk")
    train, heldout = tt.examples(4000, "train", 0, "walk"), tt.examples(300, "heldout", 0, "walk")
    assert not {p for p, _ in train} & {p for p, _ in heldout}
    assert len({p for p, _ in heldout}) == 300  # held-out prompts are distinct
    assert all(tt.score(p, a, None) for p, a in train + heldout)  # every reference is valid
    lengths = [len(a.encode()) for _, a in train]
    assert min(lengths) >= 21 and sum(lengths) / len(lengths) >= 24  # >= 6 blocks of 4 on average
    # the spread of valid answers is learned: one prompt gets several answers in training
    by_prompt = {}
    for p, a in train:
        by_prompt.setdefault(p, set()).add(a)
    assert max(len(answers) for answers in by_prompt.values()) >= 4


WALK = "walk 3 to 5 in 6 steps within 2-6"


@pytest.mark.parametrize("answer", ["3+4+5+6-5-4+5", "3-2+3+4+5+6-5", "3+4-3+4-3+4+5",
                                    " 3+4+5-4+5-4+5\n"])
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
    pairs = [("sort 98765432", "[2, 3, 4, 5, 6, 7, 8, 9]"),
             ("sort 111122223333", str(sorted([1, 2, 3] * 4)))]
    x0, is_resp = tt.batch(tt.rows(pairs, tok), tok)
    stop, pad = tok.id_of("<|im_end|>"), tok.id_of("<|endoftext|>")
    for row, resp, (prompt, answer) in zip(x0.tolist(), is_resp.tolist(), pairs):
        p = tok.chat(prompt)
        r = tok.encode(answer) + [stop]
        assert row == p + r + [pad] * (len(row) - len(p) - len(r))
        assert resp == [False] * len(p) + [True] * (len(row) - len(p))  # pads count as response


def test_noise_never_masks_the_prompt_and_always_masks_a_response_token(tok):
    x0, is_resp = tt.batch(tt.rows(tt.examples(6, "train"), tok), tok)
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


# ----------------------------------------------------------------------------- losses

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


def full_logits(model, xt, x0, block):
    """One row's [x_t ; x_0] forward, the whole sequence and the looped mask: no shortcuts."""
    n = len(x0)
    ids, pos = torch.cat([xt, x0])[None], torch.arange(n).repeat(2)
    return model(ids, pos, reference_mask(n, block))[0]


@pytest.mark.parametrize("block", [4, 8])
def test_loss_matches_a_per_token_reference(tok, block):
    model = micro(tok).eval()
    x0, is_resp = tt.batch(tt.rows(tt.examples(3, "train", 5), tok), tok)  # rows of 3 lengths
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        loss = tt.sdar_loss(model, x0, is_resp, block, tok.mask_id, g)
        xt, masked, p = tt.noise(x0, is_resp, tok.mask_id, torch.Generator().manual_seed(1))
        total = 0.0
        for b in range(x0.shape[0]):
            logits = full_logits(model, xt[b], x0[b], block)
            for i in torch.nonzero(masked[b]).flatten().tolist():
                total += -F.log_softmax(logits[i], -1)[x0[b, i]].item() / p[b, 0].item()
    assert torch.isclose(loss, torch.tensor(total / is_resp.sum().item()), rtol=1e-4)


def decoded_rows(tok, target, n=6, batch_size=4):
    """The target's decodes of n sort and n walk training prompts (several lengths)."""
    prompts = [p for task in tt.TASKS for p, _ in tt.examples(n, "train", 7, task)]
    return tt.target_rows(target, tok, prompts, batch_size=batch_size)


def test_trajectory_loss_matches_a_per_state_reference(tok, random_model, favour):
    """Per row and block, the state drawn (the same draws, replayed), masked by the step map;
    each masked position labelled with the target's pick in that state, sure where the target
    revealed it at that step and UNSURE elsewhere. One full forward per row."""
    target = favour(random_model(seed=1, vocab=tok.vocab_size), 9.0, tok.id_of("<|im_end|>"))
    data = decoded_rows(tok, target)[:5]
    draft = micro(tok, layers=1, seed=2).eval()
    x0, is_resp = tt.batch(data, tok)
    step, picks = tt.trajectories(data, x0.shape[1])
    n_blocks = -(-x0.shape[1] // 4)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        loss = tt.trajectory_loss(draft, x0, is_resp, step, picks, tok.mask_id, g)
        draws = torch.rand(len(data), n_blocks, generator=torch.Generator().manual_seed(3))
        terms, sure = [], 0
        for r in range(len(data)):
            taken = [int(step[r, 4 * b:4 * b + 4].max()) for b in range(n_blocks)]
            state = [int(draws[r, b] * taken[b]) + 1 for b in range(n_blocks)]  # 1..taken
            masked = [i for i in range(x0.shape[1])
                      if taken[i // 4] and step[r, i] >= state[i // 4]]
            xt = x0[r].index_fill(0, torch.tensor(masked, dtype=torch.long), tok.mask_id)
            logp = F.log_softmax(full_logits(draft, xt, x0[r], 4), -1)
            for i in masked:
                s = state[i // 4]
                weight = 1.0 if step[r, i] == s else tt.UNSURE
                sure += step[r, i] == s
                label = picks[r, s - 1, i]
                terms.append(-weight * logp[i, label].item() - (1 - weight) * logp[i].mean().item())
    assert len(terms) > sure > 10
    assert torch.isclose(loss, torch.tensor(sum(terms) / len(terms)), rtol=1e-4)


def test_ar_loss_matches_a_per_token_reference(tok):
    """One forward per predicted token on the prefix before it, with a causal mask built by a
    loop (every layer's earlier rows must not see later ones either), over the answer and its
    stop token only: the pads after it are not trained."""
    model = micro_ar(tok).eval()
    pairs = tt.examples(2, "train", 5) + tt.examples(2, "train", 5, "walk")  # of 4 lengths
    x0, is_resp = tt.batch(tt.rows(pairs, tok), tok)
    stop = tok.id_of("<|im_end|>")
    with torch.no_grad():
        loss = tt.ar_loss(model, x0, is_resp, tok.id_of("<|endoftext|>"))
        terms = []
        for (prompt, answer), row in zip(pairs, x0):
            start = len(tok.chat(prompt))
            for i in range(start, start + len(tok.encode(answer)) + 1):  # the answer, the stop
                causal = torch.tensor([[k <= q for k in range(i)] for q in range(i)])
                logits = model(row[None, :i], torch.arange(i), causal)[0, -1]
                terms.append(-F.log_softmax(logits, -1)[row[i]].item())
            assert row[i] == stop
    assert torch.isclose(loss, torch.tensor(sum(terms) / len(terms)), rtol=1e-4)


def test_training_loss_drops(tok):
    model = micro(tok)
    x0, is_resp = tt.batch(tt.rows(tt.examples(16, "heldout"), tok), tok)

    def held_out_loss():
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            return tt.sdar_loss(model.eval(), x0, is_resp, 4, tok.mask_id, g).item()

    before = held_out_loss()
    tt.train(model, tok, tt.rows(tt.examples(40 * 16, "train"), tok), steps=40, batch_size=16,
             lr=1e-2)
    assert held_out_loss() < 0.4 * before


def test_ar_training_loss_drops_on_the_mixture(tok):
    model, pad = micro_ar(tok), tok.id_of("<|endoftext|>")
    pairs = tt.examples(8, "heldout") + tt.examples(8, "heldout", task="walk")
    x0, is_resp = tt.batch(tt.rows(pairs, tok), tok)

    def held_out_loss():
        with torch.no_grad():
            return tt.ar_loss(model.eval(), x0, is_resp, pad).item()

    before = held_out_loss()
    tt.train(model, tok, tt.rows(tt.mixed(tt.TASKS, 40 * 16, 0), tok), steps=40, batch_size=16,
             lr=1e-2)
    assert held_out_loss() < 0.4 * before


# ----------------------------------------------------------------------------- distillation

def test_target_rows_are_the_targets_own_decodes(tok, random_model, favour):
    """Prompts of several lengths decoded in batches (of 4, so that groups split) give, per
    prompt, sdar.generate's tokens under DISTILL up to the first stop token, then the rest of
    that block; and the trajectory is consistent: each position's pick at its own step is the
    token it got."""
    target = favour(random_model(seed=1, vocab=tok.vocab_size), 9.0, tok.id_of("<|im_end|>"))
    data = decoded_rows(tok, target)
    prompts = [p for task in tt.TASKS for p, _ in tt.examples(6, "train", 7, task)]
    assert sorted(tuple(r.prompt) for r in data) == sorted(tuple(tok.chat(p)) for p in prompts)
    assert len({len(r.prompt) for r in data}) >= 3
    stopped = 0
    for row in data:
        expected, _ = sdar.generate(target, row.prompt, 48, stop_ids=tok.stop_ids, **tt.DISTILL)
        stops = [i for i, t in enumerate(row.response) if t in tok.stop_ids]
        cut = stops[0] if stops else len(expected)
        assert row.response[:cut] == expected
        stopped += bool(stops)
        assert (len(row.prompt) + len(row.response)) % 4 == 0 and (row.step >= 1).all()
        own = row.picks.gather(0, (row.step - 1)[None])[0]
        assert own.tolist() == row.response
    assert 0 < stopped < len(data)  # the bias makes some stop and some run to 48 tokens


def matched_share(target, draft, tok, prompts):
    """Of the target's steps under lossless SimSD (DISTILL's decoding), the share the draft had
    proposed exactly: tokens and reveal order."""
    matched = steps = 0
    for prompt in prompts:
        _, stats = speculative.generate(target, draft, tok.chat(prompt), 48, verify="lossless",
                                        proposer="draft", drafting="step", stop_ids=tok.stop_ids,
                                        **tt.DISTILL)
        matched, steps = matched + stats.draft_matched, steps + stats.steps
    return matched / steps


def test_a_distilled_draft_agrees_with_its_target_more_than_a_data_draft(tok, random_model, favour,
                                                                        tmp_path, report):
    """A random micro target (leaning to <|im_end|>, so that it stops) writes its own kind of
    answers; two micro drafts of one shape and steps propose to it, one trained on the sort data
    and one on the target's decodes of training prompts, written and loaded back as checkpoint
    folders. The distilled one proposes the target's steps far more often (measured on these
    seeds: 0% and 41%)."""
    target = favour(random_model(seed=1, vocab=tok.vocab_size), 9.0, tok.id_of("<|im_end|>"))
    prompts = [p for p, _ in tt.examples(100, "train", 1)]
    drafts = {"data": tt.rows(tt.examples(60 * 8, "train", 2), tok),
              "distilled": tt.target_rows(target, tok, prompts)}
    for name, data in drafts.items():
        draft = micro(tok, layers=1, seed=3, width=24)
        tt.write(tt.train(draft, tok, data, steps=60, batch_size=8, lr=1e-2), tmp_path / name)
    heldout = [p for p, _ in tt.examples(8, "heldout")]
    share = {name: matched_share(target, load(tmp_path / name), tok, heldout)
             for name in drafts}
    report(f"micro distillation: the target's steps proposed exactly by the data draft "
           f"{share['data']:.0%}, by the distilled draft {share['distilled']:.0%}")
    assert share["distilled"] > share["data"] + 0.15, share


# ----------------------------------------------------------------------------- checkpoints

def preset_name(folder):
    return folder.name.removeprefix("tiny-")


def test_presets_and_folders():
    tok_ids = type("Tok", (), {"vocab_size": 260, "mask_id": 259})()
    shapes = {name: tt.init_model(tt.config(name, tok_ids)) for name in ("target", "draft", "ar")}
    target, draft, ar = shapes.values()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(target) >= 4 * count(draft)
    assert draft.config.num_hidden_layers == 1 < target.config.num_hidden_layers
    assert target.config.block_size is None and draft.config.mask_token_id == 259
    assert ar.config.model_type == "qwen3" and ar.config.mask_token_id is None
    assert count(ar) == count(target) and ar.config.vocab_size == target.config.vocab_size == 260
    assert tt.DRAFTS == ("data", "distilled")
    for task in tt.TASKS:  # per task a target and two drafts of one shape; one AR model for all
        folders = tt.folders(task)
        assert set(folders) == {"target", "data", "distilled", "head", "ar"}
        preset = {role: tt.PRESETS[path.name.removeprefix("tiny-")]
                  for role, path in folders.items()}
        assert preset["target"].shape == tt.TARGET and preset["target"].tasks == (task,)
        for role in tt.DRAFTS:
            assert preset[role].shape == tt.DRAFT and preset[role].tasks == (task,)
        teacher = folders["distilled"].parent / f"tiny-{preset['distilled'].teacher}"
        assert teacher == folders["target"]
        assert preset["data"].teacher is None and preset["ar"].tasks == tt.TASKS
        assert preset["head"].shape == tt.HEAD and preset["head"].teacher == preset_name(
            folders["target"]) and preset["head"].tasks == (task,)
        assert all(tt.tasks_of(path) == preset[role].tasks for role, path in folders.items())
    assert tt.tasks_of(tt.ROOT) is None
    covered = {path.name for task in tt.TASKS for path in tt.folders(task).values()}
    assert covered == {f"tiny-{name}" for name in tt.PRESETS}  # every preset has a role


def test_checkpoint_round_trip(tok, tmp_path):
    m = micro(tok, seed=3).eval()
    tt.write(m, tmp_path)
    assert tt.complete(tmp_path)
    loaded = load(tmp_path)
    idx = torch.tensor([tok.chat("sort 31415926") + tok.encode("[1, 1, 2")])
    pos, attn = torch.arange(idx.shape[1]), mask.block_causal(idx.shape[1], 4)
    with torch.no_grad():
        assert torch.equal(m(idx, pos, attn), loaded(idx, pos, attn))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["mask_token_id"] == tok.mask_id and "block_size" not in cfg
    t = load_tokenizer(tmp_path)
    stops = (tok.id_of("<|im_end|>"), tok.id_of("<|endoftext|>"))
    assert (t.mask_id, t.stop_ids) == (tok.id_of("<|MASK|>"), stops)
    for prompt, answer in tt.examples(20):
        for text in (prompt, answer):
            assert t.encode(text) == list(text.encode()) and t.decode(t.encode(text)) == text
        start, end = t.id_of("<|im_start|>"), t.id_of("<|im_end|>")
        expected = ([start] + list(b"user\n") + list(prompt.encode()) + [end] + list(b"\n")
                    + [start] + list(b"assistant\n"))
        assert t.chat(prompt) == expected
        text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        assert t.decode(expected) == text


def test_ar_checkpoint_round_trip(tok, tmp_path):
    """An AR model is written as a Qwen3 folder: model_type qwen3, no mask token in config.json
    or the tokenizer, the toy pair's 260 embedding rows; it loads back with identical logits."""
    m = micro_ar(tok, seed=4).eval()
    tt.write(m, tmp_path)
    assert tt.complete(tmp_path)
    loaded = load(tmp_path)
    assert loaded.config.model_type == "qwen3" and loaded.config.mask_token_id is None
    assert loaded.config.vocab_size == tok.vocab_size == 260
    idx = torch.tensor([tok.chat("walk 3 to 5 in 4 steps within 2-6") + tok.encode("3+4-")])
    pos, attn = torch.arange(idx.shape[1]), mask.block_causal(idx.shape[1], 1)
    with torch.no_grad():
        assert torch.equal(m(idx, pos, attn), loaded(idx, pos, attn))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"]
    assert "mask_token_id" not in cfg and "block_size" not in cfg
    added = json.loads((tmp_path / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    specials = {256: "<|endoftext|>", 257: "<|im_start|>", 258: "<|im_end|>"}
    assert {int(i): t["content"] for i, t in added.items()} == specials
    t = load_tokenizer(tmp_path)
    assert t.mask_id is None and t.stop_ids == tok.stop_ids
    assert t.chat("sort 1") == tok.chat("sort 1")


def test_a_rewritten_folder_is_incomplete_until_its_weights_are_written(tok, tmp_path, monkeypatch):
    """Retraining over a finished folder first removes its config.json: a run stopped while
    writing leaves a folder that the next run trains again, not old config with new weights."""
    tt.write(micro(tok), tmp_path)

    def stopped(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(tt, "save", stopped)
    with pytest.raises(KeyboardInterrupt):
        tt.write(micro(tok, seed=1), tmp_path)
    assert not tt.complete(tmp_path)


@pytest.mark.parametrize("kind, strategy", [("sdar", "static"), ("sdar", "dynamic"),
                                            ("qwen3", None)])
def test_evaluate_scores_the_held_out_decodes(tok, monkeypatch, kind, strategy):
    """evaluate() decodes each held-out prompt with the model's own decoder (at the given block
    and strategy) and scores what comes back: with decoders that answer every other prompt
    right and record how they were called, the score is exactly one half."""
    answers = {tuple(tok.chat(p)): a for task in tt.TASKS for p, a in tt.examples(4, task=task)}
    calls = []

    def fake(model, prompt_ids, max_new_tokens, **kw):
        calls.append((kw.get("block"), kw.get("strategy")))
        right = len(calls) % 2 == 0
        return tok.encode(answers[tuple(prompt_ids)] if right else "[]"), None
    monkeypatch.setattr(sdar, "generate_ar" if kind == "qwen3" else "generate", fake)
    model = micro_ar(tok) if kind == "qwen3" else micro(tok)
    options = {"strategy": strategy} if strategy else {}
    for task in tt.TASKS:
        assert tt.evaluate(model, tok, n=4, block=8, task=task, **options) == 0.5
    assert calls == [(8, strategy) if strategy else (None, None)] * 8


# ----------------------------------------------------------------------------- first runs

@pytest.fixture
def toy_out(tmp_path, monkeypatch):
    """OUT, where the toy folders live, moved to a fresh folder for the test."""
    monkeypatch.setattr(tt, "OUT", tmp_path / "out")
    return tmp_path / "out"


def write_toys(out, names, micro_checkpoint):
    for name in names:
        model_type = tt.PRESETS[name].shape.get("model_type", "sdar")
        micro_checkpoint(out / f"tiny-{name}", block_size=None, model_type=model_type)


def test_ensure_trained_trains_only_the_missing_models(toy_out, monkeypatch, micro_checkpoint):
    calls = []
    monkeypatch.setattr(tt, "main", calls.append)
    write_toys(toy_out, ["target", "draft", "ar", "walk-draft"], micro_checkpoint)
    write_byte_tokenizer(toy_out / "tiny-distilled")  # interrupted: tokenizer files only
    (toy_out / "tiny-draft" / "model.safetensors").unlink()  # weights lost, config.json left
    tt.ensure_trained(quiet=True)
    assert len(calls) == 1
    argv = calls[0]
    assert argv[argv.index("--out") + 1] == str(toy_out)
    assert argv[argv.index("--preset") + 1:argv.index("--preset") + 5] == [
        "walk-target", "walk-distilled", "distilled", "draft"]  # PRESETS order
    write_toys(toy_out, tt.PRESETS, micro_checkpoint)
    tt.ensure_trained(quiet=True)
    assert len(calls) == 1  # all complete: nothing to do


def test_ensure_trained_lock_lets_one_of_two_callers_train(toy_out, monkeypatch, capsys,
                                                           micro_checkpoint):
    """Two first runs at once: the second says once that it waits on the lock while the first
    trains, then finds the folders complete. The fake trainer is slow enough that, without the
    lock, both would see the folders missing and train."""
    calls = []

    def fake_main(argv):
        calls.append(argv)
        time.sleep(0.5)
        write_toys(toy_out, tt.PRESETS, micro_checkpoint)

    monkeypatch.setattr(tt, "main", fake_main)
    errors = []
    threads = [threading.Thread(target=_catch, args=(errors, tt.ensure_trained, True))
               for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)  # the first takes the lock
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1
    assert all(tt.complete(toy_out / f"tiny-{name}") for name in tt.PRESETS)
    out = capsys.readouterr().out
    assert out.count("waiting for another process that is training the toy models") == 1
    assert sum(line.startswith("training the toy models") for line in out.splitlines()) == 1


def _catch(errors, fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001  a thread's exception would otherwise vanish
        errors.append(e)


def test_two_trainings_write_identical_checkpoints(tmp_path):
    """A target and its distilled draft (a few steps, in this process), trained twice: the
    folders are byte-identical, the distillation data included."""
    folders = []
    for run in ("a", "b"):
        args = tt.parse(["--out", str(tmp_path / run), "--steps", "2", "--batch-size", "2",
                         "--eval", "0"])
        for name in ("walk-target", "walk-distilled"):
            tt.run_preset(name, args)
        folders.append(tmp_path / run)
    for name in ("walk-target", "walk-distilled"):
        files = sorted(p.name for p in (folders[0] / f"tiny-{name}").iterdir())
        assert "model.safetensors" in files
        for f in files:
            a, b = (folder / f"tiny-{name}" / f for folder in folders)
            assert a.read_bytes() == b.read_bytes(), (name, f)


def test_ctrl_c_keeps_the_finished_models_and_says_so_in_one_line(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while the second of two
    models trains: exit status 130, one line on stderr, no traceback from the parent or its
    worker, the finished folder complete, the other not."""
    out = tmp_path / "out"
    argv = [sys.executable, "train_tiny.py", "--out", str(out), "--preset", "walk-draft", "ar",
            "--workers", "1", "--steps", "40", "--batch-size", "2", "--eval", "0"]
    def as_in_a_terminal():  # a job started in the background inherits SIGINT ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen(argv, cwd=tt.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=as_in_a_terminal)
    killer = threading.Timer(120, proc.kill)
    killer.start()
    try:
        for line in proc.stdout:  # PRESETS order: walk-draft, then ar (a 6-layer model)
            if line.startswith("ar: "):  # queued for the worker: it trains for a second or more
                os.killpg(proc.pid, signal.SIGINT)
                break
        rest, err = proc.communicate()
    finally:
        killer.cancel()
    assert proc.returncode == 130, err
    assert "Traceback" not in err + rest and len(err.strip().splitlines()) == 1
    assert err.strip() == ("interrupted: kept walk-draft; train the rest with python train_tiny.py "
                           "--preset ar (a toy's next use does it too)")
    assert tt.complete(out / "tiny-walk-draft") and not tt.complete(out / "tiny-ar")


def test_ctrl_c_while_torch_imports_is_one_line(tmp_path, interrupt_early):
    """Ctrl-C in the first second, before main() runs: one line, exit status 130, no traceback."""
    status, err = interrupt_early("train_tiny.py", ["--out", str(tmp_path), "--eval", "0"])
    assert status == 130 and err == "\ninterrupted\n", err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "--workers must be an integer from 1 to"),
    (["--workers", "4096"], "--workers must be an integer from 1 to"),
    (["--threads", "0"], "--threads must be an integer from 1 to"),
    (["--threads", "4096"], "--threads must be an integer from 1 to"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--lr", "-0.001"], "--lr must be a finite number > 0"),
    (["--out", "README.md"], "--out README.md is a file"),
    (["--eval", "-1"], "--eval must be an integer from 0 to 300"),
    (["--eval", "100000"], "--eval must be an integer from 0 to 300"),
    (["--workers", "two"], "argument --workers: invalid int value: 'two'"),
])
def test_bad_options_are_one_sentence_and_exit_2_in_process(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        tt.parse(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(f"train_tiny.py: error: {message}")


def test_a_usage_error_says_where_to_learn_more(capsys):
    with pytest.raises(SystemExit) as exit_:
        tt.parse(["--bogus"])
    assert exit_.value.code == 2 and capsys.readouterr().err == (
        "train_tiny.py: error: unrecognized arguments: --bogus (python train_tiny.py --help lists the "
        "options)\n")


def test_bad_options_from_the_command_line(run_scripts):
    """The script itself: one line on stderr, exit status 2, no traceback, nothing trained."""
    argvs = [["--workers", "0"], ["--lr", "nan"], ["--out", "README.md"],
             ["--preset", "distilled", "--out", "no-such-folder"]]  # one wave of run_scripts
    for argv, done in zip(argvs, run_scripts("train_tiny.py", argvs)):
        assert done.returncode == 2 and "Traceback" not in done.stderr, (argv, done.stderr)
        assert len(done.stderr.splitlines()) == 1 and done.stdout == "", (argv, done.stderr)
        assert done.stderr.startswith("train_tiny.py: error: --"), done.stderr
    assert not (tt.ROOT / "no-such-folder").exists()


def test_a_head_learns_its_targets_next_states(random_model):
    """head_blocks records a target's own decoding state by state; train_head fits a head to it:
    its matched steps (matched_steps) rise from a fresh head's, and the target's own chain, which
    replays the distributions it was given, matches a share in [0, 1]."""
    import head
    target = random_model(0, 2, vocab=260)
    tok = tt.byte_tokenizer()
    prompts = [f"sort: {i} {i + 3} {i + 1}" for i in range(24)]
    blocks = tt.head_blocks(target, tok, prompts, (tt.RULE,))
    n, S, B = blocks["states"].shape
    assert blocks["hidden"].shape == (n, S, B, target.config.hidden_size) and n >= 24
    rule = replace(tt.RULE, mask_id=tok.mask_id)
    torch.manual_seed(0)
    fresh = head.new(target, B, width=32, layers=1).eval()
    before = tt.matched_steps(blocks, rule, fresh)
    trained = tt.train_head(fresh, blocks, 300, 3e-3)
    assert tt.matched_steps(blocks, rule, trained) > before
    assert 0 <= tt.matched_steps(blocks, rule) <= 1
