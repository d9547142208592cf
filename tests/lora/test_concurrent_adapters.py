"""Two adapter policies of one shared base trained concurrently, in threads (as the trainer's
independent clocks run them), equal bit for bit each adapter trained alone; and one adapter's
served update leaves the other's served tokens unchanged."""

from __future__ import annotations

import dataclasses
import threading

import torch
from fsdp._helpers import LORA, make_batch, make_model, ppo_loss

from areal_agents.engines import GenerateRequest, SamplingParams, WeightUpdate
from areal_agents.engines.local import LocalEngine
from areal_agents.trainers.lora_shared import AdapterTrainEngine, SharedLoRABase

STEPS = 2
WAIT_S = 120  # only a guard against a hang: the protocol below never waits on a clock


def build() -> tuple[SharedLoRABase, dict[str, AdapterTrainEngine]]:
    from areal_agents.trainers.fsdp import FSDPEngine

    torch.set_num_threads(1)
    base = SharedLoRABase(FSDPEngine(make_model(0), lr=1e-2, lora=LORA, token_budget=64))
    views = {"speaker": base.adapter("speaker", lr=1e-2),
             "listener": base.adapter("listener", lr=3e-2, seed=3)}
    return base, views


def play(view: AdapterTrainEngine, seed: int, before_step=None, loss=ppo_loss) -> dict:
    """``STEPS`` of: old log-probs (a forward), one train step. Returns what must not depend
    on anyone else: the log-probs of each step, the stats, the adapter's export."""
    batch, trail, stats = make_batch(seed=seed), [], []
    for k in range(STEPS):
        if before_step is not None:
            before_step(k)
        batch = dataclasses.replace(batch, old_logprobs=view.forward_logprobs(batch))
        trail.append(batch.old_logprobs)
        stats.append(view.train_step(batch, loss))
    return {"trail": trail, "stats": stats, "export": dict(view.export_weights()),
            "state": view.adapter_state()}


def assert_same(got: dict, want: dict) -> None:
    for a, b in zip(got["trail"], want["trail"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert got["stats"] == want["stats"]
    assert got["export"].keys() == want["export"].keys()
    for n, t in want["export"].items():
        torch.testing.assert_close(got["export"][n], t, rtol=0, atol=0, msg=n)
    for n, t in want["state"].items():
        torch.testing.assert_close(got["state"][n], t, rtol=0, atol=0, msg=n)


def test_two_adapters_trained_concurrently_equal_each_trained_alone():
    alone = {}
    for name, seed in (("speaker", 1), ("listener", 2)):
        _, views = build()
        alone[name] = play(views[name], seed)

    base, views = build()
    frozen = {n: p.detach().clone() for n, p in base.engine.model.named_parameters()
              if "lora_" not in n}
    # Force the overlap: in every step the listener asks for the slot (forward, then train)
    # while the speaker is inside its train step's loss, i.e. while the speaker's adapter is
    # active and its gradients are being accumulated.
    # Each step, the speaker starts after the listener's previous step (so the speaker never
    # waits holding the slot for a listener that waits for the slot).
    inside = [threading.Event() for _ in range(STEPS)]
    asking = [threading.Event() for _ in range(STEPS)]
    done = [threading.Event() for _ in range(STEPS)]
    step_of_speaker = iter(range(STEPS))
    current: list[int] = []

    def speaker_loss(logprobs, entropy, mb):
        if not current:  # the first micro-batch of this step
            k = next(step_of_speaker)
            current.append(k)
            inside[k].set()
            assert asking[k].wait(WAIT_S), "the listener never asked for the slot"
        return ppo_loss(logprobs, entropy, mb)

    def speaker_step(k: int) -> None:
        current.clear()
        assert k == 0 or done[k - 1].wait(WAIT_S), "the listener never finished its step"

    def listener_step(k: int) -> None:
        if k:
            done[k - 1].set()
        assert inside[k].wait(WAIT_S), "the speaker never entered its train step"
        asking[k].set()

    out, errors = {}, []

    def run(name: str, seed: int, before, loss) -> None:
        try:
            out[name] = play(views[name], seed, before, loss)
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)
            for event in inside + asking + done:  # release the other thread
                event.set()

    threads = [threading.Thread(target=run, args=("speaker", 1, speaker_step, speaker_loss)),
               threading.Thread(target=run, args=("listener", 2, listener_step, ppo_loss))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert_same(out["speaker"], alone["speaker"])
    assert_same(out["listener"], alone["listener"])
    # the base took no step and holds no gradient; each adapter's export is its own
    for n, p in base.engine.model.named_parameters():
        if "lora_" not in n:
            assert p.grad is None and torch.equal(p, frozen[n]), n
    b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert not torch.equal(out["speaker"]["export"][b], out["listener"]["export"][b])
    assert [views[n].step for n in ("speaker", "listener")] == [STEPS, STEPS]


async def test_one_adapters_update_leaves_the_others_served_tokens_unchanged():
    from areal_agents.models.tiny import tiny_tokenizer

    _, views = build()
    play(views["speaker"], 1)
    request = GenerateRequest([1, 20, 30, 7], SamplingParams(max_tokens=4, temperature=0.0))
    async with LocalEngine(make_model(0), tiny_tokenizer()) as engine:
        served = {n: engine.add_adapter(n, rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
                  for n in ("speaker", "listener")}
        await served["listener"].update_weights(WeightUpdate(
            named_tensors=views["listener"].export_weights(), version=1))
        before = (await served["listener"].generate(request)).outputs[0]
        await served["speaker"].update_weights(WeightUpdate(
            named_tensors=views["speaker"].export_weights(), version=4))
        after = (await served["listener"].generate(request)).outputs[0]
        speaker = (await served["speaker"].generate(request)).outputs[0]
    assert (after.token_ids, after.logprobs, after.versions) == (
        before.token_ids, before.logprobs, before.versions)
    assert after.versions == [1] * 4 and speaker.versions == [4] * 4
    assert speaker.logprobs != after.logprobs  # the speaker's trained adapter does differ
