"""The export configuration: built once from the CLI or the Python API (STYLE habit 6)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdrt.engines.specs import DEFAULT_EMBEDDING_SLOTS, Precision, Stage


@dataclass(frozen=True)
class ExportConfig:
    model_dir: Path
    out_dir: Path
    height: int | None = None          # None: the model's native size
    width: int | None = None
    batch: int = 1                     # images per call
    # classifier-free guidance: U-Net runs 2 x batch. None: on, except for U-Nets that
    # take the guidance scale as an embedding (LCM), which never run CFG.
    cfg: bool | None = None
    prompt_chunks: int = 1             # U-Net context: this many 77-token prompt chunks
    # DeepCache: also export the shallow U-Net, and a U-Net that returns the deep feature
    # the shallow one reuses (`cache_interval` at generation).
    deepcache: bool = False
    # diffusers ControlNetModel folders: exported as the controlnet stage (all of them in
    # one graph), and a U-Net that takes their residuals. Order = control images' order.
    controlnets: tuple[Path, ...] = ()
    # Textual inversion: vectors of embeddings one call may use in all (the text
    # encoders' `token_embeddings` rows); 0 = an artifact that takes none.
    embedding_slots: int = DEFAULT_EMBEDDING_SLOTS
    precision: Precision = Precision.FP32
    vae_precision: Precision | None = None   # None: same as `precision`; both VAE stages
    # Export the VAE encoder (image-to-image, inpainting, outpainting). On by default:
    # it is the smallest network (34 M parameters in SD 1.5, 1% of the export time) and
    # without it an artifact can never take an input image; a text-to-image-only
    # deployment can leave it out. An inpainting checkpoint always needs it.
    vae_encoder: bool = True
    # Export the checkpoint's safety checker when it has one (diffusers runs it unless
    # told not to); False leaves it out, with a notice.
    safety_checker: bool = True
    verify: bool = True
    force: bool = False
    allow_pickle: bool = False         # allow loading .bin/.ckpt weights (executes code)
    # The checkpoint's name in PNG metadata (AUTOMATIC1111's `Model:`). None: derived from
    # model_dir (NAME for a Hugging Face hub cache snapshot, else the folder's name).
    model_name: str | None = None
    # LoRAs merged into the exported weights, as (file, scale) pairs (export/merge.py)
    loras: tuple[tuple[Path, float], ...] = ()

    def stage_precision(self, stage: Stage) -> Precision:
        if stage in (Stage.VAE_ENCODER, Stage.VAE_DECODER) and self.vae_precision is not None:
            return Precision(self.vae_precision)
        return Precision(self.precision)
