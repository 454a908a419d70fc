"""What the target checks in its one forward: the verifications, each with the same two calls.

  layout(run, chains) -> Laid: one target forward's ids, positions and attention for every row, and
                         which of its tokens verify;
  accept(run, laid, q) -> Verdict: from the target's distributions at those tokens, what each row
                         commits, and beside it what the stats and --show read.
Paper (the paper's acceptance, on exact copies or its own layout) and Causal (SpecDiff: an
autoregressive target, in position order) are here; Lossless (the target's own step from every
proposed state) is in lossless.py. Every row is verified at once, in tensors (R rows); nothing here
reads a value back to the host (speculative.py reads each iteration's verdict once).

A proposer's Chain holds, per row, the blocks it proposed and the state before each of its steps. A
chain (or a trie of two, lossless.py) is laid out as a Tree of states, one copy of the block per
state, packed: each row holds its own states, then padding that nothing sees.
"""
import functools
from collections import namedtuple
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import mask as masks
from simsd import in_time_order, judge

DRAFT, SELF = 1, 2  # who proposed a state (a state both proposed: both flags)
# A position's fate in an iteration, as --show reads it.
KNOWN, ACCEPTED, TARGET, DROPPED = 0, 1, 2, 3  # known before (or never proposed); committed as
# proposed; committed with the target's own token; proposed and not committed

# One target forward for every row: ids, positions (R, T), attention (R, T, T); verifying (R, M):
# the tokens whose distributions accept reads; a tree's layout: its nodes (the tree's states in
# their packed places, as a Tree) and its Shape (tree_shapes'); the offsets of the clean copies of
# blocks 0.. (R, C) (the paper's).
Laid = namedtuple("Laid", "ids pos mask verifying nodes shape clean")


@dataclass
class Verdict:
    """What each row commits (R rows, on the device). tokens (R, J, B): the blocks from the current
    one after the commit, and which of their positions are known (R, J, B) (elsewhere the mask
    id); done (R,): target steps taken on the first incomplete one; keep (R, K), n_keep (R,): the
    offsets in the forward of the tokens the target's cache keeps, and how many; pending (R, P),
    n_pending (R,): what the target has not cached yet, fed first next time; kept (R,): the
    leading drafted blocks the draft's cache keeps; hint (R, B, V) and hidden (R, B, d; lossless
    only), where has_hint (R,): the target's distributions and final hidden states at the state
    its last step was taken from, when that block goes on. stats {name: (R,)}: steps (target
    steps taken), matched (of them, proposed steps taken as proposed), by_draft (of those, the
    draft's), proposed and accepted (tokens of the checked proposals, and of them those
    committed as proposed). trace: what --show reads (speculative.trace)."""
    tokens: torch.Tensor
    known: torch.Tensor
    done: torch.Tensor
    keep: torch.Tensor
    n_keep: torch.Tensor
    pending: torch.Tensor
    n_pending: torch.Tensor
    kept: torch.Tensor
    hint: torch.Tensor
    has_hint: torch.Tensor
    stats: dict
    trace: dict
    hidden: torch.Tensor | None = None


@dataclass
class Chain:
    """A proposer's chain for every row (R rows, D blocks, S steps a block): tokens (R, D, B), each
    block as proposed; step (R, D, B), the step that revealed each position (0: known before);
    states (R, D, S, B), the block before each step; picks (R, D, S, B) and probs (R, D, S, B, V;
    None when greedy): the proposer's pick at every position of each state and its distribution;
    real (R, D, S): the proposer took that step (its state had a masked position) on a block the
    row reaches; tail (R,): the row also reaches the block after the last, through its all-masked
    state, which no proposer proposed (lossless: the target decides it alone)."""
    tokens: torch.Tensor
    step: torch.Tensor
    states: torch.Tensor
    picks: torch.Tensor
    probs: torch.Tensor | None
    real: torch.Tensor
    tail: torch.Tensor


