"""The output-folder guard: results are never overwritten silently."""

import json

import pytest

from sf_ext.outputs import MANIFEST, OutputDirError, prepare_output_dir, read_manifest


def test_new_folder_is_created_with_a_manifest_of_settings_and_files(tmp_path):
    out = prepare_output_dir(tmp_path / "run", {"lr": 0.1, "seeds": (0, 1)})
    assert out.path.is_dir() and not out.resumed
    (out.path / "results.json").write_text("{}")
    out.complete(out.path / "results.json")
    manifest = read_manifest(out.path)
    assert manifest["settings"] == {"lr": 0.1, "seeds": [0, 1]}
    assert manifest["files"] == ["results.json"] and manifest["status"] == "complete"


def test_same_settings_resume_and_report_whether_the_earlier_run_finished(tmp_path):
    first = prepare_output_dir(tmp_path, {"lr": 0.1})
    (tmp_path / "a.csv").write_text("x")
    first.record("a.csv")
    again = prepare_output_dir(tmp_path, {"lr": 0.1})
    assert again.resumed and not again.complete_before and again.files == ["a.csv"]
    again.complete()
    assert prepare_output_dir(tmp_path, {"lr": 0.1}).complete_before
    assert (tmp_path / "a.csv").read_text() == "x"


def test_other_settings_are_refused_with_the_folder_and_the_flag_named(tmp_path):
    out = prepare_output_dir(tmp_path, {"lr": 0.1, "epochs": 3})
    (tmp_path / "a.csv").write_text("old")
    out.complete(tmp_path / "a.csv")
    with pytest.raises(OutputDirError) as error:
        prepare_output_dir(tmp_path, {"lr": 0.2, "epochs": 3})
    message = str(error.value)
    assert str(tmp_path) in message and "--overwrite" in message and "lr: 0.1 -> 0.2" in message
    assert (tmp_path / "a.csv").read_text() == "old"


def test_overwrite_removes_only_the_files_the_earlier_run_wrote(tmp_path):
    out = prepare_output_dir(tmp_path, {"lr": 0.1})
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "a.png").write_text("png")
    (tmp_path / "runs.csv").write_text("old")
    out.complete(tmp_path / "figs" / "a.png", tmp_path / "runs.csv")
    (tmp_path / "notes.txt").write_text("mine")  # the user's own file
    new = prepare_output_dir(tmp_path, {"lr": 0.2}, overwrite=True)
    assert not new.resumed and new.files == []
    assert not (tmp_path / "runs.csv").exists() and not (tmp_path / "figs").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / MANIFEST).read_text())["settings"] == {"lr": 0.2}


def test_a_folder_with_files_sf_ext_did_not_write_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "results.json").write_text("someone's")
    with pytest.raises(OutputDirError, match="did not record"):
        prepare_output_dir(tmp_path, {"lr": 0.1})
    out = prepare_output_dir(tmp_path, {"lr": 0.1}, overwrite=True)
    assert (tmp_path / "results.json").read_text() == "someone's"  # nothing deleted
    assert out.files == []


def test_a_manifest_cannot_make_the_guard_delete_outside_the_folder(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / MANIFEST).write_text(
        json.dumps({"settings": {"a": 1}, "files": ["../outside.txt"], "status": "complete"})
    )
    prepare_output_dir(folder, {"a": 2}, overwrite=True)
    assert outside.read_text() == "keep"


def test_recording_a_file_outside_the_folder_is_an_error(tmp_path):
    out = prepare_output_dir(tmp_path / "run", {})
    with pytest.raises(ValueError, match="not inside"):
        out.record(tmp_path / "elsewhere.csv")


def test_a_file_in_place_of_the_folder_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputDirError, match="is a file"):
        prepare_output_dir(tmp_path / "out", {})
