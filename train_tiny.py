"""Toy models trained on a CPU in minutes: SDAR (block-diffusion) targets and drafts and a Qwen3
(autoregressive) target, on two chat tasks. Bytes are tokens (the tokenizer is byte-level).

sort: one right answer, scored by exact match. Answers are 24-36 bytes: 6-9 blocks of 4.
    user: sort 31415926                       assistant: [1, 1, 2, 3, 4, 5, 6, 9]<|im_end|>
walk: many right answers, scored by validity: n steps of +-1 from a to b that never leave lo-hi,
written as moves. Answers are 21-29 bytes (mean 25); training draws one uniformly among the valid.
    user: walk 3 to 5 in 6 steps within 2-6   assistant: 3+4-3+4-3+4+5<|im_end|>
A confident model writes a sort in parallel for free: the target alone, revealing every position
above 0.9 confidence per step, writes 3.3 tokens per forward at block 4 and loses nothing. Like
chat text, a walk has many plausible continuations: each move is a free choice, and a sign and the
digit after it are uncertain jointly but sharp given each other, so parallel decoding has a price.
The walk target (block 4, greedy, 200 held-out prompts) is valid 97.0% of the time at one position
per step, 96.0% revealing above 0.9 confidence (1.23 tokens per forward), 76.5% above 0.7 (1.68).

SDAR training: [x_t ; x_0] (noisy half, clean half) at shared positions under mask.training, each
response token of x_t masked with probability p ~ U(1e-3, 1), cross-entropy at the masked x_t
positions weighted by 1/p; block length 4 or 8 per batch, so one checkpoint decodes with either.
AR training: next-token cross-entropy under a causal mask on the answer and its stop token.

One SDAR pair per task, a 6-layer target and a 1-layer draft, whose forward costs ~1/4.5 of the
target's (~0.45 ms per layer plus ~0.2 ms, nearly whatever the width); a draft trained on both
tasks got 6-37% of sorts right, against 76% alone. One AR model, the target's shape, for both.
Held-out greedy scores (200 prompts, block 4): sort target 95.5%, draft 75.5%; walk target 97.0%,
draft 44.5%; AR 98% on each task.

`python train_tiny.py` (about 4 minutes on 2 CPU cores) writes out/tiny-{target, draft,
walk-target, walk-draft, ar}: config.json, model.safetensors and byte-level tokenizer files, read
by model.load and model.load_tokenizer; tiny-ar is a Qwen3 folder, without a mask token.
"""
import argparse
import fcntl
import functools
import math
import multiprocessing
import random
import re
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

import mask as masks
import model as sdar

ROOT = Path(__file__).parent
TARGET_DIR = ROOT / "out" / "tiny-target"  # the sort pair
DRAFT_DIR = ROOT / "out" / "tiny-draft"
WALK_TARGET_DIR = ROOT / "out" / "tiny-walk-target"  # the walk pair
WALK_DRAFT_DIR = ROOT / "out" / "tiny-walk-draft"
AR_DIR = ROOT / "out" / "tiny-ar"  # the AR target of both tasks
BLOCKS = (4, 8)  # drawn per batch; config.json leaves block_size unset, so decode accepts both

# ----------------------------------------------------------------------------- the tasks

TASKS = ("sort", "walk")


def _draw_sort(rng):
    """One (prompt, answer): 8-12 random digits and their sorted list."""
    xs = [rng.randrange(10) for _ in range(rng.randint(8, 12))]
    return f"sort {''.join(map(str, xs))}", str(sorted(xs))


@functools.cache
def _walks(x, k, b, lo, hi):
    """How many walks of k steps of +-1 go from x to b without leaving lo..hi."""
    if not lo <= x <= hi:
        return 0
    return int(x == b) if k == 0 else _walks(x - 1, k - 1, b, lo, hi) + _walks(x + 1, k - 1, b, lo, hi)


def _draw_walk(rng):
    """One (prompt, answer), the walk uniform among the valid ones (each step goes down with the
    share of valid walks that do), so the model learns their spread rather than one favourite."""
    while True:
        lo, hi = sorted(rng.sample(range(10), 2))
        a, b, n = rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(10, 14)
        if _walks(a, n, b, lo, hi):  # parity can make (a, b, n) impossible
            break
    xs = [a]
    for k in range(n, 0, -1):
        down, up = _walks(xs[-1] - 1, k - 1, b, lo, hi), _walks(xs[-1] + 1, k - 1, b, lo, hi)
        xs.append(xs[-1] - 1 if rng.random() * (down + up) < down else xs[-1] + 1)
    moves = "".join(("+" if y > x else "-") + str(y) for x, y in zip(xs, xs[1:]))
    return f"walk {a} to {b} in {n} steps within {lo}-{hi}", f"{a}{moves}"


