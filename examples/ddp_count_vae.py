"""Data-parallel training of the count VAE with PyTorch's DistributedDataParallel.

The count VAE of :mod:`pyro_relax.experiments.vae` (a vector of Poisson, Geometric or Negative
Binomial counts per image, a GenGS relaxation of the same family in the guide, Bernoulli
pixels) as a torch module: Pyro's ``TraceMeanField_ELBO()(model, guide)`` is an ``nn.Module``
whose forward pass is the loss, so ``DistributedDataParallel`` wraps it like any network.

Every process reads the same data and draws the same sequence of global batches; rank ``r``
trains on the ``r``-th of ``world_size`` equal shards of each global batch, with its own
relaxation noise (seed ``seed + 1 + r``). Each rank's loss is the negative ELBO *per image* of
its shard; DDP averages the ranks' gradients, so the step follows the gradient of the negative
ELBO per image of the whole global batch (see ``docs/distributed.md``).

On CPU, two processes (gloo)::

    torchrun --nproc_per_node 2 --standalone examples/ddp_count_vae.py --synthetic --steps 100

On N GPUs of one machine, on MNIST (the IDX files in ``--data-dir``)::

    torchrun --nproc_per_node N --standalone examples/ddp_count_vae.py \\
        --data-dir path/to/mnist --backend nccl --device cuda

``--reference`` runs in one process what the ranks compute together: for each step, the shards
in turn, each with the random state its rank would have, gradients accumulated, then one
optimizer step. ``--output DIR`` saves the final parameters (and the first step's gradients) of
each rank, or of the reference, which then prints how far each rank's are from its own (0 with
one thread, as torchrun gives each rank; other thread counts sum in other orders)::

    torchrun --nproc_per_node 2 --standalone examples/ddp_count_vae.py --synthetic \\
        --steps 20 --output runs/ddp
    OMP_NUM_THREADS=1 python examples/ddp_count_vae.py --synthetic --steps 20 \\
        --output runs/ddp --reference 2
"""

import argparse
import os
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.distributed
from pyro.infer import TraceMeanField_ELBO
from pyro.nn import PyroModule
from torch.nn.parallel import DistributedDataParallel

from pyro_relax._cli import integer_at_least, positive_float, positive_int, seed
from pyro_relax.experiments.data import batches, load_mnist
from pyro_relax.experiments.image_vae import layer_sizes, mlp
from pyro_relax.experiments.vae import PRIORS

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# The networks' parameters live in the modules only, not also in Pyro's global param store,
# which knows nothing of DDP's replicas; applied to each training function, not at import.
local_params = pyro.settings.context(module_local_params=True)
KEYS = ("parameters", "first_gradients")  # what the runs save and compare


class CountVAEModel(PyroModule):
    """The generative model: ``latents`` counts per image from the prior's GenGS relaxation,
    truncated as in the paper, and Bernoulli pixels with logits ``decoder(z)``."""

    def __init__(self, prior, latents: int, hidden, pixels: int, temperature: float):
        super().__init__()
        self.prior, self.latents, self.temperature = prior, latents, temperature
        self.decoder = mlp([latents, *reversed(hidden), pixels])

    def forward(self, x):
        weight = next(self.decoder.parameters())
        # prior_kwargs gives tensors of the default dtype; the networks may be in float64.
        kwargs = {
            name: value.to(weight.dtype)
            for name, value in self.prior.prior_kwargs(weight.device).items()
        }
        prior = self.prior.relaxed(
            self.temperature, self.prior.truncation, tail_tolerance=None, **kwargs
        )
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", prior.expand([x.shape[0], self.latents]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)


class CountVAEGuide(PyroModule):
    """The amortized guide: the encoder gives each image's count parameters, relaxed by GenGS
    with the prior's family and truncation."""

    def __init__(self, prior, latents: int, hidden, pixels: int, temperature: float):
        super().__init__()
        self.prior, self.latents, self.temperature = prior, latents, temperature
        width = prior.num_guide_parameters
        self.encoder = mlp([pixels, *hidden, latents * width])

    def forward(self, x):
        raw = self.encoder(x).view(x.shape[0], self.latents, -1)
        guide = self.prior.relaxed(
            self.temperature,
            self.prior.truncation,
            tail_tolerance=None,
            **self.prior.guide_kwargs(raw),
        )
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", guide.to_event(1))


