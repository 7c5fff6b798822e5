"""Reliability and security (issue 5, items 4-6; docs/reliability.md).

* Nothing lost: a ``compress`` sweep really killed with SIGKILL — once between cells, once in the middle of
  writing a cell — and started again finishes with every cell once, reuses (does not recompute) the cells
  finished before the kills, and never leaves a corrupt result file. The same runs show that the command line
  writes nothing outside ``--output_dir``.
* Long runs: a soak-lite decode of 300+ steps whose stored bytes stay under a linear envelope, whose chunk count
  is exact at every step and whose Python object count is fully explained by the chunks; seeded sampling through
  the compressed cache repeats exactly.
* Safety: the source tree is scanned (AST) for pickle, unsafe ``torch.load``/``yaml.load``, ``eval``/``exec`` and
  ``trust_remote_code=True``; the loader passes ``trust_remote_code=False`` unless asked; malformed model names
  are refused before anything is loaded.
* Command-line rows of docs/bad_inputs.md that tests/test_cli.py does not already cover (a permission-denied
  output directory, a broken presets file, a path-traversal model name).
"""

from __future__ import annotations

import ast
import gc
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from chunked_decomp import ChunkedDecomp
from chunked_decomp.cli import main
from chunked_decomp.hf.models import cache_kwarg_name, output_cache
from tests.helpers.models import make_bpe_tokenizer, make_tiny_model, random_ids

REPO = Path(__file__).resolve().parents[2]
WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "dogs",
    "ran",
    "over",
    "hills",
    "near",
    "old",
    "towns",
]


# ---- a tiny saved model, and a sandbox for child processes --------------------------------------------------


def _save_tiny_model(folder: Path, text: str) -> None:
    tokenizer = make_bpe_tokenizer(text)
    make_tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reliability_assets")
    rng = random.Random(0)
    text = "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(60)) + "." for _ in range(40))
    (root / "text.txt").write_text(text, encoding="utf-8")
    _save_tiny_model(root / "llama", text)
    return {"root": root, "model": root / "llama", "text": root / "text.txt"}


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """relative path → (size, mtime_ns) of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _sandbox(root: Path) -> tuple[dict[str, str], dict[str, Path]]:
    """Environment for a child: HOME, TMPDIR, MPLCONFIGDIR and the model cache in fresh folders, one thread."""
    dirs = {name: root / name for name in ("home", "cwd", "tmp", "mplconfig", "model_cache", "logs")}
    for d in dirs.values():
        d.mkdir(parents=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("XDG_", "HF_", "TRANSFORMERS_", "WANDB_")) and k != "OMP_NUM_THREADS"
    }
    env.update(
        HOME=str(dirs["home"]),
        TMPDIR=str(dirs["tmp"]),
        MPLCONFIGDIR=str(dirs["mplconfig"]),
        CHUNKED_DECOMP_CACHE=str(dirs["model_cache"]),
        OMP_NUM_THREADS="1",
        PYTHONDONTWRITEBYTECODE="1",  # Python's own .pyc files are not the command's output
    )
    return env, dirs


# ---- kill and resume -----------------------------------------------------------------------------------------

RATIOS = ["0.5", "0.25", "0.125"]
POSIX_ONLY = pytest.mark.skipif(os.name != "posix", reason="SIGKILL and the sandbox paths are POSIX")
CHUNKS = ["8", "16"]

# The child of the second kill: the real command line, except that the first cell file it is about to move into
# place hangs between "written and fsync-ed to the temporary file" and os.replace, so the kill lands mid-write.
HANG_CHILD = """
import os, sys, time
import torch
torch.set_num_threads(1)
flag, argv = sys.argv[1], sys.argv[2:]
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.sep + "cells" + os.sep in os.fspath(dst) and os.fspath(dst).endswith(".json"):
        open(flag, "w").close()
        time.sleep(600)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
