"""The case page's map of the account's terminals (NiceGUI's simulated user): a marker per
placed terminal, the alert's own highlighted, the unplaced ones listed, no tile layer unless
``console_map_tiles`` names one, and names escaped for Leaflet's HTML tooltips."""

from __future__ import annotations

from nicegui import ui
from nicegui.elements.leaflet.leaflet_layers import GenericLayer, TileLayer
from nicegui.testing import User

from appliance.casework.terminal_directory import Site, write_sites
from appliance.settings import Settings
from appliance.store import Store
from tests.api_support import node_db  # noqa: F401
from tests.console_support import add_user
from tests.support import query
from tests.test_console_pages import sign_in, simulate
from ui.terminal_map import CURRENT, OTHER, tooltip

TILES = "https://tiles.bank.example/{z}/{x}/{y}.png"


def busy_account(settings: Settings) -> tuple[int, str, list[str]]:
    """An alert whose account used at least three terminals: (alert, its terminal, all)."""
    for alert_id, account, terminal in query(settings.db_path, "SELECT alert_id, account_id, "
                                             "terminal_id FROM alerts ORDER BY alert_id"):
        used = [r[0] for r in query(settings.db_path, "SELECT DISTINCT terminal_id FROM "
                                    "transactions WHERE account_id = ? ORDER BY 1", [account])]
        if len(used) >= 3:
            return alert_id, terminal, used
    raise AssertionError("no account with three terminals in the test data")


def the_map(user: User) -> ui.leaflet:
    return user.find(ui.leaflet).elements.pop()


def test_markers_for_the_accounts_terminals(node_db: tuple[Settings, Store]  # noqa: F811
                                            ) -> None:
    settings = node_db[0]
    password = add_user(settings, "alice", "analyst")
    alert_id, current, used = busy_account(settings)
    unplaced = next(t for t in used if t != current)
    placed = [t for t in used if t != unplaced]
    sites = [Site(t, f"ATM {t}", "BR001", 60.1 + i / 100, 24.9 + i / 100)
             for i, t in enumerate(placed)] + [Site(unplaced, "web shop", "BR001", None, None)]
    write_sites(settings.db_path, sites, "test", "test")
    where = {s.terminal_id: [s.latitude, s.longitude] for s in sites}

    async def scenario(user: User) -> None:
        await sign_in(user, "alice", password)
        await user.open(f"/case/{alert_id}")
        await user.should_see(f"Not on the map (no coordinates): {unplaced}")
        leaflet = the_map(user)
        assert not [layer for layer in leaflet.layers if isinstance(layer, TileLayer)]
        markers = [layer for layer in leaflet.layers if isinstance(layer, GenericLayer)]
        assert all(m.name == "circleMarker" for m in markers)
        shown = {tuple(m.args[0]): m.args[1] for m in markers}
        assert set(shown) == {tuple(where[t]) for t in placed}
        assert shown[tuple(where[current])] == CURRENT
        assert [style for point, style in shown.items()
                if point != tuple(where[current])] == [OTHER] * (len(placed) - 1)
        assert tuple(leaflet.center) == tuple(where[current])

    simulate(settings, scenario)

    async def with_tiles(user: User) -> None:
        await sign_in(user, "alice", password)
        await user.open(f"/case/{alert_id}")
        tiles = [layer for layer in the_map(user).layers if isinstance(layer, TileLayer)]
        assert [t.url_template for t in tiles] == [TILES]

    simulate(settings, with_tiles, console_map_tiles=TILES)


def test_no_map_without_coordinates(node_db: tuple[Settings, Store]  # noqa: F811
                                    ) -> None:
    settings = node_db[0]
    password = add_user(settings, "alice", "analyst")
    alert_id = busy_account(settings)[0]

    async def scenario(user: User) -> None:
        await sign_in(user, "alice", password)
        await user.open(f"/case/{alert_id}")
        await user.should_see("No coordinates for the account's terminals")
        await user.should_not_see(ui.leaflet)
        await user.should_see("Terminals the account used")

    simulate(settings, scenario)


def test_tooltips_are_escaped() -> None:
    text = tooltip({"terminal_id": "T1", "name": "<img src=x onerror=alert(1)>",
                    "transactions": 2}, current=True)
    assert "<" not in text and "&lt;img" in text and text.endswith("(this alert)")
