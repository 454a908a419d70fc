"""The command line of `python decode.py`: decode a checkpoint alone or speculatively, or the toys.

It sits above the library (decode, speculative) and the toy world (train_tiny), which never import
it. Every option is checked before anything loads or trains: a bad value or a flag that cannot act
in the chosen mode is one sentence on stderr and exit status 2.
"""
import argparse
import json
import os
import sys
import time
from collections import namedtuple
from pathlib import Path

import torch

import decode
import model
import speculative
import train_tiny

WEIGHTS_HELP = ("download weights with the Hugging Face CLI, e.g. `huggingface-cli download "
                "JetLM/SDAR-8B-Chat --local-dir SDAR-8B-Chat`, then pass --model SDAR-8B-Chat")
MAX_FORWARD = 8192  # query tokens in one forward: its (T, T) attention mask must fit in memory
# Flags a mode cannot act on are refused, not ignored: {mode: (flags, what the mode is)}.
SPECULATIVE = {"verify", "accept", "eos_min_prob", "draft_device", "show", "lookahead",
               "proposer", "drafting"}
REFUSED = {
    "vanilla": (SPECULATIVE, "decoding without --draft"),
    "ar": ({"block", "steps", "strategy", "threshold"} | SPECULATIVE,
           "an autoregressive --model decoding alone"),
    "specdiff": ({"verify", "accept", "eos_min_prob", "proposer"},
                 "an autoregressive target, which verifies causally, in position order"),
    "lossless": ({"accept", "eos_min_prob"},
                 "--verify lossless, which follows the target's own order and output"),
    "self": ({"accept", "eos_min_prob", "draft_device", "proposer", "drafting"},
             "--draft self, where the target proposes for itself, without a draft model"),
    "simsd": ({"proposer"}, "the paper's verification, which judges a draft's tokens"),
}


