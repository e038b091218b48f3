"""Checkpoint ``torchlbfgs.LBFGS`` and resume: the same run, bit for bit.

A ``Linear(10, 1)`` least-squares model is trained in float64 for ``N_STEPS`` steps; the model
and optimizer state are saved with ``torch.save``. Training then resumes from the checkpoint
with a fresh model and a NEW optimizer:

* with a GPU: on CUDA (the state moves to the parameters' device when loaded);
* without one: in a fresh Python process, whose final params must equal those of an
  uninterrupted ``2 * N_STEPS``-step run bit for bit; and in float32 (a float64 checkpoint
  loaded into a float32 model: the state is cast when loaded).

The optimizer's state dict holds the whole L-BFGS state, curvature history included, as
tensors (it loads with ``torch.load(..., weights_only=True)``), so the resumed run takes
exactly the steps the uninterrupted one takes. Hyper-parameters (``lr``,
``line_search_fn``, ...) are restored from the checkpoint too; only ``history_size``, which
fixes the shapes of the state, must be given again.

Run: ``python docs/examples/checkpoint_resume.py``; exits non-zero if a claim fails.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import torchlbfgs

N_STEPS = 5
HISTORY_SIZE = 4  # smaller than the iterations before the checkpoint: the history has wrapped
OPTIONS = {"lr": 1.0, "max_iter": 4, "line_search_fn": "strong_wolfe", "history_size": HISTORY_SIZE}


def make_data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares with badly scaled features, so L-BFGS needs a few dozen iterations."""
    generator = torch.Generator().manual_seed(0)
    scales = torch.logspace(-1, 1, 10, dtype=torch.float64)
    inputs = torch.randn(200, 10, generator=generator, dtype=torch.float64) * scales
    true_weights = torch.randn(10, 1, generator=generator, dtype=torch.float64)
    targets = inputs @ true_weights + 0.1 * torch.randn(200, 1, generator=generator, dtype=torch.float64)
    return inputs.to(dtype), targets.to(dtype)


def make_model(dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(10, 1).to(dtype=dtype, device=device)


def loss_of(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(inputs), targets))


def train(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, label: str, first_step: int = 0
) -> None:
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    inputs, targets = (tensor.to(device) for tensor in make_data(dtype))

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        return loss

    for step in range(first_step, first_step + steps):
        optimizer.step(closure)
        print(f"  [{label}] step {step + 1:2d}  loss {loss_of(model, inputs, targets):.10e}")


def resume(checkpoint_path: Path, dtype: torch.dtype, device: str, label: str) -> torch.nn.Module:
    """A fresh model and a new optimizer continue for ``N_STEPS`` steps from the checkpoint."""
    checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=True)
    model = make_model(dtype, device, seed=1)  # its own initial values are overwritten below
    model.load_state_dict(checkpoint["model"])
    optimizer = torchlbfgs.LBFGS(model.parameters(), history_size=HISTORY_SIZE)
    optimizer.load_state_dict(checkpoint["optimizer"])  # state and hyper-parameters
    train(model, optimizer, N_STEPS, label, first_step=N_STEPS)
    return model


def same_bits(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return all(x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu()) for x, y in pairs)


def main() -> None:
    print(f"Uninterrupted run, {2 * N_STEPS} steps:")
    reference = make_model(torch.float64)
    train(reference, torchlbfgs.LBFGS(reference.parameters(), **OPTIONS), 2 * N_STEPS, "uninterrupted")

    print(f"\nFirst half, {N_STEPS} steps, then a checkpoint:")
    model = make_model(torch.float64)
    optimizer = torchlbfgs.LBFGS(model.parameters(), **OPTIONS)
    train(model, optimizer, N_STEPS, "first half")
    state = optimizer.state_dict()["state"][0]
    print(f"  history: {int(state['n_pairs'])} pairs kept after {int(state['iteration'])} iterations")
    loss_at_checkpoint = loss_of(model, *make_data(torch.float64))

    with tempfile.TemporaryDirectory() as directory:
        checkpoint_path = Path(directory) / "checkpoint.pt"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint_path)

        if torch.cuda.is_available():
            print("\nSecond half on CUDA (new model, new optimizer):")
            resumed = resume(checkpoint_path, torch.float64, "cuda", "CUDA")
            for got, expected in zip(resumed.parameters(), reference.parameters(), strict=True):
                # another device sums in another order: equal up to rounding, not bit for bit
                torch.testing.assert_close(got.detach().cpu(), expected.detach(), rtol=1e-6, atol=1e-8)
            print("OK: the run resumed on CUDA matches the uninterrupted run (to rounding).")
            return

        print("\nSecond half in a fresh Python process (new model, new optimizer):", flush=True)
        params_path = Path(directory) / "resumed_params.pt"
        command = [sys.executable, __file__, "--resume", str(checkpoint_path), str(params_path)]
        subprocess.run(command, check=True)
        resumed = make_model(torch.float64, seed=2)
        resumed.load_state_dict(torch.load(params_path, weights_only=True))
        if not same_bits(resumed, reference):
            sys.exit("FAILED: the resumed run's params differ from the uninterrupted run's")
        print("OK: the resumed run's final params equal the uninterrupted run's, bit for bit.")

        print("\nSecond half in float32, from the float64 checkpoint:")
        resumed32 = resume(checkpoint_path, torch.float32, "cpu", "float32")
        loss32 = loss_of(resumed32, *make_data(torch.float32))
        loss64 = loss_of(reference, *make_data(torch.float64))
        print(f"  loss: {loss_at_checkpoint:.6e} at the checkpoint -> {loss32:.6e} in float32")
        print(f"  (the float64 run reaches {loss64:.6e})")
        if not loss32 < loss_at_checkpoint:
            sys.exit("FAILED: the float32 continuation did not lower the loss")
        if abs(loss32 - loss64) > 1e-3 * loss64:
            sys.exit("FAILED: the float32 continuation strays from the float64 run")
        print("OK: the float64 state continues in float32.")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--resume":  # the fresh process
        resumed = resume(Path(sys.argv[2]), torch.float64, "cpu", "fresh process")
        torch.save(resumed.state_dict(), sys.argv[3])
    else:
        main()
