"""Models named on the Hugging Face hub ("org/name"), fetched one file at a time through
``huggingface_hub`` (optional: ``pip install "txl_fast[hub]"``) into its cache.

Which files are fetched is the callers' choice (checkpoint.py: config.json and the weights;
tokenizer.py: one vocabulary file); nothing here lists a repository or downloads a snapshot, so
what loading does not need (tf_model.h5, corpus.bin, ...) is never fetched. ``hf_hub_download``
keeps each commit's files in one cache directory (``snapshots/<commit>/``), where the local
loaders then read them. The cache is huggingface_hub's: ``HF_HOME``, ``HF_HUB_CACHE`` (read here
too, as huggingface_hub < 0.18 knows only ``HUGGINGFACE_HUB_CACHE``) or ``cache_dir=``;
``HF_HUB_OFFLINE=1`` or ``local_files_only=True`` use the cache alone.

Errors tell a file the revision lacks (FileNotFoundError) from one that is not cached while the hub
cannot be asked (FileNotFoundError saying why: offline, local_files_only, no connection), name the
repository, the revision and the file, and fit on one line.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

HUB_MISSING = 'loading a model by its Hugging Face hub name needs huggingface_hub: pip install "txl_fast[hub]"'

# huggingface_hub's repo ids: "name" or "org/name" of letters, digits, "_", "-", "." (word characters at both
# ends of each part), no "--" or "..", at most 96 characters
_REPO_ID = re.compile(r"(?:\w(?:[\w.-]*\w)?/)?\w(?:[\w.-]*\w)?")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def is_hub_name(name) -> bool:
    """A str that names no existing path and reads as a hub repo id. Paths (os.PathLike) are always local."""
    return (isinstance(name, str) and not os.path.exists(name) and len(name) <= 96
            and _REPO_ID.fullmatch(name) is not None and "--" not in name and ".." not in name)


def check_args(revision, local_files_only, cache_dir) -> None:
    """The hub keywords of ``from_pretrained``, checked before anything is read."""
    if revision is not None and not isinstance(revision, str):
        raise TypeError(f"revision must be a str (a branch, tag or commit), got {type(revision).__name__}")
    if isinstance(revision, str) and not revision.strip():
        raise ValueError("revision is empty: give a branch, tag or commit, or leave it out for main")
    if not isinstance(local_files_only, bool):
        raise TypeError(f"local_files_only must be True or False, got {local_files_only!r}")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be a path, got {type(cache_dir).__name__}")


def repo_for(name, *, revision=None, local_files_only=False, cache_dir=None) -> Optional[HubRepo]:
    """The hub repository ``name`` names, or None for a local path (which ``revision`` cannot apply to)."""
    check_args(revision, local_files_only, cache_dir)
    if is_hub_name(name):
        return HubRepo(name, revision=revision, local_files_only=local_files_only, cache_dir=cache_dir)
    if revision is not None:
        raise ValueError(f"revision={revision!r} picks a revision of a Hugging Face hub model; {name} is a local path")
    return None


def _huggingface_hub(name: str):
    try:
        import huggingface_hub  # noqa: PLC0415 (optional: the hub extra)
        import huggingface_hub.constants  # noqa: PLC0415
        import huggingface_hub.utils  # noqa: PLC0415
    except ImportError:
        raise ValueError(f"{name} is no local directory; {HUB_MISSING}") from None
    return huggingface_hub


class HubRepo:
    """One revision of a hub model repository. ``fetch`` downloads (or finds in the cache) one file;
    after the first, the revision is pinned to that file's commit, so all files come from one commit."""

    def __init__(self, repo_id: str, *, revision: Optional[str] = None, local_files_only: bool = False,
                 cache_dir=None):
        self._hf = _huggingface_hub(repo_id)
        self.repo_id = repo_id
        self.revision = revision or "main"
        self.local_files_only = local_files_only
        self.cache_dir = cache_dir if cache_dir is not None else os.environ.get("HF_HUB_CACHE") or None
        self._commit: Optional[str] = None
        self._not_cached: list[str] = []           # files fetch found neither in the cache nor asked the hub for

    def __str__(self) -> str:
        return f"{self.repo_id} (revision {self.revision})"

    def _offline_reason(self) -> str:
        if self.local_files_only:
            return "local_files_only is set"
        if self._hf.constants.HF_HUB_OFFLINE:
            return "HF_HUB_OFFLINE is set"
        return "the hub could not be reached"

    def fetch(self, filename: str) -> Optional[Path]:
        """The file's path in the cache, downloaded if needed; None when the revision has no such file,
        or when it is not cached and the hub cannot be asked (``missing`` tells which)."""
        errors = self._hf.utils
        try:
            path = Path(self._hf.hf_hub_download(
                self.repo_id, filename, revision=self._commit or self.revision,
                local_files_only=self.local_files_only, cache_dir=self.cache_dir))
        except errors.LocalEntryNotFoundError:       # before EntryNotFoundError: a subclass of it in < 1.0
            self._not_cached.append(filename)
            return None
        except errors.EntryNotFoundError:
            return None
        except errors.RevisionNotFoundError:
            raise FileNotFoundError(f"{self.repo_id} has no revision {self.revision!r} on the Hugging Face hub") \
                from None
        except errors.RepositoryNotFoundError:       # gated and private ones too, without a token that may read them
            raise FileNotFoundError(f"{self.repo_id} is neither a local directory nor a model repository on the "
                                    "Hugging Face hub that can be read (private or gated ones need a login)") from None
        except (errors.HfHubHTTPError, OSError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FileNotFoundError(f"{self}: {filename} could not be downloaded: {reason}") from None
        if self._commit is None and _COMMIT.fullmatch(path.parent.name):
            self._commit = path.parent.name                         # snapshots/<commit>/<filename>
        return path

    def missing(self, filenames: tuple[str, ...]) -> FileNotFoundError:
        """The error for none of ``filenames`` found: absent from the revision, or not cached and why."""
        names = " or ".join(filenames)
        if any(name in self._not_cached for name in filenames):
            return FileNotFoundError(f"{self}: {names} is not in the local cache and {self._offline_reason()}")
        return FileNotFoundError(f"{self} holds no {names}")

    def require(self, filename: str) -> Path:
        path = self.fetch(filename)
        if path is None:
            raise self.missing((filename,))
        return path
