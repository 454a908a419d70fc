"""Batches: several prompts decoded together, a row each. A reader of one prompt can skip this file.

Every decoder keeps one Row per prompt (its place in the batch, the tokens returned so far, what
its decode did) and its decoding state in tensors with a row each. Rows are ragged: prompts of any
lengths, blocks finished and stops met at different times. So the KV cache keeps a length per row
(model.KVCache), one forward packs rows of different widths (mask.pack), and a row whose output is
final leaves the batch (retire), taking its cache rows with it.
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
    drafted: int = 0  # tokens the draft proposed
    accepted: int = 0  # drafted tokens committed as drafted
    matched: int = 0  # proposed steps the target committed exactly as proposed
    draft_matched: int = 0  # of them, the draft's
    width: int = 0  # query tokens of the target forwards
    seconds: float = 0.0  # decoding, prefill excluded
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0  # of `seconds`, drafting


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


def clock(device):
    """The time, once the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Batch:
    """A batch's rows and its results. take() adds a row's new tokens (trimmed at a stop token and
    at max_new_tokens, streamed to callback(i, tokens)); a row whose output is final gets its
    Stats completed and on_row(i, tokens, stats) called; retire() lets the finished rows go."""

    def __init__(self, rows, settings, device, callback=None, on_row=None):
        self.rows = rows
        self.results = [None] * len(rows)
        self.settings, self.device, self.callback, self.on_row = settings, device, callback, on_row
        self.started = clock(device)

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
            row.stats.seconds = clock(self.device) - self.started
            self.results[row.index] = (row.out, row.stats)
            if self.on_row:
                self.on_row(row.index, row.out, row.stats)
        return new

    def retire(self, caches=()):
        """The places of the rows still decoding, or None when none finished; the finished rows
        leave, and their cache rows with them (one copy of the others')."""
        going = [r for r, row in enumerate(self.rows) if not row.finished]
        if len(going) == len(self.rows):
            return None
        self.rows = [self.rows[r] for r in going]
        for cache in caches:
            if cache is not None:
                cache.keep_rows(going)
        return going

    def returned(self, batch):
        """What generate returns: (tokens, Stats), or for a batch a list of each."""
        return tuple(map(list, zip(*self.results))) if batch else self.results[0]
