"""Evaluation text: offline corpora that ship with installed packages, a user's file, or a hub dataset.

The offline sources are real text, not synthetic filler:

* ``"wikipedia"`` (the default): the English Wikipedia dump excerpt that gensim ships as test data
  (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``, about 2016, CC BY-SA 3.0).
  Its pages are parsed with gensim's MediaWiki tools and reduced to prose paragraphs, one sample per
  article (Anarchism, Autism, Aristotle, Apollo 11, Albert Einstein, ...).
* ``"python"``: code, the sources of a fixed list of standard-library packages (:data:`PYTHON_PACKAGES`, one
  sample per file, in path order, tests left out): real code with names defined far above their use. It follows
  the installed Python, so its windows are comparable on one Python version.
* ``"pydoc"``: the Python language reference prose in the standard library's ``pydoc_data.topics``,
  one sample per topic, code blocks and heading underlines removed.
* ``text_file=``: any UTF-8 file, one sample per blank-line separated block.

Hub datasets (``"wikitext"`` and its configurations) are loaded with the ``datasets`` library when it is
installed and the Hugging Face Hub is reachable; otherwise :class:`DatasetUnavailableError` names the
offline alternatives.
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DATASETS",
    "HUB_DATASETS",
    "OFFLINE_DATASETS",
    "DatasetUnavailableError",
    "load_texts",
    "load_token_ids",
]

#: Datasets that need nothing but installed packages.
OFFLINE_DATASETS: tuple[str, ...] = ("wikipedia", "python", "pydoc")
#: The standard-library packages whose sources make the ``"python"`` text, in this order.
PYTHON_PACKAGES: tuple[str, ...] = (
    "json", "email", "http", "logging", "importlib", "asyncio", "concurrent", "xml", "urllib", "collections",
    "multiprocessing", "wsgiref", "tomllib", "unittest", "html", "ctypes", "zoneinfo", "re", "lib2to3", "tkinter",
    "dbm", "sqlite3",
)  # fmt: skip
#: Hub datasets: accepted name -> (``datasets`` repository id, configuration). The test split is used.
HUB_DATASETS: dict[str, tuple[str, str]] = {
    "wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
    "wikitext-2-raw-v1": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
    "wikitext-103-raw-v1": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
}
#: Every accepted ``dataset_name`` (matched case-insensitively).
DATASETS: tuple[str, ...] = OFFLINE_DATASETS + tuple(HUB_DATASETS)

_WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_OFFLINE_HINT = "use an offline source instead: dataset_name='wikipedia', 'python' or 'pydoc', or text_file=<path> (--text_file)"

# A prose paragraph of the cleaned dump has at least this many words and ends like a sentence; shorter
# lines are image captions, infobox residue and list fragments that filter_wiki leaves behind.
_MIN_PARAGRAPH_WORDS = 12
_SENTENCE_END = re.compile(r"[.!?:;\"')\]]$")
# Templates such as {{IPA}} or {{lang}} vanish and leave "()", "(; )" or "(;, Akhilleus, )" behind.
_EMPTY_PARENS = re.compile(r" ?\(\s*[,;:]?(?:\s*[,;:])*\s*\)")
_PAREN_OPEN_PUNCT = re.compile(r"\((?:\s*[,;:])+\s*")
_PAREN_CLOSE_PUNCT = re.compile(r"(?:\s*[,;:])+\s*\)")
_BOLD_ITALIC = re.compile(r"'{2,}")
_SPACES = re.compile(r"[ \t\u00a0]{2,}")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:])")
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")


class DatasetUnavailableError(OSError):
    """A hub dataset could not be loaded (``datasets`` missing or the hub unreachable)."""


def load_texts(
    dataset_name: str = "wikipedia",
    *,
    text_file: str | Path | None = None,
    num_samples: int | None = None,
    min_chars: int = 500,
) -> list[str]:
    """Load evaluation texts, one string per sample (article, topic or paragraph block).

    Args:
        dataset_name: One of :data:`DATASETS` (case-insensitive). Ignored when ``text_file`` is given.
        text_file: A UTF-8 text file to read instead of a named dataset; it is split into samples on
            blank lines.
        num_samples: Keep only the first ``num_samples`` samples (``None`` keeps all); must be > 0.
        min_chars: Drop samples shorter than this many characters (>= 0; 0 keeps every non-empty one).

    Returns:
        Samples in source order, each stripped and non-empty. The Wikipedia source gives 95 articles
        (2.5 M characters) and ``"pydoc"`` 61 topics with the default ``min_chars=500``.

    Raises:
        ValueError: an unknown ``dataset_name``, an invalid ``num_samples``/``min_chars``, an empty or
            non-UTF-8 ``text_file``, or no sample left after filtering.
        FileNotFoundError: ``text_file`` does not exist, or the gensim Wikipedia dump is not installed.
        DatasetUnavailableError: a hub dataset when ``datasets`` is missing or the hub is unreachable.
    """
    if num_samples is not None and (
        isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0
    ):
        raise ValueError(f"num_samples must be a positive int or None, got {num_samples!r}")
    if isinstance(min_chars, bool) or not isinstance(min_chars, int) or min_chars < 0:
        raise ValueError(f"min_chars must be an int >= 0, got {min_chars!r}")

    if text_file is not None:
        source = f"text_file={str(text_file)!r}"
        samples = _read_text_file(text_file)
    else:
        if not isinstance(dataset_name, str):
            raise ValueError(f"dataset_name must be one of {list(DATASETS)}, got {dataset_name!r}")
        name = dataset_name.strip().lower()
        source = f"dataset_name={dataset_name!r}"
        if name == "wikipedia":
            samples = list(_wikipedia_articles())
        elif name == "pydoc":
            from chunked_decomp.hf.calibration import pydoc_topics

            samples = pydoc_topics()
        elif name == "python":
            samples = list(_python_sources())
        elif name in HUB_DATASETS:
            samples = _hub_texts(name)
        else:
            raise ValueError(
                f"dataset_name must be one of {list(DATASETS)} (or pass text_file=), got {dataset_name!r}"
            )

    samples = [s for s in samples if len(s) >= max(min_chars, 1)]
    if not samples:
        raise ValueError(
            f"{source} gave no sample with at least min_chars={min_chars} characters; "
            "lower min_chars or use another source"
        )
    return samples[:num_samples] if num_samples is not None else samples


def load_token_ids(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], *, min_tokens: int | None = None
) -> torch.Tensor:
    """Tokenize ``texts`` into one long stream for perplexity-style evaluation.

    The texts are joined with ``"\\n\\n"`` and tokenized once, without special tokens (no BOS/EOS), so
    the stream is the same whichever transformers version built the tokenizer.

    Args:
        tokenizer: Any Hugging Face tokenizer.
        texts: Non-empty list of strings, e.g. from :func:`load_texts`.
        min_tokens: If given (> 0), the stream must hold at least this many tokens.

    Returns:
        ``(num_tokens,)`` ``torch.long`` tensor of token ids (8 bytes per token).

    Raises:
        ValueError: ``texts`` empty or not all strings, invalid ``min_tokens``, or fewer tokens than
            ``min_tokens``.
    """
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
        raise ValueError(f"texts must be a non-empty list of str, got {type(texts).__name__}")
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty list of str, got a list with non-str items")
    if min_tokens is not None and (
        isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens <= 0
    ):
        raise ValueError(f"min_tokens must be a positive int or None, got {min_tokens!r}")

    # verbose=False: the stream is meant to exceed model_max_length; it is windowed by the caller.
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    if min_tokens is not None and len(ids) < min_tokens:
        raise ValueError(
            f"min_tokens={min_tokens} not reached: the {len(texts)} texts give only {len(ids)} tokens; "
            "pass more texts (num_samples) or a smaller min_tokens"
        )
    return torch.tensor(ids, dtype=torch.long)


def _read_text_file(text_file: str | Path) -> list[str]:
    """Blank-line separated blocks of a UTF-8 file, stripped, empty ones dropped."""
    path = Path(text_file).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"text_file={str(text_file)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"text_file must be a readable UTF-8 text file, got a non-file {str(text_file)!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"text_file={str(text_file)!r} is not valid UTF-8 text: {err}") from err
    except OSError as err:
        raise ValueError(f"text_file={str(text_file)!r} cannot be read: {err}") from err
    blocks = [b.strip() for b in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))]
    blocks = [b for b in blocks if b]
    if not blocks:
        raise ValueError(f"text_file={str(text_file)!r} is empty (no non-blank text)")
    return blocks


def _wikipedia_dump_path() -> Path:
    """Location of the MediaWiki dump inside the installed gensim, found without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "dataset_name='wikipedia' needs gensim, which ships the Wikipedia dump: pip install gensim"
        )
    path = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / _WIKI_DUMP
    if not path.is_file():
        raise FileNotFoundError(f"dataset_name='wikipedia': gensim is installed but {path} is missing")
    return path


