"""One rank of the sharded-parameter tests (``test_sharded.py`` starts 4 with :func:`run_ranks`;
``torchrun --nproc-per-node 4 tests/sharded_worker.py OUT`` does the same). Everything runs on
a mesh of the first 2 ranks, then on one of all 4 (one launch: starting processes is what costs).

Every configuration trains a small MLP in float64 with ``torchlbfgs.LBFGS`` (history 3, so the
ring wraps) for a few steps and saves, per rank: the losses, the closure calls, the full
parameters at the end and the all-reduces the optimizer made. Configurations:

* ``fsdp``: the model under FSDP2's ``fully_shard`` (every parameter a ``Shard(0)`` DTensor,
  uneven shards, empty on some ranks); each rank holds half of the samples, FSDP averages
  the gradients over ranks and the closure all-reduces the loss to the global mean;
* ``dtensor``: parameters made by hand with ``distribute_tensor``, the weights ``Shard(0)``,
  the biases ``Replicate()``; every rank evaluates all samples (the forward gathers the weights
  with ``full_tensor``).

:func:`train` with ``world_size=1`` runs the same on one process with plain parameters: the
reference every rank must match.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import ranks
import torch
import torch.distributed as dist

import torchlbfgs

SAMPLES, FEATURES, HIDDEN = 32, 5, 7
MESH_SIZES = (2, 4)
_MESHES: dict[int, Any] = {}  # mesh size -> the DeviceMesh of the first that many ranks
CONFIGS = [(layout, search) for layout in ("fsdp", "dtensor") for search in (None, "strong_wolfe")]


def configs(world_size: int) -> list[tuple[str, str | None]]:
    """What runs on a mesh of ``world_size`` ranks: every configuration on the smallest, FSDP's
    on the larger ones (each launched process costs seconds of the test suite)."""
    return CONFIGS if world_size == MESH_SIZES[0] else [c for c in CONFIGS if c[0] == "fsdp"]


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(SAMPLES, FEATURES, generator=generator, dtype=torch.float64)
    targets = torch.sin(inputs @ torch.randn(FEATURES, 1, generator=generator, dtype=torch.float64))
    return inputs, targets


def model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(FEATURES, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1)]
    return torch.nn.Sequential(*layers).double()


def _sharded_params(net: torch.nn.Sequential, layout: str, world_size: int) -> list[torch.Tensor]:
    """The parameters to optimize; with ``world_size > 1`` sharded as ``layout`` says."""
    if world_size == 1:
        return list(net.parameters())
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = _MESHES[world_size]
    if layout == "fsdp":
        fully_shard(net, mesh=mesh)
        return list(net.parameters())
    for module in (net[0], net[2]):
        module.weight = torch.nn.Parameter(distribute_tensor(module.weight.detach(), mesh, [Shard(0)]))
        module.bias = torch.nn.Parameter(distribute_tensor(module.bias.detach(), mesh, [Replicate()]))
    return list(net.parameters())


def _forward(net: torch.nn.Sequential, inputs: torch.Tensor, layout: str, world_size: int) -> torch.Tensor:
    if layout == "fsdp" or world_size == 1:
        return net(inputs)  # type: ignore[no-any-return]
    hidden = torch.tanh(inputs @ net[0].weight.full_tensor().T + net[0].bias.full_tensor())
    return hidden @ net[2].weight.full_tensor().T + net[2].bias.full_tensor()  # type: ignore[no-any-return]


def train(layout: str, search: str | None, rank: int, world_size: int, steps: int = 3) -> dict[str, Any]:
    inputs, targets = data()
    if layout == "fsdp":  # data parallel: this rank's share of the samples
        shard = slice(rank * SAMPLES // world_size, (rank + 1) * SAMPLES // world_size)
        inputs, targets = inputs[shard], targets[shard]
    net = model()
    params = _sharded_params(net, layout, world_size)
    optimizer = torchlbfgs.LBFGS(params, history_size=3, max_iter=6, line_search_fn=search)
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        optimizer.zero_grad()
        loss = ((_forward(net, inputs, layout, world_size) - targets) ** 2).mean()
        loss.backward()  # under FSDP: gradients averaged over ranks (equal shares of samples)
        loss = loss.detach()
        if layout == "fsdp" and world_size > 1:
            dist.all_reduce(loss, group=_MESHES[world_size].get_group())
            loss /= world_size
        return loss

    counted = _AllReduceCounter()
    losses, reductions = [], []
    for _ in range(steps):
        with counted:
            calls_before = calls
            losses.append(float(optimizer.step(closure)))
        closure_reductions = (calls - calls_before) if layout == "fsdp" and world_size > 1 else 0
        reductions.append(counted.calls - closure_reductions)
        counted.calls = 0
    state = optimizer.state[params[0]]
    full = [p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in params]
    return {
        "losses": losses, "calls": calls, "params": full, "all_reduces": reductions,
        "iterations": int(state["iteration"]), "evaluations": int(state["n_evals"]),
        "local_size": int(state["grad"].numel()),
    }  # fmt: skip


def checkpointed_optimizer(params: Any) -> torchlbfgs.LBFGS:
    """The optimizer of the checkpoint tests (4 iterations a step fill its memory of 3 pairs)."""
    return torchlbfgs.LBFGS(params, history_size=3, max_iter=4, line_search_fn="strong_wolfe")


def full_batch_closure(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    """The closure of the checkpoint tests: the mean squared error of all samples, on every rank."""
    inputs, targets = data()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = ((net(inputs) - targets) ** 2).mean()
        loss.backward()
        return loss.detach()

    return closure


def checkpoint_resumes(world_size: int) -> dict[str, Any]:
    """A step, a state dict through ``torch.save``, a fresh sharded model and optimizer that
    load it and take one more: the parameters after, against two uninterrupted steps; and
    what loading the sharded state onto unsharded parameters says."""
    import io

    def setup() -> tuple[torch.nn.Sequential, list[torch.Tensor], torchlbfgs.LBFGS, Any]:
        net = model()
        params = _sharded_params(net, "fsdp", world_size)
        optimizer = checkpointed_optimizer(params)
        return net, params, optimizer, full_batch_closure(net, optimizer)

    _, params, optimizer, closure = setup()
    for _ in range(2):
        optimizer.step(closure)
    uninterrupted = [p.detach().full_tensor() for p in params]
    _, params, optimizer, closure = setup()
    optimizer.step(closure)  # 4 iterations: the memory of 3 pairs is full
    state_dict = optimizer.state_dict()
    leaves = {
        f"{index}/{name}": (type(leaf).__name__, tuple(leaf.shape), str(getattr(leaf, "placements", "")))
        for index, entry in state_dict["state"].items()
        for name, leaf in entry.items()
        if name in ("grad", "s_history", "y_history", "pending_direction")
    }
    refusals = _corrupted_loads(optimizer, state_dict, params)
    try:
        torchlbfgs.to_torch_state_dict(state_dict)
        refusals.append("converted")
    except ValueError as error:
        refusals.append(str(error))
    buffer = io.BytesIO()
    torch.save({"model": [p.detach().to_local().clone() for p in params], "optimizer": state_dict}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    _, params, optimizer, closure = setup()
    with torch.no_grad():
        for p, piece in zip(params, saved["model"], strict=True):
            p.to_local().copy_(piece)
    optimizer.load_state_dict(saved["optimizer"])
    optimizer.step(closure)
    resumed = [p.detach().full_tensor() for p in params]
    unsharded = torchlbfgs.LBFGS(model().parameters(), history_size=3)
    try:
        unsharded.load_state_dict(saved["optimizer"])
        refused = "loaded"
    except ValueError as error:
        refused = str(error)
    return {
        "uninterrupted": uninterrupted, "resumed": resumed, "refused": refused, "leaves": leaves,
        "refusals": refusals,
    }  # fmt: skip


def _corrupted_loads(optimizer: torchlbfgs.LBFGS, state_dict: dict[str, Any], params: list[Any]) -> list[str]:
    """What loading a state dict with one leaf broken says, on every rank, and whether the
    optimizer stayed as it was: a DTensor leaf of the wrong shape, a plain tensor where a DTensor
    belongs, a NaN in rank 1's piece only, the first parameter's entry (the scalars) missing."""
    from torch.distributed.tensor import DTensor

    before = optimizer.state_dict()
    grad = state_dict["state"][1]["grad"]
    nan_on_rank_1 = grad.to_local().clone()
    if dist.get_rank() == 1:
        nan_on_rank_1.view(-1)[0] = torch.nan
    broken = {
        "shape": DTensor.from_local(
            grad.to_local()[:1], grad.device_mesh, grad.placements, run_check=False,
            shape=torch.Size([1]), stride=(1,),
        ),
        "plain": grad.full_tensor(),
        "nan": DTensor.from_local(nan_on_rank_1, grad.device_mesh, grad.placements, run_check=False,
                                  shape=grad.shape, stride=grad.stride()),
    }  # fmt: skip
    corrupted_dicts = [
        {**state_dict, "state": {**state_dict["state"], 1: {**state_dict["state"][1], "grad": leaf}}}
        for leaf in broken.values()
    ]
    without_first = {index: entry for index, entry in state_dict["state"].items() if index != 0}
    corrupted_dicts.append({**state_dict, "state": without_first})  # the scalars' entry missing
    said = []
    for corrupted in corrupted_dicts:
        try:
            optimizer.load_state_dict(corrupted)
            said.append("loaded")
        except ValueError as error:
            after = optimizer.state_dict()
            unchanged = all(
                torch.equal(_full(a), _full(b))
                for index in before["state"]
                for a, b in zip(before["state"][index].values(), after["state"][index].values(), strict=True)
                if isinstance(a, torch.Tensor)
            )
            said.append(f"{error} (unchanged: {unchanged})")
    return said


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def resharded_checkpoints(out: str, rank: int) -> dict[str, Any]:
    """``torch.distributed.checkpoint`` across mesh sizes: an FSDP model and its optimizer take a
    step on 2 ranks and are saved; 1 rank loads them into a fresh model and optimizer and takes
    a step (2 -> 1); and the reverse (1 -> 2). The parameters after the step, and the state
    saved and loaded, gathered."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def setup(size: int) -> tuple[torch.nn.Sequential, torchlbfgs.LBFGS, Any]:
        from torch.distributed.fsdp import fully_shard

        net = model()
        fully_shard(net, mesh=_MESHES[size])  # on one rank too: DTensors on a mesh of one
        optimizer = checkpointed_optimizer(net.parameters())
        return net, optimizer, full_batch_closure(net, optimizer)

    def gathered(optimizer: torchlbfgs.LBFGS) -> dict[str, torch.Tensor]:
        return {
            f"{index}/{name}": _full(leaf).clone()
            for index, entry in optimizer.state_dict()["state"].items()
            for name, leaf in entry.items()
            if isinstance(leaf, torch.Tensor)
        }

    def save(size: int, path: str) -> dict[str, torch.Tensor]:
        net, optimizer, closure = setup(size)
        optimizer.step(closure)
        state = {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, optimizer)}
        dcp.save(state, checkpoint_id=path, process_group=_MESHES[size].get_group())
        return gathered(optimizer)

    def load_and_step(size: int, path: str) -> dict[str, Any]:
        net, optimizer, closure = setup(size)
        state = {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, optimizer)}
        dcp.load(state, checkpoint_id=path, process_group=_MESHES[size].get_group())
        set_model_state_dict(net, state["model"])
        set_optimizer_state_dict(net, optimizer, state["optim"])
        loaded = gathered(optimizer)
        optimizer.step(closure)
        return {"loaded": loaded, "params": [_full(p.detach()).clone() for p in net.parameters()]}

    results: dict[str, Any] = {}
    if rank < 2:
        results["saved on 2"] = save(2, f"{out}.dcp-from-2")
    dist.barrier()
    if rank == 0:
        results["2 -> 1"] = load_and_step(1, f"{out}.dcp-from-2")
        results["saved on 1"] = save(1, f"{out}.dcp-from-1")
    dist.barrier()
    if rank < 2:
        results["1 -> 2"] = load_and_step(2, f"{out}.dcp-from-1")
    return results


