"""The edge client: get the global model, train, send a compressed signed delta, repeat.

Small on purpose (NumPy, msgpack and one broker client): it has to run on a
Raspberry-Pi-class device. The user supplies one callback::

    def train(weights: dict[str, np.ndarray], version: int) -> tuple[dict, int, dict]:
        ...  # returns (new weights, example count, metrics)

and the device turns ``new - start`` into an update: clipped, error-feedback compressed,
signed when a key is configured, spooled to disk, then published QoS 1 with retries and
exponential backoff. An update survives a broker outage and a device restart in the spool.
A device on a model in secure aggregation (``secure=SecureIdentities(...)``) reads both
aggregators' retained key messages, accepts them only when signed by the identities it was
provisioned with, and sends its delta quantised and split into two sealed shares, still one
message per job (:mod:`fedbus.secure.device`).

An update larger than the broker takes (:class:`~fedbus.transport.base.MessageTooLarge`,
known before sending on MQTT 5) is never retried: ``submit`` raises it, and the spool drops it.

The model: by default a device fetches the latest one when it starts a job (one reused
broker connection, one full model a job). With ``follow=True`` it also subscribes to the
diffs channel (``fedbus.downlink``: keyframes and compressed differences), so a job starts
from the newest version it reconstructed without a download; until its first keyframe, or
after it missed a difference, it fetches the latest full model as before.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedbus import log as fedlog
from fedbus.client.spool import Spool
from fedbus.client.updates import GlobalModel, UpdateEncoder, read_model
from fedbus.downlink import Reconstruction
from fedbus.transport import topics
from fedbus.transport.base import MessageTooLarge, Transport, TransportError
from fedbus.transport.retry import backoff
from fedbus.wire import envelope as env
from fedbus.wire.codecs import CodecSpec
from fedbus.wire.errors import Reason, WireError

KEY_REFRESH_S = 300.0
"""A secure device reads the aggregators' keys again this often (they rotate per model)."""


@dataclass(frozen=True)
class SecureIdentities:
    """The two aggregators' Ed25519 identity keys, pinned when the device is provisioned:
    a key message signed by anyone else is refused (whoever can write the key channel could
    otherwise substitute keys of its own and open both shares)."""

    leader: bytes
    helper: bytes


TrainFn = Callable[
    [dict[str, np.ndarray], int], tuple[Mapping[str, np.ndarray], int, Mapping[str, float] | None]
]


RESEND_AFTER_RECONNECT = 3
"""Updates a device sends again once its broker connection has been replaced.

Mosquitto acknowledges a QoS 1 PUBLISH before it has saved it: a broker killed right after a
PUBACK loses what it had just acknowledged (measured: the last one or two PUBACKs before a
SIGKILL, however tight its autosave). The worker takes an exact repeat as a redelivery
(acknowledged quietly, counted, never folded twice), so a resend costs bytes, never a double
count. Only the last few are kept: older ones had the broker's save interval to be stored.
"""