from chunked_decomp.cli import main
sys.exit(main(argv))
"""


def _argv(assets: dict[str, Path], ratios: list[str]) -> list[str]:
    return [
        "compress",
        "--model_name",
        str(assets["model"]),
        "--text_file",
        str(assets["text"]),
        "--test_mode",  # also --threads 1
        "--compression_ratio",
        *ratios,
        "--chunk_size",
        *CHUNKS,
        "--context_length",
        "32",
        "--continuation_length",
        "8",
        "--decode_tokens",
        "2",
        "--generation_tokens",
        "0",
        "--output_dir",
        "out",  # relative: it lands in the child's working directory
        "--no_progress",
    ]


def _cell_files(out: Path) -> list[Path]:
    folder = out / "cells" / "compress"
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def _wait_until(proc: subprocess.Popen, condition, timeout: float = 180.0) -> bool:
    """Poll every 10 ms until ``condition()`` or the child exits; True if the condition came first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"child did not reach the kill point in {timeout} s")


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def _check_no_corrupt_file(out: Path) -> list[str]:
    """Every result file parses; anything else is a hidden temporary file. Returns the temporary files."""
    import pandas as pd

    temporaries = []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            temporaries.append(str(path.relative_to(out)))
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".csv":
            assert len(pd.read_csv(path)) >= 1, path
        elif path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        else:
            raise AssertionError(f"unexpected file {path.relative_to(out)}")
    return temporaries


def _start(cmd: list[str], dirs: dict[str, Path], env: dict[str, str], log: str) -> subprocess.Popen:
    with open(dirs["logs"] / log, "w") as fh:
        return subprocess.Popen(cmd, cwd=dirs["cwd"], env=env, stdout=fh, stderr=subprocess.STDOUT)


