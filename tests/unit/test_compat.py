"""The compat registry is complete, its guards refuse or warn, and nothing outside compat/ patches
a third-party package."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import dapo_megatron.compat as compat
from dapo_megatron.compat import PATCHES, OutsideRange, UnverifiedPatchWarning, UnverifiedVersionError
from dapo_megatron.compat.megatron_optimizer import fully_reshardable_bucket_fix

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = REPO_ROOT / "dapo_megatron"
COMPAT = PACKAGE / "compat"


def _string_literals(path: Path) -> set[str]:
    return {
        n.value
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def _module_path(module: str) -> Path:
    return REPO_ROOT / (module.replace(".", "/") + ".py")


def test_every_compat_module_registers_and_every_entry_names_its_module():
    modules = {f"dapo_megatron.compat.{m.name}" for m in pkgutil.iter_modules([str(COMPAT)])}
    registered = {p.module for p in PATCHES}
    assert modules == registered, (
        f"modules without a registry entry: {modules - registered}; unknown: {registered - modules}"
    )
    for p in PATCHES:
        assert p.name in _string_literals(_module_path(p.module)), f"{p.module} never names (guards) {p.name}"


def test_registry_entries_are_well_formed():
    names = [p.name for p in PATCHES]
    assert len(names) == len(set(names))
    for p in PATCHES:
        assert p.targets and p.why and p.measured, p
        assert all(compat.version_in_range(v, p.versions) for v in p.measured), p
        assert p.outside in (OutsideRange.REFUSE, OutsideRange.WARN)


def test_every_needed_test_exists():
    for p in PATCHES:
        path, _, test = p.needed_test.partition("::")
        function, _, param = test.partition("[")
        file = REPO_ROOT / path
        assert file.is_file(), p.needed_test
        functions = {n.name for n in ast.walk(ast.parse(file.read_text())) if isinstance(n, ast.FunctionDef)}
        assert function in functions, p.needed_test
        if param:
            assert param.rstrip("]") in _string_literals(file), p.needed_test


def _resolve(target: str) -> object:
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(target)


@pytest.mark.parametrize("entry", PATCHES, ids=lambda p: p.name)
def test_every_target_exists_in_the_installed_package(entry):
    pytest.importorskip(entry.package)
    for target in entry.targets:
        _resolve(target)


def test_importing_the_compat_modules_patches_nothing():
    """Every run imports the patch modules (``init_parallel``'s module imports the CPU shims):
    only calling a patch function may replace a third party's code.  In a fresh interpreter,
    because a test in this one may have applied the CPU shims."""
    code = inspect.getsource(_resolve) + (
        "import importlib.util, pkgutil\n"
        "from dapo_megatron.compat import PATCHES\n"
        "targets = [t for p in PATCHES if importlib.util.find_spec(p.package) for t in p.targets]\n"
        "before = [_resolve(t) for t in targets]\n"
        f"for m in pkgutil.iter_modules([{str(COMPAT)!r}]): importlib.import_module('dapo_megatron.compat.' + m.name)\n"
        "import dapo_megatron.actor.parallel\n"
        "print([t for t, b in zip(targets, before) if _resolve(t) is not b])\n"
    )
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_guard_refuses_or_warns_outside_the_range(monkeypatch):
    monkeypatch.setattr(compat, "installed_version", lambda package: "0.99.0")
    monkeypatch.setattr(compat, "_WARNED", set())
    with pytest.raises(UnverifiedVersionError, match="test_ddp_buckets.py.*overlap_grad_reduce=false"):
        compat.guard("fully-reshardable-buckets")
    with pytest.warns(UnverifiedPatchWarning, match="adam-step-passthrough"):
        compat.guard("adam-step-passthrough")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.guard("adam-step-passthrough")  # once per process


def test_guard_passes_inside_the_range(monkeypatch):
    monkeypatch.setattr(compat, "installed_version", lambda package: "0.16.1")
    assert compat.guard("fully-reshardable-buckets").name == "fully-reshardable-buckets"
    with pytest.raises(KeyError, match="registered"):
        compat.guard("no-such-patch")


def test_bucket_fix_refuses_several_buckets_on_an_unmeasured_release(monkeypatch):
    monkeypatch.setattr(compat, "installed_version", lambda package: "0.19.2")
    optimizer = type("Opt", (), {"buffers": [type("Buf", (), {"buckets": [0, 1]})()]})()
    with pytest.raises(UnverifiedVersionError, match="fully-reshardable-buckets"):
        with fully_reshardable_bucket_fix(optimizer):
            pass
    one_bucket = type("Opt", (), {"buffers": [type("Buf", (), {"buckets": [0]})()]})()
    with fully_reshardable_bucket_fix(one_bucket):  # nothing to fix: no guard, no patch
        pass


@pytest.mark.parametrize(
    ("version", "inside"),
    [
        ("0.16.1", True),
        ("0.19.2", True),
        ("0.16.0", False),
        ("0.20.0", False),
        ("0.20.0rc0", False),
        ("0.19.2+local", True),
    ],
)
def test_version_in_range(version, inside):
    assert compat.version_in_range(version, ("0.16.1", "0.20")) is inside


# ------------------------------------------------------------------ no patches outside compat/
def _third_party_names(tree: ast.AST) -> set[str]:
    """Names a module binds to third-party modules or their members (any scope)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if _third_party(top):
                    names.add(alias.asname or top)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if _third_party(node.module.split(".")[0]):
                names.update(alias.asname or alias.name for alias in node.names)
    return names


def _third_party(top: str) -> bool:
    return top not in sys.stdlib_module_names and top not in ("__future__", "dapo_megatron")


def _root(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def monkeypatches(path: Path) -> list[str]:
    """``path:line`` of every assignment to (or setattr on) an attribute of a third-party name."""
    tree = ast.parse(path.read_text())
    third = _third_party_names(tree)
    found = []
    for node in ast.walk(tree):
        targets: list[ast.AST] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
            if node.args and _root(node.args[0]) in third:
                found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
            continue
        for target in targets:
            if isinstance(target, ast.Attribute) and _root(target) in third:
                found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    return found


def test_no_module_outside_compat_patches_a_third_party_package():
    outside = [p for p in sorted(PACKAGE.rglob("*.py")) if COMPAT not in p.parents]
    found = [hit for path in outside for hit in monkeypatches(path)]
    assert not found, f"monkeypatches outside dapo_megatron/compat (move them there and register them): {found}"


def test_the_scanner_sees_the_patches_in_compat():
    for module in sorted(COMPAT.glob("*.py")):
        if module.name != "__init__.py":
            assert monkeypatches(module), f"the scanner finds no patch in {module.name}"
