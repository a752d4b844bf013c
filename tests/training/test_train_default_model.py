"""The default model's training is deterministic: two runs of
scripts/train_default_model.py with the same arguments write the same
bytes, and a run stopped part-way through a stage (twice here, in the VAE
and in the text encoder + UNet stages) and resumed with --resume writes the
same bytes as one that ran straight through. A small configuration of the
same code, so it takes seconds; the committed model was trained with the
script's defaults (models/emoji/training/recipe.json)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "train_default_model.py"
SMALL = ["--emoji", "12", "--vocab", "300", "--vae-steps", "6", "--steps", "6", "--batch", "4",
         "--checkpoint-every", "2", "--log-every", "1", "--threads", "1"]


def train(work, *extra):
    r = subprocess.run([sys.executable, str(SCRIPT), "--work", str(work), "--out", str(work / "out"), *SMALL, *extra],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def font(tmp_path_factory):
    """Debian's emoji font, fetched once (apt-get download, unpacked, not installed)."""
    work = tmp_path_factory.mktemp("font")
    train(work, "--to-stage", "data")
    return work / "font"


def fresh(tmp_path, name, font):
    work = tmp_path / name
    work.mkdir()
    shutil.copytree(font, work / "font")
    return work


def sums(work):
    return (work / "out" / "SHA256SUMS").read_text()


def test_two_runs_write_the_same_model(tmp_path, font):
    a, b = fresh(tmp_path, "a", font), fresh(tmp_path, "b", font)
    train(a)
    train(b)
    assert sums(a) == sums(b)
    listed = {line.split("  ", 1)[1] for line in sums(a).splitlines()}
    for f in ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
              "vae/diffusion_pytorch_model.safetensors", "tokenizer/vocab.json", "training/captions.tsv",
              "training/recipe.json", "NOTICE", "sdserve.json"]:
        assert f in listed, f
    recipe = json.loads((a / "out" / "training" / "recipe.json").read_text())
    assert recipe["steps"] == 6 and recipe["vae_steps"] == 6 and recipe["emoji"] == 12


def test_an_interrupted_and_resumed_run_writes_the_same_model(tmp_path, font):
    straight, resumed = fresh(tmp_path, "straight", font), fresh(tmp_path, "resumed", font)
    train(straight)
    out = train(resumed, "--for-steps", "3")  # stops in the VAE stage, after a checkpoint at 2
    assert "vae: stopped at step 3 of 6" in out
    assert not (resumed / "out").exists()
    out = train(resumed, "--from-stage", "vae", "--resume", "--for-steps", "5")
    assert "vae: resumed at step 3" in out and "unet: stopped at step 5 of 6" in out
    train(resumed, "--from-stage", "unet", "--resume")
    assert sums(straight) == sums(resumed)
    # the loss logs hold each step once, as the straight run's do
    for log in ["loss_vae.tsv", "loss_unet.tsv"]:
        assert (straight / log).read_text() == (resumed / log).read_text()
