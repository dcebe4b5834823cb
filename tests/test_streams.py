"""The streams as ensure_streams leaves them: an unchanged stream is not updated (on a
cluster each update is one more round through the stream's leader), a changed setting is."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest

from appliance.scoring.streams import TX_STREAM, differs, ensure_streams, stream_configs
from appliance.settings import load


@pytest.mark.parametrize("partitions", [1, 4])
def test_a_stream_as_made_needs_no_update_and_a_changed_setting_is_applied(
        tmp_path: Path, nats_url: str, partitions: int) -> None:
    settings = load(None, env={}, data_dir=tmp_path, nats_url=nats_url, partitions=partitions)
    shorter = load(None, env={}, data_dir=tmp_path, nats_url=nats_url, partitions=partitions,
                   tx_max_age_days=3.0)

    async def go() -> None:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        try:
            await ensure_streams(js, settings)
            for wanted in stream_configs(settings):  # as the server reports it back
                have = (await js.stream_info(wanted.name or "")).config
                assert not differs(have, wanted), wanted.name
            tx = next(c for c in stream_configs(shorter) if c.name == TX_STREAM)
            assert differs((await js.stream_info(TX_STREAM)).config, tx)
            await ensure_streams(js, shorter)
            assert (await js.stream_info(TX_STREAM)).config.max_age == pytest.approx(3 * 86400)
        finally:
            await nc.close()
    asyncio.run(go())
