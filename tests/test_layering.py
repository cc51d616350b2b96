"""The one-way imports and the size of modules, read from the source with `ast` (nothing imported).

serve -> optimizer, serve -> deployments, autobatch (the CLI) -> all three; optimizer and
deployments never import serve or ray, and optimizer never imports deployments: it knows a model
only as a TunableModel. That keeps the optimizer usable in a plain process (`autobatch tune` on a
laptop) and each model family testable without Ray.
"""
from __future__ import annotations

import ast
import importlib.metadata
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("optimizer", "deployments", "serve", "autobatch")
FORBIDDEN = {
    "optimizer": {"deployments", "serve", "ray", "autobatch"},
    "deployments": {"serve", "ray", "autobatch"},
}
MAX_LINES = 400
# Modules allowed over MAX_LINES, each with the reason it still is.
LONG_MODULES: dict[str, str] = {}


def modules(package: str) -> list[str]:
    found = []
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        found += [os.path.relpath(os.path.join(folder, f), ROOT) for f in files if f.endswith(".py")]
    return sorted(found)


def imported_top_levels(path: str) -> set[str]:
    """The top-level names a module imports anywhere in it (function bodies included); relative
    imports stay inside their own package and are left out."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read(), filename=path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_import_nothing_above_them(package):
    paths = modules(package)
    assert paths, f"no modules found under {package}/"
    crossings = {path: sorted(imported_top_levels(path) & FORBIDDEN[package]) for path in paths}
    crossings = {path: names for path, names in crossings.items() if names}
    assert not crossings, f"{package} must not import {sorted(FORBIDDEN[package])}: {crossings}"


def test_the_import_reader_sees_every_form_of_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import ray.serve\nfrom serve.app import build\nfrom . import local\n"
                      "def f():\n    import deployments.registry as r\n")
    assert imported_top_levels(str(sample)) == {"ray", "serve", "deployments"}


def test_no_module_is_over_400_lines_unless_listed_with_a_reason():
    too_long = {}
    for package in PACKAGES:
        for path in modules(package):
            with open(os.path.join(ROOT, path)) as f:
                lines = sum(1 for _ in f)
            if lines > MAX_LINES and path not in LONG_MODULES:
                too_long[path] = lines
    assert not too_long, f"split these modules (or list them in LONG_MODULES with a reason): {too_long}"
    for path in LONG_MODULES:
        assert os.path.exists(os.path.join(ROOT, path)), f"{path} is listed in LONG_MODULES but no longer exists"


def top_level_names(dist: importlib.metadata.Distribution) -> set[str]:
    """The importable top-level names a distribution installs (top_level.txt, else its files)."""
    names = set((dist.read_text("top_level.txt") or "").split())
    for file in dist.files or ():
        parts = file.parts
        if (len(parts) >= 2 and parts[1] == "__init__.py") or (len(parts) == 1 and file.suffix == ".py"):
            names.add(parts[0].removesuffix(".py"))
    return names


def test_no_other_distribution_provides_our_top_level_names():
    """The import names are generic (`serve`, `optimizer`, `deployments`): another installed
    package that ships one would shadow ours or be shadowed. docs/architecture.md says why they
    stay top-level; this is the guard that makes that safe here."""
    assert "ray" in top_level_names(importlib.metadata.distribution("ray"))  # the scan sees real packages
    ours = set(PACKAGES)
    clashes = {}
    for dist in importlib.metadata.distributions():
        if (dist.metadata["Name"] or "").lower() == "autobatch":
            continue
        if top_level_names(dist) & ours:
            clashes[dist.metadata["Name"]] = sorted(top_level_names(dist) & ours)
    assert not clashes, f"installed distributions that provide our top-level packages: {clashes}"


def test_the_console_script_is_the_cli_of_this_tree():
    import tomllib

    from autobatch.cli import main

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert project["project"]["scripts"]["autobatch"] == "autobatch.cli:main"
    assert set(PACKAGES) <= set(project["tool"]["setuptools"]["packages"])
    assert callable(main)


def protocol_members() -> set[str]:
    from optimizer.model import TunableModel

    return {name for name in vars(TunableModel) if not name.startswith("_")} | set(TunableModel.__annotations__)


def test_tunable_model_names_exactly_what_the_optimizer_uses_of_a_model():
    """Every `spec.X` / `model.X` the optimizer reads is a TunableModel member, and every member is read."""
    used = set()
    for path in modules("optimizer"):
        source = open(os.path.join(ROOT, path)).read()
        if "TunableModel" not in source:  # (devices.py's `spec` is an importlib ModuleSpec)
            continue
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.Attribute):
                continue
            owner = node.value.id if isinstance(node.value, ast.Name) else getattr(node.value, "attr", None)
            if owner in ("spec", "_model"):  # tune.py's spec, ExampleBatches' self._model
                used.add(node.attr)
    assert used == protocol_members(), f"used but not in the Protocol: {used - protocol_members()}; " \
                                       f"in the Protocol but unused: {protocol_members() - used}"


def test_every_model_family_is_a_tunable_model():
    import inspect

    from deployments.registry import create_spec, model_names
    from optimizer.model import TunableModel

    for name in model_names():
        spec = create_spec(name)
        assert isinstance(spec, TunableModel), name
        for member in protocol_members():
            expected = getattr(TunableModel, member, None)
            if callable(expected):  # a method: it takes the Protocol's arguments
                wanted = len(inspect.signature(expected).parameters) - 1  # without self
                assert len(inspect.signature(getattr(spec, member)).parameters) == wanted, (name, member)