def fail(message):
    print(f"decode.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def flag(name):
    return "--" + name.replace("_", "-")


def parse_args(argv=None):
    about = ("Decode with an SDAR (block diffusion) or Qwen3 (autoregressive) checkpoint, alone or "
             "speculatively with an SDAR --draft: SimSD for an SDAR target, SpecDiff for a Qwen3 "
             "target. Without --model it runs the toy models of train_tiny.py (training them first "
             "if they are missing).")
    p = argparse.ArgumentParser(prog="decode.py", description=about)
    add = p.add_argument
    add("--model", help="checkpoint folder (config.json, safetensors, tokenizer files); default: "
        "the toy targets")
    add("--draft", help="SDAR draft folder: decode speculatively (default with the toys: the toy "
        f"{train_tiny.DEFAULT_DRAFT} draft); or 'self': the target proposes for itself from its "
        "own last logits, losslessly, with no draft model")
    add("--proposer", choices=["draft", "hybrid"], help="with a draft folder and --verify lossless: "
        "who proposes: the draft, or the draft and the target itself (hybrid); default hybrid with "
        "--strategy static, draft with dynamic")
    add("--drafting", choices=["step", "block"], help="the draft's forwards: one per denoising "
        "step, or one per block whose confidences SDAR's rule is applied to step after step "
        f"(default {speculative.DRAFTING}; step with --verify exact or simsd, the paper's)")
    add("--vanilla", action="store_true", help="decode with the target alone")
    add("--verify", choices=["lossless", "exact", "simsd"], help="how an SDAR target verifies "
        "(default lossless: exactly the target's own decoding; exact and simsd: the paper's "
        "acceptance, along the draft's order, on one copy per draft step or the paper's layout)")
    add("--accept", choices=["step", "position"], help="exact/simsd acceptance order (default "
        "step: draft-step order, temporally valid; position: the paper's longest agreeing prefix)")
    add("--lookahead", type=int, help="blocks the draft proposes to one target forward "
        f"(default {speculative.LOOKAHEAD})")
    add("--show", action="store_true", help="draw every speculative iteration's blocks")
    add("--prompt", help="user message, chat template applied (default: held-out prompts of the "
        "toys, else 'Write a haiku about the sea.')")
    add("--prompts", metavar="FILE", help="a UTF-8 text file, one prompt per line (blank lines "
        "skipped): decode them all in batches; each prompt's answer is one JSON line on stdout, "
        "written as soon as it is final, with its index and line")
    add("--batch-size", type=int, help="prompts of --prompts decoded together (default 16)")
    add("--system", help="system message (real checkpoints)")
    add("--no-think", action="store_true", help="append the chat template's empty think block "
        "(enable_thinking=False; real checkpoints)")
    add("--max-new-tokens", type=int, default=256, help="default 256")
    add("--block", type=int, help="block length (default: the checkpoint's block_size, else 4)")
    add("--steps", type=int, help="denoising steps per block, 1..block (default: the block length)")
    add("--strategy", choices=["static", "dynamic"], help="static (default): reveal each step's "
        "quota of most confident positions; dynamic: also every one above --threshold")
    add("--threshold", type=float, help="confidence threshold of --strategy dynamic (default 0.9)")
    add("--temperature", type=float, default=0.0, help="default 0 = argmax")
    add("--top-k", type=int, default=0, help="default 0 = off")
    add("--top-p", type=float, default=1.0, help="in (0, 1], default 1 = off")
    add("--eos-min-prob", type=float, help="exact/simsd: a stop token chosen by the target needs "
        "this target probability (default 0 = off)")
    add("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    add("--draft-device", choices=["cpu", "cuda"], help="device of the draft (default: --device)")
    add("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on cuda, else float32")
    add("--seed", type=int, default=0, help="seed of sampling (default 0)")
    add("--threads", type=int, help="CPU threads (default: 1 for models under 100M parameters, "
        "which are dispatch-bound, where one thread is as fast on a quiet machine and far faster "
        "on a busy one; else torch's default)")
    return p.parse_args(argv)


def check_flags(args):
    """Each value in its range and each combination meaningful, before anything loads."""
    for name in ("max_new_tokens", "block", "lookahead", "temperature", "top_k", "top_p",
                 "threshold", "eos_min_prob"):
        value = getattr(args, name)
        valid, allowed = decode.RANGES[name]
        if value is not None and not valid(value):
            fail(f"{flag(name)} must be {allowed}; got {value}")
    if not 0 <= args.seed < 2 ** 64:
        fail(f"--seed must be an integer from 0 to 2**64 - 1; got {args.seed}")
    cores = os.cpu_count() or 1
    if args.threads is not None and not 1 <= args.threads <= cores:
        fail(f"--threads must be an integer from 1 to this machine's {cores} cores; "
             f"got {args.threads}")
    for name in ("model", "draft", "prompt"):
        value = getattr(args, name)
        if value is not None and not value.strip():
            fail(f"{flag(name)} is empty")
    if args.vanilla and args.draft:
        fail("--vanilla decodes without a draft; drop --draft or --vanilla")
    if args.draft and args.draft != "self" and not args.model:
        fail("--draft needs --model; the toy models bring their own drafts (or --draft self)")
    if args.model is None and (args.system is not None or args.no_think):
        which = "--system" if args.system is not None else "--no-think"
        fail(f"{which} does not apply to the toy models, which were trained without system "
             "messages or think blocks; it is for real chat checkpoints (--model)")
    if args.strategy != "dynamic" and args.threshold is not None:
        fail("--threshold applies to --strategy dynamic only")
    if args.batch_size is not None and (args.prompts is None or args.batch_size < 1):
        fail(f"--batch-size must be an integer >= 1; got {args.batch_size}" if args.prompts
             else "--batch-size applies to --prompts FILE")
    if args.prompts is not None:
        for name in ("prompt", "show"):
            if getattr(args, name):
                fail(f"{flag(name)} does not apply to --prompts, which decodes a file of prompts "
                     "in batches")
        args.lines = read_prompts(args.prompts)


def read_prompts(path):
    """[(line number, prompt)] of a prompts file, its blank lines skipped; a sentence otherwise."""
    path = Path(path)
    if path.is_dir():
        fail(f"--prompts {path} is a folder; give a text file with one prompt per line")
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        fail(f"--prompts {path} does not exist")
    except UnicodeDecodeError as e:
        fail(f"--prompts {path} is not UTF-8 text (line {raw[:e.start].count(10) + 1}, byte "
             f"{e.start}, cannot be decoded); save it as UTF-8")
    except OSError as e:
        fail(f"--prompts {path} cannot be read ({e.strerror})")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        fail(f"--prompts {path} holds no prompt; write one per line")
    return lines


def pick_device(name, flag_name):
    device = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        fail(f"{flag_name} cuda was asked for but this machine has no CUDA GPU "
             "(or torch was built without CUDA)")
    return device


# A checkpoint folder before its weights load: every check needs only these.
Checkpoint = namedtuple("Checkpoint", "config tok path flag")


def read_checkpoint(path, flag_name):
    """The config and tokenizer of a checkpoint folder; a sentence instead of a traceback."""
    path = Path(path)
    if not path.is_dir():
        fail(f"{flag_name} {path} is not a folder; {WEIGHTS_HELP}.")
    try:
        config, _ = model.load_config(path), model.weight_files(path)  # the weights are there
        return Checkpoint(config, model.load_tokenizer(path), path, flag_name)
    except (OSError, ValueError) as e:
        fail(f"{flag_name} {path} cannot be loaded: {e}")


def load_weights(checkpoint, device, dtype):
    """The model of a checked checkpoint, on its device; a sentence instead of a traceback."""
    try:
        return model.load(checkpoint.path, device, dtype)
    except (OSError, ValueError) as e:
        fail(f"{checkpoint.flag} {checkpoint.path} cannot be loaded: {e}")


def jobs(args):
    """[(target folder, draft folder or None, [(prompt, answer or None, line or None)])] to
    decode. --prompts: the file's lines (the toys: each on its task's models)."""
    if args.prompts is not None:
        if args.model:
            return [(args.model, args.draft, [(text, None, n) for n, text in args.lines])]
        train_tiny.ensure_trained()
        out = []
        for task in train_tiny.TASKS:
            mine = [(text, None, n) for n, text in args.lines if train_tiny.task_of(text) == task]
            folders = train_tiny.folders(task)
            out += [(folders["target"], toy_draft(args, folders), mine)] if mine else []
        return out
    return [(target, draft, [(text, answer, None) for text, answer in prompts])
            for target, draft, prompts in examples(args)]


def toy_draft(args, folders):
    """The draft a toy task decodes with: none (--vanilla), the target itself, or the default."""
    return None if args.vanilla else "self" if args.draft == "self" else folders[
        train_tiny.DEFAULT_DRAFT]


def examples(args):
    """[(target folder, draft folder or None, [(prompt, answer or None)])] without --prompts."""
    if args.model:
        tasks = train_tiny.tasks_of(args.model) if args.prompt is None else None
        if tasks:  # a toy folder: its tasks' held-out prompts
            prompts = [p for task in tasks for p in train_tiny.examples(3, "heldout", task=task)]
        else:
            prompts = [(args.prompt or "Write a haiku about the sea.", None)]
        return [(args.model, args.draft, prompts)]
    train_tiny.ensure_trained()
    if args.prompt is not None:
        note = train_tiny.outside_training(args.prompt)
        if note:
            print(f"note: {note}", flush=True)
        tasks, prompts = [train_tiny.task_of(args.prompt)], [(args.prompt, None)]
    else:
        tasks, prompts = train_tiny.TASKS, None
    out = []
    for task in tasks:
        folders = train_tiny.folders(task)
        draft = toy_draft(args, folders)
        held_out = train_tiny.examples(3, "heldout", task=task)
        out.append((folders["target"], draft, prompts or held_out))
    return out


def read_pair(args, target_dir, draft_dir):
    """Target and draft (or None) Checkpoints, the tokenizer and the mode; every pair checked
    before any weights load."""
    target = read_checkpoint(target_dir, "--model")
    tok, ar = target.tok, target.config.model_type == "qwen3"
    if not ar and tok.mask_id is None:
        fail(f"--model {target_dir} is an SDAR model but its tokenizer defines no mask token "
             "(<|MASK|>); a diffusion model cannot decode without one")
    if draft_dir is None:
        return target, None, tok, "ar" if ar else "vanilla"
    if draft_dir == "self":
        if ar:
            fail(f"--model {target_dir} is autoregressive and cannot propose for itself here; give "
                 "an SDAR --draft folder")
        return target, None, tok, "self"
    draft = read_checkpoint(draft_dir, "--draft")
    try:
        model.check_pair(target, draft, tok, draft.tok)
    except ValueError as e:
        fail(f"--draft {draft_dir} with --model {target_dir}: {e}")
    if ar:
        return target, draft, draft.tok, "specdiff"
    return target, draft, tok, "lossless" if args.verify in (None, "lossless") else "simsd"


def check_mode(args, mode, target, draft):
    """The flags the mode cannot act on, the block against the checkpoints, and the forward's size.
    Returns the block length."""
    flags, what = REFUSED[mode]
    given = sorted(name for name in flags if getattr(args, name) not in (None, False))
    if given:
        fail(f"{flag(given[0])} does not apply to {what}")
    if mode == "self" and args.verify not in (None, "lossless"):
        fail(f"--verify {args.verify} judges a draft's tokens; --draft self is verified losslessly")
    if mode == "self" and (args.lookahead or 0) > 2:
        fail(f"--lookahead {args.lookahead} does not apply to --draft self: the target proposes "
             "the rest of its block and the next block's first step (lookahead 1 or 2)")
    if mode == "specdiff" and args.strategy == "dynamic" and args.temperature > 0:
        fail("--strategy dynamic drafts by the confidence of sampled tokens, which biases an "
             "autoregressive target's rejection sampling; use static (the draft then reveals from "
             "the left)")
    trained = (draft or target).config.block_size
    block = args.block or trained or 4
    if trained is not None and block != trained:
        advice = " (block 8 needs the -b8 checkpoints, e.g. SDAR-8B-Chat-b8)" if block == 8 else ""
        fail(f"block {block} requested but this checkpoint was trained with block {trained}; "
             f"use --block {trained} or leave it out{advice}")
    steps = block if args.steps is None else args.steps
    if not (1 <= steps <= block):
        fail(f"--steps must be an integer from 1 to the block length ({block}); got {steps}")
    lookahead = args.lookahead or speculative.LOOKAHEAD
    # pending and clean copies, then a copy per proposed state: the draft's and the target's
    lossless = (lookahead + 2) * block + (lookahead + 2) * block * steps
    size = {"vanilla": 2 * block, "ar": 1, "specdiff": 1 + lookahead * block,
            "lossless": lossless, "self": lossless}
    if mode == "simsd":
        copies = steps if args.verify == "exact" else 2
        size[mode] = (lookahead + 1) * block + lookahead * block * copies
    if size[mode] > MAX_FORWARD:
        fail(f"one target forward would hold {size[mode]} tokens (block {block}, steps {steps}, "
             f"lookahead {lookahead}), more than the {MAX_FORWARD} whose attention mask this "
             "command builds; use a smaller --block, --steps or --lookahead")
    return block


def decode_main(argv=None):
    args = parse_args(argv)
    check_flags(args)
    devices = (pick_device(args.device, "--device"),
               pick_device(args.draft_device or args.device,
                           "--draft-device" if args.draft_device else "--device"))
    for target_dir, draft_dir, prompts in jobs(args):
        target, draft, tok, mode = read_pair(args, target_dir, draft_dir)
        block = check_mode(args, mode, target, draft)
        chats = check_lengths(args, tok, target.config, prompts, block)
        target = load_weights(target, devices[0], dtype_of(args, devices[0]))
        draft = draft and load_weights(draft, devices[1], dtype_of(args, devices[1]))
        params = sum(p.numel() for m in (target, draft) if m is not None for p in m.parameters())
        small = params < 100e6 and "cuda" not in devices
        torch.set_num_threads(args.threads or (1 if small else torch.get_num_threads()))
        if args.prompts is not None:
            decode_file(target, draft, tok, chats, prompts, block, mode, args)
            continue
        for ids, (text, answer, _) in zip(chats, prompts):
            decode_one(target, draft, tok, ids, text, answer, block, mode, args)
    if args.prompts is None:
        print("\n(tok/s is rough here, and the first prompt includes warm-up: python bench.py "
              "measures speed)")


def dtype_of(args, device):
    return getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))


