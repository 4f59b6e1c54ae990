"""Output folders that never lose earlier results.

Every command that writes results (demo, DLG sweeps, audits, the simulator) goes through
:func:`prepare_output_dir`. The folder gets a small manifest, ``.sf-ext-run.json``, holding the
settings of the run that uses it and the files that run wrote. On the next run into the same
folder:

* same settings: the folder is reused as it is (``OutputDir.resumed`` is True), so a caller can
  read finished results back or skip work already done;
* different settings, or a folder with files sf-ext did not write: refused with
  :class:`OutputDirError`, which names the folder and ``--overwrite``;
* ``overwrite=True``: the files the manifest lists (the previous run's own outputs) are removed,
  anything else in the folder is left alone, and the folder is re-used for the new settings.

Settings are compared after a JSON round trip (tuples become lists, paths strings), so pass
plain values.
"""

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

MANIFEST = ".sf-ext-run.json"
STATUS_RUNNING = "running"
STATUS_COMPLETE = "complete"

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]


class OutputDirError(ValueError):
    """The output folder holds results that the requested run would overwrite."""


def _normalized(settings: Mapping[str, Any]) -> Dict[str, Any]:
    if not isinstance(settings, Mapping):
        raise TypeError(f"settings must be a mapping, got {type(settings).__name__}")
    return json.loads(json.dumps(dict(settings), sort_keys=True, default=str))


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 4) -> str:
    keys = sorted(set(old) | set(new))
    changed = [k for k in keys if old.get(k, "<unset>") != new.get(k, "<unset>")]
    shown = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in changed]
    more = f" (and {len(shown) - limit} more)" if len(shown) > limit else ""
    return "; ".join(shown[:limit]) + more


@dataclass
class OutputDir:
    """A prepared output folder (see :func:`prepare_output_dir`).

    Attributes:
        path: The folder.
        settings: The settings recorded for it.
        resumed: True when the folder already held a run with the same settings.
        files: Files recorded so far (relative to ``path``).
        status: ``"running"`` until :meth:`complete` is called, then ``"complete"``.
    """

    path: Path
    settings: Dict[str, Any]
    resumed: bool = False
    files: List[str] = field(default_factory=list)
    status: str = STATUS_RUNNING

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __truediv__(self, other) -> Path:
        return self.path / other

    @property
    def manifest(self) -> Path:
        return self.path / MANIFEST

    @property
    def complete_before(self) -> bool:
        """True when the earlier run with these settings finished (its results can be read back)."""
        return self.resumed and self.status == STATUS_COMPLETE

    def record(self, *paths: PathLike) -> None:
        """Add files to the manifest, so a later ``--overwrite`` removes them.

        Args:
            *paths: Files inside the folder, as paths (absolute or relative to the current
                directory) or as names relative to the folder.
        """
        root = self.path.resolve()
        for path in paths:
            path = Path(path)
            resolved = path.resolve()
            if root in resolved.parents:
                name = resolved.relative_to(root).as_posix()
            elif not path.is_absolute() and root in (root / path).resolve().parents:
                name = path.as_posix()
            else:
                raise ValueError(f"{path} is not inside the output folder {self.path}")
            if name not in self.files:
                self.files.append(name)
        self._write()

    def complete(self, *paths: PathLike) -> None:
        """Record the last files and mark the run finished."""
        self.status = STATUS_COMPLETE
        self.record(*paths)

    def _write(self) -> None:
        payload = {
            "settings": self.settings,
            "files": self.files,
            "status": self.status,
            "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        tmp = self.manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.manifest)


def read_manifest(path: PathLike) -> Optional[Dict[str, Any]]:
    """The manifest of an output folder, or ``None`` when it has none."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise OutputDirError(
            f"{file} is not valid JSON ({exc}); remove it or choose another folder"
        )


def _clear_recorded(folder: Path, files: Iterable[str]) -> List[str]:
    removed = []
    root = folder.resolve()
    for name in files:
        target = (folder / name).resolve()
        if root not in target.parents:  # never leave the folder, whatever the manifest says
            continue
        if target.is_file():
            target.unlink()
            removed.append(name)
    # Remove sub-folders the run created and that are now empty (deepest first).
    for name in sorted(
        {str(Path(n).parent) for n in files if Path(n).parent != Path(".")}, key=len, reverse=True
    ):
        sub = folder / name
        while sub != folder and sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()
            sub = sub.parent
    return removed


def prepare_output_dir(
    path: PathLike, settings: Mapping[str, Any], overwrite: bool = False
) -> OutputDir:
    """Create or re-use an output folder without destroying earlier results silently.

    Args:
        path: The folder the user chose.
        settings: Everything that determines the results (the run's configuration).
        overwrite: Replace an earlier run with other settings: its recorded files are removed
            (other files in the folder are kept).

    Returns:
        An :class:`OutputDir`; ``resumed`` says whether an earlier run with the same settings was
        found (``complete_before`` whether it finished).

    Raises:
        OutputDirError: The folder holds another run's results (or files sf-ext did not write)
            and ``overwrite`` is False; or ``path`` is a file.
    """
    folder = Path(path)
    wanted = _normalized(settings)
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"output folder {folder} is a file; choose a folder")
    manifest = read_manifest(folder) if folder.is_dir() else None
    if manifest is not None and manifest.get("settings") == wanted:
        return OutputDir(
            folder,
            wanted,
            resumed=True,
            files=list(manifest.get("files", [])),
            status=manifest.get("status", STATUS_RUNNING),
        )
    if manifest is not None:
        if not overwrite:
            raise OutputDirError(
                f"output folder {folder} holds results of a run with other settings "
                f"({_differences(manifest.get('settings', {}), wanted)}); choose another folder "
                "or pass --overwrite to replace them"
            )
        removed = _clear_recorded(folder, manifest.get("files", []))
        log.info("removed %d files of the earlier run in %s", len(removed), folder)
    elif folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise OutputDirError(
                f"output folder {folder} already holds files that sf-ext did not record; choose "
                "an empty or new folder, or pass --overwrite to write into it (files of the "
                "same name are replaced, others are kept)"
            )
        log.warning("writing into %s, which holds files sf-ext did not record", folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = OutputDir(folder, wanted)
    out._write()
    return out


__all__ = [
    "MANIFEST",
    "OutputDir",
    "OutputDirError",
    "prepare_output_dir",
    "read_manifest",
]
