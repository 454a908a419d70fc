"""`python decode.py`: decode with an SDAR or Qwen3 checkpoint, alone or speculatively, or the toys.

The program, above the library (sdar, speculative, checkpoint) and the toy world (train_tiny),
none of which imports it. Every option is checked before anything loads or trains: a bad value, or
a flag that cannot act in the chosen mode, is one sentence on stderr and exit status 2. The rules
are the library's own (sdar.Settings), spelled as flags. Output that cannot be written ends in one
sentence and exit status 1 (quietly for a reader gone away, `| head`); Ctrl-C in one line and 130.
"""
import os
import signal
import sys


def quit_at_once(signum, frame):
    """Ctrl-C before run() takes over, while torch imports: one line and exit status 130 at once
    (a KeyboardInterrupt raised inside an import would end in a traceback)."""
    os.write(2, b"\ninterrupted\n")
    os._exit(130)


# As a program: from its first line, not after the imports' second or more (hence the imports
# below). A Ctrl-C that was ignored when the program started (a background job) stays ignored.
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, quit_at_once)

import argparse
import json
import time
from collections import namedtuple
from dataclasses import fields
from pathlib import Path

import torch

import checkpoint
import head
import model
import sdar
import speculative
import train_tiny
from sdar import FLAGS, generate, generate_ar  # noqa: F401 (decode.generate: the target alone)
from verifier import ACCEPTED, DROPPED, KNOWN, TARGET

WEIGHTS_HELP = ("download weights with the Hugging Face CLI, e.g. `huggingface-cli download "
                "JetLM/SDAR-8B-Chat --local-dir SDAR-8B-Chat`, then pass --model SDAR-8B-Chat")
MAX_FORWARD = 8192  # query tokens in one forward: its (T, T) attention mask must fit in memory
MAX_PROMPTS = 64 * 2 ** 20  # bytes of --prompts, read whole: a bound, so /dev/zero is refused
# Line breaks to str.splitlines() that json.dumps leaves as they are (it escapes those below
# U+0020): escaped, so that each answer stays one line whoever reads it.
ONE_LINE = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})
SPECULATIVE = ("lossless", "self", "paper", "specdiff")
# The command line's own flags and the modes they act in (the library's: sdar.ACTS).
ACTS = {"show": SPECULATIVE, "draft_device": ("lossless", "paper", "specdiff"),
        "block": ("vanilla", *SPECULATIVE), "steps": ("vanilla", *SPECULATIVE),
        "strategy": ("vanilla", *SPECULATIVE), "threshold": ("vanilla", *SPECULATIVE)}


def fail(message, status=2):
    print(f"decode.py: error: {message}", file=sys.stderr)
    sys.exit(status)


class OutputError(Exception):
    """stdout refused a write: a full disk, a descriptor not open for writing."""


def say(*args, **kwargs):
    """print() to stdout, flushed at once: output that cannot be written is found where it is
    written (OutputError), never lost silently at exit."""
    try:
        print(*args, **kwargs, flush=True)
    except BrokenPipeError:
        raise  # the reader went away (`| head`): run() ends quietly
    except OSError as e:
        raise OutputError(e.strerror or e) from None


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line: the reason, and where to learn more
        fail(f"{message} (python decode.py --help lists the options)")


ABOUT = ("Decode with an SDAR (block diffusion) or Qwen3 (autoregressive) checkpoint, alone or "
         "speculatively with an SDAR --draft: SimSD for an SDAR target, SpecDiff for a Qwen3 "
         "target. Without --model it runs the toy models of train_tiny.py (training them first if "
         "they are missing).")


