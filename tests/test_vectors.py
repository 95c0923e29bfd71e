"""Tests for stalk.vectors: published Noise test vectors through stalk's Noise layer.

The published files are not part of the repository: they are found in the folder named by
``$STALK_NOISE_VECTORS``, else in ``shared/vectors`` beside the repository (its SOURCES.md
says where each file comes from). Without them those tests are skipped; the runner's own
unit tests below use small vectors embedded here and always run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from stalk.vectors import (
    FileReport,
    Vector,
    VectorFileError,
    load_vectors,
    main,
    run_file,
    run_vector,
)

REQUIRED = ("Noise_XX_25519_AESGCM_SHA256", "Noise_IK_25519_AESGCM_SHA256")
#: Each published file, the number of vectors (or blocks) in it and how many of each
#: ``REQUIRED`` protocol it has, as counted in shared/vectors/SOURCES.md.
PUBLISHED = {
    "cacophony.txt": (944, 1),
    "snow.txt": (408, 1),
    "kv-format/flynn-noise.txt": (1920, 4),
}
CLOSING_LINE = re.compile(r"(\d+) passed, (\d+) failed, (\d+) skipped")
#: A deferred pattern (Noise §7.6) has a "1" in its name, e.g. Noise_I1K_..., Noise_XX1_...
DEFERRED = re.compile(r"Noise_[A-Z]*1")


def vectors_dir() -> Path:
    configured = os.environ.get("STALK_NOISE_VECTORS")
    if configured:
        return Path(configured)
    repo_root = Path(__file__).resolve().parent.parent
    return repo_root.parent / "shared" / "vectors"


@pytest.fixture(scope="module")
def reports() -> dict[str, FileReport]:
    """Every published file run once (about 2-3 s in all)."""
    folder = vectors_dir()
    missing = [name for name in PUBLISHED if not (folder / name).is_file()]
    if missing:
        pytest.skip(
            f"published Noise vectors not found in {folder} (missing {', '.join(missing)}): "
            "set STALK_NOISE_VECTORS to a folder holding cacophony.txt, snow.txt and "
            "kv-format/flynn-noise.txt (see shared/vectors/SOURCES.md for their sources)"
        )
    return {name: run_file(folder / name) for name in PUBLISHED}


# --- the published files ------------------------------------------------------------------


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_file_has_no_failures(reports: dict[str, FileReport], name: str) -> None:
    report = reports[name]
    failures = [f"{r.vector.label}: {r.reason}" for r in report.failures]
    assert failures == []
    assert len(report.results) == PUBLISHED[name][0]
    assert report.passed > 0


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_xx_and_ik_vectors_are_all_present_and_pass(
    reports: dict[str, FileReport], name: str
) -> None:
    expected_count = PUBLISHED[name][1]
    outcomes: dict[str, Counter[str]] = {protocol: Counter() for protocol in REQUIRED}
    for result in reports[name].results:
        if result.vector.protocol_name in outcomes:
            outcomes[result.vector.protocol_name][result.status] += 1
    for protocol in REQUIRED:
        assert outcomes[protocol] == Counter({"passed": expected_count}), protocol


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_skips_all_have_reasons_and_are_only_deferred_patterns(
    reports: dict[str, FileReport], name: str
) -> None:
    skipped = [r for r in reports[name].results if r.status == "skipped"]
    assert all(r.reason.strip() for r in skipped)
    # noiseprotocol 0.3.1 implements every fundamental pattern and psk modifier: nothing but
    # the deferred patterns may be skipped.
    assert [r.vector.label for r in skipped if not DEFERRED.match(r.vector.protocol_name)] == []


def test_published_files_through_main(
    reports: dict[str, FileReport], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = vectors_dir()
    assert main([str(folder / name) for name in PUBLISHED]) == 0
    lines = capsys.readouterr().out.splitlines()
    match = CLOSING_LINE.fullmatch(lines[-1])
    assert match is not None
    passed, failed, skipped = map(int, match.groups())
    assert failed == 0
    assert passed == sum(r.passed for r in reports.values())
    assert skipped == sum(r.skipped for r in reports.values())


# --- small embedded vectors ---------------------------------------------------------------

#: Noise_NN_25519_AESGCM_SHA256 from cacophony.txt (Unlicense), with its handshake hash;
#: written with the older field name "name" instead of "protocol_name".
CACOPHONY_NN: dict[str, Any] = {
    "name": "Noise_NN_25519_AESGCM_SHA256",
    "init_prologue": "4a6f686e2047616c74",
    "init_ephemeral": "893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a",
    "resp_prologue": "4a6f686e2047616c74",
    "resp_ephemeral": "bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b",
    "handshake_hash": "6301958d25cd7d1ffe6ad7d0ca2ad284b4e478d9acd9198f7750432d225043d0",
    "messages": [
        {
            "payload": "4c756477696720766f6e204d69736573",
            "ciphertext": "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c7944"
            "4c756477696720766f6e204d69736573",
        },
        {
            "payload": "4d757272617920526f746862617264",
            "ciphertext": "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843"
            "934ff73eebb9d930ebf62b8e4db8133ca936872b5551efd7c9989c646d8cf0",
        },
        {
            "payload": "462e20412e20486179656b",
            "ciphertext": "8d372b94914e80018211a344b8b1c5a2869492a0db46990c0362f3",
        },
        {
            "payload": "4361726c204d656e676572",
            "ciphertext": "e183b0abd55550f9955fb05476d988c6f27628d7bbde111c39ccbc",
        },
        {
            "payload": "4a65616e2d426170746973746520536179",
            "ciphertext": "167293a79ad6a647114c4f4eb55bdf713a0d44ae48765c07fc4e57743100825021",
        },
        {
            "payload": "457567656e2042f6686d20766f6e2042617765726b",
            "ciphertext": "2b67a18ae246069c51687bee89141041d9d35a821f852975d169a4f80f75c735"
            "807a1fd157",
        },
    ],
}

#: Noise_NNpsk0_25519_AESGCM_SHA256 from flynn/noise vectors.txt (BSD-3-Clause), written as
#: JSON with the older single "init_psk" / "resp_psk" strings.
FLYNN_NNPSK0: dict[str, Any] = {
    "protocol_name": "Noise_NNpsk0_25519_AESGCM_SHA256",
    "init_prologue": "",
    "resp_prologue": "",
    "init_ephemeral": "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f",
    "resp_ephemeral": "4142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f60",
    "init_psk": "2176657279736563726574766572797365637265747665727973656372657421",
    "resp_psk": "2176657279736563726574766572797365637265747665727973656372657421",
    "messages": [
        {
            "payload": "",
            "ciphertext": "358072d6365880d1aeea329adf9121383851ed21a28e3b75e965d0d2cd166254"
            "4833316e6c21d899aec6c5f0c6e85e13",
        },
        {
            "payload": "",
            "ciphertext": "64b101b1d0be5a8704bd078f9895001fc03e8e9f9522f188dd128d9846d48466"
            "d3ec4419885d86e6d7310fb1d2263afd",
        },
        {
            "payload": "79656c6c6f777375626d6172696e65",
            "ciphertext": "6a7b199c69a64cc2ea3c556cf17489fd2ae452d3f3c2a0871cebd327fc31c6",
        },
        {
            "payload": "7375626d6172696e6579656c6c6f77",
            "ciphertext": "e58d43e0c69d8c15df523586b2c58ca40cb0472b5b3775f1cca807fee28a71",
        },
    ],
}

#: Two blocks of flynn/noise vectors.txt (BSD-3-Clause): a one-way N block (whose remote
#: static key must be derived from resp_static, and whose last message uses cipher c2) and a
#: prologue-carrying NN block.
FLYNN_KV = """\
handshake=Noise_N_25519_AESGCM_SHA256
resp_static=0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20
gen_init_ephemeral=202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f
gen_resp_ephemeral=4142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f60
msg_0_payload=
msg_0_ciphertext=358072d6365880d1aeea329adf9121383851ed21a28e3b75e965d0d2cd16625471bcc2ec91fac5d2551b8a08e39ae5ab
msg_1_payload=79656c6c6f777375626d6172696e65
msg_1_ciphertext=374a734846ea8b76251255d17bae5b5313087ff42afa23ed42a5b5bf325804
msg_2_payload=7375626d6172696e6579656c6c6f77
msg_2_ciphertext=922037b8012e37d18adb6827375085f06f034888ea3f625dfc91d424334290

