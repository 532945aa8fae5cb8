"""Start-up warnings: one line for each flag that is accepted but has no effect here.

SGLang users' commands carry flags for features dsserve has not built (tensor parallelism across
devices, graph capture, draft models, disaggregation, ...) or that mean nothing on the
chosen device. They are accepted, so those commands start, and each is named in one warning line.
"""
from __future__ import annotations

import argparse
import sys

from dsserve.core.config import SERVED_SPECULATIVE_ALGORITHMS

from .args import ServerArgs


def _spellings(argv: list[str] | None) -> dict[str, str]:
    """dest -> the option string the user typed (so a warning names `--tp`, not `--tp-size`)."""
    parser = argparse.ArgumentParser(add_help=False)
    ServerArgs.add_cli_args(parser)
    found: dict[str, str] = {}
    for token in argv if argv is not None else sys.argv[1:]:
        name = token.split("=", 1)[0]
        action = parser._option_string_actions.get(name)
        if action is not None:
            found.setdefault(action.dest, name)
    return found


def inactive_flag_warnings(args: ServerArgs, device_name: str, argv: list[str] | None = None) -> list[str]:
    typed = _spellings(argv)

    def flag(dest: str) -> str:
        return typed.get(dest, "--" + dest.replace("_", "-"))

    lines: list[str] = []

    def warn(dest: str, why: str, value=None) -> None:
        shown = flag(dest) + ("" if value is None else f" {value}")
        lines.append(f"{shown} is accepted but has no effect: {why}")

    one_device = "multi-device serving is not built yet; the model runs on one device"
    if args.dp_size > 1:
        warn("dp_size", "data parallelism is not built yet; one engine serves every request", args.dp_size)
    if args.enable_dp_attention:
        warn("enable_dp_attention", one_device)
    if args.dist_init_addr and args.nnodes == 1:
        warn("dist_init_addr", "one node finds its ranks itself (the address is for --nnodes above 1)",
             args.dist_init_addr)
    if args.dist_timeout is not None and args.tp_size == 1:
        warn("dist_timeout", "no distributed operation runs on one device", args.dist_timeout)
    if args.load_format not in ("auto", "safetensors"):
        warn("load_format", "weights are read from the checkpoint's safetensors files", args.load_format)
    if args.model_loader_extra_config:
        warn("model_loader_extra_config", "the weight loader has no extra options")
    if args.attention_backend:
        warn("attention_backend", f"the {device_name} device plugin chooses the attention kernels "
             "(`dsserve plugins` lists them)", args.attention_backend)
    if args.enable_torch_compile:
        warn("enable_torch_compile", "torch.compile of the model is not built yet")
    if args.torch_compile_max_bs is not None:
        warn("torch_compile_max_bs", "torch.compile of the model is not built yet", args.torch_compile_max_bs)
    graphs = "device graph capture is not built yet"
    if args.device_graph_bs is not None:
        warn("device_graph_bs", graphs, ",".join(map(str, args.device_graph_bs)))
    if args.device_graph_max_bs is not None:
        warn("device_graph_max_bs", graphs, args.device_graph_max_bs)
    if args.disable_device_graph:
        warn("disable_device_graph", graphs + ", so there is none to disable")
    if args.disable_overlap_schedule:
        warn("disable_overlap_schedule", "the scheduler does not overlap with the forward pass, so there is "
             "nothing to disable")
    _speculative_warnings(args, warn)
    if args.disaggregation_mode != "null":
        warn("disaggregation_mode", "prefill/decode disaggregation is not built yet; this server does both",
             args.disaggregation_mode)
    for dest in ("disaggregation_transfer_backend", "disaggregation_bootstrap_port", "disaggregation_ib_device"):
        if getattr(args, dest) is not None:
            warn(dest, "prefill/decode disaggregation is not built yet", getattr(args, dest))
    return lines


def _speculative_warnings(args: ServerArgs, warn) -> None:
    """The speculative flags that do not shape what runs: MTP drafting is a single chain of
    --speculative-num-steps tokens (SGLang's commands for DeepSeek also name tree shapes)."""
    spec = ("speculative_draft_model_path", "speculative_num_steps", "speculative_eagle_topk",
            "speculative_num_draft_tokens")
    if args.speculative_algorithm is None:
        for dest in spec:
            if getattr(args, dest) is not None:
                warn(dest, "there is no speculative decoding without --speculative-algorithm", getattr(args, dest))
        return
    if args.speculative_algorithm not in SERVED_SPECULATIVE_ALGORITHMS:
        warn("speculative_algorithm", "only EAGLE/NEXTN (the model's own MTP layer drafting) is served; decoding "
             "runs without speculation", args.speculative_algorithm)
        return
    if args.speculative_draft_model_path is not None:
        warn("speculative_draft_model_path", "the model's own MTP layer drafts", args.speculative_draft_model_path)
    if (args.speculative_eagle_topk or 1) > 1:
        warn("speculative_eagle_topk", "drafts are a single chain (topk 1)", args.speculative_eagle_topk)
    chain = args.speculative_steps + 1
    if args.speculative_num_draft_tokens is not None and args.speculative_num_draft_tokens != chain:
        warn("speculative_num_draft_tokens", f"a chain of {args.speculative_steps} draft token(s) verifies {chain} "
             "tokens per step", args.speculative_num_draft_tokens)
