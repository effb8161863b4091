"""docs/inside-a-gpt.ipynb runs top to bottom in a real Jupyter kernel, as a student runs it.

nbclient starts an ipykernel of this interpreter in a folder of the test's own; the notebook
trains its model there on the offline Tiny Shakespeare (NANOGPT_SHAKESPEARE_SOURCE), never
downloading it, so this is the slow tier.
"""

from __future__ import annotations

import base64
import shutil

import pytest

from .conftest import REPO

NOTEBOOK = REPO / "docs" / "inside-a-gpt.ipynb"


@pytest.mark.slow
def test_the_notebook_trains_samples_and_draws_every_picture(tmp_path, shakespeare, monkeypatch):
    import nbclient
    import nbformat

    monkeypatch.setenv("NANOGPT_SHAKESPEARE_SOURCE", str(shakespeare))
    monkeypatch.setenv("NANOGPT_DATA_ROOT", str(tmp_path / "data_root"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # One thread for torch: on a shared, busy CI machine two threads that wait for each other train
    # ten times slower than one; on a student's idle machine the notebook uses every core.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    shutil.copy(NOTEBOOK, tmp_path / NOTEBOOK.name)
    notebook = nbformat.read(tmp_path / NOTEBOOK.name, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code)  # every cell ran, none raised
    outputs = [output for cell in code for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 5, [o.output_type for o in outputs]  # surprise, attention twice, lens, embeddings
    assert all(base64.b64decode(p.data["image/png"])[:4] == b"\x89PNG" for p in pictures)
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "ROMEO:" in printed and "loss on this text:" in printed
    assert (tmp_path / "runs" / "inside-a-gpt" / "best.pt").is_file()
    assert (tmp_path / "runs" / "inside-a-gpt-pictures" / "explain.html").is_file()
