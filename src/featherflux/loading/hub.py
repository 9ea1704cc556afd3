"""Downloads from the Hugging Face hub, through `huggingface_hub`: its cache, its token, its progress bars, resumable.

- Only what a run needs: every component's config (a few KB), and the weights of the components not in `skip`
  (no `text_encoder/` for a remote encoder or prompt embeddings, no `transformer/` when a file replaces it).
- `model_index.json` comes first, so a repo that is not a FLUX.2 pipeline is refused before any large file moves.
- An interrupted download leaves `huggingface_hub`'s partial files in the cache, and the next call resumes them.
- `download_size` answers `featherflux plan REPO_ID` without downloading anything.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from pathlib import Path

from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    DryRunError,
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from featherflux.errors import MissingFileError, UserError

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
PIPELINE_CLASSES = ("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinKVPipeline")


def is_repo_id(name: str) -> bool:
    """"owner/name" that is not a local path."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).expanduser().exists()


def needed_files(skip: Collection[str] = ()) -> list[str]:
    """`allow_patterns` of the files a run needs: the index, every config, the components not skipped."""
    unknown = set(skip) - set(COMPONENTS)
    if unknown:
        raise UserError(f"unknown pipeline component(s) {sorted(unknown)}; components are {', '.join(COMPONENTS)}")
    return ["model_index.json", "*/config.json", *(f"{c}/*" for c in COMPONENTS if c not in skip)]


def _hub(call: Callable, repo_id: str, **kwargs):
    """`call(repo_id, **kwargs)` with the hub's errors turned into messages that say what to do."""
    page = f"{constants.ENDPOINT}/{repo_id}"
    try:
        return call(repo_id, **kwargs)
    except GatedRepoError:
        raise UserError(
            f"{repo_id} is gated: accept its licence at {page} while logged in there, then log in here with "
            "`hf auth login` (or set HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{repo_id} is not on the hub ({page}); check the name, or log in with `hf auth login` if it is private"
        ) from None
    except RevisionNotFoundError:
        raise UserError(f"{repo_id} has no revision {kwargs.get('revision')!r}") from None
    except (LocalEntryNotFoundError, DryRunError) as e:  # offline, or the hub did not answer
        raise UserError(f"cannot reach the hub for {repo_id} ({constants.ENDPOINT}): {e}") from None
    except EntryNotFoundError:
        raise UserError(f"{repo_id} has no model_index.json: it is not a diffusers pipeline") from None
    except HfHubHTTPError as e:
        raise UserError(f"the hub refused {repo_id}: {e}") from None


def _check_pipeline(index_path: str, repo_id: str) -> None:
    cls = json.loads(Path(index_path).read_text()).get("_class_name")
    if cls not in PIPELINE_CLASSES:
        raise UserError(f"{repo_id} holds a {cls} pipeline, not FLUX.2 ({', '.join(PIPELINE_CLASSES)}); not downloaded")


def cached(repo_id: str, *, revision: str | None = None) -> Path:
    """The pipeline folder of `repo_id` already in the local Hugging Face cache; nothing is downloaded."""
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise MissingFileError(
            f"{repo_id} is not a folder and not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); "
            f"pass download=True to load_pipeline (or --download), or fetch it first with `featherflux pull "
            f"{repo_id}` (accept the model's licence on huggingface.co first if it is gated), or pass the path of a "
            "local pipeline folder"
        ) from None


def download(repo_id: str, *, revision: str | None = None, skip: Collection[str] = ()) -> Path:
    """The pipeline folder of `repo_id` in the Hugging Face cache, after fetching what is missing of the files a run
    needs (see `needed_files`)."""
    patterns = needed_files(skip)
    _check_pipeline(_hub(hf_hub_download, repo_id, filename="model_index.json", revision=revision), repo_id)
    return Path(_hub(snapshot_download, repo_id, revision=revision, allow_patterns=patterns))


def download_size(repo_id: str, *, revision: str | None = None, skip: Collection[str] = ()) -> tuple[int, int]:
    """(bytes a run needs, bytes of them not in the cache yet), from the hub's file list; nothing is downloaded."""
    # the index first: the hub's own errors (gated, not found) are lost in a dry run's "cannot be accessed"
    _check_pipeline(_hub(hf_hub_download, repo_id, filename="model_index.json", revision=revision), repo_id)
    files = _hub(snapshot_download, repo_id, revision=revision, allow_patterns=needed_files(skip), dry_run=True)
    total = sum(f.file_size or 0 for f in files)
    return total, sum(f.file_size or 0 for f in files if f.will_download)