def _kill_and_resume(assets: dict[str, Path], root: Path, ratios: list[str]) -> dict | None:
    """The three runs of `killed_sweep`; ``None`` when the first run finished before it could be killed."""
    env, dirs = _sandbox(root)
    argv = _argv(assets, ratios)
    out = dirs["cwd"] / "out"
    assets_before = _tree(assets["root"])
    command = [sys.executable, "-m", "chunked_decomp.cli", *argv]

    first = _start(command, dirs, env, "run1.log")
    if not _wait_until(first, lambda: len(_cell_files(out)) >= 1) or first.poll() is not None:
        return None
    _kill(first)
    after_first_kill = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in _cell_files(out)}
    if len(after_first_kill) >= len(ratios) * len(CHUNKS):
        return None  # every cell was done: nothing left to interrupt
    temporaries_1 = _check_no_corrupt_file(out)

    flag = dirs["logs"] / "hanging-in-write"
    second = _start([sys.executable, "-c", HANG_CHILD, str(flag), *argv], dirs, env, "run2.log")
    assert _wait_until(second, flag.exists), (dirs["logs"] / "run2.log").read_text()[-3000:]
    _kill(second)
    after_second_kill = {p.name for p in _cell_files(out)}
    temporaries_2 = _check_no_corrupt_file(out)

    third = subprocess.run(command, cwd=dirs["cwd"], env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    return {
        "ratios": ratios,
        "out": out,
        "dirs": dirs,
        "after_first_kill": after_first_kill,
        "temporaries_1": temporaries_1,
        "after_second_kill": after_second_kill,
        "temporaries_2": temporaries_2,
        "stdout": third.stdout,
        "assets_before": assets_before,
    }


@pytest.fixture(scope="module")
def killed_sweep(assets, tmp_path_factory) -> dict:
    """A sweep of (ratio × chunk) cells killed twice with SIGKILL, then run to completion, in a sandbox.

    1. ``python -m chunked_decomp.cli compress ...`` killed as soon as its first cell file exists;
    2. the same command killed while it writes the next cell (after the fsync, before the rename);
    3. the command again, to the end.

    A first run that finishes before the kill lands is retried with more cells.
    """
    for attempt in range(3):
        ratios = RATIOS if attempt == 0 else [str(0.5 / 2**i) for i in range(3 * (attempt + 1))]
        record = _kill_and_resume(assets, tmp_path_factory.mktemp(f"killed_sweep{attempt}"), ratios)
        if record is not None:
            return record
    pytest.fail("the sweep finished every cell before it could be killed, three times")


@POSIX_ONLY
def test_sweep_killed_twice_resumes_with_every_cell_once(killed_sweep):
    import pandas as pd

    out, ratios = killed_sweep["out"], killed_sweep["ratios"]
    grid = {(float(r), int(c)) for r in ratios for c in CHUNKS}
    done_before = killed_sweep["after_first_kill"]
    assert 1 <= len(done_before) < len(grid)

    # The kill between cells left only whole files; the kill inside a write left the cell absent, its bytes in a
    # hidden temporary file that no reader takes for a result.
    assert killed_sweep["after_second_kill"] == set(done_before)
    new_temporaries = set(killed_sweep["temporaries_2"]) - set(killed_sweep["temporaries_1"])
    assert len(new_temporaries) == 1 and new_temporaries.pop().startswith("cells/compress/.")

    # After the rerun: every cell exactly once, the finished ones reused byte for byte and not rewritten.
    cells = _cell_files(out)
    assert len(cells) == len(grid)
    stored = set()
    for path in cells:
        entry = json.loads(path.read_text(encoding="utf-8"))
        stored.add((entry["params"]["config"]["compression_ratio"], entry["params"]["config"]["chunk_size"]))
        if path.name in done_before:
            mtime_ns, data = done_before[path.name]
            assert path.stat().st_mtime_ns == mtime_ns and path.read_bytes() == data
    assert stored == grid
    frame = pd.read_csv(out / "compress_results.csv")
    assert len(frame) == len(grid)
    assert set(zip(frame["compression_ratio"], frame["chunk_size"])) == grid
    assert int(frame["cached"].sum()) == len(done_before)
    rows = json.loads((out / "compress_results.json").read_text(encoding="utf-8"))
    assert len(rows) == len(grid) and all(r["per_layer"] for r in rows)
    assert f"({len(done_before)} of {len(grid)} settings reused" in killed_sweep["stdout"]
    _check_no_corrupt_file(out)


@POSIX_ONLY
def test_command_line_writes_nothing_outside_the_output_dir(killed_sweep, assets):
    dirs = killed_sweep["dirs"]
    assert [p.name for p in dirs["cwd"].iterdir()] == ["out"]
    # The fused CPU kernel of the factored attention (the default decoding on a CPU) is compiled once into
    # torch's extension cache, as torch builds every extension; nothing else is written under the home folder.
    kernel_cache = ".cache/torch_extensions/"
    home = {p for p in _tree(dirs["home"]) if not (p.startswith(kernel_cache) and "chunked_decomp" in p)}
    assert home == set() and _tree(dirs["tmp"]) == {}
    assert _tree(dirs["model_cache"]) == {}  # a local model needs no converted copy
    assert _tree(assets["root"]) == killed_sweep["assets_before"]  # model folder and text untouched
    # matplotlib's font cache is the only thing kept elsewhere, in the MPLCONFIGDIR it was given.
    assert all(name.startswith("fontlist") for name in _tree(dirs["mplconfig"]))


def test_result_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through mkstemp (mode 0o600); the result must get what open() gives: 0o666 & ~umask."""
    from chunked_decomp.io import ResultStore, atomic_write_json

    old = os.umask(0o027)
    try:
        path = atomic_write_json(tmp_path / "r.json", {"a": 1})
        cell = ResultStore(tmp_path / "cells").put({"x": 1}, {"y": 2})
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o640 and (cell.stat().st_mode & 0o777) == 0o640


# ---- long runs -------------------------------------------------------------------------------------------------


def _decode(model, cache, token: torch.Tensor, steps: int, each_step) -> None:
    name = cache_kwarg_name(model)
    for step in range(1, steps + 1):
        out = model(token, **{name: cache}, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        del out
        each_step(step)


@torch.no_grad()
def test_soak_lite_bytes_linear_chunks_exact_no_object_growth():
    """320 decoding steps: stored bytes under a linear envelope, chunk count exact, every new object in a chunk."""
    chunk, residual, sinks, rho = 32, 16, 4, 0.25
    model = make_tiny_model("llama")
    cd = ChunkedDecomp(
        chunk_size=chunk,
        residual_length=residual,
        num_sink_tokens=sinks,
        compression_ratio=rho,
        reference_dtype="float16",
        quant_group_size=16,
    )
    cd.compress_model(model)
    warm = output_cache(model(random_ids(8, seed=1), use_cache=True))  # fill lazy caches before counting
    _decode(model, warm, random_ids(1, seed=2), chunk + residual, lambda step: None)
    warm = cd.last_cache = None
    gc.collect()
    gc.freeze()  # count only objects made from here on (and keep the collections fast)
    try:
        objects_before = len(gc.get_objects())
        out = model(random_ids(16), use_cache=True)
        state = {"cache": output_cache(out)}
        token = out.logits[:, -1:].argmax(-1)
        out = None
        cache = state["cache"]
        layer, n_layers = cache.layers[0], len(cache.layers)
        elem, token_elems = 4, 2 * 2 * 16  # float32; keys + values of 2 KV heads x 16 per layer
        gc.collect()
        objects_start, chunks_start = len(gc.get_objects()), len(layer.chunks)

        def each_step(step: int) -> None:
            seq = cache.get_seq_length()
            assert len(layer.chunks) == max(seq - sinks - residual, 0) // chunk, step
            assert layer.tail_length <= residual + chunk - 1
            stats = cache.memory_stats()
            aged_ref = sum(s.aged_reference_bytes for s in stats.per_layer)
            sink_bytes = n_layers * layer.sink_length * token_elems * elem
            # The budget governs sinks + chunks; only the exact sinks may exceed it, and their debt is repaid.
            assert sum(s.aged_stored_bytes for s in stats.per_layer) <= rho * aged_ref + sink_bytes
            # Linear envelope: the budget's bytes per aged (16-bit) token, plus the exact sinks and window.
            envelope = rho * 2 * token_elems * n_layers * (seq - layer.tail_length) + sink_bytes
            assert stats.stored_bytes <= envelope + n_layers * (residual + chunk - 1) * token_elems * elem

        steps = 320
        _decode(model, cache, token, steps, each_step)
        assert cache.get_seq_length() == 16 + steps
        chunks_end = len(layer.chunks)
        assert chunks_end == (16 + steps - sinks - residual) // chunk
        gc.collect()
        objects_end = len(gc.get_objects())
        for each in cache.layers:
            each.chunks.clear()
            each.store._packed = None  # the chunks' factors packed for the batched rebuild
        gc.collect()
        per_chunk = (objects_end - len(gc.get_objects())) / (chunks_end * n_layers)
        explained = per_chunk * (chunks_end - chunks_start) * n_layers
        assert objects_end - objects_start <= explained + 50, (objects_end - objects_start, explained)
        cache = layer = token = cd.last_cache = state = None
        gc.collect()
        assert len(gc.get_objects()) <= objects_before + 50  # nothing left behind once the cache is gone
    finally:
        gc.unfreeze()


def test_seeded_sampling_through_the_compressed_cache_repeats():
    model = make_tiny_model("llama")
    cd = ChunkedDecomp(chunk_size=8, residual_length=8, num_sink_tokens=2, quant_group_size=8)
    cd.compress_model(model)
    prompt = random_ids(16)
    kwargs = dict(
        attention_mask=torch.ones_like(prompt),
        do_sample=True,
        top_k=0,
        max_new_tokens=40,
        min_new_tokens=40,
        pad_token_id=0,
    )

    def sample(seed: int) -> list[int]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tokens = model.generate(prompt, **kwargs)[0, prompt.shape[1] :].tolist()
        assert len(cd.last_cache.layers[0].chunks) >= 4  # the compressed path really ran
        return tokens

    first, again, other = sample(1234), sample(1234), sample(4321)
    assert first == again
    assert sum(a != b for a, b in zip(first, other)) > 20  # 40 draws from ~128 tokens: near all differ


# ---- safety: a scan of the source tree -------------------------------------------------------------------------

_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
_UNSAFE_YAML = {"load", "load_all", "full_load", "full_load_all", "unsafe_load", "unsafe_load_all"}


def _name(node: ast.AST) -> str:
    """Dotted name of a Name/Attribute chain ('torch.load'), or ''."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    return ""


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str) -> list[str]:
    """Security rule violations in Python ``source``, as 'line N: what' strings."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                if n and n.split(".")[0] in _PICKLE_MODULES:
                    problems.append(f"line {line}: imports {n} (pickle-based deserialisation)")
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "yaml"):
                for a in node.names:
                    if a.name == "load" or (node.module == "yaml" and a.name in _UNSAFE_YAML):
                        problems.append(f"line {line}: from {node.module} import {a.name}")
        elif isinstance(node, ast.Call):
            func = _name(node.func)
            keywords = {k.arg: k.value for k in node.keywords if k.arg}
            if func in ("eval", "exec", "builtins.eval", "builtins.exec"):
                problems.append(f"line {line}: {func}()")
            loads_torch = func.endswith("torch.load") or func == "torch.serialization.load"
            if loads_torch and not _is_true(keywords.get("weights_only")):
                problems.append(f"line {line}: {func}() without weights_only=True")
            if func.startswith("yaml.") and func.split(".", 1)[1] in _UNSAFE_YAML:
                problems.append(f"line {line}: {func}() (use yaml.safe_load)")
            if func.split(".")[-1] in ("read_pickle", "to_pickle"):
                problems.append(f"line {line}: {func}()")
            for key in ("trust_remote_code", "allow_pickle", "shell"):
                if _is_true(keywords.get(key)):
                    problems.append(f"line {line}: {func}({key}=True)")
            weights_only = keywords.get("weights_only")
            if isinstance(weights_only, ast.Constant) and weights_only.value is False:
                problems.append(f"line {line}: {func}(weights_only=False)")
            if func == "os.system":
                problems.append(f"line {line}: os.system()")
            trust_flag = any(isinstance(a, ast.Constant) and "trust" in str(a.value) for a in node.args)
            if func.endswith("add_argument") and trust_flag and _is_true(keywords.get("default")):
                problems.append(f"line {line}: a trust_remote_code flag that defaults to on")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            for arg, default in pairs:
                if arg.arg == "trust_remote_code" and _is_true(default):
                    problems.append(f"line {line}: {node.name}(trust_remote_code=True) as a default")
    return problems


def _python_sources() -> list[tuple[str, str]]:
    """(name, source) of every Python file and notebook code cell under src/, scripts/, benchmarks/, notebooks/."""
    sources = []
    for top in ("src", "scripts", "benchmarks", "notebooks"):
        for path in sorted((REPO / top).rglob("*.py")):
            sources.append((str(path.relative_to(REPO)), path.read_text(encoding="utf-8")))
        for path in sorted((REPO / top).rglob("*.ipynb")):
            cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
            for i, cell in enumerate(cells):
                if cell["cell_type"] == "code":
                    code = "".join(cell["source"])
                    # IPython magics and shell lines are not Python; blank them.
                    code = "\n".join(
                        "" if ln.lstrip().startswith(("%", "!")) else ln for ln in code.splitlines()
                    )
                    sources.append((f"{path.relative_to(REPO)}[cell {i}]", code))
    return sources


def test_source_tree_has_no_unsafe_deserialisation_or_code_execution():
    sources = _python_sources()
    assert len(sources) > 20 and any(name.endswith("loading.py") for name, _ in sources)
    problems = [f"{name}: {p}" for name, source in sources for p in unsafe_calls(source)]
    assert problems == []


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "from joblib import load",
        "import torch\nstate = torch.load('x.pt')",
        "import torch\nstate = torch.load('x.pt', weights_only=False)",
        "import yaml\ncfg = yaml.load(open('c.yaml'), Loader=yaml.Loader)",
        "import yaml\ncfg = yaml.unsafe_load(text)",
        "from yaml import load",
        "eval(user_text)",
        "exec(code)",
        "m = AutoModel.from_pretrained(name, trust_remote_code=True)",
        "def load(name, trust_remote_code=True):\n    pass",
        "def load(name, *, trust_remote_code=True):\n    pass",
        "import numpy as np\nnp.load(path, allow_pickle=True)",
        "import pandas as pd\npd.read_pickle(path)",
        "import subprocess\nsubprocess.run(cmd, shell=True)",
        "p.add_argument('--trust_remote_code', action='store_true', default=True)",
    ],
)
def test_the_scan_catches_each_rule(snippet):
    assert unsafe_calls(snippet), snippet


def test_the_scan_accepts_the_safe_forms():
    safe = (
        "import torch, yaml\n"
        "model.eval()\n"
        "state = torch.load('x.pt', weights_only=True)\n"
        "cfg = yaml.safe_load(text)\n"
        "m = AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code)\n"
        "def load(name, trust_remote_code=False):\n    pass\n"
    )
    assert unsafe_calls(safe) == []


# ---- nothing lost: every file the library and the command line write is written atomically --------------------

# io.py is the atomic writer; loading.py writes a whole folder under a temporary name and publishes it by one rename.
_ATOMIC_BY_DESIGN = {"src/chunked_decomp/io.py", "src/chunked_decomp/hf/assets.py"}
_WRITERS = {
    "write_text",
    "write_bytes",
    "savefig",
    "to_csv",
    "to_json",
    "to_parquet",
    "to_excel",
    "dump",
    "save",
}


def direct_writes(source: str) -> list[str]:
    """File writes in ``source`` that bypass chunked_decomp.io's atomic writers, as 'line N: what' strings.

    A write into a handle opened by ``with atomic_open(...) as fh`` is atomic and allowed.
    """
    tree = ast.parse(source)
    handles = {
        item.optional_vars.id
        for node in ast.walk(tree)
        if isinstance(node, ast.With)
        for item in node.items
        if isinstance(item.context_expr, ast.Call)
        and _name(item.context_expr.func).endswith("atomic_open")
        and isinstance(item.optional_vars, ast.Name)
    }
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = _name(node.func)
        last = func.split(".")[-1]
        args = list(node.args) + [
            k.value for k in node.keywords if k.arg in ("file", "fp", "path_or_buf", "fname")
        ]
        targets_handle = any(isinstance(a, ast.Name) and a.id in handles for a in args)
        if last in _WRITERS and not targets_handle and func not in ("json.dumps", "yaml.safe_dump"):
            if last == "dump" and not func.startswith(("json.", "yaml.")):
                continue
            if last == "save" and not func.startswith("torch."):
                continue
            problems.append(f"line {node.lineno}: {func}()")
        if func in ("open", "io.open", "builtins.open", "os.fdopen"):
            mode_arg = node.args[1] if len(node.args) > 1 else None
        elif func.endswith(".open") and func != "os.open":  # Path.open(mode)
            mode_arg = node.args[0] if node.args else None
        else:
            continue
        mode = mode_arg or next((k.value for k in node.keywords if k.arg == "mode"), None)
        target = node.args[0] if node.args else None
        if isinstance(target, ast.Constant) and str(target.value).startswith("/proc/"):
            continue  # a kernel control file (MemoryTracker resets the peak RSS), not an output file
        if isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+"):
            problems.append(f"line {node.lineno}: {func}(..., {mode.value!r})")
    return problems


def test_library_and_command_line_write_files_only_atomically():
    sources = [
        (name, source)
        for name, source in _python_sources()
        if name.startswith(("src/", "scripts/", "benchmarks/")) and name not in _ATOMIC_BY_DESIGN
    ]
    assert any(name.startswith("src/chunked_decomp/cli/") for name, _ in sources)
    problems = [f"{name}: {p}" for name, source in sources for p in direct_writes(source)]
    assert problems == []


@pytest.mark.parametrize(
    "snippet",
    [
        "path.write_text(text)",
        "Path(p).write_bytes(data)",
        "fig.savefig('plot.png')",
        "frame.to_csv(out / 'results.csv')",
        "import json\njson.dump(rows, fh)",
        "fh = open(path, 'w')",
        "fh = open('/tmp/proc/out.txt', 'w')",
        "with path.open('wb') as fh:\n    fh.write(b'')",
        "import torch\ntorch.save(state, path)",
    ],
    ids=lambda snippet: snippet.splitlines()[-1].strip()[:40],
)
def test_the_write_scan_catches_direct_writes(snippet):
    assert direct_writes(snippet), snippet


def test_the_write_scan_accepts_atomic_writes():
    safe = (
        "from chunked_decomp.io import atomic_open, atomic_write_json\n"
        "with atomic_open(path, 'wb', encoding=None) as fh:\n    fig.savefig(fh, format='png')\n"
        "atomic_write_json(path, rows)\n"
        "text = json.dumps(rows)\n"
        "data = path.read_text()\n"
        "with open(path) as fh:\n    fh.read()\n"
        "with open('/proc/self/clear_refs', 'w') as fh:\n    fh.write('5')\n"
    )
    assert direct_writes(safe) == []


# ---- safety: loading ----------------------------------------------------------------------------------------


class _Recorder:
    """Stands in for the transformers Auto classes; records every from_pretrained call's keyword arguments."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def install(self, monkeypatch) -> None:
        import chunked_decomp.hf.loading as loading

        model = SimpleNamespace(to=lambda device: None, eval=lambda: None, generation_config=None)
        tokenizer = SimpleNamespace(
            pad_token="<pad>", eos_token="<|im_end|>", pad_token_id=0, eos_token_id=2, get_vocab=dict
        )
        for cls_name, result in (("AutoConfig", object()), ("AutoTokenizer", tokenizer)):
            monkeypatch.setattr(loading, cls_name, self._fake(cls_name, result))
        monkeypatch.setattr(loading, "AutoModelForCausalLM", self._fake("AutoModelForCausalLM", model))

    def _fake(self, cls_name: str, result):
        calls = self.calls

        class Fake:
            @staticmethod
            def from_pretrained(*args, **kwargs):
                calls.append((cls_name, kwargs))
                return result

        return Fake