def check_lengths(args, tok, config, prompts, block):
    """Each prompt's chat ids; a sentence naming the prompt (its line of --prompts) that would not
    fit the model's positions with --max-new-tokens and one block."""
    room, chats = config.max_position_embeddings, []
    for text, _, line in prompts:
        ids = tok.chat(text, args.system, enable_thinking=not args.no_think)
        if len(ids) + args.max_new_tokens + block > room:
            where = f"line {line} of --prompts: the prompt" if line else "the prompt"
            fail(f"{where} ({len(ids)} tokens), --max-new-tokens {args.max_new_tokens} and one "
                 f"block ({block}) exceed the model's max_position_embeddings {room}")
        chats.append(ids)
    return chats


def decode_file(target, draft, tok, chats, prompts, block, mode, args):
    """Decode the prompts in batches of --batch-size; each prompt's answer is printed as one JSON
    line (index: its place among the file's prompts, line: its line) as soon as it is final."""
    size, index = args.batch_size or 16, {line: i for i, (line, _) in enumerate(args.lines)}
    for first in range(0, len(chats), size):
        batch = list(range(first, min(first + size, len(chats))))

        def on_row(i, tokens, stats, batch=batch):
            text, _, line = prompts[batch[i]]
            end = "length" if len(tokens) == args.max_new_tokens else "stop"
            print(json.dumps({"index": index[line], "line": line, "prompt": text,
                              "output": tok.decode(tokens), "tokens": len(tokens), "end": end},
                             ensure_ascii=False), flush=True)
        t0 = time.perf_counter()
        outs, _ = run_decoder(target, draft, tok, [chats[b] for b in batch], block, mode, args,
                              on_row=on_row)
        print(f"[{len(batch)} prompts, {sum(map(len, outs))} tokens in "
              f"{time.perf_counter() - t0:.1f} s ({mode}, batch of {len(batch)})]", file=sys.stderr,
              flush=True)


