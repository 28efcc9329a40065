"""trainables.card: one typed card for teachers and students, written and read in one place."""
import json

import pytest

from trainables.card import StudentCard, TeacherCard, build, read, write
from trainables.registry import ConfigError

COMMON = {"arch": "cnn_tiny", "arch_kwargs": {"width": 8}, "num_classes": 3, "input_shape": [3, 8, 8], "classes": ["a", "b", "c"],
          "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.25]}
TEACHER = {**COMMON, "dataset": "synthetic", "sha256": "ab" * 32, "val_acc": 0.75, "epochs": 4, "normalize": "auto"}
STUDENT = {**COMMON, "epoch": 7}


def test_teacher_round_trip_keeps_the_file_format(tmp_path):
    card = TeacherCard(**TEACHER, weights="/w/r18.pth", weights_sha256="cd" * 32, finetune={"epochs": 2}, node_id="n1")
    path = write(card, tmp_path / "teacher.json")
    assert read(TeacherCard, path) == card
    on_disk = json.loads(path.read_text())
    assert list(on_disk) == sorted(on_disk) and on_disk["mean"] == [0.5, 0.4, 0.3] and on_disk["finetune"] == {"epochs": 2}
    assert card.stats == ((0.5, 0.4, 0.3), (0.2, 0.2, 0.25))


def test_student_round_trip_and_unset_optionals_left_out(tmp_path):
    card = StudentCard(**STUDENT)
    path = write(card, tmp_path / "student.json")
    assert read(StudentCard, path) == card and "input" not in json.loads(path.read_text())
    exported = card.model_copy(update={"input": "raw 0..255 pixels"})
    assert read(StudentCard, write(exported, tmp_path / "export.json")).input == "raw 0..255 pixels"
    # a card written before (plain json.dumps, no optional keys) still reads
    (tmp_path / "old.json").write_text(json.dumps(TEACHER, indent=2))
    assert read(TeacherCard, tmp_path / "old.json").weights is None


@pytest.mark.parametrize("cls, data, fix", [(TeacherCard, TEACHER, "delete its folder and train it again"), (StudentCard, STUDENT, "retrain the student")])
def test_missing_mean_names_the_file_and_the_field(tmp_path, cls, data, fix):
    path = tmp_path / f"{cls.kind}.json"
    path.write_text(json.dumps({k: v for k, v in data.items() if k not in ("mean", "std")}))
    with pytest.raises(ConfigError) as e:
        read(cls, path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "`mean` is required" in msg and "`std` is required" in msg and fix in msg


def test_the_setting_that_pointed_at_the_file_leads_the_message(tmp_path):
    path = tmp_path / "teacher.json"
    path.write_text(json.dumps({**TEACHER, "val_acc": "high"}))
    with pytest.raises(ConfigError, match=r"^`teacher.path` has an incomplete or invalid teacher.json at .*`val_acc`"):
        read(TeacherCard, path, "teacher.path")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_a_corrupt_card_is_one_line(tmp_path, text):
    path = tmp_path / "student.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError, match="corrupt student.json") as e:
        read(StudentCard, path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_a_missing_card_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"no teacher.json at .*teacher.json: delete its folder and train it again"):
        read(TeacherCard, tmp_path / "teacher.json")


def test_unknown_keys_are_rejected(tmp_path):
    path = tmp_path / "teacher.json"
    path.write_text(json.dumps({**TEACHER, "meam": [0.1, 0.1, 0.1]}))
    with pytest.raises(ConfigError, match=r"`meam` is not a known key"):
        read(TeacherCard, path)
    with pytest.raises(ConfigError, match="`extra` is not a known key"):
        build(StudentCard, {**STUDENT, "extra": 1})


def test_statistics_must_fit_the_channels():
    with pytest.raises(ConfigError, match=r"one value per input channel \(3\), but got 1 and 3"):
        build(StudentCard, {**STUDENT, "mean": [0.5]})
    with pytest.raises(ConfigError, match=r"`std` must be > 0"):
        build(StudentCard, {**STUDENT, "std": [0.2, 0.0, 0.2]})
    with pytest.raises(ConfigError, match="`sha256`"):
        build(TeacherCard, {**TEACHER, "sha256": "not a hash"})


def test_a_temporary_copy_is_named_as_its_source(tmp_path):
    path = tmp_path / "student.json"
    path.write_text(json.dumps({**STUDENT, "epoch": -1}))
    with pytest.raises(ConfigError, match=r"invalid student.json at runs:/abc/student/student.json \(`epoch`") as e:
        read(StudentCard, path, shown_as="runs:/abc/student/student.json")
    assert str(tmp_path) not in str(e.value)