def parse_args(argv=None):
    p = Parser(prog="decode.py", description=ABOUT)
    add = p.add_argument
    add("--model", help="checkpoint folder (config.json, safetensors, tokenizer files); default: "
        "the toy targets")
    add("--draft", help="SDAR draft folder: decode speculatively (default with the toys: the toy "
        f"{train_tiny.DEFAULT_DRAFT} draft); or 'self': the target proposes for itself from its "
        "own last logits, losslessly, with no draft model; or a head folder (head.py; 'head': "
        "the toys' own), which reads the target's hidden states")
    add("--proposer", choices=["draft", "hybrid"], help="with a draft folder and --verify lossless: "
        "who proposes: the draft, or the draft and the target itself (hybrid); default "
        f"{sdar.PROPOSER['static']} with --strategy static, {sdar.PROPOSER['dynamic']} with dynamic")
    add("--drafting", choices=["step", "block"], help="the draft's forwards: one per denoising "
        "step, or one per block whose confidences SDAR's rule is applied to step after step "
        f"(default {sdar.DRAFTING}; step with --verify exact or simsd, the paper's)")
    add("--vanilla", action="store_true", help="decode with the target alone")
    add("--verify", choices=["lossless", "exact", "simsd"], help="how an SDAR target verifies "
        "(default lossless: exactly the target's own decoding; exact and simsd: the paper's "
        "acceptance, along the draft's order, on one copy per draft step or the paper's layout)")
    add("--accept", choices=["step", "position"], help="exact/simsd acceptance order (default "
        "step: draft-step order, temporally valid; position: the paper's longest agreeing prefix)")
    add("--lookahead", type=int, help="blocks one target forward reaches "
        f"(default {sdar.LOOKAHEAD})")
    add("--show", action="store_true", help="draw every speculative iteration's blocks")
    add("--prompt", help="user message, chat template applied (default: held-out prompts of the "
        "toys, else 'Write a haiku about the sea.')")
    add("--prompts", metavar="FILE", help=f"a UTF-8 text file of at most {MAX_PROMPTS // 2 ** 20} "
        "MiB, one prompt per line (ending at \\n or \\r\\n only; blank lines skipped): decode "
        "them all in batches; each prompt's answer is one JSON line on stdout, written as soon as "
        "it is final, with its index and line")
    add("--batch-size", type=int, help="prompts of --prompts decoded together (default 16)")
    add("--system", help="system message (real checkpoints)")
    add("--no-think", action="store_true", help="append the chat template's empty think block "
        "(enable_thinking=False; real checkpoints)")
    add("--max-new-tokens", type=int, default=256, help="default 256")
    add("--block", type=int, help="block length (default: the checkpoint's block_size, else 4)")
    add("--steps", type=int, help="denoising steps per block, 1..block (default: the block length)")
    add("--strategy", choices=["static", "dynamic"], help="static (default): reveal each step's "
        "quota of most confident positions; dynamic: also every one above --threshold")
    add("--threshold", type=float, help="confidence threshold of --strategy dynamic (default "
        f"{sdar.Settings.threshold})")
    add("--temperature", type=float, default=0.0, help="default 0 = argmax")
    add("--top-k", type=int, default=0, help="default 0 = off")
    add("--top-p", type=float, default=1.0, help="in (0, 1], default 1 = off")
    add("--eos-min-prob", type=float, help="exact/simsd: a stop token chosen by the target needs "
        "this target probability (default 0 = off)")
    add("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    add("--draft-device", choices=["cpu", "cuda"], help="device of the draft (default: --device)")
    add("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on cuda, else float32")
    add("--seed", type=int, default=0, help="seed of sampling (default 0)")
    add("--compile", action="store_true", help="compile the models with torch.compile (static "
        "shapes; CUDA graphs on cuda): opt-in, eager is the reference; each new shape compiles "
        "first (tens of seconds on a CPU)")
    add("--threads", type=int, help="CPU threads (default: 1 for models under 100M parameters, "
        "which are dispatch-bound, where one thread is as fast on a quiet machine and far faster "
        "on a busy one; else torch's default)")
    return p.parse_args(argv)


def check_flags(args):
    """Each value in its range and each combination meaningful, before anything loads."""
    try:
        sdar.check(FLAGS, max_new_tokens=args.max_new_tokens, block=args.block,
                   lookahead=args.lookahead, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, threshold=args.threshold, eos_min_prob=args.eos_min_prob)
    except ValueError as e:
        fail(e)
    if not 0 <= args.seed < 2 ** 64:
        fail(f"--seed must be an integer from 0 to 2**64 - 1; got {args.seed}")
    cores = os.cpu_count() or 1
    if args.threads is not None and not 1 <= args.threads <= cores:
        fail(f"--threads must be an integer from 1 to this machine's {cores} cores; "
             f"got {args.threads}")
    for name in ("model", "draft", "prompt", "prompts"):
        value = getattr(args, name)
        if value is not None and not value.strip():
            fail(f"{FLAGS.name(name)} is empty")
    if args.vanilla and args.draft:
        fail("--vanilla decodes without a draft; drop --draft or --vanilla")
    if args.draft and args.draft not in ("self", "head") and not args.model:
        fail("--draft needs --model; the toy models bring their own drafts (or --draft self, "
             "--draft head)")
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
                fail(f"{FLAGS.name(name)} does not apply to --prompts, which decodes a file of "
                     "prompts in batches")
        args.lines = read_prompts(args.prompts)


def read_prompts(path):
    r"""[(line number, prompt)] of a prompts file, blank lines skipped. Lines end at "\n" (or
    "\r\n") alone, so the numbers are the file's: str.splitlines() would also end them at U+2028,
    \x0c and others. A leading byte-order mark is dropped. A sentence otherwise."""
    path = Path(path)
    if path.is_dir():
        fail(f"--prompts {path} is a folder; give a text file with one prompt per line")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PROMPTS + 1)
    except FileNotFoundError:
        fail(f"--prompts {path} does not exist")
    except OSError as e:
        fail(f"--prompts {path} cannot be read ({e.strerror})")
    if len(raw) > MAX_PROMPTS:
        fail(f"--prompts {path} holds more than {MAX_PROMPTS // 2 ** 20} MiB, the most this "
             "command reads; split it into smaller files")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        fail(f"--prompts {path} is UTF-16 text (it starts with a UTF-16 byte-order mark); save it "
             "as UTF-8")
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        fail(f"--prompts {path} is not UTF-8 text (line {raw[:e.start].count(10) + 1}, byte "
             f"{e.start}, cannot be decoded); save it as UTF-8")
    lines = [(n, line.removesuffix("\r")) for n, line in enumerate(text.split("\n"), 1)]
    lines = [(n, line) for n, line in lines if line.strip()]
    if not lines:
        fail(f"--prompts {path} holds no prompt; write one per line")
    return lines


