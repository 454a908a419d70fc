"""speculative.py: each guarantee against an independent reference: the target alone (sdar.generate
and sdar.generate_ar), separate no-cache forwards, exact distributions enumerated by brute force,
and literal loops over the acceptance rules."""
import collections
import itertools
import math
import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import sdar
import mask as masks
import checkpoint
import model
import lossless
import simsd
import speculative
import verifier

SAMPLED = sdar.Sampling(temperature=1.0)


def noisy_copy(m, scale, seed):
    """A draft that agrees with the target often but not always: its weights plus noise."""
    copy = model.Transformer(m.config).eval()
    copy.load_state_dict(m.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return copy


@pytest.fixture(scope="module")
def pairs(random_model):
    """(target, draft) pairs that disagree: a noisy copy (long chains) and an unrelated model."""
    target = random_model(0, 2)
    return [(target, noisy_copy(target, 0.3, 1)), (target, random_model(1, 1))]


def run(target, draft, prompt_ids, n, **kw):
    """speculative.generate with every iteration's info collected."""
    seen = []
    out, stats = speculative.generate(target, draft, prompt_ids, n, on_iteration=seen.append, **kw)
    return out, stats, seen


# ----------------------------------------------------------------------------- lossless, greedy

# (proposer, drafting): the draft a forward per step or one per block, the target alone, both
PROPOSERS = [("draft", "step"), ("draft", "block"), ("self", None), ("hybrid", "step"),
             ("hybrid", "block")]


def proposing(pair, proposer, drafting):
    """speculative.generate's arguments for one proposer: the target alone takes no draft."""
    target, draft = pair
    kw = dict(proposer=proposer, drafting=drafting) if proposer != "self" else {}
    return target, None if proposer == "self" else draft, kw


@pytest.mark.parametrize("proposer,drafting", PROPOSERS)
@pytest.mark.parametrize("block", [2, 4, 8])
def test_lossless_greedy_is_the_targets_own_decoding(block, proposer, drafting, pairs, prompt):
    """Token for token sdar.generate's output, for every proposer (drafts that disagree),
    steps = block and block/2, static and dynamic, every prompt alignment, lookahead 1-3 (the target
    alone: 1-2; at block 8, one per alignment); never more target forwards than the target alone,
    at least one target step per target forward, and no draft forward when the target proposes
    alone."""
    matched = 0
    most = 2 if proposer == "self" else 3
    lookaheads = range(1, most + 1) if block < 8 else (None,)
    for steps, strategy, L in itertools.product((block, block // 2), ("static", "dynamic"), lookaheads):
        for P in range(1, block + 2):
            target, draft, spec = proposing(pairs[P % 2], proposer, drafting)
            kw = dict(block=block, steps=steps, strategy=strategy, threshold=0.6)
            want, alone = sdar.generate(target, prompt(P, P), 2 * block + 1, **kw)
            got, stats, _ = run(target, draft, prompt(P, P), 2 * block + 1,
                                lookahead=L or 1 + P % most, **kw, **spec)
            assert got == want, (steps, strategy, L, P)
            assert stats.forwards <= alone.forwards and stats.steps >= stats.forwards
            assert stats.draft_forwards == 0 or draft is not None
            matched += stats.matched
    assert matched > 0  # chains went past a first step


@pytest.mark.parametrize("proposer,drafting", PROPOSERS)
def test_lossless_greedy_stops_and_short_answers(proposer, drafting, pairs, prompt):
    """A stop token inside the first block, and max_new_tokens below one block, as the target alone,
    for every proposer."""
    target, draft, kw = proposing(pairs[0], proposer, drafting)
    for P in (3, 4, 5):
        free, _ = sdar.generate(target, prompt(P, P), 12, block=4)
        stop = free[1]
        want, _ = sdar.generate(target, prompt(P, P), 12, block=4, stop_ids=(stop,))
        got, _, seen = run(target, draft, prompt(P, P), 12, block=4, stop_ids=(stop,), lookahead=2,
                           **kw)
        assert got == want == free[:free.index(stop)] and sum((i["new"] for i in seen), []) == got
        for n in (1, 2, 3):
            assert run(target, draft, prompt(P, P), n, block=4, **kw)[0] == free[:n]


def test_lossless_greedy_on_the_toy_pairs():
    """The trained toy pairs (both drafts, lookahead 1 and 2) on 6 held-out prompts per task return
    the toy target's own output, static and dynamic (measured: verify="exact" at lookahead 2
    differs in 22 of these 48 decodes). Needs the toys that train_tiny.py writes."""
    import train_tiny
    if not all(train_tiny.complete(f) for t in train_tiny.TASKS
               for f in train_tiny.folders(t).values()):
        pytest.skip("needs the toy models in out/; python train_tiny.py (or python decode.py) "
                    "trains them")
    for task in train_tiny.TASKS:
        folders = train_tiny.folders(task)
        target, tok = checkpoint.load(folders["target"]), checkpoint.load_tokenizer(folders["target"])
        drafts = [checkpoint.load(folders[d]) for d in train_tiny.DRAFTS]
        for text, _ in train_tiny.examples(6, "heldout", task=task):
            ids = tok.chat(text)
            for strategy in ("static", "dynamic"):
                kw = dict(block=4, strategy=strategy, stop_ids=tok.stop_ids)
                want, _ = sdar.generate(target, ids, 48, **kw)
                for draft, L in itertools.product(drafts, (1, 2)):
                    got, _ = speculative.generate(target, draft, ids, 48, lookahead=L, **kw)
                    assert got == want, (task, text, strategy, L)


def test_a_draft_equal_to_the_target_commits_every_proposed_step(random_model, prompt):
    """Draft = target: every proposed step is matched. Lossless, one target forward commits the
    L - 1 blocks drafted and the first step of the next (its all-masked state, after a clean copy
    of the block before): B (L - 1) tokens a forward once the blocks are under way; the paper's
    exact verification commits the L blocks drafted."""
    m = random_model(3, 2)
    want = sdar.generate(m, prompt(8), 36, block=4)[0]
    for L, verify in itertools.product((1, 2, 3), ("lossless", "exact")):
        out, stats, seen = run(m, m, prompt(8), 36, block=4, lookahead=L, verify=verify,
                               proposer="draft", drafting="step")
        assert out == want
        assert stats.accepted == stats.drafted and stats.draft_matched == stats.matched
        per_forward = 4 * (L - 1) if verify == "lossless" and L > 1 else 4 * L
        assert stats.tokens / stats.forwards >= 0.9 * per_forward  # the prompt is aligned
        if verify == "lossless" and L > 1:  # a step from each all-masked next block, unproposed
            assert stats.steps - stats.forwards <= stats.matched < stats.steps
        else:
            assert stats.matched == stats.steps


# ----------------------------------------------------------------------------- lossless, sampled

def chi_square_sf(x, dof):
    """P(chi-square with dof degrees of freedom > x): the regularised upper incomplete gamma."""
    a, x = dof / 2, x / 2
    if x < a + 1:  # series for the lower part
        term = total = 1 / a
        n = 1
        while term > 1e-15 * total:
            term *= x / (a + n)
            total += term
            n += 1
        return 1 - total * math.exp(-x + a * math.log(x) - math.lgamma(a))
    b, c, d = x + 1 - a, 1e300, 1 / (x + 1 - a)  # continued fraction for the upper part
    h = d
    for i in range(1, 300):
        an = -i * (i - a)
        b += 2
        d = 1 / (an * d + b)
        c = b + an / c
        h *= d * c
    return math.exp(-x + a * math.log(x) - math.lgamma(a)) * h


def p_value(probs, samples):
    """Chi-square goodness of fit of samples to {outcome: probability}; outcomes expected fewer than
    five times are pooled into one cell."""
    n, counts = len(samples), collections.Counter(samples)
    rare = [o for o in probs if probs[o] * n < 5]
    cells = [([o], probs[o]) for o in probs if o not in rare] + [(rare, sum(probs[o] for o in rare))]
    stat = dof = 0
    for outcomes, p in cells:
        if p * n >= 5:
            stat += (sum(counts[o] for o in outcomes) - p * n) ** 2 / (p * n)
            dof += 1
    return chi_square_sf(stat, dof - 1)


@torch.no_grad()
def enumerate_decoding(m, prompt_ids, n, block, strategy, threshold, sampling):
    """The exact distribution of the target's own sampled block decoding of n tokens, by walking
    every path: at each state a separate no-cache forward, every combination of picks at the masked
    positions (each with the product of its probabilities), and SDAR's rule on them."""
    mask_id, V = m.config.mask_token_id, m.config.vocab_size
    aligned = len(prompt_ids) - len(prompt_ids) % block
    tail = prompt_ids[aligned:]
    out = collections.defaultdict(float)

    def walk(done, state, steps, prob):  # done: the finished blocks (the tail's included)
        todo = [i for i, x in enumerate(state) if x == mask_id]
        if not todo:
            done = done + state
            if len(done) - len(tail) >= n:
                out[tuple(done[len(tail):len(tail) + n])] += prob
            else:
                walk(done, [mask_id] * block, 0, prob)
            return
        seq = torch.tensor(prompt_ids[:aligned] + done + state)
        logits = m(seq[None], torch.arange(len(seq)), masks.block_causal(len(seq), block))[0]
        q = sampling.distribution(logits[-block:], suppress=mask_id)
        masked = torch.tensor([x == mask_id for x in state])
        for picks in itertools.product(range(V - 1), repeat=len(todo)):
            y = torch.tensor(state)
            y[todo] = torch.tensor(picks)
            p = prob * math.prod(q[i, t].item() for i, t in zip(todo, picks))
            revealed = sdar.reveal(q, y, masked, sdar.quota(steps, block, block), strategy,
                                     threshold).tolist()
            new = [int(y[i]) if revealed[i] else state[i] for i in range(block)]
            walk(done, new, steps + 1, p)

    walk([], tail + [mask_id] * (block - len(tail)), 0, 1.0)
    return dict(out)


@pytest.fixture(scope="module")
def tiny_pair(random_model):
    """A 4-token vocabulary (3 tokens and the mask): a target and a noisy-copy draft."""
    target = random_model(2, 1, vocab=4, sharpen=2.0)
    return target, noisy_copy(target, 0.5, 3)


@pytest.fixture(scope="module")
def flat_pair(random_model):
    """As tiny_pair, flatter (confidences near 0.4): many outputs are likely, so the test has power."""
    target = random_model(2, 1, vocab=4, sharpen=0.5)
    return target, noisy_copy(target, 0.5, 3)


# (strategy, sampling, lookahead, proposer, drafting, block): two blocks of 2 after a one-token tail,
# or one block of 3 (where the target's own chains have two states: the draft's three); the cases
# of the draft proposing step by step on tiny_pair (threshold 0.6), the others on flat_pair (0.4)
SAMPLED_CASES = [("static", sdar.Sampling(1.0), 1, "draft", "step", 2),
                 ("dynamic", sdar.Sampling(1.0, top_p=0.9), 2, "draft", "step", 2),
                 ("static", sdar.Sampling(0.8, top_k=2), 3, "draft", "step", 2),
                 ("static", sdar.Sampling(1.0), 2, "draft", "block", 3),
                 ("static", sdar.Sampling(1.0), 1, "self", None, 3),
                 ("dynamic", sdar.Sampling(1.0, top_p=0.9), 2, "self", None, 2),
                 ("static", sdar.Sampling(1.0, top_p=0.9), 1, "hybrid", "step", 3),
                 ("dynamic", sdar.Sampling(1.0, top_p=0.9), 2, "hybrid", "block", 3)]
SETUPS = {2: ([1, 2, 0], 3), 3: ([1, 2, 0], 3)}  # block: (prompt, new tokens)


def sampled_outputs(pair, threshold, proposer, drafting, strategy, sampling, lookahead, block,
                    n_samples=600):
    """The outputs of n_samples sampled decodes of speculative.generate."""
    target, draft, spec = proposing(pair, proposer, drafting)
    prompt_ids, n = SETUPS[block]
    g = torch.Generator().manual_seed(0)
    kw = dict(block=block, strategy=strategy, threshold=threshold, sampling=sampling, generator=g)
    return [tuple(speculative.generate(target, draft, prompt_ids, n, lookahead=lookahead, **kw,
                                       **spec)[0]) for _ in range(n_samples)]


@pytest.mark.parametrize("strategy,sampling,lookahead,proposer,drafting,block", SAMPLED_CASES)
def test_lossless_sampling_follows_the_targets_distribution(strategy, sampling, lookahead, proposer,
                                                             drafting, block, tiny_pair, flat_pair):
    """End to end, every proposer: 600 outputs of speculative.generate against the exact
    distribution of the target's own sampled decoding, enumerated. The test fails when the
    chi-square p-value is below 1e-5: falsely, once in 100,000 seeds (eight cases: once in 12,500
    runs of the suite)."""
    pair, threshold = (tiny_pair, 0.6) if drafting == "step" and proposer == "draft" else (flat_pair, 0.4)
    prompt_ids, n = SETUPS[block]
    exact = enumerate_decoding(pair[0], prompt_ids, n, block, strategy, threshold, sampling)
    samples = sampled_outputs(pair, threshold, proposer, drafting, strategy, sampling, lookahead, block)
    assert p_value(exact, samples) > 1e-5


def test_the_sampled_test_detects_a_draw_reused_across_states(flat_pair, monkeypatch):
    """The same test fails when the target's own chain reuses each position's draw at every state
    instead of drawing afresh: the chain revealed the most confident draws first, so a draw still
    masked at a later state is a selected one, not a draw from the proposal, and rejection sampling
    against it is biased."""
    real = sdar.Sampling.pick
    first = {}

    def reused(self, probs, generator=None):  # the first draw from these distributions, kept
        return first.setdefault(id(probs), real(self, probs, generator))
    monkeypatch.setattr(sdar.Sampling, "pick", reused)
    prompt_ids, n = SETUPS[3]
    exact = enumerate_decoding(flat_pair[0], prompt_ids, n, 3, "static", 0.4, SAMPLED)
    samples = sampled_outputs(flat_pair, 0.4, "self", None, "static", SAMPLED, 1, 3)
    assert p_value(exact, samples) < 1e-5


def test_the_sampled_test_detects_the_papers_bias(tiny_pair):
    """The same test on the paper's rule (exact verification, draft-step order) fails: the draft picks
    which positions to reveal by its own sampled tokens, so its tokens are not distributed as p."""
    target, draft = tiny_pair
    prompt_ids, n, block = [1, 2, 0], 3, 2
    exact = enumerate_decoding(target, prompt_ids, n, block, "static", 0.6, SAMPLED)
    g = torch.Generator().manual_seed(0)
    samples = [tuple(speculative.generate(target, draft, prompt_ids, n, block=block, verify="exact",
                                          sampling=SAMPLED, generator=g)[0]) for _ in range(600)]
    assert p_value(exact, samples) < 1e-5


def test_enumeration_matches_the_target_alone(tiny_pair):
    """The reference itself: sdar.generate's own samples follow the enumerated distribution."""
    target, _ = tiny_pair
    exact = enumerate_decoding(target, [1, 2, 0], 3, 2, "static", 0.6, SAMPLED)
    assert sum(exact.values()) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(1)
    samples = [tuple(sdar.generate(target, [1, 2, 0], 3, block=2, sampling=SAMPLED, generator=g)[0])
               for _ in range(600)]
    assert p_value(exact, samples) > 1e-5


# ----------------------------------------------------------------------------- SpecDiff: an AR target

@pytest.fixture
def ar_target(random_model, favour):
    """ar_target(seed): a random autoregressive target that leans to token 7, as the draft does."""
    return lambda seed, **kw: favour(random_model(seed, 2, model_type="qwen3", sharpen=6.0, **kw), 6.0)


@pytest.mark.parametrize("block", [1, 2, 4])
def test_specdiff_greedy_is_the_ar_targets_greedy(block, ar_target, random_model, favour, prompt):
    """For a draft that disagrees (rejections, whole runs and bonuses all happen), every prompt
    alignment, lookahead 1-3, with and without a stop token."""
    draft = favour(random_model(1, 1), 17.0)
    fates = collections.Counter()
    for seed in (0, 1):
        target = ar_target(seed)
        for P in range(1, block + 3):
            want, _ = sdar.generate_ar(target, prompt(P, P), 3 * block + 1)
            got, stats, seen = run(target, draft, prompt(P, P), 3 * block + 1, block=block,
                                   lookahead=1 + P % 3)
            assert got == want, (seed, P)
            fates.update(f for info in seen for row in info["fate"] for f in row)
            stop = want[len(want) // 2]
            cut, _, _ = run(target, draft, prompt(P, P), 3 * block + 1, block=block, stop_ids=(stop,))
            assert cut == want[:want.index(stop)]
    assert fates[1] > 0 and fates[2] > 0 and fates[3] > 0, fates  # accepted, the target's, dropped


@torch.no_grad()
def enumerate_ar(m, prompt_ids, n, sampling):
    """The exact distribution of n tokens of the AR target's own sampling: every sequence, with the
    product of its next-token probabilities from separate causal forwards."""
    out = {}

    def walk(seq, prob):
        if len(seq) == len(prompt_ids) + n:
            out[tuple(seq[len(prompt_ids):])] = prob
            return
        x = torch.tensor(seq)
        logits = m(x[None], torch.arange(len(x)), masks.block_causal(len(x), 1))[0, -1]
        q = sampling.distribution(logits)
        for token in range(len(q)):
            if q[token] > 0:
                walk(seq + [token], prob * q[token].item())

    walk(list(prompt_ids), 1.0)
    return out


@pytest.mark.parametrize("lookahead", [1, 2])
def test_specdiff_sampling_follows_the_ar_targets_distribution(lookahead, random_model, favour):
    """600 outputs of sampled SpecDiff (the draft reveals the leftmost positions first) against the
    exact distribution of the AR target's sampling, itself checked against sdar.generate_ar's
    samples; each test fails falsely once in 100,000 seeds (p < 1e-5)."""
    target = favour(random_model(4, 1, model_type="qwen3", vocab=4, sharpen=2.0), -1e4, token=3)
    draft = random_model(5, 1, vocab=4, sharpen=2.0)  # id 3 is its mask, which the target never says
    exact = enumerate_ar(target, [1, 0, 2], 3, SAMPLED)
    g = torch.Generator().manual_seed(0)
    samples = [tuple(speculative.generate(target, draft, [1, 0, 2], 3, block=2, lookahead=lookahead,
                                          sampling=SAMPLED, generator=g)[0]) for _ in range(600)]
    assert p_value(exact, samples) > 1e-5
    if lookahead == 1:  # the reference itself
        alone = [tuple(sdar.generate_ar(target, [1, 0, 2], 3, sampling=SAMPLED, generator=g)[0])
                 for _ in range(600)]
        assert p_value(exact, alone) > 1e-5


# ----------------------------------------------------------------------------- caches

def assert_cache_is_the_oracle(m, cache, tokens, block, row=0):
    """A cache row's committed keys and values equal one block-causal prefill of its committed
    tokens."""
    n = cache.lens[row]
    oracle = model.KVCache(m.config, n, 1, "cpu", torch.float32)
    sdar.prefill(m, torch.tensor(tokens[:n]), oracle, block)
    torch.testing.assert_close(cache.k[:, row:row + 1, :, :n], oracle.k, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cache.v[:, row:row + 1, :, :n], oracle.v, rtol=1e-4, atol=1e-5)


@pytest.fixture
def made_caches(monkeypatch):
    """Every (model, KV cache) that model.Transformer.new_cache makes while the test runs."""
    made, real = [], model.Transformer.new_cache

    def new_cache(self, max_len, batch_size=1):
        made.append((self, real(self, max_len, batch_size)))
        return made[-1][1]
    monkeypatch.setattr(model.Transformer, "new_cache", new_cache)
    return made


CACHE_MODES = {"lossless, draft": dict(proposer="draft", drafting="step"),
               "lossless, hybrid": dict(proposer="hybrid", drafting="block"),
               "lossless, self": {}, "exact": dict(verify="exact"), "simsd": dict(verify="simsd"),
               "ar": {}}


@pytest.mark.parametrize("mode", CACHE_MODES)
def test_caches_equal_the_oracle_after_every_iteration(mode, monkeypatch, pairs, ar_target, prompt):
    """After every iteration's commit, each cache holds exactly what a fresh prefill of the
    committed tokens computes: whole blocks for the draft and a diffusion target, every token but
    the newest for an AR target; also after later proposed blocks were rolled back, after blocks
    accepted whole were kept from the verifying forward's clean copies (moved into place: in the
    layout other copies lie before them), and at block 1, where a bonus fills the next block."""
    rolled_back = stored = checked = 0
    real = speculative.commit

    def commit(run, verdict):
        nonlocal checked
        new, n_new = real(run, verdict)
        row, block = run.batch.rows[0], run.settings.block
        committed = prompt_ids + row.out + new[0, :int(n_new[0])].tolist()
        if run.draft_cache is not None:
            length = int(run.draft_cache.lens[0])
            assert length % block == 0 and length <= len(committed)
            assert_cache_is_the_oracle(run.draft, run.draft_cache, committed, block)
        if mode == "ar":
            assert int(run.target_cache.lens[0]) == len(committed) - 1
            assert_cache_is_the_oracle(run.target, run.target_cache, committed, 1)
        else:
            assert_cache_is_the_oracle(run.target, run.target_cache, committed, block)
        checked += 1
        return new, n_new
    monkeypatch.setattr(speculative, "commit", commit)

    def count(info):
        nonlocal rolled_back, stored
        rolled_back += sum(3 in row for row in info["fate"][1:])  # a later block dropped
        stored += len(info["stored"]) > 0
    for block, lookahead, P in ((1, 2, 3), (2, 3, 5), (4, 2, 6), (4, 3, 7), (2, 3, 4), (4, 3, 8)):
        target, draft = pairs[P % 2]  # the noisy copy proposes long chains, the other rarely
        target = ar_target(0) if mode == "ar" else target
        draft = None if mode == "lossless, self" else draft
        prompt_ids = prompt(P, P)
        if mode == "lossless, self" and lookahead > 2:
            continue
        speculative.generate(target, draft, prompt_ids, 6 * block, block=block,
                             lookahead=lookahead, on_iteration=count, **CACHE_MODES[mode])
    assert checked > 10
    assert rolled_back > 0 or draft is None
    assert stored > 0 or mode == "ar"  # every stored clean copy was moved into place


# ----------------------------------------------------------------------------- the layouts

def verified(target, draft, prompt_ids, lookahead, verify, proposer="draft", block=4):
    """The proposals for lookahead blocks after prompt_ids as the verifier lays them out (a
    hybrid's target chain from its own distributions at the first state, computed apart): the
    tree of states laid out (its alive nodes: states, parents, blocks, arrivals, as lists), the
    target's logits at the tokens that verify them, from one forward on the verifier's layout,
    and the chains."""
    s = sdar.Settings(32, block, verify=verify, lookahead=lookahead, proposer=proposer,
                      drafting="step")
    mode = sdar.mode_of(target, draft, verify)
    s = replace(s.resolve(mode), mask_id=target.config.mask_token_id)
    run_ = speculative.start(target, draft, [torch.tensor(prompt_ids)], s, mode, None, None)
    if proposer == "hybrid":  # propose again, from the target's own distributions
        aligned = len(prompt_ids) - len(prompt_ids) % block
        seq = torch.tensor(prompt_ids[:aligned] + run_.rows.x[0].tolist())
        logits = target(seq[None], torch.arange(len(seq)), masks.block_causal(len(seq), block))[0]
        run_.rows.hint = sdar.GREEDY.distribution(logits[-block:], suppress=s.mask_id)[None]
        run_.rows.has_hint = torch.ones(1, dtype=torch.bool)
        run_.draft_cache.rewind(run_.marks)
        speculative.propose(run_)
    if run_.trie is not None:  # the host learns the trees' shapes, as after a readback
        seen = verifier.readback(**speculative.shape_of(run_))
        run_.keys = run_.trie.keys(seen["pending"], run_.rows.pending.tokens.shape[1], block, seen)
    laid = run_.verifier.layout(run_, run_.chains)
    with torch.no_grad():
        logits = target(laid.ids, laid.pos, laid.mask, run_.target_cache)[0, laid.verifying[0]]
    tree = laid.nodes
    if tree is None:  # the paper's own layout: no tree of states
        return None, logits, run_.chains
    n = int(tree.alive[0].sum())
    nodes = SimpleNamespace(states=tree.states[0, :n].tolist(), parent=tree.parent[0, :n].tolist(),
                            block=tree.block[0, :n].tolist(), arrival=tree.arrival[0, :n].tolist())
    return nodes, logits, run_.chains


@torch.no_grad()
@pytest.mark.parametrize("verify,proposer", [("exact", "draft"), ("lossless", "draft"),
                                             ("lossless", "hybrid")])
def test_every_proposed_state_equals_a_separate_forward(verify, proposer, pairs, prompt):
    """Every state of the tree (lookahead 3; the paper's chain, the lossless one with its
    all-masked next block, a trie of the draft's and the target's chains): the target's logits
    equal a separate no-cache forward on the whole sequence in that state, the blocks before it
    as proposed on its path."""
    target, draft = pairs[1]
    mask_id, branched = target.config.mask_token_id, 0
    for P in (5, 8):
        prompt_ids = prompt(P, P)
        tree, logits, _ = verified(target, draft, prompt_ids, 3, verify, proposer)
        for n, state in enumerate(tree.states):
            before, m = [], n
            while m != 0:  # the clean copies of the path's blocks
                if tree.block[m] > tree.block[tree.parent[m]]:
                    before = tree.arrival[m] + before
                m = tree.parent[m]
            seq = torch.tensor(prompt_ids[:P - P % 4] + before + state)
            want = target(seq[None], torch.arange(len(seq)), masks.block_causal(len(seq), 4))[0]
            torch.testing.assert_close(logits[4 * n:4 * n + 4], want[-4:], rtol=1e-4, atol=1e-4)
        assert mask_id in tree.states[-1]
        branched += len(set(tree.parent[1:])) < len(tree.parent[1:])
    assert branched == (proposer == "hybrid") * 2  # the two chains part: a trie, not a chain


@torch.no_grad()
def test_simsd_equals_exact_in_one_layer_and_differs_deeper(random_model, prompt, report):
    """The paper's layout gives each drafted position, of every proposed block, the exact layout's
    logits when the target has one layer; deeper, mask tokens see later reveals through each other,
    and the logits differ."""
    draft = random_model(1, 1)
    for layers in (1, 2):
        target = random_model(7, layers)
        worst = 0.0
        for P in (5, 6):
            _, simsd, chains = verified(target, draft, prompt(P, P), 3, "simsd")
            _, exact, _ = verified(target, draft, prompt(P, P), 3, "exact")
            chain, offset = chains[verifier.DRAFT], 0
            for j, steps in enumerate(chain.step[0].tolist()):
                for i, t in enumerate(steps):
                    if t > 0:
                        a, b = simsd[4 * j + i], exact[(offset + t - 1) * 4 + i]
                        worst = max(worst, (a - b).abs().max().item())
                offset += int(chain.real[0, j].sum())
        report(f"simsd vs exact layout logits, {layers} layer(s): max |diff| = {worst:.3g}")
        assert worst < 1e-4 if layers == 1 else worst > 1e-3


# ----------------------------------------------------------------------------- the paper's rules

@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_engine_decodes_the_papers_method_as_simsd_py_does(temperature, pairs, prompt):
    """simsd.py, the paper's method alone at batch 1, is the reference: speculative.generate with
    verify="simsd" and lookahead 1 returns its tokens, for drafts that disagree, every prompt
    alignment, blocks 2 and 4, static and dynamic, draft-step and position order, with a stop
    token; greedy, and sampled from the same seed (the same draws in the same order)."""
    sampling, checked = sdar.Sampling(temperature), 0
    cases = itertools.product(pairs, range(1, 9), (2, 4), ("static", "dynamic"), ("step", "position"))
    for (target, draft), P, block, strategy, order in cases:
        kw = dict(block=block, strategy=strategy, threshold=0.5, sampling=sampling, stop_ids=(5,))
        want, _ = simsd.generate(target, draft, prompt(P, P), 11, order=order,
                                 generator=torch.Generator().manual_seed(P), **kw)
        got, _ = speculative.generate(target, draft, prompt(P, P), 11, verify="simsd", accept=order,
                                      lookahead=1, generator=torch.Generator().manual_seed(P), **kw)
        assert got == want, (P, block, strategy, order)
        checked += len(want)
    assert checked > 1000


def test_the_trie_shares_the_chains_prefix_only():
    """Two chains equal at their first state, different at the second and equal again at the third
    (the same block, revealed in two orders, then the next block's all-masked state after it)
    share their first state only: the trie holds 3 + 2 states, the second chain's hanging from
    the root. Counting every equal state instead of the shared prefix would merge the third."""
    M = 9

    def chain(step, second):
        states = torch.tensor([[[[M, M], second]]])  # (R, D, S, B): the state before each step
        return verifier.Chain(torch.tensor([[[1, 2]]]), torch.tensor([[step]]), states,
                              torch.zeros(1, 1, 2, 2, dtype=torch.long), None,
                              torch.ones(1, 1, 2, dtype=torch.bool), torch.ones(1, dtype=torch.bool))
    rows = SimpleNamespace(done=torch.zeros(1, dtype=torch.long), has_hint=torch.ones(1, dtype=torch.bool))
    chains = {verifier.SELF: chain([1, 2], [1, M]), verifier.DRAFT: chain([2, 1], [M, 2])}
    trie = lossless.Lossless(sdar.Settings(mask_id=M)).trie(SimpleNamespace(rows=rows), chains)
    alive = trie.alive[0]
    assert trie.states[0][alive].tolist() == [[M, M], [1, M], [M, M], [M, 2], [M, M]]
    places = alive.long().cumsum(0) - 1  # the parents among the alive nodes
    assert places[trie.parent[0][alive]].tolist() == [0, 0, 1, 0, 3]
    assert trie.block[0][alive].tolist() == [0, 0, 1, 0, 1]




def temporally_valid(info):
    """Every committed drafted token was judged in a state that exists: every position revealed
    before it, and every earlier proposed block, committed as drafted."""
    earlier_whole = True
    for steps, fate in zip(info["steps"], info["fate"]):
        for i, (t, f) in enumerate(zip(steps, fate)):
            if f in (1, 2):
                before = [fate[k] for k in range(len(steps)) if 0 < steps[k] < t]
                if not earlier_whole or any(b != 1 for b in before):
                    return False
        earlier_whole = earlier_whole and all(f in (0, 1) for f in fate)
    return True


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_step_order_is_temporally_valid_and_position_order_is_not(temperature, pairs, prompt):
    """Drafts that disagree, lookahead 1 and 2: draft-step order never commits a token judged in a
    context that does not exist; position order does (so the check can fail)."""
    invalid, rejected = {"step": 0, "position": 0}, 0
    for accept, (target, draft), P, strategy in itertools.product(invalid, pairs, (3, 4), ("static", "dynamic")):
        _, stats, seen = run(target, draft, prompt(P, P), 16, block=4, verify="simsd", accept=accept,
                             strategy=strategy, threshold=0.5, lookahead=1 + P % 2,
                             sampling=sdar.Sampling(temperature),
                             generator=torch.Generator().manual_seed(P))
        invalid[accept] += sum(not temporally_valid(info) for info in seen)
        rejected += sum(f == 2 for info in seen for row in info["fate"] for f in row)
    assert invalid["step"] == 0 and invalid["position"] > 0 and rejected > 0, invalid


@torch.no_grad()
def replay(target, prefix, info, block):
    """Each committed token of one iteration equals the target's argmax (mask excluded) on the
    committed state before its step, by a separate no-cache forward. Returns the tokens checked."""
    mask_id, before, checked = target.config.mask_token_id, list(prefix), 0
    for steps, fate, after in zip(info["steps"], info["fate"], info["tokens"]):
        known = [f == 0 and t != mask_id for f, t in zip(fate, after)]
        for s in sorted({t for t, f in zip(steps, fate) if t > 0 and f in (1, 2)}):
            state = [after[i] if known[i] or 0 < steps[i] < s else mask_id for i in range(block)]
            seq = torch.tensor(before + state)
            logits = target(seq[None], torch.arange(len(seq)), masks.block_causal(len(seq), block))
            logits = logits[0, -block:].index_fill(-1, torch.tensor([mask_id]), -math.inf)
            for i in range(block):
                if steps[i] == s and fate[i] in (1, 2):
                    assert after[i] == int(logits[i].argmax()), (info, s, i)
                    checked += 1
        before += after
    return checked


@pytest.mark.parametrize("strategy", ["static", "dynamic"])
def test_exact_greedy_commits_the_targets_argmax_along_the_drafts_order(strategy, pairs, prompt):
    """Exact verification, greedy, drafts that disagree, lookahead 1 and 2: a replay of every
    iteration with separate target forwards."""
    checked = 0
    for (target, draft), P in itertools.product(pairs, range(1, 6)):
        committed = prompt(P, P)

        def check(info):
            nonlocal checked
            checked += replay(target, committed[:info["starts"][0]], info, 4)
            committed.extend(info["new"])
        speculative.generate(target, draft, prompt(P, P), 12, block=4, verify="exact", strategy=strategy,
                             threshold=0.5, lookahead=1 + P % 2, on_iteration=check)
    assert checked > 0


def brute_judge(d, p, q, greedy, u, g, stop_ids, eos_min_prob):
    """judge() read literally, one row at a time, on the same uniforms: u (r,) judge the rows, g (r, V)
    are the uniforms of the replacement draws (an exponential race)."""
    tokens, ok = [], []
    for i in range(len(d)):
        qi, pi = q[i], p[i]
        ok.append(qi.index(max(qi)) == d[i] if greedy else u[i] * pi[d[i]] < qi[d[i]])
        gated = [0.0 if v in stop_ids and eos_min_prob > 0 and qi[v] < eos_min_prob else qi[v]
                 for v in range(len(qi))]
        gated = gated if sum(gated) > 0 else qi
        residual = gated if greedy else [max(a - b, 0.0) for a, b in zip(gated, pi)]
        residual = residual if sum(residual) > 0 else gated
        if greedy:
            new = residual.index(max(residual))
        else:  # an exponential race: the largest weight over its Exp(1) draw
            keys = [w / -math.log1p(-min(x, 1 - 1e-7)) for w, x in zip(residual, g[i])]
            new = keys.index(max(keys))
        tokens.append(d[i] if ok[-1] else new)
    return tokens, ok


def brute_in_order(ok, order):
    committed = [False] * len(ok)
    for rank in sorted(set(order)):  # in time: commit a whole rank, stop after a rejection
        rows = [i for i in range(len(ok)) if order[i] == rank]
        for i in rows:
            committed[i] = True
        if not all(ok[i] for i in rows):
            break
    return committed


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_judge_and_time_order_match_a_brute_force_loop(temperature):
    """Random rows with ties in time, EOS gates, greedy and sampled; the same uniform stream."""
    rng, sampling = random.Random(0), sdar.Sampling(temperature)
    for trial in range(200):
        r, V = rng.randint(1, 8), 6
        g = torch.Generator().manual_seed(trial)
        q = (torch.rand(r, V, generator=g) * 4).softmax(-1)
        p = (torch.rand(r, V, generator=g) * 4).softmax(-1)
        agree = torch.rand(r, generator=g) < 0.6
        d = torch.where(agree, q.argmax(-1), torch.multinomial(p, 1, generator=g)[:, 0])
        order = torch.tensor([rng.randint(1, r) for _ in range(r)])
        stops, gate = ((rng.randrange(V),), rng.choice([0.0, 0.3])) if rng.random() < 0.5 else ((), 0.0)
        tokens, ok = verifier.judge(d, p, q, sampling, torch.Generator().manual_seed(trial), stops, gate)
        uniforms = torch.Generator().manual_seed(trial)
        u = torch.rand(r, generator=uniforms).tolist() if temperature else []
        gum = torch.rand(r, V, generator=uniforms).tolist() if temperature else []
        want = brute_judge(d.tolist(), p.tolist(), q.tolist(), temperature == 0, u, gum, stops, gate)
        assert (tokens.tolist(), ok.tolist()) == want, trial
        assert verifier.in_time_order(ok, order).tolist() == brute_in_order(ok.tolist(), order.tolist())


P_DRAFT = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.1], [0.05, 0.05, 0.3, 0.3, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]])
Q_TARGET = torch.tensor([[0.1, 0.2, 0.3, 0.05, 0.35], [0.4, 0.1, 0.1, 0.3, 0.1], [0.05, 0.05, 0.6, 0.2, 0.1]])


def test_rejection_sampling_gives_each_row_its_target_distribution():
    """20,000 judgements of three rows whose drafted tokens are draws from p: every row's token is
    distributed as its q, whatever p is (three tests at p < 1e-6: a false failure in ~300,000)."""
    g = torch.Generator().manual_seed(1)
    N = 20000
    p, q = P_DRAFT.expand(N, 3, 5), Q_TARGET.expand(N, 3, 5)
    d = torch.multinomial(P_DRAFT, N, replacement=True, generator=g).T  # (N, 3)
    tokens, _ = verifier.judge(d, p, q, SAMPLED, g)
    for i in range(3):
        counts = torch.bincount(tokens[:, i], minlength=5).tolist()
        outcomes = {v: Q_TARGET[i, v].item() for v in range(5)}
        assert p_value(outcomes, [v for v in range(5) for _ in range(counts[v])]) > 1e-6


def test_the_eos_gate():
    """A stop token the target chooses below eos_min_prob is replaced; a confident one is kept."""
    STOP, d = 3, torch.tensor([0])
    q = torch.tensor([[0.05, 0.30, 0.20, 0.45]])  # the target prefers the stop token, at 0.45
    assert verifier.judge(d, q, q, sdar.GREEDY, None, (STOP,), 0.5)[0].tolist() == [1]
    assert verifier.judge(d, q, q, sdar.GREEDY, None, (STOP,), 0.4)[0].tolist() == [STOP]
    g, p = torch.Generator().manual_seed(0), torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    tokens, ok = verifier.judge(d.expand(400), p.expand(400, 4), q.expand(400, 4), SAMPLED, g, (STOP,), 0.5)
    assert STOP not in tokens[~ok].tolist() and {1, 2} <= set(tokens[~ok].tolist())


def test_options_are_checked_with_pythons_names(pairs, random_model):
    target, draft = pairs[1]
    ar = random_model(0, model_type="qwen3")
    cases = [(target, dict(verify="fast"), "verify must be 'lossless', 'exact' or 'simsd'"),
             (target, dict(verify="exact", accept="prefix"), "accept must be 'step' or 'position'"),
             (target, dict(accept="step"), "accept does not apply to lossless verification"),
             (target, dict(eos_min_prob=0.5), "eos_min_prob does not apply to lossless verification"),
             (target, dict(lookahead=0), "lookahead must be an integer >= 1"),
             (target, dict(steps=5), r"steps must be an integer from 1 to the block length \(4\)"),
             (ar, dict(verify="exact"), "verify does not apply to an autoregressive target"),
             (ar, dict(strategy="dynamic", sampling=SAMPLED), "strategy 'dynamic' drafts by the confidence of sampled"),
             (target, dict(proposer="both"), "proposer must be 'draft', 'self' or 'hybrid'"),
             (target, dict(proposer="self"), "proposes with the target alone; give no draft"),
             (target, dict(verify="exact", proposer="hybrid"), "proposer does not apply to the paper's"),
             (target, dict(drafting="once"), "drafting must be 'step' or 'block'")]
    alone = [(target, dict(proposer="hybrid"), "proposer does not apply to the target proposing for"),
             (target, dict(lookahead=3), "lookahead 1 or 2"),
             (target, dict(drafting="block"), "drafting does not apply to the target proposing for itself"),
             (target, dict(verify="simsd"), "judges a draft's tokens; the target proposing for itself is verified losslessly"),
             (ar, {}, "an autoregressive target needs a draft")]
    for (t, kw, message), d in [*zip(cases, itertools.repeat(draft)),
                                *zip(alone, itertools.repeat(None))]:
        with pytest.raises(ValueError, match=message):
            speculative.generate(t, d, [1, 2], 4, **kw)
    with pytest.raises(ValueError, match="cannot decode diffusion-style"):
        speculative.generate(draft, ar, [1, 2], 4)  # an AR draft


# ----------------------------------------------------------------------------- batches

@pytest.fixture(scope="module")
def varied_pairs(random_model):
    """(target, draft) pairs whose target says two tokens, each first at different places in
    different rows: a noisy copy and an unrelated draft."""
    target = random_model(5, 2)
    return [(target, noisy_copy(target, 0.3, 1)), (target, random_model(1, 1))]


BATCH_METHODS = {"lossless, draft": dict(proposer="draft", drafting="step"),
                 "lossless, draft, block": dict(proposer="draft", drafting="block"),
                 "lossless, hybrid": dict(proposer="hybrid"), "lossless, self": {},
                 "exact": dict(verify="exact"), "simsd": dict(verify="simsd"), "specdiff": {}}


@pytest.mark.parametrize("method", BATCH_METHODS)
@pytest.mark.parametrize("block", [2, 4, 8])
def test_every_row_of_a_batch_is_its_decode_alone(method, block, varied_pairs, ar_target, prompt,
                                                  varied_stop):
    """Prompts of every alignment in one batch, a stop token met at different times, static and
    dynamic, lookahead 1-3 (the target alone: 1-2; at block 8: 2), both drafts: each row of the
    batched decode equals its own decode alone, token for token, for every method; lossless rows
    equal the target alone."""
    n, spec = 2 * block + 3, BATCH_METHODS[method]
    prompts = [prompt(P, P) for P in range(1, 2 * block + 2, 1 if block < 8 else 3)]
    lookaheads = (2,) if block == 8 else (1, 2) if method == "lossless, self" else (1, 2, 3)
    for (target, draft), strategy, L in itertools.product(varied_pairs, ("static", "dynamic"),
                                                          lookaheads):
        target = ar_target(0) if method == "specdiff" else target
        draft = None if method == "lossless, self" else draft
        kw = dict(block=block, strategy=strategy, threshold=0.4, lookahead=L, **spec)
        alone = sdar.generate_ar if method == "specdiff" else sdar.generate
        rule = dict(block=block, strategy=strategy, threshold=0.4)
        stop = varied_stop([alone(target, p, n, **({} if method == "specdiff" else rule))[0]
                            for p in prompts], n)
        want = [speculative.generate(target, draft, p, n, stop_ids=(stop,), **kw)[0]
                for p in prompts]
        got, stats = speculative.generate(target, draft, prompts, n, stop_ids=(stop,), **kw)
        assert got == want, (strategy, L, stop)
        assert len(set(map(len, want))) > 1  # rows stopped at different times
        if method.startswith("lossless"):
            assert want == [alone(target, p, n, stop_ids=(stop,), **rule)[0] for p in prompts]


@pytest.mark.parametrize("mode", CACHE_MODES)
def test_batched_caches_equal_the_oracle_row_by_row(mode, monkeypatch, varied_pairs, ar_target,
                                                    prompt):
    """After every iteration of a batch (rows of different lengths, rows leaving as they finish),
    each cache row holds exactly what a fresh prefill of its row's committed tokens computes."""
    target, draft = varied_pairs[0]
    target = ar_target(0) if mode == "ar" else target
    draft = None if mode == "lossless, self" else draft
    prompts, real, checked = [prompt(P, P) for P in (3, 5, 6, 8, 9)], speculative.commit, []

    def commit(run, verdict):
        new, n_new = real(run, verdict)
        block = run.settings.block
        for r, row in enumerate(run.batch.rows):
            if row.finished:  # a dead row, until the batch drops it: it commits nothing
                continue
            committed = prompts[row.index] + row.out + new[r, :int(n_new[r])].tolist()
            if draft is not None:
                assert_cache_is_the_oracle(draft, run.draft_cache, committed, block, r)
            if mode == "ar":
                assert int(run.target_cache.lens[r]) == len(committed) - 1
            assert_cache_is_the_oracle(target, run.target_cache, committed,
                                       1 if mode == "ar" else block, r)
            checked.append(row.index)
        return new, n_new
    monkeypatch.setattr(speculative, "commit", commit)
    outs, _ = speculative.generate(target, draft, prompts, 17, block=4, lookahead=2,
                                   stop_ids=(53,), **CACHE_MODES[mode])
    assert set(checked) == set(range(len(prompts))) and len(set(map(len, outs))) > 1


@pytest.mark.parametrize("strategy,sampling,lookahead,proposer,drafting,block",
                         [SAMPLED_CASES[i] for i in (1, 4, 6, 7)])
def test_batched_sampling_follows_the_targets_distribution(strategy, sampling, lookahead, proposer,
                                                           drafting, block, tiny_pair, flat_pair):
    """The chi-square test on the rows of one batched decode: 600 rows of one prompt."""
    pair, threshold = (tiny_pair, 0.6) if drafting == "step" and proposer == "draft" else (flat_pair, 0.4)
    prompt_ids, n = SETUPS[block]
    target, draft, spec = proposing(pair, proposer, drafting)
    exact = enumerate_decoding(target, prompt_ids, n, block, strategy, threshold, sampling)
    outs, _ = speculative.generate(target, draft, [prompt_ids] * 600, n, lookahead=lookahead,
                                   block=block, strategy=strategy, threshold=threshold,
                                   sampling=sampling, generator=torch.Generator().manual_seed(0),
                                   **spec)
    assert p_value(exact, [tuple(out) for out in outs]) > 1e-5


def test_batched_sampling_alone_and_specdiff_follow_their_distributions(tiny_pair, random_model,
                                                                      favour):
    """The chi-square test on 600 rows of one batched decode of the target alone (against the
    enumeration), and of SpecDiff (against the AR target's enumeration)."""
    target = tiny_pair[0]
    exact = enumerate_decoding(target, [1, 2, 0], 3, 2, "static", 0.6, SAMPLED)
    outs, _ = sdar.generate(target, [[1, 2, 0]] * 600, 3, block=2, sampling=SAMPLED,
                              generator=torch.Generator().manual_seed(2))
    assert p_value(exact, [tuple(o) for o in outs]) > 1e-5
    ar = favour(random_model(4, 1, model_type="qwen3", vocab=4, sharpen=2.0), -1e4, token=3)
    draft = random_model(5, 1, vocab=4, sharpen=2.0)
    exact = enumerate_ar(ar, [1, 0, 2], 3, SAMPLED)
    outs, _ = speculative.generate(ar, draft, [[1, 0, 2]] * 600, 3, block=2, sampling=SAMPLED,
                                   generator=torch.Generator().manual_seed(3))
    assert p_value(exact, [tuple(o) for o in outs]) > 1e-5
