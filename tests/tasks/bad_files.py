"""Damaged files for the bad-data tests of every task, made in a few bytes."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from PIL import Image

# A header that claims this many pixels: over PIL's limit (its DecompressionBombWarning), and
# over twice the limit (its DecompressionBombError).
BOMB_WARNING_SIDE = 10_000  # 10⁸ pixels
BOMB_ERROR_SIDE = 20_000  # 4·10⁸ pixels


def bomb_png(path: Path, side: int = BOMB_ERROR_SIDE) -> Path:
    """A PNG whose header claims side × side grey pixels (a few dozen bytes of data follow)."""
    assert side * side > Image.MAX_IMAGE_PIXELS

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grey, no interlace
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(64)))
                     + chunk(b"IEND", b""))
    return path
