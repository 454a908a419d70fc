"""Forwards at real model shapes, with random weights, against the weight-bytes floor; and the
prepared device report.

    python gpu.py --shapes sdar-8b:sdar-1.7b    # on a GPU: SDAR-8B and its SDAR-1.7B draft
    python gpu.py --shapes tiny:tiny            # anywhere, in seconds
    python gpu.py --gpu-report                  # one call of at most 6 minutes on one H100
    python gpu.py --gpu-report --tiny           # every measurement at the tiny shapes, in seconds

A forward at batch 1 must read every weight once, so it takes at least the weight bytes over the
memory bandwidth (measured by a large copy on CUDA). --shapes times each forward one block costs (a
denoising step, the verifications, the draft's step) and vanilla decoding, and prints a table and
one JSON line. --gpu-report measures, each in its own guard and within a time budget: copy
bandwidth; forwards at the SDAR-8B and SDAR-1.7B shapes (batch 1 and 16, 512 and 4096 cached
tokens) eager and compiled, against the floor; the attention kernel a forward runs; one iteration of
each decoding method and its host round trips; float32 against bfloat16 on the trained toys; the
peak memory of a batch-16 prefill, measured and computed on the meta device (peak_bytes). It writes
gpu-report.json and gpu-report.md to --out after each measurement, and prints the markdown.
"""
import argparse
import contextlib
import gc
import json
import os
import signal
import statistics
import sys
import threading
import time
import traceback
import weakref
from collections import Counter
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path


def quit_at_once(signum, frame):
    """Ctrl-C while torch imports: one line and exit status 130 at once, not a traceback."""
    os.write(2, b"\ninterrupted\n")
    os._exit(130)


if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, quit_at_once)  # from here, not after torch's second or more

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import checkpoint
import decode
import mask as masks
import model
import sdar
import speculative
import train_tiny
from batch import clock
from bench import clean, markdown, show

TINY = model.Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, mask_token_id=511)
SHAPES = {**model.PRESETS, "tiny": TINY}


