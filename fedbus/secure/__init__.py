"""Secure aggregation: two non-colluding aggregators add additive shares modulo 2^32.

A device clips and quantises its delta, splits it into a leader share and a helper share
(the helper's is a 32-byte PRG seed), seals each to one aggregator with HPKE and publishes
one signed message (:mod:`.device`). Each aggregator opens only its own share
(:mod:`.opening`) and folds it with a public integer staleness weight (:mod:`.accumulator`);
the leader chooses the buffers (:mod:`.leader`), the helper checks and sums what each
manifest names (:mod:`.helper`), and the two share-sums of a buffer add up to its exact
weighted sum (:mod:`.sharing`), which no single aggregator could compute alone. Parameters
and the overflow budget: :mod:`.params`. Keys: :mod:`.keys`. Why this protocol, what it
assumes and what it cannot do: SECURITY.md.

Pure computation, no I/O; the whole package imports only numpy, msgpack and cryptography
(plus :mod:`fedbus.wire`), so the device SDK can use it without the worker's dependencies.
"""

from fedbus.secure.device import SecureUpdateEncoder
from fedbus.secure.helper import Helper, refusal_row
from fedbus.secure.keys import DeviceKeys, Keyring
from fedbus.secure.leader import CombinedBuffer, Leader, Step
from fedbus.secure.opening import OpenedShare, ShareOpener
from fedbus.secure.params import QuantParams, SecureConfig

__all__ = [
    "CombinedBuffer", "DeviceKeys", "Helper", "Keyring", "Leader", "OpenedShare",
    "QuantParams", "SecureConfig", "SecureUpdateEncoder", "ShareOpener", "Step", "refusal_row",
]  # fmt: skip
