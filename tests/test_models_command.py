"""`scaleyard models [JOB]`: every registered job's model presets (Job.model_presets), through the
real CLI, with parameter counts checked against built models."""

from __future__ import annotations

import re

import torch

from scaleyard.data_loaders.writer import write_split
from scaleyard.jobs.classify.job import Classify, model_config
from scaleyard.models.classifier import ConvClassifier
from scaleyard.models.diffusion.transformer import build_model
from scaleyard.models.presets import preset, presets
from scaleyard.models.tabdiff import TabDiff
from scaleyard.platform.job import registry

from conftest import scaleyard


def sections(stdout: str) -> dict[str, dict[str, list[str]]]:
    """{job: {row name: cells}} from the output: a 'JOB: N model presets' line, then a header
    and one row per preset, each cell separated by two or more spaces."""
    out: dict[str, dict[str, list[str]]] = {}
    job = None
    for line in stdout.splitlines():
        head = re.match(r"^(\S+): \d+ model presets?$", line)
        if head:
            job = head.group(1)
            out[job] = {}
        elif job and line.startswith("  ") and line.strip():
            cells = re.split(r"\s{2,}", line.strip())
            out[job][cells[0]] = cells
    return out


def write_adult_like_table(root) -> None:
    """A small table where tabdiff's presets look for Adult (data/adult/train): its columns set
    the model's size."""
    columns = [{"name": "age", "kind": "numerical"}, {"name": "hours", "kind": "numerical"},
               {"name": "income", "kind": "categorical", "categories": ["<=50K", ">50K"]}]
    rows = ({"__key__": f"{i:04d}", "json": {"age": 20.0 + i, "hours": 40.0, "income": ["<=50K", ">50K"][i % 2]}}
            for i in range(30))
    write_split(rows, root / "data" / "adult" / "train", builder="generated", version="1", split="train",
                schema={"json": "one table row"}, shard_size=10, extra={"columns": columns, "target": "income"})


def test_models_lists_every_jobs_presets_with_exact_counts(tmp_path) -> None:
    write_adult_like_table(tmp_path)
    done = scaleyard("models", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found = sections(done.stdout)
    assert set(registry()) <= set(found), done.stdout  # every registered job, built-in or plugin
    assert {"t2i", "classify", "tabdiff"} <= set(found)

    t2i = found["t2i"]
    assert t2i["name"][:3] == ["name", "params", "train FLOPs/sample"]
    assert set(presets()) <= set(t2i)
    torch.manual_seed(0)
    built = build_model(preset("dit_cross-cpu-s"))  # real weights, not a meta count
    assert t2i["dit_cross-cpu-s"][1] == f"{sum(p.numel() for p in built.parameters()):,d}"
    assert t2i["uvit-8B"][-1] == "model.preset=uvit-8B"

    for name in Classify.presets():
        from scaleyard.platform.config import resolve

        cfg = resolve(Classify.Config, [Classify.presets_dir() / f"{name}.yaml"], [])
        network = ConvClassifier(model_config(cfg))
        assert found["classify"][name][1] == f"{sum(p.numel() for p in network.parameters()):,d}"

    from scaleyard.data_loaders.index import load_index
    from scaleyard.jobs.tabdiff.job import TabDiffJob
    from scaleyard.jobs.tabdiff.job import model_config as tabdiff_config
    from scaleyard.jobs.tabdiff.table import schema_of
    from scaleyard.platform.config import resolve

    cfg = resolve(TabDiffJob.Config, [TabDiffJob.presets_dir() / "tiny.yaml"], [])
    model = TabDiff(tabdiff_config(cfg, schema_of(load_index(tmp_path / "data" / "adult" / "train"))))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert found["tabdiff"]["tiny"][1] == f"{trainable:,d}"
    assert "3 columns of data/adult/train" in found["tabdiff"]["tiny"][-1]

    one = scaleyard("models", "classify", cwd=tmp_path)
    assert one.returncode == 0 and set(sections(one.stdout)) == {"classify"}
    unknown = scaleyard("models", "no_such_job")
    assert unknown.returncode == 2 and "unknown job 'no_such_job'" in unknown.stderr