def pick_device(name, flag_name):
    device = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        fail(f"{flag_name} cuda was asked for but this machine has no CUDA GPU "
             "(or torch was built without CUDA)")
    return device


# ----------------------------------------------------------------------------- checkpoints

# A checkpoint folder before its weights load: every check needs only these.
Checkpoint = namedtuple("Checkpoint", "config tok path flag")


def read_checkpoint(path, flag_name):
    """The config and tokenizer of a checkpoint folder; a sentence instead of a traceback."""
    path = Path(path)
    if not path.is_dir() and flag_name == "--draft":
        fail(f"--draft {path} is not a folder: with --model it takes a draft checkpoint folder, "
             "a head folder (head.py) or 'self' ('head' alone names the toys' heads)")
    if not path.is_dir():
        fail(f"{flag_name} {path} is not a folder; {WEIGHTS_HELP}.")
    try:
        config = checkpoint.load_config(path)
        checkpoint.check_weights(path, config)  # from the safetensors headers alone
        tok = checkpoint.load_tokenizer(path)
        checkpoint.check_tokenizer(config, tok)  # ids inside vocab_size, the mask id the same
    except (OSError, ValueError) as e:
        fail(f"{flag_name} {path} cannot be loaded: {e}")
    return Checkpoint(config, tok, path, flag_name)


def load_weights(ckpt, device, dtype, compile=False):
    """The model of a checked checkpoint, on its device (compiled: sdar.compiled); a sentence
    instead of a traceback."""
    try:
        m = checkpoint.load(ckpt.path, device, dtype)
    except (OSError, ValueError) as e:
        fail(f"{ckpt.flag} {ckpt.path} cannot be loaded: {e}")
    return sdar.compiled(m) if compile else m


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
    if args.vanilla:
        return None
    if args.draft == "head":
        return folders["head"]
    return "self" if args.draft == "self" else folders[train_tiny.DEFAULT_DRAFT]


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
        tasks, prompts = [train_tiny.task_of(args.prompt)], [(args.prompt, None)]
    else:
        tasks, prompts = train_tiny.TASKS, None
    out = []
    for task in tasks:
        folders = train_tiny.folders(task)
        held_out = train_tiny.examples(3, "heldout", task=task)
        out.append((folders["target"], toy_draft(args, folders), prompts or held_out))
    return out


