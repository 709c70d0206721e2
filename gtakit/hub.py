"""`gtakit push`: upload a converted folder (with its model card) to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from gtakit.errors import GtakitError


def push_folder(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create the repo if needed and upload the folder; returns the commit URL."""
    from huggingface_hub import HfApi

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise GtakitError(f"{folder} is not a model folder (no config.json); push the OUT of gtakit convert")
    if not (folder / "README.md").is_file():
        raise GtakitError(f"{folder} has no README.md model card; re-run gtakit convert to create it")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise GtakitError(f"{repo_id!r} is not a valid Hub repo id ({str(err).splitlines()[0]}); use user/name")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=f"Upload {folder.name} converted with gtakit",
        )
    except Exception as err:  # noqa: BLE001 - network (httpx), HTTP, auth and offline errors: one line each
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise GtakitError(f"upload to {repo_id} failed: {first}; check the network, HF_TOKEN and the repo id") from None
    return str(getattr(info, "commit_url", info))
