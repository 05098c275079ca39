"""Decoding stored images safely: every mode to uint8 RGB, and a size guard read from the header."""

from __future__ import annotations

import torch
from torchvision.io import ImageReadMode, decode_image


class BadImage(ValueError):
    """Image bytes that cannot or must not be decoded, with a one-line reason."""


# Larger images are refused from their header, before any pixel is decoded (50 MP is 150 MB of RGB;
# re-ID crops are well under 1 MP, and PIL's own decompression-bomb limit is 89 MP).
MAX_IMAGE_PIXELS = 50_000_000
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def image_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a PNG or JPEG header without decoding; None when the header does not say."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    if data[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 9 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _JPEG_SOF:
            return int.from_bytes(data[at + 5:at + 7], "big"), int.from_bytes(data[at + 7:at + 9], "big")
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            at += 2
            continue
        at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
    return None


def decode(data: bytes) -> torch.Tensor:
    """Encoded JPEG/PNG bytes of any mode (grey, palette, alpha, CMYK, 16-bit) to a uint8 CHW RGB tensor
    (libjpeg-turbo / libpng via torchvision). Raises :class:`BadImage` for empty, undecodable or
    too large images (over :data:`MAX_IMAGE_PIXELS`, refused from the header)."""
    if not data:
        raise BadImage("empty image (0 bytes)")
    size = image_size(data)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise BadImage(f"image of {size[1]}x{size[0]} pixels is over the {MAX_IMAGE_PIXELS:,}-pixel limit")
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as e:
        raise BadImage(f"undecodable image ({str(e).splitlines()[0] if str(e) else 'corrupt data'})") from None
    if image.dtype == torch.uint16:  # a 16-bit PNG: keep the high byte, as an 8-bit encoder would
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    return image


def header_problem(head: bytes, suffix: str) -> str | None:
    """Why the first bytes of an image file already show it cannot be stored, or None: empty, not the
    format its suffix names, or over :data:`MAX_IMAGE_PIXELS` by its header."""
    if not head:
        return "empty image (0 bytes)"
    magic = {".jpg": b"\xff\xd8", ".jpeg": b"\xff\xd8", ".png": b"\x89PNG\r\n\x1a\n"}.get(suffix.lower())
    if magic is not None and not head.startswith(magic):
        return f"not a {suffix.lstrip('.').upper()} file (its first bytes say otherwise)"
    size = image_size(head)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        return f"image of {size[1]}x{size[0]} pixels is over the {MAX_IMAGE_PIXELS:,}-pixel limit"
    return None