@pytest.mark.parametrize("kind", ["embedded", "local", "hub"])
def test_trust_remote_code_is_off_unless_asked(kind, tmp_path, monkeypatch):
    import chunked_decomp.hf.loading as loading

    recorder = _Recorder()
    recorder.install(monkeypatch)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(loading, "converted_default_model", lambda cache_root: folder)
    name = {"embedded": "smollm2-135m", "local": str(folder), "hub": "someone/some-model"}[kind]

    loading.load_model_and_tokenizer(name)
    assert len(recorder.calls) >= 2
    assert all(kwargs.get("trust_remote_code") is False for _, kwargs in recorder.calls), recorder.calls

    recorder.calls.clear()
    loading.load_model_and_tokenizer(name, trust_remote_code=True)  # the user asked
    assert all(kwargs.get("trust_remote_code") is True for _, kwargs in recorder.calls)


def test_the_command_line_cannot_turn_remote_code_on(monkeypatch, tmp_path, capsys):
    import chunked_decomp.hf.loading as loading
    from chunked_decomp.cli.parser import build_parser

    for command in ("compress", "evaluate", "benchmark"):
        assert "trust" not in build_parser(command).format_help()
    seen = {}

    def fake_load(name, **kwargs):
        seen.update(kwargs, name=name)
        raise ValueError("model_name: stop here")

    monkeypatch.setattr(loading, "load_model_and_tokenizer", fake_load)
    code = main(["compress", "--model_name", "someone/some-model", "--output_dir", str(tmp_path / "o")])
    assert code == 2 and seen["name"] == "someone/some-model"
    assert seen.get("trust_remote_code", False) is False
    capsys.readouterr()


