"""Files tests write into the host's model folders (`<host>/models/...`): recorded and removed again, so that
after a session the folders hold what setup put there (conftest checks it)."""
from __future__ import annotations

import pathlib
import shutil


class ModelFiles:
    """Paths in the host's model folders that one fixture owns; `remove()` deletes them, newest first."""

    def __init__(self, models_dir: pathlib.Path):
        self.models_dir = pathlib.Path(models_dir)
        self.created: list[pathlib.Path] = []

    def path(self, folder: str, name: str) -> pathlib.Path:
        """`models/<folder>/<name>`, recorded for removal (the folder is made if absent)."""
        directory = self.models_dir / folder
        directory.mkdir(parents=True, exist_ok=True)
        return self.track(directory / name)

    def track(self, path: pathlib.Path) -> pathlib.Path:
        path = pathlib.Path(path)
        if path not in self.created:
            self.created.append(path)
        return path

    def track_new(self, folder: str, before: set[str]) -> None:
        """Records what appeared in `models/<folder>` since `before` (a writer that names its own files)."""
        for path in sorted((self.models_dir / folder).iterdir()):
            if path.name not in before:
                self.track(path)

    def remove(self) -> None:
        for path in reversed(self.created):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        self.created.clear()


def listing(models_dir: pathlib.Path) -> set[str]:
    """Every file below the model folders, relative to them (the folders themselves are the host's or setup's)."""
    models_dir = pathlib.Path(models_dir)
    if not models_dir.is_dir():
        return set()
    return {str(path.relative_to(models_dir)) for path in models_dir.rglob("*") if not path.is_dir()}