# ----------------------------------------------------------------------------- trees

class Tree:
    """States as a tree per row (R rows, N nodes; node 0 is the current state; a parent comes before
    its children), kept as one table of longs (R, N, 4B + 6), a line per node, whose fields are
    views: states (R, N, B) (the mask id where masked); arrival (R, N, B): the state its parent's
    step must reach for the chain to enter it (its own; for a later block's first state, the
    block before it complete, laid out as a clean copy); picks (R, N, B): the proposer's draws
    there, where drawn (R, N) (their distributions: probs (R, N, B, V), apart; None when greedy);
    nxt (R, N, B): the state the proposer's own step from it reaches; done: the target steps
    taken on its block before the state; by: who proposed it; block: its block (0: the current
    one); parent (node 0: itself); alive: a state, not padding (all (R, N)). One table, so that a
    few operations build, cut and gather a tree."""
    COLUMNS = ("drawn", "done", "by", "block", "parent", "alive")  # after the four of B

    def __init__(self, table, probs, block):
        self.table, self.probs, self.B = table, probs, block

    @classmethod
    def of(cls, states, arrival, picks, nxt, probs, **columns):
        """A Tree from its fields ((R, N, B) each, and COLUMNS (R, N))."""
        extra = torch.stack([columns[name].long() for name in cls.COLUMNS], -1)
        return cls(torch.cat([states, arrival, picks, nxt, extra], -1), probs, states.shape[-1])

    def part(self, i):
        return self.table[..., i * self.B:(i + 1) * self.B]

    def column(self, name):
        return self.table[..., 4 * self.B + self.COLUMNS.index(name)]

    states = property(lambda self: self.part(0))
    arrival = property(lambda self: self.part(1))
    picks = property(lambda self: self.part(2))
    nxt = property(lambda self: self.part(3))
    drawn = property(lambda self: self.column("drawn").bool())
    done = property(lambda self: self.column("done"))
    by = property(lambda self: self.column("by"))
    block = property(lambda self: self.column("block"))
    parent = property(lambda self: self.column("parent"))
    alive = property(lambda self: self.column("alive").bool())

    def cut(self, start, end=None):
        """Nodes start..end of every row, as a Tree of their own (a copy)."""
        probs = None if self.probs is None else self.probs[:, start:end]
        return Tree(self.table[:, start:end].clone(), probs, self.B)

    def rows(self, index):
        """The rows at index, as a Tree."""
        return Tree(self.table[index], None if self.probs is None else self.probs[index], self.B)

    @staticmethod
    def cat(trees):
        """The trees' nodes one after another."""
        probs = [t.probs for t in trees]
        probs = None if probs[0] is None else torch.cat(probs, 1)
        return Tree(torch.cat([t.table for t in trees], 1), probs, trees[0].B)

    def nodes(self, index):
        """The nodes (R, K) of each row, as a Tree."""
        probs = None if self.probs is None else gather_rows(self.probs, index)
        return Tree(gather_rows(self.table, index), probs, self.B)

    def keys(self, n_pending, P, block, seen):
        """Each row's shape as the host read it back (seen: its alive, parent and block lists):
        the key of its layout (tree_shape): its alive slots, their parents among them (-1: the
        root) and blocks, with its pending tokens, P, its slots and the block length."""
        out = []
        for alive, parent, blocks, n in zip(seen["alive"], seen["parent"], seen["block"],
                                            n_pending):
            slots = [i for i, a in enumerate(alive) if a]
            place = {slot: n for n, slot in enumerate(slots)}
            out.append((tuple(slots), tuple(place[parent[i]] if i else -1 for i in slots),
                        tuple(blocks[i] for i in slots), n, P, len(alive), block))
        return tuple(out)


Shape = namedtuple("Shape", "slots parent block clean ancestors source positions attend state "
                   "copy width")