def decode_one(target, draft, tok, ids, text, answer, block, mode, args):
    out = Printer(tok, sys.stdout.isatty(), mode)
    print(f"\n>>> {text}\n", flush=True)
    if args.show:
        out.legend()
    on_iteration = out.show if args.show else lambda info: out.stream(info["new"])
    tokens, stats = run_decoder(target, draft, tok, ids, block, mode, args, callback=out.stream,
                                on_iteration=on_iteration)
    text_out = tok.decode(tokens)
    print("\n" + text_out if args.show else text_out[len(out.shown):])
    if answer is not None:
        print(f"[{verdict(text, text_out, answer, len(tokens), args.max_new_tokens)}]")
    device = decode.device_of(draft if draft is not None else target)
    print(f"[{summary(stats, mode, block, args, device)}]")


def run_decoder(target, draft, tok, prompts, block, mode, args, callback=None, on_iteration=None,
                on_row=None):
    """The mode's decoder on one prompt or a batch: callback streams a decoder alone's tokens,
    on_iteration sees a speculative one's iterations, on_row each prompt's final output."""
    device = decode.device_of(draft if draft is not None else target)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    sampling = decode.Sampling(args.temperature, args.top_k, args.top_p)
    common = dict(sampling=sampling, stop_ids=tok.stop_ids, generator=generator, on_row=on_row)
    rule = dict(block=block, steps=args.steps, strategy=args.strategy or "static",
                threshold=0.9 if args.threshold is None else args.threshold)
    if mode == "ar":
        return decode.generate_ar(target, prompts, args.max_new_tokens, callback=callback, **common)
    if mode == "vanilla":
        return decode.generate(target, prompts, args.max_new_tokens, callback=callback, **rule,
                               **common)
    if mode == "specdiff":
        rule = dict(block=block, steps=args.steps, strategy=args.strategy or "static")
    return speculative.generate(target, draft, prompts, args.max_new_tokens, verify=args.verify,
                                accept=args.accept,
                                lookahead=args.lookahead or speculative.LOOKAHEAD,
                                eos_min_prob=args.eos_min_prob or 0.0, proposer=args.proposer,
                                drafting=args.drafting, on_iteration=on_iteration, **rule,
                                **common)


