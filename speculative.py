"""Speculative decoding with block-diffusion proposals: SimSD for SDAR targets, SpecDiff for AR ones.

One iteration (`speculate`) reads propose -> layout -> target forward -> accept -> commit:
  1. propose - chains of states for the current block and the blocks after it, each made by
               SDAR's rule: by the draft (a forward per step, or one per block whose
               confidences the rule is applied to step after step), by the target itself (its
               logits from the forward that just ran, applied the same way: no forward at all),
               or by both, merged into a trie of distinct states;
  2. layout  - every proposed state laid out for one target forward (mask.tree);
  3. forward - the target's one forward;
  4. accept  - the target's verdict, in time order;
  5. commit  - committed tokens join their blocks, and each cache keeps what was committed.

A diffusion target verifies in one of three ways (`verify`):
  lossless - the target's own decoding. From each proposed state (one copy of the block per
             state) the target takes its own step: its pick at every masked position (argmax, or
             rejection sampling against a proposer's pick, a draw from the target either way)
             and SDAR's rule on them. The chain follows the child state equal to the target's
             step and stops where none is; the target's step from there is committed too. The
             output is decode.generate's (greedy: token for token; sampled: in distribution), and
             a target forward commits at least one step. After a proposed block ends, a clean copy
             of it and the next block's all-masked state give that block's first step, and the
             target's logits there propose the rest of it to the next forward.
  exact    - the paper's acceptance on the draft's copies: each drafted token is judged (argmax, or
             rejection sampling) in draft-step order. The draft chose which positions to reveal and
             when, so the output is not the target's own, and when sampling it is biased.
  simsd    - the paper's layout, one copy [block | masks] (mask.verify), and the same acceptance;
             deeper than one layer, a mask token also sees later reveals through other masks.
With exact and simsd, accept="position" (the paper's rule: the longest agreeing prefix in position
order) can commit tokens that were judged with a later-rejected token in place.

An autoregressive (Qwen3) target verifies causally (SpecDiff): one forward on [its newest committed
token | the drafted tokens, in position order] judges each drafted token by the logits before it;
the token at the first rejection, or after the last drafted one (a bonus), is the target's. The
output is the target's own, greedy and sampled (sampling drafts leftmost positions first).

Host syncs per iteration: one, the verdict's readback; one more when two proposers' chains are
merged (how long is their shared prefix?); one more per draft step when the draft refreshes
dynamically; and on CUDA two `synchronize` calls that time drafting for the stats.
"""
import functools
from collections import namedtuple
from dataclasses import dataclass

import torch

import decode
import mask as masks
from decode import GREEDY, Stats

LOOKAHEAD = 2  # blocks one target forward reaches by default (the README says why)
PROPOSER = "hybrid"  # who proposes to a lossless target with a draft (the README says why)
DRAFTING = "block"  # the draft's forwards: one per block, or one per step ("step")
DRAFT, SELF = 1, 2  # proposer flags


@dataclass
class Block:
    """The block being decoded at positions start..: its tokens (the mask id where unknown) and
    which are known; how many are unknown, the target steps taken on it, the tokens returned."""
    start: int
    tokens: torch.Tensor
    known: torch.Tensor
    masks: int
    done: int = 0
    returned: int = 0


@dataclass
class Proposal:
    """A block as a proposer decoded it: known (B,) before, the proposed tokens (B,), the step map
    (B,) (0 = known), the target steps taken on the block before (`done`), and at the state before
    each of its steps the pick at every position (S, B) and its distribution (S, B, V; None when
    greedy). All on the target's device."""
    start: int
    known: torch.Tensor
    tokens: torch.Tensor
    step: torch.Tensor
    done: int
    picks: torch.Tensor
    probs: torch.Tensor | None

    @property
    def steps(self):  # S: the proposer's steps on this block
        return len(self.picks)

    def masked(self):
        """(S, B): the masked positions of the state before each step (revealed at it or later)."""
        return self.step >= torch.arange(1, self.steps + 1, device=self.step.device)[:, None]

    def positions(self):
        return torch.arange(self.start, self.start + len(self.tokens), device=self.tokens.device)

    def at_own_step(self, x):
        """x (S, B, ...) -> (B, ...): each proposed position's row at the step that revealed it."""
        cols = torch.arange(len(self.step), device=x.device)
        return x[(self.step - 1).clamp(min=0), cols]


@dataclass
class Tree:
    """Proposed states as a trie, a node per distinct state, a parent before its children. states
    (N, B) (the mask id where masked); arrival (N, B): the state the parent's step must reach for
    the chain to enter the node (the node's own state; for the first state of a later block, the
    block before it complete, laid out as a clean copy); picks (N, B) and probs (N, B, V) the
    proposer's draws at the node (drawn False: none, a leaf the target alone decides); host lists:
    parent (-1: the root), block (0: the current one), done (target steps taken on the block
    before the state), by (proposer flags); chains: {flag: (its proposals, its node indices)}."""
    states: torch.Tensor
    arrival: torch.Tensor
    picks: torch.Tensor
    probs: torch.Tensor | None
    drawn: torch.Tensor
    parent: list
    block: list
    done: list
    by: list
    chains: dict

    def shape(self, n_pending, block):
        """What its layout takes from its shape alone (tree_shape)."""
        return tree_shape(tuple(self.parent), tuple(self.block), n_pending, block,
                          self.states.device)


