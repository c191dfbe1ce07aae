"""The DreamBooth family's images: the subject's photos (a local folder, a hub dataset of images, or the
built-in offline flower) and their pixels at the training resolution."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .errors import UserError, one_line, unreachable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Views of scikit-learn's flower.jpg (a dahlia, 640 x 427): square crops (centre x, centre y, side) and flips.
FLOWER_VIEWS = [
    (310, 215, 300, False),
    (300, 220, 360, True),
    (330, 210, 400, False),
    (285, 230, 330, True),
    (320, 205, 420, False),
    (305, 225, 250, True),
]  # the last one is held out (the tightest crop)


def flower_views() -> list:
    """The offline subject: six deterministic views of one real photo (scikit-learn's flower.jpg)."""
    from PIL import Image, ImageOps
    from sklearn.datasets import load_sample_image

    photo = Image.fromarray(load_sample_image("flower.jpg"))
    views = []
    for cx, cy, side, flip in FLOWER_VIEWS:
        left = min(max(cx - side // 2, 0), photo.width - side)
        top = min(max(cy - side // 2, 0), photo.height - side)
        view = photo.crop((left, top, left + side, top + side))
        views.append(ImageOps.mirror(view) if flip else view)
    return views


def _folder_images(folder: Path) -> list:
    from PIL import Image

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(
            f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); point task.data_dir at the subject's photos"
        )
    return [Image.open(p).convert("RGB") for p in paths]


def instance_images(task) -> list:
    """The subject's photos: a local folder (``task.data_dir``), the built-in offline flower, or a hub dataset
    of images (``diffusers/dog-example``), sorted by file name."""
    if task.data_dir:
        folder = Path(task.data_dir).expanduser()
        if not folder.is_dir():
            raise UserError(
                f"task.data_dir={task.data_dir} does not exist; point it at a folder of the subject's photos"
            )
        return _folder_images(folder)
    if task.dataset == "sklearn_flower":
        return flower_views()
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(unreachable("dataset", task.dataset, "task.data_dir", "/path/to/images"))
    from huggingface_hub import snapshot_download

    try:
        return _folder_images(Path(snapshot_download(task.dataset, repo_type="dataset")))
    except OSError as err:
        raise UserError(
            f"could not fetch dataset {task.dataset!r} ({one_line(err)}); set task.data_dir=/path/to/images"
        ) from err


def to_pixels(images: list, resolution: int) -> torch.Tensor:
    """N x 3 x res x res in [-1, 1]: shorter side resized to ``resolution``, centre crop (as diffusers' script)."""
    from PIL import Image

    out = []
    for image in images:
        scale = resolution / min(image.size)
        image = image.convert("RGB").resize(
            (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))), Image.BICUBIC
        )
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        array = np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
        out.append(torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(out)