BAD_NAMES = [
    "",
    "   ",
    "a b",
    "../../etc",
    "../../etc/passwd",
    "model;rm -rf ~",
    "a/b/c",
    "owner/..",
    "x" * 200,
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: repr(n)[:20])
def test_malformed_model_names_are_refused_before_loading(name, tmp_path, monkeypatch):
    import chunked_decomp.hf.loading as loading

    recorder = _Recorder()
    recorder.install(monkeypatch)
    cwd = tmp_path / "a" / "b"  # so "../../etc" points at tmp_path/etc, which does not exist
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    with pytest.raises((ValueError, FileNotFoundError), match="model_name"):
        loading.load_model_and_tokenizer(name)
    assert recorder.calls == []


# ---- command-line rows of docs/bad_inputs.md not covered by tests/test_cli.py ------------------------------


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("how", ["chmod", "permission_denied"])
def test_unwritable_output_dir_exits_2(how, tmp_path, monkeypatch, capsys):
    import chunked_decomp.io as io

    target = tmp_path / "locked"
    target.mkdir()
    if how == "chmod":
        if os.name != "posix" or os.geteuid() == 0:
            pytest.skip("permission bits do not stop root (or non-POSIX); the simulated case covers it")
        target.chmod(0o555)
    else:
        real = io.tempfile.mkstemp

        def denied(*args, **kwargs):
            if Path(kwargs.get("dir", "")) == target:
                raise PermissionError(13, "Permission denied")
            return real(*args, **kwargs)

        monkeypatch.setattr(io.tempfile, "mkstemp", denied)
    try:
        code, err = _run(["compress", "--output_dir", target], capsys)
    finally:
        target.chmod(0o755)
    assert code == 2 and "--output_dir" in err and "not writable" in err and "Traceback" not in err
    assert list(target.iterdir()) == []


