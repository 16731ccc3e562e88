"""The helper aggregator: holds seeds, confirms them, and sums exactly what a manifest names.

The helper never decides anything; it checks. The leader chooses buffers, so a malicious
leader's only levers are the manifests, and each check below removes one way to isolate a
single device's update by differencing sums:

- **one answer per version**: a second, different manifest for an answered version is
  refused (two sums over sets differing by one update would reveal it); the same manifest
  again gets the same answer (redelivery after a crash) while that answer is among the
  last ``keep_answers``, and is refused after;
- **versions in order**, each answered once;
- **each update folded at most once, ever** (kept until it is too stale to fold anyway);
- **at least ``min_buffer`` updates, from distinct clients**, none with weight 0;
- **weights recomputed** from the signed base version and the manifest's version: a leader
  cannot weight all but one update by zero, and a configuration drift between the two
  aggregators is caught at the first buffer instead of silently skewing the model;
- only updates this helper **confirmed** in a receipt.

What it cannot stop: a leader that controls registered devices (Sybils) filling a buffer with
its own updates around one honest update. That takes device identities (signatures
required, registration) and, for a formal bound, DP noise (see SECURITY.md).
"""

from __future__ import annotations

from typing import Any

from fedbus.secure.accumulator import ShareSum
from fedbus.secure.opening import OpenedShare
from fedbus.secure.params import SecureConfig
from fedbus.secure.sharing import helper_share
from fedbus.wire.envelope import (
    SecureManifestEnvelope,
    SecureReceiptEnvelope,
    SecureSumEnvelope,
    manifest_digest,
)
from fedbus.wire.errors import Reason, WireError
from fedbus.wire.signing import sign_update, verify_signature

Key = tuple[str, str]


def _bad(detail: str) -> WireError:
    return WireError(Reason.BAD_MANIFEST, detail)


