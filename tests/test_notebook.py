"""The exploration notebook runs top to bottom on the real default model (slow) and is kept clean."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "chunked_decomp_exploration.ipynb"


def test_notebook_is_clean_and_valid():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 6
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), (
        "commit it without outputs"
    )
    assert not any("sys.path" in c.source for c in code), "the notebook imports the installed package"


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path):
    """Executes every cell with nbclient in a scratch folder; about 1-3 minutes on a 2-core CPU."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # spectra, sweep, memory timeline, comparison
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "Memory profile" in text and "identical for the first" in text and "notebook ran in" in text
    assert list(tmp_path.iterdir()) == [], (
        "the notebook writes its PNGs to a temporary folder, not the working one"
    )
