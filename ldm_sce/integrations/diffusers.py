"""SCEdit inside diffusers: SC-Tuners and CSC-Tuner controllers (ours or any official file) on a diffusers
`UNet2DConditionModel` (SD1, SD2, SDXL), without forking it. diffusers stays an optional dependency.

diffusers' up blocks concatenate `[h, skip]` and hand the result to their resnets; a forward pre-hook on
each of those resnets splits it again, edits the skip exactly as our decoder loop does (`UNetModel.forward`:
tuner, then the controllers' residuals) and concatenates it back. Skip m (decoder order) is up block i's
resnet j with m = i * (layers_per_block + 1) + j, the order diffusers pops its skips in.

    from diffusers import StableDiffusionPipeline
    from PIL import Image
    from ldm_sce.integrations.diffusers import SCEdit

    pipe = StableDiffusionPipeline.from_single_file("v2-1_512-ema-pruned.safetensors")
    sce = SCEdit(pipe.unet, family="sd2")
    sce.load_tuner("3d_style/0_SwiftSCETuning", scale=0.8)      # or several: sce.load_tuners([...])
    canny = sce.load_controller("canny_controller/")             # its default weight: the file's SCALE
    sce.set_control([sce.condition(canny, Image.open("in.png"), 512, 512)], start=0.0, end=1.0)
    image = pipe("a house in the woods").images[0]
    sce.remove()                                                # the UNet is as it was

The control range uses the UNet's timestep (progress 1 - t / num_train_timesteps, as our samplers); reading
it is one host sync per step, only when the range is not the whole of sampling.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint_io import CheckpointError
from ..conditions import condition_tensor, make_condition
from ..config import UNetConfig
from ..tuner_files import build_sc_tuners, check_fits, read_tuner_file, strict_load
from ..tuners import COMPOSE_MODES, CSCTuner, SkipIdentity, TunerSet

_FAMILIES = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def geometry(unet) -> UNetConfig:
    """Our UNetConfig for the geometry of a diffusers UNet (widths, levels, blocks per level): enough for
    skip dims and the hint encoder's dense blocks, not for building a UNet."""
    c = unet.config
    widths = list(c.block_out_channels)
    if any(w % widths[0] for w in widths):
        raise ValueError(f"block_out_channels {widths}: not multiples of the first")
    layers = c.layers_per_block
    if not isinstance(layers, int):
        if len(set(layers)) != 1:
            raise ValueError(f"layers_per_block {layers}: SCEdit here needs the same number at every level")
        layers = layers[0]
    return UNetConfig(
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        model_channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=layers,
        num_heads=1,
        context_dim=c.cross_attention_dim if isinstance(c.cross_attention_dim, int) else 1,
        hint_channels=320 if c.addition_embed_type == "text_time" else 256,
        hint_ratio=2 if c.addition_embed_type == "text_time" else 1,
    )