@functools.lru_cache(maxsize=4096)
def tree_shape(slots, parent, blocks, n_pending, P, n_slots, B, device):
    """One row's layout of a tree of states from its shape alone, built once per shape (a decode
    meets a few dozen): [pending | clean copies | one copy of the block per state] (mask.tree).
    slots: the tree's states (their places among the trie's slots); parent: each's parent among
    them (-1: the root); blocks: each's block; n_pending: its pending tokens (of P). Returns per
    node its slot, parent (the root: itself), block, whether it starts a later block than its
    parent's (clean), ancestors (N, N) (node n is m or descends from it); per token its source
    (an index into [pending (P) | per slot its state and arrival, B each]) and position
    (from the block's start); the attention; per node its state's first token and its clean
    copy's (-1: none); the width."""
    rows = []
    for n, p in enumerate(parent):
        row = list(rows[p]) if p >= 0 else [False] * len(parent)
        row[n] = True
        rows.append(row)
    ancestors = torch.tensor(rows, device=device)
    cleans = [n for n, p in enumerate(parent) if p >= 0 and blocks[n] > blocks[p]]
    whole = torch.ones(B, B, dtype=torch.bool, device=device)  # a copy sees itself whole
    attend = masks.tree([whole] * len(parent), n_pending, B, ancestors, cleans)
    C, offsets = len(cleans), range(B)
    source = [*range(n_pending)]  # a slot's state and arrival lie side by side, 2B a slot
    source += [P + (2 * slots[n] + 1) * B + i for n in cleans for i in offsets]  # arrivals
    source += [P + 2 * slot * B + i for slot in slots for i in offsets]
    positions = [*range(-n_pending, 0)] + [(blocks[n] - 1) * B + i for n in cleans for i in offsets]
    positions += [block * B + i for block in blocks for i in offsets]
    copy = [n_pending + cleans.index(n) * B if n in cleans else -1 for n in range(len(slots))]
    as_tensor = functools.partial(torch.tensor, device=device)
    return Shape(as_tensor(slots), as_tensor([max(p, 0) for p in parent]), as_tensor(blocks),
                 as_tensor([n in cleans for n in range(len(slots))]), ancestors,
                 as_tensor(source), as_tensor(positions), attend,
                 as_tensor([n_pending + (C + n) * B for n in range(len(slots))]), as_tensor(copy),
                 len(source))


@functools.lru_cache(maxsize=1024)
def tree_shapes(keys, device):
    """The rows' shapes (tree_shape of each key), padded to the widest row (T tokens, N nodes)
    and stacked, and which nodes are a row's (R, N): padding tokens see only themselves and
    nothing sees them; padding nodes are their own parents."""
    shapes = [tree_shape(*key, device) for key in keys]
    T, N = max(s.width for s in shapes), max(len(s.slots) for s in shapes)
    out = []
    for s in shapes:
        t, n = s.width, len(s.slots)
        attend = torch.eye(T, dtype=torch.bool, device=device)
        attend[:t, :t] = s.attend
        ancestors = torch.eye(N, dtype=torch.bool, device=device)
        ancestors[:n, :n] = s.ancestors
        pad = torch.arange(n, N, device=device)
        out.append((F.pad(s.slots, (0, N - n)), torch.cat([s.parent, pad]),
                    F.pad(s.block, (0, N - n)), F.pad(s.clean, (0, N - n)), ancestors,
                    F.pad(s.source, (0, T - t)), F.pad(s.positions, (0, T - t)), attend,
                    F.pad(s.state, (0, N - n)), F.pad(s.copy, (0, N - n), value=-1)))
    alive = torch.stack([torch.arange(N, device=device) < len(s.slots) for s in shapes])
    return Shape(*(torch.stack(x) for x in zip(*out)), T), alive


