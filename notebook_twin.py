"""The MNIST walk-through notebook, made from the Fashion-MNIST one: ``Experiments_MNIST.ipynb`` is
``Experiments_FashionMNIST.ipynb`` with the ``DATASET`` parameter set to ``"mnist"``, its title and the
few names that follow from the dataset changed (``TWIN_CHANGES``), and no outputs (MNIST needs the
download, which this repository cannot ship). Both notebooks are written in one place: edit the
Fashion-MNIST notebook, then run

    python notebook_twin.py            # rewrite Experiments_MNIST.ipynb
    python notebook_twin.py --check    # exit status 1, naming the file, when it is out of date

A test checks that the committed twin is what this module makes of the committed source.
"""

import argparse
import os
import sys

import nbformat

import cli
from utils import atomic_write

SOURCE = "Experiments_FashionMNIST.ipynb"
TWIN = "Experiments_MNIST.ipynb"
# What the twin says instead of the source: (source text, twin text, how many times the source says it).
# The last change swaps the whole paragraph that starts with the given text.
TWIN_CHANGES = [
    ("# Siamese and triplet networks on Fashion-MNIST\n", "# Siamese and triplet networks on MNIST\n", 1),
    ('DATASET = os.environ.get("ST_DATASET", "fashion-mnist")', 'DATASET = os.environ.get("ST_DATASET", "mnist")', 1),
    ("--dataset fashion-mnist ", "--dataset mnist ", 1),
    ("`results/fashion-mnist.md`", "`results/mnist.md`", 2),
    ("`runs/fashion-mnist/quick/results/fashion-mnist.md`", "`runs/mnist/quick/results/mnist.md`", 1),
    ("--execute Experiments_FashionMNIST.ipynb ", "--execute Experiments_MNIST.ipynb ", 1),
]
SAVED_RESULTS_PARAGRAPH = "**What you see on GitHub are saved results.**"
WITHOUT_OUTPUTS_PARAGRAPH = """\
**This notebook is committed without outputs**: it trains on MNIST, which `torchvision` downloads
(`ST_DOWNLOAD=1`, the default) and which this repository cannot ship. Run it where the download
works; CI runs it in quick mode on a small MNIST-format fixture. The Fashion-MNIST notebook,
`Experiments_FashionMNIST.ipynb`, is committed with the study's results."""
# The notebook metadata a notebook keeps without outputs: the kernel, not the Python version it last ran on.
LANGUAGE_INFO_KEPT = ("name", "pygments_lexer")


def replace_counted(sources, old, new, count):
    """``sources`` (a list of cell sources) with ``old`` replaced by ``new``; raises ValueError when the
    sources do not hold ``old`` exactly ``count`` times (the source changed under a twin change)."""
    found = sum(source.count(old) for source in sources)
    if found != count:
        raise ValueError(f"{SOURCE} holds {old.strip()!r} {found} times, not {count}: update "
                         f"notebook_twin.TWIN_CHANGES to the new text")
    return [source.replace(old, new) for source in sources]


def replace_paragraph(sources, start, paragraph):
    """``sources`` with the one paragraph (lines between blank lines) that starts with ``start`` replaced
    by ``paragraph``; raises ValueError unless exactly one paragraph starts with it."""
    changed, found = [], 0
    for source in sources:
        blocks = source.split("\n\n")
        found += sum(block.startswith(start) for block in blocks)
        changed.append("\n\n".join(paragraph if block.startswith(start) else block for block in blocks))
    if found != 1:
        raise ValueError(f"{SOURCE} has {found} paragraphs starting with {start!r}, not 1: update notebook_twin")
    return changed


def without_outputs(notebook):
    """``notebook`` (nbformat NotebookNode, changed in place) as committed without outputs: no outputs,
    execution counts or execution times, and only the kernel's part of the metadata. Returns it."""
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    language = notebook.metadata.get("language_info", {})
    notebook.metadata.language_info = {key: language[key] for key in LANGUAGE_INFO_KEPT if key in language}
    return notebook


def twin_text(source_text):
    """The text of the twin notebook (nbformat's JSON, ending in a newline) made from ``source_text``,
    the Fashion-MNIST notebook's. Raises ValueError when a change of ``TWIN_CHANGES`` no longer applies."""
    notebook = without_outputs(nbformat.reads(source_text, as_version=4))
    sources = [cell.source for cell in notebook.cells]
    for old, new, count in TWIN_CHANGES:
        sources = replace_counted(sources, old, new, count)
    sources = replace_paragraph(sources, SAVED_RESULTS_PARAGRAPH, WITHOUT_OUTPUTS_PARAGRAPH)
    for cell, source in zip(notebook.cells, sources):
        cell.source = source
    nbformat.validate(notebook)
    text = nbformat.writes(notebook)
    return text if text.endswith("\n") else text + "\n"


def main(argv=None):
    """Write the twin next to the source in ``--folder`` (default: this repository), or with ``--check``
    only compare; returns True when the twin is (now) up to date."""
    parser = argparse.ArgumentParser(prog="notebook_twin.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help=f"only check that {TWIN} is up to date")
    parser.add_argument("--folder", default=os.path.dirname(os.path.abspath(__file__)),
                        help=f"the folder holding {SOURCE} (default: this repository)")
    args = parser.parse_args(argv)
    source, twin = os.path.join(args.folder, SOURCE), os.path.join(args.folder, TWIN)
    with open(source, encoding="utf-8") as file:
        text = twin_text(file.read())
    current = None
    if os.path.exists(twin):
        with open(twin, encoding="utf-8") as file:
            current = file.read()
    if current == text:
        print(f"{TWIN} is up to date with {SOURCE}")
        return True
    if args.check:
        print(f"{TWIN} is out of date: run `python notebook_twin.py` after editing {SOURCE}")
        return False
    with atomic_write(twin, "wb") as file:
        file.write(text.encode("utf-8"))
    print(f"wrote {twin} from {SOURCE}")
    return True


if __name__ == "__main__":
    sys.exit(cli.run(main, "notebook_twin.py"))