@functools.lru_cache(maxsize=1)
def _wikipedia_articles() -> tuple[str, ...]:
    """Clean prose of every article page in the dump (redirects and empty pages dropped).

    Cached for the process: importing gensim and parsing plus cleaning the 206 pages takes about
    3.5 s on an idle 2-core CPU (gensim import 1.5 s, XML and markup removal 2 s; 5-7 s when the
    cores are busy); a cached call takes microseconds.
    A tuple, so that callers cannot change the cached value.
    """
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(_wikipedia_dump_path(), "rb") as f:
        # Namespace "0" holds articles; talk, user and "Wikipedia:" pages come back with empty text.
        for _title, raw, _page_id in extract_pages(f, filter_namespaces=("0",)):
            if not raw or raw.lstrip()[:9].lower() == "#redirect":
                continue
            text = _clean_wiki_text(filter_wiki(raw))
            if text:
                articles.append(text)
    return tuple(articles)


def _clean_wiki_text(text: str) -> str:
    """Keep the prose paragraphs of ``filter_wiki`` output: no headings, lists, tables or captions."""
    lines = text.splitlines()
    # The lead paragraph names the subject in bold; what comes before it is image captions.
    lead = next((i for i, line in enumerate(lines) if "'''" in line), 0)
    paragraphs = []
    for line in lines[lead:]:
        line = line.strip()
        if not line or line[0] in "=*#:;|!{}<":
            continue
        line = _BOLD_ITALIC.sub("", line)
        line = _EMPTY_PARENS.sub("", line)
        line = _PAREN_OPEN_PUNCT.sub("(", line)
        line = _PAREN_CLOSE_PUNCT.sub(")", line)
        line = _SPACES.sub(" ", line)
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", line).strip()
        if len(line.split()) >= _MIN_PARAGRAPH_WORDS and _SENTENCE_END.search(line):
            paragraphs.append(line)
    return "\n\n".join(paragraphs)


