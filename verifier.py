"""What the target checks in its one forward: the verifications, each with the same two calls.

  layout(run, chains, reach) -> Laid: one target forward's ids, positions and attention for every
                                row, and which of its rows verify;
  accept(run, laid, q)       -> [(Verdict, Trace)]: from the target's distributions at those rows,
                                what each row's caches commit, and beside it what --show and the
                                stats read.
The verifications: Paper (the paper's acceptance, on exact copies or its own layout), Causal
(SpecDiff: an autoregressive target, in position order) here, and Lossless (the target's own step
from every proposed state) in lossless.py. chains: per row, {proposer flag: [Proposal per block]}.
"""
import functools
from collections import namedtuple
from dataclasses import dataclass

import torch

import mask as masks
from simsd import in_time_order, judge

DRAFT, SELF = 1, 2  # proposer flags: who proposed a chain
# A position's fate in an iteration, as --show and the stats read it.
KNOWN, ACCEPTED, TARGET, DROPPED = 0, 1, 2, 3  # known before (or never proposed); committed as
# proposed; committed with the target's own token; proposed and not committed

# What one row's caches commit. tokens, known: the blocks from the current one, rows of B, after
# the commit (the mask id where unknown); done: target steps taken on each; keep: the offsets,
# after the row's first new token, of the forward's tokens the target's cache keeps; pending:
# the tokens (ids) the target has not cached, fed first next time; kept: the leading drafted
# blocks the draft's cache keeps; hint: the target's distributions at the state its last step was
# taken from, when that block goes on (the target's own proposals start there), else None.
Verdict = namedtuple("Verdict", "tokens known done keep pending kept hint")
# What --show and the stats read of one row's iteration: per block each position's fate, the
# proposed tokens and step map of the chain shown and who proposed it ("draft" or "self"), the
# target steps taken on each block; matched: (proposed steps committed as proposed, of them the
# draft's); stored: the clean copies whose keys the target kept.
Trace = namedtuple("Trace", "fate proposed steps taken matched by stored")
# One target forward for every row: ids, positions and attention, packed (mask.pack); per row,
# the width of its part, the indices of its part that verify, and what accept needs of it.
Laid = namedtuple("Laid", "ids pos mask widths rows parts")


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

    def states(self, mask_id):
        """(S, B): the block before each step: the positions revealed at it or later masked."""
        masked = self.step >= torch.arange(1, self.steps + 1, device=self.step.device)[:, None]
        return torch.where(masked, mask_id, self.tokens)

    def at_own_step(self, x):
        """x (S, B, ...) -> (B, ...): each proposed position's row at the step that revealed it."""
        cols = torch.arange(len(self.step), device=x.device)
        return x[(self.step - 1).clamp(min=0), cols]


def proposal(start, known, done, d, r, device):
    """Row r of a Denoised batch (sdar.denoise) as a Proposal on `device` (its own steps only),
    for the block at `start` whose known (B,) positions it kept and on which `done` target steps
    were taken."""
    S = d.steps[r]
    probs = None if d.probs is None else d.probs[:S, r].to(device)
    return Proposal(start, known.to(device), d.tokens[r].to(device), d.step[r].to(device), done,
                    d.picks[:S, r].to(device), probs)


Shape = namedtuple("Shape", "ancestors cleans attend positions parent")


@functools.lru_cache(maxsize=4096)
def tree_shape(parent, blocks, n_pending, block, device):
    """The layout of a tree of proposed states, one copy of the block per state, from its shape
    alone (a decode meets a few dozen shapes; each is built once): ancestors (N, N) bool (node n
    is node m or descends from it); cleans, the nodes that start a later block than their
    parent's, each laid out after a clean copy of the block before it; the attention mask of
    [pending | clean copies | one copy per state] (mask.tree); the positions, relative to the
    current block's start; each node's parent (the root: itself)."""
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
    parents = torch.tensor([max(p, 0) for p in parent], device=device)
    return Shape(ancestors, cleans, attend, positions, parents)


def pack(parts, pad_id):
    """Rows' parts [(ids, positions, mask, verifying rows, what accept needs)] as one Laid."""
    ids, pos, attend = masks.pack([part[:3] for part in parts], pad_id)
    return Laid(ids, pos, attend, [len(part[0]) for part in parts], [part[3] for part in parts],
                [part[4] for part in parts])


def readback(**tensors):
    """Tensors as lists (rows of their last dimension), in one copy to the host: a host sync."""
    flat = torch.cat([t.reshape(-1).long() for t in tensors.values()]).tolist()
    out, i = {}, 0
    for name, t in tensors.items():
        values, i = flat[i:i + t.numel()], i + t.numel()
        width = t.shape[-1] if t.dim() > 1 else len(values)
        out[name] = [values[r:r + width] for r in range(0, len(values), width or 1)]
    return out


# ----------------------------------------------------------------------------- the paper's

