"""What the three image VAE experiments share (``vae``, ``gst-vae`` and ``igr-vae``): their
networks, the evaluation images, restoring a checkpoint's parameters, the settings that
identify a record, and the command-line options of training on an image data set."""

import argparse
import dataclasses
from pathlib import Path

import pyro
import torch
from pyro.params.param_store import param_with_module_name
from torch import nn

from pyro_relax._cli import positive_float, positive_int
from pyro_relax.experiments import common
from pyro_relax.experiments.data import DATASETS, ImageDataset, batches, binarize, load_dataset

__all__ = [
    "EVALUATION_SETTINGS",
    "EVAL_BINARIZATION_SEED",
    "add_training_arguments",
    "copy_params",
    "dataset",
    "evaluation_images",
    "expand",
    "finished_record",
    "layer_sizes",
    "mlp",
    "record_settings",
    "restore_params",
    "settings_checkpoint",
    "smoke_picker",
    "steps_per_epoch",
]

EVAL_BINARIZATION_SEED = 0  # one fixed binarization of the evaluation images, for every run


def mlp(sizes) -> nn.Sequential:
    """Linear layers of the given sizes with a ReLU between each two (none after the last).

    Example:
        >>> mlp([4, 3, 2])
        Sequential(
          (0): Linear(in_features=4, out_features=3, bias=True)
          (1): ReLU()
          (2): Linear(in_features=3, out_features=2, bias=True)
        )
    """
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def evaluation_images(data, binarization: str, device):
    """The training and test images binarized once, with :data:`EVAL_BINARIZATION_SEED` (the
    same images for every run), on ``device``."""
    generator = torch.Generator().manual_seed(EVAL_BINARIZATION_SEED)
    train = binarize(data.train_images, binarization, generator).to(device)
    test = binarize(data.test_images, binarization, generator).to(device)
    return train, test


def svi_epoch(svi, data, settings, generator, bar, after_step=None) -> float:
    """One epoch of ``svi`` steps on batches of ``data``'s training images (binarized as
    ``settings.binarization`` says, at most ``settings.steps_per_epoch`` of them, drawn with
    ``generator``, on ``settings.device``), calling ``after_step()`` (a temperature schedule's
    step) and advancing ``bar`` after each; the sum of the steps' losses."""
    images = batches(
        data.train_images,
        settings.batch_size,
        generator=generator,
        binarization=settings.binarization,
    )
    total = 0.0
    for step, x in enumerate(images):
        # Not islice: the batch after the last is drawn (its binarization noise too), as it
        # always was, so that runs reproduce the recorded ones.
        if step == settings.steps_per_epoch:
            break
        total += svi.step(x.to(settings.device))
        if after_step is not None:
            after_step()
        bar.update()
    return total


def training_quantities(modules: dict, guide_parameters, images):
    """What :func:`~pyro_relax.experiments.common.diverging` checks in an image VAE: the
    networks' weights (``modules``: name -> ``nn.Module``; not Pyro's score-function baselines,
    running averages of a cost that may be large), then ``guide_parameters(images)``, the
    ``(name, tensor)`` pairs the guide computes from a few images (computed without a gradient
    and without validation), where a run diverges first while the weights stay moderate: a
    scale that is the exponential of a network output, a count guide's mean."""

    def quantities():
        for prefix, module in modules.items():
            yield from module.named_parameters(prefix=prefix)
        # Computed whole inside the contexts: a generator left suspended in them (the check
        # stops at the first diverged entry) would keep them on until it is collected.
        with torch.no_grad(), pyro.validation_enabled(False):
            computed = list(guide_parameters(images))
        yield from computed

    return quantities


def restore_params(state: dict, modules: dict) -> None:
    """Loads the networks' weights into ``modules`` (name -> ``nn.Module`` registered with
    ``pyro.module(name, ...)``) and puts every other Pyro param (a baseline, a flow's
    parameters) back in the param store, from a state saved by
    ``pyro.get_param_store().get_state()``."""
    params, constraints = dict(state["params"]), dict(state["constraints"])
    for name, module in modules.items():
        prefix = param_with_module_name(name, "")
        weights = {k[len(prefix) :]: params.pop(k) for k in list(params) if k.startswith(prefix)}
        module.load_state_dict(weights)
        for key in [k for k in constraints if k.startswith(prefix)]:
            del constraints[key]
    store = pyro.get_param_store()
    store.clear()
    store.set_state({"params": params, "constraints": constraints})


def record_settings(settings_class, record, stored_before=None) -> dict:
    """The settings of the run that made ``record``, as ``dataclasses.asdict`` of its
    ``settings_class`` instance; a setting that an older record lacks is the one it ran with,
    from ``stored_before`` (else ``None``)."""
    stored_before = stored_before or {}
    return {
        field.name: record.get(field.name, stored_before.get(field.name))
        for field in dataclasses.fields(settings_class)
    }


# The settings of a run's final score, not of its training (those of its settings dataclass
# that exist): a run interrupted, or finished but not yet merged, and run again with other
# values of these resumes or scores the same training.
EVALUATION_SETTINGS = ("num_particles", "eval_samples", "eval_images")


