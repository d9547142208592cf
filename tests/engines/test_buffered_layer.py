"""``BufferedLayer``: appends of any length fit (a prefix-cache hit's suffix can exceed the
64-token spare room; that raised in the multi-turn LocalEngine)."""

from __future__ import annotations

import torch

from areal_agents.engines.scheduler import BufferedLayer


def test_an_append_longer_than_the_spare_room_grows_the_buffer():
    keys = torch.arange(1 * 2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)
    layer = BufferedLayer(keys, -keys)
    new = torch.randn(1, 2, 79, 4)  # > 64 spare positions
    out_k, out_v = layer.update(new, -new)
    assert out_k.shape == (1, 2, 82, 4)
    torch.testing.assert_close(out_k, torch.cat([keys, new], dim=-2), rtol=0, atol=0)
    torch.testing.assert_close(out_v, -out_k, rtol=0, atol=0)
    more = torch.randn(1, 2, 1, 4)  # and decoding continues in place
    out_k, _ = layer.update(more, more)
    torch.testing.assert_close(out_k[..., -1:, :], more, rtol=0, atol=0)