def batch_problems(size: int = 11) -> tuple[torch.Tensor, ...]:
    """``size`` logistic regressions (an odd number: uneven shards), a start, shared decay."""
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(size, 40, 3, generator=generator, dtype=torch.float64)
    y = (torch.rand(size, 40, generator=generator, dtype=torch.float64) < torch.sigmoid(X[..., 0])).double()
    return torch.zeros(size, 3, dtype=torch.float64), X, y, torch.tensor(0.1, dtype=torch.float64)


BATCH_OPTIONS: dict[str, Any] = {"in_dims": (0, 0, 0, None), "tolerance_grad": 1e-10}


def logistic(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y) + decay * (w @ w)


def batch_over_ranks(world_size: int) -> dict[str, Any]:
    """``batched_minimize`` on a batch sharded over the mesh: the result's fields gathered (after
    the solve), their placements, and the collectives made during the solve."""
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = _MESHES[world_size]
    w0, X, y, decay = batch_problems()
    w0, X, y = (distribute_tensor(t, mesh, [Shard(0)]) for t in (w0, X, y))
    counted = _AllReduceCounter()
    with counted:
        result = torchlbfgs.batched_minimize(
            logistic, w0, X, y, decay, in_dims=(0, 0, 0, None), tolerance_grad=1e-10
        )
    return {
        "fields": {name: value.full_tensor() for name, value in result._asdict().items()},
        "placements": {name: str(value.placements) for name, value in result._asdict().items()},
        "local_rows": result.params.to_local().shape[0],
        "collectives": counted.calls,
    }