DRAW = {"sort": _draw_sort, "walk": _draw_walk}


def _is_heldout(prompt):
    """A fixed eighth of all prompts, chosen by hash: the splits never share a prompt."""
    return zlib.crc32(prompt.encode()) % 8 == 0


def examples(n, split="heldout", seed=0, task="sort"):
    """n (prompt, answer) pairs, the same for the same (split, seed, task). The splits draw from
    different seed streams and are disjoint sets of prompts (_is_heldout). Held-out prompts are
    distinct (a repeat would count twice); training repeats walk prompts with fresh answers.
    For walk, the answer is one valid answer of many: score with score(), not ==."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use one of {TASKS}")
    # A str seed is hashed with sha512: stable across runs. sort keeps its original stream.
    rng = random.Random(f"{split}:{seed}" if task == "sort" else f"{task}:{split}:{seed}")
    out, seen = [], set()
    for _ in range(100 * n + 10_000):  # bounded: there are only ~380 held-out walk prompts
        if len(out) == n:
            return out
        prompt, answer = DRAW[task](rng)
        if _is_heldout(prompt) == (split == "heldout") and not (split == "heldout" and prompt in seen):
            seen.add(prompt)
            out.append((prompt, answer))
    if len(out) < n:
        raise ValueError(f"asked for {n} distinct held-out {task} prompts; found only {len(out)}")
    return out


def task_of(prompt):
    """The task a prompt belongs to: its first word ("walk 3 to 5 ..."), else sort."""
    return "walk" if prompt.startswith("walk ") else "sort"


def score(prompt, prediction, answer):
    """sort: exact match after stripping surrounding whitespace (' [1, 2]\\n' counts; '[1,2]' and
    '[1, 2] done' do not: the spacing inside is part of the format the model learns).
    walk: validity, whatever the reference answer says (see _valid_walk)."""
    if task_of(prompt) == "walk":
        return _valid_walk(prompt, prediction)
    return prediction.strip() == answer.strip()


def _valid_walk(prompt, prediction):
    """'3+4-3+4+5' answers 'walk 3 to 5 in 4 steps within 2-6': n moves from a ending on b,
    each sign agreeing with its step of exactly 1, every digit within lo..hi."""
    a, b, n, lo, hi = map(int, re.fullmatch(r"walk (\d) to (\d) in (\d+) steps within (\d)-(\d)", prompt).groups())
    s = prediction.strip()
    if not re.fullmatch(r"\d([+-]\d)*", s):
        return False
    xs = [int(c) for c in s[::2]]
    return (len(xs) == n + 1 and xs[0] == a and xs[-1] == b and all(lo <= x <= hi for x in xs)
            and all(y - x == (1 if sign == "+" else -1) for sign, x, y in zip(s[1::2], xs, xs[1:])))


# ----------------------------------------------------------------------------- models

# name: (shape, default steps, default learning rate, tasks). Heads 4 (kv 2), head_dim = width / 4.
# One pair per task: mixing both tasks costs the one-layer draft its sorting (see the docstring).
# "ar" is the target's shape trained as a Qwen3 (next-token, causal), on both tasks at once.
TARGET = dict(num_hidden_layers=6, hidden_size=48, intermediate_size=144)
DRAFT = dict(num_hidden_layers=1, hidden_size=40, intermediate_size=120)
PRESETS = {
    "target": (TARGET, 600, 5e-3, ("sort",)),  # the 6-layer models first: see main
    "walk-target": (TARGET, 900, 5e-3, ("walk",)),
    "ar": ({**TARGET, "model_type": "qwen3"}, 600, 5e-3, TASKS),
    "draft": (DRAFT, 1300, 1e-2, ("sort",)),
    "walk-draft": (DRAFT, 2600, 1e-2, ("walk",)),
}
AR_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # a Qwen3 tokenizer has no <|MASK|>


def config(name, tok):
    """The Config of a preset. block_size stays None: trained on 4 and 8. The AR model keeps all
    260 embedding rows (as Qwen3 pads its embedding past its tokenizer): one id space for all."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: use one of {list(PRESETS)}")
    ar = PRESETS[name][0].get("model_type") == "qwen3"
    return sdar.Config(vocab_size=tok.vocab_size, num_attention_heads=4, num_key_value_heads=2,
                       rope_theta=1e4, max_position_embeddings=1024, mask_token_id=None if ar else tok.mask_id,
                       block_size=None, **PRESETS[name][0])