def read_pair(args, target_dir, draft_dir):
    """Target and draft (or None) Checkpoints, the tokenizer and the mode; every pair checked
    before any weights load."""
    target = read_checkpoint(target_dir, "--model")
    tok, ar = target.tok, target.config.model_type == "qwen3"
    if draft_dir == "self" and ar:
        fail(f"--model {target_dir} is autoregressive and cannot propose for itself here; give "
             "an SDAR --draft folder")
    if draft_dir not in (None, "self") and head.is_head(draft_dir):  # it loads beside the target
        draft = Checkpoint(head.HeadConfig(**model.read_json(Path(draft_dir) / "config.json")),
                           tok, Path(draft_dir), "--draft")
    else:
        draft = None if draft_dir in (None, "self") else read_checkpoint(draft_dir, "--draft")
        if draft is not None:
            try:
                checkpoint.check_pair(target, draft, tok, draft.tok)
            except ValueError as e:
                fail(f"--draft {draft_dir} with --model {target_dir}: {e}")
    try:
        mode = sdar.mode_of(target, draft or draft_dir, args.verify, args.drafting, FLAGS)
    except ValueError as e:
        fail(f"--draft {draft_dir}: {e}")
    return target, draft, draft.tok if draft is not None and ar else tok, mode


def settings_of(args, mode, target, draft, tok):
    """The decode's Settings, as the flags chose them (resolve() completes them with the mode's
    defaults), checked against the mode and the checkpoints: the block they were trained with,
    the forward's size."""
    given = sorted(name for name in (*sdar.ACTS, *ACTS) if getattr(args, name) not in (None, False))
    for name in given:  # the flags the mode cannot act on: refused, not ignored
        if mode not in {**sdar.ACTS, **ACTS}[name]:
            fail(f"{FLAGS.name(name)} does not apply to {sdar.MODES[mode]}")
    trained = (draft or target).config.block_size
    block = args.block or trained or 4
    if trained is not None and block != trained:
        advice = " (block 8 needs the -b8 checkpoints, e.g. SDAR-8B-Chat-b8)" if block == 8 else ""
        fail(f"block {block} requested but this checkpoint was trained with block {trained}; "
             f"use --block {trained} or leave it out{advice}")
    threshold = sdar.Settings.threshold if args.threshold is None else args.threshold
    s = sdar.Settings(args.max_new_tokens, block, args.steps, args.strategy or "static", threshold,
                      sdar.Sampling(args.temperature, args.top_k, args.top_p), tok.stop_ids,
                      args.verify, args.accept, args.lookahead or sdar.LOOKAHEAD,
                      args.eos_min_prob or 0.0, args.proposer, args.drafting)
    try:
        s.check(mode, [name for name in given if name in sdar.ACTS], FLAGS)
    except ValueError as e:
        fail(e)
    full = s.resolve(mode)
    size = speculative.widest(full, mode) if mode in SPECULATIVE else {"vanilla": 2 * block,
                                                                        "ar": 1}[mode]
    if size > MAX_FORWARD:
        fail(f"one target forward would hold {size} tokens (block {block}, steps {full.steps}, "
             f"lookahead {full.lookahead}), more than the {MAX_FORWARD} whose attention mask this "
             "command builds; use a smaller --block, --steps or --lookahead")
    return s


# One decode, checked before any weights load: its checkpoints, mode, Settings and prompts (with
# their chat ids).
Plan = namedtuple("Plan", "target draft tok mode settings prompts chats")


def plan(args, target_dir, draft_dir, prompts):
    target, draft, tok, mode = read_pair(args, target_dir, draft_dir)
    s = settings_of(args, mode, target, draft, tok)
    chats = [tok.chat(text, args.system, enable_thinking=not args.no_think)
             for text, _, _ in prompts]
    return Plan(target, draft, tok, mode, s, prompts, chats)


