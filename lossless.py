"""Lossless verification: the target's own decoding, whatever was proposed, and the proposers only it
can use: the target's own chain, and a trie that holds several chains.

A target decodes a block as a chain of states x0 -> x1 -> ...: at each it forwards, picks a token
at every masked position, and SDAR's rule reveals some. A proposer proposes such a chain. One
target forward computes the target's distributions at every proposed state (one copy of the block
per state, mask.copies), and from each the target takes its own step: its picks (argmax, or
rejection sampling against the proposer's draw there, so that each pick is a draw from the
target) and SDAR's rule on them. The chain is followed while the target's step from a state
reaches the next proposed one, and the target's step from the deepest state reached is committed
too. So a forward commits at least one of the target's steps, and the output is the target's own:
greedy, token for token; sampled, in distribution.

Proposers: the draft (a forward per step, or one per block), and the target itself: its
distributions at the state its last step was taken from, replayed by SDAR's rule (no forward at
all). Chains share their prefix of identical states in a trie (one copy per distinct state). After
a proposed block ends, a clean copy of it and the next block's all-masked state give that block's
first step in the same forward (lookahead).
"""
from dataclasses import dataclass

import torch

from sdar import denoise, quota, reveal, schedule
from simsd import draw, judge
from verifier import (ACCEPTED, DRAFT, DROPPED, KNOWN, SELF, TARGET, Trace, Verdict,
                      leading_complete, pack, proposal, readback, tree_shape)

NAMES = {DRAFT: "draft", SELF: "self"}


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
        return tree_shape(tuple(self.parent), tuple(self.block), n_pending, block,
                          self.states.device)


def chain(proposals, tail, flag, mask_id):
    """One proposer's chain as a Tree: the state before each step of each proposed block, and
    with `tail` the all-masked state of the block after the last, which the target decides alone."""
    B, dev = len(proposals[0].tokens), proposals[0].tokens.device
    states, arrival, block, done = [], [], [], []
    for j, p in enumerate(proposals):
        s = p.states(mask_id)  # (S, B)
        states.append(s)
        arrival.append(s if j == 0 else torch.cat([proposals[j - 1].tokens[None], s[1:]]))
        block += [j] * p.steps
        done += range(p.done, p.done + p.steps)
    picks = [p.picks for p in proposals]
    probs = None if proposals[0].probs is None else [p.probs for p in proposals]
    n = len(block)
    if tail:
        blank = torch.full((1, B), mask_id, device=dev)
        states.append(blank)
        arrival.append(proposals[-1].tokens[None])
        picks.append(torch.zeros_like(blank))
        if probs is not None:
            probs.append(torch.zeros_like(probs[0][:1]))
        block.append(len(proposals))
        done.append(0)
    drawn = torch.arange(len(block), device=dev) < n
    probs = None if probs is None else torch.cat(probs)
    nodes = len(block)
    return Tree(torch.cat(states), torch.cat(arrival), torch.cat(picks), probs, drawn,
                list(range(-1, nodes - 1)), block, done, [flag] * nodes,
                {flag: (proposals, list(range(nodes)))})


def root(blk):
    """The Tree of the current block's state alone: the target takes its own step from it."""
    x = blk.tokens[None]
    return Tree(x, x, torch.zeros_like(x), None, torch.zeros(1, dtype=torch.bool,
                device=x.device), [-1], [0], [blk.done], [0], {})


def grow(chains, n_blocks, blk, mask_id):
    """The trie of the proposers' chains: they share the current block's state and their prefix
    of identical states (one host sync to find it), and part after it; each chain ends in the
    all-masked state of the block after its last (tail), up to n_blocks. A state shared by both
    keeps the target's own draws."""
    trees = [chain(proposals, len(proposals) < n_blocks, flag, mask_id)
             for flag, proposals in chains.items()]
    if not trees:
        return root(blk)
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
    n, extra, flag = len(a.block), len(b.block) - k, b.by[0]  # extra: b's nodes past the prefix
    probs = None if a.probs is None else torch.cat([a.probs, b.probs[k:]])
    parent = a.parent + ([k - 1, *range(n, n + extra - 1)] if extra else [])
    by = [f | flag if i < k else f for i, f in enumerate(a.by)] + b.by[k:]
    chains = {**a.chains, flag: (b.chains[flag][0], [*range(k), *range(n, n + extra)])}
    return Tree(torch.cat([a.states, b.states[k:]]), torch.cat([a.arrival, b.arrival[k:]]),
                torch.cat([a.picks, b.picks[k:]]), probs, torch.cat([a.drawn, b.drawn[k:]]),
                parent, a.block + b.block[k:], a.done + b.done[k:], by, chains)