def init_model(config, seed=0):
    """PyTorch's default init (Linear: uniform(+-1/sqrt(fan_in)); Embedding: N(0, 1)), with the
    projections that write into the residual stream scaled by 1/sqrt(2 * layers) as in GPT-2.
    Qwen's std 0.02 is meant for width 4096: at width 48 it starves the signal, and the deep
    target sat on a plateau for hundreds of steps."""
    torch.manual_seed(seed)
    m = sdar.Transformer(config)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_((2 * config.num_hidden_layers) ** -0.5)
    return m


# ----------------------------------------------------------------------------- objectives

def batch(pairs, tok, device="cpu"):
    """x0 (B, n) token ids and is_resp (B, n) bool. Row: chat prompt, answer bytes, <|im_end|>,
    then <|endoftext|> up to the longest row. Pads count as response, as in SDAR (it pads with
    EOS and trains on it): decoding fills the rest of the stop token's block the same way, so the
    model learns what follows a stop instead of seeing never-trained context there."""
    stop, pad = tok.id_of("<|im_end|>"), tok.id_of("<|endoftext|>")
    rows = [(tok.chat(p), tok.encode(a) + [stop]) for p, a in pairs]
    n = max(len(p) + len(r) for p, r in rows)
    x0 = torch.tensor([p + r + [pad] * (n - len(p) - len(r)) for p, r in rows], device=device)
    starts = torch.tensor([len(p) for p, _ in rows], device=device)
    return x0, torch.arange(n, device=device)[None] >= starts[:, None]


def noise(x0, is_resp, mask_id, generator=None):
    """x_t: each response token masked with probability p ~ U(1e-3, 1), one p per row; a row
    left with no masked token gets one uniformly chosen response token masked.
    Returns x_t (B, n), masked (B, n) bool, p (B, 1)."""
    B, n = x0.shape
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=x0.device)  # noqa: E731
    p = 1e-3 + (1 - 1e-3) * rand(B, 1)
    masked = (rand(B, n) < p) & is_resp
    fallback = rand(B, n).masked_fill(~is_resp, -1.0).argmax(1)  # a random response position
    masked[torch.arange(B, device=x0.device), fallback] |= ~masked.any(1)
    return torch.where(masked, mask_id, x0), masked, p


def sdar_loss(model, x0, is_resp, block, mask_id, generator=None):
    """Sum over masked x_t positions of cross-entropy / p, divided by the number of response
    tokens in the batch (pads included). No shift: the logits at i predict x0[i]."""
    xt, masked, p = noise(x0, is_resp, mask_id, generator)
    n = x0.shape[1]
    # x_t blocks holding only prompt tokens (in every row) have no loss and no other x_t block
    # sees them (x_t block b sees x_t block b and x_0 blocks < b): dropping them changes nothing
    # but saves a quarter of the work.
    cut = int(is_resp.float().argmax(1).min()) // block * block
    pos = torch.cat([torch.arange(cut, n), torch.arange(n)]).to(x0.device)  # x_t, x_0 share positions
    attn = masks.training(n, block, x0.device)[cut:, cut:]
    logits = model(torch.cat([xt[:, cut:], x0], 1), pos, attn)[:, :n - cut]  # (B, n - cut, V)
    sel = masked[:, cut:]
    ce = F.cross_entropy(logits[sel].float(), x0[:, cut:][sel], reduction="none")  # (masked,)
    return (ce / p.expand(-1, n)[:, cut:][sel]).sum() / is_resp.sum()


def ar_loss(model, x0, is_resp, pad_id):
    """Next-token cross-entropy, averaged over the answer tokens and the stop token: the logits
    at i predict x0[i + 1] under a causal mask. Pads after the stop are left out: AR decoding
    ends at the stop token, so nothing is ever generated after it."""
    n = x0.shape[1]
    logits = model(x0[:, :-1], torch.arange(n - 1, device=x0.device),
                   masks.block_causal(n - 1, 1, device=x0.device))  # (B, n - 1, V)
    sel = (is_resp & (x0 != pad_id))[:, 1:]
    return F.cross_entropy(logits[sel].float(), x0[:, 1:][sel])


# ----------------------------------------------------------------------------- training

