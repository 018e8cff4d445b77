"""The house rules the code keeps by structure, checked on the source: one owner of the run
folder's names, one base for the errors users meet, a data card that never loads a model."""

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import tailor
from tailor.errors import TailorError
from tailor.runs import Run

ROOT = Path(tailor.__file__).parent


def _sources():
    for path in sorted(ROOT.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"), str(path))


def test_only_the_run_object_spells_the_run_folder_names():
    # job.yaml and data/ also name the advisor's and the quickstart's own files, gguf the format; the
    # rest are the run folder's alone
    names = {name.rstrip("/") for name, _ in Run.layout()} - {"job.yaml", "data", "model", "adapter", "eval", "export",
                                                                "checkpoints", "tensorboard", "stages", "gguf"}
    spelled = [f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}" for path, tree in _sources()
               if path.name != "runs.py" for node in ast.walk(tree)
               if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names]
    assert not spelled, "read and write run folders through tailor.runs.Run: " + ", ".join(spelled)


def test_no_package_imports_the_training_engine_for_files():
    # file handling lives in tailor/files.py; the run folder in tailor/runs.py
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module != "tailor.train.rundir", f"{path}: use tailor.files or tailor.runs"


def test_the_data_card_only_renders():
    card = ast.parse((ROOT / "data" / "card.py").read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(card) if isinstance(n, ast.ImportFrom)} | \
        {a.name for n in ast.walk(card) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and m.startswith(("tailor.models", "tailor.train", "torch"))}, imported


def test_every_error_a_user_can_meet_is_a_tailor_error():
    modules = [importlib.import_module(m.name) for m in pkgutil.walk_packages([str(ROOT)], "tailor.")
               if not m.name.endswith(("vllm_engine", "__main__"))]
    errors = {cls for module in modules for _, cls in inspect.getmembers(module, inspect.isclass)
              if issubclass(cls, Exception) and cls.__module__.startswith("tailor.")
              and not cls.__name__.startswith("_")}
    assert len(errors) >= 15
    assert not [cls.__qualname__ for cls in errors if not issubclass(cls, TailorError)]