def main(argv=None):
    if sys.stderr is None:  # started with stderr closed (`2>&-`): print(file=None) would write its
        sys.stderr = open(os.devnull, "w")  # lines into stdout, among the answers: drop them
    if sys.stdout is None:  # started with stdout closed (`>&-`): print() would drop every answer
        fail("stdout is closed, so no answer could be written; run the command with its output "
             "going to a terminal, a file or a pipe", 1)
    args = parse_args(argv)
    check_flags(args)
    devices = (pick_device(args.device, "--device"),
               pick_device(args.draft_device or args.device,
                           "--draft-device" if args.draft_device else "--device"))
    plans = [plan(args, *job) for job in jobs(args)]  # every checkpoint and prompt: the toys' too
    check_lengths(args, plans)
    note_untrained(args)
    for p in plans:
        target = load_weights(p.target, devices[0], dtype_of(args, devices[0]), args.compile)
        if p.draft is not None and p.draft.config.model_type == head.MODEL_TYPE:
            try:  # a head: tied to its target
                draft = head.load(p.draft.path, target, devices[0])
            except (OSError, ValueError) as e:
                fail(f"--draft {p.draft.path}: {e}")
        else:
            draft = p.draft and load_weights(p.draft, devices[1], dtype_of(args, devices[1]),
                                             args.compile)
        params = sum(x.numel() for m in (target, draft) if m is not None for x in m.parameters())
        small = params < 100e6 and "cuda" not in devices
        torch.set_num_threads(args.threads or (1 if small else torch.get_num_threads()))
        models = (target, draft or ("self" if p.mode == "self" else None))
        if args.prompts is not None:
            decode_file(models, p.tok, p.chats, p.prompts, p.settings, p.mode, args)
            continue
        for ids, (text, answer, _) in zip(p.chats, p.prompts):
            decode_one(models, p.tok, ids, text, answer, p.settings, p.mode, args)
    if args.prompts is None:
        say("\n(tok/s is rough here, and the first prompt includes warm-up: python bench.py "
            "measures speed)")


def dtype_of(args, device):
    return getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))


def check_lengths(args, plans):
    """A sentence naming the first prompt (its line of --prompts, and the other lines) that would
    not fit its model's positions with --max-new-tokens and one block."""
    too_long = []
    for p in plans:
        room, block = p.target.config.max_position_embeddings, p.settings.block
        for ids, (_, _, line) in zip(p.chats, p.prompts):
            if len(ids) + args.max_new_tokens + block > room:
                too_long.append((line or 0, len(ids), block, room))
    if not too_long:
        return
    too_long.sort()
    line, n, block, room = too_long[0]
    where = f"line {line} of --prompts: the prompt" if line else "the prompt"
    others = [str(other[0]) for other in too_long[1:]] if line else []
    if len(others) > 5:
        others = others[:5] + [f"{len(others) - 5} more"]
    lines = "does line" if len(others) == 1 else "do lines"
    also = f" (and so {lines} {', '.join(others)})" if others else ""
    fail(f"{where} ({n} tokens), --max-new-tokens {args.max_new_tokens} and one block ({block}) "
         f"exceed the model's max_position_embeddings {room}{also}; shorten the prompt or lower "
         "--max-new-tokens")


