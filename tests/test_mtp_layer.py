"""DeepSeek-V3's MTP layer (models/mtp.py) loads from the published layout and drafts as transformers does.

Two checkpoints: dsserve-tiny, whose MTP layer stores copies of the embedding and output head, and a
random DeepSeek-V3 built with transformers (tests/hf_checkpoints.py: non-default eps, YaRN mscale,
v_head_dim != qk_nope_head_dim), to which an MTP layer is added in the published names without those
copies (the layer then uses the main model's). The oracle is transformers' own MTP implementation
(`transformers.modeling_layers.MtpModel`, float32, eager, the whole chain recomputed without a cache);
dsserve runs the same draft chain through a paged KV cache: one extend pass over two sequences, then
one chained decode step.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_checkpoints import add_mtp_layer, build, read_tensors, write_tensors

from dsserve.models.loader import CheckpointError

CHECKPOINTS = ("dsserve-tiny", "deepseek_v3")
PAGE_SIZE = 4
PAGES = {7: [5, 2], 4: [7, 3]}  # prompt length -> its pages, out of order: the page table is honoured
TOLERANCE = 1e-4  # of the largest reference logit


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    from dsserve.models.tiny import ensure_tiny_model

    v3 = build("deepseek_v3", tmp_path_factory.mktemp("deepseek_v3")).path
    add_mtp_layer(v3)
    return {"dsserve-tiny": ensure_tiny_model(tmp_path_factory.mktemp("cache")), "deepseek_v3": v3}


def _ctx():
    from dsserve.core.plugins import default_registry
    from dsserve.core.reference import SingleProcessCommunicator
    from dsserve.models.layers import LayerContext

    registry = default_registry()
    return LayerContext(device=registry.select_device("cpu"), registry=registry, dtype=torch.float32,
                        torch_device=torch.device("cpu"), comm=SingleProcessCommunicator(rank=0, world_size=1),
                        page_size=PAGE_SIZE)


def _build(folder: Path):
    """dsserve's main model and MTP layer of the checkpoint, on one context."""
    from dsserve.models.loader import build_model, read_config
    from dsserve.models.mtp import build_mtp

    cfg, ctx = read_config(folder), _ctx()
    main = build_model(folder, cfg, ctx)
    return main, build_mtp(folder, cfg, ctx, main)


def _mtp_names(folder: Path) -> set[str]:
    n = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    return {k for k in read_tensors(folder) if k.startswith(f"model.layers.{n}.")}


# --------------------------------------------------------------------------------------------------
# loading


def test_tiny_mtp_layer_consumes_every_mtp_tensor(folders):
    """dsserve-tiny's MTP layer: its targets are exactly the checkpoint's layer-3 tensors (the loader
    refuses a tensor without a target and a target without a tensor), its own copies of the embedding
    and head included; the main model targets none of them."""
    main, mtp = _build(folders["dsserve-tiny"])
    names = _mtp_names(folders["dsserve-tiny"])
    assert set(mtp.load_targets()) == names
    assert "model.layers.3.shared_head.head.weight" in names and "model.layers.3.embed_tokens.weight" in names
    assert mtp.embed_tokens is not None and mtp.head is not None
    assert not set(main.load_targets()) & names


def test_v3_layout_without_copies_uses_the_main_models_embedding_and_head(folders):
    """The published names without embed_tokens/shared_head.head under the layer: build_mtp loads the
    rest, and the draft logits come from the main model's own head."""
    main, mtp = _build(folders["deepseek_v3"])
    assert set(mtp.load_targets()) == _mtp_names(folders["deepseek_v3"])
    assert mtp.embed_tokens is None and mtp.head is None
    hidden = torch.randn(3, main.cfg.hidden_size)
    assert torch.equal(mtp.compute_logits(hidden), main.compute_logits(hidden))


def test_mtp_attention_is_mla_like_the_main_layers(folders):
    """One attention backend, MLA like the main layers' (the KV pool gives it a cache of its own)."""
    main, mtp = _build(folders["dsserve-tiny"])
    [backend] = mtp.attention_backends()
    assert backend.spec == main.layers[-1].self_attn.backend.spec and backend.spec.kind == "mla"


def _drop_eh_proj(folder: Path) -> None:
    tensors = read_tensors(folder)
    del tensors["model.layers.3.eh_proj.weight"]
    write_tensors(folder, tensors)


def _square_eh_proj(folder: Path) -> None:
    tensors = read_tensors(folder)
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(64, 64)
    write_tensors(folder, tensors)


def _strip_mtp_layer(folder: Path) -> None:
    write_tensors(folder, {k: v for k, v in read_tensors(folder).items() if not k.startswith("model.layers.3.")})


def _no_nextn_layers(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 0}))


BROKEN = [
    (_drop_eh_proj, "tensor 'model.layers.3.eh_proj.weight' is missing from the checkpoint"),
    (_square_eh_proj, "tensor 'model.layers.3.eh_proj.weight' has shape (64, 64), expected (64, 128)"),
    (_strip_mtp_layer, "declares 1 MTP layer(s) but the checkpoint stores no tensor of it (model.layers.3.*)"),
    (_no_nextn_layers, "config.json: num_nextn_predict_layers is 0 or absent"),
]