class Paper:
    """The paper's acceptance of a draft's chain of L blocks (lookahead): each drafted token judged
    (argmax, or rejection sampling) against the target at the row that verifies it, in time
    order: draft steps (accept="step"), or the paper's positions ("position"). Every row up to the
    first rejected rank is committed, a rejected one with the target's token. Block j is
    verified as if the blocks before it were stored as drafted (their clean copies), and entered
    only when they were committed whole. The layout: "exact", one copy of the block per draft
    state (mask.copies: exactly the target denoising along the draft's order), or "simsd", the
    paper's [block | B mask tokens] (mask.verify)."""

    def __init__(self, s):
        self.s = s

    def drafted(self, reach):
        return reach  # the draft drafts every block one forward reaches

    def layout(self, run, chains, reach):
        return pack([self.part(row, chain[DRAFT]) for row, chain in zip(run.rows, chains)],
                    self.s.mask_id)

    def part(self, row, proposals):
        B, P, dev = self.s.block, len(row.pending), row.pending.device
        start, L = row.block.start, len(proposals)
        before = torch.arange(start - P, start, device=dev)
        tokens = torch.stack([p.tokens for p in proposals])  # (L, B)
        if self.s.verify == "exact":  # one copy per state: a chain, laid out by its shape
            blocks = tuple(j for j, p in enumerate(proposals) for _ in range(p.steps))
            shape = tree_shape(tuple(range(-1, len(blocks) - 1)), blocks, P, B, dev)
            states = torch.cat([p.states(self.s.mask_id) for p in proposals])
            ids = torch.cat([row.pending, tokens[:-1].flatten(), states.flatten()])
            verifying = torch.arange(P + (L - 1) * B, len(ids), device=dev)
            return ids, shape.positions + start, shape.attend, verifying, proposals
        offsets = torch.arange(B, device=dev)
        pos = start + B * torch.arange(L, device=dev)[:, None] + offsets  # (L, B)
        parts = torch.stack([tokens, torch.full_like(tokens, self.s.mask_id)], 1)  # (L, 2, B)
        ids = torch.cat([row.pending, tokens[:-1].flatten(), parts.flatten()])
        pos = torch.cat([before, pos[:-1].flatten(), pos.repeat_interleave(2, 0).flatten()])
        attend = masks.tree([masks.verify(p.step) for p in proposals], P, B,
                            torch.ones(L, L, dtype=torch.bool, device=dev).tril(), range(1, L))
        mask_rows = torch.arange(L, device=dev)[:, None] * 2 * B + B + offsets  # (L, B)
        return ids, pos, attend, (P + (L - 1) * B + mask_rows).flatten(), proposals

    def accept(self, run, laid, q):
        return [self.verdict(row, proposals, q_row, run.generator)
                for row, proposals, q_row in zip(run.rows, laid.parts, q)]

    def verdict(self, row, proposals, q, generator):
        s, B, L = self.s, self.s.block, len(proposals)
        q = q.view(-1, B, q.shape[-1])
        d = torch.stack([p.tokens for p in proposals])  # (L, B)
        t = torch.stack([p.step for p in proposals])
        if s.verify == "exact":  # q holds one copy per state: each position's own step's
            firsts = [sum(p.steps for p in proposals[:j]) for j in range(L)]
            q = torch.stack([p.at_own_step(q[f:f + p.steps]) for p, f in zip(proposals, firsts)])
        p = None if s.sampling.greedy else torch.stack([p.at_own_step(p.probs) for p in proposals])
        y, ok = judge(d, p, q, s.sampling, generator, s.stop_ids, s.eos_min_prob)
        rank = torch.arange(L, device=d.device)[:, None]
        order = rank * (B + 1) + t if s.accept == "step" else rank * B + torch.arange(B,
                                                                                     device=d.device)
        committed = (t > 0) & in_time_order(ok | (t == 0), order)
        return drafted_verdict(proposals, committed, y, ok, row, s)


# ----------------------------------------------------------------------------- SpecDiff