def test_broken_presets_file_is_named_on_the_command_line(tmp_path, monkeypatch, capsys):
    """There is no flag for a config file; --preset reads the packaged presets, and a broken one is named."""
    import chunked_decomp.config.presets as config

    broken = tmp_path / "compression_configs.yaml"
    broken.write_text("balanced: [unclosed\n  chunk_size: 64\n", encoding="utf-8")
    monkeypatch.setattr(config, "presets_path", lambda: broken)
    code, err = _run(["compress", "--preset", "balanced", "--output_dir", tmp_path / "o"], capsys)
    assert code == 2 and "--preset" in err
    assert str(broken) in err and "is not valid YAML" in err and "line 2" in err
    assert not (tmp_path / "o").exists()


def test_path_traversal_model_name_exits_2(tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    code, err = _run(["compress", "--model_name", "../../etc", "--output_dir", tmp_path / "o"], capsys)
    assert code == 2 and "--model_name" in err and "'..'" in err


def test_unknown_hub_model_exits_2_naming_the_offline_default(tmp_path, monkeypatch, capsys):
    """tests/cli/test_cli.py's "unknown model" is a three-part name (no such folder); this is a well-formed hub id
    that cannot be fetched (offline here, so no network is touched)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, err = _run(
        ["compress", "--model_name", "someone-unknown/not-cached-model", "--output_dir", tmp_path / "o"],
        capsys,
    )
    assert code == 2 and "error: --model_name: model_name='someone-unknown/not-cached-model'" in err
    assert "'smollm2-135m'" in err and "Traceback" not in err
