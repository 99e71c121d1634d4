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


def colour_bar_png(width: int = 320, height: int = 14) -> bytes:
    """The colour ramp from the lowest value (left) to the highest (right)."""
    ramp = np.tile(np.linspace(0.0, 1.0, width, dtype=np.float32), (height, 1))
    return encode_png(colourize(ramp, 0.0, 1.0))


def colour_bar_ticks(vmin: float, vmax: float, units: str, n: int = 5) -> str:
    """Tick labels under the colour bar, evenly spaced from vmin to vmax, with the units."""
    values = np.linspace(vmin, vmax, n)
    return " · ".join(f"{v:.4g}" for v in values) + (f" {units}" if units else "")


def preview_markdown(data: np.ndarray, title: str, units: str = "") -> str:
    """The tile as an image, and under it a colour bar with its values and units."""
    finite = data[np.isfinite(data)]
    b64 = base64.b64encode(preview_png(data)).decode()
    width = preview_png_width(data)
    if not finite.size:
        return f"**{title}** (all missing)\n\n![{title}](data:image/png;base64,{b64})"
    lo, hi = float(finite.min()), float(finite.max())
    bar = base64.b64encode(colour_bar_png(width)).decode()
    return (f"**{title}** ({lo:.4g} to {hi:.4g} {units})\n\n![{title}](data:image/png;base64,{b64})\n\n"
            f"![colour bar, {lo:.4g} to {hi:.4g} {units}](data:image/png;base64,{bar})\n\n"
            f"{colour_bar_ticks(lo, hi, units)} (left to right; transparent: no data)")


def preview_png_width(data: np.ndarray, max_width: int = 320) -> int:
    step = max(1, int(np.ceil(data.shape[1] / max_width)))
    return len(range(0, data.shape[1], step))
