"""Imports point one way: no module imports a module of a higher layer (lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module may import its own layer and the layers below, never a higher one.
LAYERS: list[set[str]] = [
    {"files", "data.cases", "data.labels", "data.synthetic.profiles", "data.synthetic.anatomy", "models.prompts", "models.steering",
     "models.key_value", "models.cpu_conv", "data", "models"},
    {"data.hecktor", "data.datalists", "data.checks", "data.transforms", "data.synthetic", "data.synthetic.scanner",
     "data.synthetic.writer", "models.prompted_unetr", "evaluate"},
    {"weights", "strategies", "checkpoints", "scoring"},
    {"artifacts", "training", "training.devices", "training.tracking", "training.presets", "training.loop"},
    {"training.config", "training.cases"},
    {"runs", "runs.base"},
    {"runs.folder", "runs.selection", "runs.predict"},
    {"runs.pretrain", "runs.adapt", "runs.score"},
    {"bank", "bank.storage", "bank.acquisition", "bank.routing", "bank.keys", "bank.serving", "bank.evaluation"},
    {"study", "study.report", "study.intervals", "study.reliance", "study.diagnostic", "study.experiment",
     "federated", "federated.site", "federated.flower", "federated.app", "federated.aggregation", "deploy", "deploy.bundle"},
    {"cli", "cli.paths", "cli.runs", "cli.scoring", "cli.bank", "cli.data", "cli.synth", "cli.export", "cli.federated", "__main__", ""},  # "" is the package's lazy facade
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module(path: Path) -> str:
    parts = path.relative_to(SRC / "centerprompt").with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "centerprompt":
            names = [node.module] if node.module != "centerprompt" else [f"centerprompt.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "centerprompt"]
        found |= {n.removeprefix("centerprompt").lstrip(".") for n in names}
    return found


def test_every_module_has_a_layer_and_imports_only_downwards() -> None:
    modules = {_module(p): p for p in (SRC / "centerprompt").rglob("*.py")}
    assert set(modules) <= set(LEVEL), f"give these modules a layer: {sorted(set(modules) - set(LEVEL))}"
    upward = [
        f"{name} (layer {LEVEL[name]}) imports {dep} (layer {LEVEL[dep]})"
        for name, path in modules.items()
        for dep in _imports(path)
        if dep in LEVEL and LEVEL[dep] > LEVEL[name]
    ]
    assert not upward, "\n".join(upward)
    unknown = {dep for path in modules.values() for dep in _imports(path)} - set(LEVEL)
    assert not unknown, f"imports of modules that do not exist: {sorted(unknown)}"


MAX_LINES, MAX_PARAMETERS = 450, 8
WIDE_BY_DESIGN = {("models/prompted_unetr.py", "__init__")}  # MONAI's UNETR signature, argument for argument


def test_modules_stay_readable_in_one_sitting() -> None:
    """No module over 450 lines and no function over 8 parameters (self aside): a wider one wants a
    configuration object (../shared/STYLE.md, conventions 11)."""
    long, wide = [], []
    for path in (SRC / "centerprompt").rglob("*.py"):
        text = path.read_text()
        name = str(path.relative_to(SRC / "centerprompt"))
        if len(text.splitlines()) > MAX_LINES:
            long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (name, node.name) not in WIDE_BY_DESIGN:
                a = node.args
                names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)] + [x.arg for x in (a.vararg, a.kwarg) if x]
                count = len([n for n in names if n not in ("self", "cls")])
                if count > MAX_PARAMETERS:
                    wide.append(f"{name}: {node.name} takes {count}")
    assert not long and not wide, "\n".join(long + wide)