def lay_out_tree(trie, keys, rows):
    """One forward over every row's tree of states (a trie of slots, and the keys of the rows'
    shapes, as the host read them): a Laid, its ids gathered from the rows' pending tokens, their
    slots' states and arrivals, its positions from their blocks' starts, and its nodes packed."""
    shape, alive = tree_shapes(keys, rows.x.device)
    source = torch.cat([rows.pending.tokens, trie.table[..., :2 * trie.B].flatten(1)], 1)
    ids, pos = source.gather(1, shape.source), shape.positions + rows.start[:, None]
    B, T = trie.B, shape.source.shape[1]
    verifying = (shape.state[..., None] + torch.arange(B, device=ids.device)).flatten(1)
    nodes = trie.nodes(shape.slots)
    nodes.column("parent")[:], nodes.column("alive")[:] = shape.parent, alive
    return Laid(ids, pos, shape.attend, verifying.clamp(max=T - 1), nodes, shape, None)


def place_of(laid, slots):
    """(R, K): the packed places of the nodes that hold these slots (R, K) of the trie."""
    hold = (laid.shape.slots[:, :, None] == slots[:, None, :]) & laid.nodes.alive[..., None]
    return hold.long().argmax(1)


def chain_nodes(chain, flag, done, mask_id):
    """A chain's states as tree nodes, in chain order: per block its S states, then the tail (the
    first is the current state, node 0 of every tree), each node's parent its chain predecessor
    (the last real node before it; -1: none). A row's tail is the block after its last real one."""
    R, D, S, B = chain.states.shape
    dev = chain.states.device
    blocks = chain.real.any(-1).sum(1)  # (R,): the blocks the row reaches
    block = torch.cat([torch.arange(D, device=dev).repeat_interleave(S)[None].expand(R, -1),
                       blocks[:, None]], 1)  # (R, D S + 1)
    step = torch.cat([torch.arange(S, device=dev).repeat(D), blocks.new_zeros(1)])
    arrival = chain.states.clone()
    arrival[:, 1:, 0] = chain.tokens[:, :-1]  # a later block's first state: after the one before
    last_block = gather_rows(chain.tokens, (blocks - 1).clamp(min=0)[:, None])  # (R, 1, B)
    nxt = torch.cat([chain.states[:, :, 1:], chain.tokens[:, :, None]], 2)  # the proposer's steps
    blank = torch.full((R, 1, B), mask_id, device=dev)
    body = torch.cat([chain.states, arrival, chain.picks, nxt], -1).flatten(1, 2)  # (R, D S, 4B)
    tail = torch.cat([blank, last_block, blank * 0, blank], -1)  # (R, 1, 4B)
    real = torch.cat([chain.real.flatten(1), chain.tail[:, None]], 1)  # (R, D S + 1)
    index = torch.arange(real.shape[1], device=dev)
    last = torch.where(real, index, -1).cummax(1).values  # the last real node up to each
    parent = torch.cat([last.new_full((R, 1), -1), last[:, :-1]], 1)
    columns = torch.stack([real & (index < D * S), step + torch.where(block == 0, done[:, None], 0),
                           torch.full_like(block, flag), block, parent, real], -1).long()
    probs = None if chain.probs is None else torch.cat(
        [chain.probs.flatten(1, 2), torch.zeros_like(chain.probs[:, 0, :1])], 1)
    return Tree(torch.cat([torch.cat([body, tail], 1), columns], -1), probs, B)


def chain_tree(chain, flag, done, mask_id):
    """The Tree (unpacked) of one chain: its nodes, each hanging from its chain predecessor."""
    tree = chain_nodes(chain, flag, done, mask_id)
    tree.column("parent").clamp_(min=0)
    tree.column("alive")[:, 0] = 1  # the current state
    return tree


def gather_rows(x, index):
    """x (R, T, ...) at index (R, M): (R, M, ...)."""
    return x.gather(1, index.view(*index.shape, *[1] * (x.dim() - 2)).expand(
        *index.shape, *x.shape[2:]))


