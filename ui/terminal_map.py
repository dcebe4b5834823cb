"""The case page's map of the terminals an account used (``ui.leaflet``), the alert's own
terminal highlighted.

Markers are circle markers (vector shapes drawn by Leaflet itself, no marker images), so
they show without any tiles. The tile layer is ``console_map_tiles``: a bank console often
has no internet, and an empty setting means no tile layer at all (NiceGUI's map adds an
OpenStreetMap one by default, removed here). Terminals without coordinates (online
merchants, or not in the terminal directory) are listed under the map instead. Tooltips are
set as HTML by Leaflet, so the names (from an imported file) are escaped first.
"""

from __future__ import annotations

import html
from typing import Any

from nicegui import ui

CURRENT = {"radius": 11, "color": "#991b1b", "fillColor": "#dc2626", "fillOpacity": 0.9,
           "weight": 3}
OTHER = {"radius": 7, "color": "#1e3a8a", "fillColor": "#3b82f6", "fillOpacity": 0.7,
         "weight": 2}


def placed(terminals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [t for t in terminals if t.get("latitude") is not None
            and t.get("longitude") is not None]


def tooltip(t: dict[str, Any], current: bool) -> str:
    label = f"{t['terminal_id']} {t.get('name') or ''}".strip()
    return html.escape(f"{label}: {t['transactions']} transaction(s)"
                       + (" (this alert)" if current else ""))


def terminal_map(terminals: list[dict[str, Any]], current_id: str, tiles: str) -> None:
    """Draw the map (or say why there is none) and list the unplaced terminals."""
    here = placed(terminals)
    unplaced = [t["terminal_id"] for t in terminals if t not in here]
    if not here:
        ui.label("No coordinates for the account's terminals (load the terminal directory "
                 "with branchguard terminals import FILE.csv).").classes(
            "text-gray-600").props("data-testid=map-missing")
        return
    lats = [t["latitude"] for t in here]
    lons = [t["longitude"] for t in here]
    centre = next(((t["latitude"], t["longitude"]) for t in here
                   if t["terminal_id"] == current_id),
                  (sum(lats) / len(lats), sum(lons) / len(lons)))
    m = ui.leaflet(center=centre, zoom=11).classes("w-full h-72").props(
        "data-testid=terminal-map")
    m.clear_layers()
    if tiles:
        m.tile_layer(url_template=tiles, options={"maxZoom": 19})
    labels = []
    # the current terminal last, so it is drawn on top
    for t in sorted(here, key=lambda t: t["terminal_id"] == current_id):
        current = t["terminal_id"] == current_id
        layer = m.generic_layer(name="circleMarker", args=[
            [t["latitude"], t["longitude"]], CURRENT if current else OTHER])
        labels.append((layer, tooltip(t, current)))

    def on_init() -> None:
        for layer, text in labels:
            layer.run_method("bindTooltip", text)
        if len(here) > 1:
            m.run_map_method("fitBounds", [[min(lats), min(lons)], [max(lats), max(lons)]],
                             {"padding": [24, 24], "maxZoom": 14})

    m.on("init", on_init)
    if unplaced:
        ui.label("Not on the map (no coordinates): " + ", ".join(unplaced)).classes(
            "text-gray-600").props("data-testid=map-unplaced")