def extremes_over_ranks(world_size: int) -> dict[str, list[float]]:
    """``aminmax`` of vectors sharded over the mesh where one rank holds an infinity, a NaN, or
    nothing at all: what every rank reads."""
    from torchlbfgs.sharding import ShardedReductions

    reductions = ShardedReductions(_MESHES[world_size].get_group(), None)
    rank = dist.get_rank()
    cases = {
        "inf": torch.tensor([1.0, torch.inf if rank == 1 else -2.0]),
        "-inf": torch.tensor([1.0, -torch.inf if rank == 1 else 2.0]),
        "nan": torch.tensor([1.0, torch.nan if rank == 1 else 2.0]),
        "empty on rank 1": torch.tensor([] if rank == 1 else [3.0, -4.0]),
    }
    return {name: [float(value) for value in reductions.aminmax(vector)] for name, vector in cases.items()}


def torch_lbfgs_outcome(world_size: int) -> str:
    """What ``torch.optim.LBFGS`` does with the same FSDP model (the comparison the docs make)."""
    net = model()
    optimizer = torch.optim.LBFGS(_sharded_params(net, "fsdp", world_size))
    closure = full_batch_closure(net, optimizer)
    try:
        optimizer.step(closure)
    except RuntimeError as error:
        return f"RuntimeError: {error}"
    return "stepped"


