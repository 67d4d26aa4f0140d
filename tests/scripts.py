"""The repository's scripts as modules, for tests: bench/*.py and setup.py."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


def load_bench(name: str):
    """The script bench/<name>.py as a module, registered under its name: the scripts import
    each other by name (bench/ is on sys.path when one runs), and dataclasses look their
    module up in sys.modules."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def load_setup():
    """setup.py as a module (it builds only when run as __main__)."""
    spec = importlib.util.spec_from_file_location("neptune_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
