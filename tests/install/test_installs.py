"""What a newcomer and a device team do first, on a copy of this tree in fresh virtual
environments: the README's first command, and the device install (the base package alone).

These install from the package index (pip's cache makes reruns quick) and take minutes, so
they run once per suite; they are the only tests that check the packaging itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def copy_tree(dest: Path) -> Path:
    """The files a fresh clone of this tree would have (tracked and new, not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.split(b"\0")  # fmt: skip
    for name in filter(None, listed):
        src = ROOT / name.decode()
        if src.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    return dest


def clean_env(home: Path) -> dict[str, str]:
    """What a newcomer's shell has: the system PATH, a HOME, nothing of this session's."""
    keep = {k: os.environ[k] for k in ("LANG", "LC_ALL", "TMPDIR") if k in os.environ}
    cache = Path(os.environ.get("PIP_CACHE_DIR", Path.home() / ".cache" / "pip"))
    return {**keep, "HOME": str(home), "PATH": "/usr/bin:/bin", "PIP_CACHE_DIR": str(cache),
            "PIP_DISABLE_PIP_VERSION_CHECK": "1"}  # fmt: skip


def readme_first_command() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "the README's 'Two commands' section has no bash block"
    first = block.group(1).strip().splitlines()[0]
    return first.split("  #")[0].strip()


def test_readme_first_command_runs_the_demo(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path / "clone")
    command = readme_first_command()
    assert "fedbus demo" in command
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    done = subprocess.run(
        ["bash", "-c", command.replace("python3 ", f"{python} ", 1)],
        cwd=tree, env=clean_env(tmp_path / "home"), capture_output=True, text=True,
        timeout=840,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tree / "fedbus-demo" / "accuracy.png").stat().st_size > 10_000
    assert "broker:" in done.stdout  # it says which broker it chose


DEVICE_SCRIPT = textwrap.dedent(
    """
    import importlib.util, sys
    import numpy as np
    import fedbus
    from fedbus import CodecSpec, Layout, UpdateEncoder, generate_keypair, read_model
    from fedbus.wire import envelope as env
    from fedbus.wire.codecs import decode_dense, encode
    from fedbus.wire.signing import Verifier

    for heavy in ("numba", "aiokafka", "typer", "pydantic", "sklearn", "matplotlib"):
        assert importlib.util.find_spec(heavy) is None, heavy + " is in the device install"
    from fedbus.kernels import BACKEND
    assert BACKEND == "plain", BACKEND

    layout = Layout.from_wire([["w", [64, 10], "float32"], ["b", [10], "float32"]])
    private, public = generate_keypair()
    enc = UpdateEncoder("m", "dev-1", layout, "int8", private_key=private, seed=1)
    rng = np.random.default_rng(0)
    start, end = rng.normal(size=layout.n_params), rng.normal(size=layout.n_params)
    update = env.decode_update(env.encode(enc.build(3, start, end, 12)))
    Verifier({"dev-1": public}, required=True).verify(update)
    got = decode_dense(update.payload, CodecSpec.from_wire(update.codec), layout.n_params)
    want = end - start
    bound = np.repeat([abs(want[i:i + 256]).max() / 127 for i in range(0, want.size, 256)],
                      256)[:want.size]
    assert np.all(np.abs(got + enc.feedback.residual - want) < 1e-9)  # error feedback
    assert np.all(np.abs(got - want) <= bound + 1e-6)
    model = env.encode(env.ModelEnvelope(model="m", version=7, layout=layout.to_wire(),
        codec={"name": "fp32"}, payload=encode(end, CodecSpec("fp32")), created_at=0.0))
    gm = read_model(model)
    assert gm.version == 7 and np.allclose(gm.weights, end.astype(np.float32))

    # Secure aggregation's device side needs nothing beyond the base install either.
    from fedbus.secure import DeviceKeys, Keyring, SecureConfig, SecureUpdateEncoder, ShareOpener
    from fedbus.secure.prg import expand
    from fedbus.secure.sealing import generate_keypair as x25519_keypair
    cfg = SecureConfig(clip_norm=100.0, staleness=lambda tau: 1.0, max_staleness=5)
    rings = {r: Keyring(r, {0: x25519_keypair()[0]}) for r in ("leader", "helper")}
    ids = {r: generate_keypair() for r in rings}
    keys = DeviceKeys.from_messages(
        *(rings[r].key_message("m", cfg.quant, ids[r][0], 0.0) for r in ("leader", "helper")),
        leader_identity=ids["leader"][1], helper_identity=ids["helper"][1])
    sec = env.decode_secure_update(env.encode(
        SecureUpdateEncoder("dev-1", layout, keys, private_key=private).encode(want, 3, 12)))
    opened = {r: ShareOpener("m", rings[r], layout.fingerprint, layout.n_params, cfg.quant,
                             Verifier({"dev-1": public}, required=True)).open(sec)
              for r in rings}
    q = (opened["leader"].share + expand(opened["helper"].seed, layout.n_params)).view(np.int32)
    assert np.all(np.abs(q / 2.0**cfg.frac_bits - want) <= 2.0**-cfg.frac_bits)
    print("device ok")
    """
)


def test_device_install_has_no_worker_dependencies(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path / "clone")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    env = clean_env(tmp_path / "home")
    subprocess.run([py, "-m", "pip", "install", "-q", str(tree)], env=env, check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    run = subprocess.run([py, "-c", DEVICE_SCRIPT], env=env, capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)  # fmt: skip
    assert run.returncode == 0 and "device ok" in run.stdout, run.stderr
    cli = subprocess.run([env_dir / "bin" / "fedbus", "--version"], env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert cli.returncode == 2
    assert cli.stderr.strip().splitlines() == [
        "fedbus: error: the fedbus command needs the cli extra: pip install 'fedbus[cli]'"
    ]
