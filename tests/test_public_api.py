"""The public surface and the layering: what users, examples and benchmarks may rely on.

The package's public surface is ``functional_memopt.__all__`` and the test kit
``functional_memopt.testing`` (with its ``reference`` recipe); every other module is internal.
Layers are checked by import-linter (``lint-imports``, run by CI, contract in pyproject.toml);
these tests hold the rest of the contract.
"""

import ast
import importlib
from pathlib import Path

import pytest

import functional_memopt as fm

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "functional_memopt"
PUBLIC_MODULES = {"functional_memopt", "functional_memopt.testing", "functional_memopt.testing.reference"}


def _python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _imports(tree: ast.AST) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import of the package in ``tree``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "functional_memopt"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "functional_memopt":
            out.append((node.lineno, node.module, [a.name for a in node.names]))
    return out


def _private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    bad = []
    for line, module, names in _imports(tree):
        if module not in PUBLIC_MODULES:
            bad.append(f"{where}:{line} imports {module}")
        elif module == "functional_memopt":
            bad += [f"{where}:{line} imports {n}" for n in names
                    if n not in fm.__all__ and n not in ("testing",)]
    for node in ast.walk(tree):  # fm.X attribute uses
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "fm"
                and node.attr not in fm.__all__ and node.attr != "testing"):
            bad.append(f"{where}:{node.lineno} uses fm.{node.attr}")
    return bad


@pytest.mark.parametrize("folder", ["examples", "benchmarks"])
def test_examples_and_benchmarks_use_public_names_only(folder):
    bad = [b for path in _python_files(folder) for b in _private_uses(path)]
    assert not bad, "private names used:\n" + "\n".join(bad)


def test_the_private_name_check_sees_private_imports_and_attributes(tmp_path):
    # The check above must be able to fail: each kind of private use is reported.
    probe = tmp_path / "probe.py"
    probe.write_text("import functional_memopt as fm\nfrom functional_memopt.train.step import make_loss_fn\n"
                     "x = fm._tree\nfrom functional_memopt import tree_map\n")
    bad = _private_uses(probe)
    assert len(bad) == 3 and "train.step" in bad[0] and "tree_map" in bad[1] and "fm._tree" in bad[2], bad


def test_every_public_name_resolves_once_and_the_surface_stays_small():
    assert len(fm.__all__) == len(set(fm.__all__))
    for name in fm.__all__:
        assert hasattr(fm, name), name
    assert len(fm.__all__) <= 65  # about fifty: a surface a person can hold in mind
    kit = importlib.import_module("functional_memopt.testing")
    for name in kit.__all__:
        assert hasattr(kit, name), name


def test_the_designs_public_surface_keeps_its_names():
    for name in ("ModelConfig", "init_params", "apply", "save_params", "load_params", "save_gpt2", "load_gpt2",
                 "make_train_step", "init_train_state", "remat", "data_parallel", "value_and_grad"):
        assert name in fm.__all__, name


def test_value_and_grad_and_the_step_share_one_default_engine():
    import inspect

    from functional_memopt.train.grad import DEFAULT_ENGINE

    assert DEFAULT_ENGINE == "autograd"
    assert inspect.signature(fm.value_and_grad).parameters["engine"].default == DEFAULT_ENGINE
    assert inspect.signature(fm.make_train_step).parameters["engine"].default == DEFAULT_ENGINE


# Outside app/, nothing prints, reads the command line or reads the environment. Two documented
# exceptions: the process group reads torchrun's variables (torch.distributed's own contract), and
# the memory measurement's child process speaks JSON to its parent on stdout.
_ALLOWED = {("parallel/process_group.py", "os.environ"), ("memory/measure.py", "sys.argv"),
            ("memory/measure.py", "sys.stdout")}


def _effects(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("print", "input"):
            found.add(node.func.id)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            dotted = f"{node.value.id}.{node.attr}"
            if dotted in ("sys.argv", "os.environ", "sys.stdout", "os.getenv"):
                found.add(dotted)
    return found


def test_only_the_app_layer_prints_or_reads_argv_and_the_environment():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("app/"):
            continue
        bad += [f"{rel}: {e}" for e in sorted(_effects(path)) if (rel, e) not in _ALLOWED]
    assert not bad, bad


def test_the_effect_check_sees_a_print(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os, sys\nprint(sys.argv, os.environ)\n")
    assert _effects(probe) == {"print", "sys.argv", "os.environ"}
