"""The count VAE trained with PyTorch Lightning, on one device or data-parallel on several.

The model, guide and ELBO module are those of ``ddp_count_vae.py`` (next to this file); here a
``LightningModule`` holds the ELBO module, and Lightning's ``Trainer`` does the rest: with
``--strategy ddp`` it starts one process per device, wraps the module in
``DistributedDataParallel`` and gives each process a ``DistributedSampler`` over the images.
The loss of each process is the negative ELBO per image of its batch, so the averaged gradient
is that of the global batch (``docs/distributed.md``). ``--batch-size`` is the global batch;
each of the ``world_size`` processes loads ``batch_size / world_size`` images per step.

One CPU process::

    python examples/lightning_count_vae.py --synthetic --steps 200

Two CPU processes, or N GPUs::

    python examples/lightning_count_vae.py --synthetic --accelerator cpu --devices 2 \\
        --strategy ddp
    python examples/lightning_count_vae.py --data-dir path/to/mnist --accelerator gpu \\
        --devices N --strategy ddp
"""

import argparse

import lightning
import torch
from ddp_count_vae import (
    add_arguments,
    build_elbo,
    load_images,
    local_params,
    noise_seed,
    shard_loss,
)
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from pyro_relax.experiments.data import binarize


class LitCountVAE(lightning.LightningModule):
    """The count VAE's ELBO module as a LightningModule: one Adam step per batch on the negative
    ELBO per image of the batch this process holds."""

    def __init__(self, args: argparse.Namespace, images: torch.Tensor):
        super().__init__()
        self.args, self.images = args, images
        self.elbo = build_elbo(args, images.shape[1])

    def on_train_start(self):
        # One noise stream per process: `train` seeds every process alike for equal initial
        # networks (as Lightning's seed_everything would), and processes that draw the same
        # relaxation noise average less of it away.
        torch.manual_seed(noise_seed(self.args.seed, self.global_rank))

    def train_dataloader(self):
        world_size = self.trainer.world_size
        if self.args.batch_size % world_size:
            raise ValueError(
                f"--batch-size {self.args.batch_size} is not a multiple of {world_size}"
            )
        # Under DDP Lightning replaces the sampler by a DistributedSampler (shuffled, seeded).
        return DataLoader(
            TensorDataset(self.images),
            batch_size=self.args.batch_size // world_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(self.args.seed),
        )

    def training_step(self, batch, batch_idx):
        (images,) = batch
        loss = shard_loss(self.elbo, binarize(images, self.args.binarization))
        self.log("loss", loss, prog_bar=True)  # this process's batch
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.args.lr)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--accelerator", default="cpu", help="cpu, gpu or auto (default cpu)")
    parser.add_argument("--devices", type=int, default=1, help="processes per node (default 1)")
    parser.add_argument("--num-nodes", type=int, default=1, help="default 1")
    parser.add_argument("--strategy", default="auto", help="auto, or ddp for several devices")
    parser.add_argument(
        "--root-dir", default="lightning_logs", help="logs and checkpoints (default lightning_logs)"
    )
    return parser.parse_args(argv)


@local_params
def train(args, **trainer_options) -> tuple:
    """Fits the count VAE for ``args.steps`` steps; ``trainer_options`` go to ``Trainer``."""
    torch.manual_seed(args.seed)  # the same initial networks in every process
    module = LitCountVAE(args, load_images(args))
    options = {
        "accelerator": args.accelerator,
        "devices": args.devices,
        "num_nodes": args.num_nodes,
        "strategy": args.strategy,
        "max_steps": args.steps,
        "log_every_n_steps": args.log_every or args.steps,
        "default_root_dir": args.root_dir,
        # Named, so that Lightning need not say that it falls back on CSV without TensorBoard.
        "logger": CSVLogger(args.root_dir),
    }
    trainer = lightning.Trainer(**(options | trainer_options))
    trainer.fit(module)
    return trainer, module


def main(argv=None) -> None:
    args = parse_args(argv)
    train(args)


if __name__ == "__main__":
    main()
