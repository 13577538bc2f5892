"""Model families as data: which stages a family's artifacts have.

A family names its stages in export order; each stage's tensor specs come from its
spec function in `specs.STAGE_SPECS`, applied to the checkpoint's facts. Export,
verification, both backends, the engine cache, `sdrt build`, `info` and `bench`
iterate an artifact's own stages (`Manifest.stages`), which are its family's stages
less the optional ones its export left out. Adding a family is one entry here (and,
in export/checkpoint.py, the rule that recognises its checkpoints).

Whether a U-Net is an inpainting one (9 input channels) is a model fact, not a
family: SD 1.5-inpainting and SD 2-inpainting are the SD 1 and SD 2 families.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ArtifactError
from .specs import Stage


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    stages: tuple[Stage, ...]         # every stage the family can have, in export order
    optional: frozenset[Stage]        # stages an export may leave out

    def required(self) -> tuple[Stage, ...]:
        return tuple(s for s in self.stages if s not in self.optional)

    def check_stages(self, stages: tuple[Stage, ...], where: str) -> None:
        """An artifact's stage list must be the family's, in its order, less optional ones."""
        unknown = [s.value for s in stages if s not in self.stages]
        missing = [s.value for s in self.required() if s not in stages]
        if unknown or missing or list(stages) != [s for s in self.stages if s in stages]:
            raise ArtifactError(
                f"{where}: stages {[s.value for s in stages]} do not fit the {self.title} family "
                f"(its stages: {[s.value for s in self.stages]}, optional: {sorted(s.value for s in self.optional)})")


# The SD 1.x / 2.x layout: one CLIP text encoder, a U-Net, and the VAE. The VAE
# encoder serves image-to-image and inpainting only, so a text-to-image deployment
# may leave it out (`sdrt export --no-vae-encoder`).
# DeepCache's shallow U-Net is in an artifact exported with --deepcache only, the
# ControlNets (run before each U-Net call) in one exported with --controlnet only. The
# safety checker is there when the checkpoint has one (and the export kept it).
_SD_STAGES = (Stage.TEXT_ENCODER, Stage.CONTROLNET, Stage.UNET, Stage.UNET_SHALLOW, Stage.VAE_ENCODER,
              Stage.VAE_DECODER, Stage.SAFETY_CHECKER)
_SD_OPTIONAL = frozenset({Stage.UNET_SHALLOW, Stage.VAE_ENCODER, Stage.CONTROLNET, Stage.SAFETY_CHECKER})

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd1", "Stable Diffusion 1.x", _SD_STAGES, _SD_OPTIONAL),
    Family("sd2", "Stable Diffusion 2.x", _SD_STAGES, _SD_OPTIONAL),
    # SDXL ControlNets (their added conditions) are not exported yet: no controlnet stage.
    # SDXL base: two text encoders (CLIP ViT-L and OpenCLIP bigG) side by side.
    Family("sdxl", "Stable Diffusion XL", (Stage.TEXT_ENCODER, Stage.TEXT_ENCODER_2, Stage.UNET, Stage.UNET_SHALLOW,
                                           Stage.VAE_ENCODER, Stage.VAE_DECODER),
           frozenset({Stage.UNET_SHALLOW, Stage.VAE_ENCODER})),
    # The SDXL refiner: the second text encoder only; image-to-image (the base's latents).
    Family("sdxl-refiner", "Stable Diffusion XL refiner",
           (Stage.TEXT_ENCODER_2, Stage.UNET, Stage.UNET_SHALLOW, Stage.VAE_ENCODER, Stage.VAE_DECODER),
           frozenset({Stage.UNET_SHALLOW})),
)}


def family(name: str, where: str = "manifest") -> Family:
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise ArtifactError(f"{where}: model family {name!r:.40} is not supported by this sdrt "
                            f"(it knows {', '.join(FAMILIES)})") from None
