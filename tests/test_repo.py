"""Contracts of the repository itself: CI runs what README says, every config key is documented, and the
network never imports the machinery around it (DESIGN.md's dependency direction)."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

from train.config import ExperimentConfig

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [blocks[0].strip(), blocks[1].strip()]


def test_readme_opens_with_two_single_line_commands_and_ci_runs_the_test_one() -> None:
    train_cmd, test_cmd = readme_commands()
    assert "\n" not in train_cmd and "\n" not in test_cmd
    assert train_cmd.startswith("pip install torch==2.13.0") and "configs/tiny.yaml" in train_cmd
    assert test_cmd.startswith("pip install torch==2.13.0") and "pytest" in test_cmd
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines


def _keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or (isinstance(f.default_factory, type)
                                                and dataclasses.is_dataclass(f.default_factory)):
            sub = f.default_factory if isinstance(f.default_factory, type) else f.type
            out += _keys(sub, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def test_every_config_key_is_documented() -> None:
    """Each key must appear as a table row (`| `key`` or `| `sub.key``) in its own group's section."""
    doc = (ROOT / "docs" / "configuration.md").read_text()
    sections = dict(re.findall(r"^## `(\w+)`.*?\n(.*?)(?=^## |\Z)", doc, flags=re.S | re.M))
    keys = _keys(ExperimentConfig)
    assert len(keys) > 60
    missing = []
    for key in keys:
        group, _, rest = key.partition(".")
        rows = [line for line in sections.get(group, "").splitlines() if line.startswith("| `")]
        if not any(f"`{rest}`" in row.split("|")[1] for row in rows):
            missing.append(key)
    assert not missing, f"undocumented config keys: {missing}"


def imported_modules(path: Path) -> list[str]:
    """The absolute module names a file imports (relative imports are its own package's)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_models_imports_nothing_from_the_machinery_around_it() -> None:
    forbidden = {"parallel", "optim", "data", "train", "launch", "tools"}
    offenders = [f"{path.name}: {n}" for path in (ROOT / "models").rglob("*.py")
                 for n in imported_modules(path) if n.split(".")[0] in forbidden]
    assert not offenders, offenders


def test_nothing_outside_tools_imports_tools() -> None:
    """tools/ may import anything; no package and no benchmark imports tools/ (DESIGN.md: `tools ->
    anything`). Only the tests import it, to test it."""
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert "tools" in packages and "models" in packages
    offenders = [f"{path.relative_to(ROOT)}: {n}" for top in [p for p in packages if p != "tools"] + ["bench"]
                 for path in (ROOT / top).rglob("*.py") for n in imported_modules(path)
                 if n.split(".")[0] == "tools"]
    assert not offenders, offenders


def test_every_dependency_has_an_upper_bound() -> None:
    """A new major release elsewhere (a minor one for torch) must not turn a fresh clone red."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = list(project["build-system"]["requires"]) + list(project["project"]["dependencies"])
    for extra in project["project"]["optional-dependencies"].values():
        reqs += extra
    assert len(reqs) > 15
    unbounded = [r for r in reqs if "<" not in r.split(";")[0]]
    assert not unbounded, f"dependencies without an upper bound: {unbounded}"
    torch_req = next(r for r in reqs if re.match(r"torch\b", r))
    upper = re.search(r"<\s*([\d.]+)", torch_req).group(1)
    assert upper.count(".") == 1, f"torch must be bounded at its next minor release, got {torch_req}"


def test_console_scripts_point_at_the_python_m_entry_points() -> None:
    """`chogori-train` & co. (pyproject's [project.scripts]) call the same main() as `python -m ...`."""
    import importlib

    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {f"chogori-{n}" for n in ("train", "launch", "prepare", "plan", "report", "export")}
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


def test_pyproject_declares_exactly_what_the_code_imports() -> None:
    """Every third-party module the packages import comes from a declared distribution (a dependency, or an
    extra for the optional ones), and every runtime dependency is imported somewhere: nothing arrives only
    because another package happens to pull it in."""
    import importlib.metadata
    import sys

    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    own = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])

    def names(reqs: list[str]) -> set[str]:
        return {re.split(r"[<>=!;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}

    runtime = names(project["dependencies"])
    declared = runtime | {n for extra in project["optional-dependencies"].values() for n in names(extra)}
    imported: set[str] = set()
    for path in (p for pkg in own for p in (ROOT / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - own - {"__future__"}
    dists = importlib.metadata.packages_distributions()
    from_dists = {m: {d.lower().replace("_", "-") for d in dists.get(m, [m])} for m in third_party}
    undeclared = {m: d for m, d in from_dists.items() if not d & declared}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    used = set().union(*from_dists.values())
    unused = runtime - used
    assert not unused, f"runtime dependencies nothing imports: {unused}"


def test_start_up_imports_only_what_the_command_needs() -> None:
    """Checking a config (`--print-config`, `python -m launch`, a bad key's error line) imports no torch at all
    (~3 s a process), planning no DTensor (with sympy, ~1.2 s), and building the model on the meta device no
    torch._dynamo (~1.3 s): every command line and every rank pays its imports at start-up."""
    import subprocess
    import sys

    probe = ("import sys\n"
             "import train.config, launch.__main__\n"
             "assert 'torch' not in sys.modules, 'the config check imported torch'\n"
             "import tools.plan\n"
             "heavy = [m for m in ('torch.distributed.tensor', 'torch._dynamo') if m in sys.modules]\n"
             "assert not heavy, f'planning imported {heavy}'\n"
             "import torch\n"
             "from models import ModelConfig, Transformer\n"
             "from tests.conftest import TINY_MODEL\n"
             "with torch.device('meta'):\n"
             "    model = Transformer(ModelConfig(**TINY_MODEL))\n"
             "assert 'torch._dynamo' not in sys.modules, 'building on meta imported torch._dynamo'\n")
    res = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