def verdict(prompt, output, answer, n_tokens, max_new_tokens):
    if train_tiny.score(prompt, output, answer):
        return "correct"
    if n_tokens == max_new_tokens:
        return f"truncated at --max-new-tokens {max_new_tokens}"
    return f"wrong; one right answer: {answer}"


def summary(stats, mode, block, args, device):
    forwards, strategy = max(stats.forwards, 1), args.strategy or "static"
    what = "forward" if mode in ("ar", "vanilla") else "target forward"
    parts = [f"{stats.tokens} tokens", f"{stats.tokens / forwards:.2f} tokens per {what}"]
    if mode not in ("ar", "vanilla"):
        parts.append(f"{stats.matched / forwards:.2f} proposed steps matched per target forward")
        parts.append(f"{stats.draft_forwards / forwards:.2f} draft forwards per target forward")
    names = {"simsd": f"{args.verify}, {args.accept or 'step'} order",
             "self": "lossless, the target proposing for itself",
             "lossless": f"lossless, {args.proposer or speculative.PROPOSER[strategy]} proposals"}
    parts.append(names.get(mode, mode))
    if mode != "ar":
        parts.append(f"block {block}")
    if mode not in ("ar", "vanilla"):
        parts.append(f"lookahead {args.lookahead or speculative.LOOKAHEAD}")
    parts.append(f"{device.type}, {torch.get_num_threads()} thread(s)")
    return ", ".join(parts) + f"; {stats.tokens / max(stats.seconds, 1e-9):.0f} tok/s"