def bounds_refused(world_size: int) -> str:
    """The error a bounded step on sharded parameters raises (and that it changed nothing)."""
    net = model()
    params = _sharded_params(net, "dtensor", world_size)
    before = [p.detach().full_tensor() for p in params]
    optimizer = torchlbfgs.LBFGS(params, lower=0.0)
    inputs, targets = data()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = ((_forward(net, inputs, "dtensor", world_size) - targets) ** 2).mean()
        loss.backward()
        return loss.detach()

    try:
        optimizer.step(closure)
    except ValueError as error:
        unchanged = all(torch.equal(p.detach().full_tensor(), b) for p, b in zip(params, before, strict=True))
        return f"{error} (unchanged: {unchanged}, state: {len(optimizer.state)})"
    return "no error"


# The functional API on DTensor pytrees: (function, line search, direction) configurations.
FUNCTIONAL = [
    ("minimize", "strong_wolfe", "compact"),
    ("minimize", "more_thuente", "two_loop"),
    ("update", None, "compact"),
    ("update", "backtracking", "two_loop"),
]
FUNCTIONAL_ITERATIONS = 5


def functional_configs(world_size: int) -> list[tuple[str, str | None, str]]:
    return FUNCTIONAL if world_size == MESH_SIZES[0] else FUNCTIONAL[:1]


def functional_params(world_size: int) -> dict[str, torch.Tensor]:
    """The MLP's parameters as a dict; over a mesh, DTensors: the first weight ``Shard(0)``, the
    second ``Shard(1)`` (a ``(1, 7)`` matrix: uneven shards), the biases ``Replicate()``."""
    params = {name: p.detach() for name, p in model().named_parameters()}
    if world_size == 1:
        return params
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    placements = {"0.weight": Shard(0), "0.bias": Replicate(), "2.weight": Shard(1), "2.bias": Replicate()}
    mesh = _MESHES[world_size]
    return {name: distribute_tensor(p, mesh, [placements[name]]) for name, p in params.items()}


