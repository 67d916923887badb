"""Image decoding and conversion for the non-built-in sources.

Every image becomes float32 ``[H, W, C]``: integer images are scaled to 0..1 (uint8 / 255,
uint16 / 65535; other integer types must hold 0..255), float images are kept as they are. A
grey image (``[H, W]``) gets ``C = 1``. ``image_size`` resizes every image to a square
(bilinear, in float, channel by channel, with Pillow); without it, images of different sizes are
refused. ``channels`` repeats a grey channel (e.g. 3 for an RGB model); images mixing grey and
colour become colour.

Files are decoded with Pillow: JPEG, PNG, BMP, GIF (first frame), WebP, TIFF. Palette,
grey+alpha and RGBA images become grey or RGB (alpha is dropped); 16-bit grey stays 16-bit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cimjax.data.source import BadImageError
from cimjax.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_GREY_MODES = ("1", "L", "LA", "La")
_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _resize_hint(what: str) -> str:
  return f"{what}; set train.data.image_size=S to resize every image to S x S"


def image_from_pil(img: object, where: str) -> np.ndarray:
  """A Pillow image as ``[H, W, C]`` uint8 (uint16 for 16-bit grey, float32 for mode F).

  Raises:
    BadImageError: a mode that cannot be converted.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if not isinstance(img, Image.Image):
    raise BadImageError(f"{where}: not an image ({type(img).__name__})")
  mode = img.mode
  try:
    if mode in _GREY_MODES:
      arr = np.asarray(img.convert("L"))
    elif mode in _16BIT_MODES:
      arr = np.asarray(img)
      if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise BadImageError(f"{where}: {mode} image with values outside 0..65535")
      arr = arr.astype(np.uint16)
    elif mode == "F":
      arr = np.asarray(img, np.float32)
    elif mode == "RGB":
      arr = np.asarray(img)
    else:  # P, PA, RGBA, CMYK, YCbCr, ...: colour without alpha
      arr = np.asarray(img.convert("RGB"))
  except (OSError, ValueError) as e:
    raise BadImageError(f"{where}: cannot convert the {mode} image ({e})") from None
  return arr[..., None] if arr.ndim == 2 else arr


