"""Train a small digits CNN with PyTorch quantization-aware training and export it to ONNX with Q/DQ pairs.

The model is the QDQ-import example of qpass (issue 20): PyTorch's exporter writes every fake-quantize module as a
QuantizeLinear/DequantizeLinear pair, on activations and on the *float* weights (fake quantization), which is
what ``qpass run`` imports, folds into int8 weights and lowers.

Data: scikit-learn's bundled ``load_digits()`` with the split of ``train_digits_cnn.py`` (seed 0; only the
train split is trained on). Training: eager-mode QAT (``torch.ao.quantization``): Conv+ReLU and Linear+ReLU
fused, activations fake-quantized uint8 (0..255, affine, moving-average min/max), weights int8 (-128..127,
symmetric, per output channel); float training for ``FLOAT_EPOCHS`` epochs, then QAT for ``QAT_EPOCHS``
epochs with the observers frozen for the last ``FROZEN_EPOCHS``. Export: TorchScript exporter
(``dynamo=False``), opset 13, batch dimension dynamic.

Writes (relative to the repository root):
    models/digits_qat_qdq.onnx   the QDQ model (float weights behind Q/DQ pairs)
    models/digits_qat_fp32.onnx  the same trained weights with fake quantization disabled (its float reference)

Needs torch (not a dependency of qpass), e.g. in a separate venv:
    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 numpy onnx scikit-learn onnxruntime
    /tmp/torchvenv/bin/python models/train_digits_qat.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.ao.quantization as tq
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_digits_cnn import BATCH_SIZE, LR, SEED, load_split, set_determinism  # noqa: E402

FLOAT_EPOCHS, QAT_EPOCHS, FROZEN_EPOCHS = 20, 8, 3
MIN_TEST_ACC = 0.95
MODELS_DIR = Path(__file__).resolve().parent
QDQ_PATH = MODELS_DIR / "digits_qat_qdq.onnx"
FP32_PATH = MODELS_DIR / "digits_qat_fp32.onnx"
SOURCE = "trained by models/train_digits_qat.py (PyTorch QAT) on sklearn load_digits, seed 0"


class DigitsQAT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv1, self.relu1 = nn.Conv2d(1, 16, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc1, self.relu3 = nn.Linear(32 * 4 * 4, 64), nn.ReLU()
        self.fc2 = nn.Linear(64, 10)
        self.dequant = tq.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        x = torch.flatten(x, 1)
        x = self.fc2(self.relu3(self.fc1(x)))
        return self.dequant(x)


def qconfig() -> tq.QConfig:
    act = tq.FakeQuantize.with_args(observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                    dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=False)
    weight = tq.FakeQuantize.with_args(observer=tq.MovingAveragePerChannelMinMaxObserver, quant_min=-128,
                                       quant_max=127, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                       ch_axis=0)
    return tq.QConfig(activation=act, weight=weight)


def epochs(model: nn.Module, x: np.ndarray, y: np.ndarray, n: int, gen: torch.Generator, lr: float,
           on_epoch=None) -> None:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(n):
        if on_epoch is not None:
            on_epoch(epoch)
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), BATCH_SIZE):
            idx = perm[i:i + BATCH_SIZE]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1:2d}/{n}  train loss {total / len(xt):.4f}")
    model.eval()


def export(model: nn.Module, path: Path, doc: str) -> None:
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, opset_version=13,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, do_constant_folding=True)
    m = onnx.load(str(path))
    m.doc_string = doc
    del m.metadata_props[:]
    for key, value in (("source", SOURCE), ("labels", "0,1,2,3,4,5,6,7,8,9")):
        prop = m.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(m, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def main() -> None:
    set_determinism(SEED)
    split = load_split()
    x_train, y_train = split["train"]
    x_test, y_test = split["test"]
    gen = torch.Generator().manual_seed(SEED)

    model = DigitsQAT()
    epochs(model, x_train, y_train, FLOAT_EPOCHS, gen, LR)
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    print(f"float test accuracy (before QAT): {acc:.4f}")

    model.eval()
    model = tq.fuse_modules(model, [["conv1", "relu1"], ["conv2", "relu2"], ["fc1", "relu3"]])
    model.qconfig = qconfig()
    model.train()
    tq.prepare_qat(model, inplace=True)

    def freeze(epoch: int) -> None:
        if epoch == QAT_EPOCHS - FROZEN_EPOCHS:
            model.apply(tq.disable_observer)

    epochs(model, x_train, y_train, QAT_EPOCHS, gen, LR / 10, on_epoch=freeze)
    model.apply(tq.disable_observer)
    with torch.no_grad():
        qat_pred = model(torch.from_numpy(x_test)).argmax(1).numpy()
    acc = float((qat_pred == y_test).mean())
    print(f"QAT (fake-quantized) test accuracy: {acc:.4f}")
    if acc < MIN_TEST_ACC:
        raise SystemExit(f"test accuracy {acc:.4f} < {MIN_TEST_ACC}")
    export(model, QDQ_PATH, "digits CNN trained with PyTorch QAT, exported with Q/DQ pairs "
                            "(models/train_digits_qat.py)")
    model.apply(tq.disable_fake_quant)
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    print(f"QAT weights, fake quantization disabled: test accuracy {acc:.4f}")
    export(model, FP32_PATH, "digits CNN of models/digits_qat_qdq.onnx with fake quantization disabled: its float "
                             "reference (models/train_digits_qat.py)")
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    if ort is not None:
        sess = ort.InferenceSession(str(QDQ_PATH), providers=["CPUExecutionProvider"])
        pred = sess.run(None, {"input": x_test})[0].argmax(1)
        print(f"onnxruntime test accuracy of the QDQ export: {float((pred == y_test).mean()):.4f}")
    for p in (FP32_PATH, QDQ_PATH):
        print(f"wrote {p.relative_to(MODELS_DIR.parent)} ({p.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
