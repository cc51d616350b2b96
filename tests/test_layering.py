"""The one-way imports and the size of modules, read from the source with `ast` (nothing imported).

serve -> optimizer, serve -> deployments, autobatch (the CLI) -> all three; everything -> wire, which
imports nothing of ours. optimizer and deployments never import serve or ray, and optimizer never
imports deployments: it knows a model only as a TunableModel. That keeps the optimizer usable in a
plain process (`autobatch tune` on a laptop) and each model family testable without Ray. The
clients (autobatch/client/) import no server module and no Ray, so they run anywhere. No module
imports itself back through others (an import cycle), at module level or inside a function.

Inside serve/ the folders are the parts (docs/architecture.md): replica/ (the replica and its
batcher) imports no other part, api/ (what a replica answers) imports replica/, oip/ (the ingress)
and cluster/ (the Ray glue and the launcher's parts) import api/ and replica/ and not each other;
only the entry points at serve/'s top (app.py, local.py, live_config.py) import across all of them.
"""
from __future__ import annotations

import ast
import importlib.metadata
import os
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("optimizer", "deployments", "serve", "autobatch", "wire")
FORBIDDEN = {
    "optimizer": {"deployments", "serve", "ray", "autobatch"},
    "deployments": {"serve", "ray", "autobatch"},
    "wire": {"optimizer", "deployments", "serve", "ray", "autobatch"},
    "autobatch/client": {"serve", "ray"},
}
# serve/'s parts -> the other parts each may import (its own modules and serve/__init__ always)
SERVE_PARTS = {
    "serve.replica": set(),
    "serve.api": {"serve.replica"},
    "serve.oip": {"serve.api", "serve.replica"},
    "serve.cluster": {"serve.api", "serve.replica"},
}
# what sits at serve/'s top: the package and the entry points users name (serve.app:build,
# `python -m serve.local`, the `autobatch config` plug-in serve.live_config:register)
SERVE_TOP = {"serve", "serve.app", "serve.local", "serve.live_config"}
# the only modules of a part that import Ray (at module level or inside a function)
RAY_IN_PART = {
    "serve/replica": {"serve/replica/metrics.py", "serve/replica/single_flight.py"},
    "serve/api": {"serve/api/calls.py"},
}
MAX_LINES = 400
# Modules allowed over MAX_LINES, each with the reason it still is.
LONG_MODULES: dict[str, str] = {}


def modules(package: str, root: str = ROOT) -> list[str]:
    found = []
    for folder, _, files in os.walk(os.path.join(root, package)):
        found += [os.path.relpath(os.path.join(folder, f), root) for f in files if f.endswith(".py")]
    return sorted(found)


def imported_top_levels(path: str) -> set[str]:
    """The top-level names a module imports anywhere in it (function bodies included); relative
    imports stay inside their own package and are left out (a relative import cannot leave its
    top-level package, so `autobatch/client`'s are checked by test_the_client_imports_no_server_module)."""
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


def test_the_client_imports_no_server_module():
    """Relative imports included: none of autobatch/client's climbs out of it (`from .. import cli`
    would bring the optimizer and, through the CLI's entry points, serve)."""
    graph = import_graph()
    outside = {name: sorted(target for target in targets if not target.startswith(("autobatch.client", "wire",
                                                                                  "deployments", "optimizer")))
               for name, targets in graph.items() if name.startswith("autobatch.client")}
    assert not {name: targets for name, targets in outside.items() if targets}


def serve_part(name: str) -> str | None:
    return next((part for part in SERVE_PARTS if name == part or name.startswith(part + ".")), None)


def test_serve_is_its_parts_and_its_entry_points():
    """Every module of serve/ is in one of the parts, or is one of the entry points at its top."""
    loose = sorted(name for name in map(module_name, modules("serve"))
                   if name not in SERVE_TOP and serve_part(name) is None)
    assert not loose, f"put these in a part of serve/ (SERVE_PARTS), or list a new entry point in SERVE_TOP: {loose}"


def test_each_part_of_serve_imports_only_the_parts_it_may():
    graph = import_graph()
    crossings = {}
    for name, targets in graph.items():
        part = serve_part(name)
        if part is None:
            continue
        allowed = SERVE_PARTS[part] | {part}
        wrong = sorted(target for target in targets  # an entry point (serve.app, ...) is in no part
                       if target.startswith("serve.") and serve_part(target) not in allowed)
        if wrong:
            crossings[name] = wrong
    assert not crossings, f"serve/'s parts import only those below them ({SERVE_PARTS}): {crossings}"


