"""The one build step pyproject.toml cannot say: ship the repo's jobs/ and schemas/ in the package.

The checkout keeps its job specs (jobs/) and table contracts (schemas/) at its top level: the
single source, never copied in git. When a wheel is built (`pip wheel .`, `python -m build`,
a plain `pip install .`), build_py copies both folders into the built package as
pipeline/_data/jobs and pipeline/_data/schemas, where pipeline.resources.data_path finds them.
An editable install (`pip install -e .`, `make install`) copies nothing: data_path reads the
checkout's folders. MANIFEST.in puts both folders in the sdist, so a wheel built from it has them.
Everything else (metadata, dependencies, packages) is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("jobs", "schemas")  # top-level folders -> pipeline/_data/<name>


class BuildPyWithData(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            return
        for name in SHIPPED:
            src, dst = ROOT / name, Path(self.build_lib, "pipeline", "_data", name)
            if not src.is_dir():
                raise FileNotFoundError(f"{src}: the package ships this folder and it is missing")
            shutil.rmtree(dst, ignore_errors=True)  # a file deleted from the checkout does not linger
            for file in sorted(src.rglob("*")):
                if file.is_file() and "__pycache__" not in file.parts:
                    self.mkpath(str((dst / file.relative_to(src)).parent))
                    self.copy_file(str(file), str(dst / file.relative_to(src)))


setup(cmdclass={"build_py": BuildPyWithData})