handshake=Noise_NN_25519_AESGCM_SHA256
gen_init_ephemeral=202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f
gen_resp_ephemeral=4142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f60
msg_0_payload=
msg_0_ciphertext=358072d6365880d1aeea329adf9121383851ed21a28e3b75e965d0d2cd166254
msg_1_payload=
msg_1_ciphertext=64b101b1d0be5a8704bd078f9895001fc03e8e9f9522f188dd128d9846d484667cc0d7b4540fd183ba30ecbd3f464f16
msg_2_payload=79656c6c6f777375626d6172696e65
msg_2_ciphertext=a0193b62b90fb3497108ec8adcc340a49ebb0a07f1654d71f7e38361f57ba5
msg_3_payload=7375626d6172696e6579656c6c6f77
msg_3_ciphertext=b2afdcb051e896fa5b6a23def5ee6bdd6032f1b39b2d22ef7da01857648389
"""


def write_json(tmp_path: Path, *vectors: dict[str, Any], name: str = "v.txt") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"vectors": list(vectors)}), encoding="utf-8")
    return path


def flip(hex_text: str, byte: int) -> str:
    data = bytearray.fromhex(hex_text)
    data[byte] ^= 0x01
    return data.hex()


def with_message(vector: dict[str, Any], index: int, **changes: str) -> dict[str, Any]:
    messages = [dict(m) for m in vector["messages"]]
    messages[index].update(changes)
    return {**vector, "messages": messages}


def only(path: Path) -> Vector:
    (vector,) = load_vectors(path)
    return vector


def test_old_field_names_are_read(tmp_path: Path) -> None:
    nn, psk = load_vectors(write_json(tmp_path, CACOPHONY_NN, FLYNN_NNPSK0))
    assert nn.protocol_name == "Noise_NN_25519_AESGCM_SHA256"
    assert nn.handshake_hash is not None
    assert psk.init_psks == psk.resp_psks == (bytes.fromhex(FLYNN_NNPSK0["init_psk"]),)
    for vector in (nn, psk):
        result = run_vector(vector)
        assert (result.status, result.reason) == ("passed", "")


def test_kv_format_is_detected_and_one_way_c2_message_is_noted(tmp_path: Path) -> None:
    path = tmp_path / "vectors.json"  # the name says JSON; the content decides
    path.write_text(FLYNN_KV, encoding="utf-8")
    one_way, nn = load_vectors(path)
    assert (one_way.source_format, one_way.location) == ("kv", "line 1")
    assert one_way.init_remote_static is not None  # derived from resp_static
    assert one_way.resp_remote_static is None
    result = run_vector(one_way)
    assert result.status == "passed"
    assert "message 2 not checked" in result.reason
    assert run_vector(nn).status == "passed"


@pytest.mark.parametrize(
    ("index", "where"),
    [(0, "handshake"), (1, "handshake"), (2, "transport"), (3, "transport"), (5, "transport")],
)
def test_corrupted_ciphertext_fails_with_the_first_mismatch(
    tmp_path: Path, index: int, where: str
) -> None:
    original = CACOPHONY_NN["messages"][index]["ciphertext"]
    corrupted = with_message(CACOPHONY_NN, index, ciphertext=flip(original, 5))
    result = run_vector(only(write_json(tmp_path, corrupted)))
    assert result.status == "failed"
    assert result.reason.startswith(f"message {index} (")
    assert where in result.reason
    assert "ciphertext mismatch at byte 5" in result.reason


def test_corrupted_payload_fails(tmp_path: Path) -> None:
    payload = CACOPHONY_NN["messages"][3]["payload"]
    corrupted = with_message(CACOPHONY_NN, 3, payload=flip(payload, 0))
    result = run_vector(only(write_json(tmp_path, corrupted)))
    assert result.status == "failed"
    assert result.reason.startswith("message 3 (responder->initiator, transport)")


def test_wrong_handshake_hash_fails(tmp_path: Path) -> None:
    wrong = {**CACOPHONY_NN, "handshake_hash": flip(CACOPHONY_NN["handshake_hash"], 31)}
    result = run_vector(only(write_json(tmp_path, wrong)))
    assert result.status == "failed"
    assert "handshake hash mismatch at byte 31" in result.reason


def test_wrong_prologue_fails(tmp_path: Path) -> None:
    wrong = {**CACOPHONY_NN, "resp_prologue": "00"}
    result = run_vector(only(write_json(tmp_path, wrong)))
    assert result.status == "failed"
    assert result.reason.startswith("message 1 (responder->initiator, handshake)")


@pytest.mark.parametrize(
    ("protocol_name", "reason"),
    [
        ("Noise_XX1_25519_AESGCM_SHA256", "deferred pattern"),
        ("Noise_I1K1_25519_AESGCM_SHA256", "deferred pattern"),
        ("Noise_XXfallback_25519_AESGCM_SHA256", "fallback"),
        ("NoisePSK_NN_25519_AESGCM_SHA256", "NoisePSK_"),
        ("Noise_NN_25519_AESGCM_MD5", "hash"),
        ("Noise_NN_25519", "not a protocol name"),
    ],
)
def test_unsupported_protocol_is_skipped_with_a_reason(
    tmp_path: Path, protocol_name: str, reason: str
) -> None:
    vector = {**CACOPHONY_NN, "name": protocol_name}
    result = run_vector(only(write_json(tmp_path, vector)))
    assert result.status == "skipped"
    assert reason in result.reason


def test_unsupported_json_flags_are_skipped_with_a_reason(tmp_path: Path) -> None:
    vector = {**CACOPHONY_NN, "fail": True}
    result = run_vector(only(write_json(tmp_path, vector)))
    assert (result.status, result.reason) == ("skipped", "expected-failure vector (fail: true)")


def test_vector_that_raises_is_a_failure_not_a_crash(tmp_path: Path) -> None:
    # A transport payload over the Noise limit makes TransportCipher.encrypt raise ValueError.
    oversized = with_message(CACOPHONY_NN, 2, payload="00" * 70_000)
    result = run_vector(only(write_json(tmp_path, oversized)))
    assert result.status == "failed"
    assert result.reason.startswith("unexpected ValueError:")


def test_missing_keys_skip_not_crash(tmp_path: Path) -> None:
    vector = {**CACOPHONY_NN, "name": "Noise_XX_25519_AESGCM_SHA256"}  # no static keys
    result = run_vector(only(write_json(tmp_path, vector)))
    assert result.status == "skipped"
    assert result.reason


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"vectors": [', "malformed JSON"),
        ('{"vectors": {}}', '"vectors" list'),
        ('{"vectors": [{"messages": []}]}', "protocol_name"),
        ('{"vectors": [{"name": "Noise_NN_25519_AESGCM_SHA256", "messages": [{}]}]}', "hex"),
        ("handshake=Noise_NN_25519_AESGCM_SHA256\nmsg_1_payload=\nmsg_1_ciphertext=00\n", "0, 1"),
        ("handshake=Noise_NN_25519_AESGCM_SHA256\nbogus=00\n", "unknown key"),
        ("handshake=Noise_NN_25519_AESGCM_SHA256\nprologue=zz\n", "hex"),
        ("just some text\n", "neither"),
        ("", "neither"),
    ],
)
def test_malformed_file_raises_vector_file_error(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(VectorFileError, match=re.escape(message)):
        load_vectors(path)


def test_main_reports_and_exits_zero_when_all_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unsupported = {**CACOPHONY_NN, "name": "Noise_XX1_25519_AESGCM_SHA256"}
    path = write_json(tmp_path, CACOPHONY_NN, FLYNN_NNPSK0, unsupported, unsupported)
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"{path}: 2 passed, 0 failed, 2 skipped"
    assert re.fullmatch(r"  skipped 2: deferred pattern .*", lines[1])
    assert lines[-1] == "2 passed, 0 failed, 2 skipped"
    assert "FAILED" not in out


def test_main_exits_one_on_a_failure_and_prints_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_json(tmp_path, CACOPHONY_NN, name="good.txt")
    corrupted = with_message(CACOPHONY_NN, 4, ciphertext="00" * 33)
    bad = write_json(tmp_path, CACOPHONY_NN, corrupted, name="bad.txt")
    assert main([str(good), str(bad)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("  FAILED vector 1 Noise_NN_") for line in lines)
    assert lines[-1] == "2 passed, 1 failed, 0 skipped"
    assert CLOSING_LINE.fullmatch(lines[-1])


def test_main_exits_one_on_malformed_json_and_says_so_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_json(tmp_path, CACOPHONY_NN, name="good.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text('{"vectors": [}', encoding="utf-8")
    missing = tmp_path / "missing.txt"
    assert main([str(bad), str(good), str(missing)]) == 1
    captured = capsys.readouterr()
    assert "malformed JSON" in captured.err
    assert str(bad) in captured.err
    assert f"cannot read {missing}" in captured.err
    assert captured.out.splitlines()[-1] == "1 passed, 0 failed, 0 skipped"


def test_main_verbose_lists_every_vector(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "kv.txt"
    path.write_text(FLYNN_KV, encoding="utf-8")
    assert main(["-v", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("  passed  line 1 Noise_N_25519_AESGCM_SHA256: message 2 not")
    assert lines[2] == "  passed  line 12 Noise_NN_25519_AESGCM_SHA256"
    assert lines[-1] == "2 passed, 0 failed, 0 skipped"


def test_python_dash_m_runs(tmp_path: Path) -> None:
    path = write_json(tmp_path, CACOPHONY_NN)
    completed = subprocess.run(
        [sys.executable, "-m", "stalk.vectors", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines()[-1] == "1 passed, 0 failed, 0 skipped"