@functools.lru_cache(maxsize=1)
def _python_sources() -> tuple[str, ...]:
    """The ``.py`` files of :data:`PYTHON_PACKAGES` in the running Python's standard library (tests left out)."""
    import os

    root = Path(os.__file__).resolve().parent
    samples = []
    for package in PYTHON_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if any(part.startswith("test") for part in path.relative_to(root).parts):
                continue
            samples.append(path.read_text(encoding="utf-8", errors="replace").strip())
    if not samples:
        raise FileNotFoundError(f"no standard-library sources under {root} for dataset_name='python'")
    return tuple(s for s in samples if s)


def _hub_texts(name: str) -> list[str]:
    """Articles of a wikitext test split, through ``datasets`` (needs the Hugging Face Hub)."""
    repo_id, config = HUB_DATASETS[name]
    try:
        import datasets
    except ImportError as err:
        raise DatasetUnavailableError(
            f"dataset_name={name!r} is loaded from the Hugging Face Hub with the `datasets` library, which "
            f"is not installed (pip install datasets); or {_OFFLINE_HINT}"
        ) from err
    try:
        rows = datasets.load_dataset(repo_id, config, split="test")["text"]
    except Exception as err:  # network, offline mode, missing repo: all mean "not available here"
        raise DatasetUnavailableError(
            f"dataset_name={name!r} ({repo_id}, {config}) could not be loaded from the Hugging Face Hub "
            f"({type(err).__name__}: {err}); the hub may be unreachable. Or {_OFFLINE_HINT}"
        ) from err
    return _split_wikitext(rows)


def _split_wikitext(rows: list[str]) -> list[str]:
    """Group wikitext lines into articles, each starting at a top-level `` = Title = `` line."""
    articles: list[list[str]] = []
    for row in rows:
        if _WIKITEXT_TITLE.match(row.rstrip("\n")) or not articles:
            articles.append([])
        articles[-1].append(row)
    # Rows keep their "\n"; a blank line of the source file is an empty row.
    return [text for text in ("".join(row or "\n" for row in lines).strip() for lines in articles) if text]