def fail(message):
    print(f"gpu.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def random_model(config, device, dtype, seed):
    """Random weights of `config`'s shape, built on the meta device and materialised once on
    `device` (an 8B model builds in seconds): normals of std 0.02, norms at 1."""
    with torch.device("meta"):
        m = model.Transformer(config).to(dtype)
    m = m.to_empty(device=device).eval()
    if config.tie_word_embeddings:
        m.lm_head.weight = m.model.embed_tokens.weight  # to_empty materialises each module's copy
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for param_name, p in m.named_parameters():
            if param_name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return m


def median_time(run, repeats, device):
    """Median seconds of `repeats` calls of run() after one untimed, synchronised on CUDA."""
    run()
    seconds = []
    for _ in range(repeats):
        t0 = clock(device)
        run()
        seconds.append(clock(device) - t0)
    return statistics.median(seconds)


def layouts(B):
    """{forward: (attention mask, positions after the context)} of the forwards one block costs:
    a denoise step (the target's, or the draft's), and the target's verification of a block drafted
    one position per step, lossless or exact (B copies, mask.copies) or simsd (2B, mask.verify)."""
    step = torch.ones(B, B, dtype=torch.bool)
    return {"target denoise step": (step, torch.arange(B)),
            "target verify, lossless/exact": (masks.copies(B, B), torch.arange(B).repeat(B)),
            "target verify, simsd": (masks.verify(torch.arange(1, B + 1)),
                                     torch.arange(B).repeat(2)),
            "draft step": (step, torch.arange(B))}


def forward_seconds(m, attend, pos, ctx, repeats, device):
    """Median seconds of one forward of m over the layout (attend, pos) after ctx cached tokens."""
    cache = m.new_cache(ctx + len(pos))
    ids = torch.randint(0, m.config.vocab_size - 1, (ctx + len(pos),), device=device)
    sdar.prefill(m, ids[:ctx], cache, 1)
    call = partial(m, ids[None, ctx:], pos.to(device) + ctx, attend.to(device), cache)
    return median_time(call, repeats, device)


@torch.inference_mode()
def shapes(args, device, dtype):
    names = args.shapes.split(":")
    if len(names) != 2 or any(n not in SHAPES for n in names):
        fail(f"--shapes takes TARGET:DRAFT with names from {', '.join(sorted(SHAPES))}")
    target, draft = (random_model(SHAPES[n], device, dtype, seed) for seed, n in enumerate(names))
    new, repeats, dev = args.new_tokens, args.repeats, torch.device(device)
    bandwidth = args.bandwidth and args.bandwidth * 1e9
    if device == "cuda" and not bandwidth:  # bytes read + written per second by a large copy
        a = torch.empty(2 ** 28, device=device)
        bandwidth = 2 * a.nbytes / median_time(lambda: torch.empty_like(a).copy_(a), 5, dev)
    blocks, cells = [], []
    for B in args.blocks:
        forwards = []
        for label, (attend, pos) in layouts(B).items():
            m = draft if label == "draft step" else target
            seconds = forward_seconds(m, attend, pos, args.context, repeats, dev)
            nbytes = sum(p.nbytes for p in m.parameters())
            floor = bandwidth and nbytes / bandwidth / seconds  # the share of the bytes floor
            forwards.append({"name": label, "tokens": len(pos), "ms": seconds * 1e3,
                             "weight_bytes": nbytes, "floor_fraction": floor})
            cells.append([B, label, len(pos), f"{seconds * 1e3:.2f}", f"{nbytes / 1e9:.3f}",
                          show(floor, ".0%")])
        prompt = torch.randint(0, target.config.mask_token_id, (args.context,)).tolist()
        vanilla = new / median_time(partial(sdar.generate, target, prompt, new, block=B),
                                    repeats, dev)
        blocks.append({"block": B, "forwards": forwards, "vanilla_tok_s": vanilla})
        cells.append([B, f"vanilla decoding: {vanilla:.1f} tok/s", "", "", "", ""])
    gpu = torch.cuda.get_device_name(dev) if device == "cuda" else None
    print(f"- {gpu or device}, {str(dtype).removeprefix('torch.')}, threads "
          f"{torch.get_num_threads()}, batch 1, {args.context} context tokens cached, median "
          f"of {repeats} after one warm-up; vanilla: {new} new tokens, prefill included\n")
    print(markdown(["block", "forward", "query tokens", "ms", "weight GB",
                    "fraction of the weight-bytes floor"], cells))
    peak = torch.cuda.max_memory_allocated(dev) if device == "cuda" else None
    result = {"device": device, "dtype": str(dtype).removeprefix("torch."), "gpu": gpu,
              "peak_memory_bytes": peak, "bandwidth_GBps": bandwidth and bandwidth / 1e9,
              "threads": torch.get_num_threads(), "target": names[0], "draft": names[1],
              "context": args.context, "new_tokens": new, "batch": 1, "blocks": blocks}
    print(json.dumps(clean(result), allow_nan=False))


# ----------------------------------------------------------------------------- host round trips

Tensor = torch.Tensor
READS = {Tensor.item, Tensor.tolist, Tensor.__bool__, Tensor.__int__, Tensor.__float__,
         Tensor.__index__, Tensor.numpy, Tensor.cpu, Tensor.nonzero, torch.nonzero,
         torch.multinomial, Tensor.multinomial}  # a device value read, or checked, on the host


def host_indexed(index):
    """An index that the device must take from the host, or read back: a Python list, a boolean
    mask (its count decides the shape)."""
    if isinstance(index, tuple):
        return any(host_indexed(i) for i in index)
    return isinstance(index, list) or isinstance(index, Tensor) and index.dtype == torch.bool


def caller():
    """The innermost frame outside torch and this counter: the line that made the round trip."""
    for frame in reversed(traceback.extract_stack()):
        if os.sep + "torch" + os.sep not in frame.filename and frame.name != "__torch_function__" \
                and frame.name != "caller":
            return frame


class Syncs(TorchFunctionMode):
    """Counts host round trips while `on`: a value read back (READS), a tensor made from Python
    data (a copy from the host), a list or a boolean mask used as an index. `where` keeps the
    calling lines."""

    def __init__(self):
        super().__init__()
        self.on, self.count, self.where = False, 0, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.on and self.round_trip(func, args):
            self.count += 1
            self.where.append(caller())
        return func(*args, **kwargs)

    @staticmethod
    def round_trip(func, args):
        if func in READS:
            return True
        if func in (torch.tensor, torch.as_tensor):
            return not isinstance(args[0], Tensor)
        if func in (Tensor.__getitem__, Tensor.__setitem__):
            return host_indexed(args[1])
        return False


def counted(decode, loop, name):
    """Run decode() twice (the second with warm caches of layouts) and count the second's round
    trips from the first call of loop.name (one iteration each) to the end: (round trips,
    iterations, where, decode's result)."""
    decode()
    syncs, calls, original = Syncs(), [0], getattr(loop, name)

    def opening(*args, **kwargs):
        syncs.on, calls[0] = True, calls[0] + 1
        return original(*args, **kwargs)
    setattr(loop, name, opening)
    try:
        with syncs:
            result = decode()
    finally:
        setattr(loop, name, original)
    return syncs.count, calls[0], syncs.where, result


# ----------------------------------------------------------------------------- --gpu-report

TINY_DRAFT = replace(TINY, num_hidden_layers=1)


@dataclass(frozen=True)
class Plan:
    """The sizes of a --gpu-report: the target's and the draft's shapes (SpecDiff's AR target is
    the draft's shape as a Qwen3: an 8B one would cost another 16 GB and minutes), the forwards'
    batches and cached contexts, the iterations' prompt and new tokens, the prefill whose peak
    memory is taken (its largest batch, peak_tokens each, in chunks of `chunk` tokens), and the
    held-out prompts per toy task."""
    names: tuple
    target: model.Config
    draft: model.Config
    batches: tuple = (1, 16)
    contexts: tuple = (512, 4096)
    block: int = 4
    prompt: int = 64
    new_tokens: int = 32
    peak_tokens: int = 4096
    chunk: int = sdar.PREFILL_TOKENS
    toy_prompts: int = 16
    copy_floats: int = 2 ** 28  # the bandwidth copy's: 1 GiB on CUDA

    def config(self, role):
        if role == "ar":
            return replace(self.draft, model_type="qwen3", mask_token_id=None)
        return self.target if role == "target" else self.draft

    def name(self, role):
        return {"target": self.names[0], "draft": self.names[1],
                "ar": f"qwen3 at the {self.names[1]} shape"}[role]


FULL = Plan(("sdar-8b", "sdar-1.7b"), model.SDAR_8B, model.SDAR_1_7B)
SMALL = Plan(("tiny", "tiny, 1 layer"), TINY, TINY_DRAFT, contexts=(16, 64), prompt=16,
             new_tokens=8, peak_tokens=256, chunk=512, toy_prompts=2, copy_floats=2 ** 22)
BUDGET = 300  # seconds: with torch's import and the files' writing, within a 6-minute call


class OverBudget(BaseException):
    """The report's time is up. A BaseException, so that code which catches Exception (a
    compiler's fallbacks) lets it through."""


class Report:
    """One --gpu-report: where it runs, its sizes, its models (random weights, fused as a loaded
    checkpoint is; built when first asked for and kept: 8B + 1.7B + 1.7B fit an H100 with room for
    a 10 GB cache), the copy bandwidth once measured, the deadline, and the results so far."""

    def __init__(self, plan, device, dtype, repeats, budget, out):
        self.plan, self.device, self.dtype, self.repeats = plan, device, dtype, repeats
        self.out = out
        self.started = time.monotonic()
        self.deadline = self.started + budget
        self.models, self.compiled_models, self.bandwidth = {}, {}, None
        self.results = {"conditions": conditions(self, budget)}

    def model(self, role):
        if role not in self.models:
            seed = ("target", "draft", "ar").index(role)
            built = random_model(self.plan.config(role), self.device, self.dtype, seed)
            self.models[role] = built.fuse()
        return self.models[role]

    def compiled(self, role):
        if role not in self.compiled_models:
            self.compiled_models[role] = sdar.compiled(self.model(role))
        return self.compiled_models[role]

    def write(self):
        """gpu-report.json and gpu-report.md in `out`, each replaced whole (a run stopped midway
        leaves the last complete pair)."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.results["conditions"]["elapsed_s"] = time.monotonic() - self.started
        text = json.dumps(clean(self.results), indent=1, allow_nan=False, default=str)
        for name, content in (("gpu-report.json", text + "\n"),
                              ("gpu-report.md", render(self.results))):
            part = self.out / (name + ".part")
            part.write_text(content, encoding="utf-8")
            part.replace(self.out / name)


def conditions(r, budget):
    """What the numbers were measured on and with."""
    dev, plan = r.device, r.plan
    cuda = dev.type == "cuda"
    return {"device": dev.type, "gpu": torch.cuda.get_device_name(dev) if cuda else None,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "dtype": str(r.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "target": plan.name("target"), "draft": plan.name("draft"), "ar": plan.name("ar"),
            "batches": list(plan.batches), "contexts": list(plan.contexts), "block": plan.block,
            "prompt_tokens": plan.prompt, "new_tokens": plan.new_tokens,
            "repeats": r.repeats, "budget_s": budget,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def free(device):
    """Give the device back what the last measurement left (its caches, activations), cycles
    included; on a CPU nothing (a collection costs tens of milliseconds)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def attempt(r, measure, *args):
    """measure(*args), or {"error": why} when it raises or the report's time is up: a failure costs
    its own measurement only."""
    if time.monotonic() >= r.deadline:
        return {"error": "skipped: time budget"}
    try:
        return measure(*args)
    except (Exception, OverBudget) as e:
        return {"error": f"{type(e).__name__}: {e}"[:600]}


@contextlib.contextmanager
def alarm(deadline):
    """OverBudget raised at the deadline, from a signal (between two Python steps of whatever
    runs), so that no measurement overruns the call; only in the main thread, where signals go."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ring(signum, frame):
        raise OverBudget("time budget spent")
    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, max(deadline - time.monotonic(), 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------- 1. bandwidth

def bandwidth(r):
    """Bytes read + written per second by a device copy of random floats (1 GiB on CUDA; a small
    one with --tiny): the memory bandwidth the floors divide by."""
    a = torch.randn(r.plan.copy_floats, device=r.device)
    b = torch.empty_like(a)
    seconds = median_time(lambda: b.copy_(a), 10, r.device)
    r.bandwidth = 2 * a.nbytes / seconds
    return {"bytes": a.nbytes, "ms": seconds * 1e3, "GB_s": r.bandwidth / 1e9}


# ----------------------------------------------------------------------------- 2. forwards

def prefilled(r, m, batch, ctx, room):
    """A cache of `batch` rows holding ctx random tokens each (sdar.prefill), with room for `room`
    more, and random ids (batch, room) to forward after them."""
    cache = m.new_cache(ctx + room, batch)
    ids = torch.randint(0, m.config.vocab_size - 1, (batch, ctx + room), device=r.device)
    if ctx:
        sdar.prefill(m, ids[:, :ctx], cache, r.plan.block)
    return cache, ids[:, ctx:]


def report_layouts(B):
    """{forward: (mask, positions after the context)}: a block that sees all of itself, with no
    mask (a denoising step) and with a boolean one (the same attention through the masked path,
    as verifying forwards take it), and lossless verification's B copies of a block (layouts)."""
    block = torch.arange(B)
    return {"block, no mask": (None, block),
            "block, bool mask": (torch.ones(B, B, dtype=torch.bool), block),
            f"lossless verify, {B}x{B}": layouts(B)["target verify, lossless/exact"]}


def weight_bytes(m):
    """The weight bytes a forward reads: every parameter but the embedding table, of which it
    reads its tokens' rows only (a tied table is read whole, as the head)."""
    table = m.model.embed_tokens.weight
    return sum(p.nbytes for p in m.parameters()
               if p is not table or m.config.tie_word_embeddings)


def kv_bytes(config, dtype):
    """KV cache bytes per token of a row: keys and values of every layer."""
    c = config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * dtype.itemsize


def time_forward(r, m, run, cache, ids, attend, pos, ctx, warm=1):
    """One layout's forward (run: the model, or it compiled) over the cached context: the median
    milliseconds, and the share of the floors it reaches (the weights' bytes, and the weights'
    and the KV cache's) over the copy bandwidth. warm > 1: the first call's time (a compile) is
    kept apart, and more calls go untimed (CUDA graphs record on a later one)."""
    pos = pos.to(r.device) + ctx
    attend = None if attend is None else attend.to(r.device)
    call = partial(run, ids[:, :len(pos)], pos, attend, cache)
    row = {}
    if warm > 1:
        t0 = clock(r.device)
        call()
        row["first_call_ms"] = (clock(r.device) - t0) * 1e3
        for _ in range(warm - 2):
            call()
    seconds = median_time(call, r.repeats, r.device)
    weights = weight_bytes(m)
    kv = kv_bytes(m.config, r.dtype) * len(ids) * (ctx + len(pos))
    bw = r.bandwidth
    return {**row, "ms": seconds * 1e3, "weight_bytes": weights, "kv_bytes": kv,
            "floor_fraction": bw and weights / bw / seconds,
            "bytes_floor_fraction": bw and (weights + kv) / bw / seconds}


def layout_times(r, role, batch, ctx, compiled=False):
    """Each layout's forward at one model, batch and context, over one prefilled cache (a forward
    writes its tokens after the context and commits none, so the next sees the same cache)."""
    m, B = r.model(role), r.plan.block
    run = r.compiled(role) if compiled else m
    with torch.inference_mode():
        cache, ids = prefilled(r, m, batch, ctx, B * B)
        rows = []
        for label, (attend, pos) in report_layouts(B).items():
            row = {"model": r.plan.name(role), "batch": batch, "context": ctx, "forward": label,
                   "tokens": len(pos)}
            rows.append({**row, **attempt(r, time_forward, r, m, run, cache, ids, attend, pos, ctx,
                                          3 if compiled else 1)})
    return rows


def shapes_of(r):
    """(model, batch, context) of every forwards row, the cheapest first."""
    p = r.plan
    return sorted(((role, b, c) for role in ("target", "draft") for b in p.batches
                   for c in p.contexts), key=lambda s: (s[1] * s[2], s[0] != "target"))


def forwards(r, compiled=False):
    """The forwards' rows at every shape, eager (or compiled)."""
    rows = []
    for role, batch, ctx in shapes_of(r):
        got = attempt(r, layout_times, r, role, batch, ctx, compiled)
        free(r.device)
        rows += got if isinstance(got, list) else [
            {"model": r.plan.name(role), "batch": batch, "context": ctx, **got}]
    return rows


def compiled(r):
    """The forwards through sdar.compiled(model), where sdar has it: compiled for decoding."""
    if not hasattr(sdar, "compiled"):
        return {"error": "compiled: not available (sdar has no compiled)"}
    return forwards(r, compiled=True)


# ----------------------------------------------------------------------------- 3. attention

PATHS = {"flash": ("flash_attention",), "efficient": ("efficient_attention",),
         "cudnn": ("cudnn_attention",), "math": ("attention_math", "_safe_softmax", "bmm")}
ATTENTION_WORDS = ("scaled_dot_product", "attention", "softmax", "bmm", "flash", "efficient",
                   "cudnn", "fmha", "sdpa")


def profiled(call, device):
    """The attention ops (aten) and device kernels one call runs, from torch.profiler, and the
    path they show: flash, efficient, cudnn or math on CUDA, cpu elsewhere."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        call()
        clock(device)
    ops, kernels = set(), set()
    for event in prof.events():
        if any(word in event.name.lower() for word in ATTENTION_WORDS):
            if event.device_type == DeviceType.CUDA:
                kernels.add(event.name)
            elif event.name.startswith("aten::"):
                ops.add(event.name)
    path = "cpu" if device.type != "cuda" else next(
        (p for p, marks in PATHS.items() if any(m in op for op in ops for m in marks)), "unknown")
    return {"path": path, "aten": sorted(ops), "kernels": sorted(kernels)}


def attention(r):
    """Which attention kernel ran in a decode-time forward of the target (batch 1, a block after
    the first context): with a boolean mask (what verifying forwards pass) and with none (a
    denoising step, whose block sees all of itself)."""
    m, B, ctx = r.model("target"), r.plan.block, r.plan.contexts[0]
    with torch.inference_mode():
        cache, ids = prefilled(r, m, 1, ctx, B)
        pos = torch.arange(ctx, ctx + B, device=r.device)
        out = {}
        for label, attend in (("bool mask", torch.ones(B, B, dtype=torch.bool, device=r.device)),
                              ("no mask", None)):
            call = partial(m, ids, pos, attend, cache)
            call()  # once unprofiled: lazy initialisations stay out of the profile
            out[label] = attempt(r, profiled, call, r.device)
    return out


# ----------------------------------------------------------------------------- 4, 5. iterations

METHODS = {  # name: (target role, draft role, speculative.generate's settings; None: alone)
    "vanilla (target alone)": ("target", None, None),
    "lossless, draft proposes": ("target", "draft", {"proposer": "draft"}),
    "lossless, hybrid": ("target", "draft", {"proposer": "hybrid"}),
    "lossless, target proposes": ("target", None, {}),
    "AR target alone": ("ar", None, None),
    "SpecDiff (AR target, diffusion draft)": ("ar", "draft", {}),
}


def decoder(r, method, prompt):
    """(decode(), and the object and name of the function called once per iteration, as counted
    takes them): dynamic strategy, greedy, the plan's block and new tokens."""
    role, draft, settings = METHODS[method]
    m, n, B = r.model(role), r.plan.new_tokens, r.plan.block
    if settings is None and role == "ar":
        return partial(sdar.generate_ar, m, prompt, n), m, "forward"
    if settings is None:
        return partial(sdar.generate, m, prompt, n, block=B, strategy="dynamic"), sdar.Blocks, \
            "forward"
    return partial(speculative.generate, m, draft and r.model(draft), prompt, n, block=B,
                   strategy="dynamic", **settings), speculative, "speculate"


def iteration(r, method):
    """One decode of a random prompt by `method`: its host round trips per iteration (counted: a
    warm-up decode, then a counted one), then an uncounted decode's time per target forward."""
    p = r.plan
    below = min(c.mask_token_id or c.vocab_size for c in (p.target, p.draft))
    prompt = torch.randint(0, below, (p.prompt,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    decode, loop, name = decoder(r, method, prompt)
    try:
        syncs, calls, where, _ = counted(decode, loop, name)
    finally:
        if isinstance(loop, torch.nn.Module):
            vars(loop).pop(name, None)  # counted put the model's own forward back on the object
    _, stats = decode()
    sites = Counter(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in where)
    return {"target_forwards": stats.forwards, "draft_forwards": stats.draft_forwards,
            "tokens": stats.tokens, "ms": stats.seconds * 1e3,
            "ms_per_target_forward": stats.seconds * 1e3 / max(stats.forwards, 1),
            "ms_per_token": stats.seconds * 1e3 / max(stats.tokens, 1),
            "round_trips": syncs, "iterations": calls,
            "round_trips_per_iteration": syncs / max(calls, 1), "readbacks": stats.readbacks,
            "round_trip_sites": [f"{n} x {site}" for site, n in sites.most_common(5)]}


def iterations(r):
    rows = []
    for name in METHODS:
        rows.append({"method": name, **attempt(r, iteration, r, name)})
        free(r.device)
    return rows


# ----------------------------------------------------------------------------- 6. toys

@contextlib.contextmanager
def full_float32():
    """float32 matrix products in full precision (no TF32) while it is on."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def toy_outputs(r, folders, tok, prompts, dtype):
    """Each prompt's greedy output, decoded by the toy target alone and losslessly with its
    distilled draft (dynamic 0.9, block 4: the distillation's rule), in `dtype` on the device."""
    target = checkpoint.load(folders["target"], r.device, dtype)
    draft = checkpoint.load(folders["distilled"], r.device, dtype)
    rule = dict(train_tiny.DISTILL, stop_ids=tok.stop_ids)
    n = train_tiny.MAX_NEW_TOKENS
    with full_float32():
        alone = [sdar.generate(target, ids, n, **rule)[0] for ids in prompts]
        lossless = [speculative.generate(target, draft, ids, n, **rule)[0] for ids in prompts]
    return alone, lossless


def share(a, b):
    return sum(x == y for x, y in zip(a, b)) / len(a)


def toy_agreement(r, task):
    """On a task's held-out prompts: the share where bfloat16 lossless equals bfloat16 target
    alone, and where bfloat16 equals float32 (and float32 lossless its target: exact)."""
    folders = train_tiny.folders(task)
    if not all(train_tiny.complete(folders[role]) for role in ("target", "distilled")):
        return "toys absent"
    tok = checkpoint.load_tokenizer(folders["target"])
    prompts = [tok.chat(text) for text, _ in train_tiny.examples(r.plan.toy_prompts, "heldout",
                                                                  task=task)]
    (fa, fl), (ba, bl) = (toy_outputs(r, folders, tok, prompts, dt)
                          for dt in (torch.float32, torch.bfloat16))
    return {"prompts": len(prompts), "bf16_lossless_eq_bf16_target": share(bl, ba),
            "bf16_target_eq_fp32_target": share(ba, fa),
            "bf16_lossless_eq_fp32_lossless": share(bl, fl),
            "fp32_lossless_eq_fp32_target": share(fl, fa)}


def toys(r):
    return {task: attempt(r, toy_agreement, r, task) for task in train_tiny.TASKS}


# ----------------------------------------------------------------------------- 7. peak memory

def storage_key(t):
    return t.untyped_storage()._cdata


class LiveBytes(TorchDispatchMode):
    """The bytes of the tensors that ops make while it is on: `live` now and its `peak`. Each
    op's output storages that are new (not an input's: a view or an in-place result is not) are
    added when made and taken off when freed (weakref.finalize on the storage, whose Python object
    lives as long as it does). decompose: the attention call runs as its math path's ops, which
    materialise the scores, instead of as one op."""
    DECOMPOSED = (torch.ops.aten.scaled_dot_product_attention.default,
                  torch.ops.aten._scaled_dot_product_attention_math.default)

    def __init__(self, decompose=False):
        super().__init__()
        self.decompose, self.live, self.peak, self.sizes = decompose, 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.decompose and func in self.DECOMPOSED:
            with self:  # the decomposition's ops pass through this mode too
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        inputs = {storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and storage_key(t) not in inputs:
                self.add(t.untyped_storage())
        return out

    def add(self, storage):
        key = storage._cdata
        if key in self.sizes:
            return
        self.sizes[key] = storage.nbytes()
        self.live += self.sizes[key]
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self.drop, key)

    def drop(self, key):
        self.live -= self.sizes.pop(key)


def peak_bytes(config, batch, prompt_tokens, chunk, dtype=torch.bfloat16, attention="math"):
    """The device bytes a prefill of `batch` prompts of prompt_tokens tokens takes at its peak,
    computed on the meta device: the weights, the KV cache, and the most activation bytes live at
    once while sdar.prefill runs in chunks of `chunk` tokens (LiveBytes). attention "math": its
    math path, which materialises the scores (an upper bound: a fused kernel holds none);
    "fused": the attention's output only."""
    with torch.device("meta"):
        m = model.Transformer(config).to(dtype).eval()
    m.fuse()
    cache = m.new_cache(prompt_tokens, batch)
    ids = torch.zeros(batch, prompt_tokens, dtype=torch.long, device="meta")
    live = LiveBytes(decompose=attention == "math")
    with torch.inference_mode(), live:
        sdar.prefill(m, ids, cache, config.block_size or 4, chunk)
    weights = sum(p.nbytes for p in m.parameters())
    kv = cache.k.nbytes + cache.v.nbytes
    return {"weights_bytes": weights, "cache_bytes": kv, "activation_bytes": live.peak,
            "total_bytes": weights + kv + live.peak}


def measured_peak(r):
    """Peak device memory of one prefill of the plan's largest batch of peak_tokens random
    tokens each at the target's shape (default chunk), on CUDA: the activations' peak above what
    was allocated before (the models, the cache), and the weights + cache + that."""
    if r.device.type != "cuda":
        return {"error": "measured on CUDA only"}
    m, p = r.model("target"), r.plan
    batch = max(p.batches)
    with torch.inference_mode():
        cache = m.new_cache(p.peak_tokens, batch)
        ids = torch.randint(0, p.target.vocab_size - 1, (batch, p.peak_tokens), device=r.device)
        torch.cuda.synchronize(r.device)
        torch.cuda.reset_peak_memory_stats(r.device)
        base = torch.cuda.memory_allocated(r.device)
        sdar.prefill(m, ids, cache, p.block, p.chunk)
        torch.cuda.synchronize(r.device)
        activations = torch.cuda.max_memory_allocated(r.device) - base
    weights = sum(t.nbytes for t in m.parameters())
    kv = cache.k.nbytes + cache.v.nbytes
    return {"batch": batch, "prompt_tokens": p.peak_tokens, "chunk": p.chunk,
            "weights_bytes": weights, "cache_bytes": kv, "activation_bytes": activations,
            "total_bytes": weights + kv + activations}


def computed_peaks(r):
    """peak_bytes at the target's shape for each batch, at the plan's chunk and unchunked, with the
    attention's math path and fused."""
    p, rows = r.plan, []
    for batch in p.batches:
        whole = batch * p.peak_tokens
        for chunk in dict.fromkeys((min(p.chunk, whole), whole)):
            for path in ("math", "fused"):
                row = {"batch": batch, "prompt_tokens": p.peak_tokens, "chunk": chunk,
                       "attention": path}
                rows.append({**row, **attempt(r, peak_bytes, p.target, batch, p.peak_tokens,
                                              chunk, r.dtype, path)})
    return rows


# ----------------------------------------------------------------------------- the report

SECTIONS = {  # the order they run in: the cheap and the most wanted first, the compiler last
    "bandwidth": bandwidth, "attention": attention, "forwards": forwards,
    "prefill_peak": measured_peak, "iterations": iterations, "toys": toys,
    "computed_peak": computed_peaks, "compiled": compiled}


def gpu_report(r, skip=()):
    """Every section in its guard, the files rewritten after each; a section still running at the
    deadline stops, and later ones are skipped. Returns the markdown."""
    r.results["seconds"] = {}
    try:
        with alarm(r.deadline):
            for name, section in SECTIONS.items():
                t0 = time.monotonic()
                r.results[name] = {"error": "skipped: --skip"} if name in skip else \
                    attempt(r, section, r)
                free(r.device)
                r.results["seconds"][name] = time.monotonic() - t0
                print(f"gpu.py: {name} done in {time.monotonic() - t0:.1f} s", file=sys.stderr,
                      flush=True)
                try:
                    r.write()
                except Exception as e:  # the next write may succeed; the measurements go on
                    print(f"gpu.py: could not write the report: {e}", file=sys.stderr)
    except OverBudget:  # it rang between two sections
        pass
    for name in SECTIONS:
        r.results.setdefault(name, {"error": "skipped: time budget"})
    if r.device.type == "cuda":
        with contextlib.suppress(Exception):  # whatever a stopped measurement left
            r.results["conditions"]["max_memory_allocated_bytes"] = \
                torch.cuda.max_memory_allocated(r.device)
    r.write()
    return render(r.results)


# ----------------------------------------------------------------------------- markdown

def failed(value):
    """A section's or a row's error, as markdown, or None."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "error" in value:
        return f"error: {value['error']}"
    return None


def table(rows, columns):
    """A markdown table of rows (dicts) by columns {header: (key, format)}; a row with an error
    (or a note) shows it after the cells that say which row it is."""
    cells = []
    for row in rows:
        line = [fmt(row.get(key), spec) for key, spec in columns.values()]
        if "error" in row or "note" in row:
            known = sum(key in row for key, _ in columns.values())
            why = row["note"] if "note" in row else f"error: {row['error']}"
            line[known:] = [why] + [""] * (len(columns) - known - 1)
        cells.append(line)
    return markdown(list(columns), cells)


def fmt(value, spec):
    if value is None:
        return ""
    if isinstance(value, list):
        return "; ".join(map(str, value))
    if spec == "GB":
        return f"{value / 1e9:.3g}"
    return format(value, spec)


FORWARD_COLUMNS = {"model": ("model", "s"), "batch": ("batch", "d"),
                   "context": ("context", "d"), "forward": ("forward", "s"),
                   "query tokens": ("tokens", "d"), "ms": ("ms", ".2f"),
                   "first call ms": ("first_call_ms", ".0f"), "weight GB": ("weight_bytes", "GB"),
                   "KV GB": ("kv_bytes", "GB"), "of weight floor": ("floor_fraction", ".0%"),
                   "of weight+KV floor": ("bytes_floor_fraction", ".0%")}
ITERATION_COLUMNS = {"method": ("method", "s"), "target fwd": ("target_forwards", "d"),
                     "draft fwd": ("draft_forwards", "d"), "tokens": ("tokens", "d"),
                     "ms / target fwd": ("ms_per_target_forward", ".2f"),
                     "ms / token": ("ms_per_token", ".2f"),
                     "round trips / iteration": ("round_trips_per_iteration", ".2f"),
                     "iterations": ("iterations", "d"), "where (top)": ("round_trip_sites", "s")}
PEAK_COLUMNS = {"batch": ("batch", "d"), "prompt tokens": ("prompt_tokens", "d"),
                "chunk": ("chunk", "d"), "attention": ("attention", "s"),
                "weights GB": ("weights_bytes", "GB"), "KV cache GB": ("cache_bytes", "GB"),
                "activations GB": ("activation_bytes", "GB"), "total GB": ("total_bytes", "GB")}
TOY_COLUMNS = {"task": ("task", "s"), "prompts": ("prompts", "d"),
               "bf16 lossless = bf16 target": ("bf16_lossless_eq_bf16_target", ".0%"),
               "bf16 target = fp32 target": ("bf16_target_eq_fp32_target", ".0%"),
               "bf16 lossless = fp32 lossless": ("bf16_lossless_eq_fp32_lossless", ".0%"),
               "fp32 lossless = fp32 target": ("fp32_lossless_eq_fp32_target", ".0%")}


def render(results):
    """The report as markdown: the conditions, then a part per measurement."""
    c = results["conditions"]
    seconds = ", ".join(f"{k} {v:.1f}" for k, v in results.get("seconds", {}).items())
    out = [f"# gpu.py --gpu-report: {c['gpu'] or c['device']}, {c['dtype']}",
           "\n".join(f"- {k}: {v}" for k, v in c.items()) + f"\n- seconds per section: {seconds}"]
    for name, (title, renderer) in RENDERERS.items():
        if name in results:
            try:
                text = failed(results[name]) or renderer(results[name])
            except Exception as e:  # the JSON holds it all the same
                text = f"(not rendered: {type(e).__name__}: {e}; see the JSON)"
            out.append(f"## {title}\n\n{text}")
    return "\n\n".join(out) + "\n"


def render_bandwidth(b):
    return (f"{b['GB_s']:.1f} GB/s: bytes read + written by a copy of "
            f"{b['bytes'] / 2 ** 20:.0f} MiB, median of 10")


def render_forwards(rows):
    compiled = any("first_call_ms" in row for row in rows)
    columns = {k: v for k, v in FORWARD_COLUMNS.items() if compiled or k != "first call ms"}
    return ("Random weights; median of the repeats after warm-up, synchronised (compiled: the "
            "first call, its compile, apart). Weight bytes leave out the embedding table (a "
            "forward reads its tokens' rows only); the floors are bytes over the copy "
            "bandwidth.\n\n" + table(rows, columns))


def render_attention(a):
    lines = []
    for label, got in a.items():
        lines.append(f"- {label}: " + (failed(got) or f"**{got['path']}**; aten: "
                                       f"{', '.join(got['aten']) or '-'}; kernels: "
                                       f"{', '.join(k[:100] for k in got['kernels']) or '-'}"))
    return "\n".join(lines)


def render_iterations(rows):
    return ("Random weights: acceptance means nothing here (the draft rarely agrees with a random "
            "target); what matters is the time per iteration, and the round trips. Batch 1, "
            "greedy, strategy dynamic.\n\n" + table(rows, ITERATION_COLUMNS))


def render_toys(t):
    rows = [{"task": task, **(got if isinstance(got, dict) else {"note": got})}
            for task, got in t.items()]
    return ("Greedy, held-out prompts, batch 1; lossless: with the distilled draft.\n\n" +
            table(rows, TOY_COLUMNS))


def render_peak(p):
    return table([p], {k: v for k, v in PEAK_COLUMNS.items() if k != "attention"})


def render_computed(rows):
    return ("On the meta device. math: the attention's math path, which materialises the scores "
            "(an upper bound; a fused kernel holds none); fused: its output only.\n\n" +
            table(rows, PEAK_COLUMNS))


RENDERERS = {  # section: (title, renderer)
    "bandwidth": ("1. Copy bandwidth", render_bandwidth),
    "forwards": ("2. Forwards, eager", render_forwards),
    "compiled": ("2. Forwards, compiled (sdar.compiled)", render_forwards),
    "attention": ("3. Attention kernel, decode-time forward", render_attention),
    "iterations": ("4, 5. One iteration of each method, and host round trips", render_iterations),
    "toys": ("6. float32 and bfloat16 on the toys", render_toys),
    "prefill_peak": ("7. Prefill peak memory, measured", render_peak),
    "computed_peak": ("7. Prefill peak memory, computed", render_computed),
}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line: the reason, and where to learn more
        fail(f"{message} (python gpu.py --help lists the options)")


def count(text):
    """argparse's type of the counts: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {value}")
    return value


def main(argv=None):
    p = Parser(prog="gpu.py", description="Forwards at real model shapes with random weights, "
               "against the weight-bytes floor: a table and one JSON line; or, with --gpu-report, "
               "the prepared device report.")
    add = p.add_argument
    add("--shapes", default="sdar-8b:sdar-1.7b", help="TARGET:DRAFT, from "
        f"{', '.join(sorted(SHAPES))} (default sdar-8b:sdar-1.7b)")
    add("--blocks", type=count, nargs="+", default=[4, 8], help="block lengths (default 4 8)")
    add("--context", type=int, default=512, help="prefilled tokens (default 512)")
    add("--new-tokens", type=count, help="vanilla decoding's tokens (default 256; --gpu-report: "
        "each iteration's decode, default 32)")
    add("--repeats", type=count, help="timed runs per forward (default 3; --gpu-report 5)")
    add("--bandwidth", type=float, help="GB/s for the floor (default: measured on CUDA)")
    add("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    add("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on cuda, "
        "else float32")
    add("--threads", type=count, help="CPU threads (default: torch's)")
    report = p.add_argument_group("the device report")
    report.add_argument("--gpu-report", action="store_true", help="every measurement at the "
                        "SDAR-8B and SDAR-1.7B shapes, each in its own guard: JSON and markdown "
                        "to --out after each, the markdown printed at the end")
    report.add_argument("--tiny", action="store_true", help="--gpu-report at the tiny shapes and "
                        "sizes (seconds on a CPU)")
    report.add_argument("--out", help="--gpu-report's folder (default: $OUT when set, else "
                        "out/gpu-report)")
    report.add_argument("--budget", type=float, default=BUDGET, help="--gpu-report's seconds: a "
                        f"measurement running then stops, later ones are skipped (default "
                        f"{BUDGET})")
    report.add_argument("--toy-prompts", type=count, help="held-out prompts per toy task "
                        f"(default {FULL.toy_prompts}; --tiny {SMALL.toy_prompts})")
    report.add_argument("--skip", nargs="+", default=[], choices=list(SECTIONS),
                        metavar="SECTION", help=f"sections not run: {', '.join(SECTIONS)}")
    args = p.parse_args(argv)
    if args.context < 0 or args.bandwidth is not None and not 0 < args.bandwidth < float("inf"):
        fail("--context must be >= 0 and --bandwidth a finite number of GB/s above 0")
    if not 0 <= args.budget < float("inf"):
        fail("--budget must be a finite number of seconds >= 0")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but this machine has no CUDA GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    if not args.gpu_report:
        args.new_tokens, args.repeats = args.new_tokens or 256, args.repeats or 3
        return shapes(args, device, dtype)
    plan = SMALL if args.tiny else FULL
    plan = replace(plan, new_tokens=args.new_tokens or plan.new_tokens,
                   toy_prompts=args.toy_prompts or plan.toy_prompts)
    out = Path(args.out or os.environ.get("OUT") or "out/gpu-report")
    r = Report(plan, torch.device(device), dtype, args.repeats or 5, args.budget, out)
    print(gpu_report(r, args.skip))
    print(f"gpu.py: wrote {out / 'gpu-report.json'} and {out / 'gpu-report.md'}", file=sys.stderr)


if __name__ == "__main__":
    decode.run(main)