class Causal:
    """SpecDiff: an autoregressive target verifies [its pending token | every drafted token, in
    position order] causally (logits at i predict i + 1), judging each drafted token by the
    logits before it (argmax, or rejection sampling). Rows up to the first rejection are
    committed, that one with the target's token, or the token after the last drafted one (a
    bonus) when none is rejected. Its cache keeps every committed token but the newest."""

    def __init__(self, s):
        self.s = s

    def drafted(self, reach):
        return reach

    def layout(self, run, chains, reach):
        return pack([self.part(row, chain[DRAFT]) for row, chain in zip(run.rows, chains)],
                    self.s.mask_id)

    def part(self, row, proposals):
        """The current block's known tokens are a prefix (commits are prefixes)."""
        B, n_masks = self.s.block, row.block.masks
        drafted = torch.cat([p.tokens for p in proposals])[B - n_masks:]
        first = proposals[0].start + B - n_masks
        pos = torch.arange(first - len(row.pending), first + len(drafted), device=drafted.device)
        attend = masks.block_causal(len(pos), 1, device=drafted.device)
        verifying = torch.arange(len(row.pending) - 1, len(pos), device=drafted.device)
        return torch.cat([row.pending, drafted]), pos, attend, verifying, proposals

    def accept(self, run, laid, q):
        return [self.verdict(row, proposals, q_row, run.generator)
                for row, proposals, q_row in zip(run.rows, laid.parts, q)]

    def verdict(self, row, proposals, q, generator):
        """q (M + 1, V): the target's next-token distributions before each drafted token and
        after the last."""
        s, B, L = self.s, self.s.block, len(proposals)
        skip = B - row.block.masks  # the current block's known prefix
        d = torch.cat([p.tokens for p in proposals])[skip:]
        p = None
        if not s.sampling.greedy:
            p = torch.cat([prop.at_own_step(prop.probs) for prop in proposals])[skip:]
            p = torch.cat([p, torch.zeros_like(p[:1])])
        rows = torch.arange(len(d) + 1, device=d.device)
        y, ok = judge(torch.cat([d, d[:1]]), p, q, s.sampling, generator)  # + the bonus row
        ok = ok & (rows < len(d))  # the bonus row drafts nothing: never accepted
        committed = in_time_order(ok, rows)

        def grid(x):  # rows from block 1's first drafted position -> (L + 1, B)
            before = torch.zeros(skip, dtype=x.dtype, device=x.device)
            after = torch.zeros(B - 1, dtype=x.dtype, device=x.device)
            return torch.cat([before, x, after]).view(L + 1, B)

        return drafted_verdict(proposals, grid(committed), grid(y), grid(ok), row, s, causal=True)


def drafted_verdict(proposals, committed, tokens, as_drafted, row, s, causal=False):
    """The (Verdict, Trace) of the paper's and the causal acceptance: positions committed (L or
    L + 1 rows of B) take `tokens`; as_drafted marks those committed as drafted. A missing last
    row is the fresh block after the proposals. One readback."""
    L, B, n_pending = len(proposals), s.block, len(row.pending)

    def rows(xs, fill):  # (L, B) -> (L + 1, B)
        extra = torch.full((L + 1 - len(xs), B), fill, dtype=xs.dtype, device=xs.device)
        return torch.cat([xs, extra])

    known = rows(torch.stack([p.known for p in proposals]), False)
    drafted = rows(torch.stack([p.step > 0 for p in proposals]), False)
    before = rows(torch.stack([torch.where(p.known, p.tokens, s.mask_id) for p in proposals]),
                  s.mask_id)
    committed, tokens, as_drafted = rows(committed, False), rows(tokens, 0), rows(as_drafted, False)
    fate = torch.where(committed, torch.where(as_drafted, ACCEPTED, TARGET),
                       torch.where(drafted, DROPPED, KNOWN))
    seen = readback(tokens=torch.where(committed, tokens, before), known=known | committed,
                    fate=fate, proposed=rows(torch.stack([p.tokens for p in proposals]), 0),
                    steps=rows(torch.stack([p.step for p in proposals]), 0))
    taken = [steps_taken(f, t) for f, t in zip(seen["fate"], seen["steps"])]
    kept = 0  # the leading drafted blocks committed whole, as drafted (the last is never stored)
    while kept < L - 1 and all(f in (KNOWN, ACCEPTED) for f in seen["fate"][kept]):
        kept += 1
    matched = sum(all(f == ACCEPTED for f, t in zip(fate, steps) if t == step)
                  for fate, steps in zip(seen["fate"], seen["steps"]) for step in set(steps) - {0})
    done = [p.done + n for p, n in zip(proposals, taken)] + [0]
    tokens, known = seen["tokens"], seen["known"]
    complete = leading_complete(known)
    if causal:  # every committed token but the newest, which is pending
        accepted = sum(f.count(ACCEPTED) for f in seen["fate"])
        keep = list(range(n_pending + accepted))
        newest = B - row.block.masks + accepted  # its place from the current block's first
        pending = sum(tokens, [])[newest:newest + 1]
    else:  # the pending blocks and the clean copies of the blocks committed as drafted
        keep = [*range(n_pending), *(n_pending + c * B + i for c in range(kept) for i in range(B))]
        pending = sum(tokens[kept:complete], [])
    verdict = Verdict(tokens, known, done, keep, pending, kept, None)
    return verdict, Trace(seen["fate"], seen["proposed"], seen["steps"], taken,
                          (matched, matched), "draft", list(range(kept)))


def leading_complete(known):
    """How many of the leading blocks (rows of B) are complete."""
    complete = 0
    while complete < len(known) and all(known[complete]):
        complete += 1
    return complete


def steps_taken(fate, steps):
    """The target steps a block took in this iteration: every draft step whose positions were all
    committed."""
    dropped = [t for f, t in zip(fate, steps) if f == DROPPED]
    return min(dropped) - 1 if dropped else max(steps, default=0)
