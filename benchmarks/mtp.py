"""Speculative decoding on the bench model: give it an MTP layer by self-distillation, then measure
the accept length and decode tok/s with and without speculation in one run.

The bench model (bench/bench_model.py) is built by transformers, which writes no MTP layer. This
script makes one and writes it beside the model in DeepSeek-V3's published layout
(`model.layers.8.*`; embedding and output head shared with the model), into
`<cache>/bench-model-mtp` (the model's own weights linked, not copied):

1. Data: random token-id prompts (ids 20..4000, as the other benchmarks draw them) continued greedily
   by dsserve, and the model's final-normed hidden states over each whole sequence.
2. Initial layer: `eh_proj = [0 | I]`, the decoder layer a copy of the model's last one with its output
   projections (attention's o_proj, every expert's and the shared expert's down_proj) at zero. The
   layer then passes h_i through and drafts t_{i+1} again: "the last token repeats", which a random
   model's greedy output (runs and alternations of a few tokens) often does.
3. Training: transformers' MtpModel (the reference implementation of DeepSeek-V3's MTP layer) in
   float32 with AdamW, the cross-entropy of the layer's draft of t_{i+2} against the model's own
   greedy t_{i+2} over the generated part, for --train-seconds. Held-out sequences' draft accuracy
   is measured every few steps and the best state is kept (the initial layer included).
4. Export and check: the tensors in DeepSeek's names (per-expert gate/up/down); dsserve loads them,
   and its draft logits on held-out data must match the trainer's (a naming or layout slip fails).
5. Measure: `dsserve bench one-batch` with and without `--speculative-algorithm EAGLE`, for each
   --steps, at batch 1 and 16 (prompt --input-len, --output-len greedy tokens).

    python benchmarks/mtp.py [--train-seconds 180] [--steps 1 2 3] [--dtype auto] [--retrain]
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from dsserve.bench.bench_model import PROMPT_ID_LOW, TOKENIZER_VOCAB, bench_model_dir, ensure_bench_model
from dsserve.bench.common import format_table, machine_summary, set_threads, source_version

MTP_DIRNAME = "bench-model-mtp"
STAMP = "dsserve-mtp.json"


def generate_data(model: Path, num_seqs: int, prompt_len: int, gen_len: int, seed: int):
    """(token ids [S, prompt + gen], the model's final-normed hidden states [S, prompt + gen, D])."""
    from dsserve.core.batch import BatchItem
    from dsserve.core.engine import Engine
    from dsserve.core.sampling_params import SamplingParams

    rng = random.Random(seed)
    prompts = [[rng.randrange(PROMPT_ID_LOW, TOKENIZER_VOCAB) for _ in range(prompt_len)] for _ in range(num_seqs)]
    length = prompt_len + gen_len
    with Engine(str(model), dtype="float32", model_worker="thread", max_running_requests=128,
                max_total_tokens=160 * length, log_level="warning") as engine:
        greedy = SamplingParams(temperature=0, max_new_tokens=gen_len, ignore_eos=True)
        seqs = [p + o.token_ids for p, o in zip(prompts, engine.generate(input_ids=prompts, sampling_params=greedy))]
        engine.flush_cache()
        runner, allocator = engine.executor.runner, engine.scheduler.allocator
        per_seq = allocator.pages_for(length)
        pages = allocator.alloc(16 * per_seq)
        hidden = []
        for k in range(0, num_seqs, 16):
            chunk = seqs[k:k + 16]
            items = [BatchItem(s, 0, pages[j * per_seq:(j + 1) * per_seq], "none") for j, s in enumerate(chunk)]
            hidden.append(runner.forward_hidden(items)[1].reshape(len(chunk), length, -1).clone())
        allocator.free(pages)
    return torch.tensor(seqs), torch.cat(hidden)


class Trainer:
    """transformers' MTP layer over the bench model, started as the identity on h (see step 2)."""

    def __init__(self, model: Path):
        from transformers import DeepseekV3ForCausalLM
        from transformers.modeling_layers import MtpModel

        self.main = DeepseekV3ForCausalLM.from_pretrained(str(model), dtype=torch.float32,
                                                          attn_implementation="sdpa").eval()
        self.main.requires_grad_(False)
        self.mtp = MtpModel(self.main, 1)
        self.layer = self.mtp.layers[0]
        block, dim = self.layer.mtp_block, self.main.config.hidden_size
        block.load_state_dict(self.main.model.layers[-1].state_dict())
        with torch.no_grad():
            self.layer.eh_proj.weight.zero_()
            self.layer.eh_proj.weight[:, dim:] = torch.eye(dim)
            for zeroed in (block.self_attn.o_proj.weight, block.mlp.experts.down_proj,
                           block.mlp.shared_experts.down_proj.weight):
                zeroed.zero_()

    def draft_logits(self, ids: torch.Tensor, hidden: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """The layer's logits for t_{i+2}, over the pairs (h_i, t_{i+1}) whose t_{i+2} was generated."""
        positions = torch.arange(1, ids.shape[1])[None].expand(ids.shape[0], -1)
        x = self.mtp.forward_layer(0, hidden[:, :-1], positions, None, input_ids=ids[:, 1:])
        return self.main.lm_head(x[:, prompt_len - 2:-1])

    def accuracy(self, ids, hidden, prompt_len) -> float:
        with torch.no_grad():
            return (self.draft_logits(ids, hidden, prompt_len).argmax(-1) == ids[:, prompt_len:]).float().mean().item()

    def train(self, ids, hidden, prompt_len, held_out: int, seconds: float, lr: float, batch: int, log) -> list:
        """Train on all but the last `held_out` sequences; keep the state that drafts them best."""
        train_ids, train_h = ids[:-held_out], hidden[:-held_out]
        test_ids, test_h = ids[-held_out:], hidden[-held_out:]
        params = list(self.layer.parameters())
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        best = (self.accuracy(test_ids, test_h, prompt_len), 0)
        best_state = {k: v.clone() for k, v in self.layer.state_dict().items()}
        history = [(0, 0.0, float("nan"), best[0])]
        log(f"  step 0: held-out draft accuracy {best[0]:.3f} (the initial layer)")
        rng, start, step = random.Random(0), time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            pick = rng.sample(range(train_ids.shape[0]), batch)
            logits = self.draft_logits(train_ids[pick], train_h[pick], prompt_len)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), train_ids[pick][:, prompt_len:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 10 == 0:
                acc = self.accuracy(test_ids, test_h, prompt_len)
                history.append((step, time.perf_counter() - start, loss.item(), acc))
                log(f"  step {step} ({history[-1][1]:.0f} s): train loss {loss.item():.3f}, held-out accuracy {acc:.3f}")
                if acc > best[0]:
                    best = (acc, step)
                    best_state = {k: v.clone() for k, v in self.layer.state_dict().items()}
        self.layer.load_state_dict(best_state)
        log(f"  kept step {best[1]}: held-out draft accuracy {best[0]:.3f}")
        return history

    def checkpoint_tensors(self, layer_index: int) -> dict[str, torch.Tensor]:
        """The layer in DeepSeek-V3's published names (experts one by one, as the checkpoint stores them)."""
        prefix = f"model.layers.{layer_index}."
        out = {}
        for name, t in self.layer.state_dict().items():
            t = t.detach().contiguous()
            if name.startswith("mtp_block.mlp.experts."):
                continue
            if name.startswith("mtp_block."):
                out[prefix + name.removeprefix("mtp_block.")] = t
            elif name.startswith("post_norm."):
                out[prefix + "shared_head.norm." + name.removeprefix("post_norm.")] = t
            else:
                out[prefix + name] = t
        experts = self.layer.mtp_block.mlp.experts
        inter = experts.down_proj.shape[2]
        for e in range(experts.gate_up_proj.shape[0]):
            gate_up = experts.gate_up_proj[e].detach()
            out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = gate_up[:inter].contiguous()
            out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = gate_up[inter:].contiguous()
            out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = experts.down_proj[e].detach().contiguous()
        return out


def write_checkpoint(model: Path, out: Path, tensors: dict[str, torch.Tensor], stamp: dict) -> None:
    """`model` plus the MTP layer: its files linked, the layer in its own shard, an index over both."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(prefix=".mtp-", dir=out.parent))
    for f in model.iterdir():
        if f.name in ("model.safetensors", "model.safetensors.index.json"):
            continue
        shutil.copy2(f, tmp / f.name)
    (tmp / "model.safetensors").symlink_to(model / "model.safetensors")
    save_file(tensors, str(tmp / "mtp.safetensors"), metadata={"format": "pt"})
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        weight_map = {name: "model.safetensors" for name in f.keys()}
    weight_map.update({name: "mtp.safetensors" for name in tensors})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp / STAMP).write_text(json.dumps(stamp, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def check_export(folder: Path, trainer: Trainer, ids: torch.Tensor, hidden: torch.Tensor, prompt_len: int) -> float:
    """Largest difference between dsserve's draft logits (the exported layer, loaded by dsserve) and the
    trainer's, relative to the largest logit, over two held-out sequences."""
    from dsserve.core.batch import BatchItem
    from dsserve.core.engine import Engine

    with Engine(str(folder), dtype="float32", model_worker="thread", speculative_algorithm="EAGLE",
                max_total_tokens=4096, log_level="warning") as engine:
        runner, allocator = engine.executor.runner, engine.scheduler.allocator
        worst = 0.0
        for k in range(2):
            seq = ids[k].tolist()
            pages = allocator.alloc(allocator.pages_for(len(seq)))
            rows = len(seq) - prompt_len
            logits, _ = runner.draft([BatchItem(seq[1:], 0, pages, "all")], hidden[k, :-1])
            with torch.no_grad():
                want = trainer.draft_logits(ids[k:k + 1], hidden[k:k + 1], prompt_len)[0]
            got = logits[prompt_len - 2: prompt_len - 2 + rows]
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
            allocator.free(pages)
    return worst


def ensure_mtp_model(ns, log) -> tuple[Path, dict]:
    model = ensure_bench_model(ns.bench_config, log=log)
    out = bench_model_dir().parent / MTP_DIRNAME
    recipe = {"train_seconds": ns.train_seconds, "sequences": ns.sequences, "prompt_len": ns.train_prompt_len,
              "gen_len": ns.train_gen_len, "lr": ns.lr, "batch": ns.train_batch, "held_out": ns.held_out}
    stamp_file = out / STAMP
    if not ns.retrain and stamp_file.is_file():
        stamp = json.loads(stamp_file.read_text())
        if stamp.get("recipe") == recipe:
            log(f"using the distilled MTP layer in {out} (--retrain makes a new one)")
            return out, stamp
    log(f"distilling an MTP layer for {model} into {out}")
    t = time.perf_counter()
    ids, hidden = generate_data(model, ns.sequences, ns.train_prompt_len, ns.train_gen_len, seed=7)
    log(f"  data: {ids.shape[0]} sequences of {ids.shape[1]} tokens and their hidden states in "
        f"{time.perf_counter() - t:.0f} s")
    trainer = Trainer(model)
    history = trainer.train(ids, hidden, ns.train_prompt_len, ns.held_out, ns.train_seconds, ns.lr, ns.train_batch, log)
    cfg = json.loads((model / "config.json").read_text())
    stamp = {"recipe": recipe, "history": history, "held_out_accuracy": max(h[3] for h in history)}
    write_checkpoint(model, out, trainer.checkpoint_tensors(cfg["num_hidden_layers"]), stamp)
    err = check_export(out, trainer, ids[-ns.held_out:], hidden[-ns.held_out:], ns.train_prompt_len)
    log(f"  dsserve's draft logits match the trainer's within {err:.1e} of the largest")
    if err > 1e-3:
        raise RuntimeError(f"the exported MTP layer drafts differently in dsserve ({err:.1e}): a naming or layout slip")
    return out, stamp


def measure(folder: Path, ns) -> list[dict]:
    from dsserve.cli import main

    results = []
    for steps in ns.steps:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            rc = main(["bench", "one-batch", "--model-path", str(folder), "--dtype", ns.dtype, "--batch-size",
                       *map(str, ns.batch_size), "--input-len", str(ns.input_len), "--output-len", str(ns.output_len),
                       "--speculative-algorithm", "EAGLE", "--speculative-num-steps", str(steps),
                       "--max-total-tokens", "16384", "--log-level", "warning", "--result-file", f.name])
            if rc:
                raise RuntimeError(f"dsserve bench one-batch exited with {rc}")
            runs = json.loads(Path(f.name).read_text())["results"]
        for bs in ns.batch_size:
            off = next(r for r in runs if r["speculative"] == "off" and r["batch_size"] == bs)
            on = next(r for r in runs if r["speculative"] != "off" and r["batch_size"] == bs)
            results.append({"steps": steps, "batch": bs, "accept_length": on["accept_length"],
                            "off_tok_s": off["decode_tok_s"], "on_tok_s": on["decode_tok_s"],
                            "speedup": on["decode_tok_s"] / off["decode_tok_s"]})
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench-config", default=None, help="bench-model config (default: ../shared/reference/)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default="auto", help="compute dtype of the measured engines")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3], help="--speculative-num-steps values")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 16])
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--train-seconds", type=float, default=180.0)
    p.add_argument("--sequences", type=int, default=384, help="greedy sequences generated for training")
    p.add_argument("--train-prompt-len", type=int, default=16)
    p.add_argument("--train-gen-len", type=int, default=64)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--held-out", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--retrain", action="store_true", help="distil a new layer even if one is cached")
    ns = p.parse_args()
    threads = set_threads(ns.threads)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    load_before = machine_summary()["load_average"]
    folder, stamp = ensure_mtp_model(ns, log)
    results = measure(folder, ns)
    m = machine_summary()
    rows = [[r["steps"], r["batch"], r["accept_length"], r["off_tok_s"], r["on_tok_s"], r["speedup"]] for r in results]
    print(format_table(
        ["draft steps", "batch", "accept length", "decode tok/s without", "decode tok/s with", "speed-up"], rows,
        title=f"speculative decoding on the bench model with a distilled MTP layer (held-out draft accuracy "
              f"{stamp['held_out_accuracy']:.3f}), {threads} threads, dtype {ns.dtype}, prompt {ns.input_len}, "
              f"{ns.output_len} tokens\n{source_version()}; {m['cpu']}; load average {load_before} before, "
              f"{m['load_average']} after"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
