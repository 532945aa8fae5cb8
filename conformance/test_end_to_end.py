"""End to end: dsserve-tiny's greedy output on the device against the reference's.

The reference run selects the same device object from a registry in which nothing but the core's
reference answers the backend hooks, so the two runs differ only in the implementations the device's
plugins return. Both follow the same schedule (the engine's kind of batches: a prefill mixing whole
prompts with first chunks, a mixed pass finishing the chunks beside decodes, then decode passes).

float32: the greedy tokens must be identical and the logits close. The device's default dtype (when it
is not float32): run teacher-forced over the float32 reference's tokens, the logits must stay close
and the first greedy token of each prompt must agree wherever the reference's choice is clear.

A case checks the device's own code when at least one backend dsserve-tiny is built with is not the
core's reference; otherwise it would compare the reference with itself, and is skipped as "reference".
"""
from __future__ import annotations

import time

import pytest
import torch

from dsserve.conformance.harness import HOST, Context, class_path, dtype_name, is_reference, synchronize
from dsserve.core.config import EngineArgs
from dsserve.core.hookspecs import hookimpl
from dsserve.core.batch import BatchItem
from dsserve.core.kv_cache import PageAllocator
from dsserve.core.model_runner import ModelRunner
from dsserve.core.plugins import PluginRegistry

PROMPT_LENS = (4, 11, 27, 50)
NEW_TOKENS = 8
FIRST_CHUNK_OF = (2, 3)  # these prompts are prefilled in two chunks
# Normalised error of the logits against the float32 reference: float32 allows for summation orders
# through the whole model; the half formats for their rounding, compounded over the layers.
LOGIT_BOUNDS = {torch.float32: 1e-8, torch.bfloat16: 2e-3, torch.float16: 1e-4}
# A first token counts as clear when the reference's best logit leads the runner-up by this much.
CLEAR_LEAD = 0.05
TIMED_RUNS = 3
_DTYPE_FLAG = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class _DeviceOnly:
    """Provides the device under test and nothing else: the reference answers every backend hook."""

    def __init__(self, device):
        self.device = device

    @hookimpl
    def dsserve_devices(self):
        return [self.device]


def reference_registry(ctx: Context) -> PluginRegistry:
    registry = PluginRegistry(load_entry_points=False, blocked=[])
    registry.register(_DeviceOnly(ctx.device), name="conformance-device-only")
    return registry


class Recording:
    """The device's registry, noting the class of every backend it hands out while dsserve-tiny is
    built: what the run exercises, whichever plugin (or the reference) answered."""

    BACKEND_HOOKS = ("attention_backend", "moe_backend", "linear_method", "communicator")  # see hookspecs

    def __init__(self, registry: PluginRegistry):
        self.registry = registry
        self.served: set[str] = set()

    def __getattr__(self, name: str):
        attr = getattr(self.registry, name)
        if name not in self.BACKEND_HOOKS:
            return attr

        def answer(*args, **kwargs):
            backend = attr(*args, **kwargs)
            self.served.add(class_path(backend))
            return backend

        return answer


def device_runner(ctx: Context, case, dtype: torch.dtype) -> ModelRunner:
    """dsserve-tiny built from the device's registry; the case notes every backend it was given.
    Skips the case (status "reference") when all of them are the core's reference classes."""
    recording = Recording(ctx.registry)
    try:
        with case.calling(f"building dsserve-tiny on the device in {dtype_name(dtype)}"):
            runner = make_runner(ctx, recording, dtype)
    finally:
        case.props["served_by"] = sorted(recording.served)
    if recording.served and all(is_reference(p) for p in recording.served):
        case.reference_only("every backend dsserve-tiny is built with is the core's reference: the run "
                            "would compare the reference with itself")
    return runner


def prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(20240607)
    return [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def make_runner(ctx: Context, registry: PluginRegistry, dtype: torch.dtype) -> ModelRunner:
    tokens = sum(PROMPT_LENS) + len(PROMPT_LENS) * (NEW_TOKENS + 1)
    args = EngineArgs.from_kwargs(device=ctx.device.name, dtype=_DTYPE_FLAG[dtype],
                                  max_total_tokens=4 * tokens, log_level="warning")
    runner = ModelRunner(args, registry=registry)
    ctx.pin_host_threads()  # the runner ran Device.setup, which may have changed them
    return runner


def timed_generate(runner: ModelRunner, prompt_ids: list[list[int]], forced: list[list[int]] | None = None):
    """`generate` after a warm-up run; the forward time kept is the best of TIMED_RUNS runs."""
    generate(runner, prompt_ids, forced)
    runs = [generate(runner, prompt_ids, forced) for _ in range(TIMED_RUNS)]
    tokens, logits, _ = runs[0]
    return tokens, logits, min(r[2] for r in runs)


def generate(runner: ModelRunner, prompt_ids: list[list[int]], forced: list[list[int]] | None = None):
    """Greedy decoding of NEW_TOKENS per prompt (or teacher-forced over `forced`).

    Returns (tokens per prompt, float32 logits [NEW_TOKENS, vocab] per prompt, seconds in forward).
    """
    allocator = PageAllocator(runner.kv.num_pages, runner.kv.page_size)   # the runner's whole pool is ours
    seqs = [list(p) for p in prompt_ids]
    pages = [allocator.alloc(allocator.pages_for(len(p) + NEW_TOKENS)) for p in seqs]
    if any(p is None for p in pages):
        raise RuntimeError("the KV pool is too small for the end-to-end prompts")
    computed = [0] * len(seqs)
    produced: list[list[int]] = [[] for _ in seqs]
    logits_of: list[list[torch.Tensor]] = [[] for _ in seqs]
    first = True
    seconds = 0.0
    while any(len(t) < NEW_TOKENS for t in produced):
        items, owners = [], []
        for i, seq in enumerate(seqs):
            if len(produced[i]) >= NEW_TOKENS:
                continue
            stop = len(seq)
            if first and i in FIRST_CHUNK_OF:
                stop = len(seq) // 2
            new = seq[computed[i]:stop]
            wants = stop == len(seq)
            items.append(BatchItem(new, computed[i], pages[i], "last" if wants else "none"))
            owners.append((i, wants))
            computed[i] = stop
        first = False
        synchronize(runner.torch_device)
        t0 = time.perf_counter()
        logits = runner.forward(items)
        synchronize(runner.torch_device)
        seconds += time.perf_counter() - t0
        row = 0
        for i, wants in owners:
            if not wants:
                continue
            step = logits[row].float().to(HOST)
            row += 1
            logits_of[i].append(step)
            k = len(produced[i])
            token = forced[i][k] if forced is not None else int(step.argmax())
            produced[i].append(token)
            seqs[i].append(token)
    return produced, [torch.stack(rows) for rows in logits_of], seconds


@pytest.fixture(scope="module")
def reference_run(ctx: Context):
    """The reference's float32 greedy run: (prompts, tokens, logits, seconds)."""
    runner = make_runner(ctx, reference_registry(ctx), torch.float32)
    ids = prompts(runner.config.vocab_size)
    tokens, logits, seconds = timed_generate(runner, ids)
    return ids, tokens, logits, seconds


def test_greedy_float32(ctx: Context, make_case, reference_run):
    case = make_case("end-to-end", f"end-to-end dsserve-tiny greedy {NEW_TOKENS} tokens x {len(PROMPT_LENS)} "
                                   f"prompts dtype=float32")
    case.note_dtype(torch.float32)
    case.props["implementation"] = "dsserve-tiny"
    ids, want_tokens, want_logits, ref_seconds = reference_run
    runner = device_runner(ctx, case, torch.float32)
    with case.calling("greedy generation"):
        tokens, logits, seconds = timed_generate(runner, ids)
    for i, (got, want) in enumerate(zip(tokens, want_tokens)):
        if got != want:
            at = next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)
            case.fail(f"prompt {i} ({len(ids[i])} tokens): greedy tokens differ from the reference's from "
                      f"token {at} on ({got} vs {want})")
    case.compare("logits", torch.cat(logits), torch.cat(want_logits), torch.float32, LOGIT_BOUNDS[torch.float32])
    case.props.update(impl_time=seconds, ref_time=ref_seconds)
    case.done()


def test_default_dtype_stays_close(ctx: Context, make_case, reference_run):
    dtype = ctx.default_dtype()
    name = dtype_name(dtype)
    case = make_case("end-to-end", f"end-to-end dsserve-tiny teacher-forced {NEW_TOKENS} tokens x "
                                   f"{len(PROMPT_LENS)} prompts dtype={name} (the device's default) vs float32")
    case.props["implementation"] = "dsserve-tiny"
    if dtype == torch.float32:
        case.skip("the device's default dtype is float32: covered by the float32 case")
    if dtype not in LOGIT_BOUNDS:
        case.skip(f"no end-to-end bound for the default dtype {name}")
    case.note_dtype(dtype)
    ids, want_tokens, want_logits, _ = reference_run
    runner = device_runner(ctx, case, dtype)
    with case.calling("teacher-forced generation"):
        _, logits, seconds = timed_generate(runner, ids, forced=want_tokens)
    case.compare("logits against the float32 reference", torch.cat(logits), torch.cat(want_logits), dtype,
                 LOGIT_BOUNDS[dtype])
    for i, (got, want) in enumerate(zip(logits, want_logits)):
        top2 = want[0].topk(2).values
        if float(top2[0] - top2[1]) > CLEAR_LEAD and int(got[0].argmax()) != int(want[0].argmax()):
            case.fail(f"prompt {i}: first greedy token {int(got[0].argmax())}, the reference's is "
                      f"{int(want[0].argmax())} (lead {float(top2[0] - top2[1]):.2f})")
    ref_runner = make_runner(ctx, reference_registry(ctx), dtype)
    _, _, ref_seconds = timed_generate(ref_runner, ids, forced=want_tokens)
    case.props.update(impl_time=seconds, ref_time=ref_seconds)
    case.done()
