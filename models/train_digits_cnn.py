"""Train the small digits CNN shipped in models/ and export it to ONNX.

Data: scikit-learn's bundled ``load_digits()`` (1797 8x8 grey images, no
download). Everything is deterministic (seed 0): the stratified split, the
weight init, the batch order and the training itself.

Writes (relative to the repository root, found from this file's location):
    models/digits_cnn.onnx
    models/digits/calib.npz   key ``input``: float32 [200, 1, 8, 8]
    models/digits/test.npz    keys ``input``: float32 [340, 1, 8, 8],
                                   ``label``: int64 [340]

Needs torch (``pip install torch==2.13.0``), which is NOT a runtime dependency
of qpass; it is only needed to regenerate these files:

    python models/train_digits_cnn.py
"""

from __future__ import annotations

import io
import os
import random
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
N_TRAIN, N_CALIB, N_TEST = 1257, 200, 340
EPOCHS = 30
BATCH_SIZE = 32
LR = 1e-3
MIN_TEST_ACC = 0.97

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "models"
DATA_DIR = MODELS_DIR / "digits"
ONNX_PATH = MODELS_DIR / "digits_cnn.onnx"

SOURCE = "trained by models/train_digits_cnn.py on sklearn load_digits, seed 0"
LABELS = "0,1,2,3,4,5,6,7,8,9"
DOC_STRING = (
    "Small CNN digit classifier (8x8, input = pixel/16) trained by "
    "models/train_digits_cnn.py on scikit-learn load_digits, seed 0"
)


def set_determinism(seed: int) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def load_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    y = digits.target.astype(np.int64)
    assert x.shape == (N_TRAIN + N_CALIB + N_TEST, 1, 8, 8), x.shape

    # Split sample indices (stratified by label, seed 0): train vs. rest, then
    # rest into calib vs. test. The three index sets partition the data set.
    idx = np.arange(len(y))
    i_train, i_rest = train_test_split(
        idx, train_size=N_TRAIN, stratify=y, random_state=SEED
    )
    i_calib, i_test = train_test_split(
        i_rest, train_size=N_CALIB, stratify=y[i_rest], random_state=SEED
    )
    assert (len(i_train), len(i_calib), len(i_test)) == (N_TRAIN, N_CALIB, N_TEST)
    assert not (set(i_train) & set(i_calib) or set(i_train) & set(i_test) or set(i_calib) & set(i_test))
    return {
        name: (np.ascontiguousarray(x[i]), y[i])
        for name, i in (("train", i_train), ("calib", i_calib), ("test", i_test))
    }


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Like np.savez_compressed, but byte-reproducible (fixed zip timestamps)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def accuracy(pred: np.ndarray, label: np.ndarray) -> float:
    return float((pred == label).mean())


def train(model: nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for epoch in range(EPOCHS):
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), BATCH_SIZE):
            idx = perm[i : i + BATCH_SIZE]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1:2d}/{EPOCHS}  train loss {total / len(xt):.4f}")
    model.eval()


def export_onnx(model: nn.Module, path: Path) -> None:
    dummy = torch.zeros(1, 1, 8, 8, dtype=torch.float32)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        dynamo=False,
        opset_version=13,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        do_constant_folding=True,
    )
    m = onnx.load(str(path))
    m.doc_string = DOC_STRING
    del m.metadata_props[:]
    for key, value in (("source", SOURCE), ("labels", LABELS)):
        prop = m.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(m, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def main() -> None:
    set_determinism(SEED)
    split = load_split()
    x_train, y_train = split["train"]
    x_calib, _ = split["calib"]
    x_test, y_test = split["test"]

    model = build_model()
    train(model, x_train, y_train)

    with torch.no_grad():
        torch_pred = model(torch.from_numpy(x_test)).argmax(1).numpy()
    torch_acc = accuracy(torch_pred, y_test)
    print(f"torch test accuracy: {torch_acc:.4f} ({int((torch_pred == y_test).sum())}/{len(y_test)})")
    if torch_acc < MIN_TEST_ACC:
        raise SystemExit(f"test accuracy {torch_acc:.4f} < {MIN_TEST_ACC}")

    DATA_DIR.mkdir(parents=True, exist_ok=True)
    export_onnx(model, ONNX_PATH)

    sess = ort.InferenceSession(str(ONNX_PATH), providers=["CPUExecutionProvider"])
    ort_logits = sess.run(["logits"], {"input": x_test})[0]
    ort_pred = ort_logits.argmax(1)
    ort_acc = accuracy(ort_pred, y_test)
    print(f"onnxruntime test accuracy: {ort_acc:.4f} ({int((ort_pred == y_test).sum())}/{len(y_test)})")
    if ort_acc != torch_acc or not np.array_equal(ort_pred, torch_pred):
        raise SystemExit("onnxruntime predictions differ from torch")

    save_npz(DATA_DIR / "calib.npz", input=x_calib.astype(np.float32))
    save_npz(
        DATA_DIR / "test.npz",
        input=x_test.astype(np.float32),
        label=y_test.astype(np.int64),
    )
    for p in (ONNX_PATH, DATA_DIR / "calib.npz", DATA_DIR / "test.npz"):
        print(f"wrote {p.relative_to(REPO_ROOT)} ({p.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
