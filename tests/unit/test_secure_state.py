"""Leader and helper state round-trips through a checkpoint and replays deterministically.

A scripted run (shares and receipts in both orders, a client's second update deferred, two
buffers, one combined while the next fills) is cut at every step: the state is written with
the checkpoint encoder (:func:`fedbus.store.checkpoint.dumps`), read into fresh objects,
and the rest of the run must produce the same bytes (manifests, receipts, sums) and the same
totals as the run that was never interrupted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fedbus.secure import Helper, Leader
from fedbus.store.checkpoint import dumps, loads
from fedbus.wire import envelope as env
from tests.unit.secure_world import MODEL, World

Event = Callable[[Leader, Helper, list[Any]], None]


@pytest.fixture(scope="module")
def world() -> World:
    w = World(n=10, buffer_size=3, max_staleness=3)
    rng = np.random.default_rng(5)
    w.script = [  # type: ignore[attr-defined]
        w.encode(c, rng.normal(0, 0.1, 10), base_version=b)
        for c, b in [
            ("dev-1", 10),
            ("dev-2", 9),
            ("dev-3", 10),
            ("dev-1", 10),
            ("dev-4", 8),
            ("dev-5", 10),
            ("dev-6", 10),
        ]
    ]
    return w


def events(world: World) -> list[Event]:
    m = world.script  # type: ignore[attr-defined]
    lead_open, help_open = world.opener("leader"), world.opener("helper")

    def to_leader(i: int) -> Event:
        def run(leader: Leader, helper: Helper, out: list[Any]) -> None:
            step = leader.receive(lead_open.open(m[i]))
            out.extend(env.encode(x) for x in step.manifests)
            out.append(step.dropped)

        return run

    def to_helper(*idx: int) -> Event:
        def run(leader: Leader, helper: Helper, out: list[Any]) -> None:
            receipt = helper.receipt([helper.receive(help_open.open(m[i])) for i in idx])
            out.append(env.encode(receipt))
            step = leader.on_receipt(receipt)
            out.extend(env.encode(x) for x in step.manifests)

        return run

    def answer(version: int) -> Event:
        def run(leader: Leader, helper: Helper, out: list[Any]) -> None:
            manifest = next(x for x in leader.open_manifests() if x.version == version)
            total = helper.apply(manifest)
            out.append(env.encode(total))
            out.append(leader.combine(total).total.tolist())

        return run

    return [
        to_leader(0),
        to_helper(1, 2),
        to_leader(1),
        to_helper(0),
        to_leader(3),
        to_leader(2),
        to_helper(3, 4),
        to_leader(4),
        answer(10),
        to_leader(5),
        to_helper(5, 6),
        to_leader(6),
        answer(11),
    ]


def fresh(world: World) -> tuple[Leader, Helper]:
    leader = Leader(
        MODEL,
        world.config,
        world.n,
        version=10,
        identity_key=world.leader_id,
        helper_identity=world.helper_id_pub,
    )
    helper = Helper(
        MODEL,
        world.config,
        world.n,
        version=10,
        identity_key=world.helper_id,
        leader_identity=world.leader_id_pub,
    )
    return leader, helper


def run(world: World, cut: int | None) -> list[Any]:
    leader, helper = fresh(world)
    out: list[Any] = []
    for i, event in enumerate(events(world)):
        if i == cut:
            saved = loads(dumps({"leader": leader.state_dict(), "helper": helper.state_dict()}))
            leader, helper = fresh(world)
            leader.load_state_dict(saved["leader"])
            helper.load_state_dict(saved["helper"])
        event(leader, helper, out)
    return out


def test_the_script_does_what_it_says(world: World) -> None:
    out = run(world, None)
    totals = [x for x in out if isinstance(x, list) and x and isinstance(x[0], int)]
    manifests = [
        env.decode(x)
        for x in out
        if isinstance(x, bytes) and isinstance(env.decode(x), env.SecureManifestEnvelope)
    ]
    assert [x.version for x in manifests] == [10, 11]  # type: ignore[union-attr]
    assert [[r[0] for r in x.entries] for x in manifests] == [  # type: ignore[union-attr]
        ["dev-2", "dev-1", "dev-3"],
        ["dev-1", "dev-4", "dev-5"],
    ]
    assert len(totals) == 2


@pytest.mark.parametrize("cut", range(14))
def test_restart_at_any_step_replays_identically(world: World, cut: int) -> None:
    assert run(world, cut) == run(world, None)


def test_state_refuses_the_other_role(world: World) -> None:
    leader, helper = fresh(world)
    with pytest.raises(ValueError, match="not this helper"):
        helper.load_state_dict(leader.state_dict())
    with pytest.raises(ValueError, match="not this leader"):
        leader.load_state_dict(helper.state_dict())