class Printer:
    """Streams decoded text, holding back a split UTF-8 character; draws --show iterations."""
    STYLE = {"known": ("2", "({})"), "accepted": ("32", "[{}]"), "target": ("31", "{{{}}}"),
             "dropped": ("9;90", "~{}~"), "bonus": ("1;33", "<{}>")}  # colour, marker without

    def __init__(self, tok, color, mode=None):
        self.tok, self.tokens, self.shown, self.color, self.mode = tok, [], "", color, mode

    def stream(self, tokens):
        self.tokens += tokens
        text = self.tok.decode(self.tokens)
        if not text.endswith("\ufffd"):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text

    def paint(self, kind, text):
        code, marker = self.STYLE[kind]
        return f"\033[{code}m{text}\033[0m" if self.color else marker.format(text)

    def word(self, token):
        return repr(self.tok.decode([token]))[1:-1]

    def legend(self):
        lossless = self.mode in ("lossless", "self")
        target = "t@s>u@k the target's u at its step k" if lossless else "t@s>u the target's u instead"
        kinds = [("known", "known"), ("accepted", "t@s committed as proposed"), ("target", target),
                 ("dropped", "t@s dropped"), ("bonus", "u the target's own where nothing was "
                                              "proposed")]
        painted = "  ".join(self.paint(kind, words) for kind, words in kinds)
        who = "the chain shown (by the draft or the target itself)" if lossless else "the draft"
        print(f"  every proposed block after verification; t@s = the token t proposed at step s of "
              f"{who}:\n  {painted}", flush=True)

    def cell(self, fate, token, drafted, step, taken):
        if fate == 0:
            return self.paint("known", self.word(token))
        proposal = f"{self.word(drafted)}@{step}"
        if fate == 1:
            return self.paint("accepted", proposal)
        if fate == 3:
            return self.paint("dropped", proposal)
        if step == 0:  # the target's token where nothing was proposed: an AR target's bonus
            return self.paint("bonus", self.word(token))
        own = f"@{taken}" if self.mode in ("lossless", "self") else ""
        return self.paint("target", f"{proposal}>{self.word(token)}{own}")

    def tally(self, fate, steps, taken, by):
        if self.mode not in ("lossless", "self"):
            names = ((1, "accepted"), (2, "the target's"), (3, "dropped"))
            counts = [f"{fate.count(f)} {name}" for f, name in names]
            return "(" + ", ".join(counts) + ")"
        if 2 in fate and not any(steps):
            return f"(the target's own step {taken}: nothing was proposed from this state)"
        if 2 in fate:
            return (f"({taken - 1} step(s) matched by {by}, then the target's own step {taken}: "
                    "the chain stops)")
        if taken == 0:
            return "(not reached: the chain stopped before this block)"
        return f"({taken} step(s) matched by {by})"

    def show(self, info):
        rows = zip(info["starts"], info["tokens"], info["fate"], info["drafted"], info["steps"],
                   info["taken"])
        for j, (start, tokens, fate, drafted, steps, taken) in enumerate(rows):
            cells = [self.cell(f, t, d, s, taken)
                     for f, t, d, s in zip(fate, tokens, drafted, steps)
                     if f != 0 or t != self.tok.mask_id]  # never-proposed positions stay blank
            if not any(fate):
                continue  # a block after the proposed ones that holds nothing new
            lead = "  @" if j == 0 else " +@"  # a block reached by lookahead: the same forward
            tally = self.tally(fate, steps, taken, info["by"])
            print(f"{lead}{start:<4} {' '.join(cells)}   {tally}", flush=True)


def run(main):
    """main(), ending quietly when the reader goes away (e.g. `| head`)."""
    try:
        main()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
