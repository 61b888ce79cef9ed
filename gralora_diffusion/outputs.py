"""The one output rule: where any command may write (adapters, JSON, grids, cards, class images,
exports, models, markers, locks), checked before anything loads, for the CLI and the Python API alike.

- A file is written atomically (`atomic.atomic_write`), never onto a file the command reads (however it
  is spelled: symlinks, `..`, hard links), never into a training set's folder (the instance or class
  images), and never over an existing file we did not make: that is refused, not replaced.
- A folder a command writes into (`claim_folder`) is new, empty, or one the same command made before
  (it holds `OWNER_FILE`, naming the command). Any other non-empty folder is refused, naming a file in
  it, and so is a folder holding a training set (images or captions we did not write) even if marked.
- The class-images folder differs from the instance folder (`check_training_folders`).

No torch import: the checks run before any model loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from .constants import IMAGE_SUFFIXES
from .errors import GraloraConfigError

OWNER_FILE = ".gralora-diffusion"  # JSON {"command": ...} in every folder a command claims
LEGACY_OWNERS = {".gralora-generate": "generate"}  # markers earlier versions wrote
CAPTION_FILES = ("metadata.jsonl",)


def _resolved(path) -> Path:
    return Path(path).expanduser().resolve()


def same_file(a, b) -> bool:
    """True when `a` and `b` name the same file: equal after resolving symlinks and `..`, or one inode."""
    if _resolved(a) == _resolved(b):
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False


def is_inside(path, folder) -> bool:
    """`path` is `folder` or lies below it (symlinks resolved)."""
    path, folder = _resolved(path), _resolved(folder)
    return path == folder or path.is_relative_to(folder)


def owner(folder) -> str | None:
    """The command that made `folder` (its OWNER_FILE), or None."""
    folder = Path(folder)
    for name, command in LEGACY_OWNERS.items():
        if (folder / name).is_file():
            return command
    try:
        data = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("command") if isinstance(data, dict) and isinstance(data.get("command"), str) else None


def training_set_files(folder, own: re.Pattern | None = None) -> list[str]:
    """Names of image and caption files directly in `folder` that are not ours (`own` matches ours)."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))
    images = {p.stem for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
    return [p.name for p in files
            if (p.suffix.lower() in IMAGE_SUFFIXES and not (own is not None and own.fullmatch(p.name)))
            or p.name in CAPTION_FILES or (p.suffix == ".txt" and p.stem in images)]


def check_not_protected(path, flag: str, protected=(), error=GraloraConfigError) -> None:
    """`path` (a file or folder we would write) is neither a protected folder (the instance or class
    images) nor inside one."""
    for folder, what in _named(protected):
        if is_inside(path, folder):
            raise error(f"{flag} {path}: {'is' if _resolved(path) == _resolved(folder) else 'lies inside'} the {what} "
                        f"folder {folder}; write somewhere else (a training set is never written into).")


def check_output_file(path, flag: str, inputs=(), protected=(), owned=None, error=GraloraConfigError) -> Path:
    """Refuse writing the file `path` when it is one of `inputs` (files the command reads), lies in a
    `protected` folder, exists and is not a regular file, or exists and `owned(path)` is not true (a file
    we did not make is refused, not replaced). Nothing is written here."""
    path = Path(path)
    for source in inputs:
        if source is not None and Path(source).exists() and same_file(path, source):
            raise error(f"{flag} {path}: is {source}, a file this command reads; pick another output path. Nothing was written.")
    check_not_protected(path, flag, protected, error)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise error(f"{flag} {path}: exists and is not a regular file; pick another output path. Nothing was written.")
    if path.exists() and not (owned is not None and owned(path)):
        raise error(f"{flag} {path}: a file gralora-diffusion did not write is there; it is never replaced. "
                    "Pick another path, or move the file away. Nothing was written.")
    return path


def claim_folder(folder, command: str, flag: str = "--output_dir", protected=(), own: re.Pattern | None = None,
                 error=GraloraConfigError, write: bool = True) -> Path:
    """The folder `command` writes into: refused unless new, empty, or made by `command` before (with
    no image or caption file `own` does not match: a training set). Marks it (OWNER_FILE) when `write`.
    Raises `error` naming the folder, a file in it and what to do; nothing is written then."""
    folder = Path(folder)
    check_not_protected(folder, flag, protected, error)
    blocker = next((p for p in [folder, *folder.parents] if p.exists() or p.is_symlink()), None)
    if blocker is not None and not blocker.is_dir():
        raise error(f"{flag} {folder}: {blocker} is a file, so it is not a folder; give a folder path (created if missing).")
    if folder.is_dir():
        made_by = owner(folder)
        entries = sorted(p.name for p in folder.iterdir() if p.name not in (OWNER_FILE, *LEGACY_OWNERS))
        foreign = training_set_files(folder, own if made_by == command else None)
        if foreign:
            raise error(f"{flag} {folder}: holds {len(foreign)} image or caption file(s) {command} did not write "
                        f"(e.g. {foreign[0]}), such as a training set; give a new or empty folder.")
        if entries and made_by != command:
            by = f"`{made_by}` made it" if made_by else f"{command} did not make it"
            raise error(f"{flag} {folder}: not empty ({len(entries)} entries, e.g. {entries[0]}) and {by}; "
                        f"give a new or empty folder, so outputs never mix.")
    if write:
        mark_folder(folder, command)
    return folder


def mark_folder(folder, command: str) -> None:
    """Write OWNER_FILE (atomically) so later runs know `command` made `folder`."""
    from .atomic import atomic_write

    path = Path(folder) / OWNER_FILE
    if owner(folder) == command and path.is_file():
        return
    text = json.dumps({"command": command, "note": "written by gralora-diffusion: the outputs beside this file are its own"})
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))