def decode_image(path: str | os.PathLike[str]) -> np.ndarray:
  """Reads one image file (see :func:`image_from_pil` for the result).

  Raises:
    BadImageError: a missing, truncated or corrupt file, or one Pillow cannot identify; the
      message names the file.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  p = Path(path)
  try:
    with Image.open(p) as img:
      img.load()
      return image_from_pil(img, str(p))
  except BadImageError:
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise BadImageError(f"{p}: cannot read the image ({e})") from None


def to_float(x: np.ndarray, where: str) -> np.ndarray:
  """Images of any numeric dtype as float32 (integer images scaled to 0..1).

  Args:
    x: images or one image, any shape.
    where: the file for messages.

  Returns:
    float32, ``x``'s shape: uint8 / 255, uint16 / 65535, other integers (0..255) / 255, floats
    unchanged.

  Raises:
    DataError: booleans, non-numeric data, integers outside 0..255 (other than uint16), or
      non-finite floats.
  """
  if x.dtype == np.uint8:
    return x.astype(np.float32) / np.float32(255.0)
  if x.dtype == np.uint16:
    return x.astype(np.float32) / np.float32(65535.0)
  if np.issubdtype(x.dtype, np.integer):
    if x.size and (int(x.min()) < 0 or int(x.max()) > 255):
      raise DataError(
        f"{where}: {x.dtype} images hold {int(x.min())}..{int(x.max())}; integer images must "
        "hold 0..255 (or be uint16), or give float images"
      )
    return x.astype(np.float32) / np.float32(255.0)
  if np.issubdtype(x.dtype, np.floating):
    out = x.astype(np.float32)
    if not np.isfinite(out).all():
      raise DataError(f"{where}: images hold NaN or infinite values")
    return out
  raise DataError(f"{where}: images of dtype {x.dtype}; expected integer or float pixels")


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of a float32 ``[H, W, C]`` image to ``[size, size, C]`` (per channel)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if img.shape[:2] == (size, size):
    return img
  chans = [
    np.asarray(
      Image.fromarray(np.ascontiguousarray(img[..., c], np.float32)).resize(
        (size, size), Image.Resampling.BILINEAR
      ),
      np.float32,
    )
    for c in range(img.shape[-1])
  ]
  return np.stack(chans, axis=-1)


def _target_channels(counts: Sequence[int], channels: int | None, where: str) -> int:
  present = sorted(set(counts))
  if channels:
    bad = [c for c in present if c not in (1, channels)]
    if bad:
      raise DataError(
        f"{where}: images have {bad[0]} channels; train.data.channels={channels} can only "
        "repeat a grey channel"
      )
    return channels
  if len(present) > 2 or (len(present) == 2 and present[0] != 1):
    raise DataError(f"{where}: images mix {', '.join(map(str, present))} channels")
  return present[-1] if present else 1


def prepare_array(
  x: np.ndarray, where: str, image_size: int | None = None, channels: int | None = None
) -> np.ndarray:
  """An image array as float32 ``[N, H, W, C]`` (scaled, resized, channels repeated).

  Args:
    x: ``[N, H, W]`` or ``[N, H, W, C]`` images.
    where: the file (and array) for messages.
    image_size: resize to this square side (None or 0: keep).
    channels: repeat a grey channel to this many (None or 0: keep).

  Raises:
    DataError: another rank, or a dtype :func:`to_float` refuses.
  """
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] < 1:
    raise DataError(f"{where}: images of shape {x.shape}; expected [N, H, W] or [N, H, W, C]")
  out = to_float(x, where)
  if image_size and out.shape[1:3] != (image_size, image_size):
    if len(out):
      out = np.stack([resize_image(img, image_size) for img in out])
    else:
      out = np.zeros((0, image_size, image_size, out.shape[-1]), np.float32)
  c = _target_channels([out.shape[-1]], channels, where)
  if out.shape[-1] != c:
    out = np.repeat(out, c, axis=-1)
  return out


def prepare_list(
  images: Sequence[np.ndarray],
  origins: Sequence[str],
  where: str,
  image_size: int | None = None,
  channels: int | None = None,
  *,
  shape_hint: tuple[int, ...] | None = None,
) -> np.ndarray:
  """Decoded images of possibly different sizes as one float32 ``[N, H, W, C]`` array.

  Args:
    images: ``[H, W]`` or ``[H, W, C]`` images.
    origins: where each image comes from (file paths), for messages.
    where: the folder or file for messages.
    image_size: resize every image to this square side (None or 0: sizes must agree).
    channels: repeat grey channels to this many (None or 0: grey images among colour ones
      become colour).
    shape_hint: the shape an empty result should have (``(H, W, C)``).

  Raises:
    DataError: images of different sizes without ``image_size`` (naming two of them), or
      channel counts that cannot be reconciled.
  """
  floats = []
  for img, origin in zip(images, origins):
    arr = np.asarray(img)
    if arr.ndim == 2:
      arr = arr[..., None]
    if arr.ndim != 3:
      raise DataError(f"{origin}: image of shape {arr.shape}; expected [H, W] or [H, W, C]")
    arr = to_float(arr, origin)
    floats.append(resize_image(arr, image_size) if image_size else arr)
  if not floats:
    return np.zeros((0, *(shape_hint or (1, 1, 1))), np.float32)
  c = _target_channels([f.shape[-1] for f in floats], channels, where)
  floats = [np.repeat(f, c, axis=-1) if f.shape[-1] != c else f for f in floats]
  first = floats[0].shape
  for f, origin in zip(floats, origins):
    if f.shape != first:
      raise DataError(
        _resize_hint(
          f"{where}: images of different sizes: {origins[0]} is {first[0]}x{first[1]}, "
          f"{origin} is {f.shape[0]}x{f.shape[1]}"
        )
      )
  return np.stack(floats)


__all__ = [
  "IMAGE_EXTENSIONS",
  "decode_image",
  "image_from_pil",
  "prepare_array",
  "prepare_list",
  "resize_image",
  "to_float",
]