def self_chains(run, rows):
    """The target's own chains for the rest of these rows' current blocks: SDAR's rule applied
    step after step to its distributions at the state each last stepped from (hint), fresh picks
    at every state when sampling. No forward."""
    s = run.settings
    dev = run.generator.device if run.generator is not None else rows[0].block.tokens.device
    quotas = [schedule(row.block.masks, s.block, s.steps, row.block.done) for row in rows]
    d = denoise(run.target, torch.stack([row.block.tokens for row in rows]).to(dev),
                torch.stack([row.block.known for row in rows]).to(dev),
                [row.block.start for row in rows], quotas, s, generator=run.generator,
                probs=torch.stack([row.hint for row in rows]).to(dev), drafting="block")
    return [proposal(row.block.start, row.block.known, row.block.done, d, r,
                     row.block.tokens.device) for r, row in enumerate(rows)]


class Lossless:
    """The target's own step from every proposed state (the module's docstring)."""

    def __init__(self, s):
        self.s = s

    def drafted(self, reach):
        """The last block a forward reaches is reached by its all-masked state: not drafted."""
        return reach - 1 if reach > 1 else reach

    def layout(self, run, chains, reach):
        return pack([self.part(row, chain, n) for row, chain, n in zip(run.rows, chains, reach)],
                    self.s.mask_id)

    def part(self, row, chains, n_blocks):
        """[pending | clean copies | one copy per state] (mask.tree)."""
        tree = grow(chains, n_blocks, row.block, self.s.mask_id)
        P, B = len(row.pending), self.s.block
        shape = tree.shape(P, B)
        ids = torch.cat([row.pending, tree.arrival[shape.cleans].flatten(), tree.states.flatten()])
        verifying = slice(P + len(shape.cleans) * B, len(ids))
        return ids, shape.positions + row.block.start, shape.attend, verifying, tree

    def accept(self, run, laid, q):
        return [self.verdict(row, tree, q_row.view(-1, self.s.block, q_row.shape[-1]),
                             run.generator) for row, tree, q_row in zip(run.rows, laid.parts, q)]

    def verdict(self, row, tree, q, generator):
        """From every state its target's step: picks at the masked positions (argmax, or rejection
        sampling against the proposer's picks, a plain draw where it has none) and SDAR's rule on
        them. The chain enters a state when the target's step from its parent reaches it (its
        arrival); the deepest state entered, f, and the target's step from it are committed.
        q (N, B, V): the target at every state."""
        s, P = self.s, len(row.pending)
        if s.sampling.greedy:
            y = s.sampling.pick(q)
        else:  # rejection sampling where a proposer drew, a plain draw where none did
            y = draw(q, generator)
            if tree.probs is not None:
                judged, _ = judge(tree.picks, tree.probs, q, s.sampling, generator)
                y = torch.where(tree.drawn[:, None], judged, y)
        k = torch.tensor([quota(d, s.block, s.steps) for d in tree.done], device=q.device)
        revealed = reveal(q, y, tree.states == s.mask_id, k[:, None], s.strategy, s.threshold)
        after = torch.where(revealed, y, tree.states)  # (N, B): the state after the target's step
        shape = tree.shape(P, s.block)
        enters = (after[shape.parent] == tree.arrival).all(-1)
        enters[0] = True  # the root: the current state
        reached = ~(shape.ancestors & ~enters).any(-1)  # every state on its path entered
        f = reached.cumsum(0).argmax()  # the deepest: reached states form one path
        chains = {flag: torch.stack([torch.cat([p.tokens, p.step]) for p in props])
                  for flag, (props, _) in tree.chains.items()}
        seen = readback(f=f, after=after[f], revealed=revealed[f],
                        cleans=tree.arrival[shape.cleans],
                        **{str(flag): c for flag, c in chains.items()})
        path = path_to(tree, seen["f"][0][0])
        return commits(tree, shape.cleans, path, seen, q[path[-1]], P, s), \
            trace(tree, shape.cleans, path, seen, s)


