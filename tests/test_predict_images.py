"""`dlrun predict` on image runs: from the run directory alone, the validation images give back
`dlrun eval`'s numbers; files, folders and list files; broken files are skipped and named."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import assert_user_error, dlrun, train
from PIL import Image
from test_images import image_folder, write_mnist

from dlrun.errors import DlrunError
from dlrun.evaluate import evaluate_run


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def predict(run: Path, source: Path | str, *options: str, capsys=None) -> dict:
    """`dlrun predict RUN SOURCE --json` on the CPU, through the command's entry function (a
    subprocess would spend seconds importing torch); its summary, and what it printed."""
    from dlrun.predict import main

    summary = run.parent / "predict.json"
    main([str(run), str(source), "--device", "cpu", "--json", str(summary), *options])
    printed = capsys.readouterr() if capsys else None
    return {
        **json.loads(summary.read_text()),
        "stdout": printed.out if printed else "",
        "stderr": printed.err if printed else "",
    }


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """An imagefolder run, its eval metrics, and its images moved away from where it trained:
    (run directory, the moved data folder with train/ and valid/, eval's metrics)."""
    tmp = tmp_path_factory.mktemp("folder")
    data, run = image_folder(tmp / "pics", "split", n=12), tmp / "run"
    train(
        run,
        "data=imagefolder",
        f"data.path={data}",
        "data.size=32",
        "data.num_workers=0",
        "data.bs=4",
        "trainer.epochs=1",
        "trainer.device=cpu",
    )
    metrics = evaluate_run(str(run), device="cpu")
    moved = tmp / "elsewhere"
    shutil.move(data, moved)
    return run, moved, metrics


def test_predict_reproduces_eval_on_an_image_folder(folder_run):
    run, data, metrics = folder_run
    summary = run.parent / "valid.json"
    proc = dlrun("predict", str(run), str(data / "valid"), "--device", "cpu", "--json", str(summary))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"wrote {run / 'predictions' / 'valid.csv'}" in proc.stdout
    out = json.loads(summary.read_text())
    assert out["metrics"] == metrics  # exactly: same weights, same pixels, same batches
    rows = read_csv(run / "predictions" / "valid.csv")
    assert len(rows) == out["rows"] == 8 and out["skipped"] == []
    assert list(rows[0]) == ["path", "prediction", "probability", "class_2", "prob_2", "label"]
    assert rows[0]["path"] == str(data / "valid" / "blue" / "000.jpg")
    assert [r["label"] for r in rows] == ["blue"] * 4 + ["red"] * 4
    correct = sum(r["prediction"] == r["label"] for r in rows)
    assert correct / len(rows) == metrics["accuracy"]
    for r in rows:
        assert {r["prediction"], r["class_2"]} == {"blue", "red"}
        assert float(r["probability"]) >= 0.5 and float(r["probability"]) + float(
            r["prob_2"]
        ) == pytest.approx(1)


def test_broken_file_is_skipped_and_named_and_top_k(folder_run, tmp_path, capsys):
    run, data, _ = folder_run
    pics = tmp_path / "pics"
    shutil.copytree(data / "train", pics)
    broken = pics / "red" / "003.jpg"
    broken.write_bytes(b"not a jpeg")
    out = predict(run, pics, "--top-k", "1", "-o", str(tmp_path / "out.csv"), capsys=capsys)
    rows = read_csv(tmp_path / "out.csv")
    assert len(rows) == out["rows"] == 23 and str(broken) not in [r["path"] for r in rows]
    assert out["skipped"] == [f"{broken} (not an image file PIL can read)"]
    assert str(broken) in out["stderr"] and "skipped 1" in out["stderr"]
    assert list(rows[0]) == ["path", "prediction", "probability", "label"]
    assert 0 <= out["metrics"]["accuracy"] <= 1  # the 23 images read, with their labels

    out = predict(
        run, pics / "blue" / "001.jpg", "--top-k", "5", "-o", str(tmp_path / "one.csv"), capsys=capsys
    )
    (row,) = read_csv(tmp_path / "one.csv")
    assert list(row) == ["path", "prediction", "probability", "class_2", "prob_2"]  # 2 classes at most
    assert out["metrics"] == {} and f"001.jpg: {row['prediction']}" in out["stdout"]


def test_labels_only_when_every_image_is_in_a_class_folder(folder_run, tmp_path, capsys):
    from dlrun.predict_images import folder_labels

    run, data, _ = folder_run
    pics = tmp_path / "pics"
    shutil.copytree(data / "valid", pics)
    shutil.copy(pics / "red" / "000.jpg", pics / "loose.jpg")
    out = predict(run, pics, capsys=capsys)
    assert (
        out["rows"] == 9
        and out["metrics"] == {}
        and "label" not in read_csv(run / "predictions" / "pics.csv")[0]
    )
    assert (
        "no accuracy: it is measured when every image is in a folder named after a class (blue, red)"
        in out["stdout"]
    )

    # A class name with a slash is a folder in a folder (Fashion-MNIST's T-shirt/top).
    classes = ["T-shirt/top", "Bag"]
    paths = [tmp_path / "T-shirt" / "top" / "a.png", tmp_path / "Bag" / "more" / "b.png"]
    assert folder_labels(tmp_path, paths, classes) == [0, 1]
    assert folder_labels(tmp_path, paths + [tmp_path / "T-shirt" / "c.png"], classes) is None


def test_tta_reports_what_it_changed(folder_run):
    run, data, metrics = folder_run
    out = predict(run, data / "valid", "--tta")
    m = out["metrics"]
    # Without TTA: the centre view alone, which is what eval sees.
    assert m["accuracy_no_tta"] == metrics["accuracy"] and m["valid_loss_no_tta"] == metrics["valid_loss"]
    assert m["valid_loss"] != metrics["valid_loss"] and 0 <= m["accuracy"] <= 1
    (note,) = out["notes"]
    assert "6 views per image (centre, mirrored, 4 corner crops" in note
    assert f"accuracy {metrics['accuracy']:.4f} without, {m['accuracy']:.4f} with" in note


def test_list_file_names_images_relative_to_itself(folder_run, tmp_path):
    run, data, _ = folder_run
    shutil.copytree(data / "valid", tmp_path / "pics")
    listed = tmp_path / "lists" / "todo.txt"
    listed.parent.mkdir()
    listed.write_text(
        "../pics/red/001.jpg\n\n" + f"{tmp_path / 'pics' / 'blue' / '002.jpg'}\n../pics/gone.jpg\n"
    )
    out = predict(run, listed)
    rows = read_csv(run / "predictions" / "todo.csv")
    assert [Path(r["path"]).resolve() for r in rows] == [
        tmp_path / "pics" / "red" / "001.jpg",
        tmp_path / "pics" / "blue" / "002.jpg",
    ]
    assert "label" not in rows[0] and out["metrics"] == {}
    assert out["skipped"] == [f"{listed.parent / '../pics/gone.jpg'} (no such file, line 4 of {listed})"]

    # The CSV predict writes is a list file too (its header is skipped).
    again = predict(run, run / "predictions" / "todo.csv", "-o", str(tmp_path / "again.csv"))
    assert again["rows"] == 2 and again["skipped"] == []


def test_mnist_predicted_from_png_files_matches_eval(tmp_path):
    from dlrun.data.torchvision_sets import SOURCES, read_mnist

    raw = write_mnist(tmp_path / "data")
    run = tmp_path / "run"
    train(
        run,
        "data=mnist",
        f"data.root={tmp_path / 'data'}",
        "data.download=false",
        "data.bs=16",
        "trainer.epochs=1",
        "trainer.device=cpu",
    )
    metrics = evaluate_run(str(run), device="cpu")
    # MNIST validates on its test split (t10k), every image: write those as PNG files by class.
    _, _, x_valid, y_valid = read_mnist(raw)
    pngs = tmp_path / "pngs"
    classes = SOURCES["mnist"].classes
    for i, (x, y) in enumerate(zip(x_valid, y_valid)):
        (pngs / classes[y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[0]).save(pngs / classes[y] / f"{i:03d}.png")
    shutil.move(tmp_path / "data", tmp_path / "moved")

    out = predict(run, pngs)
    assert out["rows"] == len(y_valid) == 40
    assert out["metrics"]["accuracy"] == metrics["accuracy"]
    # Same images, batched in class order rather than file order: the loss sums in another order.
    assert out["metrics"]["valid_loss"] == pytest.approx(metrics["valid_loss"], rel=1e-6)

    tta = predict(run, pngs, "--tta")
    assert tta["metrics"]["accuracy_no_tta"] == metrics["accuracy"]
    assert "5 views per image (centre, 4 diagonal shifts of 2 pixel(s))" in tta["notes"][0]  # no flips


def test_mistakes_exit_2_with_a_message(folder_run, tmp_path):
    run, data, _ = folder_run
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no images")
    proc = dlrun("predict", str(run), str(tmp_path / "empty"), "--device", "cpu")
    assert_user_error(proc, f"no images in {tmp_path / 'empty'}")
    proc = dlrun("predict", str(run), str(data / "valid"), "--top-k", "0")
    assert_user_error(proc, "--top-k 0 is not allowed")


def test_inputs_that_are_no_images_are_refused(folder_run, tmp_path):
    run, _, _ = folder_run
    (tmp_path / "model.bin").write_bytes(b"\x00")
    with pytest.raises(DlrunError, match=f"INPUT {tmp_path / 'model.bin'} is neither an image"):
        predict(run, tmp_path / "model.bin")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DlrunError, match=r"none of the 1 image\(s\) .* e.g. .*bad.png"):
        predict(run, tmp_path / "bad.png")
    (tmp_path / "gone.txt").write_text("gone.png\nlost.png\n")
    with pytest.raises(
        DlrunError, match=r"none of the 2 image\(s\) .* e.g. .*gone.png \(no such file, line 1"
    ):
        predict(run, tmp_path / "gone.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DlrunError, match="empty.txt names no images"):
        predict(run, tmp_path / "empty.txt")