def note_untrained(args):
    """The toys' note on each prompt outside what they learned: --prompt's on stdout, each line's of
    --prompts on stderr (stdout holds the JSON lines)."""
    if args.model:
        return
    if args.prompts is None:
        note = args.prompt is not None and train_tiny.outside_training(args.prompt)
        if note:
            say(f"note: {note}")
        return
    for n, text in args.lines:
        note = train_tiny.outside_training(text)
        if note:
            print(f"note: line {n} of --prompts: {note}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- decoding

def decode_file(models, tok, chats, prompts, s, mode, args):
    """Decode the prompts in batches of --batch-size; each prompt's answer is printed as one JSON
    line (index: its place among the file's prompts, line: its line) as soon as it is final."""
    size, index = args.batch_size or 16, {line: i for i, (line, _) in enumerate(args.lines)}
    for first in range(0, len(chats), size):
        batch = list(range(first, min(first + size, len(chats))))

        def on_row(i, tokens, stats, batch=batch):
            text, _, line = prompts[batch[i]]
            end = "length" if len(tokens) == args.max_new_tokens else "stop"
            record = json.dumps({"index": index[line], "line": line, "prompt": text,
                                 "output": tok.decode(tokens), "tokens": len(tokens), "end": end},
                                ensure_ascii=False)
            say(record.translate(ONE_LINE))
        t0 = time.perf_counter()
        outs, _ = run_decoder(models, [chats[b] for b in batch], s, mode, args, on_row=on_row)
        print(f"[{count(len(batch), 'prompt')}, {sum(map(len, outs))} tokens in "
              f"{time.perf_counter() - t0:.2f} s ({mode}, batch of {len(batch)})]", file=sys.stderr,
              flush=True)


def decode_one(models, tok, ids, text, answer, s, mode, args):
    out = Printer(tok, sys.stdout.isatty(), mode)
    say(f"\n>>> {text}\n")
    if args.show:
        out.legend()
    on_iteration = out.show if args.show else lambda info: out.stream(info["new"])
    tokens, stats = run_decoder(models, ids, s, mode, args, callback=out.stream,
                                on_iteration=on_iteration)
    text_out = tok.decode(tokens)
    say("\n" + text_out if args.show else text_out[len(out.shown):])
    if answer is not None:
        say(f"[{verdict(text, text_out, answer, len(tokens), args.max_new_tokens)}]")
    say(f"[{summary(stats, s, mode, sdar.device_of(models[0]))}]")


def run_decoder(models, prompts, s, mode, args, callback=None, on_iteration=None, on_row=None):
    """The mode's decoder on one prompt or a batch: callback streams a decoder alone's tokens,
    on_iteration sees a speculative one's iterations, on_row each prompt's final output."""
    target, draft = models
    device = sdar.device_of(draft if draft not in (None, "self") else target)
    options = {f.name: getattr(s, f.name) for f in fields(s) if f.name != "mask_id"}
    common = dict(generator=torch.Generator(device=device).manual_seed(args.seed), on_row=on_row)
    if mode == "ar":
        return generate_ar(target, prompts, s.max_new_tokens, sampling=s.sampling,
                           stop_ids=s.stop_ids, callback=callback, **common)
    if mode == "vanilla":
        alone = {k: options[k] for k in ("block", "steps", "strategy", "threshold", "sampling",
                                         "stop_ids")}
        return generate(target, prompts, callback=callback, **common, **alone,
                        max_new_tokens=s.max_new_tokens)
    return speculative.generate(target, None if draft == "self" else draft, prompts,
                                on_iteration=on_iteration, **common, **options)


def verdict(prompt, output, answer, n_tokens, max_new_tokens):
    if train_tiny.score(prompt, output, answer):
        return "correct"
    if n_tokens == max_new_tokens:
        return f"truncated at --max-new-tokens {max_new_tokens}"
    return f"wrong; one right answer: {answer}"


def count(n, thing):
    return f"{n} {thing}" if n == 1 else f"{n} {thing}s"


def summary(stats, s, mode, device):
    """One line on what a decode did. The forwards commit whole steps, some past the output's end
    (its stop token, or --max-new-tokens), which the counts say: each step commits a token or
    more, so at least `steps - tokens` of them committed none that was returned."""
    forwards, s = max(stats.forwards, 1), s.resolve(mode)
    what = "forward" if mode in ("ar", "vanilla") else "target forward"
    parts = [f"{count(stats.tokens, 'token')} in {count(stats.forwards, what)} "
             f"({stats.tokens / forwards:.2f} tokens per {what})"]
    if mode in SPECULATIVE:
        past = stats.steps - stats.tokens
        beyond = f" (at least {past} past the output's end)" if past > 0 else ""
        parts.append(f"{count(stats.steps, 'step')} committed{beyond}, {stats.matched} as "
                     f"proposed ({stats.matched / forwards:.2f} proposed steps matched per target "
                     "forward)")
        parts.append(f"{stats.draft_forwards / forwards:.2f} draft forwards per target forward")
    names = {"paper": f"{s.verify}, {s.accept} order",
             "self": "lossless, the target proposing for itself",
             "lossless": f"lossless, {s.proposer} proposals"}
    parts.append(names.get(mode, mode))
    if mode != "ar":
        parts.append(f"block {s.block}")
    if mode in SPECULATIVE:
        parts.append(f"lookahead {s.lookahead}")
    parts.append(f"{device.type}, {torch.get_num_threads()} thread(s)")
    return ", ".join(parts) + f"; {stats.tokens / max(stats.seconds, 1e-9):.0f} tok/s"


class Printer:
    """Streams decoded text, holding back a split UTF-8 character; draws --show iterations."""
    STYLE = {"known": ("2", "({})"), "accepted": ("32", "[{}]"), "target": ("31", "{{{}}}"),
             "dropped": ("9;90", "~{}~"), "bonus": ("1;33", "<{}>")}  # colour, marker without

    def __init__(self, tok, color, mode=None):
        self.tok, self.tokens, self.shown, self.color, self.mode = tok, [], "", color, mode
        self.lossless = mode in ("lossless", "self")

    def stream(self, tokens):
        self.tokens += tokens
        text = self.tok.decode(self.tokens)
        if not text.endswith("\ufffd"):
            say(text[len(self.shown):], end="")
            self.shown = text

    def paint(self, kind, text):
        code, marker = self.STYLE[kind]
        return f"\033[{code}m{text}\033[0m" if self.color else marker.format(text)

    def word(self, token):
        return repr(self.tok.decode([token]))[1:-1]

    def legend(self):
        target = "t@s>u@k the target's u at its step k" if self.lossless else \
            "t@s>u the target's u instead"
        kinds = [("known", "known"), ("accepted", "t@s committed as proposed"), ("target", target),
                 ("dropped", "t@s dropped"), ("bonus", "u the target's own where nothing was "
                                              "proposed")]
        painted = "  ".join(self.paint(kind, words) for kind, words in kinds)
        who = "the chain shown (by the draft or the target itself)" if self.lossless else \
            "the draft"
        say(f"  every proposed block after verification; t@s = the token t proposed at step s of "
            f"{who}:\n  {painted}")

    def cell(self, fate, token, drafted, step, taken):
        if fate == KNOWN:
            return self.paint("known", self.word(token))
        proposal = f"{self.word(drafted)}@{step}"
        if fate == ACCEPTED:
            return self.paint("accepted", proposal)
        if fate == DROPPED:
            return self.paint("dropped", proposal)
        if step == 0:  # the target's token where nothing was proposed: an AR target's bonus
            return self.paint("bonus", self.word(token))
        own = f"@{taken}" if self.lossless else ""
        return self.paint("target", f"{proposal}>{self.word(token)}{own}")

    def tally(self, fate, steps, taken, by):
        if not self.lossless:
            names = ((ACCEPTED, "accepted"), (TARGET, "the target's"), (DROPPED, "dropped"))
            return "(" + ", ".join(f"{fate.count(f)} {name}" for f, name in names) + ")"
        if TARGET in fate and not any(steps):
            return f"(the target's own step {taken}: nothing was proposed from this state)"
        if TARGET in fate:
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
                     if f != KNOWN or t != self.tok.mask_id]  # never-proposed positions: blank
            if not any(fate):
                continue  # a block after the proposed ones that holds nothing new
            lead = "  @" if j == 0 else " +@"  # a block reached by lookahead: the same forward
            tally = self.tally(fate, steps, taken, info["by"])
            say(f"{lead}{start:<4} {' '.join(cells)}   {tally}")


def run(main):
    """main() as a program (this one, bench.py, split.py, gpu.py): one line and a status for what
    ends it from outside. A reader gone away (`| head`): quiet, 1. Output that cannot be written:
    1. Ctrl-C: 130 (each program's own quit_at_once covers its imports; from here, a
    KeyboardInterrupt, unless the program was started with Ctrl-C ignored)."""
    try:
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt from here
        main()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush: quiet
        sys.exit(1)
    except OutputError as e:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        fail(f"stdout cannot be written ({e}), so the output stops here, incomplete; send it "
             "somewhere that can take it", 1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    finally:  # done: a Ctrl-C while Python exits (it then resets the handler) changes nothing
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    run(main)