def readback(**tensors):
    """Tensors as lists (nested as their shapes), in one copy to the host: the loop's one host
    sync."""
    flat = torch.cat([t.reshape(-1).long() for t in tensors.values()]).tolist()
    out, i = {}, 0
    for name, t in tensors.items():
        values, i = flat[i:i + t.numel()], i + t.numel()
        for size in reversed(t.shape[1:]):
            values = [values[j:j + size] for j in range(0, len(values), size)]
        out[name] = values
    return out


# ----------------------------------------------------------------------------- the paper's

class Paper:
    """The paper's acceptance of a draft's chain of L blocks (lookahead): each drafted token judged
    (argmax, or rejection sampling) against the target at the token that verifies it, in time
    order: draft steps (accept="step"), or the paper's positions ("position"). Every token up to the
    first rejected rank is committed, a rejected one with the target's token. Block j is verified
    as if the blocks before it were stored as drafted (their clean copies), and entered only when
    they were committed whole. The layout: "exact", one copy of the block per draft state
    (mask.copies: exactly the target denoising along the draft's order), or "simsd", the paper's
    [block | B mask tokens] (mask.verify)."""

    tails = False

    def __init__(self, s):
        self.s = s

    def drafted(self, reach):
        return reach  # the draft drafts every block a forward reaches

    def tree(self, run, chains):
        """exact: the draft's chain as a tree of states (the host reads its shape back)."""
        if self.s.verify == "exact":
            return chain_tree(chains[DRAFT], DRAFT, run.rows.done, self.s.mask_id)
        return None

    def layout(self, run, chains):
        chain, s = chains[DRAFT], self.s
        if s.verify == "exact":  # one copy per draft state
            laid = lay_out_tree(run.trie, run.keys, run.rows)
            S, D = chain.states.shape[2], chain.tokens.shape[1]
            starts = torch.arange(1, D, device=laid.ids.device) * S  # later blocks' first states
            clean = laid.shape.copy.gather(1, place_of(laid, starts.expand(len(laid.ids), -1)))
            return laid._replace(clean=clean)
        return simsd_layout(chain, run.rows, s)

    def accept(self, run, laid, q):
        """q (R, M, V): the target's distributions at the verifying tokens."""
        chain, s = run.chains[DRAFT], self.s
        (R, D, B), V = chain.tokens.shape, q.shape[-1]
        S, dev = chain.states.shape[2], q.device
        t, d = chain.step, chain.tokens  # (R, D, B)
        drafted = (t > 0) & chain.real.any(-1)[..., None]  # on the blocks the row reaches
        own = (torch.arange(D, device=dev)[:, None] * S + t - 1).clamp(min=0).flatten(1)  # (R, DB)
        rows, position = torch.arange(R, device=dev)[:, None], torch.arange(B, device=dev).repeat(D)
        if s.verify == "exact":  # one copy per state: each position's at the state before its step
            q = q.view(R, -1, B, V)[rows, place_of(laid, own), position]
        p = None if s.sampling.greedy else chain.probs.flatten(1, 2)[rows, own, position]
        p = None if p is None else p.view(R, D, B, V)
        y, ok = judge(d, p, q.view(R, D, B, V), s.sampling, run.generator,
                      run.stops if s.stop_ids else (), s.eos_min_prob)
        rank = torch.arange(D, device=dev)[:, None]
        order = rank * (B + 1) + t if s.accept == "step" else (rank * B + position.view(D, B))
        order = order.expand(R, D, B).flatten(1)
        taken = in_time_order(ok.flatten(1) | ~drafted.flatten(1), order)  # (R, D B)
        committed = drafted & taken.view(R, D, B)
        out = drafted_fates(chain, run.rows, *(torch.cat([x, torch.zeros_like(x[:, :1])], 1)
                                               for x in (committed, y, ok)), s)
        n_pending = run.rows.pending.n
        e = torch.arange(run.rows.pending.tokens.shape[1] + (D - 1) * B, device=dev)
        clean = laid.clean.repeat_interleave(B, 1) + torch.arange(B, device=dev).repeat(D - 1)
        clean = torch.cat([clean, clean.new_zeros(R, 1)], 1)  # never empty (L = 1: unused)
        keep = torch.where(e < n_pending[:, None], e,
                           gather_rows(clean, (e - n_pending[:, None]).clamp(0, (D - 1) * B)))
        complete = out["known"].all(-1).long().cumprod(1).sum(1)
        pending = out["tokens"].gather(1, out["kept"][:, None, None].expand(R, 1, B))[:, 0]
        return verdict_of(out, keep, n_pending + out["kept"] * B, pending,
                          B * (complete > out["kept"]), run.rows, s)


