"""``fedbus keys``: device identities for signed updates.

The workflow, end to end: a device (or its provisioning station) runs ``fedbus keys new
dev-0042``, keeps ``dev-0042.key`` on the device and hands ``dev-0042.pub`` to the operator,
who runs ``fedbus keys register dev-0042.pub --keys-dir /etc/fedbus/keys``; the worker reads
that directory (``public_keys_dir``) and, with ``require_signatures``, refuses every update
not signed by a registered key. ``fedbus keys revoke dev-0042`` removes a device.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fedbus.cli.errors import UserError

app = typer.Typer(
    help="Device key pairs (Ed25519) for signed updates: create, register, revoke, list; "
    "a development CA for TLS listeners.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

KeysDirOpt = Annotated[
    Path,
    typer.Option(
        "--keys-dir",
        help="The worker's public key directory (its public_keys_dir setting).",
    ),
]


def _client(value: str) -> str:
    from fedbus.wire.errors import WireError
    from fedbus.wire.ids import validate_id

    try:
        return validate_id(value, "client id")
    except WireError as exc:
        raise UserError(exc.detail) from None


@app.command("new")
def new(
    client: Annotated[str, typer.Argument(help="The device's client id, e.g. dev-0042.")],
    out: Annotated[Path, typer.Option(help="Folder for <client>.key and <client>.pub.")] = Path(
        "."
    ),
) -> None:
    """Create a key pair: <client>.key stays on the device (mode 0600), <client>.pub goes to
    the operator.

    \b
    Example: fedbus keys new dev-0042 --out /var/lib/fedbus
    """
    from fedbus.store.keys import PRIVATE_KEY_SUFFIX, write_private_key, write_public_key
    from fedbus.wire.signing import generate_keypair

    client = _client(client)
    if not out.is_dir():
        raise UserError(f"--out {out} is not a directory")
    private, public = generate_keypair()
    try:
        key = write_private_key(out / f"{client}{PRIVATE_KEY_SUFFIX}", private)
    except FileExistsError as exc:
        raise UserError(f"{exc}; choose another --out or remove it first") from None
    pub = write_public_key(out, client, public)
    print(f"private key: {key}\npublic key:  {pub}")


@app.command("register")
def register(
    public_key: Annotated[Path, typer.Argument(help="A <client>.pub file from `keys new`.")],
    keys_dir: KeysDirOpt,
) -> None:
    """Trust a device: copy its public key into the worker's key directory.

    \b
    Example: fedbus keys register dev-0042.pub --keys-dir /etc/fedbus/keys
    """
    from fedbus.store.keys import PUBLIC_KEY_SUFFIX, parse_key_file, write_public_key

    if not public_key.is_file() or not public_key.name.endswith(PUBLIC_KEY_SUFFIX):
        raise UserError(f"{public_key} is not a <client>.pub file")
    client = _client(public_key.name[: -len(PUBLIC_KEY_SUFFIX)])
    try:
        raw = parse_key_file(public_key)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    keys_dir.mkdir(parents=True, exist_ok=True)
    path = write_public_key(keys_dir, client, raw)
    print(f"registered {client}: {path}")


@app.command("revoke")
def revoke(
    client: Annotated[str, typer.Argument(help="The client id to stop trusting.")],
    keys_dir: KeysDirOpt,
) -> None:
    """Stop trusting a device: remove its public key (workers re-read the directory).

    \b
    Example: fedbus keys revoke dev-0042 --keys-dir /etc/fedbus/keys
    """
    from fedbus.store.keys import PUBLIC_KEY_SUFFIX

    path = keys_dir / f"{_client(client)}{PUBLIC_KEY_SUFFIX}"
    if not path.is_file():
        raise UserError(f"{client} is not registered in {keys_dir}")
    path.unlink()
    print(f"revoked {client}")


@app.command("list")
def list_keys(keys_dir: KeysDirOpt) -> None:
    """The registered devices, one per line.

    \b
    Example: fedbus keys list --keys-dir /etc/fedbus/keys
    """
    from fedbus.store.keys import load_public_keys

    try:
        keys = load_public_keys(keys_dir)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    for client, raw in sorted(keys.items()):
        sys.stdout.write(f"{client} {raw.hex()}\n")


@app.command("ca")
def ca(
    out: Annotated[Path, typer.Option(help="Folder for ca.crt, ca.key, server.crt, server.key.")],
    host: Annotated[
        list[str] | None,
        typer.Option(help="A name the server certificate is valid for (repeat the option)."),
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="Validity of both certificates.")] = 365,
) -> None:
    """Create a development CA and a server certificate for a TLS broker listener.

    ca.crt goes to every client (worker: mqtt.tls_ca_certs or kafka.ssl_cafile); server.crt
    and server.key to the broker (Mosquitto's 8883 listener in compose/mosquitto). For
    development and staging only: production uses the organisation's CA.

    \b
    Example: fedbus keys ca --out compose/certs --host broker.example.org
    """
    from fedbus.store.tls import DEFAULT_HOSTS, create_dev_ca

    hosts = host or list(DEFAULT_HOSTS)
    try:
        made = create_dev_ca(out, hosts, days)
    except FileExistsError as exc:
        raise UserError(f"{exc}; choose another --out or remove it first") from None
    print(
        f"CA certificate:     {made.ca_cert}  (to every client)\n"
        f"CA key:             {made.ca_key}  (keep offline; signs server certificates)\n"
        f"server certificate: {made.server_cert}  (valid for {', '.join(hosts)})\n"
        f"server key:         {made.server_key}"
    )


@app.command("aggregator")
def aggregator(
    keys_dir: Annotated[
        Path, typer.Option("--keys-dir", help="This aggregator's secure.keys_dir.")
    ],
    peer: Annotated[
        Path | None,
        typer.Option(help="The other aggregator's identity.pub, copied in as peer.pub."),
    ] = None,
    rotate: Annotated[
        str | None, typer.Option(help="Add the next key epoch of this model (then restart).")
    ] = None,
) -> None:
    """Secure aggregation: create this aggregator's identity (identity.key, identity.pub)
    if it has none, install the peer's identity, and rotate a model's share key.

    \b
    Example: fedbus keys aggregator --keys-dir /etc/fedbus/leader --peer helper-identity.pub
    """
    from fedbus.store import secure_keys
    from fedbus.store.keys import parse_key_file
    from fedbus.wire.errors import WireError
    from fedbus.wire.ids import validate_id

    _, public = secure_keys.identity(keys_dir)
    print(f"identity: {keys_dir / secure_keys.IDENTITY_PUB} ({public.hex()})")
    if peer is not None:
        try:
            key = parse_key_file(peer)
        except (OSError, ValueError) as exc:
            raise UserError(f"--peer: {exc}") from None
        print(f"peer:     {secure_keys.write_peer(keys_dir, key)}")
    if rotate is not None:
        try:
            model = validate_id(rotate, "model")
        except WireError as exc:
            raise UserError(f"--rotate: {exc.detail}") from None
        epoch = secure_keys.rotate(keys_dir, model)
        print(f"model {model}: epoch {epoch} added; restart the worker to announce it")