@pytest.mark.parametrize("breaks,message", BROKEN, ids=[b.__name__.strip("_") for b, _ in BROKEN])
def test_broken_mtp_layer_names_the_file_and_tensor(folders, tmp_path, breaks, message):
    """The main model still loads (it skips layer 3); build_mtp refuses in one line naming the problem."""
    folder = tmp_path / "v3"
    shutil.copytree(folders["deepseek_v3"], folder)
    breaks(folder)
    with pytest.raises(CheckpointError) as info:
        _build(folder)
    msg = str(info.value)
    assert message in msg and str(folder) in msg and "\n" not in msg


# --------------------------------------------------------------------------------------------------
# drafting


def _transformers_mtp(folder: Path):
    """transformers' main model and its MTP model of the checkpoint (float32, eager)."""
    from transformers import DeepseekV3ForCausalLM

    modeling_layers = pytest.importorskip("transformers.modeling_layers")
    if not hasattr(modeling_layers, "MtpModel"):
        pytest.skip("this transformers has no MtpModel, the oracle")
    main = DeepseekV3ForCausalLM.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32).eval()
    # transformers finds the MTP tensors by this pattern, written for V3's 61 layers; these have fewer.
    main._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{main.config.num_hidden_layers}\..*"]
    return main, modeling_layers.MtpModel.from_pretrained(main).eval()


@torch.no_grad()
def _reference_chain(folder: Path, prompts: list[list[int]], next_tokens: list[int]):
    """Per prompt of n tokens: the main model's normed hidden states h [n, D], the draft token d of the
    last pair, and the MTP layer's logits [n + 1, vocab] over the n pairs (h_i, t_{i+1}) (t_n the
    main model's next token) and the chained pair (x_{n-1}, d), the whole chain recomputed."""
    main, mtp = _transformers_mtp(folder)
    out = []
    for prompt, nxt in zip(prompts, next_tokens):
        h = main(input_ids=torch.tensor([prompt]), output_hidden_states=True).hidden_states[-1]
        tokens = torch.tensor([prompt[1:] + [nxt]])
        # transformers places pair i at position i + 1; dsserve at i, the slot of t_i in the main
        # model's cache. RoPE scores depend on position differences only, so the outputs agree.
        x = mtp.forward_layer(0, h, torch.arange(1, len(prompt) + 1)[None], None, input_ids=tokens)
        draft = int(mtp.shared_head(x[0, -1]).argmax())
        chain = mtp.forward_layer(0, torch.cat([h, x[:, -1:]], dim=1), torch.arange(1, len(prompt) + 2)[None],
                                  None, input_ids=torch.cat([tokens, torch.tensor([[draft]])], dim=1))
        out.append((h[0], draft, mtp.shared_head(chain[0]).float()))
    return out


def _run(mtp, cache, pages: list[list[int]], prefix_lens: list[int], extend_lens: list[int], input_ids: list[int],
         hidden: torch.Tensor) -> torch.Tensor:
    """One MTP pass over packed sequences, as the model runner runs the main model's."""
    from dsserve.core.forward_batch import AttentionMetadata

    meta = AttentionMetadata.build(prefix_lens=prefix_lens, extend_lens=extend_lens, page_table=pages,
                                   page_size=PAGE_SIZE, device="cpu")
    for backend in mtp.attention_backends():
        backend.prepare(meta)
    return mtp(torch.tensor(input_ids), hidden, meta, cache)


@pytest.mark.parametrize("name", CHECKPOINTS)
@torch.inference_mode()
def test_draft_logits_match_transformers(folders, name):
    """Two sequences (7 and 4 pairs) in one extend pass, then one chained decode step each (the pair of
    the last output and the drafted token), in a paged cache: the draft of each last pair is
    transformers' token, and every row's logits equal transformers' within 1e-4 of the largest."""
    folder = folders[name]
    _, mtp = _build(folder)
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(14)
    prompts = [torch.randint(2, vocab_size, (n,), generator=gen).tolist() for n in PAGES]
    next_tokens = torch.randint(2, vocab_size, (len(prompts),), generator=gen).tolist()
    reference = _reference_chain(folder, prompts, next_tokens)

    [backend] = mtp.attention_backends()
    cache = backend.create_cache(8, torch.device("cpu"))
    lens = [len(p) for p in prompts]
    pages = [PAGES[n] for n in lens]
    hidden = torch.cat([h for h, _, _ in reference])
    given = hidden.clone()
    pairs = [t for prompt, nxt in zip(prompts, next_tokens) for t in prompt[1:] + [nxt]]
    out = _run(mtp, cache, pages, [0] * len(lens), lens, pairs, hidden)
    assert torch.equal(hidden, given), "forward changed the main model's hidden states in place"
    last = torch.tensor(lens).cumsum(0) - 1
    drafts = mtp.compute_logits(out[last]).argmax(dim=-1).tolist()
    assert drafts == [d for _, d, _ in reference]
    chained = _run(mtp, cache, pages, lens, [1] * len(lens), drafts, out[last])

    got = torch.cat([mtp.compute_logits(out), mtp.compute_logits(chained)])
    want = torch.cat([torch.cat([logits[:-1] for _, _, logits in reference]),
                      torch.stack([logits[-1] for _, _, logits in reference])])
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= TOLERANCE, f"{name}: draft logits differ from transformers' by {err:.2e} of the largest"