def build_elbo(args, pixels: int):
    """The ELBO of the count VAE as a torch module: ``module(x)`` is the negative ELBO of the
    images ``x``, summed over them.

    ``max_plate_nesting`` is given so that the first call does not run model and guide once more
    to guess it: that extra run would draw noise on one rank that the others do not draw.
    """
    prior = PRIORS[args.prior]
    sizes = (prior, args.latents, args.hidden, pixels, args.temperature)
    elbo = TraceMeanField_ELBO(max_plate_nesting=1)
    return elbo(CountVAEModel(*sizes), CountVAEGuide(*sizes))


def shard_loss(module, shard):
    """One rank's loss: the negative ELBO per image of its shard. Every rank's loss is then an
    estimate of the same quantity, and DDP's average of their gradients is the gradient of the
    negative ELBO per image of the global batch."""
    return module(shard) / shard.shape[0]


def synthetic_images(count: int, pixels: int, seed: int) -> torch.Tensor:
    """``count`` gray-level images of ``pixels`` pixels: ten random binary prototypes, each
    pixel 0.1 or 0.9, so that dynamic binarization flips a tenth of the pixels."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(10, pixels, generator=generator) < 0.5
    labels = torch.randint(10, (count,), generator=generator)
    return 0.1 + 0.8 * prototypes[labels].float()


def load_images(args) -> torch.Tensor:
    """The training images: MNIST from ``--data-dir``, or synthetic ones with ``--synthetic``."""
    if args.synthetic:
        return synthetic_images(args.synthetic_images, args.pixels, args.seed)
    return load_mnist(args.data_dir).train_images


def global_batches(images, args, dtype, device):
    """The global batches of ``args.steps`` steps, the same sequence on every rank: shuffled and
    binarized by a generator seeded with ``args.seed``, epoch after epoch."""
    if len(images) < args.batch_size:
        raise ValueError(
            f"--batch-size {args.batch_size} is larger than the {len(images)} images: no full "
            "batch to train on"
        )
    generator = torch.Generator().manual_seed(args.seed)
    produced = 0
    while produced < args.steps:
        for batch in batches(
            images, args.batch_size, generator=generator, binarization=args.binarization
        ):
            yield batch.to(dtype=dtype, device=device)
            produced += 1
            if produced == args.steps:
                return


def noise_seed(seed: int, rank: int) -> int:
    """The seed of the relaxation noise of ``rank`` (networks are initialized from ``seed``)."""
    return seed + 1 + rank


def gradients(module) -> dict:
    """The current gradient of every parameter of ``module``, by name."""
    return {name: p.grad.detach().clone() for name, p in module.named_parameters()}


def parameters(module) -> dict:
    """A copy of every parameter of ``module``, by name."""
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _initialize(args, pixels, device):
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    elbo = build_elbo(args, pixels).to(dtype=dtype, device=device)
    return elbo, dtype


@local_params
def train_ddp(args) -> dict:
    """This rank's share of data-parallel training (torchrun sets the rank and world size)."""
    torch.distributed.init_process_group(args.backend)
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if args.batch_size % world_size:
        raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of {world_size}")
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    images = load_images(args)
    elbo, dtype = _initialize(args, images.shape[1], device)
    # DDP copies rank 0's parameters to every rank here; they start equal anyway.
    model = DistributedDataParallel(elbo, device_ids=[device] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    torch.manual_seed(noise_seed(args.seed, rank))
    first_gradients, began = None, time.perf_counter()
    for step, batch in enumerate(global_batches(images, args, dtype, device)):
        optimizer.zero_grad()
        loss = shard_loss(model, batch.chunk(world_size)[rank])
        loss.backward()  # DDP all-reduces the gradients here: their mean over the ranks
        if first_gradients is None:
            first_gradients = gradients(elbo)
        optimizer.step()
        if args.log_every and (step + 1) % args.log_every == 0:
            mean = loss.detach() / world_size
            torch.distributed.all_reduce(mean)  # the loss per image of the global batch
            if rank == 0:
                print(f"step {step + 1}: loss per image {float(mean):.3f}", flush=True)
    if rank == 0:
        print(f"{args.steps} steps on {world_size} ranks in {time.perf_counter() - began:.1f} s")
    torch.distributed.destroy_process_group()
    return {
        "rank": rank,
        "world_size": world_size,
        "first_gradients": first_gradients,
        "parameters": parameters(elbo),
    }


@local_params
def train_reference(args, world_size: int) -> dict:
    """What ``world_size`` ranks compute, in one process on the CPU: for each global batch, each
    rank's shard in turn under the random state that rank would have, its gradient divided by
    ``world_size`` (DDP's mean) and accumulated, then one optimizer step."""
    if args.batch_size % world_size:
        raise ValueError(f"batch size {args.batch_size} is not a multiple of {world_size}")
    images = load_images(args)
    elbo, dtype = _initialize(args, images.shape[1], torch.device("cpu"))
    optimizer = torch.optim.Adam(elbo.parameters(), lr=args.lr)
    streams = []
    for rank in range(world_size):
        torch.manual_seed(noise_seed(args.seed, rank))
        streams.append(torch.get_rng_state())
    first_gradients = None
    for batch in global_batches(images, args, dtype, torch.device("cpu")):
        optimizer.zero_grad()
        for rank, shard in enumerate(batch.chunk(world_size)):
            torch.set_rng_state(streams[rank])
            (shard_loss(elbo, shard) / world_size).backward()
            streams[rank] = torch.get_rng_state()
        if first_gradients is None:
            first_gradients = gradients(elbo)
        optimizer.step()
    return {
        "world_size": world_size,
        "first_gradients": first_gradients,
        "parameters": parameters(elbo),
    }


def add_arguments(parser) -> None:
    """The options of the data, the count VAE and its training, shared with the Lightning
    example."""
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-dir", help="directory of MNIST's four gzipped IDX files")
    data.add_argument("--synthetic", action="store_true", help="random binary images instead")
    parser.add_argument(
        "--synthetic-images", type=positive_int, default=10_000, help="default 10000"
    )
    parser.add_argument(
        "--pixels", type=positive_int, default=784, help="synthetic pixels (default 784)"
    )
    parser.add_argument("--prior", choices=list(PRIORS), default="Pois(2)")
    parser.add_argument(
        "--latents", type=positive_int, default=32, help="count latents (default 32)"
    )
    parser.add_argument("--hidden", type=layer_sizes, default=(512, 256), help="default 512,256")
    parser.add_argument("--temperature", type=positive_float, default=0.5, help="default 0.5")
    parser.add_argument("--binarization", choices=["dynamic", "fixed"], default="dynamic")
    parser.add_argument(
        "--batch-size", type=positive_int, default=100, help="global batch (default 100)"
    )
    parser.add_argument(
        "--steps", type=integer_at_least(0), default=600, help="optimizer steps (default 600)"
    )
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="Adam's learning rate")
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument(
        "--log-every", type=integer_at_least(0), default=50, help="0: no log (default 50)"
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (CUDA)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: one GPU per rank")
    parser.add_argument("--output", type=Path, help="save parameters and gradients here")
    parser.add_argument(
        "--reference",
        type=positive_int,
        metavar="WORLD_SIZE",
        help="no DDP: compute in one process, on the CPU, what WORLD_SIZE ranks would",
    )
    return parser.parse_args(argv)


def largest_difference(first: dict, second: dict) -> float:
    """The largest absolute difference between two dicts of tensors with the same names."""
    if first.keys() != second.keys():
        raise ValueError("the two runs have different parameters")
    return max(float((first[name] - second[name]).abs().max()) for name in first)


def compare(result: dict, output: Path) -> None:
    """Prints how far the ranks' results saved in ``output`` are from the reference."""
    for path in sorted(output.glob("rank*.pt")):
        rank = torch.load(path)
        differences = [largest_difference(rank[key], result[key]) for key in KEYS]
        print(
            f"{path.name}: largest difference from the reference, parameters "
            f"{differences[0]:.3g}, first gradients {differences[1]:.3g}"
        )


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.reference:
        result, name = train_reference(args, args.reference), "reference.pt"
    else:
        result = train_ddp(args)
        name = f"rank{result['rank']}.pt"
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        torch.save(result, args.output / name)
        if args.reference:
            compare(result, args.output)


if __name__ == "__main__":
    main()
