"""Vanilla SDAR block-diffusion decoding: a KV cache, the no-cache oracle, and `python decode.py`.

A block of B positions at absolute positions [kB, (k+1)B) starts as known tokens plus
masks. Each of `steps` forwards predicts every masked position, and the most confident
ones are revealed. A finished block is stored in the cache by folding it into the first
forward of the next block, so a block costs `steps` forwards, not `steps + 1`.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

import mask as masks
import model as sdar


# Each option's allowed range, as one sentence that names its flag. The command line and the
# library functions raise the same sentences.
RANGES = {
    "max_new_tokens": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "block": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "temperature": (lambda v: v >= 0, ">= 0 (0 = argmax)"),
    "top_k": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0 = off)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1] (1 = off)"),
    "threshold": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "eos_min_prob": (lambda v: 0 <= v <= 1, "in [0, 1] (0 = off)"),
}


def check(block=None, steps=None, **options):
    """Raise ValueError naming the first option outside its range (RANGES); steps must lie
    in 1..block. None means "not given"."""
    for name, v in dict(options, block=block).items():
        if v is not None and not RANGES[name][0](v):  # a NaN fails every comparison too
            raise ValueError(f"--{name.replace('_', '-')} must be {RANGES[name][1]}; got {v!r}")
    if steps is not None and not (isinstance(steps, int) and 1 <= steps <= (block or steps)):
        raise ValueError(f"--steps must be an integer from 1 to the block length ({block}); got {steps!r}")


def schedule(m, block, steps):
    """How many of a block's m masked positions each step reveals, as SDAR's decoder does: the
    quota spreads the whole block over the steps (block // steps each, the first block % steps
    steps one more), and a step reveals min(quota, masks left). A block that starts with known
    tokens therefore finishes early: block 4, steps 2, two masks -> one step of two."""
    base, extra = divmod(block, steps)
    out = []
    for s in range(steps):
        k = min(base + (s < extra), m - sum(out))
        if k > 0:
            out.append(k)
    return out


def distribution(logits, temperature=0.0, top_k=0, top_p=1.0, suppress=None):
    """(..., V) logits -> the probabilities a token is drawn from: `suppress` (a diffusion model's
    mask id, which it must never output) gets zero, then temperature (1 for argmax decoding),
    top-k, and top-p (the smallest set whose mass reaches top_p)."""
    logits = logits.float() / (temperature or 1.0)
    if suppress is not None:
        logits = logits.index_fill(-1, torch.tensor([suppress], device=logits.device), float("-inf"))
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p  # the mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def pick(probs, temperature, generator):
    """One token per row: argmax when temperature == 0, else a draw."""
    if temperature == 0:
        return probs.argmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def denoise(model, block, start, steps, *, known=None, cache=None, context=None, strategy="static",
            threshold=0.9, temperature=0.0, top_k=0, top_p=1.0, mask_id, generator=None):
    """Fill the unknown positions of one block: the one place that forwards, picks, reveals
    and records the step map.

    block (B,): tokens at positions start..start+B-1; known (B,) bool says which are known
    (default: those that are not mask_id); the others are filled, in any pattern.
    context: tokens just before the block. With a cache it is the just-completed block (or
    empty), stored by folding it into the first forward; without a cache (the oracle) it is
    the whole sequence so far, recomputed at every step.
    Returns tokens (B,), step (B,) (0 = known, s = revealed at step s >= 1), probs (B, V)
    (the distribution each position was drawn from; zeros at known positions), forwards.
    """
    if strategy not in ("static", "dynamic"):
        raise ValueError(f"--strategy must be 'static' or 'dynamic'; got {strategy!r}")
    check(block=len(block), steps=steps, temperature=temperature, top_k=top_k, top_p=top_p, threshold=threshold)
    context = block[:0] if context is None else context
    todo = block == mask_id if known is None else ~known  # (B,) still to fill
    block = block.masked_fill(todo, mask_id)  # unknown positions are fed as mask tokens
    step = torch.zeros_like(block)
    probs_out, forwards = None, 0
    for s, k in enumerate(schedule(int(todo.sum()), len(block), steps), start=1):
        if strategy == "dynamic" and s > 1 and not todo.any():
            break  # dynamic revealed more than scheduled: the block is done early
        n = len(context)
        logits = model(torch.cat([context, block])[None], torch.arange(start - n, start + len(block),
                       device=block.device), masks.block_causal(n + len(block), len(block), start - n,
                       block.device), cache)[0, n:]
        forwards += 1
        if cache is not None and n:
            cache.commit(n)  # the folded store is now in the cache
            context = context[:0]
        probs = distribution(logits, temperature, top_k, top_p, suppress=mask_id)  # (B, V)
        tokens = pick(probs, temperature, generator)
        conf = probs.gather(-1, tokens[:, None])[:, 0].masked_fill(~todo, -1.0)
        rank = torch.argsort(torch.argsort(conf, descending=True, stable=True))  # 0 = most confident
        reveal = todo & ((rank < k) | ((conf > threshold) if strategy == "dynamic" else False))
        block = torch.where(reveal, tokens, block)  # no host sync: everything stays on the device
        step = torch.where(reveal, s, step)
        probs_out = torch.where(reveal[:, None], probs, 0.0 if probs_out is None else probs_out)
        todo = todo & ~reveal
    return block, step, probs_out, forwards


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def resolve_mask_id(model, mask_id):
    mask_id = model.config.mask_token_id if mask_id is None else mask_id
    if model.config.model_type != "sdar" or mask_id is None:
        raise ValueError(f"a {model.config.model_type} model without a mask token cannot decode diffusion-style; "
                         "use an SDAR checkpoint (mask_token_id in its config.json) or decode it autoregressively")
    return mask_id


def device_of(model):
    return model.model.embed_tokens.weight.device


def as_prompt(prompt_ids, device):
    prompt = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=device)
    if not len(prompt):
        raise ValueError("the prompt is empty; decoding starts from at least one token")
    return prompt


def prefill(model, ids, cache, block):
    """Commit ids (positions 0..) to the cache in one block-causal forward (block 1: causal)."""
    if len(ids):
        model(ids[None], torch.arange(len(ids), device=ids.device),
              masks.block_causal(len(ids), block, device=ids.device), cache)
        cache.commit(len(ids))


@torch.inference_mode()
def generate(model, prompt_ids, max_new_tokens, block=4, steps=None, strategy="static", threshold=0.9,
             temperature=0.0, top_k=0, top_p=1.0, stop_ids=(), mask_id=None, generator=None, callback=None,
             cached=True):
    """Vanilla block-diffusion decoding with a KV cache. Returns (new tokens, stats): at most
    max_new_tokens, trimmed before the first stop token; stats has forwards, tokens, seconds
    (decode, prefill excluded) and prefill_seconds. callback(tokens) sees each block's new tokens,
    exactly those returned. cached=False is the oracle: the same decisions, recomputing the whole
    sequence block-causally at every step; the cached path must equal it token for token."""
    check(max_new_tokens=max_new_tokens, block=block, steps=steps)
    mask_id, dev = resolve_mask_id(model, mask_id), device_of(model)
    prompt = as_prompt(prompt_ids, dev)
    aligned = len(prompt) - len(prompt) % block  # blocks sit at absolute positions [kB, (k+1)B)
    cache = model.new_cache(aligned + max_new_tokens + 3 * block) if cached else None
    t0 = sync(dev)
    if cached:
        prefill(model, prompt[:aligned], cache, block)
    t1, forwards = sync(dev), int(cached and aligned > 0)
    seq, known, out = prompt[:aligned], prompt[aligned:], []
    while len(out) < max_new_tokens:
        start = len(seq)
        x = torch.cat([known, known.new_full((block - len(known),), mask_id)])
        # the oracle recomputes everything; the cache folds in the block just completed, if any
        context = seq if not cached else seq[start - block:] if start > aligned else seq[:0]
        x, _, _, f = denoise(model, x, start, steps or block, cache=cache, context=context, mask_id=mask_id,
                             strategy=strategy, threshold=threshold, temperature=temperature, top_k=top_k,
                             top_p=top_p, generator=generator)
        forwards += f
        new = x[len(known):].tolist()  # one host sync per block
        seq, known = torch.cat([seq, x]), known[:0]
        stop = next((i for i, t in enumerate(new) if t in stop_ids), None)
        new = new[:stop][:max_new_tokens - len(out)]
        out += new
        if callback:
            callback(new)
        if stop is not None:
            break
    return out, {"forwards": forwards, "prefill_forwards": int(cached and aligned > 0), "tokens": len(out),
                 "seconds": sync(dev) - t1, "prefill_seconds": t1 - t0}


@torch.inference_mode()
def generate_ar(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, stop_ids=(),
                generator=None, callback=None, cached=True):
    """Plain autoregressive decoding, the baseline of an AR (Qwen3) target: a causal prefill of
    the prompt but its last token, then one forward per token, each on the newest token. The
    AR shift: the logits at position i predict the token at i + 1. cached=False is the
    oracle, recomputing the whole sequence causally for every token. Returns (tokens, stats)
    as generate does; callback(tokens) sees each new token."""
    check(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    dev = device_of(model)
    seq = as_prompt(prompt_ids, dev)
    P = len(seq)
    cache = model.new_cache(P + max_new_tokens) if cached else None
    t0 = sync(dev)
    if cached:
        prefill(model, seq[:-1], cache, 1)
    t1, out, forwards = sync(dev), [], int(cached and P > 1)
    while len(out) < max_new_tokens:
        n = len(seq) - 1 if cached else 0  # first position fed: the newest token, or everything
        logits = model(seq[None, n:], torch.arange(n, len(seq), device=dev),
                       masks.block_causal(len(seq) - n, 1, n, dev), cache)[0, -1]
        forwards += 1
        if cached:
            cache.commit(1)
        token = pick(distribution(logits, temperature, top_k, top_p), temperature, generator)
        out.append(token.item())  # one host sync per token
        if out[-1] in stop_ids:
            out.pop()
            break
        seq = torch.cat([seq, token[None]])
        if callback:
            callback(out[-1:])
    return out, {"forwards": forwards, "prefill_forwards": int(cached and P > 1), "tokens": len(out),
                 "seconds": sync(dev) - t1, "prefill_seconds": t1 - t0}


# ----------------------------------------------------------------------------- the command

WEIGHTS_HELP = ("download weights with the Hugging Face CLI, e.g. `huggingface-cli download JetLM/SDAR-8B-Chat "
                "--local-dir SDAR-8B-Chat`, then pass --model SDAR-8B-Chat")
# Flags that a mode cannot act on are refused, not ignored: {mode: (flags, why)}.
REFUSED = {"vanilla": ({"verify", "accept", "eos_min_prob", "draft_device", "show"}, "decoding without --draft"),
           "ar": ({"block", "steps", "strategy", "threshold", "verify", "accept", "eos_min_prob", "draft_device",
                   "show"}, "an autoregressive --model decoding alone (one token per forward)"),
           "specdiff": ({"verify", "accept"}, "an autoregressive target, which verifies causally in position order"),
           "simsd": (set(), "")}


def fail(message):
    print(f"decode.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def load_checkpoint(path, device, dtype, flag):
    """Model + tokenizer from a checkpoint folder; a sentence instead of a traceback."""
    path = Path(path)
    if not path.is_dir():
        fail(f"{flag} {path} is not a folder; {WEIGHTS_HELP}.")
    try:
        return sdar.load(path, device, dtype), sdar.load_tokenizer(path)
    except (OSError, ValueError) as e:
        fail(f"{flag} {path} cannot be loaded: {e}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Decode with an SDAR (block diffusion) or Qwen3 (autoregressive) "
                                "checkpoint, alone or speculatively with an SDAR --draft: SimSD for an SDAR target, "
                                "SpecDiff for a Qwen3 target. Without --model it runs the toy models of train_tiny.py "
                                "(training them first if they are missing).")
    add = p.add_argument
    add("--model", help="checkpoint folder (config.json, safetensors, tokenizer files); default: the toy target")
    add("--draft", help="SDAR draft folder: decode speculatively (default with the toys: the toy draft)")
    add("--vanilla", action="store_true", help="decode with the target alone (the toys otherwise add their draft)")
    add("--verify", choices=["simsd", "exact"], help="SimSD verification layout (default simsd: one copy of the "
        "block; exact: one copy per draft step, lossless)")
    add("--accept", choices=["step", "position"], help="SimSD acceptance order (default step: in draft-step order, "
        "temporally valid; position: the paper's longest agreeing prefix)")
    add("--show", action="store_true", help="draw every speculative iteration's block")
    add("--prompt", help="user message, chat template applied (default: held-out prompts for the toys and the "
        "toy folders, else 'Write a haiku about the sea.')")
    add("--system", help="system message")
    add("--no-think", action="store_true", help="append the chat template's empty think block "
        "(enable_thinking=False): answer directly")
    add("--max-new-tokens", type=int, default=256, help="default 256")
    add("--block", type=int, help="block length (default: the checkpoint's block_size, else 4)")
    add("--steps", type=int, help="denoising steps per block, 1..block (default: the block length)")
    add("--strategy", choices=["static", "dynamic"], help="static (default): reveal the scheduled number; "
        "dynamic: also every position above --threshold")
    add("--threshold", type=float, help="confidence threshold of --strategy dynamic, in [0, 1] (default 0.9)")
    add("--temperature", type=float, default=0.0, help="default 0 = argmax")
    add("--top-k", type=int, default=0, help="default 0 = off")
    add("--top-p", type=float, default=1.0, help="in (0, 1], default 1 = off")
    add("--eos-min-prob", type=float, help="speculative: a stop token chosen by the target needs this target "
        "probability, in [0, 1] (default 0 = off)")
    add("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    add("--draft-device", choices=["cpu", "cuda"], help="device of the draft (default: --device)")
    add("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on cuda, float32 on cpu")
    add("--seed", type=int, default=0, help="seed of sampling (default 0)")
    return p.parse_args(argv)


def pick_device(name, flag):
    device = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        fail(f"{flag} cuda was asked for but this machine has no CUDA GPU (or torch was built without CUDA)")
    return device


def load_models(args, device, draft_device):
    """Target, draft (or None), tokenizer and mode; every pair is checked before decoding."""
    dtype_of = lambda dev: getattr(torch, args.dtype or ("bfloat16" if dev == "cuda" else "float32"))  # noqa: E731
    model, tok = load_checkpoint(args.model, device, dtype_of(device), "--model")
    ar = model.config.model_type == "qwen3"
    if not ar and tok.mask_id is None:
        fail(f"--model {args.model} is an SDAR model but its tokenizer defines no mask token (<|MASK|>); "
             "a diffusion model cannot decode without one")
    if args.draft is None:
        return model, None, tok, "ar" if ar else "vanilla"
    draft, dtok = load_checkpoint(args.draft, draft_device, dtype_of(draft_device), "--draft")
    import speculative
    try:
        speculative.check_pair(model, draft, tok, dtok)
    except ValueError as e:
        fail(f"--draft {args.draft} with --model {args.model}: {e}")
    return model, draft, dtok if ar else tok, "specdiff" if ar else "simsd"


def main(argv=None):
    args = parse_args(argv)
    try:
        check(max_new_tokens=args.max_new_tokens, block=args.block, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, threshold=args.threshold, eos_min_prob=args.eos_min_prob)
    except ValueError as e:
        fail(e)
    if args.prompt is not None and not args.prompt.strip():
        fail("the prompt is empty; give some text with --prompt")
    if args.vanilla and args.draft:
        fail("--vanilla decodes without a draft; drop --draft or --vanilla")
    if args.draft and not args.model:
        fail("--draft needs --model; the toy models bring their own drafts")
    devices = pick_device(args.device, "--device"), pick_device(args.draft_device or args.device,
                                                                 "--draft-device" if args.draft_device else "--device")
    import train_tiny  # the toys' prompts and scorer: the command may reach up; the library never does
    if args.model:  # a toy folder without --prompt gets its tasks' held-out prompts
        tasks = train_tiny.tasks_of(args.model) if args.prompt is None else None
        jobs = [(args.model, args.draft, [p for t in tasks for p in train_tiny.examples(3, "heldout", task=t)]
                 if tasks else [(args.prompt or "Write a haiku about the sea.", None)])]
    else:  # the toys: one pair per task, trained on first use
        train_tiny.ensure_trained()
        tasks = train_tiny.TASKS if args.prompt is None else [train_tiny.task_of(args.prompt)]
        jobs = [(*train_tiny.pair(t), [(args.prompt, None)] if args.prompt else
                 train_tiny.examples(3, "heldout", task=t)) for t in tasks]
    for model_dir, draft_dir, prompts in jobs:
        args.model, args.draft = str(model_dir), None if args.vanilla or draft_dir is None else str(draft_dir)
        run_job(args, devices, prompts)


def run_job(args, devices, prompts):
    """Load one target (and draft), refuse what does not apply to them, decode the prompts."""
    model, draft, tok, mode = load_models(args, *devices)
    flags, why = REFUSED[mode]
    given = sorted(f for f in flags if getattr(args, f) not in (None, False))
    if given:
        fail(f"--{given[0].replace('_', '-')} does not apply to {why}")
    if args.strategy != "dynamic" and args.threshold is not None:
        fail("--threshold applies to --strategy dynamic only")
    trained = (draft or model).config.block_size
    if args.block is not None and trained is not None and args.block != trained:
        fail(f"block {args.block} requested but this checkpoint was trained with block {trained}; "
             "block 8 needs the -b8 checkpoints (e.g. SDAR-8B-Chat-b8)")
    block = args.block or trained or 4
    try:
        check(block=block, steps=args.steps)
    except ValueError as e:
        fail(e)
    for text, answer in prompts:
        ids = tok.chat(text, args.system, enable_thinking=not args.no_think)
        if len(ids) + args.max_new_tokens > model.config.max_position_embeddings:
            fail(f"the prompt ({len(ids)} tokens) and --max-new-tokens {args.max_new_tokens} exceed the model's "
                 f"max_position_embeddings {model.config.max_position_embeddings}")
        run_one(model, draft, tok, ids, text, answer, block, mode, args)


class Printer:
    """Streams decoded text, holding back a split UTF-8 character; draws --show iterations."""
    STYLE = {"known": ("2", "({})"), "accepted": ("32", "[{}]"), "replaced": ("31", "{{{}"), "target": ("1;33", ">{}}}"),
             "dropped": ("9;90", "~{}~"), "bonus": ("1;33", "<{}>")}  # colour code, marker without colour

    def __init__(self, tok, color):
        self.tok, self.tokens, self.shown, self.color = tok, [], "", color

    def stream(self, tokens):
        self.tokens += tokens
        text = self.tok.decode(self.tokens)
        if not text.endswith("\ufffd"):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text

    def paint(self, kind, text):
        code, marker = self.STYLE[kind]
        if not self.color:
            return marker.format(text)
        return f"\033[{code}m{'>' if kind == 'target' else ''}{text}\033[0m"

    def word(self, token):
        return repr(self.tok.decode([token]))[1:-1]

    def legend(self):
        print("  each iteration: the block after verification; t@s = a token the draft revealed at its step s\n  "
              + "  ".join([self.paint("known", "known"), self.paint("accepted", "accepted@s"),
                           self.paint("replaced", "rejected@s") + self.paint("target", "target's token"),
                           self.paint("dropped", "dropped@s"), self.paint("bonus", "bonus (AR target)")]), flush=True)

    def show(self, it):
        cells = [self.paint("known", self.word(tok)) if st == "known" else self.paint(st, f"{self.word(d)}@{s}")
                 + (self.paint("target", self.word(tok)) if st == "replaced" else "")
                 for tok, st, s, d in zip(it["block"], it["status"], it["steps"], it["drafted"])]
        bonus = " " + self.paint("bonus", self.word(it["bonus"])) if it["bonus"] is not None else ""
        counts = ", ".join(f"{it['status'].count(k)} {k}" for k in ("accepted", "replaced", "dropped"))
        print(f"  @{it['start']:<4} {' '.join(cells)}{bonus}   ({counts})", flush=True)


def run_one(model, draft, tok, ids, text, answer, block, mode, args):
    out = Printer(tok, sys.stdout.isatty())
    gen = torch.Generator(device=device_of(draft if draft is not None else model)).manual_seed(args.seed)
    sample = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_ids=tok.stop_ids,
                  generator=gen)
    diffusion = dict(strategy=args.strategy or "static", threshold=0.9 if args.threshold is None else args.threshold,
                     mask_id=tok.mask_id, block=block, **sample)
    print(f"\n>>> {text}\n", flush=True)
    if mode == "ar":
        tokens, stats = generate_ar(model, ids, args.max_new_tokens, callback=out.stream, **sample)
    elif mode == "vanilla":
        tokens, stats = generate(model, ids, args.max_new_tokens, steps=args.steps, callback=out.stream, **diffusion)
    else:
        import speculative
        if args.show:
            out.legend()
        tokens, stats = speculative.generate(
            model, draft, ids, args.max_new_tokens, draft_steps=args.steps, verify=args.verify, accept=args.accept,
            eos_min_prob=args.eos_min_prob or 0.0, on_iteration=out.show if args.show else
            lambda it: out.stream(it["new"]), **diffusion)
    print(tok.decode(tokens)[len(out.shown):] if not args.show else "\n" + tok.decode(tokens))
    if answer is not None:
        import train_tiny
        verdict = "correct" if train_tiny.score(text, tok.decode(tokens), answer) else \
            f"truncated at --max-new-tokens {args.max_new_tokens}" if len(tokens) == args.max_new_tokens else \
            f"wrong; one right answer: {answer}"
        print(f"[{verdict}]")
    forwards = stats["iterations"] if "iterations" in stats else stats["forwards"] - stats["prefill_forwards"]
    what = "target forward" if "iterations" in stats else "forward"
    extra = f", acceptance {stats['accepted'] / max(stats['drafted'], 1):.0%}" if "iterations" in stats else ""
    print(f"[{stats['tokens']} tokens, {stats['tokens'] / max(forwards, 1):.2f} tokens per {what}{extra}, {mode}"
          + (f", block {block}" if mode != "ar" else "") + f", {device_of(model).type}; "
          f"{stats['tokens'] / max(stats['seconds'], 1e-9):.0f} tok/s, a rough figure (first prompt includes "
          "warm-up): python bench.py measures speed]")


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # the reader went away (e.g. | head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
