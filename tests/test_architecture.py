"""The architecture, checked: the import-linter contracts of pyproject.toml (package layers, the
layers of levo_train, levo_infer free of training-only libraries, no import cycle in any package)
hold; a deliberately added cycle or upward import breaks them; the packaging lists every package."""

from __future__ import annotations

import copy
import sys
import textwrap
from pathlib import Path

import grimp
import importlinter.api  # noqa: F401  (configures import-linter: its config readers and graph builder)
import pytest
from importlinter.application.use_cases import lint_imports, read_user_options
from importlinter.contracts.layers import LayersContract

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
#: contracts that hold only once the other half of issue #19 is merged (levo_infer / levo_data cycles)
PENDING: dict[str, str] = {}  # contract id -> why it is expected to fail (none)


@pytest.fixture(scope="module")
def options():
    if str(REPO) not in sys.path:  # contract_types names tests.architecture, as lint-imports finds it from the root
        sys.path.insert(0, str(REPO))
    return read_user_options(str(PYPROJECT))


@pytest.fixture(scope="module")
def graph(options):
    """The import graph the contracts are checked on (every import grimp sees, in-function ones too)."""
    return grimp.build_graph(*options.session_options["root_packages"], include_external_packages=True,
                             cache_dir=None)


def _contract_ids() -> list:
    opts = read_user_options(str(PYPROJECT))
    return [pytest.param(c["id"], marks=pytest.mark.xfail(reason=PENDING[c["id"]], strict=True))
            if c["id"] in PENDING else c["id"] for c in opts.contracts_options]


@pytest.mark.parametrize("contract_id", _contract_ids())
def test_contract_is_kept(contract_id, options, capsys):
    """``lint-imports --contract ID`` (its report is the failure message)."""
    kept = lint_imports(str(PYPROJECT), limit_to_contracts=(contract_id,), cache_dir=None, no_logo=True)
    assert kept, f"contract {contract_id!r} is broken:\n{capsys.readouterr().out}"


def test_every_levo_train_module_has_a_layer(options, graph):
    """A new top-level module of levo_train must be given its place in the layers contract."""
    layers = next(c for c in options.contracts_options if c["id"] == "train-layers")["layers"]
    placed = {m.strip() for layer in layers for m in layer.replace(":", "|").split("|")}
    children = {m.split(".")[1] for m in graph.find_children("levo_train")}
    assert children - placed == set(), f"levo_train modules without a layer in pyproject.toml: {children - placed}"


def test_every_package_is_packaged():
    """A non-editable install ships only the packages pyproject.toml lists: every folder with an
    ``__init__.py`` under levo_train (configs and recipes aside, mapped there) must be listed."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: import-linter brings tomli
        import tomli as tomllib
    listed = set(tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "levo_train").rglob("__init__.py")}
    assert found - listed == set(), f"packages missing from [tool.setuptools] packages: {sorted(found - listed)}"


# ----------------------------------------------------------------------------- the check fails when it should
def _package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))


def _acyclic(options, packages: list[str]):
    from architecture import AcyclicContract

    return AcyclicContract(name="acyclic", session_options=options.session_options,
                           contract_options={"type": "acyclic", "packages": packages})


@pytest.mark.parametrize("where", ["function", "top", "parent"])
def test_a_cycle_breaks_the_acyclic_contract(tmp_path, monkeypatch, options, where):
    """A cycle closed by an import inside a function, one at the top of the files, and one through
    the package's own ``__init__`` (what import-linter's acyclic_siblings does not see) all break
    the contract, which names the modules and lines; the same package without it keeps it."""
    pkg = f"cyclepkg_{where}"
    files = {f"{pkg}/__init__.py": "", f"{pkg}/low.py": "X = 1\n",
             f"{pkg}/a.py": f"from {pkg} import low\n\nY = low.X\n",
             f"{pkg}/b.py": f"from {pkg} import a\n\n\ndef f():\n    return a.Y\n"}
    _package(tmp_path / "clean", files)
    cyclic = dict(files)
    if where == "function":  # low -> b -> a -> low, closed inside a function
        cyclic[f"{pkg}/low.py"] = f"X = 1\n\n\ndef g():\n    from {pkg} import b\n\n    return b.f()\n"
    elif where == "top":
        cyclic[f"{pkg}/low.py"] = f"from {pkg} import b\n\nX = 1\n"
    else:  # the package imports a child that imports the package
        cyclic[f"{pkg}/__init__.py"] = f"from {pkg}.b import f\n"
        cyclic[f"{pkg}/low.py"] = f"import {pkg}\n\nX = 1\n"
    _package(tmp_path / "cyclic", cyclic)
    for variant, kept in (("clean", True), ("cyclic", False)):
        monkeypatch.syspath_prepend(str(tmp_path / variant))
        for m in [m for m in sys.modules if m.split(".")[0] == pkg]:
            del sys.modules[m]
        check = _acyclic(options, [pkg]).check(grimp.build_graph(pkg, cache_dir=None), verbose=False)
        assert check.kept is kept, (variant, check.metadata)
        monkeypatch.undo()
    (cycle,) = check.metadata["cycles"][pkg]
    assert f"{pkg}.low" in cycle and "(line " in cycle


def test_an_added_cycle_or_upward_import_breaks_the_repository_contracts(options, graph):
    """On the real graph plus one import from a data module up to the reward model (which reads shards): the levo_train
    layers and its acyclic contract both fail (what a misplaced import in a change would do)."""
    real, graph = graph, copy.deepcopy(graph)
    graph.add_import(importer="levo_train.data.shards", imported="levo_train.reward.model", line_number=1,
                     line_contents="from levo_train.reward.model import RewardModel")
    assert _acyclic(options, ["levo_train"]).check(real, verbose=False).kept
    broken = _acyclic(options, ["levo_train"]).check(graph, verbose=False)
    assert not broken.kept and "levo_train.data.shards" in broken.metadata["cycles"]["levo_train"][0]
    layers_opts = next(c for c in options.contracts_options if c["id"] == "train-layers")
    layers = LayersContract(name="layers", session_options=options.session_options,
                            contract_options={k: v for k, v in layers_opts.items() if k not in ("id", "name")})
    assert layers.check(real, verbose=False).kept
    assert not layers.check(graph, verbose=False).kept


def test_the_run_never_branches_on_a_method_name():
    """Methods live in levo_train/methods/ (one class each); the face and the run only look them up."""
    import re

    for rel in ("levo_train/cli.py", "levo_train/run.py"):
        src = (REPO / rel).read_text()
        assert not re.search(r"method\s*==|method\s*!=|method\s+in\s|\.name\s*==", src), rel


def test_entry_point_method_files_and_run_functions_stay_small():
    """The sizes the structure rests on (issue #19): the entry point stays a thin face (<= 300 lines),
    each method's file holds its settings and wiring only (<= 250 lines: the machinery lives in
    ``train/``, ``rollout``, ``prompts``...), and no function of ``run.py`` reaches 80 lines."""
    import ast

    pkg = REPO / "levo_train"
    assert len((pkg / "cli.py").read_text().splitlines()) <= 300
    big = {p.name: n for p in (pkg / "methods").glob("*.py") if (n := len(p.read_text().splitlines())) > 250}
    assert not big, f"method files over 250 lines: {big}"
    tree = ast.parse((pkg / "run.py").read_text())
    long = {f.name: f.end_lineno - f.lineno + 1 for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) and f.end_lineno - f.lineno + 1 > 80}
    assert not long, f"run.py functions over 80 lines: {long}"
