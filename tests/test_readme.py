"""The README's quick-start code runs as printed (on a small synthetic stand-in for the data); the README
stays short enough to read in one sitting, and every relative link of README.md and results/README.md
points to a file or folder that exists."""

import os
import re

import torch

from datasets import InMemoryDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
RESULTS_README = os.path.join(ROOT, "results", "README.md")
README_MAX_LINES = 400
LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target) and ![alt](target "title")


def quick_start_code():
    text = open(README, encoding="utf-8").read()
    section = text[text.index("## Quick start"):]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def synthetic_split(n_per_class, seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(n_per_class)
    images = torch.randn(len(labels), 1, 28, 28, generator=generator) + labels.view(-1, 1, 1, 1) / 5
    return InMemoryDataset(images, labels)


def test_quick_start_runs_and_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = quick_start_code().replace("n_epochs=20", "n_epochs=2")
    namespace = {"train_set": synthetic_split(25, 0), "test_set": synthetic_split(25, 1)}
    exec(compile(code, "README quick start", "exec"), namespace)
    history = namespace["history"]
    assert history["epoch"] == [1, 2]
    assert all(torch.isfinite(torch.tensor(history["train_loss"])))
    assert (tmp_path / "checkpoints" / "online-triplet" / "checkpoint.pt").is_file()


def relative_links(path):
    """The relative link targets of the Markdown file ``path`` (outside code), without their #anchor;
    web links (``scheme:...``) and links to an anchor of the same page are left out."""
    text = open(path, encoding="utf-8").read()
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # fenced code
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code
    targets = []
    for target in LINK.findall(text):
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def test_readme_is_at_most_400_lines():
    with open(README, encoding="utf-8") as file:
        n_lines = len(file.read().splitlines())
    assert n_lines <= README_MAX_LINES, f"README.md has {n_lines} lines; move measurements to results/README.md"


def test_relative_links_point_to_existing_files():
    broken = []
    for path in (README, RESULTS_README):
        targets = relative_links(path)
        assert targets, f"no relative links found in {path}"
        folder = os.path.dirname(path)
        broken += [f"{os.path.relpath(path, ROOT)}: {target}" for target in targets
                   if not os.path.exists(os.path.normpath(os.path.join(folder, target)))]
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_link_check_sees_links_and_skips_web_links_and_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](a.md) ![b](../img/b.png) [c](https://x.org/c) [d](#d) [e](e.md#part) "
                    "`[f](f.md)`\n```\n[g](g.md)\n```\n", encoding="utf-8")
    assert relative_links(str(page)) == ["a.md", "../img/b.png", "e.md"]
