"""Checkpoints on the Hugging Face Hub: ``org/name[@revision]`` wherever a checkpoint directory is taken.

::

    resolve_checkpoint("runs/coco/checkpoint")       # an existing directory: itself
    resolve_checkpoint("my-org/capdec-coco")          # the Hub: main, downloaded once into the HF cache
    resolve_checkpoint("my-org/capdec-coco@v1.0")     # a branch, tag or commit
    push_checkpoint("runs/coco/checkpoint", "my-org/capdec-coco", license="mit")

Resolution goes through ``huggingface_hub.snapshot_download``, so everything the user configured for
Hugging Face applies: the cache (``HF_HOME``, ``HF_HUB_CACHE``), offline mode (``HF_HUB_OFFLINE=1``:
the cache only), tokens (``hf auth login``, ``HF_TOKEN``) and the endpoint (``HF_ENDPOINT``).
An existing path always wins over a repo id of the same spelling; a path that does not exist is taken
for a repo id only if it looks like one (``owner/name``, no leading ``/``, ``.`` or ``~``).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from capdec import __version__
from capdec.errors import CapdecError, InputError

logger = logging.getLogger(__name__)

# owner and name as the Hub allows them (letters, digits, - _ .), then an optional @revision
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<revision>.+))?$", re.ASCII)
# a revision: a commit hash, or a branch / tag name as git allows them (check-ref-format), in ASCII letters,
# digits and . _ - : slash-separated parts, none empty, none starting with '.' or ending with '.lock', no '..'.
# Nothing else reaches huggingface_hub, which joins the revision into paths of its cache.
_REF_PART = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$", re.ASCII)
# never downloaded for inference: the optimizer state of a resumable checkpoint
INFERENCE_IGNORE = ["training/*"]


class HubError(CapdecError):
    """A Hub repo could not be resolved or written; the message says why and what to do."""


def parse_repo_id(text: str) -> tuple[str, str | None] | None:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; None when ``text`` is not shaped like a repo id.

    A repo id whose revision is not a branch, tag or commit name (``org/name@/abs/path``, ``@../x``) is an
    :class:`InputError`: it is never handed to huggingface_hub.
    """
    m = _REPO_ID.match(text)
    if m is None or ".." in m.group("repo") or m.group("repo").endswith((".", "-")):
        return None
    revision = m.group("revision")
    if revision is not None and not is_revision(revision):
        raise InputError(f"{text!r}: the revision {revision!r} is not a branch, tag or commit name (letters, "
                         "digits, '.', '_', '-' in '/'-separated parts, no '..', no part starting with '.')")
    return m.group("repo"), revision


def is_revision(text: str) -> bool:
    """Whether ``text`` is shaped like a branch, tag or commit name (see ``_REF_PART``)."""
    parts = text.split("/")
    return (len(text) <= 255 and ".." not in text
            and all(_REF_PART.match(part) and not part.endswith(".lock") for part in parts))


def is_repo_id(path_or_id: str | os.PathLike) -> bool:
    """True when ``path_or_id`` would be resolved on the Hub (it is no existing path and looks like an id)."""
    text = os.fspath(path_or_id)
    return not os.path.exists(text) and parse_repo_id(text) is not None


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError as e:  # pragma: no cover - a dependency of transformers
        raise HubError("Hub repo ids need the huggingface_hub package: pip install huggingface_hub") from e
    return huggingface_hub


