"""HookedVLM: a vision-language model as one HookedTransformer-compatible module.

Data path (one direction): inputs -> vision_encoder -> feature selection ->
vision_projector -> merge into the text embeddings (``hook_embed``) -> blocks ->
ln_final -> unembed. Language-model hook names and weights are those of
TransformerLens 2.x; the vision tower uses the same names under ``vision_encoder``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint

from mm_lens import tl_compat as tl
from mm_lens import weights as W
from mm_lens.activation_cache import VLMActivationCache
from mm_lens.components import AttentionMask, Block, Embed, KVCache, Rotary, Unembed, make_norm
from mm_lens.components.attention import image_groups
from mm_lens.components.pipeline import continue_positions, fixed_towers, make_image_pipeline
from mm_lens.config import VLMConfig
from mm_lens.inputs import MultimodalInput, build_inputs, check_context
from mm_lens.memory import check_cache_fits
from mm_lens.sae.splice import SAEMixin
from mm_lens.weights import AttentionWeightsMixin

RETURN_TYPES = ("logits", "loss", "both", None)


class HookedVLM(SAEMixin, tl.TransformerLensMixin, AttentionWeightsMixin, HookedRootModule):
    """A hooked vision-language model. Build it with :meth:`from_pretrained` or :meth:`from_hf`."""

    def __init__(self, cfg: VLMConfig, tokenizer=None, processor=None):
        super().__init__()
        self.cfg = cfg = tl.tokenizer_fields(cfg, tokenizer)
        self.tokenizer = tokenizer
        self.processor = processor
        pipeline = make_image_pipeline(cfg)  # a family's own image handling (None: one fixed grid per image)
        self.vision_encoder, self.vision_projector = pipeline.make_towers(cfg) if pipeline is not None else \
            fixed_towers(cfg)
        self.image_pipeline = pipeline
        # Qwen3-VL's DeepStack: vision features added after each of the first n_deepstack blocks (hook_visual_in)
        self.n_deepstack = int(cfg.extra.get("deepstack_layers", 0))
        self.embed = Embed(cfg.d_vocab, cfg.d_model)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]: token embeddings, image features at image positions
        rotary = cfg.positional_embedding_type == "rotary"
        self.rotary = Rotary(cfg.rotary_dim, cfg.rotary_base, mrope_section=cfg.extra.get("mrope_section"),
                             mrope_interleaved=bool(cfg.extra.get("mrope_interleaved"))) if rotary else None
        # Gemma 3: the local (sliding-window) layers rotate with a base of their own
        self.rotary_local = Rotary(cfg.rotary_dim, cfg.rotary_base_local) if rotary and cfg.rotary_base_local else None
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, n_kv_heads=cfg.n_key_value_heads,
                  act_fn=cfg.act_fn, gated=cfg.gated_mlp, norm=cfg.normalization_type, eps=cfg.eps,
                  use_rotary=rotary, parallel=cfg.parallel_attn_mlp,
                  post_norms=cfg.use_normalization_before_and_after, window=cfg.window(l), qk_norm=cfg.use_qk_norm,
                  attn_scale=cfg.attn_scale, softcap=_positive(cfg.attn_scores_soft_cap), visual_in=l < self.n_deepstack)
            for l in range(cfg.n_layers)
        )
        self.ln_final = make_norm(cfg.normalization_type, cfg.d_model, cfg.eps)
        self.unembed = Unembed(cfg.d_model, cfg.d_vocab, _positive(cfg.output_logits_soft_cap))
        modules = pipeline.make_modules(cfg) if pipeline is not None else {}  # e.g. LLaVA-NeXT's ``anyres``
        for name, module in modules.items():
            self.add_module(name, module)
        self.image_modules = tuple(modules)  # their weights sit with the projector (mm_lens.weights.weight_parts)
        self.setup()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str, device=None, dtype=None, device_map=None, max_memory=None,
                        **kwargs) -> "HookedVLM":
        """Load a Hugging Face checkpoint (local folder or hub id), an original-layout folder or a bundled model.

        The safetensors files are streamed: each part (a block, the embedding, ...) is read, processed in
        float32, cast to ``dtype`` and placed, so host memory peaks near the size of the model in ``dtype``
        and no device ever holds a float32 copy. A missing, unexpected or mis-shaped tensor is a ValueError.

        ``dtype``: a torch dtype, its name (``"bfloat16"``) or ``"auto"`` (the checkpoint's); float32 by
        default. ``device`` (one device) or ``device_map`` (``"auto"``, ``"balanced"``, ``"sequential"`` or a
        dict such as ``{"vision_encoder": 0, "blocks.0": 0, ..., "unembed": 1}``) with ``max_memory``
        (``{0: "20GiB", "cpu": "60GiB"}``), as Hugging Face's; see :mod:`mm_lens.conversion.placement`.
        Weight processing as TransformerLens: ``fold_ln``, ``center_writing_weights``, ``center_unembed``,
        ``fold_value_biases`` (all True by default; all False gives Hugging Face's exact activations).
        Also ``trust_remote_code`` (False unless you pass it), ``attn_implementation``.
        """
        from mm_lens.conversion import load_pretrained

        return load_pretrained(cls, name_or_path, device=device, dtype=dtype, device_map=device_map,
                               max_memory=max_memory, **kwargs)

    @classmethod
    def from_hf(cls, hf_model, processor=None, device=None, dtype=None, **kwargs) -> "HookedVLM":
        """Convert a Hugging Face model already in memory (its processor gives tokenizer and image processing),
        part by part as :meth:`from_pretrained` does; same keyword arguments."""
        from mm_lens.conversion import convert_hf_model

        return convert_hf_model(cls, hf_model, processor, device=device, dtype=dtype, **kwargs)

    # ------------------------------------------------------------------ weights
    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.W_U

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        return self.unembed.b_U

    def process_weights(self, fold_ln: bool = True, center_writing_weights: bool = True,
                        center_unembed: bool = True, fold_value_biases: bool = True) -> "HookedVLM":
        """As TransformerLens: fold norms into the following weights and centre what may be centred.

        Writing weights are centred only for LayerNorm models (with RMSNorm it would change
        the output). Log-probabilities are unchanged.
        """
        processing = W.Processing.resolve(self.cfg, fold_ln, center_writing_weights, center_unembed, fold_value_biases)
        for part in W.weight_parts(self):  # one block (or the embedding, the head, ...) at a time
            W.process_part(self, part, processing)
        self.cfg = self.cfg.replace(normalization_type=processing.normalization_type(self.cfg.normalization_type))
        return self

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute and hook each head's output separately (``attn.hook_result``), as in TransformerLens."""
        self.cfg = self.cfg.replace(use_attn_result=use_attn_result)
        for block in self.blocks:
            block.attn.use_attn_result = use_attn_result

    def set_attn_implementation(self, implementation: str) -> None:
        """``"auto"`` (SDPA unless scores/pattern are hooked) or ``"eager"`` (always materialise them)."""
        if implementation not in ("auto", "eager"):
            raise ValueError(f"attn_implementation must be 'auto' or 'eager', got {implementation!r}")
        self.cfg = self.cfg.replace(attn_implementation=implementation)
        blocks = list(self.blocks) + (list(self.vision_encoder.blocks) if self.vision_encoder else [])
        for block in blocks:
            block.attn.force_eager = implementation == "eager"

    # ------------------------------------------------------------------ devices and dtypes
    @property
    def device_map(self) -> Optional[dict[str, torch.device]]:
        """Each part's device (:func:`mm_lens.weights.weight_parts`) when the model spans several, else None."""
        devices: dict[str, torch.device] = {}
        for name, p in self.named_parameters():
            devices.setdefault(W.part_of(name), p.device)
        return devices if len(set(devices.values())) > 1 else None

    def to(self, *args, **kwargs):
        """As ``nn.Module.to``, with ``cfg.device`` (where inputs go: the embedding's device) and ``cfg.dtype``
        kept in step. A device moves every part (a device map is undone); a dtype keeps the map."""
        out = super().to(*args, **kwargs)
        self.cfg = self.cfg.replace(device=self.embed.W_E.device, dtype=self.embed.W_E.dtype)
        return out

    def cuda(self, device=None):
        return self.to(torch.device("cuda") if device is None else device)

    def cpu(self):
        return self.to("cpu")

    def half(self):
        return self.to(torch.float16)

    def bfloat16(self):
        return self.to(torch.bfloat16)

    def float(self):
        return self.to(torch.float32)

    def double(self):
        return self.to(torch.float64)

    # ------------------------------------------------------------------ inputs
    @property
    def image_token(self) -> str:
        """The placeholder a prompt marks each image with (the processor's: ``<image>``, Gemma 3's ``<start_of_image>``)."""
        placeholder = getattr(self.processor, "image_token", None)
        if isinstance(placeholder, str):
            return placeholder
        if self.tokenizer is not None and self.cfg.image_token_id >= 0:
            return self.tokenizer.convert_ids_to_tokens(self.cfg.image_token_id)
        return "<image>"

    def to_inputs(self, images=None, prompts: Union[str, Sequence[str]] = "", padding_side: Optional[str] = None,
                  add_special_tokens: bool = True, **processor_kwargs) -> MultimodalInput:
        """Images (PIL, paths, arrays or pixel tensors; one or a list) and prompts to a :class:`MultimodalInput`.

        Several images of one prompt are processed as the family's processor does for one prompt with several
        images. ``processor_kwargs`` go to the checkpoint's processor where a family's image pipeline builds the
        inputs with it (LLaVA-NeXT, OneVision, Gemma 3: e.g. ``do_pan_and_scan=True``)."""
        self._require_tokenizer()
        if self.image_pipeline is not None:
            inputs = self.image_pipeline.build_inputs(self, images, prompts, padding_side, add_special_tokens,
                                                      **processor_kwargs)
            check_context(inputs, self.cfg.n_ctx)
            return inputs.to(self.cfg.device)
        if processor_kwargs:
            raise TypeError(f"{sorted(processor_kwargs)}: this model builds its inputs itself (no processor options)")
        vision = self.cfg.vision
        image_processor = getattr(self.processor, "image_processor", None)
        pixel_shape = (vision.n_channels, vision.image_size, vision.image_size) if vision else (0, 0, 0)
        grid = (vision.grid_size, vision.grid_size) if vision else (0, 0)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0)
        if images is not None and vision is None:
            raise ValueError("this model has no vision tower, so it cannot read images")
        inputs = build_inputs(
            images, prompts, tokenizer=self.tokenizer, image_processor=image_processor,
            image_token=self.image_token, image_token_id=self.cfg.image_token_id,
            n_image_tokens=self.cfg.n_image_tokens, grid_shape=grid, pixel_shape=pixel_shape,
            padding_side=padding_side, pad_token_id=pad, add_special_tokens=add_special_tokens,
        )
        check_context(inputs, self.cfg.n_ctx)
        return inputs.to(self.cfg.device)

    def _as_inputs(self, images_or_inputs, prompts=None, padding_side: Optional[str] = None,
                   prepend_bos: Optional[bool] = None, attention_mask: Optional[Tensor] = None) -> MultimodalInput:
        """What the forward reads. ``prepend_bos``/``padding_side`` act on text (as TransformerLens: not on token
        ids); ``attention_mask`` goes with token ids (a MultimodalInput carries its own)."""
        x = images_or_inputs
        if attention_mask is not None and not isinstance(x, Tensor):
            raise TypeError("attention_mask goes with token ids; a MultimodalInput carries its own and text gets one")
        if isinstance(x, MultimodalInput):
            if prompts is not None:
                raise TypeError("pass either a MultimodalInput or (images, prompts), not both")
            return x.to(self.cfg.device) if x.device != torch.device(self.cfg.device) else x
        if isinstance(x, Tensor) and x.dtype in (torch.long, torch.int, torch.int32) and prompts is None:
            return self._text_only_inputs(x, attention_mask)
        texts = [x] if isinstance(x, str) else x
        want, adds = tl.wants_bos(self, prepend_bos), bool(self.cfg.tokenizer_prepends_bos)
        if prompts is None and isinstance(texts, (list, tuple)) and texts and isinstance(texts[0], str) \
                and not _looks_like_path(texts[0]):
            if self._bound_images is not None and any(self.image_token in t for t in texts):
                x, prompts = self._bound_images * len(texts), texts  # model.with_images(...): every text gets them
            elif want and not adds:  # TransformerLens puts the BOS in front itself
                ids, mask = tl.tokenize(self, texts, prepend_bos, padding_side)
                return self._text_only_inputs(ids, mask)
            else:
                return self.to_inputs(None, x, padding_side=padding_side, add_special_tokens=want or not adds)
        if prompts is None:
            raise TypeError("pass (images, prompts), a MultimodalInput, or token ids")
        if want and not adds:
            raise ValueError("prepend_bos=True, but this model's tokenizer adds no BOS: image prompts are read as the "
                             "checkpoint's processor reads them")
        return self.to_inputs(x, prompts, padding_side=padding_side, add_special_tokens=want or not adds)

    def _text_only_inputs(self, tokens: Tensor, attention_mask: Optional[Tensor] = None) -> MultimodalInput:
        """Token ids as a MultimodalInput (``attention_mask``: 1 at real tokens; default as TransformerLens infers
        it, :func:`mm_lens.tl_compat.inferred_mask`)."""
        from mm_lens.inputs import PositionMap, RowPositions

        tokens = (tokens[None] if tokens.ndim == 1 else tokens).to(self.cfg.device)
        mask = tl.inferred_mask(self, tokens) if attention_mask is None else torch.as_tensor(attention_mask)
        mask = mask.to(tokens.device)
        mask = mask[None] if mask.ndim == 1 else mask
        if mask.shape != tokens.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} must have the tokens' shape {tuple(tokens.shape)}")
        if not bool(mask.bool().any(1).all()):
            raise ValueError("every row needs at least one real token (attention_mask 1)")
        if bool((tokens == self.cfg.image_token_id).any()):
            return self._bound_token_inputs(tokens, mask.long())
        rows = []
        for real in mask.bool().cpu():
            text = real.nonzero().flatten()
            rows.append(RowPositions(torch.empty(0, dtype=torch.long), text, int(text[-1]), [], (0, 0), "", []))
        return MultimodalInput(tokens, mask.long(), None, PositionMap(rows, torch.zeros_like(tokens, dtype=torch.bool)),
                               self.cfg.image_token_id)

    # ------------------------------------------------------------------ forward pieces
    def image_features(self, pixel_values: Float[Tensor, "n_images channel height width"], image_sizes=None,
                       images_per_row: Optional[Sequence[int]] = None) -> Float[Tensor, "n_images n_image_tokens d_model"]:
        """The projected features of every image position, from the processed images.

        A family's image pipeline computes them (:meth:`ImagePipeline.prompt_features
        <mm_lens.components.pipeline.ImagePipeline.prompt_features>`): e.g. LLaVA-NeXT / OneVision's
        ``pixel_values [n_images, n_crops, C, H, W]`` with ``image_sizes`` ((width, height) of each original image)
        give the packed features ``[n_image_tokens_total, d_model]``, and ``images_per_row`` (images of each
        prompt) says which images OneVision tiles (those alone in their prompt); Qwen3-VL's rows are ``(1 + k) *
        d_model`` wide (the projector's features, then each of its ``k`` DeepStack mergers'). Otherwise
        :meth:`tower_features`.
        """
        if self.image_pipeline is not None:
            return self.image_pipeline.prompt_features(self, pixel_values, image_sizes, images_per_row)
        return self.tower_features(pixel_values)

    def tower_features(self, pixel_values: Float[Tensor, "n_images channel height width"]
                       ) -> Float[Tensor, "n_images n_image_tokens d_model"]:
        """Vision tower -> selected layers (strategy) -> projector, for each image (or crop) of the tower's size."""
        cfg = self.cfg
        pixel_values = pixel_values.to(self.vision_encoder.W_pos.device)
        hidden = self.vision_encoder.hidden_states(pixel_values, cfg.feature_layers)
        if cfg.vision_feature_select_strategy == "default" and cfg.vision.has_cls_token:
            hidden = [h[:, 1:] for h in hidden]
        return self.vision_projector(torch.cat(hidden, dim=-1).to(self.vision_projector.W_in.device))

    def embed_inputs(self, inputs: MultimodalInput, image_features: Optional[Tensor] = None
                     ) -> Float[Tensor, "batch pos d_model"]:
        """Text embeddings with image features scattered into the image positions (``hook_embed``). With DeepStack
        (Qwen3-VL), the features' first ``d_model`` columns are what the image positions read here."""
        ids = inputs.input_ids
        is_image = ids == inputs.image_token_id
        embeds = self.embed(ids.masked_fill(is_image, 0))
        feats = self.input_image_features(inputs, image_features)
        if feats is not None:
            feats = feats[:, :self.cfg.d_model].to(embeds.device, embeds.dtype)
            embeds = embeds.masked_scatter(is_image[..., None].to(embeds.device), feats)
        return self.hook_embed(embeds)

    def visual_inputs(self, inputs: MultimodalInput, image_features: Optional[Tensor] = None
                      ) -> Optional[list[Float[Tensor, "batch pos d_model"]]]:
        """What ``blocks.{l}.hook_visual_in`` adds after each DeepStack block (Qwen3-VL): the image features' DeepStack
        columns at the image positions, zero elsewhere; None for a model without DeepStack."""
        if not self.n_deepstack:
            return None
        d, ids = self.cfg.d_model, inputs.input_ids
        out = [torch.zeros(*ids.shape, d, dtype=self.cfg.dtype, device=ids.device) for _ in range(self.n_deepstack)]
        feats = self.input_image_features(inputs, image_features)
        if feats is not None:
            is_image = (ids == inputs.image_token_id)[..., None]
            for j, visual in enumerate(out):
                out[j] = visual.masked_scatter(is_image, feats[:, d * (j + 1):d * (j + 2)].to(visual))
        return out

    def input_image_features(self, inputs: MultimodalInput, image_features: Optional[Tensor]
                             ) -> Optional[Float[Tensor, "n_image_pos width"]]:
        """The image features of ``inputs``' image positions, one row each (computed from the pixels unless given);
        None without image positions. ``width``: ``d_model``, times ``1 + n_deepstack`` with DeepStack."""
        n_image_pos = int((inputs.input_ids == inputs.image_token_id).sum())
        if not n_image_pos:
            if inputs.pixel_values is not None:
                raise ValueError(
                    f"{inputs.pixel_values.shape[0]} image(s) given but the input has no image positions: "
                    f"put {self.image_token!r} in the prompt where each image goes")
            return None
        if image_features is None:
            if inputs.pixel_values is None:
                raise ValueError(f"the input has {n_image_pos} image positions but no pixel values")
            image_features = self.image_features(inputs.pixel_values, inputs.image_sizes,
                                                 [len(row.images) for row in inputs.positions])
        width = self.cfg.d_model * (1 + self.n_deepstack)
        if image_features.shape[-1] != width:
            deep = f" (the projector's features, then each of the {self.n_deepstack} DeepStack layers')" \
                if self.n_deepstack else ""
            raise ValueError(f"image features of width {image_features.shape[-1]}, but this model's are {width} "
                             f"wide{deep}: pass what model.image_features returns")
        feats = image_features.reshape(-1, width)
        if feats.shape[0] != n_image_pos:
            raise ValueError(
                f"{n_image_pos} image positions but {feats.shape[0]} image feature vectors "
                f"({image_features.shape[0]} image(s) x {self.cfg.n_image_tokens} tokens): one placeholder per image"
            )
        return feats

    def position_ids(self, attention_mask: Tensor) -> Int[Tensor, "batch pos"]:
        """Positions count real tokens only (left padding does not shift them)."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def input_position_ids(self, inputs: MultimodalInput) -> Int[Tensor, "*axes batch pos"]:
        """The position ids a forward without a cache gives ``inputs``: the image pipeline's (M-RoPE:
        ``[3, batch, pos]`` from each image's grid), else :meth:`position_ids`."""
        ids = self.image_pipeline.position_ids(self, inputs) if self.image_pipeline is not None else None
        return self.position_ids(inputs.attention_mask) if ids is None else ids

    def _new_position_ids(self, inputs: MultimodalInput, full_mask: Tensor, n_new: int,
                          past_kv_cache: Optional[KVCache]) -> Tensor:
        """Position ids of the ``n_new`` positions a forward runs (those after the cached ones)."""
        cached = None if past_kv_cache is None else past_kv_cache.position_ids
        if cached is None:
            return self.input_position_ids(inputs)[..., -n_new:]
        if cached.ndim == 3:  # multi-axis ids: new text tokens continue after the largest cached position
            if bool((inputs.input_ids == self.cfg.image_token_id).any()):
                raise ValueError("images after a key/value cache need their own multi-axis positions: run them "
                                 "with the prompt, or pass position_ids=...")
            return continue_positions(cached, full_mask[:, -n_new:])
        return self.position_ids(full_mask)[:, full_mask.shape[1] - n_new:]

    def attention_mask(self, inputs: Union[MultimodalInput, Tensor], past_kv_cache: Optional[KVCache] = None
                       ) -> AttentionMask:
        """Who attends to whom, from a :class:`MultimodalInput` or a 0/1 mask over every key position.

        With ``cfg.bidirectional_image_attention`` (Gemma 3) the positions of one image also see each other;
        after ``past_kv_cache`` the mask covers the cached positions too."""
        mask = inputs.attention_mask if isinstance(inputs, MultimodalInput) else inputs
        groups = None
        if past_kv_cache is not None:
            mask = past_kv_cache.mask_with(mask)
            groups = past_kv_cache.meta.get("image_groups")
        if self.cfg.bidirectional_image_attention and isinstance(inputs, MultimodalInput):
            groups = image_groups(inputs.input_ids == inputs.image_token_id, groups)
        return AttentionMask(causal=True, key_mask=None if bool(mask.all()) else mask.bool(), groups=groups)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        images_or_inputs: Any,
        prompts: Optional[Union[str, Sequence[str]]] = None,
        *,
        return_type: Optional[str] = "logits",
        loss_per_token: bool = False,
        image_features: Optional[Tensor] = None,
        start_at_layer: Optional[int] = None,
        stop_at_layer: Optional[int] = None,
        residual: Optional[Tensor] = None,
        past_kv_cache: Optional[KVCache] = None,
        position_ids: Optional[Tensor] = None,
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
        attention_mask: Optional[Tensor] = None,
    ):
        """Run on ``(images, prompts)``, a :class:`MultimodalInput`, text or token ids.

        ``return_type``: ``"logits"``, ``"loss"`` (next-token loss on text targets), ``"both"`` or None.
        ``stop_at_layer=l`` returns the residual before block ``l``; ``start_at_layer=l`` with
        ``residual`` resumes from it (as TransformerLens).

        ``past_kv_cache`` (as TransformerLens; start with ``KVCache.empty(model.cfg.n_layers)``): the input
        holds only the positions after the cached ones (its attention mask covers just those); their keys
        and values are appended to the cache and hooks see only them. ``position_ids`` of the input's
        positions (default: :meth:`input_position_ids`; after a cache, the number of real tokens before each,
        cached ones included, or for multi-axis ids one past the largest cached position).

        As TransformerLens: ``prepend_bos`` and ``padding_side`` apply to text (see :meth:`to_tokens`; images
        are read as the checkpoint's processor reads them, so ``prepend_bos=True`` is an error for a tokenizer
        that adds no BOS); ``attention_mask`` (1 = real token) goes with token ids; without it, leading padding
        tokens are masked when text pads on the left, as TransformerLens infers it.
        """
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
        inputs = self._as_inputs(images_or_inputs, prompts, padding_side, prepend_bos, attention_mask)
        self._set_sae_token_masks(inputs)  # SAEs that leave special tokens alone (add_sae(exclude_special_tokens=))
        deepstack = self.n_deepstack and (start_at_layer or 0) < self.n_deepstack
        if start_at_layer is None or deepstack:  # the vision tower runs once for both
            image_features = self.input_image_features(inputs, image_features)
        visual = self.visual_inputs(inputs, image_features) if deepstack else None
        if start_at_layer is None:
            x = self.embed_inputs(inputs, image_features)
            start_at_layer = 0
        else:
            if residual is None:
                raise ValueError("start_at_layer needs the residual stream to start from (residual=...)")
            x = residual
        new_mask = inputs.attention_mask
        full_mask = new_mask if past_kv_cache is None else past_kv_cache.mask_with(new_mask)
        if position_ids is None:
            position_ids = self._new_position_ids(inputs, full_mask, x.shape[1], past_kv_cache)
        mask = self.attention_mask(inputs, past_kv_cache)
        if past_kv_cache is not None:
            past_kv_cache.extend(new_mask, position_ids)
            if mask.groups is not None and not past_kv_cache.frozen:
                past_kv_cache.meta["image_groups"] = mask.groups
        x = self.run_blocks(x, mask, position_ids, past_kv_cache, start_at_layer, stop_at_layer, visual=visual)
        if stop_at_layer is not None:
            return x
        if return_type is None:
            return None
        logits = self.unembed(self.ln_final(x.to(self.unembed.W_U.device)))
        if return_type == "logits":
            return logits
        loss = self.loss(logits, inputs, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def run_blocks(
        self,
        x: Float[Tensor, "batch pos d_model"],
        mask: AttentionMask,
        position_ids: Tensor,
        past_kv_cache: Optional[KVCache] = None,
        start: int = 0,
        stop: Optional[int] = None,
        n_out: Optional[int] = None,
        visual: Optional[Sequence[Tensor]] = None,
    ) -> Float[Tensor, "batch out_pos d_model"]:
        """Blocks ``start .. stop - 1`` (slice bounds) on the residual ``x`` of the positions after the cached
        ones. ``n_out``: the last block goes past attention only for the last ``n_out`` positions (all the
        logits read). ``visual``: what each DeepStack block ``l`` adds (``visual[l]``, :meth:`visual_inputs`, of
        the same positions as ``x``; None: zeros). The forward and the fast patching engine both run the blocks
        through here."""
        tables = {}
        if self.rotary is not None:
            tables["global"] = self.rotary(position_ids, x.dtype)
            tables["local"] = self.rotary_local(position_ids, x.dtype) if self.rotary_local is not None else \
                tables["global"]
        layers = range(len(self.blocks))[start:stop]
        for l in layers:
            past = past_kv_cache[l] if past_kv_cache is not None else None
            rotary = tables.get("local" if self.blocks[l].attn.window else "global")
            x, rotary = _to_device_of(self.blocks[l], x, rotary)  # a device map spreads the blocks
            v = visual[l] if visual is not None and l < self.n_deepstack else None
            x = self.blocks[l](x, mask, rotary, past, n_out if l == layers[-1] else None, v)
        return x

    def loss(self, logits: Tensor, inputs: MultimodalInput, per_token: bool = False) -> Tensor:
        """Next-token cross-entropy on text targets (not image positions, not padding)."""
        ids = inputs.input_ids.to(logits.device)
        log_probs = logits[:, :-1].log_softmax(-1)
        nll = -log_probs.gather(-1, ids[:, 1:, None])[..., 0]
        real = inputs.attention_mask.to(logits.device).bool()
        valid = (ids[:, 1:] != self.cfg.image_token_id) & real[:, 1:] & real[:, :-1]
        if per_token:
            return nll * valid
        return (nll * valid).sum() / valid.sum().clamp(min=1)

    def run_with_cache(self, *model_args, return_cache_object: bool = True, remove_batch_dim: bool = False,
                       **kwargs) -> tuple[Any, Union[ActivationCache, dict]]:
        """As TransformerLens: ``(output, ActivationCache)``; ``names_filter``, ``device``, ``pos_slice``. The cache is
        a :class:`~mm_lens.activation_cache.VLMActivationCache` (its decompositions include DeepStack additions).

        A ``names_filter`` given as a name or a list of names must name hook points (a typo is a
        ``ValueError`` listing the nearest names, not an empty cache). A cache that cannot fit on its CUDA
        device is a ValueError with the numbers (estimated from the config and the input's shape:
        :mod:`mm_lens.memory`) before anything runs.
        """
        _check_hook_names(self.hook_dict, kwargs.get("names_filter"))
        if model_args:
            prompts = model_args[1] if len(model_args) > 1 else kwargs.pop("prompts", None)
            reading = {k: kwargs.pop(k) for k in ("padding_side", "prepend_bos", "attention_mask") if k in kwargs}
            model_args = (self._as_inputs(model_args[0], prompts, **reading), *model_args[2:])
            layers = {k: kwargs.get(k) for k in ("start_at_layer", "stop_at_layer")}
            check_cache_fits(self, model_args[0], kwargs.get("names_filter"), kwargs.get("device"), **layers)
        out, cache_dict = super().run_with_cache(*model_args, remove_batch_dim=remove_batch_dim, **kwargs)
        if return_cache_object:
            return out, VLMActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)
        return out, cache_dict

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
                         ) -> Float[Tensor, " d_model"]:
        """Sum of the attention (and MLP) output biases written before ``layer`` (as TransformerLens)."""
        total = torch.zeros(self.cfg.d_model, device=self.W_U.device, dtype=self.W_U.dtype)
        for i in range(layer):
            total = total + self.blocks[i].attn.b_O
            if include_mlp_biases:
                total = total + self.blocks[i].mlp.b_out
        if mlp_input:
            total = total + self.blocks[layer].attn.b_O
        return total

    # ------------------------------------------------------------------ generation
    def generate(self, input: Any = None, prompts: Optional[Union[str, Sequence[str]]] = None,
                 max_new_tokens: int = 10, stop_at_eos: bool = True, eos_token_id=None, do_sample: bool = False,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, temperature: float = 1.0,
                 freq_penalty: float = 0.0, use_past_kv_cache: bool = True, return_type: str = "input",
                 verbose: bool = False):
        """Continue prompts token by token, as TransformerLens' ``HookedTransformer.generate``.

        ``input``: a :class:`MultimodalInput`, images with ``prompts``, a prompt or list of prompts without
        images, or token ids; several prompts are padded on the left. ``use_past_kv_cache`` (default): the
        prompt and its images run once, then each step runs only the new token over the cached keys and
        values (hooks see ``[batch, 1, ...]`` on those steps, as in TransformerLens); without it every step
        re-runs the whole sequence. Greedy unless ``do_sample`` (Hugging Face's default; TransformerLens
        samples by default), then ``temperature``, ``top_k``, ``top_p`` and ``freq_penalty`` as in
        TransformerLens. ``stop_at_eos``: a row stops at ``eos_token_id`` (default the tokenizer's; an int
        or several) and is filled with it until every row has stopped. ``return_type``: ``"tokens"``
        (``[batch, pos + new]``: the input ids, image placeholders expanded, then the new tokens),
        ``"str"`` (decoded without special tokens; a string for one row) or ``"input"`` (tokens for a
        MultimodalInput or token ids, strings otherwise). ``verbose`` shows a progress bar.
        """
        from mm_lens.generation import generate

        return generate(self, input, prompts, max_new_tokens, stop_at_eos, eos_token_id, do_sample, top_k, top_p,
                        temperature, freq_penalty, use_past_kv_cache, return_type, verbose)


def _check_hook_names(hook_dict: dict, names_filter) -> None:
    """Every name in a string or list ``names_filter`` must be a hook point."""
    import difflib

    names = [names_filter] if isinstance(names_filter, str) else names_filter
    if not isinstance(names, (list, tuple, set)):
        return  # None or a callable
    missing = [n for n in names if n not in hook_dict]
    if missing:
        hints = "; ".join(f"{n!r}: nearest {difflib.get_close_matches(n, list(hook_dict), n=3, cutoff=0.4)}"
                          for n in missing)
        raise ValueError(f"names_filter names no hook point: {hints} (model.hook_dict lists them all)")


def _to_device_of(block, x: Tensor, rotary):
    """The residual stream (and rotary tables) moved to ``block``'s device when a device map spreads the blocks."""
    device = block.attn.W_Q.device
    if x.device == device:
        return x, rotary
    return x.to(device), None if rotary is None else tuple(t.to(device) for t in rotary)


def _positive(value: float) -> Optional[float]:
    """TransformerLens' "-1 means off" convention as an optional value."""
    return value if value is not None and value > 0 else None


def _looks_like_path(s: str) -> bool:
    import os

    return os.path.sep in s and os.path.exists(s)
