"""Optional packages: the extras of pyproject.toml, asked for before a command writes anything.

A command that needs a package an extra brings calls `require(module, extra, what)` first: where the
package is missing, `MissingPackageError` says in one line what needs it and how to install it, and
the CLI exits 2 with that line (README "Exit codes"), having written nothing. A store's package
(`gs://` needs gcsfs, ...) is found missing where the store is opened (`pipeline.io.storage.open_fs`).

The error is an ImportError, so code that falls back where a package is absent (a TIFF decoded whole
without tifffile) keeps working with it, and a leaf: no other module of segpipe is imported here.
"""

from __future__ import annotations

import importlib


class MissingPackageError(ImportError):
    """An optional package that a command needs is not installed; the message names the extra."""


def require(module: str, extra: str, what: str) -> None:
    """MissingPackageError when `module` cannot be imported: "`what` needs `module`: pip install
    'segpipe[`extra`]'". Importing it is the check (a broken install counts as missing)."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise MissingPackageError(f"{what} needs {module}: pip install 'segpipe[{extra}]'") from None


def store_package_missing(uri: str, exc: ImportError) -> MissingPackageError:
    """fsspec's ImportError for a store whose package is not installed ("Install s3fs to access S3",
    "Please install gcsfs to access Google Storage") as one line naming the URI."""
    return MissingPackageError(f"{uri}: the store's package is not installed ({' '.join(str(exc).split())})")
