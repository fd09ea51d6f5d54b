"""Image folders and the VAE: list an ImageFolder-style tree, load images, encode to latents.

An image folder holds one subfolder per class (sorted names -> labels 0, 1, ...), each with image
files (.png, .jpg, .jpeg, .bmp, .webp). Images are resized so the short side is ``image_size``
(bicubic) and center-cropped to a square, then scaled to [-1, 1], as DiT's data pipeline does.
The VAE is a diffusers ``AutoencoderKL`` loaded from a local folder only (never downloaded).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dynconvert.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def list_image_folder(folder: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """List the images of a class-per-subfolder tree.

    Args:
        folder: The root folder.

    Returns:
        (paths, labels, class names), paths sorted within each class.

    Raises:
        DataError: The folder is missing, has no class subfolders, or no images.

    Example:
        >>> list_image_folder("/no/such/folder")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        DataError: image folder /no/such/folder does not exist
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(
            f"image folder {root} does not exist; pass a folder with one subfolder of images "
            "per class"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"image folder {root} has no class subfolders; put the images of class k in "
            f"{root}/<class name>/ (ImageFolder layout)"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        raise DataError(
            f"image folder {root} has class subfolders but no images "
            f"({', '.join(IMAGE_EXTENSIONS)}); add images or fix the path"
        )
    return paths, labels, classes


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """Load one RGB image, resize the short side to ``image_size``, center-crop, scale to [-1, 1].

    Args:
        path: The image file.
        image_size: Side of the square output.

    Returns:
        A float tensor (3, image_size, image_size) in [-1, 1].
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = image_size / min(w, h)
            im = im.resize(
                (max(image_size, round(w * scale)), max(image_size, round(h * scale))),
                Image.BICUBIC,
            )
            w, h = im.size
            left, top = (w - image_size) // 2, (h - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
            arr = np.asarray(im, dtype=np.float32)
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err}; remove or replace the file") from err
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0  # (3, S, S)


def load_vae(
    vae_path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
):
    """Load a diffusers ``AutoencoderKL`` from a local folder (``save_pretrained`` layout).

    Raises:
        DataError: The folder is missing or holds no loadable VAE.
    """
    path = Path(vae_path)
    if not path.is_dir():
        raise DataError(
            f"VAE folder {path} does not exist; pass a local AutoencoderKL folder "
            "(saved with save_pretrained, containing config.json and the weights)"
        )
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot load an AutoencoderKL from {path}: {err}") from err
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def vae_scaling_factor(vae) -> float:
    """The latent scaling factor of a VAE (0.18215 for Stable Diffusion's)."""
    return float(getattr(vae.config, "scaling_factor", 0.18215))


@torch.no_grad()
def encode_images(
    vae, images: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Encode images in [-1, 1] (B, 3, H, W) to scaled latents (B, C, H/f, W/f).

    Args:
        vae: An ``AutoencoderKL``.
        images: The batch.
        sample: Sample the posterior (as DiT's training does) rather than take its mean.
        generator: RNG for the sample (None: the global torch RNG).

    Returns:
        ``latent * scaling_factor`` as float32.
    """
    param = next(vae.parameters())
    dist = vae.encode(images.to(device=param.device, dtype=param.dtype)).latent_dist
    z = dist.sample(generator=generator) if sample else dist.mode()
    return z.float() * vae_scaling_factor(vae)
