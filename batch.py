"""Batches: several prompts decoded together, a row each. A reader of one prompt can skip this file.

Every decoder keeps one Row per prompt on the host (its place in the batch, the tokens returned so
far, what its decode did) and its decoding state in tensors on the device, a row each. Rows are
ragged: prompts of any lengths, blocks finished and stops met at different times. So the KV cache
keeps a length per row (model.KVCache), a forward lays out rows of different widths with padding
that nothing sees, and a row whose output is final stays in the tensors as a dead row (it commits
nothing) until at least half the rows are dead; then one copy drops them all (compact). A dead row
costs its share of each forward; dropping each at once would copy every other row's cache for each
row that finishes.
"""
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Stats:
    """What one decode did; the same fields for every decoder. Forwards count decoding only (the
    prefill apart); a step is one denoising step of a block (AR decoding: one token)."""
    tokens: int = 0  # tokens returned
    forwards: int = 0  # target forwards
    steps: int = 0  # target steps committed (the target alone: one per forward)
    draft_forwards: int = 0
    drafted: int = 0  # tokens proposed (lossless: of the proposals the target checked)
    accepted: int = 0  # of them, committed as proposed
    matched: int = 0  # proposed steps the target committed exactly as proposed
    draft_matched: int = 0  # of them, the draft's
    width: int = 0  # query tokens of the target forwards
    seconds: float = 0.0  # decoding, prefill excluded
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0  # of `seconds`, drafting (host time: on CUDA, its launches)
    readbacks: int = 0  # host syncs while decoding (the readbacks of the loop)


@dataclass
class Row:
    """One prompt of a batch: its place (index), the tokens returned so far, what its decode did,
    and whether its output is final."""
    index: int
    out: list = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)
    finished: bool = False


def as_batch(prompts, device):
    """(whether prompts is a batch, its prompts as tensors): one prompt is a sequence of ids, a
    batch a list of them (of any lengths)."""
    batch = isinstance(prompts, (list, tuple)) and len(prompts) > 0 and not isinstance(
        prompts[0], int)
    if batch and any(isinstance(p, int) for p in prompts):
        raise ValueError("a batch is a list of prompts, each a list of token ids")
    out = [torch.as_tensor(list(p), dtype=torch.long, device=device)
           for p in (prompts if batch else [prompts])]
    if any(len(p) == 0 for p in out):
        raise ValueError("the prompt is empty; decoding starts from at least one token")
    return batch, out


def trim(tokens, stop_ids, room):
    """(tokens before the first stop token, at most `room` of them; True when decoding is done)."""
    for i, token in enumerate(tokens[:room]):
        if token in stop_ids:
            return tokens[:i], True
    return tokens[:room], len(tokens) >= room


def finishes(tokens, n, returned, max_new_tokens, stops):
    """(R,) bool, on the device: the rows whose new tokens, tokens (R, W) of which row r's first
    n[r] are real, hold a stop token (stops (K,)) within max_new_tokens, or reach it, after
    `returned` (R,) tokens. trim() decides the same on the host."""
    order = torch.arange(tokens.shape[1], device=tokens.device)
    within = (order < n[:, None]) & (order < max_new_tokens - returned[:, None])
    stopped = (torch.isin(tokens, stops) & within).any(-1)
    return stopped | (returned + n >= max_new_tokens)


def clock(device):
    """The time, once the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Batch:
    """A batch's rows and its results. take() adds a row's new tokens (trimmed at a stop token and
    at max_new_tokens, streamed to callback(i, tokens)); a row whose output is final gets its
    Stats completed and on_row(i, tokens, stats) called; compact() says when the dead rows go."""

    def __init__(self, rows, settings, device, callback=None, on_row=None):
        self.rows = rows
        self.results = [None] * len(rows)
        self.settings, self.device, self.callback, self.on_row = settings, device, callback, on_row
        self.started = clock(device)

    @property
    def live(self):
        return [row for row in self.rows if not row.finished]

    def begin(self):
        """Decoding starts: the time since the batch was made is its prefill's."""
        now = clock(self.device)
        for row in self.rows:
            row.stats.prefill_seconds = now - self.started
        self.started = now

    def take(self, row, tokens):
        """Row's new tokens, as returned; marks the row finished at a stop token or the budget."""
        s = self.settings
        new, row.finished = trim(tokens, s.stop_ids, s.max_new_tokens - len(row.out))
        row.out += new
        if self.callback and new:
            self.callback(row.index, new)
        if row.finished:
            row.stats.tokens = len(row.out)
            row.stats.seconds = time.perf_counter() - self.started
            self.results[row.index] = (row.out, row.stats)
            if self.on_row:
                self.on_row(row.index, row.out, row.stats)
        return new

    def compact(self, dead):
        """When at least half the rows are dead, the live ones, which are all that stay: their
        index on the device (from `dead` (R,) bool there: no host sync) and on the host; else
        (None, None)."""
        places = [r for r, row in enumerate(self.rows) if not row.finished]
        if len(places) == len(self.rows) or 2 * len(places) > len(self.rows):
            return None, None
        self.rows = [self.rows[r] for r in places]
        return torch.argsort(dead.long(), stable=True)[:len(places)], places

    def returned(self, batch):
        """What generate returns: (tokens, Stats), or for a batch a list of each."""
        return tuple(map(list, zip(*self.results))) if batch else self.results[0]
