"""The registered model of a finished (tiny, real) search, used as a user uses it: `cxrtune
predict` in a subprocess, ``mlflow.pyfunc.load_model`` in this process and `mlflow models
serve` as a real server, on real image files (8- and 16-bit PNG, JPEG, colour, DICOM,
corrupt, tiny)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image

from cxrtune.data.decode import load_gray
from cxrtune.data.labels import SCHEMES
from cxrtune.metrics import scheme_metrics
from image_files import write_dicom
from servers import cxrtune, free_port, json_lines, kill_group, parent_and_children

MODEL = "models:/cxrtune-best/1"


@pytest.fixture(scope="module")
def store(searched) -> str:
    return f"sqlite:///{searched[0] / 'mlflow.db'}"


@pytest.fixture(scope="module")
def test_split(searched, store, tmp_path_factory) -> pd.DataFrame:
    """The test rows of the split CSV the search logged on its parent run, in its order."""
    client = MlflowClient(store)
    (parent,), _ = parent_and_children(client, "cxrtune-demo")
    (csv,) = [a.path for a in client.list_artifacts(parent.info.run_id) if a.path.endswith(".csv")]
    split = pd.read_csv(client.download_artifacts(parent.info.run_id, csv, str(tmp_path_factory.mktemp("split"))))
    return split[split["split"] == "test"].reset_index(drop=True)


@pytest.fixture(scope="module")
def pyfunc_model(store, tmp_path_factory):
    """The registered model, loaded in this process as a fresh one loads it."""
    import mlflow.pyfunc

    from cxrtune.tracking import using_tracking_uri

    with using_tracking_uri(store):
        return mlflow.pyfunc.load_model(MODEL)


def probabilities(answer: pd.DataFrame, classes) -> np.ndarray:
    return answer[list(classes)].to_numpy(np.float32)


def scored(test: pd.DataFrame, probs: np.ndarray) -> dict[str, float]:
    scheme = SCHEMES.get("three_class")
    y = np.array([scheme.index_of(t) for t in test["target"]])
    return scheme_metrics(y, probs, scheme, "test/")


# ---------------------------------------------------------------- the test split, again


def test_predicting_the_test_split_reproduces_the_logged_test_metrics(searched, store, test_split, pyfunc_model):
    cwd, summary = searched
    classes = summary["classes"]
    logged = MlflowClient(store).get_run(summary["mlflow_parent_run"]).data.metrics
    paths = test_split["path"].tolist()

    proc = cxrtune(cwd, "predict", "--model", MODEL, "--json", *paths)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = json_lines(proc)
    assert [r["image"] for r in lines] == paths
    by_cli = scored(test_split, np.array([[r["probabilities"][c] for c in classes] for r in lines], np.float32))
    by_pyfunc = scored(test_split, probabilities(pyfunc_model.predict(pd.DataFrame({"path": paths})), classes))

    assert len(by_cli) >= 20 and set(by_cli) <= set(logged)
    for key, value in by_cli.items():  # every metric equal to the last digit
        assert value == logged[key] == by_pyfunc[key], key
    assert [r["predicted"] for r in lines] == [classes[i] for i in np.argmax(
        [[r["probabilities"][c] for c in classes] for r in lines], axis=1)]


# ---------------------------------------------------------------- what an image may be


def test_paths_bytes_and_arrays_give_the_same_probabilities(pyfunc_model, test_split, tmp_path):
    classes = pyfunc_model.metadata.metadata["preprocessing"]["classes"]
    gray = load_gray(test_split["path"][0])  # a test image, as an 8-bit grey array
    png = tmp_path / "gray.png"
    cv2.imwrite(str(png), gray)

    answers = [pyfunc_model.predict(pd.DataFrame({"path": [str(png)]})),
               pyfunc_model.predict(pd.DataFrame({"image": [png.read_bytes()]})),
               pyfunc_model.predict(pd.DataFrame({"image": [gray]}))]
    # called directly, the model also takes a bare 2-D array
    model = pyfunc_model.unwrap_python_model()
    answers.append(model.predict(None, gray))
    first = probabilities(answers[0], classes)
    for answer in answers[1:]:
        assert np.array_equal(probabilities(answer, classes), first)
        assert answer["predicted"].tolist() == answers[0]["predicted"].tolist()
    assert np.isclose(first.sum(), 1, atol=1e-6)
    # ... and an (N, H, W) stack, one row per image (another batch size: equal to float32 rounding)
    stacked = probabilities(model.predict(None, np.stack([gray, np.flipud(gray), gray])), classes)
    assert np.array_equal(stacked[0], stacked[2]) and np.allclose(stacked[0], first[0], atol=1e-6)


def test_16_bit_png_dicom_and_colour_images_are_predicted_as_their_decode_reads_them(pyfunc_model, tmp_path):
    classes = pyfunc_model.metadata.metadata["preprocessing"]["classes"]
    rng = np.random.default_rng(0)
    wide = (np.linspace(300, 3800, 60 * 50).reshape(60, 50) + rng.normal(0, 40, (60, 50))).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "wide.png"), wide)
    assert Image.open(tmp_path / "wide.png").mode.startswith("I")  # really a 16-bit file
    dcm = write_dicom(tmp_path / "wide.dcm", wide, bits=16)
    # the same pixels as a 16-bit PNG, a DICOM file, DICOM bytes and a uint16 array: one answer
    # (each alone: on a CPU, another batch size may change a probability's last float32 bit)
    answers = [probabilities(pyfunc_model.predict(pd.DataFrame({column: [value]})), classes)
               for column, value in (("path", str(tmp_path / "wide.png")), ("path", str(dcm)),
                                     ("image", dcm.read_bytes()), ("image", wide))]
    for answer in answers[1:]:
        assert np.array_equal(answer, answers[0])

    colour = np.dstack([wide // 16, np.full_like(wide, 90), 255 - wide // 16]).astype(np.uint8)
    Image.fromarray(colour).save(tmp_path / "photo.png")
    luma = np.asarray(Image.fromarray(colour).convert("L"))  # ITU-R 601, as decode converts colour
    by_photo = probabilities(pyfunc_model.predict(pd.DataFrame({"path": [str(tmp_path / "photo.png")]})), classes)
    assert np.array_equal(by_photo, probabilities(pyfunc_model.predict(pd.DataFrame({"image": [luma]})), classes))


def test_inputs_that_are_not_images_are_refused_with_a_message(pyfunc_model):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=r"image\[1\]: not an image / cannot be decoded"):
        pyfunc_model.predict(pd.DataFrame({"image": [np.eye(40, dtype=np.uint8), b"not a png"]}))
    with pytest.raises(MlflowException, match=r"pd.DataFrame\(\{'image': list\(arrays\)\}\)"):
        pyfunc_model.predict(np.eye(40, dtype=np.uint8))  # the signature makes a bare array a table
    with pytest.raises(MlflowException, match="colour picture"):
        pyfunc_model.unwrap_python_model().predict(None, np.zeros((40, 40, 3), np.uint8))


# ---------------------------------------------------------------- cxrtune predict


def test_a_corrupt_image_is_named_and_the_others_are_predicted(searched, test_split, tmp_path):
    cwd, summary = searched
    good = test_split["path"][:2].tolist()
    png = cv2.imencode(".png", (np.eye(64) * 255).astype(np.uint8))[1].tobytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    tiny = tmp_path / "tiny.png"
    cv2.imwrite(str(tiny), (np.arange(64).reshape(8, 8) * 4).astype(np.uint8))
    args = [good[0], str(tmp_path / "truncated.png"), str(tiny), str(tmp_path / "empty.jpg"), good[1]]

    proc = cxrtune(cwd, "predict", "--model", MODEL, "--json", *args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = json_lines(proc)
    assert [r["image"] for r in lines] == args
    assert [r["predicted"] in summary["classes"] for r in lines if "error" not in r] == [True, True, True]
    errors = {r["image"]: r["error"] for r in lines if "error" in r}
    assert set(errors) == {args[1], args[3]}
    assert "truncated" in errors[args[1]] or "cannot be decoded" in errors[args[1]]
    assert "empty" in errors[args[3]]
    for name in (args[1], args[3]):
        assert f"error: {name}: " in proc.stderr
    # an 8x8 image is predicted, with a warning that it was upscaled
    assert f"{tiny} is 8x8 px, smaller than the model's 32 px input" in proc.stderr
    table = cxrtune(cwd, "predict", "--model", MODEL, good[0])
    assert table.returncode == 0 and Path(good[0]).name in table.stdout and "predicted" in table.stdout


def test_a_model_that_does_not_exist_or_lacks_its_preprocessing_is_exit_code_2(searched, tmp_path):
    import mlflow.pytorch
    import torch

    cwd, _ = searched
    image = cv2.imencode(".png", np.eye(64) * 255)[1].tobytes()
    (tmp_path / "a.png").write_bytes(image)
    missing = cxrtune(cwd, "predict", "--model", "models:/cxrtune-best/99", str(tmp_path / "a.png"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "models:/cxrtune-best/99: not found" in missing.stderr and "version=99" in missing.stderr
    # what an older cxrtune registered: the bare network, without its preprocessing
    mlflow.pytorch.save_model(torch.nn.Linear(2, 3), str(tmp_path / "old"), serialization_format="pickle")
    old = cxrtune(cwd, "predict", "--model", str(tmp_path / "old"), str(tmp_path / "a.png"))
    assert old.returncode == 2 and "Traceback" not in old.stderr
    assert "older cxrtune" in old.stderr and "without its preprocessing" in old.stderr


def test_cam_writes_one_overlay_png_per_image(searched, test_split, tmp_path):
    cwd, _ = searched
    folder = tmp_path / "images"
    copies = []
    for sub, i in (("a", 0), ("b", 1)):  # two files named alike, in two folders
        source = Path(test_split["path"][i])
        copies.append(folder / sub / f"xray{source.suffix}")
        copies[-1].parent.mkdir(parents=True)
        copies[-1].write_bytes(source.read_bytes())
    (folder / "notes.txt").write_text("not an image: the folder walk skips it")
    single = test_split["path"][2]

    proc = cxrtune(cwd, "predict", "--model", MODEL, "--json", "--cam", str(tmp_path / "cams"), str(folder), single)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = json_lines(proc)
    assert [r["image"] for r in lines] == [*map(str, copies), single]
    pngs = sorted((tmp_path / "cams").iterdir())
    assert len(pngs) == 3 and sorted(Path(r["cam"]) for r in lines) == pngs
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert np.asarray(Image.open(png).convert("RGB")).std() > 10  # a picture, not a blank page


# ---------------------------------------------------------------- mlflow models serve


def test_mlflow_models_serve_answers_as_cxrtune_predict(searched, store, test_split, tmp_path):
    cwd, summary = searched
    path = test_split["path"][3]
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", MODEL, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        cli = cxrtune(cwd, "predict", "--model", MODEL, "--json", path)  # while the server starts
        assert cli.returncode == 0, cli.stderr[-3000:]
        _wait_until_up(f"http://127.0.0.1:{port}/ping", server, tmp_path / "serve.log")
        body = {"dataframe_split": {"columns": ["image"],
                                    "data": [[base64.b64encode(Path(path).read_bytes()).decode()]]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            (served,) = json.loads(r.read())["predictions"]
    finally:
        kill_group(server)
        log.close()
    (expected,) = json_lines(cli)
    classes = summary["classes"]
    assert served["predicted"] == expected["predicted"]
    assert np.array_equal(np.float32([served[c] for c in classes]),
                          np.float32([expected["probabilities"][c] for c in classes]))


def _wait_until_up(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"mlflow models serve did not answer: {log.read_text()[-3000:]}")
        time.sleep(0.5)