class Helper:
    """The helper's state for one model: seeds held, ids folded, the last answer."""

    def __init__(
        self,
        model: str,
        config: SecureConfig,
        n_params: int,
        *,
        version: int,
        identity_key: bytes,
        leader_identity: bytes,
        keep_answers: int = 4,
    ) -> None:
        if keep_answers < 1:
            raise ValueError("keep_answers must be at least 1")
        self.model = model
        self.config = config
        self.n_params = n_params
        self.version = version
        """The version the next manifest must name."""
        self._identity = identity_key
        self._leader = leader_identity
        self._held: dict[Key, tuple[int, bytes]] = {}
        self._folded: dict[Key, int] = {}
        self.keep_answers = keep_answers
        self._answers: dict[int, SecureSumEnvelope] = {}  # the last few, by version

    # -- updates ---------------------------------------------------------------------------
    def receive(self, opened: OpenedShare) -> list[Any]:
        """Hold an opened share; returns its receipt row ``[client, update_id, base, None]``.

        Raises ``WireError``: ``duplicate`` for an id held or already folded, ``stale`` for
        one no manifest from now on could include. The caller turns a refusal into a row
        with :func:`refusal_row` so the leader learns of it.
        """
        if opened.seed is None:
            raise ValueError("the helper opens seeds, not share vectors")
        key = opened.key
        if key in self._held or key in self._folded:
            raise WireError(Reason.DUPLICATE, f"{key[0]}/{key[1]} was already received")
        self._check_foldable(opened.base_version)
        self._held[key] = (opened.base_version, opened.seed)
        return [opened.client, opened.update_id, opened.base_version, None]

    def holds(self, key: Key) -> bool:
        """Confirmed and not yet folded: a repeat of it is confirmed again (a receipt lost
        with a crash), not refused."""
        return key in self._held

    def _check_foldable(self, base_version: int) -> None:
        if base_version + self.config.max_staleness < self.version:
            raise WireError(
                Reason.STALE,
                f"base version {base_version} is too stale for buffer {self.version} and later",
            )

    def receipt(self, rows: list[list[Any]]) -> SecureReceiptEnvelope:
        """One signed receipt for a batch of rows (accepted and refused)."""
        return sign_update(SecureReceiptEnvelope(model=self.model, entries=rows), self._identity)

    # -- manifests -------------------------------------------------------------------------
    def apply(self, manifest: SecureManifestEnvelope) -> SecureSumEnvelope:
        """Check a manifest and answer with this helper's signed share-sum of its buffer.

        Raises ``WireError(BAD_MANIFEST)`` (or ``bad_signature``) and changes nothing when
        any check fails.
        """
        verify_signature(manifest, self._leader, "leader's identity key")
        if manifest.model != self.model:
            raise _bad(f"manifest for model {manifest.model}, not {self.model}")
        digest = manifest_digest(manifest)
        if manifest.version < self.version:
            kept = self._answers.get(manifest.version)
            if kept is not None and kept.manifest == digest:
                return kept  # redelivered: the same answer
            raise _bad(f"version {manifest.version} was already answered")
        if manifest.version != self.version:
            raise _bad(f"manifest for version {manifest.version}; expected {self.version}")
        rows = self._checked_rows(manifest)
        total = ShareSum(self.n_params)
        for client, update_id, weight in rows:
            total.fold(client, update_id, helper_share(self._held[client, update_id][1],
                                                       self.n_params), weight)  # fmt: skip
        for client, update_id, _ in rows:
            base, _seed = self._held.pop((client, update_id))
            self._folded[client, update_id] = base
        answer = SecureSumEnvelope(
            model=self.model, version=manifest.version, manifest=digest, count=total.count,
            payload=total.payload(),
        )  # fmt: skip
        signed = sign_update(answer, self._identity)
        self._answers[manifest.version] = signed
        for old in [v for v in self._answers if v <= manifest.version - self.keep_answers]:
            del self._answers[old]
        self.version += 1
        self._prune()
        return signed

    def _checked_rows(self, manifest: SecureManifestEnvelope) -> list[tuple[str, str, int]]:
        rows = [(str(c), str(u), int(w)) for c, u, w in manifest.entries]
        cfg = self.config
        assert cfg.min_buffer is not None
        if not cfg.min_buffer <= len(rows) <= cfg.buffer_size:
            raise _bad(f"{len(rows)} updates; a buffer holds {cfg.min_buffer} to {cfg.buffer_size}")
        clients = [c for c, _, _ in rows]
        if len(set(clients)) != len(clients):
            raise _bad("a client appears twice in one buffer")
        for client, update_id, weight in rows:
            key = (client, update_id)
            if key in self._folded:
                raise _bad(f"{client}/{update_id} was folded into an earlier buffer")
            held = self._held.get(key)
            if held is None:
                raise _bad(f"{client}/{update_id} was never confirmed by this helper")
            try:
                expected = cfg.weight(manifest.version, held[0])
            except WireError as exc:
                raise _bad(f"{client}/{update_id}: {exc}") from None
            if weight != expected:
                raise _bad(f"{client}/{update_id} has weight {weight}; expected {expected}")
        return rows

    def _prune(self) -> None:
        """Forget ids no manifest can name any more; a replay of one is refused as stale."""
        floor = self.version - self.config.max_staleness
        self._held = {k: v for k, v in self._held.items() if v[0] >= floor}
        self._folded = {k: b for k, b in self._folded.items() if b >= floor}

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain types and bytes only. The seeds are this helper's shares: its checkpoints
        must be kept apart from the leader's, as its keys are."""
        return {
            "role": "helper",
            "model": self.model,
            "version": self.version,
            "held": [[c, u, b, s] for (c, u), (b, s) in self._held.items()],
            "folded": [[c, u, b] for (c, u), b in self._folded.items()],
            "answers": [
                {"version": a.version, "manifest": a.manifest, "count": a.count,
                 "payload": a.payload, "sig": a.signature}
                for a in self._answers.values()
            ],
        }  # fmt: skip

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("role") != "helper" or d.get("model") != self.model:
            raise ValueError(f"state is for {d.get('role')} of {d.get('model')}, not this helper")
        self.version = int(d["version"])
        self._held = {(str(c), str(u)): (int(b), bytes(s)) for c, u, b, s in d["held"]}
        self._folded = {(str(c), str(u)): int(b) for c, u, b in d["folded"]}
        self._answers = {}
        for a in d["answers"]:
            answer = SecureSumEnvelope(
                model=self.model, version=int(a["version"]), manifest=bytes(a["manifest"]),
                count=int(a["count"]), payload=bytes(a["payload"]), signature=bytes(a["sig"]),
            )  # fmt: skip
            self._answers[answer.version] = answer


def refusal_row(client: str, update_id: str, base_version: int, error: WireError) -> list[Any]:
    """The receipt row telling the leader this helper refused an update, and why."""
    return [client, update_id, base_version, error.reason.value]


__all__ = ["Helper", "refusal_row"]