def simsd_layout(chain, rows, s):
    """The paper's layout of every row's D drafted blocks: [pending | clean copies of blocks
    0..D-2, as drafted | per block j: its B tokens as drafted, then B mask tokens], the tokens of
    block j at positions start + jB.. (mask.verify for each block's 2B; a block's part and clean
    copy see the clean copies before it and the pending tokens)."""
    (R, D, B), dev = chain.tokens.shape, chain.tokens.device
    P = rows.pending.tokens.shape[1]
    parts = torch.stack([chain.tokens, torch.full_like(chain.tokens, s.mask_id)], 2)  # (R, D, 2, B)
    ids = torch.cat([rows.pending.tokens, chain.tokens[:, :-1].flatten(1), parts.flatten(1)], 1)
    offsets = torch.arange(B, device=dev)
    block_pos = rows.start[:, None, None] + B * torch.arange(D, device=dev)[:, None] + offsets
    pending_pos = rows.start[:, None] - rows.pending.n[:, None] + torch.arange(P, device=dev)
    pos = torch.cat([pending_pos, block_pos[:, :-1].flatten(1),
                     block_pos.repeat_interleave(2, 1).flatten(1)], 1)
    C = (D - 1) * B  # the parts' own masks: each block's mask.verify
    inner = simsd_mask(D, B, dev).expand(R, -1, -1).clone()
    inner[:, C:, C:] = block_diag_batched(masks.verify(chain.step))  # (R, D 2B, D 2B)
    real = torch.arange(P, device=dev) < rows.pending.n[:, None]  # (R, P)
    T = P + inner.shape[1]
    attend = torch.zeros(R, T, T, dtype=torch.bool, device=dev)
    attend[:, :P, :P] = masks.block_causal(P, B, device=dev) & real[:, None, :]
    attend[:, P:, :P] = real[:, None, :]
    attend[:, P:, P:] = inner
    attend |= torch.eye(T, dtype=torch.bool, device=dev)
    mask_rows = P + C + (torch.arange(D, device=dev)[:, None] * 2 * B + B + offsets).flatten()
    clean = P + B * torch.arange(D - 1, device=dev)
    return Laid(ids, pos, attend, mask_rows.expand(R, -1), None, None, clean.expand(R, -1))


@functools.lru_cache(maxsize=64)
def simsd_mask(D, B, device):
    """The paper's layout of D blocks, [clean copies of blocks 0..D-2 | per block its 2B], each
    part seeing itself whole (the caller puts in each part's own mask)."""
    whole = torch.ones(2 * B, 2 * B, dtype=torch.bool, device=device)
    chain = torch.ones(D, D, dtype=torch.bool, device=device).tril()
    return masks.tree([whole] * D, 0, B, chain, range(1, D))


def block_diag_batched(parts):
    """(R, D, n, n) -> (R, D n, D n): each row's D parts on the diagonal."""
    R, D, n, _ = parts.shape
    out = torch.zeros(R, D * n, D * n, dtype=parts.dtype, device=parts.device)
    for j in range(D):
        out[:, j * n:(j + 1) * n, j * n:(j + 1) * n] = parts[:, j]
    return out


