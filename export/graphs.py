"""Torch stage -> static-shape ONNX graph: the export wrappers, the trace, the clean-up.

Each wrapper gives a stage exactly the inputs and outputs of its `StageSpec`
(engines/specs.py), so the graph's I/O names, shapes and dtypes come from that one
place. The legacy TorchScript exporter is used (`dynamo=False`): it is what NVIDIA's
TensorRT diffusion demo uses and it emits plain opset-17 graphs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import torch

from sdrt.engines.specs import (DEEPCACHE_FEATURE, ENCODER_ATTENTION_MASK, ENCODER_HIDDEN_STATES, TEXT_EMBEDS, TIME_IDS,
                                TIMESTEP_COND, TOKEN_EMBEDDINGS, ModelFacts, Stage, StageSpec, is_controlnet_residual)

OPSET = 17
# Tensors up to this size stay inside the .onnx file even when weights go to the data
# file: shape inference must read shape constants, and cannot read external data.
SMALL_TENSOR_BYTES = 1024
# Weights start at 64-byte offsets in the data file, so a memory-mapping reader can use them in place.
DATA_ALIGNMENT = 64


class SlotTokenEmbedding(torch.nn.Module):
    """A CLIP token-embedding table that also takes textual-inversion vectors: token id
    `base` + i picks row i of `slots` (the `token_embeddings` input), other ids their
    row of the table. Two Gathers and a Where: the 49408-row table is never copied per
    call (concatenating the vectors to it would move 150 MB for SD 1.5). Ids below
    `base` give the table's rows bit for bit, so a call without embeddings is the
    plain encoder's. The ids themselves reach the rest of the encoder unchanged, as
    after diffusers' `load_textual_inversion` (which appends the vectors to the table at
    the same ids): CLIP's pooled output of a legacy config (eos_token_id 2) takes the
    largest id's position, an embedding's if the prompt has one, there as here."""

    def __init__(self, table: torch.nn.Embedding, base: int):
        super().__init__()
        self.table = table
        self.base = base
        self.slots: torch.Tensor | None = None   # set by TextEncoderGraph.forward for the trace

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.slots is None:
            return self.table(ids)
        extra = ids >= self.base
        own = self.table(torch.where(extra, torch.zeros_like(ids), ids))
        slot = torch.clamp(ids - self.base, 0, self.slots.shape[0] - 1)
        return torch.where(extra.unsqueeze(-1), torch.nn.functional.embedding(slot, self.slots), own)


class TextEncoderGraph(torch.nn.Module):
    """int32 token ids, a clip skip per prompt (and textual-inversion vectors, see
    SlotTokenEmbedding) -> the hidden states SD conditions on.

    SD 1.x/2.x: a row's clip_skip = 0 gives its last hidden state (the final layer norm
    of the last layer's output); clip_skip = n the final layer norm of the output n
    layers before the last, as diffusers' `encode_prompt(clip_skip=n)` computes it
    (`hidden_states[-(n + 1)]` then `final_layer_norm`). SDXL (`facts.penultimate`):
    `hidden_states[-(n + 2)]`, no layer norm, as StableDiffusionXLPipeline takes it.
    One value per row, because diffusers skips layers for the prompt and not for the
    negative prompt. Every layer's output is computed anyway, so the choice costs one
    gather per call. SDXL's second encoder (CLIPTextModelWithProjection) also returns
    its pooled projection, `text_embeds`.
    """

    def __init__(self, text_encoder: torch.nn.Module, spec: StageSpec, facts: ModelFacts):
        super().__init__()
        self.text_encoder = text_encoder
        layers = int(text_encoder.config.num_hidden_layers)
        # Index in hidden_states (the embeddings' output, then each layer's) of the
        # state clip_skip 0 takes, and of the lowest one a clip skip may reach.
        self.top = layers - 1 if facts.penultimate else layers
        self.lowest = 0 if facts.penultimate else 1
        # transformers 5 flattened CLIPTextModel (no `text_model` level); 4.x nests it.
        norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
        self.final_layer_norm = None if facts.penultimate else norm
        self.pooled = len(spec.outputs) > 1
        self.slots = None
        if any(t.name == TOKEN_EMBEDDINGS for t in spec.inputs):   # textual inversion
            embeddings = getattr(text_encoder, "text_model", text_encoder).embeddings
            self.slots = embeddings.token_embedding = SlotTokenEmbedding(embeddings.token_embedding,
                                                                         facts.text_vocab_size)

    def forward(self, input_ids: torch.Tensor, clip_skip: torch.Tensor,
                token_embeddings: torch.Tensor | None = None) -> Any:
        if self.slots is not None:
            self.slots.slots = token_embeddings
        # int32 at the boundary (TensorRT has no int64 I/O); embeddings index with int64.
        out = self.text_encoder(input_ids.to(torch.int64), output_hidden_states=True, return_dict=True)
        states = torch.stack(out.hidden_states, dim=1)    # (batch, 1 + layers, tokens, width)
        b, _, t, w = states.shape
        # Out-of-range values are clamped rather than left to fail inside the engine.
        skip = torch.clamp(clip_skip.to(torch.int64), 0, self.top - self.lowest)
        index = (self.top - skip).reshape(b, 1, 1, 1).expand(b, 1, t, w)
        hidden = torch.gather(states, 1, index)[:, 0]
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        return (hidden, out.text_embeds) if self.pooled else hidden


class UNetGraph(torch.nn.Module):
    """(sample, one float timestep for the whole batch, text embeddings, and the
    optional inputs its spec lists) -> model output. The optional inputs go to the
    diffusers U-Net by name:

    - `encoder_attention_mask` (1 = a token of the prompt, 0 = unused context): the
      U-Net adds -10000 to the cross-attention scores of masked tokens, whose softmax
      weights are then exactly 0 in float32;
    - `timestep_cond`: an LCM-distilled U-Net's guidance-scale embedding;
    - `text_embeds`, `time_ids`: SDXL's added conditions (`added_cond_kwargs`).

    With DeepCache (a `deepcache_feature` output) it also returns the hidden state that
    enters the last up block's last resnet: the feature its shallow graph reuses.
    """

    ADDED = (TEXT_EMBEDS, TIME_IDS)

    def __init__(self, unet: torch.nn.Module, spec: StageSpec, facts: ModelFacts):
        super().__init__()
        self.unet = unet
        self.optional = tuple(t.name for t in spec.inputs[3:])
        # ControlNet residuals (controlnet_residuals): the down blocks' in order, then the mid block's.
        self.residuals = tuple(t.name for t in spec.inputs if is_controlnet_residual(t.name))
        self.feature: list[torch.Tensor] = []
        if any(t.name == DEEPCACHE_FEATURE for t in spec.outputs):
            channels = facts.unet_block_channels

            def keep(module: Any, args: Any) -> None:
                # The resnet's input is [hidden state, conv_in's skip] along channels.
                self.feature[:] = [args[0][:, :channels]]

            unet.up_blocks[-1].resnets[-1].register_forward_pre_hook(keep)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *optional: torch.Tensor) -> Any:
        kwargs = dict(zip(self.optional, optional))
        added = {name: kwargs.pop(name) for name in self.ADDED if name in kwargs}
        residuals = [kwargs.pop(name) for name in self.residuals]
        if residuals:   # diffusers' down_block_additional_residuals, mid_block_additional_residual
            kwargs.update(down_block_additional_residuals=tuple(residuals[:-1]),
                          mid_block_additional_residual=residuals[-1])
        out = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                        added_cond_kwargs=added or None, **kwargs, return_dict=False)[0]
        return (out, self.feature.pop()) if self.feature else out


class UNetShallowGraph(torch.nn.Module):
    """DeepCache's shallow U-Net (Ma et al., "DeepCache: Accelerating Diffusion Models
    for Free", CVPR 2024): the U-Net's inputs and the deep feature of the last full call
    -> model output. Skip branch 0 as the authors' DeepCacheSDHelper runs it: on a
    cached step every block is skipped but the last resnet (and its attention) of the
    last up block, which takes the cached feature and a fresh conv_in skip; the time
    embedding, conv_in and conv_out run as in the full U-Net. The steps below are
    UNet2DConditionModel.forward's own, in its order, with the skipped blocks left out.
    """

    def __init__(self, unet: torch.nn.Module, spec: StageSpec, facts: ModelFacts):
        super().__init__()
        self.unet = unet
        self.names = tuple(t.name for t in spec.inputs[2:-1])   # after sample and timestep
        last = unet.up_blocks[-1]
        self.resnet = last.resnets[-1]
        self.attention = last.attentions[-1] if getattr(last, "attentions", None) else None

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        unet = self.unet
        kwargs = dict(zip(self.names, rest[:-1]))
        feature = rest[-1]
        # Without the last up block's attention (SDXL) the spec has no text input; SDXL's
        # added embedding does not read it either.
        encoder_hidden_states = kwargs.get(ENCODER_HIDDEN_STATES)
        added = {name: kwargs[name] for name in UNetGraph.ADDED if name in kwargs}
        mask = kwargs.get(ENCODER_ATTENTION_MASK)
        if mask is not None:
            mask = ((1 - mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), kwargs.get(TIMESTEP_COND))
        class_emb = unet.get_class_embed(sample=sample, class_labels=None)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
        emb = emb + aug if aug is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        hidden = self.resnet(torch.cat([feature, unet.conv_in(sample)], dim=1), emb)
        if self.attention is not None:
            encoder_hidden_states = unet.process_encoder_hidden_states(
                encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
            hidden = self.attention(hidden, encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=mask,
                                    return_dict=False)[0]
        if unet.conv_norm_out:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)


class VaeDecoderGraph(torch.nn.Module):
    """Latent already divided by the scaling factor -> image in about [-1, 1]; the
    runtime does the division and the conversion to pixels."""

    def __init__(self, vae: torch.nn.Module, spec: StageSpec, facts: ModelFacts):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]


class VaeEncoderGraph(torch.nn.Module):
    """Image in [-1, 1] -> the latent distribution's mean and standard deviation, as
    diffusers' DiagonalGaussianDistribution computes them (log-variance clamped to
    [-30, 20]); the runtime draws mean + std * noise from the seed."""

    def __init__(self, vae: torch.nn.Module, spec: StageSpec, facts: ModelFacts):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # AutoencoderKL.encode + DiagonalGaussianDistribution, with the moments split by
        # static slices: torch.chunk traces to a Split whose output shapes stay symbolic.
        moments = self.vae.encoder(images)
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        c = self.vae.config.latent_channels
        mean, logvar = moments[:, :c], torch.clamp(moments[:, c:], -30.0, 20.0)
        return mean, torch.exp(0.5 * logvar)


class SafetyCheckerGraph(torch.nn.Module):
    """CLIP pixel values -> each image's cosine similarity to the special-care and the
    other concept embeddings, minus each concept's threshold: the numeric part of
    diffusers' StableDiffusionSafetyChecker.forward (the vision model's pooled output,
    the visual projection, `cosine_distance`, `cos - weights`). Its rounding, the
    special-care adjustment and the black-out are host code (runtime/safety.py), where
    diffusers runs them as a Python loop; forward_onnx, diffusers' own tensor version,
    applies the adjustment differently, so it is not what is traced here."""

    def __init__(self, checker: torch.nn.Module, spec: StageSpec, facts: ModelFacts):
        super().__init__()
        self.checker = checker

    def forward(self, clip_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

        c = self.checker
        image_embeds = c.visual_projection(c.vision_model(clip_input)[1])
        special = cosine_distance(image_embeds, c.special_care_embeds) - c.special_care_embeds_weights
        concept = cosine_distance(image_embeds, c.concept_embeds) - c.concept_embeds_weights
        return special, concept


class ControlNetGraph(torch.nn.Module):
    """The artifact's ControlNets (a ModuleList of diffusers ControlNetModels) as
    diffusers' MultiControlNetModel runs them: each on the same latents, timestep and
    text with its own image, each residual times its weight, summed over the
    ControlNets in their order. The weights (`control_scales`, one per ControlNet, row
    and residual) are where the runtime puts the conditioning scale, the guidance
    window (0 outside it) and guess mode (a ramp over the residuals, 0 for the
    unconditional rows); the ControlNet runs at conditioning_scale 1, which multiplies
    by 1.0, and float32 products with the same factors are the same, so scaling here
    gives diffusers' numbers.
    """

    def __init__(self, controlnets: torch.nn.ModuleList, spec: StageSpec, facts: ModelFacts):
        super().__init__()
        self.controlnets = controlnets
        self.count = len(controlnets)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, control_scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
        total: list[torch.Tensor] = []
        for k, net in enumerate(self.controlnets):
            down, mid = net(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                            controlnet_cond=controlnet_cond[k], conditioning_scale=1.0, return_dict=False)
            scales = control_scales[k]
            weighted = [r * scales[:, j].reshape(-1, 1, 1, 1) for j, r in enumerate((*down, mid))]
            total = weighted if not total else [a + b for a, b in zip(total, weighted)]
        return tuple(total)


# Stage kind -> its export wrapper (the graph side of specs.STAGE_SPECS).
WRAPPERS = {Stage.TEXT_ENCODER: TextEncoderGraph, Stage.TEXT_ENCODER_2: TextEncoderGraph, Stage.UNET: UNetGraph,
            Stage.UNET_SHALLOW: UNetShallowGraph, Stage.VAE_ENCODER: VaeEncoderGraph,
            Stage.VAE_DECODER: VaeDecoderGraph, Stage.SAFETY_CHECKER: SafetyCheckerGraph,
            Stage.CONTROLNET: ControlNetGraph}


def wrap(stage: Stage, module: torch.nn.Module, spec: StageSpec, facts: ModelFacts) -> torch.nn.Module:
    """The export wrapper of `stage` around its diffusers/transformers module, with the
    inputs and outputs of `spec`, for the model `facts` describe."""
    return WRAPPERS[stage](module, spec, facts).eval()


def export_raw(graph: torch.nn.Module, spec: StageSpec, inputs: dict[str, np.ndarray],
               path: Path) -> dict[str, np.ndarray]:
    """Trace `graph` on `inputs` into `path` with static shapes, and return the outputs
    torch computed while tracing. Torch writes a model over 2 GB as one external file
    per weight beside `path`: give it its own folder.

    Tracing runs the module eagerly on the real inputs, so those outputs are the torch
    reference for verification; keeping them saves a second forward pass, which for
    the full-size U-Net and VAE at 512 px is a quarter of the export's time.
    """
    args = tuple(torch.from_numpy(inputs[t.name]) for t in spec.inputs)
    captured: list[np.ndarray] = []

    def keep(module: Any, args: Any, output: Any) -> None:
        outs = (output,) if isinstance(output, torch.Tensor) else tuple(output)
        captured[:] = [o.detach().float().numpy().copy() for o in outs]  # the last call's

    hook = graph.register_forward_hook(keep)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The trace bakes Python-side shape checks in as constants: intended, shapes
            # are static. (Reading the outputs in `keep` also warns, and adds nothing to the graph.)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # The legacy exporter is chosen on purpose (see the module docstring); its
            # deprecation notice would repeat on every export.
            warnings.simplefilter("ignore", DeprecationWarning)
            # The VAE encoder's step -1 Slice: `clean` folds it instead.
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
            torch.onnx.export(
                graph, args, str(path),
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        hook.remove()
    if len(captured) != len(spec.outputs):
        raise RuntimeError(f"{spec.stage.value}: tracing produced {len(captured)} outputs, expected {len(spec.outputs)}")
    return {t.name: a for t, a in zip(spec.outputs, captured)}


def clean_file(raw: Path, dst: Path, data_file: str | None) -> str | None:
    """Clean the traced graph at `raw` and write it to `dst`, its weights in `data_file`
    beside `dst` when given (else inline), then infer shapes.

    Weights are never all in memory at once: torch wrote a >2 GB graph with one
    external file per weight, which stay on disk during clean-up and are then streamed
    into the single data file. (Loading the 3.4 GB SD U-Net and letting onnx save it
    held two to three copies and pushed the export past 8 GB.)
    """
    model = onnx.load(str(raw), load_external_data=False)
    # onnx-graphsurgeon reads a weight's value only when folding needs it, through
    # onnx.numpy_helper.to_array, which resolves external files against the working
    # folder; export is single-threaded, so pointing it at the trace's folder is safe.
    with contextlib.chdir(raw.parent) if hasattr(contextlib, "chdir") else _chdir(raw.parent):
        model = clean(model)
    if data_file:
        data_sha256 = _write_external(model, raw.parent, dst.parent / data_file, data_file)
    else:
        onnx.external_data_helper.load_external_data_for_model(model, str(raw.parent))
    onnx.save_model(model, str(dst))
    del model
    infer_shapes_in_place(dst)
    return data_sha256 if data_file else None


def clean(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding and dead-node removal with onnx-graphsurgeon, as NVIDIA's demo
    does (its `Optimizer`: cleanup, fold_constants, cleanup). Shape inference runs on
    the saved file (`infer_shapes_in_place`), which also works past 2 GB."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    del model
    graph.cleanup().toposort()
    graph.fold_constants(error_ok=False)
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    if any(n.op_type == "Shape" for n in model.graph.node):
        # Shapes the trace could not annotate (the VAE encoder's asymmetric F.pad traces
        # to a Pad whose pads come from a step -1 Slice, which torch cannot fold) stay
        # symbolic downstream; ONNX shape inference with data propagation recovers them,
        # and a second fold turns the Shape ops into constants.
        graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model, data_prop=True))
        del model
        graph.fold_constants(error_ok=False)
        graph.cleanup().toposort()
        model = gs.export_onnx(graph)
    return model


def _write_external(model: onnx.ModelProto, src_dir: Path, data_path: Path, location: str) -> str:
    """Move every initializer over SMALL_TENSOR_BYTES into one data file, one tensor
    at a time, whether its bytes are inline or in a per-weight file under `src_dir`.
    Returns the file's SHA-256, computed on the way (re-reading 3.4 GB costs seconds)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    offset = 0
    digest = hashlib.sha256()
    with open(data_path, "wb") as out:
        for tensor in _initializers(model.graph):
            if uses_external_data(tensor):
                info = ExternalDataInfo(tensor)
                with open(src_dir / info.location, "rb") as f:
                    f.seek(info.offset or 0)
                    data = f.read(info.length) if info.length else f.read()
            elif tensor.HasField("raw_data") and len(tensor.raw_data) > SMALL_TENSOR_BYTES:
                data = tensor.raw_data
            else:
                continue
            pad = -offset % DATA_ALIGNMENT
            out.write(b"\0" * pad)
            digest.update(b"\0" * pad)
            offset += pad
            out.write(data)
            digest.update(data)
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
            offset += len(data)
            del data
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def _initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:  # subgraphs (If/Loop bodies), should an exporter emit them
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _initializers(sub)


@contextlib.contextmanager
def _chdir(path: Path) -> Iterator[None]:  # contextlib.chdir is 3.11+; JetPack 6 has 3.10
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def infer_shapes_in_place(path: Path) -> None:
    # infer_shapes_path reads the graph, not the external weights, so memory stays small.
    onnx.shape_inference.infer_shapes_path(str(path), str(path), strict_mode=True)


def io_signature(path: Path) -> dict[str, list[tuple[str, tuple[Any, ...], str]]]:
    """Names, shapes and numpy dtypes of a graph's inputs and outputs (weights not loaded)."""
    model = onnx.load(str(path), load_external_data=False)

    def sig(values: Any) -> list[tuple[str, tuple[Any, ...], str]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
            out.append((v.name, dims, str(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))))
        return out

    return {"inputs": sig(model.graph.input), "outputs": sig(model.graph.output),
            "opset": [(o.domain, o.version) for o in model.opset_import]}


def fsync_file(path: str | os.PathLike[str]) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