@pytest.mark.parametrize("part", sorted(RAY_IN_PART))
def test_only_the_listed_modules_of_a_part_import_ray(part):
    importing = {path for path in modules(part) if "ray" in imported_top_levels(path)}
    assert importing <= RAY_IN_PART[part], f"{part} imports Ray only in {sorted(RAY_IN_PART[part])}: " \
                                           f"{sorted(importing - RAY_IN_PART[part])}"


def test_every_package_folder_is_installed():
    """A new sub-package (serve/replica/, ...) must be in pyproject.toml's packages, or a wheel leaves it out."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {module_name(path) for package in PACKAGES for path in modules(package) if path.endswith("__init__.py")}
    assert found == listed, f"in the tree, not in pyproject.toml: {sorted(found - listed)}; " \
                            f"listed, not in the tree: {sorted(listed - found)}"


def defines(dotted: str) -> bool:
    """Whether `module:attr` or `module.attr` names a module of this tree that defines attr at its top
    (a def, a class, an assignment or an import), read with ast."""
    module, _, attr = dotted.partition(":") if ":" in dotted else dotted.rpartition(".")
    base = os.path.join(ROOT, *module.split("."))
    path = base + ".py" if os.path.exists(base + ".py") else os.path.join(base, "__init__.py")
    if not os.path.exists(path):
        return False
    names = set()
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            names |= {t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                      if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return attr in names


def string_constant(path: str, name: str) -> str:
    for node in ast.parse(open(os.path.join(ROOT, path)).read()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return node.value.value
    raise AssertionError(f"{path} has no {name}")


def test_the_import_paths_users_and_ray_name_exist():
    """The paths written down outside the code: serve_config.yaml's import paths and gRPC servicer,
    pyproject.toml's console script and plug-in, the Makefile's `python -m serve.local`, and the
    paths Ray imports by string (the autoscaling policy, the worker setup hook)."""
    import tomllib

    import yaml

    with open(os.path.join(ROOT, "serve_config.yaml")) as f:
        config = yaml.safe_load(f)
    named = [app["import_path"] for app in config["applications"]]
    named += config["grpc_options"]["grpc_servicer_functions"]
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    named += list(project["scripts"].values())
    named += [path for group in project["entry-points"].values() for path in group.values()]
    named += [string_constant("serve/replica/autoscaling.py", "POLICY_PATH"),
              string_constant("serve/cluster/loopback.py", "SETUP_HOOK")]
    assert {"serve.app:build", "serve.oip.router:build_router"} <= set(named)
    missing = sorted(path for path in named if not defines(path))
    assert not missing, f"named, but no module of this tree defines them: {missing}"
    with open(os.path.join(ROOT, "Makefile")) as f:
        assert "-m serve.local" in f.read()
    assert defines("serve.local:main")


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


# ----------------------------------------------------------------- import cycles
def module_name(path: str) -> str:
    parts = list(Path(path).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: str = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    """Our modules -> the modules of ours each imports, anywhere in it (function bodies included).
    `from a import b` is an edge to a.b where that is a module, else to a; relative imports are
    resolved against the module's package. A package's __init__ is reached only when named."""
    paths = [path for package in packages for path in modules(package, root)]
    known = {module_name(path) for path in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        name = module_name(path)
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(open(os.path.join(root, path)).read(), filename=path)):
            if isinstance(node, ast.Import):
                bases = [(alias.name, ()) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                bases = [(base, [alias.name for alias in node.names])]
            else:
                continue
            for base, names in bases:
                for member in names or [None]:
                    target = f"{base}.{member}" if member and f"{base}.{member}" in known else base
                    while target and target not in known:  # `import a.b.c` of a module a.b that exists
                        target = target.rpartition(".")[0]
                    if target and target != name:
                        targets.add(target)
        graph[name] = targets
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted: every module in
    one imports every other, through the rest."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def test_no_import_cycles():
    cycles = import_cycles(import_graph())
    assert not cycles, f"modules that import each other (break each circle by moving what both need down): {cycles}"


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    """a -> b (module level) -> c (inside a function, relatively) -> a: one cycle of three, beside
    d -> a, which imports into it without being part of it."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def later():\n    from . import c\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    (pkg / "d.py").write_text("from .a import something\n")
    graph = import_graph(str(tmp_path), ("pkg",))
    assert graph["pkg.b"] == {"pkg.c"} and graph["pkg.d"] == {"pkg.a"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    (pkg / "c.py").write_text("import os\n")
    assert import_cycles(import_graph(str(tmp_path), ("pkg",))) == []
