"""sdar.py: the cached decoder equals the no-cache oracle; SDAR's schedule and rule against
hand-written tables and literal loops; stops, forwards, sampling filters, AR decoding."""
import collections
import itertools
import math
import random
from dataclasses import replace

import pytest
import torch

import sdar
from mask import block_causal as mask_of

MASK = 60  # the random models' mask id (conftest)


@pytest.mark.parametrize("block", [4, 8])
@pytest.mark.parametrize("strategy", ["static", "dynamic"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cache_equals_oracle(block, strategy, temperature, random_model, prompt):
    """Cached generate == the no-cache oracle token for token, every prompt alignment, steps <= block."""
    m = random_model()
    sampling = sdar.Sampling(temperature, top_k=20, top_p=0.9) if temperature else sdar.GREEDY
    for P in (1, block - 1, block, 2 * block + 1):
        for steps in (block, block // 2):
            kw = dict(block=block, steps=steps, strategy=strategy, threshold=0.3, sampling=sampling)
            a, _ = sdar.generate(m, prompt(P, P), 3 * block + 1, generator=torch.Generator().manual_seed(P), **kw)
            b, _ = sdar.generate(m, prompt(P, P), 3 * block + 1, generator=torch.Generator().manual_seed(P),
                                   cached=False, **kw)
            assert a == b and len(a) == 3 * block + 1, (P, steps)


# SDAR's schedule: (masks, block, steps, steps done) -> the quota of each step the block still needs.
# The quota spreads the block over the steps, remainder first; a step reveals min(quota, masks left).
SDAR_SCHEDULES = {
    (4, 4, 4, 0): [1, 1, 1, 1], (2, 4, 4, 0): [1, 1], (4, 4, 2, 0): [2, 2], (2, 4, 2, 0): [2],
    (3, 4, 2, 0): [2, 2], (1, 4, 2, 0): [2], (4, 4, 3, 0): [2, 1, 1], (3, 4, 3, 0): [2, 1],
    (2, 4, 3, 0): [2], (4, 4, 1, 0): [4], (8, 8, 3, 0): [3, 3, 2], (7, 8, 3, 0): [3, 3, 2],
    (5, 8, 3, 0): [3, 3], (5, 8, 4, 0): [2, 2, 2], (8, 8, 8, 0): [1] * 8, (6, 8, 5, 0): [2, 2, 2],
    # continued after `done` steps: the schedule goes on where it was, it does not restart
    (6, 8, 5, 1): [2, 2, 1, 1], (4, 8, 5, 2): [2, 1, 1], (2, 8, 5, 3): [1, 1], (3, 4, 4, 1): [1, 1, 1],
    (5, 8, 3, 1): [3, 2], (2, 8, 3, 1): [3], (1, 4, 2, 1): [2],
}


@pytest.mark.parametrize("masks_left,block,steps,done", sorted(SDAR_SCHEDULES))
def test_schedule_is_sdars(masks_left, block, steps, done):
    assert sdar.schedule(masks_left, block, steps, done) == SDAR_SCHEDULES[masks_left, block, steps, done]


def brute_reveal(conf, todo, k, strategy, threshold):
    """SDAR's rule read literally: the k masked positions of highest confidence (ties: lower position
    first), plus, when dynamic, every masked position above the threshold; "left": the k leftmost."""
    masked = [i for i in range(len(conf)) if todo[i]]
    if strategy == "left":
        order = masked
    else:
        order = sorted(masked, key=lambda i: (-conf[i], i))
    chosen = set(order[:k])
    if strategy == "dynamic":
        chosen |= {i for i in masked if conf[i] > threshold}
    return [i in chosen for i in range(len(conf))]


def test_reveal_matches_a_literal_loop():
    """The one rule the target alone and lossless verification share, on random distributions with
    exact ties, known positions anywhere, every strategy, and a batch of rows with their own quotas."""
    rng = random.Random(0)
    for trial in range(300):
        B, V = rng.randint(1, 8), 5
        probs = torch.tensor([[rng.choice([0.1, 0.2, 0.3, 0.5]) for _ in range(V)] for _ in range(B)])
        probs = probs / probs.sum(-1, keepdim=True)  # repeated values: exact ties
        tokens = torch.tensor([rng.randrange(V) for _ in range(B)])
        todo = torch.tensor([rng.random() < 0.7 for _ in range(B)])
        k, strategy = rng.randint(1, B), rng.choice(["static", "dynamic", "left"])
        conf = probs.gather(-1, tokens[:, None])[:, 0].tolist()
        got = sdar.reveal(probs, tokens, todo, k, strategy, 0.29).tolist()
        assert got == brute_reveal(conf, todo.tolist(), k, strategy, 0.29), trial
    batch = torch.rand(3, 4, V).softmax(-1)
    tokens, todo, k = batch.argmax(-1), torch.ones(3, 4, dtype=torch.bool), torch.tensor([[1], [2], [3]])
    assert sdar.reveal(batch, tokens, todo, k).sum(-1).tolist() == [1, 2, 3]


def test_dynamic_reveals_above_the_threshold_not_at_it():
    """SDAR's dynamic rule reveals a position whose confidence is above the threshold
    (confidence > threshold, as its generate.py has it); one exactly at the threshold is revealed
    only within the step's quota."""
    probs = torch.tensor([[0.75, 0.25, 0.0], [0.5, 0.5, 0.0], [0.5, 0.25, 0.25]])
    tokens, todo = torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool)
    assert sdar.reveal(probs, tokens, todo, 1, "dynamic", 0.5).tolist() == [True, False, False]
    assert sdar.reveal(probs, tokens, todo, 1, "dynamic", 0.49).tolist() == [True, True, True]
    assert sdar.reveal(probs, tokens, todo, 2, "dynamic", 0.5).tolist() == [True, True, False]


def one(d):
    """Row 0 of a Denoised batch of one block: tokens (B,), step (B,), picks (S, B), forwards."""
    return sdar.Denoised(d.tokens[0], d.step[0], d.states[:, 0], d.masked[:, 0], d.picks[:, 0],
                         None if d.probs is None else d.probs[:, 0], d.forwards)


def denoise_one(m, x, known, start, steps, rule=None, **kw):
    """sdar.denoise of one block x (B,), its known positions, at `start`, `steps` per block."""
    rule = rule or sdar.Settings()
    rule = replace(rule, block=len(x), steps=steps)
    return one(sdar.denoise(m, torch.where(known, x, MASK)[None], torch.tensor([start]),
                            torch.tensor([0]), rule, **kw))


def test_step_map_follows_the_schedule(random_model, prompt):
    """Static decoding reveals min(quota, masks left) positions at step s, each position exactly once;
    known positions, anywhere in the block, stay as they were and keep step 0."""
    m = random_model()
    for pattern, steps in itertools.product(range(15), (1, 2, 3, 4)):  # every known pattern but full
        known = torch.tensor([bool(pattern >> i & 1) for i in range(4)])
        x = torch.where(known, torch.tensor(prompt(4, pattern)), MASK)
        quotas = sdar.schedule(int((~known).sum()), 4, steps)
        with torch.no_grad():
            out = denoise_one(m, x, known, 0, steps)
        assert (out.tokens != MASK).all() and out.step[known].eq(0).all()
        assert torch.equal(out.tokens[known], x[known])
        left, reveals = int((~known).sum()), []
        for k in quotas:
            reveals.append(min(k, left))
            left -= reveals[-1]
        assert [int((out.step == s).sum()) for s in range(1, steps + 1)] == reveals + [0] * (
            steps - len(reveals))  # the steps past a full block reveal nothing


def test_static_reveals_the_most_confident(random_model):
    """The first step reveals the position of the highest confidence of a plain forward."""
    m = random_model(3)
    x, known = torch.full((4,), MASK), torch.zeros(4, dtype=torch.bool)
    with torch.no_grad():
        out = denoise_one(m, x, known, 0, 4)
        probs = m(x[None], torch.arange(4), torch.ones(4, 4, dtype=torch.bool))[0]
        probs = probs.index_fill(-1, torch.tensor([MASK]), -math.inf).softmax(-1)
    first = out.step.tolist().index(1)
    assert first == int(probs.max(-1).values.argmax()) and out.tokens[first] == probs[first].argmax()


def test_a_batch_of_blocks_denoises_as_each_alone(random_model, prompt):
    """denoise on (N, B) blocks with a batched cache equals N separate calls, with their picks."""
    m = random_model(4)
    prefix = torch.tensor([prompt(8, s) for s in range(3)])
    x, known = torch.full((3, 4), MASK), torch.zeros(3, 4, dtype=torch.bool)
    known[1, 2], x[1, 2] = True, 5
    with torch.no_grad():
        cache = m.new_cache(16, batch_size=3)
        sdar.prefill(m, prefix, cache, 4)
        rule = sdar.Settings(strategy="dynamic", threshold=0.5, steps=4)
        batched = sdar.denoise(m, x, torch.full((3,), 8), torch.zeros(3, dtype=torch.long), rule,
                               known=known, cache=cache)
        for row in range(3):
            alone_cache = m.new_cache(16)
            sdar.prefill(m, prefix[row], alone_cache, 4)
            alone = denoise_one(m, x[row], known[row], 8, 4, rule, cache=alone_cache)
            assert torch.equal(batched.tokens[row], alone.tokens) and torch.equal(batched.step[row], alone.step)


def test_forwards_count_the_folded_store(random_model, prompt):
    """A block costs `steps` forwards: the block before it is stored by folding it into its first."""
    m = random_model()
    for block, steps in ((4, 4), (4, 2), (8, 8), (8, 3)):
        _, stats = sdar.generate(m, prompt(2 * block), 5 * block, block=block, steps=steps)
        assert stats.forwards == stats.steps == 5 * steps
        _, stats = sdar.generate(m, prompt(block + 1), 5 * block - 1, block=block, steps=steps)
        first = len(sdar.schedule(block - 1, block, steps))  # one known token: it may finish early
        assert stats.forwards == first + 4 * steps


def test_stop_tokens_and_max_new_tokens(random_model, prompt):
    """Output is trimmed before the first stop token; without one, exactly max_new_tokens come back."""
    m = random_model()
    free, _ = sdar.generate(m, prompt(5), 23)
    assert len(free) == 23
    stop = free[9]
    assert sdar.generate(m, prompt(5), 23, stop_ids=(stop, 999))[0] == free[:free.index(stop)]
    for n in (1, 4, 7):
        assert sdar.generate(m, prompt(5), n)[0] == free[:n]


def test_seeded_sampling_is_reproducible(random_model, prompt):
    """Same seed, same tokens; another seed, other tokens."""
    m, sampling = random_model(), sdar.Sampling(1.0)
    runs = [sdar.generate(m, prompt(6), 16, sampling=sampling, generator=torch.Generator().manual_seed(s))[0]
            for s in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]


def test_sampling_filters():
    """top-k keeps the k largest, top-p the smallest prefix reaching p, temperature sharpens."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert sdar.Sampling(1.0, top_k=2).distribution(logits).tolist() == pytest.approx([0.625, 0.375, 0, 0])
    assert sdar.Sampling(1.0, top_p=0.8).distribution(logits).tolist() == pytest.approx([0.625, 0.375, 0, 0])
    assert sdar.Sampling(1.0, top_p=0.81).distribution(logits).tolist() == pytest.approx(
        [0.5 / .95, 0.3 / .95, .15 / .95, 0])
    assert sdar.Sampling(0.5).distribution(logits)[0] == pytest.approx(0.25 / 0.365, rel=1e-4)  # p^2


def test_top_p_keeps_the_smallest_set_that_reaches_it_at_the_boundary():
    """Probabilities 0.5, 0.25, 0.25: top_p 0.5 keeps one token (its mass reaches 0.5 exactly), 0.75
    two, and a hair above either one more. A rule that drops a token only when the mass before it
    exceeds top_p (> for >=) keeps one too many at the boundary, and fails here."""
    logits = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    for top_p, kept in ((0.5, 1), (0.5 + 1e-6, 2), (0.75, 2), (0.75 + 1e-6, 3), (1.0, 3)):
        probs = sdar.Sampling(1.0, top_p=top_p).distribution(logits)
        assert int((probs > 0).sum()) == kept, (top_p, probs)
        assert probs[0] == pytest.approx(0.5 / [0.5, 0.75, 1.0][kept - 1])  # renormalised


def test_a_tiny_top_p_keeps_the_most_likely_token(random_model, prompt):
    """top_p = 1e-300 (0 in float32) keeps the most likely token alone: a one-hot distribution, and
    a sampled decode that equals the greedy one, never a NaN or a sampling error."""
    logits = torch.log(torch.tensor([0.2, 0.5, 0.3]))
    assert sdar.Sampling(1.0, top_p=1e-300).distribution(logits).tolist() == [0.0, 1.0, 0.0]
    m = random_model()
    tiny = sdar.Sampling(1.0, top_p=1e-300)
    assert sdar.generate(m, prompt(5), 9, sampling=tiny, generator=torch.Generator().manual_seed(0))[0] \
        == sdar.generate(m, prompt(5), 9)[0]


@pytest.mark.parametrize("strategy", ["static", "dynamic"])
def test_one_forward_chain_is_the_rule_applied_to_one_forwards_logits(strategy, random_model, prompt):
    """denoise(drafting="block") (the draft proposing a block from one forward, with its cache): one
    forward, and the tokens, step map and picks that a literal loop gets by applying SDAR's rule
    step after step to the logits of one separate no-cache forward (argmax picks; static: the
    quota's most confident still masked, ties to the lower position; dynamic: also every one above
    the threshold)."""
    m = random_model(5)
    checked = beyond = 0
    for P, known_at, steps in itertools.product((4, 8), ((), (2,), (0, 3)), (4, 2)):  # aligned
        ids = prompt(P + 4, P)
        x = torch.tensor(ids[P:])
        known = torch.tensor([i in known_at for i in range(4)])
        quotas = sdar.schedule(4 - len(known_at), 4, steps)
        cache = m.new_cache(64)
        sdar.prefill(m, torch.tensor(ids[:P]), cache, 4)
        got = denoise_one(m, x, known, P, steps, sdar.Settings(strategy=strategy, threshold=0.3),
                          cache=cache, drafting="block")
        state = [t if i in known_at else MASK for i, t in enumerate(ids[P:])]
        seq = torch.tensor(ids[:P] + state)
        with torch.no_grad():
            logits = m(seq[None], torch.arange(len(seq)), mask_of(len(seq), 4))[0, -4:].tolist()
        probs = [[math.exp(v - max(row)) for v in row[:MASK]] for row in logits]  # the mask: never
        probs = [[p / sum(row) for p in row] for row in probs]
        pick = [row.index(max(row)) for row in probs]
        step, todo = [0] * 4, [i for i in range(4) if i not in known_at]
        for s, k in enumerate(quotas, start=1):
            if strategy == "dynamic" and s > 1 and not todo:
                break
            order = sorted(todo, key=lambda i: (-probs[i][pick[i]], i))
            chosen = set(order[:k]) | {i for i in todo if strategy == "dynamic"
                                       and probs[i][pick[i]] > 0.3}
            for i in chosen:
                state[i], step[i] = pick[i], s
            todo = [i for i in todo if i not in chosen]
            beyond += len(chosen) > k  # the threshold revealed more than the quota
        assert got.forwards == 1 and got.tokens.tolist() == state and got.step.tolist() == step
        assert got.picks.tolist() == [pick] * len(got.picks)
        checked += len(got.picks)
    assert checked >= 12 and (beyond > 0) == (strategy == "dynamic")


@pytest.mark.parametrize("strategy", ["static", "dynamic", "left"])
def test_replay_is_the_rule_applied_step_after_step(strategy):
    """replay (every step of a block on fixed distributions and greedy picks, from one sort)
    equals sdar.step applied once per step: rows with known positions, steps already taken,
    confidences that tie (coarse probabilities) and that cross the threshold."""
    g = torch.Generator().manual_seed(0)
    rule = sdar.Settings(strategy=strategy, threshold=0.5)
    checked = 0
    for B, S in ((4, 4), (4, 2), (8, 3), (6, 6)):
        rule = replace(rule, steps=S)
        R = 64
        probs = torch.randint(1, 4, (R, B, 5), generator=g).float()  # ties in confidence
        probs[:R // 2, :, 0] += 12 * torch.rand(R // 2, B, generator=g)  # some above 0.5
        probs = probs / probs.sum(-1, keepdim=True)
        todo = torch.rand(R, B, generator=g) < 0.75
        done = torch.randint(0, S, (R,), generator=g) * (todo.sum(-1) < B)
        x = torch.where(todo, 9, torch.randint(0, 5, (R, B), generator=g))
        quotas = sdar.quota(done[:, None] + torch.arange(S), B, S)
        got = sdar.replay(x, todo, probs, quotas, rule, 0)
        want_x, want_todo, want_step = x, todo, torch.zeros_like(x)
        for s in range(S):
            assert torch.equal(got.states[s], want_x) and torch.equal(got.masked[s], want_todo)
            want_x, want_todo, revealed, _ = sdar.step(probs, want_x, want_todo, quotas[:, s:s + 1],
                                                       rule)
            want_step = torch.where(revealed, s + 1, want_step)
        assert torch.equal(got.tokens, want_x) and torch.equal(got.step, want_step)
        checked += int(revealed.any())
    assert checked


def test_missing_mask_id_is_an_error(random_model):
    """A model without mask_token_id, or an AR model, refuses diffusion decoding."""
    m = random_model()
    m.config.mask_token_id = None
    with pytest.raises(ValueError, match="without a mask token cannot decode diffusion-style"):
        sdar.generate(m, [1, 2], 4)
    with pytest.raises(ValueError, match="a qwen3 model"):
        sdar.generate(random_model(model_type="qwen3"), [1, 2], 4)


def test_the_mask_token_is_never_output(random_model, favour, prompt):
    """A diffusion decoder gives its mask id zero probability: vanilla decoding, the oracle and every
    speculative verification, greedy and sampled, even from models rigged to prefer it."""
    import speculative
    target, draft = favour(random_model(0), 1e4, MASK), favour(random_model(1, 1), 1e4, MASK)
    with torch.no_grad():
        assert target(torch.tensor([[1, 2]]), torch.arange(2))[0].argmax(-1).eq(MASK).all()  # rigged
    for sampling in (sdar.GREEDY, sdar.Sampling(1.0)):
        kw = dict(sampling=sampling, generator=torch.Generator().manual_seed(0))
        outs = [sdar.generate(target, prompt(6), 12, **kw)[0],
                sdar.generate(target, prompt(6), 12, cached=False, **kw)[0]]
        outs += [speculative.generate(target, draft, prompt(6), 12, verify=v, **kw)[0]
                 for v in ("lossless", "exact", "simsd")]
        assert all(len(o) == 12 and MASK not in o for o in outs), outs


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_ar_cache_equals_recomputing_everything(temperature, random_model, prompt):
    """Cached AR decoding == recomputing the whole sequence causally for every token (the oracle)."""
    m = random_model(model_type="qwen3", sharpen=1.0)
    sampling = sdar.Sampling(temperature, top_k=30, top_p=0.95) if temperature else sdar.GREEDY
    for P in (1, 2, 5):
        def seeded():
            return torch.Generator().manual_seed(P)

        a, stats = sdar.generate_ar(m, prompt(P, P), 17, sampling=sampling, generator=seeded())
        b, _ = sdar.generate_ar(m, prompt(P, P), 17, sampling=sampling, generator=seeded(),
                                  cached=False)
        assert a == b and len(a) == 17 and stats.forwards == 17


@torch.no_grad()
def test_ar_greedy_is_the_argmax_of_the_shifted_logits(random_model, prompt):
    """Each greedy token is the argmax of a plain causal forward's logits at the position before it."""
    m = random_model(3, model_type="qwen3", sharpen=1.0)
    out, _ = sdar.generate_ar(m, prompt(4), 10)
    seq = torch.tensor(prompt(4) + out)
    logits = m(seq[None], torch.arange(len(seq)), torch.ones(len(seq), len(seq), dtype=torch.bool).tril())[0]
    assert out == logits[3:-1].argmax(-1).tolist()


def test_ar_stops_and_stream(random_model, prompt):
    """Stops trim; the callback sees exactly the returned tokens."""
    m, seen = random_model(model_type="qwen3", sharpen=1.0), []
    free, _ = sdar.generate_ar(m, prompt(3), 12, callback=seen.extend)
    assert seen == free
    stop, seen = free[6], []
    cut, _ = sdar.generate_ar(m, prompt(3), 12, stop_ids=(stop,), callback=seen.extend)
    assert cut == free[:free.index(stop)] == seen


@pytest.mark.parametrize("kw,message", [
    (dict(temperature=-1.0), r"temperature must be 0 \(argmax\) or a finite number >= 0.0001 .*; got -1.0"),
    (dict(temperature=math.inf), "temperature must be 0 \\(argmax\\) or a finite number"),
    (dict(temperature=math.nan), "temperature must be 0 \\(argmax\\) or a finite number"),
    (dict(temperature=1e-300), "smaller ones are argmax in effect and can overflow float32; use 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"), (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-3), "top_k must be an integer >= 0")])
def test_sampling_settings_are_checked(kw, message):
    with pytest.raises(ValueError, match=message):
        sdar.Sampling(**kw)


@pytest.mark.parametrize("kw,message", [
    (dict(threshold=2.0), r"threshold must be in \[0, 1\]"), (dict(block=0), "block must be an integer >= 1"),
    (dict(steps=0), "steps must be an integer from 1"), (dict(strategy="maybe"), "strategy must be"),
    (dict(steps=5), r"steps must be an integer from 1 to the block length \(4\)"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1")])
def test_decoding_options_are_checked_with_pythons_names(kw, message, random_model):
    """Bad options raise ValueError naming the parameter as Python spells it, from every decoder."""
    import speculative
    m, n = random_model(), kw.pop("max_new_tokens", 4)
    for call in (lambda: sdar.generate(m, [1, 2], n, **kw), lambda: sdar.generate(m, [1, 2], n, cached=False, **kw),
                 lambda: speculative.generate(m, m, [1, 2], n, **kw)):
        with pytest.raises(ValueError, match=message):
            call()


def test_empty_prompts_are_refused(random_model):
    for call in (lambda: sdar.generate(random_model(), [], 4),
                 lambda: sdar.generate_ar(random_model(model_type="qwen3"), [], 4)):
        with pytest.raises(ValueError, match="the prompt is empty"):
            call()


# ----------------------------------------------------------------------------- batches

def batch_case(m, prompts, n, kw, decoder, varied_stop):
    """A stop token that several rows say at different places (so rows stop at different times),
    and each prompt's decode alone with it."""
    stop = varied_stop([decoder(m, p, n, **kw)[0] for p in prompts], n)
    return stop, [decoder(m, p, n, stop_ids=(stop,), **kw)[0] for p in prompts]


@pytest.mark.parametrize("strategy", ["static", "dynamic"])
@pytest.mark.parametrize("block", [2, 4, 8])
def test_every_row_of_a_batch_is_its_decode_alone(block, strategy, random_model, prompt, varied_stop):
    """Prompts of every alignment in one batch, a stop token met at different times: each row of
    the batched decode (cached, and the oracle) equals its decode alone, token for token;
    callback(i, tokens) streams each row's tokens and on_row(i, tokens, stats) its final output,
    once."""
    m = random_model(5)  # its rows say two tokens, each first at different places
    prompts = [prompt(P, P) for P in range(1, 2 * block + 2)]
    for cached in (True, False):
        kw = dict(block=block, strategy=strategy, threshold=0.4, cached=cached)
        stop, alone = batch_case(m, prompts, 3 * block + 1, kw, sdar.generate, varied_stop)
        streamed, final = collections.defaultdict(list), collections.defaultdict(list)
        outs, stats = sdar.generate(m, prompts, 3 * block + 1, stop_ids=(stop,), **kw,
                                      callback=lambda i, t: streamed[i].extend(t),
                                      on_row=lambda i, t, s: final[i].append(t))
        assert outs == alone and [s.tokens for s in stats] == list(map(len, alone))
        assert {i: o for i, o in enumerate(outs) if o} == {i: t for i, t in streamed.items() if t}
        assert dict(final) == {i: [o] for i, o in enumerate(outs)}
        assert len(set(map(len, alone))) > 1  # rows stopped at different times


@pytest.mark.parametrize("cached", [True, False])
def test_every_row_of_an_ar_batch_is_its_decode_alone(cached, random_model, prompt, varied_stop):
    m = random_model(3, model_type="qwen3")
    prompts = [prompt(P, P) for P in range(1, 10)]
    kw = dict(cached=cached)
    stop, alone = batch_case(m, prompts, 9, kw, sdar.generate_ar, varied_stop)
    outs, stats = sdar.generate_ar(m, prompts, 9, stop_ids=(stop,), **kw)
    assert outs == alone and len(set(map(len, alone))) > 1
    assert [s.forwards for s in stats] == [min(len(o) + 1, 9) for o in alone]


@pytest.mark.parametrize("block", [1, 4])
def test_a_chunked_prefill_equals_the_whole_one(block, random_model, prompt):
    """Prompts of different lengths prefilled in chunks of a few tokens (several forwards, rows
    running out at different chunks) leave each row's cache as one whole forward does: the same
    lengths, and keys and values equal over every committed slot."""
    m = random_model(0, 2)
    lengths = [8, 20, 4, 12]
    rows = [torch.tensor(prompt(n, n)) for n in lengths]
    caches = {}
    for chunk in (10_000, 8 * block // 4 or 2, 3 * block):
        cache = m.new_cache(32, len(rows))
        with torch.no_grad():
            sdar.prefill(m, rows, cache, block, chunk=chunk)
        caches[chunk] = cache
    whole = caches.pop(10_000)
    assert whole.lens.tolist() == lengths and whole.bound == max(lengths)
    for cache in caches.values():
        assert cache.lens.tolist() == lengths and cache.bound == max(lengths)
        for r, n in enumerate(lengths):
            torch.testing.assert_close(cache.k[:, r, :, :n], whole.k[:, r, :, :n], rtol=1e-5,
                                       atol=1e-5)
            torch.testing.assert_close(cache.v[:, r, :, :n], whole.v[:, r, :, :n], rtol=1e-5,
                                       atol=1e-5)


def test_the_compiled_path_returns_the_eager_tokens(random_model, prompt):
    """sdar.compiled (torch.compile, static shapes: widths in buckets, caches read whole)
    returns exactly the eager tokens, float32, for the target alone and lossless speculation
    with a draft (both compiled): one small shape family, compiled once here."""
    import speculative
    target, draft = random_model(0, 1), random_model(1, 1)
    ids = prompt(9, 3)
    want = [sdar.generate(target, ids, 12, strategy="dynamic")[0],
            speculative.generate(target, draft, ids, 12, strategy="dynamic", lookahead=2)[0]]
    sdar.compiled(target), sdar.compiled(draft)
    got = [sdar.generate(target, ids, 12, strategy="dynamic")[0],
           speculative.generate(target, draft, ids, 12, strategy="dynamic", lookahead=2)[0]]
    assert got == want
    assert target.new_cache(8).whole and target.static  # it ran the static shapes