def settings_checkpoint(results: Path, label: str, settings) -> common.Checkpoint:
    """The checkpoint of the run with these ``settings`` (a settings dataclass), named by
    ``label`` and a digest of its training settings: all but :data:`EVALUATION_SETTINGS`."""
    values = {
        key: value
        for key, value in dataclasses.asdict(settings).items()
        if key not in EVALUATION_SETTINGS
    }
    return common.Checkpoint(common.checkpoint_path(results, label, values), values)


def copy_params(state: dict) -> dict:
    """A copy of a param store ``state`` whose tensors are new: scoring marks the stored tensors
    with attributes that cannot be pickled, and a finished run's checkpoint keeps its model."""
    params = {
        name: value.detach().clone().requires_grad_(value.requires_grad)
        for name, value in state["params"].items()
    }
    return {"params": params, "constraints": dict(state["constraints"])}


def finished_record(state, settings, record_settings):
    """The record a run's checkpoint ``state`` holds if the run finished and was scored with
    these ``settings`` (``record_settings`` reads a record's), else ``None``: a run still
    training resumes from the state, and a finished one of other evaluation settings (the
    checkpoint is named by the training settings, :func:`settings_checkpoint`) scores its
    trained model again without training."""
    record = None if state is None else state.get("record")
    if record is None:
        return None
    # By digest: a record may hold a tuple setting as a list.
    same = common.settings_digest(record_settings(record)) == common.settings_digest(
        dataclasses.asdict(settings)
    )
    return record if same else None


def expand(values, everything) -> list:
    """The choices named on the command line, in order and once each; ``all`` is every one."""
    return list(everything) if "all" in values else list(dict.fromkeys(values))


def layer_sizes(text: str) -> tuple:
    """An argparse type: comma-separated positive layer sizes, such as ``512,256``."""
    try:
        sizes = tuple(int(size) for size in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"takes comma-separated positive sizes, got {text!r}")
    return sizes


def add_training_arguments(
    parser, *, estimators, default_epochs: int, default_batch_size: int
) -> None:
    """Adds the options of training on an image data set: ``--estimator`` (some of
    ``estimators``, or ``all``), ``--epochs``, ``--steps-per-epoch``, ``--dataset``,
    ``--data-dir``, ``--batch-size``, ``--lr``, ``--threads`` and ``--no-validation``."""
    parser.add_argument(
        "--estimator",
        nargs="+",
        default=["all"],
        choices=[*estimators, "all"],
        help="estimator(s), or all (default: all)",
    )
    parser.add_argument(
        "--epochs", type=positive_int, help=f"training epochs (default {default_epochs}; smoke: 1)"
    )
    parser.add_argument(
        "--steps-per-epoch",
        type=positive_int,
        help="cap on the batches per epoch (default: all; smoke: 3)",
    )
    parser.add_argument("--dataset", choices=DATASETS, help="default: mnist; smoke: digits")
    parser.add_argument(
        "--data-dir",
        help="directory of the IDX files of MNIST or Fashion-MNIST (default: see "
        "pyro_relax.experiments.data)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=default_batch_size,
        help=f"default: {default_batch_size}",
    )
    parser.add_argument(
        "--lr", type=positive_float, default=1e-3, help="Adam's learning rate (default 0.001)"
    )
    parser.add_argument(
        "--threads", type=positive_int, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument(
        "--no-validation",
        action="store_true",
        help="turn Pyro's argument and support checks off (faster)",
    )


def dataset(args) -> ImageDataset:
    """The data set of ``--dataset``: MNIST by default, the bundled digits under ``--smoke``
    (which changes defaults only: ``--smoke --dataset mnist`` is a short run on MNIST). A
    ``--data-dir`` for the digits, which have no files, is refused rather than ignored."""
    name = args.dataset or ("digits" if args.smoke else "mnist")
    if name == "digits" and args.data_dir is not None:
        raise common.ExperimentError(
            "--data-dir is for MNIST and Fashion-MNIST; the digits are bundled with "
            "scikit-learn (pass --dataset mnist or fashion-mnist to read that directory)"
        )
    return load_dataset(name, args.data_dir)


def smoke_picker(args, smoke: dict):
    """``pick(value, name, default)``: the option's ``value`` if given, else under ``--smoke``
    the smoke setting ``name``, else ``default``."""
    chosen = smoke if args.smoke else {}

    def pick(value, name, default):
        return value if value is not None else chosen.get(name, default)

    return pick


def steps_per_epoch(args, data, pick) -> int:
    """The batches each epoch trains on: every full batch of the training set, or fewer with
    ``--steps-per-epoch`` (a cap above that changes nothing, so names the same run)."""
    full_steps = len(data.train_images) // args.batch_size
    if full_steps == 0:
        raise common.ExperimentError(
            f"--batch-size {args.batch_size} is larger than the {len(data.train_images)} "
            "training images: no full batch to train on"
        )
    cap = pick(args.steps_per_epoch, "steps_per_epoch", None)
    return min(full_steps, cap or full_steps)
