"""The tile preview shown in the Dagster UI: the map, and a colour bar with values and units."""

import base64
import re
import zlib

import numpy as np

from weather_pipeline.core.preview import colour_bar_ticks, preview_markdown


def _pngs(markdown: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", markdown)]


def _size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def test_preview_has_a_colour_bar_as_wide_as_the_map_with_values_and_units():
    data = np.linspace(250.0, 300.0, 40 * 600, dtype=np.float32).reshape(40, 600)
    data[0, 0] = np.nan
    md = preview_markdown(data, "t2m conus", "K")
    tile, bar = _pngs(md)
    assert _size(tile)[0] == _size(bar)[0] == 300 and _size(bar)[1] == 14
    assert "250 · 262.5 · 275 · 287.5 · 300 K" in md
    # the bar runs from the ramp's first colour to its last: left pixel dark, right pixel bright
    raw = zlib.decompress(bar[bar.index(b"IDAT") + 4:bar.index(b"IEND") - 8])
    row = raw[1:1 + 300 * 4]
    assert sum(row[:3]) < sum(row[-4:-1])


def test_ticks_and_an_all_missing_tile():
    assert colour_bar_ticks(0, 4, "mm", n=3) == "0 · 2 · 4 mm"
    md = preview_markdown(np.full((4, 4), np.nan, dtype=np.float32), "empty", "K")
    assert "(all missing)" in md and len(_pngs(md)) == 1
