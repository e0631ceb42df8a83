"""Everything about the package is in pyproject.toml; this file only adds one file to the install:
lmforge-lm-eval.pth, which makes `lm_eval --model lmforge` work (see src/lmforge/lm_eval_hook.py).
setuptools has no pyproject setting for a top-level .pth file."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "lmforge-lm-eval.pth"


class build_py_with_pth(build_py):
    """build_py, plus the .pth at the top of site-packages (beside the package, not inside it)."""

    def run(self) -> None:
        super().run()
        # an editable install keeps only path entries from build_lib; its wheel is assembled in
        # the install directory, so the .pth goes there
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(os.path.join("src", PTH), os.path.join(target, PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": build_py_with_pth})