def check_training_folders(instance_dir, class_dir=None, output_dir=None, error=GraloraConfigError) -> None:
    """Training's folders kept apart: the class images are not the instance images (either inside the
    other), and the output folder is neither of them nor inside them."""
    if instance_dir and class_dir and (is_inside(class_dir, instance_dir) or is_inside(instance_dir, class_dir)):
        raise error(f"--class_data_dir {class_dir}: overlaps --instance_data_dir {instance_dir}; generated class "
                    "images would mix with the subject's photos. Give a separate folder.")
    protected = [(instance_dir, "instance images"), (class_dir, "class images")]
    if output_dir:
        check_not_protected(output_dir, "--output_dir", protected, error)


def _named(protected) -> list[tuple[Path, str]]:
    """[(folder, what)] from folders or (folder, what) pairs; None left out."""
    named = []
    for item in protected:
        folder, what = item if isinstance(item, tuple) else (item, "instance images")
        if folder is not None:
            named.append((Path(folder), what))
    return named


def is_our_card(path) -> bool:
    """A README.md we wrote: the model card's front matter with our tag."""
    try:
        head = Path(path).read_text(encoding="utf-8", errors="replace")[:4000]
    except OSError:
        return False
    return head.startswith("---") and "library_name: diffusers" in head and "- gralora" in head


def check_train_output(cfg, error=GraloraConfigError) -> None:
    """Training's outputs (adapter, card, config, samples, checkpoints, class images): the folders kept
    apart (`check_training_folders`); a folder holding a finished run is refused unless the run is
    resumed (--resume_from_checkpoint) or replaced on purpose (--overwrite_output_dir); a README.md that
    is not our model card is never replaced by one."""
    from .constants import CARD_NAME, LORA_WEIGHT_NAME, WEIGHT_NAME

    class_dir = cfg.class_data_dir if cfg.with_prior_preservation else None
    check_training_folders(cfg.instance_data_dir, class_dir, cfg.output_dir, error)
    out = Path(cfg.output_dir).expanduser()
    if not out.is_dir():
        return
    finished = [name for name in (WEIGHT_NAME, LORA_WEIGHT_NAME) if (out / name).is_file()]
    if finished and not (getattr(cfg, "overwrite_output_dir", False) or cfg.resume_from_checkpoint):
        raise error(f"--output_dir {out}: holds a finished run ({finished[0]}); give another --output_dir, "
                    "--resume_from_checkpoint latest to continue it, or --overwrite_output_dir to train it again.")
    card = out / CARD_NAME
    if (card.exists() or card.is_symlink()) and not (card.is_file() and not card.is_symlink() and is_our_card(card)):
        raise error(f"--output_dir {out}: its {CARD_NAME} is not a model card gralora-diffusion wrote and would be "
                    "replaced by one; give another --output_dir, or move the file away.")