class SCEdit:
    """SC-Tuners and CSC-Tuner controllers attached to a diffusers UNet2DConditionModel (module docstring).
    family ('sd1', 'sd2', 'sdxl'): checked against the files' base; default from the cross-attention width."""

    def __init__(self, unet, family: str | None = None, num_train_timesteps: int = 1000):
        self.unet = unet
        self.cfg = geometry(unet)
        self.family = family or _FAMILIES.get(unet.config.cross_attention_dim)
        self.skip_dims = list(self.cfg.skip_channels)
        self.tuners = nn.ModuleList(SkipIdentity() for _ in self.skip_dims)
        self.controllers: list[CSCTuner] = []
        self.tuner_scale: float | tuple[float, ...] = 1.0
        self.hints: list[list[torch.Tensor]] = []
        self.weights: list[float] = []
        self.control_scale = 1.0
        self.control_range = (0.0, 1.0)
        self.num_train_timesteps = num_train_timesteps
        self._control_on = True
        self._handles = [unet.register_forward_pre_hook(self._at_timestep, with_kwargs=True)]
        m = 0
        for block in unet.up_blocks:
            for resnet in block.resnets:
                self._handles.append(resnet.register_forward_pre_hook(self._edit_hook(m)))
                m += 1
        if m != len(self.skip_dims):
            raise ValueError(f"the UNet's up blocks have {m} resnets for {len(self.skip_dims)} skips")

    # -- files -----------------------------------------------------------------------------------------

    def _device(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.unet.parameters())
        return p.device, p.dtype

    def load_tuner(self, path: str | Path, scale: float = 1.0) -> None:
        """Put the SC-Tuners of `path` (ours or official) on their skips, replacing those attached before;
        `scale`: the tuner scale s."""
        self.load_tuners([(path, 1.0)])
        self.tuner_scale = scale

    def load_tuners(self, files: list[tuple[str | Path, float]], mode: str = "sum") -> None:
        """Several SC-Tuner files with weights s_k, combined as `ldm_sce.tuner_files.load_tuners`. A TEXT_SCE
        file's text-encoder LoRA is not applied here (the text encoder is the pipeline's): refused."""
        if mode not in COMPOSE_MODES:
            raise ValueError(f"tuner composition must be one of {', '.join(COMPOSE_MODES)}, got {mode!r}")
        loaded = []
        for path, weight in files:
            tf = read_tuner_file(path)
            if tf.kind != "sc":
                raise CheckpointError(f"{path}: a controller, not SC-Tuners: use load_controller")
            if tf.text_lora is not None:
                raise CheckpointError(
                    f"{path}: a TEXT_SCE tuner; its text-encoder LoRA would be left out here: load it in our "
                    "model (ldm_sce.load_tuner), or convert the LoRA part for pipe.load_lora_weights"
                )
            check_fits(tf, self.skip_dims, self.family, path)
            loaded.append((build_sc_tuners(tf, self.unet, path), float(weight)))
        slots: list[nn.Module] = []
        for m in range(len(self.skip_dims)):
            here = [(t[m], w) for t, w in loaded if m in t]
            if not here:
                slots.append(SkipIdentity())
            elif len(loaded) == 1 and here[0][1] == 1.0:
                slots.append(here[0][0])
            else:
                slots.append(TunerSet([t for t, _ in here], [w for _, w in here], mode))
        self.tuners = nn.ModuleList(slots)
        self.tuner_scale = 1.0

    def load_controller(self, path: str | Path) -> CSCTuner:
        """Attach the CSC-Tuner controller in `path` (ours or a released one); returns it (its `condition`
        and `default_weight` from the file)."""
        tf = read_tuner_file(path)
        if tf.kind != "csc":
            raise CheckpointError(f"{path}: SC-Tuners, not a controller: use load_tuner")
        check_fits(tf, self.skip_dims, self.family, path)
        with torch.device("meta"):
            ctrl = CSCTuner(self.cfg, tf.kernel, tf.hint_channels, tf.hint_ratio, tf.down_ratio)
        strict_load(ctrl, tf.state_dict, path)
        ctrl.condition, ctrl.default_weight = tf.condition, tf.default_weight
        device, dtype = self._device()
        self.controllers.append(ctrl.to(device, dtype).eval().requires_grad_(False))
        return ctrl

    # -- control ---------------------------------------------------------------------------------------

    def condition(self, controller: CSCTuner, image, width: int, height: int, kind: str | None = None):
        """The condition tensor [1, 3, height, width] made from a PIL image as the controller expects."""
        kind = kind or controller.condition
        if kind is None:
            raise ValueError("the controller does not say which condition it takes: pass kind")
        return condition_tensor(make_condition(kind, image, width, height))

    @torch.no_grad()
    def set_control(
        self,
        conditions: list[torch.Tensor],
        weights: list[float] | None = None,
        scale: float = 1.0,
        start: float = 0.0,
        end: float = 1.0,
    ) -> None:
        """One condition image [B or 1, 3, H, W] in [0, 1] per attached controller (the image size, i.e. 8x
        the latent's); weights w_i (default: each controller's own); the global control scale; the part of
        sampling where control acts. The hints are computed once here and feed every CFG branch."""
        if len(conditions) != len(self.controllers):
            raise ValueError(f"{len(conditions)} conditions for {len(self.controllers)} controllers")
        device, dtype = self._device()
        self.hints = [c.hints(x.to(device, dtype)) for c, x in zip(self.controllers, conditions, strict=True)]
        self.weights = list(weights) if weights is not None else [c.default_weight for c in self.controllers]
        self.control_scale, self.control_range = scale, (start, end)

    def clear_control(self) -> None:
        self.hints, self.weights = [], []

    def remove(self) -> None:
        """Take every hook off the UNet: it computes exactly as before."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- hooks -----------------------------------------------------------------------------------------

    def _at_timestep(self, module, args, kwargs):
        if not self.hints or tuple(self.control_range) == (0.0, 1.0):
            self._control_on = True
            return None
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t = float(torch.as_tensor(t).max())  # a host sync, only with a limited control range
        lo, hi = self.control_range
        self._control_on = lo <= 1.0 - t / self.num_train_timesteps <= hi
        return None

    def _edit_hook(self, m: int):
        dim = self.skip_dims[m]

        def hook(module, args):
            x = args[0]
            h, skip = x[:, :-dim], x[:, -dim:]
            scale = self.tuner_scale if isinstance(self.tuner_scale, (int, float)) else self.tuner_scale[m]
            edited = self.tuners[m](skip, scale)
            if self.hints and self._control_on:
                for ctrl, hints, w in zip(self.controllers, self.hints, self.weights, strict=True):
                    hint = hints[m]
                    if hint.shape[0] != skip.shape[0]:  # CFG batches: the same hint for every branch
                        hint = hint.repeat(skip.shape[0] // hint.shape[0], 1, 1, 1)
                    edited = edited + (self.control_scale * w) * ctrl.residual(m, skip, hint)
            return (torch.cat([h, edited], dim=1), *args[1:])

        return hook