Shape = namedtuple("Shape", "ancestors cleans attend positions")


@functools.lru_cache(maxsize=4096)
def tree_shape(parent, blocks, n_pending, block, device):
    """A tree layout's parts that depend on its shape alone, built once per shape (a decode meets
    a few dozen): ancestors (N, N) bool (node n is node m or descends from it); cleans, the nodes
    that start a later block than their parent's, each laid out after a clean copy of the block
    before it; the attention mask of [pending | clean copies | one copy per state]; and the
    positions, relative to the current block's start."""
    rows = []
    for n, p in enumerate(parent):
        row = list(rows[p]) if p >= 0 else [False] * len(parent)
        row[n] = True
        rows.append(row)
    ancestors = torch.tensor(rows, device=device)
    cleans = [n for n, p in enumerate(parent) if p >= 0 and blocks[n] > blocks[p]]
    whole = torch.ones(block, block, dtype=torch.bool, device=device)  # a copy sees itself whole
    attend = masks.tree([whole] * len(parent), n_pending, block, ancestors, cleans)
    first = block * torch.tensor(blocks, device=device)  # each state's first position
    offsets = torch.arange(block, device=device)
    positions = torch.cat([torch.arange(-n_pending, 0, device=device),
                           ((first[cleans] - block)[:, None] + offsets).flatten(),
                           (first[:, None] + offsets).flatten()])
    return Shape(ancestors, cleans, attend, positions)


@dataclass(frozen=True)
class Options:
    """One decode's settings, as options() checked them."""
    block: int
    steps: int
    strategy: str
    threshold: float
    sampling: decode.Sampling
    verify: str | None  # None: an AR target
    accept: str
    lookahead: int
    eos_min_prob: float
    stop_ids: tuple
    mask_id: int
    end: int  # the position after the last token max_new_tokens allows
    proposer: str  # "draft", "self" or "hybrid"
    drafting: str  # "step" or "block"


# What acceptance committed, as rows of B from the current block on: the tokens (the mask id where
# unknown), which are known after the commit, and for the chain shown (on_iteration) each
# position's fate: 0 known before or never proposed, 1 committed as proposed, 2 the target's own
# token, 3 proposed but not committed, with its proposed tokens and step map. Then per row the
# target steps taken and the steps taken on it after the commit (done); slots: the clean copies
# whose keys the target keeps; kept: the leading drafted blocks the draft keeps; matched: (steps
# committed as proposed, of them the draft's); hint: the target's distributions at the state its
# last step was taken from, when the block goes on; by: who proposed the chain shown.
Verdict = namedtuple("Verdict", "tokens known fate proposed steps taken done slots kept matched "
                     "hint by")


@dataclass
class Run:
    """One decode's state. tpending / dpending: completed blocks the target / the draft has not
    stored yet, fed in front of its next forward; target_pending: the AR target's newest token,
    which its cache lacks; hint: the target's distributions at the state its last committed step
    was taken from (B, V), which propose the rest of the block. The generator lives on the
    draft's device."""
    target: torch.nn.Module
    draft: torch.nn.Module | None
    tcache: object
    dcache: object
    block: Block
    tpending: torch.Tensor
    dpending: torch.Tensor
    target_pending: torch.Tensor
    hint: torch.Tensor | None
    generator: torch.Generator | None
    stats: Stats


# ----------------------------------------------------------------------------- one iteration

