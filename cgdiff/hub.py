"""Checkpoint folders on disk and on the Hugging Face Hub: resolve, download, push, model card.

A checkpoint folder (diffusers layout for the model parts):

    unet/config.json, unet/diffusion_pytorch_model.safetensors    the EMA denoiser
    scheduler/scheduler_config.json                                the noise schedule
    cgdiff.json                                                    everything else
    backbone.safetensors                                           only if domain-adapted
    README.md                                                      Hub model card
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Optional

from .scorer import hub_offline

CONFIG_NAME = "cgdiff.json"
REQUIRED_FILES = (CONFIG_NAME, "unet/config.json", "unet/diffusion_pytorch_model.safetensors")
# Only these leave or reach the Hub: weights as safetensors, never pickles or code.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "README.md", "examples/*.png", "*.png"]
HUB_IGNORE_PATTERNS = ["training_state/*", "*.tmp*", ".*"]
# What loading downloads: a checkpoint's own files and nothing else, so a repo id typed into
# the app cannot pull pickles, code or another model's many gigabytes of weights.
HUB_DOWNLOAD_PATTERNS = [CONFIG_NAME, "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                         "scheduler/scheduler_config.json", "backbone.safetensors", "README.md", "examples/*.png"]
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, downloaded or understood; the message says why."""


def looks_like_repo_id(name: str) -> bool:
    return bool(REPO_ID_RE.match(name)) and not name.startswith((".", "/", "~"))


def resolve_checkpoint(
    name_or_path: str | os.PathLike,
    revision: Optional[str] = None,
    endpoint: Optional[str] = None,
    cache_dir: Optional[str | os.PathLike] = None,
) -> Path:
    """A local checkpoint folder for a path or a Hub repo id (downloaded with snapshot_download).

    `endpoint` and `cache_dir` default to huggingface_hub's own (HF_ENDPOINT, HF_HOME)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"'{path}' is a file; a checkpoint is a folder holding {CONFIG_NAME} and unet/.")
        return path
    name = str(name_or_path)
    if not looks_like_repo_id(name):
        raise CheckpointError(
            f"'{name}' is neither an existing checkpoint folder nor a Hugging Face Hub repo id (owner/name)."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(
            snapshot_download(
                name,
                revision=revision,
                allow_patterns=HUB_DOWNLOAD_PATTERNS,
                local_files_only=hub_offline(),
                library_name="cgdiff",
                endpoint=endpoint,
                cache_dir=cache_dir,
            )
        )
    except (RepositoryNotFoundError, GatedRepoError):
        raise CheckpointError(
            f"Hub repo '{name}' does not exist or is private (log in with `hf auth login` for a private one)."
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"Hub repo '{name}' has no revision '{revision}'.") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE=1 is set" if hub_offline() else "the Hub could not be reached"
        raise CheckpointError(
            f"cannot download '{name}': {why} and it is not in the local cache. Pass the path of a "
            "local checkpoint folder or a bundled model's name instead, or retry with network."
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"cannot download '{name}' from the Hub: {type(e).__name__}: {e}") from None


def check_checkpoint_files(folder: Path) -> None:
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if missing:
        pickles = sorted(p.name for p in (folder / "unet").glob("*.bin")) if (folder / "unet").is_dir() else []
        hint = f" (found {pickles}: pickle weights are not loaded, convert them to safetensors)" if pickles else ""
        raise CheckpointError(f"checkpoint folder '{folder}' is missing {', '.join(missing)}{hint}.")


def atomic_replace_dir(tmp: Path, target: Path, keep_extra: bool = True) -> None:
    """Move a fully written folder `tmp` to `target`, replacing it only at the very end.

    Entries of the old folder that the new one lacks (training state, logs) are carried over
    as hard links (a copy across file systems), so replacing a checkpoint loses nothing.

    On Linux the two folders are swapped in one step (renameat2 RENAME_EXCHANGE): a process
    killed at any moment leaves `target` either old or new, never missing. Elsewhere the old
    folder is first renamed aside; a kill between the two renames leaves it there, and
    `recover_replaced_dir` puts it back."""
    if target.exists():
        if keep_extra:
            for entry in target.iterdir():
                dest = tmp / entry.name
                if dest.exists() or entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    shutil.copytree(entry, dest, copy_function=_link_or_copy)
                else:
                    _link_or_copy(entry, dest)
        if _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
            return
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without renameat2 (glibc < 2.28, musl < 1.2.?)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # not supported here: the two renames do it
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def recover_replaced_dir(target: Path) -> bool:
    """Put back a folder that `atomic_replace_dir` renamed aside when the process was killed
    before the new one took its place (only possible without RENAME_EXCHANGE). Returns True
    when it did."""
    if target.exists() or not target.parent.is_dir():
        return False
    prefix = f".{target.name}.old-"
    olds = [p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    if not olds:
        return False
    os.rename(max(olds, key=lambda p: p.stat().st_mtime), target)
    return True


def remove_unfinished(target: Path) -> list[Path]:
    """Delete the temporary folders that saves of `target` left behind when they were killed
    (`.NAME.tmp-*`, never complete) and old copies already replaced (`.NAME.old-*`, once
    `target` exists). Returns what was removed."""
    if not target.parent.is_dir():
        return []
    prefixes = (f".{target.name}.tmp-",) + ((f".{target.name}.old-",) if target.exists() else ())
    removed = [p for p in target.parent.iterdir() if p.name.startswith(prefixes) and p.is_dir()]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def temp_dir_beside(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    return tmp


def push_folder(folder: Path, repo_id: str, token: Optional[str] = None, private: bool = False,
                commit_message: str = "Upload cgdiff detector", endpoint: Optional[str] = None) -> str:
    """Upload a checkpoint folder (weights as safetensors, configs, card) to the Hub."""
    from huggingface_hub import HfApi

    check_checkpoint_files(folder)
    if hub_offline():
        raise CheckpointError("cannot push to the Hub: HF_HUB_OFFLINE=1 is set.")
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        allow_patterns=HUB_ALLOW_PATTERNS,
        ignore_patterns=HUB_IGNORE_PATTERNS,
        commit_message=commit_message,
    )
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
