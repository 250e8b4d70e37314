"""The bundled model, a clean/corrupted pair on it, SAE-Lens SAEs of every architecture it loads, and the
bundled model's language model as a TransformerLens ``HookedSAETransformer`` (SAE-Lens' own splicing, the
reference)."""

import copy

import pytest
import torch

from mm_lens import load_toy
from mm_lens.analysis import corruptions
from mm_lens.toy import data

HOOK = "blocks.1.hook_resid_post"
ARCHITECTURES = ["standard", "topk", "jumprelu", "gated", "matching_pursuit"]


@pytest.fixture(scope="package")
def toy():
    return load_toy(device="cpu")


@pytest.fixture(scope="package")
def example():
    return data.make_examples(4, seed=3, kinds=("color",))[1]


@pytest.fixture(scope="package")
def pair(toy, example):
    """(clean, corrupted): the asked object's patch blanked, so the answer's log-probability falls."""
    clean = toy.to_inputs(example.image, example.prompt)
    clean.meta.update(question=example.question, box=example.box)
    return clean, corruptions.mask_region(toy, clean, example.box)


@pytest.fixture(scope="package")
def metric(toy, example):
    answer = toy.to_single_token(example.answer)
    return lambda logits: logits[:, -1].log_softmax(-1)[:, answer]


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@torch.no_grad()
def make_sae(kind: str = "standard", hook: str = HOOK, d_in: int = 64, d_sae: int = 48, seed: int = 0, folder=None,
             hook_out: str = None, d_out: int = None):
    """An SAE-Lens SAE of architecture ``kind`` with random weights that fire on the bundled model's activations;
    with ``folder``, saved there and read back with ``SAE.load_from_disk`` (the path ``SAE.from_pretrained`` ends in)."""
    import sae_lens
    from sae_lens import SAE

    classes = {"standard": ("StandardSAE", {}), "topk": ("TopKSAE", {"k": 6}), "jumprelu": ("JumpReLUSAE", {}),
               "gated": ("GatedSAE", {}), "matching_pursuit": ("MatchingPursuitSAE", {"residual_threshold": 0.5}),
               "transcoder": ("Transcoder", {"d_out": d_out or d_in, "apply_b_dec_to_input": False})}
    name, extra = classes[kind]
    cfg = getattr(sae_lens, name + "Config")(d_in=d_in, d_sae=d_sae, **extra)
    cfg.metadata.hook_name = hook
    if hook_out is not None:
        cfg.metadata.hook_name_out = hook_out
    sae = getattr(sae_lens, name)(cfg)
    g = torch.Generator().manual_seed(seed)
    for pname, p in sae.named_parameters():
        if pname in ("b_enc", "b_gate", "b_mag"):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        elif pname == "threshold":
            p.fill_(0.2)
        elif p.ndim == 2:
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[0] ** 0.5)
    if folder is None:
        return sae
    sae.save_model(str(folder))
    return SAE.load_from_disk(str(folder))


def tl_language_model(model):
    """The bundled model's language model as SAE-Lens' ``HookedSAETransformer`` (TransformerLens' own blocks),
    weights copied: the reference for text-only runs."""
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    c = model.cfg
    cfg = HookedTransformerConfig(
        n_layers=c.n_layers, d_model=c.d_model, n_ctx=c.n_ctx, d_head=c.d_head, n_heads=c.n_heads, d_mlp=c.d_mlp,
        d_vocab=c.d_vocab, act_fn=c.act_fn, normalization_type=c.normalization_type, positional_embedding_type="rotary",
        rotary_dim=c.rotary_dim, rotary_base=int(c.rotary_base), gated_mlp=True, final_rms=True, eps=c.eps,
        default_prepend_bos=True, dtype=torch.float32)
    twin = HookedSAETransformer(cfg, tokenizer=copy.deepcopy(model.tokenizer))  # pads on the tokenizer's side
    state = {n.replace("._W_", ".W_").replace("._b_", ".b_"): p for n, p in model.named_parameters()
             if not n.startswith("vision")}
    missing = twin.load_state_dict(state, strict=False).missing_keys
    assert all(k.rsplit(".", 1)[-1] in ("rotary_sin", "rotary_cos", "mask", "IGNORE") for k in missing), missing  # buffers
    return twin.eval()
