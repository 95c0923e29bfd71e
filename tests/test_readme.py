"""README.md's quick start runs as written, and its claims match the code."""

from __future__ import annotations

import ast
import inspect
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import stalk
import stalk.sync
from stalk import certificates
from stalk.config import Config

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _run_example(heading: str, cwd: Path | None = None) -> str:
    """Run the first ``python`` block after README's ``heading``; what it printed."""
    block = re.search(re.escape(heading) + r"\n.*?```python\n(.*?)```", README, re.DOTALL)
    assert block is not None, heading
    result = subprocess.run(
        [sys.executable, "-c", block.group(1)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_quick_start_runs_as_written() -> None:
    first, second = _run_example("## Quick start").splitlines()
    assert first == "echo 1 2.5 text b'bytes'"
    fingerprint, pattern, hash_hex = second.split()
    assert fingerprint.startswith("SHA256:")
    assert pattern == "IK"
    assert len(bytes.fromhex(hash_hex)) == 32


def test_channels_example_runs_as_written() -> None:
    printed = _run_example("### Channels")
    lines = sorted(printed.splitlines(), key=lambda line: line.split()[-1])
    ids = [int(line.split()[0]) for line in lines]
    assert sorted(ids) == [1, 3, 5]
    assert [line.split(maxsplit=1)[1] for line in lines] == ["echo a", "echo b", "echo c"]


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no unix domain sockets")
def test_transports_example_runs_as_written() -> None:
    assert _run_example("### Transports").splitlines() == ["echo hello True", "False"]


def test_certificates_example_runs_as_written(tmp_path: Path) -> None:
    assert _run_example("### Authorities and certificates", tmp_path) == "db-1 ('db',)\n"
    assert (tmp_path / "db-1.cert").read_text().startswith("# stalk certificate\n")


def test_certificate_bounds_match_the_code() -> None:
    section = README[README.index("### Authorities and certificates") :]
    rows = dict(re.findall(r"^\| ([a-z ]+) \| ([^|]+) \|$", section, re.MULTILINE))
    assert f"{certificates.MAX_CERTIFICATE_SIZE:,} bytes" in rows["a certificate"]
    assert f"1 to {certificates.MAX_NAME_LEN} " in rows["name"]
    assert (
        f"at most {certificates.MAX_GROUPS}, each 1 to {certificates.MAX_GROUP_LEN} "
        in rows["groups"]
    )
    assert f"at most {certificates.MAX_EXTENSIONS}, " in rows["extensions"]
    assert f"{certificates.MAX_EXTENSION_VALUE} bytes" in rows["extensions"]
    assert f"{certificates.MAX_REVOKED:,} " in rows["revocation list"]


def test_two_commands_are_the_makefile_targets_ci_runs() -> None:
    assert "    make demo" in README
    assert "    make test" in README
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in ci.splitlines()[-1]


def test_config_table_matches_defaults() -> None:
    defaults = Config()
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", README, re.MULTILINE))
    assert rows["handshake_timeout"].strip() == f"{defaults.handshake_timeout:g} s"
    assert rows["write_timeout"].strip() == f"{defaults.write_timeout:g} s"
    assert rows["close_timeout"].strip() == f"{defaults.close_timeout:g} s"
    assert rows["max_message_size"].strip() == f"{defaults.max_message_size >> 20} MiB"
    assert rows["max_handshakes"].strip() == str(defaults.max_handshakes)
    assert rows["max_connections"].strip() == str(defaults.max_connections)
    assert rows["max_handshakes_per_address"].strip() == str(defaults.max_handshakes_per_address)
    assert defaults.idle_timeout is None
    assert rows["idle_timeout"].strip() == "off"
    assert rows["read_size"].strip() == f"{defaults.read_size >> 10} KiB"
    assert rows["send_buffer"].strip() == f"{defaults.send_buffer >> 10} KiB"
    assert defaults.max_channels is None
    assert rows["max_channels"].strip() == "off"
    assert rows["channel_window"].strip() == f"{defaults.channel_window >> 20} MiB"
    assert rows["connection_window"].strip() == f"{defaults.connection_window >> 20} MiB"
    assert rows["clock_skew"].strip() == f"{defaults.clock_skew:g} s"


def test_public_namespace_is_all_and_documented() -> None:
    public = {
        name
        for name, value in vars(stalk).items()
        if not name.startswith("_") and not isinstance(value, type(stalk))
    }
    assert public == set(stalk.__all__) - {"__version__"}
    # typing only
    aliases = {
        "Authorize",
        "ChannelHandler",
        "ConnectionHandler",
        "MessageHandler",
        "Received",
        "SpackValue",
    }
    for name in set(stalk.__all__) - aliases - {"__version__"}:
        assert getattr(stalk, name).__doc__, name


def public_callables() -> dict[str, Callable[..., object]]:
    """Every public function, class and method of ``stalk`` and ``stalk.sync``, by name."""
    found: dict[str, Callable[..., object]] = {}
    for module in (stalk, stalk.sync):
        for name in module.__all__:
            value = getattr(module, name)
            if inspect.isclass(value) and value.__module__.startswith("stalk"):
                for attribute, member in vars(value).items():
                    function = getattr(member, "__func__", member)  # classmethod, staticmethod
                    if inspect.isfunction(function) and (
                        attribute == "__init__" or attribute[0] != "_"
                    ):
                        found[f"{name}.{attribute}"] = function
            elif inspect.isfunction(value):
                found[f"{module.__name__}.{name}"] = value
    return found


def test_no_public_signature_shows_a_private_parameter() -> None:
    callables = public_callables()
    assert {
        "Connection.wrap",
        "StreamListener.serve",
        "stalk.connect",
        "SyncConnection.send",
    } <= set(callables)
    private = [
        f"{name}({parameter})"
        for name, function in callables.items()
        for parameter in inspect.signature(function).parameters
        if parameter.startswith("_")
    ]
    assert private == []


CORE = [
    "certificates",
    "certificates.authority",
    "certificates.certificate",
    "certificates.encoding",
    "certificates.revocation",
    "certificates.trust",
    "channel_ops",
    "channels",
    "demux",
    "errors",
    "events",
    "framing",
    "handshake",
    "identity",
    "mux",
    "_noise",
    "opening",
    "reassembly",
    "receiver",
    "record_loop",
    "records",
    "sealer",
    "sender",
    "session",
    "spack",
    "states",
    "summary",
    "weigh",
    "wire",
]
FORBIDDEN = {"anyio", "asyncio", "trio", "socket", "time", "selectors"}
#: What no core module may pull in, directly or not (``time`` is loaded at startup).
LOADED_FORBIDDEN = {"anyio", "asyncio", "trio", "sniffio", "socket", "selectors", "ssl"}
_LOADED = """
import importlib, sys, types
package = types.ModuleType("stalk")
package.__path__ = [sys.argv[1]]
sys.modules["stalk"] = package  # the core module alone, not the package's anyio layer
importlib.import_module("stalk." + sys.argv[2])
print(" ".join(sorted({name.split(".")[0] for name in sys.modules})))
"""


@pytest.mark.parametrize("module", CORE)
def test_core_modules_load_no_io_or_event_loop(module: str) -> None:
    """Imported alone in a fresh interpreter, a core module loads no anyio, no event loop
    and no socket module, however indirectly (checked in ``sys.modules``)."""
    loaded = subprocess.run(
        [sys.executable, "-c", _LOADED, str(ROOT / "src" / "stalk"), module],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "stalk" in loaded
    assert not set(loaded) & LOADED_FORBIDDEN, (module, set(loaded) & LOADED_FORBIDDEN)


def test_core_modules_import_no_io() -> None:
    """No core module imports I/O, an event loop or a clock itself."""
    for module in CORE:
        path = ROOT / "src" / "stalk" / module.replace(".", "/")
        source = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        tree = ast.parse(source.read_text(encoding="utf-8"))
        roots = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                roots.add(node.module.split(".")[0])
        assert not roots & FORBIDDEN, (module, roots & FORBIDDEN)


def test_every_public_error_is_documented_in_readme() -> None:
    errors = [
        name
        for name in stalk.__all__
        if isinstance(getattr(stalk, name), type) and issubclass(getattr(stalk, name), Exception)
    ]
    assert len(errors) > 10
    missing = [name for name in errors if f"`{name}`" not in README and name != "StalkError"]
    assert missing == []
    assert "`stalk.StalkError`" in README
