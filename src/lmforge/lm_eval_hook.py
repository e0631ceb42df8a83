"""`lm_eval --model lmforge`: registers lmforge's model class with lm-eval's own command line.

lm-eval 0.4 looks models up only in its built-in table (`MODEL_MAPPING` in lm_eval/models) and
reads no plugin entry points. So lmforge installs a .pth file that imports this module when
Python starts. It imports nothing but the standard library: it waits for `lm_eval.models` to be
imported, then adds one lazy entry, "lmforge" -> "lmforge.harness:LMForgeLM". lmforge.harness
(and torch) load only when lm-eval is asked for that model. (The finder and loader are duck-typed,
not importlib.abc subclasses: one import less at every start-up.)
"""

from __future__ import annotations

import sys

NAME, TARGET = "lmforge", "lmforge.harness:LMForgeLM"
WATCHED = "lm_eval.models"


def register(models_module) -> None:
    """Add the lazy entry to an imported lm_eval.models (and its registry)."""
    models_module.MODEL_MAPPING.setdefault(NAME, TARGET)
    from lm_eval.api.registry import model_registry

    if NAME not in model_registry:
        model_registry.register(NAME, target=TARGET)


class _RegisterAfter:
    """lm_eval.models' own loader, followed by `register` once the module has run."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        try:
            register(module)
        except Exception as e:  # a future lm-eval without this table: leave lm-eval working
            print(f"note: lmforge could not register --model lmforge with lm-eval ({e}); "
                  "use `python -m lmforge.harness` instead", file=sys.stderr)

    def __getattr__(self, name: str):  # is_package, get_resource_reader, ...: the real loader's
        return getattr(self.loader, name)


class _Watch:
    """Finds nothing itself; wraps the loader the other finders return for lm_eval.models."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisterAfter(spec.loader)
                return spec
        return None


def install() -> None:
    if WATCHED in sys.modules:
        register(sys.modules[WATCHED])
    elif not any(isinstance(f, _Watch) for f in sys.meta_path):
        sys.meta_path.insert(0, _Watch())


install()
