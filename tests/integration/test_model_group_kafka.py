"""A model group's refusals on a real Kafka-protocol broker (Tansu): a member listing other
models than the group (more, or as many but different), and a worker outside the group for a
model the group serves. The sharing out and the hand-over after kill -9 are
tests/fault/test_model_group_kafka_crash.py.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.cli.errors import UserError
from fedbus.testing.brokers import free_port
from tests.integration import harness as h
from tests.integration.test_scale import running
from workers.main import serve_all
from workers.model_group import ModelGroup
from workers.roles import serve
from workers.settings import WorkerSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _member(broker: Any, models: list[str], state: Path, worker_id: str) -> WorkerSettings:
    s = h.settings_for("kafka", broker, models[0], state)
    return s.model_copy(
        update={
            "models": models,
            "model_group": f"g-{uuid.uuid4().hex[:8]}",
            "worker_id": worker_id,
            "metrics_port": free_port(),
        }
    )


async def test_a_member_with_other_models_and_a_worker_outside_the_group_are_refused(
    kafka_broker: Any, tmp_path: Path
) -> None:
    models = sorted(f"t-{uuid.uuid4().hex[:10]}" for _ in range(2))
    member = _member(kafka_broker, models, tmp_path / "a", "w-0")
    for i, m in enumerate(models):
        one = member.model_copy(update={"model": m, "models": None, "model_group": None})
        await h.init_model(one, np.random.default_rng(i).normal(0, 0.1, h.N))
    async with running(member):
        other = member.model_copy(
            update={
                "models": [*models, "t-extra"],
                "worker_id": "w-1",
                "metrics_port": free_port(),
            }
        )
        with pytest.raises(UserError, match=r"model group .* has 2 models .* lists 3"):
            await asyncio.wait_for(serve(other, asyncio.Event()), 30)
        # As many models, but not the same: partition 1 would be another model to it.
        swapped = other.model_copy(update={"models": [models[0], "t-extra"]})
        with pytest.raises(
            UserError,
            match=rf"serves {','.join(models)} \(worker 'w-0'\) and this worker lists "
            rf"{','.join(sorted([models[0], 't-extra']))}:",
        ):
            await asyncio.wait_for(serve(swapped, asyncio.Event()), 30)
        # A plain worker for one of the group's models, on a directory of its own: the
        # group's member is in the model's consumer group, so it is refused.
        rogue = member.model_copy(
            update={
                "model": models[1],
                "models": None,
                "model_group": None,
                "worker_id": "rogue",
                "checkpoint_dir": tmp_path / "rogue",
                "metrics_port": free_port(),
            }
        )
        with pytest.raises(UserError, match=f"model '{models[1]}' is already served by"):
            await asyncio.wait_for(serve_all(rogue, asyncio.Event()), 30)


async def test_a_model_served_outside_the_group_stays_with_that_worker(
    kafka_broker: Any, tmp_path: Path
) -> None:
    """The plain worker came first (on a directory of its own): the group's member serves
    the group's other model and waits for this one, saying so, rather than fold it too."""
    models = sorted(f"t-{uuid.uuid4().hex[:10]}" for _ in range(2))
    member = _member(kafka_broker, models, tmp_path / "a", "w-0")
    plain = {
        m: member.model_copy(
            update={"model": m, "models": None, "model_group": None, "worker_id": "plain"}
        )
        for m in models
    }
    for i, m in enumerate(models):
        await h.init_model(plain[m], np.random.default_rng(i).normal(0, 0.1, h.N))
    outsider = plain[models[1]].model_copy(
        update={"checkpoint_dir": tmp_path / "outside", "metrics_port": free_port()}
    )
    async with running(outsider):
        stop = asyncio.Event()
        group = ModelGroup(member)
        task = asyncio.create_task(group.run(stop))
        try:
            async with asyncio.timeout(30):  # alone in the group, it holds both models
                while not any(s.ready for s in group.served.values()):
                    await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # several polls of the outsider's group
            by_model = {s.model: s for s in group.served.values()}
            assert sorted(by_model) == models
            assert by_model[models[0]].ready
            assert not by_model[models[1]].workers  # never started: the outsider has it
            assert not h.worker_ready(member.metrics_port)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