# ----------------------------------------------------------------------------- SpecDiff

class Causal:
    """SpecDiff: an autoregressive target verifies [its pending token | every drafted token, in
    position order] causally (the logits at i predict i + 1), judging each drafted token by the
    logits before it (argmax, or rejection sampling). Tokens up to the first rejection are
    committed, that one with the target's token; when none is rejected, the token after the last
    drafted one (a bonus). Its cache keeps every committed token but the newest, which is pending.
    The current block's known tokens are a prefix (commits are prefixes): they sit in the layout as
    padding, so that every row has the same width."""

    tails = False

    def __init__(self, s):
        self.s = s

    def drafted(self, reach):
        return reach

    def tree(self, run, chains):
        return None

    def layout(self, run, chains):
        chain, rows = chains[DRAFT], run.rows
        (_, D, B), dev = chain.tokens.shape, chain.tokens.device
        slot = torch.arange(D * B, device=dev)
        known = rows.known.sum(-1)[:, None]  # (R, 1): the known prefix
        ids = torch.cat([rows.pending.tokens, chain.tokens.flatten(1)], 1)
        pos = torch.cat([rows.start[:, None] + known - 1, rows.start[:, None] + slot], 1)
        real = torch.cat([torch.ones_like(known, dtype=torch.bool), slot >= known], 1)  # (R, T)
        T = 1 + D * B
        attend = torch.ones(T, T, dtype=torch.bool, device=dev).tril() & real[:, None, :]
        attend |= torch.eye(T, dtype=torch.bool, device=dev)
        before = torch.where(slot <= known, 0, slot)  # the token before slot a: a - 1, or pending
        verifying = torch.cat([before, torch.full_like(known, D * B)], 1)
        return Laid(ids, pos, attend, verifying, None, None, None)

    def accept(self, run, laid, q):
        """q (R, DB + 1, V): the target's next-token distributions before each drafted slot, and
        after the last."""
        chain, rows, s = run.chains[DRAFT], run.rows, self.s
        (R, D, B), dev = chain.tokens.shape, chain.tokens.device
        S = chain.states.shape[2]
        slot = torch.arange(D * B, device=dev)
        skip = slot < rows.known.sum(-1)[:, None]  # the known prefix: not judged
        drafted = ~skip & chain.real.any(-1).repeat_interleave(B, 1)  # blocks the row reaches
        d = chain.tokens.flatten(1)
        p = None
        if not s.sampling.greedy:
            own = (slot // B * S + chain.step.flatten(1) - 1).clamp(min=0)  # (R, D B)
            p = chain.probs.flatten(1, 2)[torch.arange(R, device=dev)[:, None], own, slot % B]
        judged, ok = judge(d, p, q[:, :-1], s.sampling, run.generator)
        y = s.sampling.pick(q, run.generator)  # (R, D B + 1): the target's own, where nothing
        none = torch.zeros_like(skip[:, :1])   # was drafted, and the bonus after the last
        drafted = torch.cat([drafted, none], 1)
        y = torch.where(drafted, torch.cat([judged, judged[:, :1]], 1), y)
        ok = torch.cat([ok, none], 1) & drafted
        skip = torch.cat([skip, none], 1)
        committed = in_time_order(ok | skip, torch.arange(D * B + 1, device=dev)) & ~skip

        def grid(x):  # (R, D B + 1) -> (R, D + 1, B): the bonus at the next block's first place
            return torch.cat([x, torch.zeros_like(x[:, :B - 1])], 1).view(R, D + 1, B)
        out = drafted_fates(chain, rows, grid(committed), grid(y), grid(ok), s)
        accepted = (out["fate"] == ACCEPTED).sum((1, 2))
        n_keep = 1 + accepted  # the pending token and the accepted ones
        first = (~skip[:, :-1]).long().argmax(1)  # the first drafted slot
        keep = torch.cat([torch.zeros_like(first)[:, None], 1 + first[:, None] + slot], 1)
        newest = first + accepted  # the committed token after the accepted ones: pending next
        flat = out["tokens"].flatten(1)
        pending = flat.gather(1, newest[:, None])
        return verdict_of(out, keep, n_keep, pending, torch.ones_like(first), rows, s)


# ----------------------------------------------------------------------------- both

def drafted_fates(chain, rows, committed, tokens, as_drafted, s):
    """What the paper's and the causal acceptance committed of a draft's chain: committed (R, J, B)
    (J = D, or D + 1 for a row after the proposals) take `tokens`; as_drafted marks those
    committed as drafted. Returns the blocks after the commit, their fates, the target steps each
    block took, the leading blocks committed whole as drafted (kept), and the steps matched."""
    (R, D, B), J = chain.tokens.shape, committed.shape[1]

    def rows_of(x, fill):  # (R, D, B) -> (R, J, B)
        return torch.cat([x, torch.full((R, J - D, B), fill, dtype=x.dtype, device=x.device)], 1)
    reached = chain.real.any(-1)[..., None]  # (R, D, 1): blocks the row reaches
    step = rows_of(chain.step * reached, 0)
    later = torch.zeros_like(chain.tokens[:, 1:], dtype=torch.bool)
    known = rows_of(torch.cat([rows.known[:, None], later], 1), False)
    drafted = step > 0
    before = torch.where(known, rows_of(chain.tokens, s.mask_id), s.mask_id)
    fate = torch.where(committed, torch.where(as_drafted, ACCEPTED, TARGET),
                       torch.where(drafted, DROPPED, KNOWN))
    dropped = torch.where(fate == DROPPED, step, s.steps + 1).min(-1).values  # (R, J)
    taken = torch.where(dropped <= s.steps, dropped - 1, step.max(-1).values)  # whole steps
    whole = ((fate == KNOWN) | (fate == ACCEPTED)).all(-1) & (torch.arange(J, device=step.device)
                                                             < reached.sum((1, 2))[:, None] - 1)
    kept = whole.long().cumprod(1).sum(1)  # the last drafted block is never stored
    stepped = (drafted[..., None] & (step[..., None] == torch.arange(1, s.steps + 1,
                                                                     device=step.device)))
    matched = (stepped.any(2) & ~(stepped & (fate != ACCEPTED)[..., None]).any(2)).sum((1, 2))
    after = torch.where(committed, tokens, before)
    return dict(tokens=after, fate=fate, step=step, taken=taken, kept=kept, matched=matched,
                proposed=rows_of(chain.tokens, 0), known=known | committed,
                dropped_any=drafted.sum((1, 2)))


def verdict_of(out, keep, n_keep, pending, n_pending, rows, s):
    """The Verdict of the paper's and the causal acceptance, from drafted_fates' `out`."""
    R, J, B = out["tokens"].shape
    complete = (out["known"].all(-1)).long().cumprod(1).sum(1)  # leading complete blocks
    first = complete.clamp(max=J - 1)
    done = out["taken"].gather(1, first[:, None])[:, 0] + torch.where(first == 0, rows.done, 0)
    stats = dict(steps=out["taken"].sum(1), matched=out["matched"], by_draft=out["matched"],
                 proposed=out["dropped_any"], accepted=(out["fate"] == ACCEPTED).sum((1, 2)))
    trace = dict(fate=out["fate"], proposed=out["proposed"], steps=out["step"],
                 taken=out["taken"], stored=out["kept"], by=torch.ones_like(out["kept"]).bool())
    no_hint = torch.zeros(R, B, 1, device=done.device)  # a hint is lossless verification's
    return Verdict(out["tokens"], out["known"], done, keep, n_keep, pending, n_pending,
                   out["kept"], no_hint, done < 0, stats, trace)
