"""IResNet 2D face encoders (IR-18, IR-50 and a tiny CPU variant) in AdaFace's module layout.

The network is the improved-residual ResNet used by ArcFace/AdaFace: a stride-1 3x3 stem, four
stages of ``BasicBlockIR`` units whose first unit halves the resolution, and an output layer
``BatchNorm2d -> Dropout -> Flatten -> Linear(C*H_F*W_F, 512) -> BatchNorm1d(affine=False)``.
An input of side S (a multiple of 16) gives a feature map of side S/16 (112 -> 7x7x512,
64 -> 4x4x512), which is where the joint attention acts.

Module and parameter names follow AdaFace's ``net.py`` (``input_layer``, ``body.<i>.res_layer``,
``body.<i>.shortcut_layer``, ``output_layer``) so that AdaFace checkpoints load with a prefix
change only; see :func:`load_adaface_backbone` for the key mapping.

Example:
    >>> enc = create_encoder_2d("ir_tiny", image_size=64, embedding_dim=None)
    >>> enc.forward_features(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 128, 4, 4])
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

__all__ = [
    "IResNet",
    "IRSpec",
    "IR_SPECS",
    "BasicBlockIR",
    "EmbeddingHead",
    "create_encoder_2d",
    "list_encoders_2d",
    "adaface_key_map",
    "load_adaface_backbone",
    "read_checkpoint_tensors",
]


@dataclass(frozen=True)
class IRSpec:
    """Shape of an IResNet: stem width, per-stage widths and units per stage."""

    stem: int
    widths: tuple[int, int, int, int]
    units: tuple[int, int, int, int]

    @property
    def out_channels(self) -> int:
        return self.widths[-1]


#: the registry of 2D encoders (names as in ``ModelConfig.encoder_2d``)
IR_SPECS: dict[str, IRSpec] = {
    "ir18": IRSpec(64, (64, 128, 256, 512), (2, 2, 2, 2)),
    "ir50": IRSpec(64, (64, 128, 256, 512), (3, 4, 14, 3)),
    # CPU tests and demos: same topology, one unit per stage, a quarter of the width
    "ir_tiny": IRSpec(16, (16, 32, 64, 128), (1, 1, 1, 1)),
}


def list_encoders_2d() -> list[str]:
    return sorted(IR_SPECS)


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reshape, not view: channels_last maps are not contiguous
        return x.reshape(x.size(0), -1)


class BasicBlockIR(nn.Module):
    """Pre-activation-style IR unit: BN-conv-BN-PReLU-conv(stride)-BN plus a shortcut."""

    def __init__(self, in_channel: int, depth: int, stride: int) -> None:
        super().__init__()
        if in_channel == depth:
            # a 1x1 max-pool with stride is a parameter-free subsampling (AdaFace's choice)
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channel, depth, (1, 1), stride, bias=False),
                nn.BatchNorm2d(depth),
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, (3, 3), (1, 1), 1, bias=False),
            nn.BatchNorm2d(depth),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class EmbeddingHead(nn.Sequential):
    """AdaFace's output layer: a ``[B, C, S, S]`` feature map -> ``[B, D]`` embedding (unnormalised).

    Children (the checkpoint key layout; do not reorder): 0 BatchNorm2d(C), 1 Dropout, 2 Flatten,
    3 Linear(C*S*S, D), 4 BatchNorm1d(D, affine=False). The joint model uses one instance as the
    compression + FC head shared by the 2D and 3D branches.
    """

    def __init__(self, channels: int, map_size: int, embedding_dim: int, dropout: float = 0.0) -> None:
        super().__init__(
            nn.BatchNorm2d(channels),
            nn.Dropout(dropout),
            Flatten(),
            nn.Linear(channels * map_size * map_size, embedding_dim),
            nn.BatchNorm1d(embedding_dim, affine=False),
        )
        self.channels = channels
        self.map_size = map_size
        self.embedding_dim = embedding_dim
        init_weights(self.modules())


def init_weights(modules: Any) -> None:
    """AdaFace's initialisation: Kaiming-normal (fan_out) convs and linears, unit BN."""
    for m in modules:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class IResNet(nn.Module):
    """An IResNet face encoder.

    Args:
        spec: widths and depths (one of :data:`IR_SPECS`).
        image_size: input side in pixels, a multiple of 16.
        embedding_dim: size of the output embedding, or None for a trunk without
            ``output_layer`` (the joint model applies its own shared output layer after
            the attention, so the trunk carries no unused parameters).
        dropout: dropout rate inside the output layer.
        name: the registry name, recorded in exports.

    Attributes:
        out_channels, map_size: the feature map is ``[B, out_channels, map_size, map_size]``.
    """

    def __init__(self, spec: IRSpec, image_size: int = 112, embedding_dim: int | None = 512,
                 dropout: float = 0.0, name: str | None = None) -> None:
        super().__init__()
        if image_size % 16 != 0 or image_size < 16:
            raise ValueError(f"image_size must be a positive multiple of 16, got {image_size}")
        self.spec = spec
        #: the registry name (``ir18``, ...) when built by :func:`create_encoder_2d`
        self.spec_name = name
        self.image_size = image_size
        self.map_size = image_size // 16
        self.out_channels = spec.out_channels
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, spec.stem, (3, 3), 1, 1, bias=False),
            nn.BatchNorm2d(spec.stem),
            nn.PReLU(spec.stem),
        )
        units: list[nn.Module] = []
        in_c = spec.stem
        for width, n in zip(spec.widths, spec.units):
            units.append(BasicBlockIR(in_c, width, 2))
            units.extend(BasicBlockIR(width, width, 1) for _ in range(n - 1))
            in_c = width
        self.body = nn.Sequential(*units)
        self.embedding_dim = embedding_dim
        self.output_layer = (
            EmbeddingHead(spec.out_channels, self.map_size, embedding_dim, dropout)
            if embedding_dim is not None else None
        )
        init_weights(self.modules())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` in [-1, 1] -> feature map ``[B, C, S/16, S/16]``."""
        return self.body(self.input_layer(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding (unnormalised) when the encoder has an output layer, else the map."""
        z = self.forward_features(x)
        return self.output_layer(z) if self.output_layer is not None else z


def create_encoder_2d(name: str, image_size: int = 112, embedding_dim: int | None = 512,
                      dropout: float = 0.0) -> IResNet:
    """Build a 2D encoder by registry name.

    Args:
        name: ``ir18``, ``ir50`` or ``ir_tiny`` (see :data:`IR_SPECS`).
        image_size: input side, a multiple of 16.
        embedding_dim: output size, or None for the feature-map trunk only.
        dropout: output-layer dropout.

    Returns:
        An :class:`IResNet`.

    Example:
        >>> create_encoder_2d("ir18").forward_features(torch.zeros(1, 3, 112, 112)).shape
        torch.Size([1, 512, 7, 7])
    """
    if name not in IR_SPECS:
        raise ValueError(f"unknown 2D encoder {name!r}; available: {', '.join(list_encoders_2d())}")
    return IResNet(IR_SPECS[name], image_size=image_size, embedding_dim=embedding_dim, dropout=dropout,
                   name=name)


# --------------------------------------------------------------------------------------------
# AdaFace checkpoints
# --------------------------------------------------------------------------------------------


def read_checkpoint_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a flat ``name -> tensor`` mapping without unpickling code.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)`` (PyTorch Lightning checkpoints as AdaFace publishes them are
    accepted: their ``state_dict`` entry is returned; ``argparse.Namespace`` hyper-parameters are the
    only non-tensor class allowed through).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds no tensor mapping, or needs classes a safe load refuses.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError and friends: say what to do
        raise ValueError(
            f"checkpoint {path}: cannot be read with torch.load(weights_only=True) ({e}). Convert it "
            "on a trusted machine to safetensors: safetensors.torch.save_file(ckpt['state_dict'], 'x.safetensors')"
        ) from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {path}: expected a mapping of tensors (or one under 'state_dict')")
    return dict(obj)


def adaface_key_map(key: str) -> str | None:
    """Map one AdaFace checkpoint key to this project's key, or None to skip it.

    | AdaFace key                   | IResNet (standalone)  | PoseFRModel                       |
    |-------------------------------|-----------------------|-----------------------------------|
    | ``model.input_layer.<rest>``  | ``input_layer.<rest>``| ``encoder_2d.input_layer.<rest>`` |
    | ``model.body.<rest>``         | ``body.<rest>``       | ``encoder_2d.body.<rest>``        |
    | ``model.output_layer.<rest>`` | ``output_layer.<rest>``| ``embed.<rest>`` (shared head)   |
    | ``head.*`` (class centres)    | skipped               | skipped                           |

    The function returns the standalone IResNet key (middle column); the loader adds the
    ``encoder_2d.`` prefix or moves ``output_layer.`` to ``embed.`` for the joint model. A bare
    backbone state dict (no ``model.`` prefix) is accepted too.
    """
    if key.startswith("head."):
        return None
    if key.startswith("model."):
        key = key[len("model."):]
    if key.startswith(("input_layer.", "body.", "output_layer.")):
        return key
    return None


def load_adaface_backbone(target: nn.Module, path: str | os.PathLike[str], *,
                          load_output_layer: bool = True, strict: bool = True) -> dict[str, list[str]]:
    """Load an IR backbone from a checkpoint in AdaFace's key layout.

    Args:
        target: an :class:`IResNet`, or a joint model with ``encoder_2d`` (an IResNet) and ``embed``
            (the shared output layer, same layout as AdaFace's ``output_layer``).
        path: ``.safetensors`` or a torch checkpoint (a dict with ``state_dict`` whose keys start
            with ``model.``; ``head.`` keys are skipped). See :func:`adaface_key_map`.
        load_output_layer: also load ``output_layer`` (only when its shapes match: same channels,
            feature-map size and embedding dim; otherwise it is reported as skipped).
        strict: raise if an input-layer or body parameter of the target is missing from the file
            or has a different shape.

    Returns:
        ``{"loaded": [...target keys...], "skipped": [...file keys...], "missing": [...]}``.
    """
    tensors = read_checkpoint_tensors(path)
    if isinstance(target, IResNet):
        enc_prefix = ""
        out_mod = target.output_layer
        out_prefix = "output_layer."
    else:
        if not isinstance(getattr(target, "encoder_2d", None), IResNet):
            raise TypeError("target must be an IResNet or a model with an IResNet 'encoder_2d'")
        enc_prefix = "encoder_2d."
        out_mod = getattr(target, "embed", None)
        out_prefix = "embed."
    own = target.state_dict()
    trunk: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}  # target key -> file key, for the report
    skipped: list[str] = []
    for k, v in tensors.items():
        mapped = adaface_key_map(k)
        if mapped is None:
            skipped.append(k)
        elif mapped.startswith("output_layer."):
            t = out_prefix + mapped[len("output_layer."):]
            head[t], source[t] = v, k
        else:
            t = enc_prefix + mapped
            trunk[t], source[t] = v, k
    # the trunk must match exactly
    trunk_keys = [k for k in own if k.startswith(enc_prefix)
                  and k[len(enc_prefix):].startswith(("input_layer.", "body."))]
    # BN batch counters are bookkeeping; older checkpoints do not carry them
    missing = [k for k in trunk_keys if k not in trunk and not k.endswith("num_batches_tracked")]
    bad = [k for k in trunk_keys if k in trunk and trunk[k].shape != own[k].shape]
    if strict and (missing or bad):
        detail = "; ".join([f"missing {k}" for k in missing[:5]]
                           + [f"{k}: file {tuple(trunk[k].shape)} vs model {tuple(own[k].shape)}" for k in bad[:5]])
        raise ValueError(f"checkpoint {os.fspath(path)} does not fit the 2D encoder: {detail}")
    for k in [k for k in trunk if k not in own or k in bad]:
        skipped.append(source[k])
        trunk.pop(k)
    new = dict(trunk)
    head_fits = bool(head) and all(k in own and own[k].shape == v.shape for k, v in head.items())
    if load_output_layer and out_mod is not None and head_fits:
        new.update(head)
    else:
        skipped.extend(source[k] for k in head)
    target.load_state_dict(new, strict=False)
    return {"loaded": sorted(new), "skipped": sorted(skipped), "missing": sorted(missing)}
