"""A small colour-mapped PNG of a tile, for the Dagster UI (markdown with a data URI).

A PNG is a signature plus zlib-compressed RGBA rows in three chunks; writing it directly keeps
an image library out of the dependencies for a 300-pixel thumbnail.
"""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np

# A perceptually ordered ramp (dark blue - teal - yellow), interpolated between these stops.
_STOPS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32
)


def colourize(data: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """(ny, nx) floats -> (ny, nx, 4) uint8 RGBA; NaN is transparent."""
    finite = np.isfinite(data)
    lo = float(np.nanmin(data)) if vmin is None and finite.any() else (vmin or 0.0)
    hi = float(np.nanmax(data)) if vmax is None and finite.any() else (vmax or 1.0)
    scaled = np.zeros(data.shape, dtype=np.float32) if hi <= lo else (np.nan_to_num(data, nan=lo) - lo) / (hi - lo)
    pos = np.clip(scaled, 0, 1) * (len(_STOPS) - 1)
    i0 = np.minimum(pos.astype(int), len(_STOPS) - 2)
    frac = (pos - i0)[..., None]
    rgb = _STOPS[i0] * (1 - frac) + _STOPS[i0 + 1] * frac
    alpha = np.where(finite, 255, 0)[..., None]
    return np.concatenate([rgb, alpha], axis=-1).astype(np.uint8)


def encode_png(rgba: np.ndarray) -> bytes:
    height, width, _ = rgba.shape
    raw = b"".join(b"\x00" + rgba[row].tobytes() for row in range(height))  # filter 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def preview_png(data: np.ndarray, max_width: int = 320) -> bytes:
    """A thumbnail at most `max_width` pixels wide (row 0 north, as tiles are)."""
    step = max(1, int(np.ceil(data.shape[1] / max_width)))
    return encode_png(colourize(data[::step, ::step]))


def preview_markdown(data: np.ndarray, title: str, units: str = "") -> str:
    finite = data[np.isfinite(data)]
    scale = f" ({finite.min():.4g} to {finite.max():.4g} {units})" if finite.size else " (all missing)"
    b64 = base64.b64encode(preview_png(data)).decode()
    return f"**{title}**{scale}\n\n![{title}](data:image/png;base64,{b64})"