def train(model, tok, *, steps, batch_size, lr, seed=0, tasks=TASKS, device="cpu", log_every=5.0, name="model"):
    """AdamW, 5% warmup then cosine decay to lr/10. Every batch mixes the tasks evenly; an SDAR
    model draws one block length per batch. The objective follows config.model_type. Prints a
    progress line every log_every seconds (None: silent). Returns the model in eval mode."""
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    per_task = -(-steps * batch_size // len(tasks))
    data = [ex for group in zip(*(examples(per_task, "train", seed, t) for t in tasks)) for ex in group]
    gen, rng = torch.Generator(device).manual_seed(seed), random.Random(seed)
    ar, pad = model.config.model_type == "qwen3", tok.id_of("<|endoftext|>")
    t0 = last = time.perf_counter()
    tokens, losses = 0, []
    for step in range(steps):
        warmup = min(1.0, (step + 1) / (0.05 * steps))
        for g in opt.param_groups:
            g["lr"] = lr * warmup * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        x0, is_resp = batch(data[step * batch_size:(step + 1) * batch_size], tok, device)
        with torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
            loss = ar_loss(model, x0, is_resp, pad) if ar else \
                sdar_loss(model, x0, is_resp, rng.choice(BLOCKS), tok.mask_id, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # 1/p weights make rare huge steps
        opt.step()
        tokens += x0.numel() * (1 if ar else 2)  # SDAR's [x_t ; x_0], trimmed prompt blocks included
        losses.append(loss.item())
        now = time.perf_counter()
        if log_every is not None and (now - last > log_every or step + 1 == steps):
            el = now - t0
            print(f"  {name} step {step + 1:4d}/{steps}  loss {sum(losses) / len(losses):.3f}  "
                  f"{tokens / el:6.0f} tok/s  {el:4.0f}s elapsed  eta {el / (step + 1) * (steps - step - 1):3.0f}s",
                  flush=True)
            last, losses = now, []
    return model.eval()


def evaluate(model, tok, n=100, block=4, seed=0, task="sort"):
    """Held-out score of greedy decoding: vanilla block diffusion with one token per step for an
    SDAR model, next-token decoding for an AR one (block unused)."""
    import decode  # decode imports model and mask only; importing it late keeps this file standalone
    hits = 0
    for prompt, answer in examples(n, "heldout", seed, task):
        if model.config.model_type == "qwen3":
            ids, _ = decode.generate_ar(model, tok.chat(prompt), 48, stop_ids=tok.stop_ids)
        else:
            ids, _ = decode.generate(model, tok.chat(prompt), 48, block=block, stop_ids=tok.stop_ids,
                                     mask_id=tok.mask_id)
        hits += score(prompt, tok.decode(ids), answer)
    return hits / n


def byte_tokenizer():
    """The toys' tokenizer: ids 0-255 are bytes, then <|endoftext|> <|im_start|> <|im_end|>
    <|MASK|> (256-259). Every preset trains with it; the AR folder is written without the mask."""
    with tempfile.TemporaryDirectory() as folder:
        return sdar.load_tokenizer(sdar.write_byte_tokenizer(folder))


def write(model, folder):
    """A checkpoint folder: tokenizer files, then model.safetensors, then config.json (each
    written atomically), so a folder with config.json holds a finished model. An AR model gets
    a tokenizer without <|MASK|>, like a real Qwen3."""
    ar = model.config.model_type == "qwen3"
    sdar.write_byte_tokenizer(folder, **({"specials": AR_SPECIALS} if ar else {}))
    sdar.save(model, folder)


def pair(task):
    """(target folder, draft folder) of the SDAR pair trained on task, one of TASKS."""
    return {"sort": (TARGET_DIR, DRAFT_DIR), "walk": (WALK_TARGET_DIR, WALK_DRAFT_DIR)}[task]


def tasks_of(folder):
    """The tasks a toy folder was trained on, or None for any other folder."""
    trained = {TARGET_DIR: ("sort",), DRAFT_DIR: ("sort",), WALK_TARGET_DIR: ("walk",), WALK_DRAFT_DIR: ("walk",),
               AR_DIR: TASKS}
    return {Path(k).resolve(): v for k, v in trained.items()}.get(Path(folder).resolve())


def complete(folder):
    files = ("vocab.json", "tokenizer_config.json", "model.safetensors", "config.json")
    return all((Path(folder) / f).is_file() for f in files)


# ----------------------------------------------------------------------------- entry points

def ensure_trained(quiet=False):
    """Train every toy with the defaults of `python train_tiny.py` unless each folder holds a
    complete checkpoint (a folder left half-written by an interrupted run does not). A lock file
    in out/ serialises first runs started together: the second waits, then finds the models.
    quiet: print only the one line saying that it trains."""
    folders = (TARGET_DIR, DRAFT_DIR, WALK_TARGET_DIR, WALK_DRAFT_DIR, AR_DIR)
    if all(map(complete, folders)):
        return
    out = TARGET_DIR.parent
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train_tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if all(map(complete, folders)):
            return
        print(f"training the toy models into {out} (about 4 minutes on 2 CPU cores)...", flush=True)
        main(["--eval", "0", "--out", str(out)] + (["--quiet"] if quiet else []))


def run_preset(name, args):
    """Train one preset, write its folder, score it; runs in a worker process.
    Returns (training seconds, {(task, block or None): held-out score})."""
    torch.set_num_threads(1)
    tok = byte_tokenizer()
    shape, steps, lr, tasks = PRESETS[name]
    steps, lr, tasks = args.steps or steps, args.lr or lr, args.tasks or tasks
    m = init_model(config(name, tok), args.seed)
    if not args.quiet:
        print(f"{name}: {shape['num_hidden_layers']} layer(s), width {shape['hidden_size']}, "
              f"{sum(p.numel() for p in m.parameters()) / 1e3:.0f}k parameters, {steps} steps of "
              f"{args.batch_size} on {'+'.join(tasks)}", flush=True)
    t0 = time.perf_counter()
    m = train(m, tok, steps=steps, batch_size=args.batch_size, lr=lr, seed=args.seed, tasks=tasks,
              device=args.device, log_every=None if args.quiet else 5.0, name=name)
    seconds = time.perf_counter() - t0
    write(m.cpu(), args.out / f"tiny-{name}")
    blocks = [None] if m.config.model_type == "qwen3" else args.eval_blocks
    return seconds, {(task, block): evaluate(m.cpu(), tok, args.eval, block, task=task)
                     for task in tasks for block in blocks if args.eval}


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train the toy models (an SDAR target and draft per task, one "
                                 "AR Qwen3 target for both) and write them as checkpoint folders.")
    ap.add_argument("--preset", nargs="+", choices=[*PRESETS, "all"], default=["all"],
                    help=f"models to train (default: all, i.e. {' '.join(PRESETS)})")
    ap.add_argument("--tasks", nargs="+", choices=TASKS, help="train every chosen preset on these tasks, "
                    "mixed evenly in each batch (default: each preset's own)")
    ap.add_argument("--steps", type=int, help="optimizer steps (default: " +
                    ", ".join(f"{k} {v[1]}" for k, v in PRESETS.items()) + ")")
    ap.add_argument("--batch-size", type=int, default=32, help="sequences per step (default 32)")
    ap.add_argument("--lr", type=float, help="peak learning rate (default: " +
                    ", ".join(f"{k} {v[2]:g}" for k, v in PRESETS.items()) + ")")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights, data and noise (default 0)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda trains under bf16 autocast")
    ap.add_argument("--out", type=Path, default=ROOT / "out", help="writes OUT/tiny-<preset> (default: ./out)")
    ap.add_argument("--workers", type=int, default=2, help="models trained at once, one process each (default 2)")
    ap.add_argument("--eval", type=int, default=100, metavar="N",
                    help="held-out prompts per task to score after training (default 100; 0: skip)")
    ap.add_argument("--eval-blocks", type=int, nargs="+", default=[4], metavar="B",
                    help="block lengths to score the SDAR models at (default: 4)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    names = [n for n in PRESETS if "all" in args.preset or n in args.preset]
    # One single-threaded process per model: at these sizes a second thread buys ~10% (per-op
    # overhead dominates), and threads that wait on each other slow down manyfold when anything
    # else runs on the machine. PRESETS lists the 6-layer models first (an SDAR step costs ~2x
    # an AR step: twice the tokens), so the short draft jobs fill in at the end.
    # spawn, not fork: fork after torch's threads start can hang.
    t0 = time.perf_counter()
    with ProcessPoolExecutor(min(args.workers, len(names)), mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {name: pool.submit(run_preset, name, args) for name in names}
        results = {name: job.result() for name, job in jobs.items()}
    for name, (seconds, scores) in results.items():
        print(f"{name}: trained in {seconds:.0f}s" + "".join(
            f"; held-out {task} {acc:.1%} of {args.eval} ({'AR' if block is None else f'block {block}'}, greedy)"
            for (task, block), acc in scores.items()))
    if not args.quiet:
        print(f"wrote {', '.join(str(args.out / f'tiny-{n}') for n in names)} in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