class Device:
    """One device identity on one model."""

    def __init__(
        self,
        transport: Transport,
        model: str,
        client: str,
        *,
        codec: CodecSpec | str = "int8",
        clip_norm: float | None = None,
        private_key: bytes | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        max_spool: int = 64,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        seed: int | None = None,
        follow: bool = False,
        secure: SecureIdentities | None = None,
    ) -> None:
        self.transport = transport
        self.model = model
        self.client = client
        self.codec = CodecSpec.parse(codec) if isinstance(codec, str) else codec
        self.clip_norm = clip_norm
        self.private_key = private_key
        self.spool = Spool(spool_dir, max_items=max_spool) if spool_dir is not None else None
        self.retry_initial, self.retry_max = retry_initial, retry_max
        self.seed = seed
        self._encoder: UpdateEncoder | None = None
        self.reconstruction = Reconstruction(model) if follow else None
        self._following: asyncio.Task[None] | None = None
        self.secure = secure
        self._secure_keys: tuple[float, Any] | None = None  # (read at, DeviceKeys)
        self.sent = 0
        self.resent = 0
        # (connection generation, message) of the last updates the broker acknowledged
        self._acked: collections.deque[tuple[int, bytes]] = collections.deque(
            maxlen=RESEND_AFTER_RECONNECT
        )
        self.log = fedlog.get("fedbus.device").bind(model=model, client=client)

    def encoder_for(self, gm: GlobalModel) -> UpdateEncoder:
        """The encoder keeps its error-feedback residual across rounds, per layout."""
        if self._encoder is None or self._encoder.layout != gm.layout:
            last = self._encoder.last_seq if self._encoder is not None else 0
            self._encoder = UpdateEncoder(
                self.model,
                self.client,
                gm.layout,
                self.codec,
                clip_norm=self.clip_norm,
                private_key=self.private_key,
                seed=self.seed,
            )
            # seq never goes back: not across a new layout, nor (with a spool) a reboot
            stored = self.spool.last_seq() if self.spool is not None else 0
            self._encoder.last_seq = max(last, stored)
        return self._encoder

    async def fetch_model(self, timeout: float = 10.0) -> GlobalModel | None:
        """The model to start a job from: the followed reconstruction when it is current,
        else the latest full model: ``None`` if none within ``timeout``, or when it is not a
        valid model message (logged with its reason: the device trains on nothing it cannot
        check, whoever published it)."""
        rec = self.reconstruction
        if rec is not None:
            self._follow()
            if rec.weights is not None and rec.layout is not None and not rec.behind:
                return GlobalModel(self.model, rec.version, rec.layout, rec.weights.copy())
        raw = await self.transport.latest_model(self.model, timeout=timeout)
        if raw is None:
            return None
        try:
            return read_model(raw)
        except WireError as exc:
            self.log.warning("model message refused", reason=exc.reason.value, detail=exc.detail)
            return None

    def _follow(self) -> None:
        if self._following is None or self._following.done():
            self._following = asyncio.create_task(self._follow_loop())

    async def _follow_loop(self) -> None:
        assert self.reconstruction is not None
        async for raw in self.transport.follow_model_diffs(self.model):
            try:
                self.reconstruction.offer(raw)
            except WireError as exc:  # a message this device cannot use: say so, keep going
                self.log.warning("model message refused", reason=exc.reason.value, error=str(exc))

    async def close(self) -> None:
        """Stop following the model channel (the transport stays the caller's)."""
        if self._following is not None:
            self._following.cancel()
            await asyncio.gather(self._following, return_exceptions=True)
            self._following = None

    async def secure_keys(self, *, refresh: bool = False, timeout: float = 10.0) -> Any:
        """Both aggregators' current keys (:class:`fedbus.secure.DeviceKeys`), checked
        against the pinned identities; read again every :data:`KEY_REFRESH_S`. Raises
        ``WireError`` when a key is missing or not signed by its aggregator."""
        from fedbus.secure import DeviceKeys

        assert self.secure is not None
        cached = self._secure_keys
        if cached is not None and not refresh and time.monotonic() - cached[0] < KEY_REFRESH_S:
            return cached[1]
        messages = []
        for role in ("leader", "helper"):
            raw = await self.transport.latest_retained(topics.mqtt_keys(self.model, role), timeout)
            if raw is None:
                raise WireError(Reason.WRONG_KEY_EPOCH, f"no {role} key announced for {self.model}")
            messages.append(env.decode(raw, expect="secure_key"))
        keys = DeviceKeys.from_messages(
            *messages,  # type: ignore[arg-type]
            leader_identity=self.secure.leader,
            helper_identity=self.secure.helper,
        )
        self._secure_keys = (time.monotonic(), keys)
        return keys

    async def submit(
        self,
        base: GlobalModel,
        new_weights: np.ndarray | Mapping[str, np.ndarray],
        num_examples: int,
        metrics: Mapping[str, float] | None = None,
    ) -> env.UpdateEnvelope | env.SecureUpdateEnvelope:
        """Encode the delta against ``base`` and send it (through the spool, if any)."""
        flat = (
            base.layout.flatten(new_weights)
            if isinstance(new_weights, Mapping)
            else np.asarray(new_weights, dtype=np.float64)
        )
        update: env.UpdateEnvelope | env.SecureUpdateEnvelope
        if self.secure is not None:
            from fedbus.secure import SecureUpdateEncoder

            encoder = SecureUpdateEncoder(
                self.client, base.layout, await self.secure_keys(), private_key=self.private_key
            )
            update = encoder.encode(flat - base.weights, base.version, num_examples)
        else:
            update = self.encoder_for(base).build(
                base.version, base.weights, flat, num_examples, dict(metrics) if metrics else None
            )
        raw = env.encode(update)
        if self.spool is None:
            await self._send_with_retry(raw)
        else:
            seq = getattr(update, "seq", None)
            if seq is not None:
                self.spool.record_seq(seq)
            self.spool.put(raw)
            await self.flush()
        return update

    async def _send_with_retry(self, raw: bytes, attempts: int | None = None) -> None:
        """Publish, backing off on any broker failure (``attempts``: give up after that
        many tries and raise the last failure; ``None``: keep trying)."""

        def note(exc: BaseException, delay: float) -> None:
            self.log.warning("publish failed; retrying", error=repr(exc)[:200], delay=delay)

        async for retry in backoff(
            initial=self.retry_initial,
            maximum=self.retry_max,
            attempts=attempts,
            # a message the broker will never take is not retried: it would loop forever
            retry_if=_retryable,
            on_retry=note,
        ):
            with retry:
                await self._resend_if_reconnected()
                await self.transport.publish_update(self.model, self.client, raw)
        self.sent += 1
        # The transport may have reconnected inside that publish: resend now, not next time.
        with contextlib.suppress(TransportError):  # still kept: the next send tries again
            await self._resend_if_reconnected()
        if self.secure is None:  # secure aggregators refuse repeats as duplicates: not kept
            self._acked.append((self.transport.connection_generation, raw))

    async def _resend_if_reconnected(self) -> None:
        """Send again what a replaced connection's broker acknowledged last (see
        :data:`RESEND_AFTER_RECONNECT`), before anything new."""
        generation = self.transport.connection_generation
        stale = [raw for g, raw in self._acked if g != generation]
        if not stale:
            return
        for raw in stale:
            await self.transport.publish_update(self.model, self.client, raw)
        self._acked = collections.deque(
            ((generation, raw) for _, raw in self._acked), maxlen=RESEND_AFTER_RECONNECT
        )
        self.resent += len(stale)
        self.log.info("resent after reconnect", updates=len(stale))

    async def flush(self, attempts: int | None = 1) -> int:
        """Send what the spool holds, oldest first; stop at the first failure (kept)."""
        if self.spool is None:
            return 0
        n = 0
        for path, raw in self.spool.pending():
            try:
                await self._send_with_retry(raw, attempts=attempts)
            except MessageTooLarge as exc:  # can never be sent: drop it, keep the rest moving
                self.log.error("update dropped from the spool", error=str(exc)[:300])
                self.spool.done(path)
                continue
            except Exception:
                return n
            self.spool.done(path)
            n += 1
        return n

    async def run(
        self, train: TrainFn, *, rounds: int | None = None, stop: asyncio.Event | None = None
    ) -> int:
        """Train on the latest model, send, repeat; returns the number of rounds done."""
        done = 0
        while (rounds is None or done < rounds) and not (stop and stop.is_set()):
            await self.flush(attempts=None if self.spool and len(self.spool) else 1)
            gm = await self.fetch_model()
            if gm is None:
                await asyncio.sleep(self.retry_initial)
                continue
            new, n, metrics = train(gm.tensors(), gm.version)
            await self.submit(gm, new, n, metrics)
            done += 1
        return done


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, Exception) and not isinstance(exc, MessageTooLarge)


def spool_path(root: str | os.PathLike[str], model: str, client: str) -> Path:
    return Path(root) / model / client