def functional_loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean squared error of the MLP, written with whole tensors (``full_tensor`` gathers a
    DTensor, differentiably)."""
    inputs, targets = data()
    full = {name: p.full_tensor() if hasattr(p, "full_tensor") else p for name, p in params.items()}
    hidden = torch.tanh(inputs @ full["0.weight"].T + full["0.bias"])
    return (((hidden @ full["2.weight"].T + full["2.bias"]) - targets) ** 2).mean()


def functional(api: str, search: str | None, direction: str, world_size: int) -> dict[str, Any]:
    """``minimize``, or ``init`` and a loop of ``update``, on the parameters of
    :func:`functional_params`: values, counters, the parameters (gathered) and their placements,
    the size of this process's state, and the all-reduces the solver made."""
    params = functional_params(world_size)
    options: dict[str, Any] = {"line_search": search}
    counted = _AllReduceCounter()
    with counted:
        if api == "minimize":
            result = torchlbfgs.minimize(
                functional_loss, params, history_size=3, direction=direction, max_iter=FUNCTIONAL_ITERATIONS,
                tolerance_grad=1e-12, **options,
            )  # fmt: skip
            params, values = result.params, [float(result.value)]
            iterations, evaluations, local_size = int(result.n_iter), int(result.n_evals), None
            grad_norm = float(result.grad_norm)
        else:
            state = torchlbfgs.init(functional_loss, params, history_size=3, direction=direction)
            values = []
            for _ in range(FUNCTIONAL_ITERATIONS):
                params, state = torchlbfgs.update(
                    functional_loss, params, state, tolerance_grad=1e-12, **options
                )
                values.append(float(state.value))
            iterations, evaluations, local_size = int(state.iteration), int(state.n_evals), state.grad.numel()
            grad_norm = None
    return {
        "values": values, "iterations": iterations, "evaluations": evaluations, "grad_norm": grad_norm,
        "local_size": local_size, "all_reduces": counted.calls,
        "params": {name: p.full_tensor() if hasattr(p, "full_tensor") else p for name, p in params.items()},
        "placements": {name: str(getattr(p, "placements", None)) for name, p in params.items()},
    }  # fmt: skip


def functional_refusals(world_size: int) -> list[str]:
    """What the functional API says to bounds and to implicit differentiation on DTensors."""
    params, said = functional_params(world_size), []
    for options in ({"bounds": (0.0, None)}, {"implicit_diff": True}):
        try:
            torchlbfgs.minimize(functional_loss, params, max_iter=1, **options)
            said.append("no error")
        except ValueError as error:
            said.append(str(error))
    return said


class _AllReduceCounter:
    """Counts calls of ``torch.distributed.all_reduce`` (or of the collectives ``names``) while
    entered."""

    def __init__(self, names: tuple[str, ...] = ("all_reduce",)) -> None:
        self.calls = 0
        self._originals = {name: getattr(dist, name) for name in names}

    def __enter__(self) -> None:
        for name, original in self._originals.items():

            def counting(*args: Any, original: Any = original, **kwargs: Any) -> Any:
                self.calls += 1
                return original(*args, **kwargs)

            setattr(dist, name, counting)

    def __exit__(self, *exc: object) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)


COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "reduce_scatter_tensor",
    "barrier",
)


def run_ranks(out: Path, world_size: int) -> list[tuple[int, str]]:
    """``world_size`` ranks of this script, each saving its results to ``{out}.rank{rank}``; the
    exit code of each, and its traceback if it failed (:func:`ranks.run_ranks`)."""
    return ranks.run_ranks(main, out, world_size, preload=["torch", "torch.distributed.fsdp", "torchlbfgs"])


def run_all(rank: int, world_size: int) -> dict[str, Any]:
    """Every check on a mesh of ``world_size`` ranks, as this rank saw it."""
    results: dict[str, Any] = {
        f"{layout}-{search}": train(layout, search, rank, world_size)
        for layout, search in configs(world_size)
    }
    for api, search, direction in functional_configs(world_size):
        results[f"functional {api}-{search}-{direction}"] = functional(api, search, direction, world_size)
    if world_size == MESH_SIZES[0]:  # once is enough for these
        results["functional refusals"] = functional_refusals(world_size)
        results["bounds refused"] = bounds_refused(world_size)
        results["checkpoint"] = checkpoint_resumes(world_size)
        results["torch.optim.LBFGS"] = torch_lbfgs_outcome(world_size)
        results["extremes"] = extremes_over_ranks(world_size)
    results["batch"] = batch_over_ranks(world_size)
    return results


def main(out: str) -> None:
    from torch.distributed.device_mesh import DeviceMesh

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    results = {}
    for size in (size for size in MESH_SIZES if size <= world_size):
        group = dist.new_group(list(range(size)))  # every rank takes part in making it
        if rank < size:
            _MESHES[size] = DeviceMesh.from_group(group, "cpu")
            results[size] = run_all(rank, size)
        dist.barrier()
    group = dist.new_group([0])
    if rank == 0:
        _MESHES[1] = DeviceMesh.from_group(group, "cpu")
    results["resharded"] = resharded_checkpoints(out, rank)
    dist.destroy_process_group()
    torch.save(results, f"{out}.rank{rank}")


if __name__ == "__main__":
    main(sys.argv[1])
