"""Where the data that ships with qwen-batch is: the job specs (jobs/) and the table contracts
(schemas/).

The checkout keeps both folders at its top level, the single source. A wheel carries a copy
inside the package, pipeline/_data/ (setup.py's build hook puts it there); an editable install
or a source tree has none and reads the checkout's folders.
"""

from __future__ import annotations

from pathlib import Path

# The package's own folder, not importlib.resources.files("pipeline"): pipeline is a namespace
# package (no __init__.py), which files() cannot open under the editable install's import hook
# (NotADirectoryError, Python 3.11); a wheel is installed unpacked, so its data is beside this file.
PACKAGED = Path(__file__).resolve().parent / "_data"
# The checkout this package was imported from, if it was: the folder above pipeline/ that
# holds pyproject.toml (an installed package sits in site-packages, which has none).
_ABOVE = PACKAGED.parent.parent
CHECKOUT = _ABOVE if (_ABOVE / "pyproject.toml").is_file() else None


def data_path(*parts: str) -> Path:
    """The shipped file or folder PARTS (e.g. "schemas", "results_chat.json"): the installed
    package's copy (pipeline/_data/...) first, else the checkout's top-level one.
    FileNotFoundError naming both places when neither has it."""
    packaged = PACKAGED.joinpath(*parts)
    if packaged.exists():
        return packaged
    checkout = CHECKOUT.joinpath(*parts) if CHECKOUT else None
    if checkout is not None and checkout.exists():
        return checkout
    looked = ", ".join(str(p) for p in (packaged, checkout) if p is not None)
    raise FileNotFoundError(f"{'/'.join(parts)} is missing (looked in {looked}): an incomplete install; a wheel "
                            "built with this project's setup.py ships jobs/ and schemas/ in pipeline/_data/")