def path_to(tree, f):
    """The nodes from the root to f."""
    path = [f]
    while tree.parent[path[0]] >= 0:
        path.insert(0, tree.parent[path[0]])
    return path


def commits(tree, cleans, path, seen, hint, n_pending, s):
    """The Verdict: the blocks passed on the path (their clean copies' keys kept) and the state
    after the target's step from its last node."""
    B, f = s.block, path[-1]
    jf, after = tree.block[f], seen["after"][0]
    tokens = [row for n, row in zip(cleans, seen["cleans"]) if n in path] + [after]
    known = [[True] * B] * jf + [[t != s.mask_id for t in after]]
    done = [0] * jf + [tree.done[f] + 1]
    slots = [c for c, n in enumerate(cleans) if n in path]
    keep = [*range(n_pending), *(n_pending + c * B + i for c in slots for i in range(B))]
    firsts = [n for n in path[1:] if tree.block[n] > tree.block[tree.parent[n]]]
    kept = 0  # the draft stored its drafted blocks but the last, tentatively
    if DRAFT in tree.chains:
        while kept < min(jf, len(tree.chains[DRAFT][0]) - 1) and tree.by[firsts[kept]] & DRAFT:
            kept += 1
    pending = sum(tokens[len(slots):leading_complete(known)], [])
    return Verdict(tokens, known, done, keep, pending, kept, None if all(known[jf]) else hint)


def trace(tree, cleans, path, seen, s):
    """The Trace: the fates along a chain through the last node, f (one whose step from f the
    target took, else the draft's), and the steps matched."""
    B, f = s.block, path[-1]
    jf, revealed = tree.block[f], seen["revealed"][0]
    shown = [(*fates(seen[str(flag)], props, idx.index(f), jf, seen["after"][0], revealed, s),
              flag) for flag, (props, idx) in tree.chains.items() if f in idx]
    shown.sort(key=lambda c: (not c[-2], c[-1] != DRAFT))
    proposed, steps, fate, same, flag = shown[0] if shown else ([], [], [], False, None)
    rows = max(jf + 1, len(proposed))
    proposed += [[s.mask_id] * B] * (rows - len(proposed))
    steps += [[0] * B] * (rows - len(steps))
    fate += [[KNOWN] * B] * (rows - len(fate))
    fate[jf] = [TARGET if r and not same else x for r, x in zip(revealed, fate[jf])]
    taken = [sum(tree.block[n] == j for n in path) for j in range(rows)]
    by_draft = sum(tree.by[n] & DRAFT > 0 for n in path[1:]) + (same and flag == DRAFT)
    stored = [c for c, n in enumerate(cleans) if n in path]
    return Trace(fate, proposed, steps, taken, (len(path) - 1 + same, by_draft), NAMES.get(flag),
                 stored)


def fates(rows, proposals, k, jf, after, revealed, s):
    """A chain's proposed tokens, step maps and fates (rows of B), and whether the target's step
    from its node k (the deepest entered, in block jf) is the chain's own step from it. rows:
    (tokens | step map) per proposed block, as read back."""
    B, firsts = s.block, [0]
    for p in proposals:
        firsts.append(firsts[-1] + p.steps)  # each block's first node in the chain
    proposed, steps = [row[:B] for row in rows], [row[B:] for row in rows]
    same = False
    if jf < len(proposals):  # k is a proposed state, not the chain's tail
        own = [i for i in range(B) if steps[jf][i] == k - firsts[jf] + 1]
        same = own == [i for i in range(B) if revealed[i]] and all(
            proposed[jf][i] == after[i] for i in own)
    fate = [[KNOWN if t == 0 else ACCEPTED if first + t - 1 < k + same else DROPPED for t in row]
            for first, row in zip(firsts, steps)]
    return proposed, steps, fate, same
