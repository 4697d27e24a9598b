"""Data-parallel training of the count VAE (``examples/``): two processes under torchrun on the
CPU (gloo) against one process that computes their shards in turn, and the Lightning example on
one device. Lightning with several processes is the same DDP; ``docs/distributed.md`` runs it."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
WORLD_SIZE = 2
# A small count VAE on synthetic images, in float64: 4 Adam steps on global batches of 8.
SETTINGS = [
    "--synthetic",
    "--synthetic-images=64",
    "--pixels=64",
    "--hidden=32",
    "--latents=4",
    "--batch-size=8",
    "--steps=4",
    "--lr=1e-2",
    "--log-every=0",
]
# Two ranks halve the sum of two gradients, which is exactly the sum of their halves, so the
# two computations agree to the last bit (measured: 0.0); the tolerance leaves room for sums
# that another thread count or BLAS might order differently, and is 1e5 times below what the
# deliberate mistakes below change.
TOLERANCE = {"rtol": 0.0, "atol": 1e-10}


@pytest.fixture
def examples(monkeypatch):
    """The example scripts as modules (the Lightning example imports the DDP one by name)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module


def run_torchrun(arguments, output: Path) -> None:
    """The DDP example on ``WORLD_SIZE`` CPU processes, warnings as errors in each."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD_SIZE}",
        str(EXAMPLES / "ddp_count_vae.py"),
        *arguments,
        f"--output={output}",
    ]
    # One thread per process, as torchrun would set (and announce) by itself.
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "error"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr


def reference(ddp_count_vae, arguments, world_size: int) -> dict:
    """The example's one-process reference, leaving this process's random state alone."""
    with torch.random.fork_rng(devices=[]):
        return ddp_count_vae.train_reference(ddp_count_vae.parse_args(arguments), world_size)


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch built without gloo",
)
def test_ddp_matches_one_process_on_the_global_batch(examples, monkeypatch, tmp_path):
    arguments = [*SETTINGS, "--dtype=float64"]
    run_torchrun(arguments, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    ddp_count_vae = examples("ddp_count_vae")
    largest_difference = ddp_count_vae.largest_difference
    expected = reference(ddp_count_vae, arguments, WORLD_SIZE)

    for rank in ranks[1:]:  # DDP keeps the replicas identical
        assert largest_difference(rank["parameters"], ranks[0]["parameters"]) == 0.0
    for key in ddp_count_vae.KEYS:
        for name, value in ranks[0][key].items():
            assert value.dtype == torch.float64
            torch.testing.assert_close(value, expected[key][name], **TOLERANCE, msg=name)

    # The comparison can fail. Each rank's loss divided by the global batch instead of its
    # shard: DDP's mean then halves the gradient. Adam divides that factor out but for its eps,
    # so the first step's gradients show it best; here the parameters show it too.
    per_image = ddp_count_vae.shard_loss
    with monkeypatch.context() as patch:
        patch.setattr(ddp_count_vae, "shard_loss", lambda m, x: per_image(m, x) / WORLD_SIZE)
        wrong_scale = reference(ddp_count_vae, arguments, WORLD_SIZE)
    for key, least in zip(ddp_count_vae.KEYS, (1e-5, 1e-1), strict=True):
        assert largest_difference(ranks[0][key], wrong_scale[key]) > least
    # One process on the global batch with one noise stream, the naive reference:
    one_stream = reference(ddp_count_vae, arguments, 1)
    assert largest_difference(ranks[0]["parameters"], one_stream["parameters"]) > 1e-4
    # And training moved the parameters.
    initial = reference(ddp_count_vae, [*arguments, "--steps=0"], WORLD_SIZE)
    assert largest_difference(ranks[0]["parameters"], initial["parameters"]) > 1e-2


@pytest.mark.filterwarnings(
    # Lightning 2.6 flattens each batch with torch's pytree and tests `isinstance(spec,
    # LeafSpec)`, which torch deprecates; nothing in this project calls it.
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"
)
def test_lightning_one_device_trains(examples, tmp_path):
    import lightning

    lightning_count_vae = examples("lightning_count_vae")
    largest_difference = examples("ddp_count_vae").largest_difference
    steps = 30
    args = lightning_count_vae.parse_args(
        [*SETTINGS, f"--steps={steps}", "--log-every=1", f"--root-dir={tmp_path}"]
    )
    losses, initial = [], {}

    class Record(lightning.Callback):
        def on_train_start(self, trainer, module):
            initial.update({n: p.detach().clone() for n, p in module.named_parameters()})

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    with torch.random.fork_rng(devices=[]):
        trainer, module = lightning_count_vae.train(
            args,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[Record()],
        )
    assert trainer.global_step == steps and len(losses) == steps
    final = {n: p.detach() for n, p in module.named_parameters()}
    assert largest_difference(final, initial) > 1e-2
    # The loss per image falls: 46.1 nats over the first five steps, 41.2 over the last five.
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, losses


def test_fewer_images_than_a_batch_is_refused_not_a_hang(examples):
    # The batch loop waited forever for a full batch that fewer images than one cannot give.
    ddp = examples("ddp_count_vae")
    args = ddp.parse_args(["--synthetic", "--batch-size", "100", "--steps", "3"])
    with pytest.raises(ValueError, match="larger than the 50 images"):
        next(ddp.global_batches(torch.zeros(50, 4), args, torch.float32, "cpu"))
    with pytest.raises(SystemExit):
        ddp.parse_args(["--steps", "-1"])