def speculate(run, opt):
    """One iteration: propose -> layout -> target forward -> accept -> commit. Returns the tokens
    it makes returnable (untrimmed) and what happened (on_iteration's info)."""
    B, dev = opt.block, run.block.tokens.device
    t0 = decode.sync(dev)
    # 1. propose: chains for the current block and, up to max_new_tokens, the blocks after it
    n_blocks = min(opt.lookahead, -(-(opt.end - run.block.start) // B))
    draft_len = run.dcache.len if run.dcache is not None else 0
    chains = propose(run, n_blocks, opt)
    t1 = decode.sync(dev)
    if opt.verify is None:  # an AR target
        # 2. layout, 3. the target's forward: its logits before each drafted token, and after
        ids, pos = causal_layout(chains[DRAFT], run.target_pending, run.block.masks)
        attend = masks.block_causal(len(ids), 1, device=dev)
        logits = run.target(ids[None], pos, attend, run.tcache)[0, len(run.target_pending) - 1:]
        # 4. accept, in position order
        verdict = accept_causal(chains[DRAFT], opt.sampling.distribution(logits), run, opt)
    else:
        # 2. layout, 3. the target's forward: its distributions at every verifying row
        tree = grow(chains, n_blocks, run.block, opt)
        ids, pos, attend, rows = layout(tree, run.tpending, run.block.start, opt)
        logits = run.target(ids[None], pos, attend, run.tcache)[0, rows]
        q = opt.sampling.distribution(logits.view(-1, B, logits.shape[-1]), suppress=opt.mask_id)
        # 4. accept: the target's own steps, or the paper's judgement of each drafted token
        accept = accept_lossless if opt.verify == "lossless" else accept_paper
        verdict = accept(tree, q, run, opt)
    # 5. commit: each cache keeps what was committed; the rest becomes pending
    start = run.block.start
    new = commit(run, verdict, draft_len, opt)
    count(run.stats, verdict, len(ids), t1 - t0)
    info = dict(starts=[start + j * B for j in range(len(verdict.tokens))], tokens=verdict.tokens,
                fate=verdict.fate, drafted=verdict.proposed, steps=verdict.steps,
                taken=verdict.taken, by=verdict.by)
    return new, info


# ----------------------------------------------------------------------------- 1. propose

def propose(run, n_blocks, opt):
    """{proposer flag: [Proposal per block from the current one]}: the target's own chain (from
    the logits of the state its last step was taken from: the rest of the current block) and the
    draft's. A lossless target reaches the last of n_blocks by its first state alone (grow)."""
    chains = {}
    if opt.proposer != "draft" and run.hint is not None:
        chains[SELF] = [self_proposal(run, opt)]
    if opt.proposer != "self":
        chains[DRAFT] = draft_proposals(run, n_blocks - (opt.verify == "lossless" and n_blocks > 1),
                                        opt)
    return chains


def self_proposal(run, opt):
    """The target's own chain for the rest of the current block: SDAR's rule applied step after
    step to its distributions at the state it last stepped from (run.hint), fresh picks at every
    state when sampling. No forward."""
    blk = run.block
    dev = run.generator.device if run.generator is not None else blk.tokens.device
    quotas = decode.schedule(blk.masks, opt.block, opt.steps, blk.done)
    d = decode.denoise(run.target, blk.tokens.to(dev), blk.known.to(dev), blk.start, quotas,
                       strategy=opt.strategy, threshold=opt.threshold, sampling=opt.sampling,
                       generator=run.generator, record=True, probs=run.hint.to(dev), refresh=False)
    back = blk.tokens.device
    probs = None if d.probs is None else d.probs.to(back)
    return Proposal(blk.start, blk.known, d.tokens.to(back), d.step.to(back), blk.done,
                    d.picks.to(back), probs)


def draft_proposals(run, n_blocks, opt):
    """Draft n_blocks: the rest of the current block by the target's rule, then whole blocks, each
    after storing the one before in the draft's cache (tentatively: commit() rewinds what the
    target does not commit). drafting "step": a forward per step; "block": one per block."""
    B, blk, ddev, dev = opt.block, run.block, decode.device_of(run.draft), run.block.tokens.device
    x, known, pending = blk.tokens.to(ddev), blk.known.to(ddev), run.dpending.to(ddev)
    masks_left, done = blk.masks, blk.done
    strategy = "left" if opt.verify is None and not opt.sampling.greedy else opt.strategy
    proposals = []
    for j in range(n_blocks):
        start = blk.start + j * B
        quotas = decode.schedule(masks_left, B, opt.steps, done)
        d = decode.denoise(run.draft, x, known, start, quotas, cache=run.dcache, pending=pending,
                           strategy=strategy, threshold=opt.threshold, sampling=opt.sampling,
                           generator=run.generator, record=True, refresh=opt.drafting == "step")
        run.stats.draft_forwards += d.forwards
        probs = None if d.probs is None else d.probs.to(dev)
        proposals.append(Proposal(start, known.to(dev), d.tokens.to(dev), d.step.to(dev), done,
                                  d.picks.to(dev), probs))
        pending, masks_left, done = d.tokens, B, 0
        x, known = torch.full_like(x, opt.mask_id), torch.zeros_like(known)
    return proposals


# ----------------------------------------------------------------------------- 2. layout

def chain(proposals, tail, opt):
    """One proposer's chain as a Tree: the state before each step of each proposed block, and
    with `tail` the all-masked state of the block after the last, which the target decides alone."""
    B, dev = opt.block, proposals[0].tokens.device
    states, arrival, block, done = [], [], [], []
    for j, p in enumerate(proposals):
        s = torch.where(p.masked(), opt.mask_id, p.tokens)  # (S, B)
        states.append(s)
        arrival.append(s if j == 0 else torch.cat([proposals[j - 1].tokens[None], s[1:]]))
        block += [j] * p.steps
        done += range(p.done, p.done + p.steps)
    picks = [p.picks for p in proposals]
    probs = None if proposals[0].probs is None else [p.probs for p in proposals]
    n = len(block)
    if tail:
        blank = torch.full((1, B), opt.mask_id, device=dev)
        states.append(blank)
        arrival.append(proposals[-1].tokens[None])
        picks.append(torch.zeros_like(blank))
        if probs is not None:
            probs.append(torch.zeros_like(probs[0][:1]))
        block.append(len(proposals))
        done.append(0)
    drawn = torch.arange(len(block), device=dev) < n
    probs = None if probs is None else torch.cat(probs)
    return Tree(torch.cat(states), torch.cat(arrival), torch.cat(picks), probs, drawn,
                list(range(-1, len(block) - 1)), block, done, [0] * len(block), {})


def root(blk, opt):
    """The Tree of the current block's state alone: the target takes its own step from it."""
    x = blk.tokens[None]
    return Tree(x, x, torch.zeros_like(x), None, torch.zeros(1, dtype=torch.bool,
                device=x.device), [-1], [0], [blk.done], [0], {})


def grow(chains, n_blocks, blk, opt):
    """The trie of the proposers' chains: they share the current block's state and their prefix
    of identical states (one host sync to find it), and part after it; with a lossless target,
    each chain ends in the all-masked state of the block after its last (tail), up to n_blocks.
    A state shared by both keeps the target's own draws."""
    trees = []
    for flag, proposals in chains.items():
        tail = opt.verify == "lossless" and len(proposals) < n_blocks
        t = chain(proposals, tail, opt)
        t.by = [flag] * len(t.by)
        t.chains = {flag: (proposals, list(range(len(t.by))))}
        trees.append(t)
    if not trees:
        return root(blk, opt)
    tree = trees[0]
    for other in trees[1:]:
        tree = merge(tree, other)
    return tree


def merge(a, b):
    """The trie of two chains from one root: b's nodes after their shared prefix hang from it."""
    m = min(len(a.block), len(b.block))
    same = (a.states[:m] == b.states[:m]).all(-1) & (a.arrival[:m] == b.arrival[:m]).all(-1)
    same &= torch.tensor([x == y for x, y in zip(a.block, b.block)], device=same.device)
    k = int(same.long().cumprod(0).sum())  # at least the root
    n = len(a.block)
    flag = b.by[0]
    probs = None if a.probs is None else torch.cat([a.probs, b.probs[k:]])
    parent = a.parent + [k - 1, *range(n, n + len(b.block) - k - 1)][:len(b.block) - k]
    by = [f | flag if i < k else f for i, f in enumerate(a.by)] + b.by[k:]
    chains = {**a.chains, flag: (b.chains[flag][0], list(range(k)) + list(
        range(n, n + len(b.block) - k)))}
    return Tree(torch.cat([a.states, b.states[k:]]), torch.cat([a.arrival, b.arrival[k:]]),
                torch.cat([a.picks, b.picks[k:]]), probs, torch.cat([a.drawn, b.drawn[k:]]),
                parent, a.block + b.block[k:], a.done + b.done[k:], by, chains)


def layout(tree, pending, start, opt):
    """One diffusion-target forward: [pending | clean copies | parts] (mask.tree). A clean copy is
    a proposed block, complete, as the chain to the state after it proposed it: that state is
    verified as if the block were stored. A part is one copy of the block per proposed state
    (lossless, exact), or per drafted block its tokens and one mask token per position (simsd:
    mask.verify). Returns ids, positions, the attention mask and the rows that verify."""
    B, P, dev = opt.block, len(pending), pending.device
    offsets = torch.arange(B, device=dev)
    before = torch.arange(start - P, start, device=dev)
    if opt.verify == "simsd":
        proposals = tree.chains[DRAFT][0]
        L = len(proposals)
        tokens = torch.stack([p.tokens for p in proposals])  # (L, B)
        pos = start + B * torch.arange(L, device=dev)[:, None] + offsets  # (L, B)
        parts = torch.stack([tokens, torch.full_like(tokens, opt.mask_id)], 1)  # (L, 2, B)
        ids = torch.cat([pending, tokens[:-1].flatten(), parts.flatten()])
        pos = torch.cat([before, pos[:-1].flatten(), pos.repeat_interleave(2, 0).flatten()])
        attend = masks.tree([masks.verify(p.step) for p in proposals], P, B,
                            torch.ones(L, L, dtype=torch.bool, device=dev).tril(), range(1, L))
        rows = P + (L - 1) * B + (torch.arange(L, device=dev)[:, None] * 2 * B + B + offsets)
        return ids, pos, attend, rows.flatten()
    shape = tree.shape(P, B)
    ids = torch.cat([pending, tree.arrival[shape.cleans].flatten(), tree.states.flatten()])
    return ids, shape.positions + start, shape.attend, slice(P + len(shape.cleans) * B, None)


def causal_layout(proposals, target_pending, n_masks):
    """An AR target's forward: [its pending token | every drafted token, in position order]. The
    current block's known tokens are a prefix (commits are prefixes), its drafted ones the rest."""
    B = len(proposals[0].tokens)
    drafted = torch.cat([p.tokens for p in proposals])[B - n_masks:]
    first = proposals[0].start + B - n_masks
    pos = torch.arange(first - len(target_pending), first + len(drafted), device=drafted.device)
    return torch.cat([target_pending, drafted]), pos


# ----------------------------------------------------------------------------- 4. accept

def draw(q, generator=None, device=None):
    """One draw per row of q (..., V), with uniforms from the generator's own device (Gumbel-max)."""
    source = generator.device if generator is not None else device or q.device
    u = torch.rand(q.shape, generator=generator, device=source).to(q.device)
    return (q.log() - torch.log(-torch.log(u.clamp(min=1e-20)))).argmax(-1)


def judge(d, p, q, sampling, generator=None, stop_ids=(), eos_min_prob=0.0):
    """(tokens, ok): each row's verdict on a drafted token d (...,), given draft and target
    distributions p and q (..., V). Greedy accepts d when it is argmax q; sampling with probability
    min(1, q(d) / p(d)), else draws from normalize(max(q - p, 0)): a row's token is distributed as
    q whatever the draft did. eos_min_prob: a stop token the target picks needs this probability,
    else it picks again without stop tokens (which changes the target's output)."""
    chosen = q
    if stop_ids and eos_min_prob > 0:  # gate the stop tokens the target does not really want
        stops = torch.tensor(list(stop_ids), device=q.device)
        weak = q.index_select(-1, stops) < eos_min_prob
        chosen = q.index_copy(-1, stops, q.index_select(-1, stops).masked_fill(weak, 0.0))
        chosen = torch.where(chosen.sum(-1, keepdim=True) > 0, chosen, q)
    if sampling.greedy:
        ok = d == q.argmax(-1)
        return torch.where(ok, d, chosen.argmax(-1)), ok
    source = generator.device if generator is not None else d.device  # the generator's own device
    u = torch.rand(d.shape, generator=generator, device=source).to(d.device)
    q_d, p_d = q.gather(-1, d[..., None])[..., 0], p.gather(-1, d[..., None])[..., 0]
    ok = u * p_d < q_d  # modified rejection sampling
    residual = (chosen - p).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, chosen)  # p == q: q
    return torch.where(ok, d, draw(residual, generator, source)), ok


def in_time_order(ok, order):
    """The rows committed when judged in time order (order: each row's rank): every row up to the
    earliest rejected rank, all rows of that rank included."""
    first = torch.where(ok, order.max() + 1, order).min()
    return order <= first


def to_host(**tensors):
    """Tensors as lists (rows of their last dimension), in one copy to the host: a host sync."""
    flat = torch.cat([t.reshape(-1).long() for t in tensors.values()]).tolist()
    out, i = {}, 0
    for name, t in tensors.items():
        values, i = flat[i:i + t.numel()], i + t.numel()
        width = t.shape[-1] if t.dim() > 1 else len(values)
        out[name] = [values[r:r + width] for r in range(0, len(values), width or 1)]
    return out


def accept_lossless(tree, q, run, opt):
    """Lossless: from every proposed state the target's own step: its picks at the masked positions
    (argmax, or rejection sampling against the proposer's picks there, a plain draw where it has
    none) and SDAR's rule on them. The chain enters a state when the target's step from its
    parent reaches it (its arrival); from the deepest state entered, the target's step is
    committed too. q (N, B, V): the target at every state."""
    B, N, dev = opt.block, len(tree.block), q.device
    if opt.sampling.greedy:
        y = opt.sampling.pick(q)
    else:
        judged, _ = judge(tree.picks, tree.probs, q, opt.sampling, run.generator)
        y = torch.where(tree.drawn[:, None], judged, draw(q, run.generator))
    quota = decode.quota(torch.tensor(tree.done, device=dev), B, opt.steps)[:, None]
    revealed = decode.reveal(q, y, tree.states == opt.mask_id, quota, opt.strategy, opt.threshold)
    after = torch.where(revealed, y, tree.states)  # (N, B): the state after the target's step
    index = torch.arange(N, device=dev)
    parent = torch.tensor(tree.parent, device=dev).clamp(min=0)
    enters = (after[parent] == tree.arrival).all(-1) | (index == 0)
    shape = tree.shape(len(run.tpending), B)
    reached = ~(shape.ancestors & ~enters).any(-1)  # every state on its path entered
    f = torch.where(reached, index, 0).max()  # the deepest: reached states form one path
    chains = {flag: torch.stack([torch.cat([p.tokens, p.step]) for p in props])
              for flag, (props, _) in tree.chains.items()}
    seen = to_host(f=f, after=after[f], revealed=revealed[f], cleans=tree.arrival[shape.cleans],
                   **{str(flag): c for flag, c in chains.items()})
    return lossless_verdict(tree, shape.cleans, seen, q[f], opt)


def lossless_verdict(tree, cleans, seen, hint, opt):
    """The Verdict of accept_lossless from what it read back: the blocks committed on the path to
    the deepest state entered, f, and the fates of a chain through f (one whose step from f the
    target took, else the draft's)."""
    B, f = opt.block, seen["f"][0][0]
    path = [f]
    while tree.parent[path[0]] >= 0:
        path.insert(0, tree.parent[path[0]])
    jf, after, revealed = tree.block[f], seen["after"][0], seen["revealed"][0]
    tokens = [row for n, row in zip(cleans, seen["cleans"]) if n in path] + [after]
    known = [[True] * B] * jf + [[t != opt.mask_id for t in after]]
    shown = [(*fates(seen[str(flag)], props, idx.index(f), jf, after, revealed, opt), flag)
             for flag, (props, idx) in tree.chains.items() if f in idx]
    shown.sort(key=lambda c: (not c[-2], c[-1] != DRAFT))
    proposed, steps, fate, same, flag = shown[0] if shown else ([], [], [], False, None)
    rows = max(jf + 1, len(proposed))
    proposed += [[opt.mask_id] * B] * (rows - len(proposed))
    steps += [[0] * B] * (rows - len(steps))
    fate += [[0] * B] * (rows - len(fate))
    fate[jf] = [2 if r and not same else x for r, x in zip(revealed, fate[jf])]
    tokens += [[opt.mask_id] * B] * (rows - jf - 1)
    known += [[False] * B] * (rows - jf - 1)
    taken = [sum(tree.block[n] == j for n in path) for j in range(rows)]
    done = [0] * rows
    done[jf] = tree.done[f] + 1
    slots = [c for c, n in enumerate(cleans) if n in path]
    firsts = [n for n in path[1:] if tree.block[n] > tree.block[tree.parent[n]]]
    kept = 0
    if DRAFT in tree.chains:  # the draft stored its drafted blocks but the last, tentatively
        while kept < min(jf, len(tree.chains[DRAFT][0]) - 1) and tree.by[firsts[kept]] & DRAFT:
            kept += 1
    by_draft = sum(tree.by[n] & DRAFT > 0 for n in path[1:]) + (same and flag == DRAFT)
    matched = (len(path) - 1 + same, by_draft)
    return Verdict(tokens, known, fate, proposed, steps, taken, done, slots, kept, matched,
                   None if all(known[jf]) else hint, {DRAFT: "draft", SELF: "self"}.get(flag))


def fates(rows, proposals, k, jf, after, revealed, opt):
    """A chain's proposed tokens, step maps and fates (rows of B), and whether the target's step
    from its node k (the deepest entered, in block jf) is the chain's own step from it. rows:
    (tokens | step map) per proposed block, as read back."""
    B, firsts = opt.block, [0]
    for p in proposals:
        firsts.append(firsts[-1] + p.steps)  # each block's first node in the chain
    proposed, steps = [row[:B] for row in rows], [row[B:] for row in rows]
    same = False
    if jf < len(proposals):  # k is a proposed state, not the chain's tail
        own = [i for i in range(B) if steps[jf][i] == k - firsts[jf] + 1]
        same = own == [i for i in range(B) if revealed[i]] and all(
            proposed[jf][i] == after[i] for i in own)
    fate = [[0 if t == 0 else 1 if first + t - 1 < k + same else 3 for t in row]
            for first, row in zip(firsts, steps)]
    return proposed, steps, fate, same


def accept_paper(tree, q, run, opt):
    """The paper's acceptance (exact, simsd): each drafted token judged against the target at the
    row that verifies it (simsd: its mask token; exact: its position in the copy before its
    step), in time order: draft steps (accept="step"), or positions ("position"). Every row up to
    the first rejected rank is committed, a rejected one with the target's token."""
    B, proposals = opt.block, tree.chains[DRAFT][0]
    L = len(proposals)
    d = torch.stack([p.tokens for p in proposals])  # (L, B)
    t = torch.stack([p.step for p in proposals])
    if opt.verify == "exact":  # q holds one copy per state: each position's own step
        offsets = [sum(p.steps for p in proposals[:j]) for j in range(L)]
        q = torch.stack([p.at_own_step(q[off:off + p.steps]) for p, off in zip(proposals, offsets)])
    p = None if opt.sampling.greedy else torch.stack([p.at_own_step(p.probs) for p in proposals])
    y, ok = judge(d, p, q, opt.sampling, run.generator, opt.stop_ids, opt.eos_min_prob)
    drafted = t > 0
    block_rank = torch.arange(L, device=d.device)[:, None]
    if opt.accept == "step":
        order = block_rank * (B + 1) + t
    else:
        order = block_rank * B + torch.arange(B, device=d.device)
    committed = drafted & in_time_order(ok | ~drafted, order)
    return paper_verdict(proposals, committed, y, ok, opt)


def accept_causal(proposals, q, run, opt):
    """SpecDiff: the drafted tokens judged in position order against the target's next-token
    distributions q (M + 1, V). Rows up to the first rejection are committed, that one with the
    target's token, or the row after the last drafted token (the bonus) when none is rejected."""
    B, L = opt.block, len(proposals)
    skip = B - run.block.masks  # the current block's known prefix
    d = torch.cat([p.tokens for p in proposals])[skip:]
    p = None
    if not opt.sampling.greedy:
        p = torch.cat([prop.at_own_step(prop.probs) for prop in proposals])[skip:]
        p = torch.cat([p, torch.zeros_like(p[:1])])
    rows = torch.arange(len(d) + 1, device=d.device)
    y, ok = judge(torch.cat([d, d[:1]]), p, q, opt.sampling, run.generator)  # + the bonus row
    ok = ok & (rows < len(d))  # the bonus row drafts nothing: never accepted
    committed = in_time_order(ok, rows)

    def grid(x):  # rows from block 1's first drafted position -> (L + 1, B)
        before = torch.zeros(skip, dtype=x.dtype, device=x.device)
        after = torch.zeros(B - 1, dtype=x.dtype, device=x.device)
        return torch.cat([before, x, after]).view(L + 1, B)

    return paper_verdict(proposals, grid(committed), grid(y), grid(ok), opt)


def paper_verdict(proposals, committed, tokens, as_drafted, opt):
    """The Verdict of the paper's and the causal acceptance: positions committed (L or L + 1 rows
    of B) take `tokens`; as_drafted marks those committed as drafted. A missing last row is the
    fresh block after the proposals. One readback."""
    L, B = len(proposals), opt.block

    def rows(xs, fill):  # (L, B) -> (L + 1, B)
        extra = torch.full((L + 1 - len(xs), B), fill, dtype=xs.dtype, device=xs.device)
        return torch.cat([xs, extra])

    known = rows(torch.stack([p.known for p in proposals]), False)
    drafted = rows(torch.stack([p.step > 0 for p in proposals]), False)
    before = rows(torch.stack([torch.where(p.known, p.tokens, opt.mask_id) for p in proposals]),
                  opt.mask_id)
    committed, tokens, as_drafted = rows(committed, False), rows(tokens, 0), rows(as_drafted, False)
    fate = torch.where(committed, torch.where(as_drafted, 1, 2), torch.where(drafted, 3, 0))
    seen = to_host(tokens=torch.where(committed, tokens, before), known=known | committed,
                   fate=fate, proposed=rows(torch.stack([p.tokens for p in proposals]), 0),
                   steps=rows(torch.stack([p.step for p in proposals]), 0))
    taken = [steps_taken(f, s) for f, s in zip(seen["fate"], seen["steps"])]
    kept = 0
    while kept < L - 1 and all(f in (0, 1) for f in seen["fate"][kept]):
        kept += 1
    matched = sum(all(f == 1 for f, t in zip(fate, steps) if t == s)
                  for fate, steps in zip(seen["fate"], seen["steps"]) for s in set(steps) - {0})
    done = [p.done + n for p, n in zip(proposals, taken)] + [0]
    return Verdict(seen["tokens"], seen["known"], seen["fate"], seen["proposed"], seen["steps"],
                   taken, done, list(range(kept)), kept, (matched, matched), None, "draft")


def steps_taken(fate, steps):
    """The target steps a block took in this iteration: every draft step whose positions were all
    committed."""
    dropped = [s for f, s in zip(fate, steps) if f == 3]
    return min(dropped) - 1 if dropped else max(steps, default=0)


# ----------------------------------------------------------------------------- 5. commit

def count(stats, v, width, draft_seconds):
    """Add one iteration to the stats; matched: proposed steps the target committed as proposed."""
    stats.forwards += 1
    stats.steps += sum(v.taken)
    stats.width += width
    stats.draft_seconds += draft_seconds
    stats.matched += v.matched[0]
    stats.draft_matched += v.matched[1]
    for fate, steps in zip(v.fate, v.steps):
        stats.drafted += sum(s > 0 for s in steps)
        stats.accepted += fate.count(1)


def commit(run, v, draft_len, opt):
    """Each cache keeps what was committed of what it stored in this iteration: a diffusion
    target its pending blocks and the clean copies of the committed blocks (v.slots; moved to
    the front when others lie between them), an AR target its pending token and the accepted
    ones, the draft the leading blocks committed exactly as drafted. The other complete blocks
    become pending; the first incomplete block is the current one (a fresh one after them when
    none is). Returns the tokens now returnable."""
    B, dev = opt.block, run.block.tokens.device
    complete = 0
    while complete < len(v.tokens) and all(v.known[complete]):
        complete += 1
    tokens = torch.tensor(v.tokens, device=dev)  # (rows, B)
    if opt.verify is None:  # an AR target: the token after the accepted ones is pending next
        accepted = sum(row.count(1) for row in v.fate)
        run.tcache.commit(len(run.target_pending) + accepted)
        bonus = B - run.block.masks + accepted
        run.target_pending = tokens.flatten()[bonus:bonus + 1]
    else:
        P, n = len(run.tpending), len(v.slots)
        keep = None if v.slots == list(range(n)) else [*range(P), *(
            P + c * B + i for c in v.slots for i in range(B))]
        run.tcache.commit(P + n * B, keep)
        run.tpending = tokens[n:complete].flatten()
    if run.dcache is not None:
        run.dcache.rewind(draft_len + len(run.dpending) + v.kept * B)
        run.dpending = tokens[v.kept:complete].flatten()
    new = returnable(v.tokens, v.known, run.block.returned)
    start, run.hint = run.block.start + complete * B, v.hint
    if complete == len(v.tokens):  # every row complete: a fresh block after them
        fresh = torch.full((B,), opt.mask_id, device=dev)
        run.block = Block(start, fresh, torch.zeros_like(fresh, dtype=torch.bool), B)
        return new
    known = v.known[complete]
    returned = known.index(False) if False in known else B  # its known prefix was returned
    run.block = Block(start, tokens[complete], torch.tensor(known, dtype=torch.bool, device=dev),
                      known.count(False), v.done[complete], returned)
    return new


def returnable(tokens, known, returned):
    """The known tokens after the first `returned`, up to the first unknown position (rows of B)."""
    flat = [t if k else None for t, k in zip(sum(tokens, []), sum(known, []))][returned:]
    return flat[:flat.index(None)] if None in flat else flat


# ----------------------------------------------------------------------------- the loop

def options(target, draft, max_new_tokens, prompt_len, *, block, steps, strategy, threshold,
            sampling, verify, accept, lookahead, eos_min_prob, stop_ids, proposer, drafting):
    """Check every option against the target's kind and the proposers; the Options of the
    decode."""
    ar = target.config.model_type == "qwen3"
    decode.check(max_new_tokens=max_new_tokens, block=block, strategy=strategy, threshold=threshold,
                 lookahead=lookahead, eos_min_prob=eos_min_prob)
    steps = block if steps is None else steps
    decode.check_steps(steps, block)
    if ar and (verify is not None or accept is not None):
        raise ValueError("verify and accept apply to a diffusion target only; an autoregressive "
                         "target verifies causally, in position order")
    verify = None if ar else verify or "lossless"
    if proposer is None:
        proposer = "self" if draft is None else PROPOSER if verify == "lossless" else "draft"
    refused = [  # (when, why)
        (draft is None and ar, "an autoregressive target needs a draft to propose to it"),
        (proposer not in ("draft", "self", "hybrid"),
         f"proposer must be 'draft', 'self' or 'hybrid'; got {proposer!r}"),
        (draft is None and proposer != "self",
         f"proposer={proposer!r} needs a draft model; without one the target proposes for itself"),
        (draft is not None and proposer == "self",
         "proposer='self' proposes with the target alone; pass draft=None"),
        (proposer != "draft" and verify != "lossless",
         "the target's own proposals are verified losslessly only; use verify='lossless'"),
        (proposer == "self" and lookahead > 2,
         "the target proposes the rest of its block and the next block's first step: "
         "lookahead 1 or 2"),
        (draft is None and drafting is not None, "drafting applies to a draft model"),
        (drafting not in (None, "step", "block"),
         f"drafting must be 'step' or 'block'; got {drafting!r}"),
        (ar and strategy == "dynamic" and not sampling.greedy,
         "strategy='dynamic' reveals drafted tokens by their sampled confidence, which biases an "
         "autoregressive target's rejection sampling; use 'static'"),
        (verify not in (None, "lossless", "exact", "simsd"),
         f"verify must be 'lossless', 'exact' or 'simsd'; got {verify!r}"),
        (accept not in (None, "step", "position"),
         f"accept must be 'step' or 'position'; got {accept!r}"),
        (accept is not None and verify == "lossless",
         "accept applies to verify='exact' or 'simsd'; lossless follows the target's own order"),
        (eos_min_prob > 0 and verify in (None, "lossless"),
         "eos_min_prob changes the target's output; it applies to verify='exact' or 'simsd' only")]
    for when, why in refused:
        if when:
            raise ValueError(why)
    mask_id = decode.diffusion_mask_id(target if draft is None else draft)
    return Options(block, steps, strategy, threshold, sampling, verify, accept or "step", lookahead,
                   eos_min_prob, tuple(stop_ids), mask_id, prompt_len + max_new_tokens, proposer,
                   drafting or DRAFTING)


def start(target, draft, prompt, generator, opt):
    """The Run after the prefill: the draft and a diffusion target cache the prompt's whole blocks
    (its tail is the current block's known part); an AR target all but its newest token."""
    B, ar = opt.block, opt.verify is None
    aligned = len(prompt) - len(prompt) % B
    room = opt.end + 3 * B + (opt.lookahead + 1) * B * (B + 1)
    tcache = target.new_cache(room)
    decode.prefill(target, prompt[:-1] if ar else prompt[:aligned], tcache, 1 if ar else B)
    dcache = None
    if draft is not None:
        dcache = draft.new_cache(room)
        decode.prefill(draft, prompt[:aligned].to(decode.device_of(draft)), dcache, B)
    tail = prompt[aligned:]
    tokens = torch.cat([tail, tail.new_full((B - len(tail),), opt.mask_id)])
    known = torch.arange(B, device=prompt.device) < len(tail)
    block = Block(aligned, tokens, known, B - len(tail), returned=len(tail))
    return Run(target, draft, tcache, dcache, block, prompt[:0], prompt[:0], prompt[-1:], None,
               generator, Stats())


@torch.inference_mode()
def generate(target, draft, prompt_ids, max_new_tokens, *, block=4, steps=None, strategy="static",
             threshold=0.9, sampling=GREEDY, verify=None, accept=None, lookahead=LOOKAHEAD,
             eos_min_prob=0.0, stop_ids=(), generator=None, on_iteration=None, proposer=None,
             drafting=None):
    """Speculative decoding: SimSD for a diffusion (SDAR) target, SpecDiff for an AR (qwen3) one.
    Returns (new tokens, Stats) as decode.generate does. block, steps, strategy, threshold and
    sampling: the target's decoding, which the proposers follow. verify (a diffusion target):
    "lossless" (default: decode.generate's output), or the paper's "exact" or "simsd"; accept:
    "step" (default) or "position", for exact and simsd. draft None: the target proposes for
    itself (lossless). proposer, with a draft: "draft", or "hybrid" (the draft and the target
    both; lossless only; default PROPOSER). drafting: "step" (a draft forward per step) or
    "block" (one per block; default DRAFTING). lookahead: the blocks one target forward
    reaches. eos_min_prob: exact and simsd's gate on stop tokens. generator: sampling's random
    state, on the draft's device (the target's without a draft). on_iteration(info) sees each
    iteration: every block's start, committed tokens and fates, the proposed tokens and step
    map of the chain shown and who proposed it (by), the steps taken; the new tokens."""
    prompt = decode.as_prompt(prompt_ids, decode.device_of(target))
    opt = options(target, draft, max_new_tokens, len(prompt), block=block, steps=steps,
                  strategy=strategy, threshold=threshold, sampling=sampling, verify=verify,
                  accept=accept, lookahead=lookahead, eos_min_prob=eos_min_prob, stop_ids=stop_ids,
                  proposer=proposer, drafting=drafting)
    t0 = decode.sync(prompt.device)
    run = start(target, draft, prompt, generator, opt)
    t1 = decode.sync(prompt.device)
    out, done = [], False
    while not done:
        new, info = speculate(run, opt)
        new, done = decode.trim(new, opt.stop_ids, max_new_tokens - len(out))
        out += new
        if on_iteration:
            on_iteration({**info, "new": new})
    run.stats.tokens = len(out)
    run.stats.seconds, run.stats.prefill_seconds = decode.sync(prompt.device) - t1, t1 - t0
    return out, run.stats