def _network_errors() -> tuple[type[BaseException], ...]:
    """The transport errors (no network, DNS, timeouts) of the HTTP client huggingface_hub uses."""
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx", "requests"):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        for name in ("TransportError", "ConnectionError", "Timeout"):
            cls = getattr(mod, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                errors.append(cls)
    return tuple(errors)


def resolve_checkpoint(path_or_id: str | os.PathLike, *, token: str | bool | None = None) -> Path:
    """A local checkpoint directory for a directory or a Hub repo id (downloaded into the HF cache).

    Anything that is not an existing path and not shaped like a repo id is returned as a Path, so the
    caller's "not a checkpoint" message names it.
    """
    text = os.fspath(path_or_id)
    if os.path.exists(text):
        return Path(text)
    parsed = parse_repo_id(text)
    if parsed is None:
        return Path(text)
    repo_id, revision = parsed
    hub = _hub()
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{text!r} is not a local directory; as a Hugging Face Hub repo id"
    offline = constants.HF_HUB_OFFLINE
    try:
        local = hub.snapshot_download(repo_id, revision=revision, token=token, ignore_patterns=INFERENCE_IGNORE,
                                      library_name="capdec", library_version=__version__)
    except RevisionNotFoundError as e:
        raise HubError(f"{where}: revision {revision!r} does not exist in {repo_id}") from e
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise HubError(f"{where}: {repo_id} was not found, or it is private or gated and no token with access "
                       "was given (hf auth login, or HF_TOKEN)") from e
    except LocalEntryNotFoundError as e:  # offline, or the Hub unreachable, and nothing in the cache
        why = ("offline mode is on (HF_HUB_OFFLINE=1)" if offline
               else "the Hub cannot be reached")
        raise HubError(f"{where}: {why} and the cache {constants.HF_HUB_CACHE} holds no copy of "
                       f"{repo_id}{'@' + revision if revision else ''}. Download it once with network access "
                       "(or copy the checkpoint directory and give its path)") from e
    except HfHubHTTPError as e:
        raise HubError(f"{where}: the Hub answered with an error ({e})") from e
    except (OSError, ValueError) as e:  # an incomplete snapshot, a bad token file, a full disk
        raise HubError(f"{where}: {type(e).__name__}: {e}") from e
    logger.info("%s resolved to %s", text, local)
    return Path(local)


def push_checkpoint(path: str | os.PathLike, repo_id: str, *, revision: str | None = None, private: bool = False,
                    token: str | bool | None = None, commit_message: str | None = None,
                    license: str | None = None, include_training_state: bool = False,
                    dry_run: bool = False) -> str | list[str]:
    """Upload a checkpoint directory to ``repo_id`` (created if missing), its model card rewritten first.

    Returns the commit URL, or with ``dry_run`` the files that would be uploaded (the card is still
    rewritten). The training state (``training/``: optimizer moments) is left out unless asked for.
    """
    from capdec.model_card import write_model_card  # (not capdec.checkpoint: it imports this module)

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path} is not a checkpoint directory")
    parsed = parse_repo_id(repo_id)
    if parsed is None or parsed[1] is not None:
        raise InputError(f"{repo_id!r} is not a Hub repo id: give owner/name (a branch goes in --revision)")
    if revision is not None and not is_revision(revision):
        raise InputError(f"--revision {revision!r} is not a branch name (letters, digits, '.', '_', '-' in "
                         "'/'-separated parts, no '..', no part starting with '.')")
    write_model_card(path, repo_id=repo_id, license=license)  # reads (and so checks) config.json
    ignore = [".*", "**/.*"] + ([] if include_training_state else INFERENCE_IGNORE)
    if dry_run:
        from huggingface_hub.utils import filter_repo_objects

        files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
        return list(filter_repo_objects(files, ignore_patterns=ignore))
    hub = _hub()
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if constants.HF_HUB_OFFLINE:
        raise HubError(f"cannot push to {repo_id}: offline mode is on (HF_HUB_OFFLINE=1). The model card was "
                       f"written to {path / 'README.md'}; push again with network access")
    api = hub.HfApi(token=token, library_name="capdec", library_version=__version__)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=path, revision=revision, ignore_patterns=ignore,
                                 commit_message=commit_message or f"Upload capdec checkpoint {path.name}")
    except OfflineModeIsEnabled as e:
        raise HubError(f"cannot push to {repo_id}: offline mode is on (HF_HUB_OFFLINE=1)") from e
    except HfHubHTTPError as e:
        raise HubError(f"pushing to {repo_id} failed: {e}. Check that you are logged in (hf auth login, or "
                       "HF_TOKEN) with write access to the repo") from e
    except (*_network_errors(), ValueError) as e:  # no network, no token
        raise HubError(f"pushing to {repo_id} failed: {type(e).__name__}: {e}") from e
    return str(getattr(info, "commit_url", info))
