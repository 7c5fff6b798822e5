"""Loading the model and the text for a command, with every failure turned into a :class:`UsageError` naming its
flag: a model that keeps no KV cache, an unknown device or dtype, a missing file, too little text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chunked_decomp.cli.args import UsageError
from chunked_decomp.cli.console import log
from chunked_decomp.cli.options import ModelOptions, TextOptions

__all__ = ["check_causal_lm_config", "load_model", "load_texts", "token_ids"]

# The flag a loading error names, by how its message starts; the first match wins, else --model_name.
_LOAD_ERROR_FLAGS = (
    (("device_map", "give either device"), "--device_map"),
    (("device",), "--device"),
    (("dtype",), "--dtype"),
)


def check_causal_lm_config(config: Any, name: str) -> None:
    """Refuse encoder-only and encoder-decoder models from their config, before loading weights.

    transformers will happily build ``BertLMHeadModel`` from a BERT checkpoint for ``AutoModelForCausalLM``; an
    encoder keeps no KV cache worth compressing, so it is refused by its config (model type and architectures).
    """
    from chunked_decomp.hf.models import ENCODER_ONLY_TYPES

    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise UsageError(
            "--model_name",
            f"{name!r} is an encoder-decoder model ({model_type}); ChunkedDecomp compresses the self-attention "
            "KV cache of decoder-only causal LMs (Llama, Qwen2, Mistral, GPT-2 families)",
        )
    architectures = list(getattr(config, "architectures", None) or [])
    causal = [
        a for a in architectures if a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
    ]
    encoder = model_type in ENCODER_ONLY_TYPES and not getattr(config, "is_decoder", False)
    if encoder or (architectures and not causal):
        what = ", ".join(architectures) or model_type
        raise UsageError(
            "--model_name",
            f"{name!r} is an encoder-only model ({what}): it attends to the whole input at once and keeps no "
            "key-value cache to compress. Use a decoder-only causal LM, e.g. the default smollm2-135m",
        )


def load_model(options: ModelOptions, show: bool) -> tuple[Any, Any, str]:
    """``(model, tokenizer, device)``: the checked model and its tokenizer, and the device its inputs go to
    (``options.device``, or under ``--device_map`` the device of the embeddings). ``show``: print a status line."""
    from chunked_decomp.hf.loading import load_model_and_tokenizer
    from chunked_decomp.hf.models import check_decoder_only

    local = Path(options.name).expanduser()
    if local.is_dir() and (local / "config.json").is_file():
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(local, local_files_only=True)
        except (OSError, ValueError) as err:
            raise UsageError("--model_name", f"cannot read {str(local / 'config.json')!r}: {err}") from err
        check_causal_lm_config(config, options.name)
    log(f"loading model {options.name} ...", show)
    try:
        model, tokenizer = load_model_and_tokenizer(
            options.name,
            dtype=options.dtype,
            device=options.device,
            cache_dir=options.cache_dir,
            device_map=options.device_map,
        )
    except (ValueError, OSError) as err:  # OSError covers FileNotFoundError and HubUnavailableError
        message = str(err).split("\n")[0]
        flag = next((f for starts, f in _LOAD_ERROR_FLAGS if message.startswith(starts)), "--model_name")
        raise UsageError(flag, message) from err
    check_causal_lm_config(model.config, options.name)
    device = options.device
    if options.device_map is not None:
        # Layers spread over devices: inputs enter where the embeddings are; accelerate's hooks move the rest.
        device = str(model.get_input_embeddings().weight.device)
    try:
        check_decoder_only(model)
    except ValueError as err:
        raise UsageError("--model_name", str(err)) from err
    return model, tokenizer, device


def load_texts(options: TextOptions) -> list[str]:
    """The texts of ``--text_file`` or ``--dataset_name`` (``--num_samples`` of them, default all)."""
    from chunked_decomp.evaluation.data import load_texts as load

    try:
        if options.text_file:  # a user's file: every non-blank paragraph counts, however short
            return load(text_file=options.text_file, num_samples=options.num_samples, min_chars=0)
        return load(options.dataset_name, num_samples=options.num_samples)
    except (ValueError, OSError) as err:
        raise UsageError(options.flag, str(err).split("\n")[0]) from err


def token_ids(tokenizer: Any, texts: list[str], need: int, options: TextOptions) -> Any:
    """The texts as one (num_tokens,) int64 tensor of token ids, refused when shorter than ``need``."""
    from chunked_decomp.evaluation.data import load_token_ids

    ids = load_token_ids(tokenizer, texts)
    if ids.numel() < need:
        raise UsageError(
            "--num_samples" if options.num_samples else options.flag,
            f"{options.source} gives {ids.numel()} tokens but this run needs {need} (context, continuation and "
            "windows from --start); use more text (--num_samples), a longer file or shorter windows",
        )
    return ids
